"""Every recipe under torchrun on CPU ranks (gloo, the FSDP2 code NCCL runs), docs/SCALING.md.

The matrix trains each local config on 2 ranks with its own gradient accumulation, validation
on uneven per-rank counts, activation checkpointing, and the bf16 mixed-precision FSDP path of
a GPU node (``train.fsdp_param_dtype=bfloat16``); then a SIGKILL + resume on 2 ranks, two
"nodes" on one machine, numerical agreement with one process, and a hang that must fail with
its rank and step named. Every launch has a timeout; a collective that waits longer than
``train.dist_timeout_s`` fails inside the run with the rank and the optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, make_tiny_storage
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import load_config
from weighted_mtp.data.dataset import build_examples, split_files
from weighted_mtp.train import checkpoint
from weighted_mtp.train.checkpoint import tokenizer_for
from weighted_mtp.train.loop import Trainer
from weighted_mtp.train.tracking import read_metrics

pytestmark = pytest.mark.distributed

TIMEOUT_S = 420
"""Wall-clock limit of one launch (the suite shares 2 cores with other tests)."""
COMMON = [
    "train.max_steps=3",
    "log.mlflow=false",
    "checkpoint.every=2",
    "log.val_every=2",
    "train.dist_timeout_s=120",
    "model.activation_checkpointing=true",
]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
    "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
}


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *args]  # fmt: skip


def wmtp_train(recipe: str, storage: Path, *overrides: str) -> list[str]:
    return ["-m", "weighted_mtp", "train", str(REPO / f"configs/local/{recipe}.yaml"),
            "--storage", str(storage), *COMMON, *overrides]  # fmt: skip


def launch(cmd: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail with
    the end of its output (which names the rank and step of a timed-out collective)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=REPO, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[-12:])} ran past {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def uneven_validation(storage: Path) -> tuple[int, int]:
    """``(data.max_length, data.sampling.val_n_samples)`` for which the 2 ranks keep different
    numbers of validation examples (too-long ones are dropped), none of them zero."""
    layout = StorageLayout(storage)
    config = load_config(REPO / "configs/local/baseline.yaml")
    tok = tokenizer_for(layout, layout.model("micro-mtp").root)
    files = split_files(layout, config.data, config.data.val_split)
    for n in (8, 12, 16):
        for length in range(96, 1024, 16):
            counts = [len(build_examples(files, config.data.sampling, tok, length, n, rank, 2,
                                         allow_fewer=True)) for rank in (0, 1)]  # fmt: skip
            if counts[0] != counts[1] and min(counts) >= 2:
                return length, n
    raise AssertionError("no length cap gives uneven validation counts on this storage")


@pytest.fixture(scope="module")
def storage(tmp_path_factory, small_tokenizer) -> Path:
    return make_tiny_storage(tmp_path_factory.mktemp("dist_storage"), small_tokenizer)


@pytest.fixture(scope="module")
def uneven(storage) -> list[str]:
    length, n = uneven_validation(storage)
    return [f"data.max_length={length}", f"data.sampling.val_n_samples={n}"]


# Helpers first: rho1 needs ref_tuning, verifiable needs critic.
MATRIX = {
    "ref_tuning": ("ref_tuning", ["train.fsdp_param_dtype=bfloat16"]),
    "critic": ("critic", ["train.fsdp_param_dtype=bfloat16"]),
    "baseline": ("baseline", ["train.fsdp_param_dtype=bfloat16"]),
    "baseline-fp32": ("baseline", ["train.fsdp_param_dtype=float32"]),
    "ntp": ("ntp", ["train.fsdp_param_dtype=bfloat16"]),
    "rho1": ("rho1", ["train.fsdp_param_dtype=bfloat16"]),
    "rho1-precompute": ("rho1", ["weighting.rho1.precompute=true"]),
    "verifiable": ("verifiable", ["train.fsdp_param_dtype=bfloat16"]),
    "verifiable-precompute": ("verifiable", ["weighting.verifiable.precompute=true"]),
}


@pytest.fixture(scope="module")
def matrix(storage, uneven) -> dict[str, subprocess.CompletedProcess]:
    runs = {}
    for name, (recipe, extra) in MATRIX.items():
        runs[name] = launch(torchrun(*wmtp_train(recipe, storage, *uneven, f"run_name={name}",
                                                 *extra)))  # fmt: skip
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_recipe_trains_on_two_ranks(matrix, storage, name):
    recipe, extra = MATRIX[name]
    result = matrix[name]
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = storage / f"checkpoints/{recipe}/{name}"
    assert checkpoint.finished(run_dir)
    local = load_config(REPO / f"configs/local/{recipe}.yaml")
    assert load_config(run_dir / "config.yaml").train.grad_accum == local.train.grad_accum
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m and "step" in m and "lr" in m]
    # 3 steps, or fewer where the length cap leaves less than 3 steps of data (the critic)
    assert [m["step"] for m in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in steps)
    assert any(k.startswith("val/") for m in metrics for k in m), "no validation metrics"
    # Uneven per-rank validation counts: both ranks keep the smaller one and say so.
    assert "validates" in result.stdout
    setting = next((e.split("=")[1] for e in extra if "fsdp_param_dtype" in e), "auto")
    dtype = {"auto": "their own dtype"}.get(setting, setting)  # auto on a CPU: no cast
    assert f"FSDP2 on 2 ranks: parameters gathered in {dtype}" in result.stdout
    if recipe == "critic":  # the diagnostics cover both ranks' validation pairs
        report = json.loads((run_dir / "critic_diagnostics.json").read_text())
        assert report["pairs"] >= 2 and report["pairs"] % 2 == 0


@pytest.mark.slow
def test_bf16_fsdp_differs_from_fp32_but_agrees_to_bf16_precision(matrix, storage):
    """The bf16 run really computed in bf16 (its losses are not the fp32 ones bit for bit)
    and its numbers are close to the fp32 run's (the RoPE table stayed fp32)."""
    losses = {}
    for name in ("baseline", "baseline-fp32"):
        assert matrix[name].returncode == 0, matrix[name].stderr[-3000:]
        metrics = read_metrics(storage / f"checkpoints/baseline/{name}/metrics.jsonl")
        losses[name] = [m["loss"] for m in metrics if "lr" in m]
    assert losses["baseline"] != losses["baseline-fp32"]
    assert losses["baseline"] == pytest.approx(losses["baseline-fp32"], rel=0.02)


@pytest.mark.slow
def test_sigkill_and_resume_on_two_ranks_is_bitwise_exact(storage):
    common = ["train.max_steps=6", "train.epochs=10", "lora.dropout=0.1",
              "data.sampling.val_n_samples=4"]  # fmt: skip
    full = launch(torchrun(*wmtp_train("baseline", storage, *common, "run_name=full2")))
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = storage / "checkpoints/baseline/killed2"
    cmd = torchrun(*wmtp_train("baseline", storage, *common, "run_name=killed2"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            cwd=REPO, start_new_session=True)  # fmt: skip
    deadline = time.time() + TIMEOUT_S
    try:
        while not (run_dir / "step_00000004").is_dir():
            assert proc.poll() is None, "the run ended before its second checkpoint"
            assert time.time() < deadline, "no second checkpoint in time"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # torchrun and both ranks at once
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "final").exists()
    resumed = launch(torchrun(*wmtp_train("baseline", storage, *common, "run_name=killed2",
                                          "checkpoint.resume=true")))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a = checkpoint.load_tensors(storage / "checkpoints/baseline/full2/final")
    b = checkpoint.load_tensors(run_dir / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the last line of each step (steps the killed run logged after its checkpoint come again)
    losses = [{m["step"]: m["loss"] for m in read_metrics(d / "metrics.jsonl") if "lr" in m}
              for d in (storage / "checkpoints/baseline/full2", run_dir)]  # fmt: skip
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4, 5, 6]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_two_local_ranks(storage):
    """Two torchrun agents (one process each) meeting through a c10d rendezvous, as two
    nodes do, train the same model as one agent with two processes."""
    overrides = ["data.sampling.val_n_samples=4", "lora.dropout=0.0"]
    local = launch(torchrun(*wmtp_train("baseline", storage, *overrides, "run_name=onenode")))
    assert local.returncode == 0, local.stderr[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
               "--rdzv_id=wmtp-test", *wmtp_train("baseline", storage, *overrides,
                                                  "run_name=twonodes")]  # fmt: skip
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=ENV, cwd=REPO, start_new_session=True))  # fmt: skip
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, (_, err) in zip(nodes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    a = checkpoint.load_tensors(storage / "checkpoints/baseline/onenode/final")
    b = checkpoint.load_tensors(storage / "checkpoints/baseline/twonodes/final")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_a_hung_rank_fails_the_others_with_rank_and_step_named(storage):
    """Rank 1 stops (SIGSTOP) after step 1: rank 0's next collective times out after
    ``train.dist_timeout_s`` and the run fails with rank 0 and its optimizer step named,
    instead of hanging."""
    cmd = torchrun(*wmtp_train("baseline", storage, "run_name=hang", "train.max_steps=8",
                               "train.dist_timeout_s=15", "data.sampling.val_n_samples=0"))  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=REPO, start_new_session=True)  # fmt: skip
    metrics = storage / "checkpoints/baseline/hang/metrics.jsonl"
    try:
        deadline = time.time() + TIMEOUT_S
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, "no first step"
            time.sleep(0.05)
        rank1 = rank_pid(proc.pid, 1)
        os.kill(rank1, signal.SIGSTOP)
        started = time.time()
        _, err = proc.communicate(timeout=TIMEOUT_S)
        waited = time.time() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode != 0
    assert "rank 0 of 2, optimizer step" in err, err[-3000:]
    assert waited < 300


def rank_pid(agent: int, rank: int) -> int:
    """The pid of ``rank`` among the workers torchrun (``agent``) started."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[1]) == agent and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under torchrun {agent}")


@pytest.mark.parametrize("micro", [2, 4])
def test_fsdp2_two_ranks_match_one_process(storage, tmp_path, micro):
    """2 ranks with MICRO/2 micro-batches each against one process with MICRO: the same
    losses, weighting statistics and global gradient norm, and the same trained tensors; each
    rank draws its own dropout masks."""
    worker = REPO / "tests/integration/fsdp_worker.py"
    config = str(REPO / "configs/local/baseline.yaml")
    args = [str(worker), str(storage), str(tmp_path), config, str(micro)]
    single = launch([sys.executable, *args])
    assert single.returncode == 0, single.stderr[-3000:]
    multi = launch(torchrun(*args))
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "world1/losses.json").read_text())
    two = json.loads((tmp_path / "world2/losses.json").read_text())
    assert len(one) == 3 and one == pytest.approx(two, abs=1e-5)
    # Weighting statistics and the gradient norm are global: they do not depend on the split.
    one = json.loads((tmp_path / "world1/metrics.json").read_text())
    two = json.loads((tmp_path / "world2/metrics.json").read_text())
    assert [sorted(m) for m in one] == [sorted(m) for m in two]
    assert {
        "verifiable/weight_mean",
        "verifiable/weight_entropy_norm",
        "verifiable/ema_std",
        "grad_norm",
    } <= set(one[0])
    assert "rho1/selected_fraction" in one[-1]
    for a, b in zip(one, two, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    a = checkpoint.load_tensors(tmp_path / "world1/final")
    b = checkpoint.load_tensors(tmp_path / "world2/final")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    draws = [json.loads((tmp_path / f"world2/dropout_{r}.json").read_text()) for r in (0, 1)]
    assert draws[0] != draws[1]
    # the FSDP checkpoint loads into a plain single-process model
    layout = StorageLayout(storage)
    trainer = Trainer(load_config(config, ["log.mlflow=false", "run_name=fsdp-load"]), layout)
    checkpoint.load_into(trainer.model, tmp_path / "world2/final")
    loaded = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(torch.allclose(loaded[k], b[k]) for k in b)


@pytest.mark.slow
def test_resume_on_another_world_size_keeps_the_planned_schedule(storage):
    """A 2-rank run resumed by one process from its step-2 checkpoint: the same settings, so
    the same planned length and LR schedule (one process would plan twice the steps: its
    share of an epoch is twice a rank's), the same LR at every step."""
    settings = ["train.max_steps=1000", "train.epochs=1", "checkpoint.every=2",
                "checkpoint.keep_last=5", "data.sampling.val_n_samples=0", "lora.dropout=0.0"]  # fmt: skip
    two = launch(torchrun(*wmtp_train("baseline", storage, *settings, "run_name=world2")))
    assert two.returncode == 0, two.stderr[-3000:]
    source = storage / "checkpoints/baseline/world2"
    planned = {m["step"]: m["lr"] for m in read_metrics(source / "metrics.jsonl") if "lr" in m}
    assert len(planned) >= 4
    target = storage / "checkpoints/baseline/world1"
    target.mkdir()
    for name in ("config.yaml", "step_00000002"):
        shutil.copytree(source / name, target / name) if (source / name).is_dir() else (
            shutil.copy(source / name, target / name))  # fmt: skip
    one = launch([sys.executable, *wmtp_train("baseline", storage, *settings, "run_name=world1",
                                              "checkpoint.resume=true")])  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"keeps the planned {len(planned)} steps" in one.stdout
    assert "saved on 2 rank(s), resumed on 1" in one.stdout
    resumed = {m["step"]: m["lr"] for m in read_metrics(target / "metrics.jsonl") if "lr" in m}
    assert sorted(resumed) == list(range(3, len(planned) + 1))
    assert all(resumed[s] == pytest.approx(planned[s], rel=1e-9) for s in resumed)


@pytest.mark.slow
def test_a_setup_error_on_two_ranks_is_one_line_without_an_abort(storage):
    """An error before training (no example survives the length cap) ends each rank with its
    message and exit code 1: no rank aborts in the process group's teardown."""
    result = launch(torchrun(*wmtp_train("baseline", storage, "run_name=setup-error",
                                         "data.max_length=8")))  # fmt: skip
    assert result.returncode != 0
    assert "wmtp: error: no training examples left" in result.stderr
    assert "terminate called" not in result.stderr and "SIGABRT" not in result.stderr
