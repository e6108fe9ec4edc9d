"""`wmtp evaluate` at scale (docs/EVALUATION.md §8): device and dtype defaults, and how the
ranks of a torchrun hand their samples to rank 0 (shard files, a wait, one line if one never
comes)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.conftest import REPO
from weighted_mtp import cli
from weighted_mtp.base.errors import UserError
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import load_config
from weighted_mtp.evaluation import harness
from weighted_mtp.evaluation.harness import (
    SHARDS,
    collect_shards,
    evaluate,
    generate_completions,
    load_for_evaluation,
    merge_decoding_stats,
    merge_shards,
    write_shard,
)
from weighted_mtp.models.checkpoints import load_pretrained
from weighted_mtp.train.checkpoint import load_tensors, load_trained
from weighted_mtp.train.loop import train

HERE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = ["def add(a, b):\n", "import os\n", "class A:\n"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
# Run under torchrun: rank 1 is slowed down (``slow``) or never leaves its shard (``lost``).
LAUNCHER = """
import os, sys, time
from weighted_mtp import cli
from weighted_mtp.evaluation import harness

if os.environ["RANK"] == "1":
    if sys.argv[1] == "slow":
        original = harness.generate_completions
        def generate_completions(*args, **kwargs):
            time.sleep(4)
            return original(*args, **kwargs)
        harness.generate_completions = generate_completions
    else:
        harness.write_shard = lambda *args, **kwargs: None
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def policy(tiny_storage):
    """A LoRA policy checkpoint: the baseline recipe, 2 steps."""
    layout = StorageLayout(tiny_storage)
    config = load_config(
        REPO / "configs/local/baseline.yaml",
        ["train.max_steps=2", "log.mlflow=false", "data.max_length=1024", "checkpoint.every=2",
         "log.val_every=2", "data.sampling.val_n_samples=4", "run_name=evaluate-scale"],
    )  # fmt: skip
    return layout, train(config, layout)


def _header(**changes):
    header = {"run": "this", "world": 2, "task_ids": ["a", "b", "c"], "num_samples": 3}
    return {**header, **changes}


# ---- the shard files ----


@pytest.mark.parametrize("speculative", [False, True])
def test_merged_shards_are_what_one_process_generates(policy, tmp_path, speculative):
    layout, final = policy
    model, tokenizer, _ = load_for_evaluation(layout, str(final), "cpu")
    common = {"num_samples": 3, "max_new_tokens": 6, "temperature": 0.8, "top_p": 0.95,
              "seed": 1, "speculative": speculative, "batch_size": 2}  # fmt: skip
    one, one_stats = generate_completions(model, tokenizer, PROMPTS, ["\n\n"], **common)
    header = _header()
    for rank in (1, 0):
        texts, stats = generate_completions(
            model, tokenizer, PROMPTS, ["\n\n"], rank=rank, world=2, **common
        )
        assert texts and set(texts) < set(one)  # each rank its own share
        write_shard(tmp_path, rank, header, texts, stats, seconds=1.0 + rank)
    texts, stats, seconds = merge_shards(collect_shards(tmp_path, header, wait_s=5))
    assert texts == one and seconds == 2.0  # the slowest rank's time
    assert stats == merge_decoding_stats([one_stats])


def test_a_shard_keeps_any_text(tmp_path):
    texts = {(0, 0): "naïve \udcff\x00 ✓", (1, 0): ""}
    write_shard(tmp_path, 0, _header(world=1), texts, {"tokens": 3}, 0.5)
    assert [p.name for p in tmp_path.iterdir()] == ["rank-00000-of-00001.json"]
    assert merge_shards(collect_shards(tmp_path, _header(world=1), wait_s=1))[0] == texts


def test_a_missing_rank_is_one_line_naming_it_within_the_wait(tmp_path):
    header = _header(world=3)
    for rank in (0, 2):
        write_shard(tmp_path, rank, header, {(rank, 0): "x"}, {"tokens": 1}, 1.0)
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        collect_shards(tmp_path, header, wait_s=0.5, poll_s=0.1)
    assert 0.5 <= time.monotonic() - started < 2.0
    message = str(err.value)
    assert "\n" not in message and message.startswith("rank 1 of 3 gave no samples within 0.5 s")
    assert str(tmp_path) in message and "--shard-wait-s" in message


def test_shards_of_another_run_are_not_merged(tmp_path):
    stale = {(0, 0): "stale", (1, 0): "stale"}
    write_shard(tmp_path, 0, _header(run="earlier"), stale, {"tokens": 9}, 1.0)
    write_shard(tmp_path, 1, _header(num_samples=2), stale, {"tokens": 9}, 1.0)  # other settings
    with pytest.raises(UserError, match=r"^ranks 0, 1 of 2 gave no samples") as err:
        collect_shards(tmp_path, _header(), wait_s=0.3, poll_s=0.1)
    assert "(rank 0, 1's file there is another run's)" in str(err.value)
    # the rank's own shard replaces the stale one while rank 0 waits: that one is merged
    write_shard(tmp_path, 0, _header(), {(0, 0): "fresh"}, {"tokens": 1}, 1.0)
    late = threading.Timer(
        0.3, write_shard, (tmp_path, 1, _header(), {(1, 0): "fresh"}, {"tokens": 1}, 1.0)
    )
    late.start()
    try:
        texts, stats, _ = merge_shards(collect_shards(tmp_path, _header(), wait_s=10, poll_s=0.1))
    finally:
        late.join()
    assert texts == {(0, 0): "fresh", (1, 0): "fresh"} and stats["tokens"] == 2


# ---- device and dtype ----


def test_device_and_dtype_default_to_auto():
    args = cli.build_parser().parse_args(
        ["evaluate", "--checkpoint", "micro-mtp", "--dataset", "humaneval"]
    )
    assert (args.device, args.dtype, args.shard_wait_s) == ("auto", "auto", None)
    for function in (evaluate, harness.decoding_comparison, load_for_evaluation):
        parameters = inspect.signature(function).parameters
        assert parameters["device"].default == "auto" and parameters["dtype"].default == "auto"
    assert harness.resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert harness.resolve_dtype("auto", torch.device("cuda", 0)) == "bfloat16"


def test_evaluate_resolves_auto_here_and_clears_an_earlier_runs_shards(tiny_storage, tmp_path):
    layout = StorageLayout(tiny_storage)
    stale = tmp_path / SHARDS / "rank-00001-of-00002.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    summary = evaluate(
        layout, "micro-mtp", "humaneval", tmp_path, max_tasks=2, max_new_tokens=4, workers=1
    )
    assert summary is not None
    assert (summary["settings"]["device"], summary["settings"]["dtype"]) == (
        HERE,
        "bfloat16" if HERE == "cuda" else "float32",
    )
    assert {p.name for p in tmp_path.iterdir()} == {
        "samples.jsonl",
        "results.jsonl",
        "summary.json",
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"device": "tpu"}, "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
        ({"device": "cuda:99"}, "--device cuda:99: "),
        ({"dtype": "float16"}, "--dtype 'float16': expected one of auto, float32, bfloat16"),
        ({"shard_wait_s": 0}, "--shard-wait-s must be positive, got 0"),
    ],
)
def test_a_bad_setting_is_one_line(tiny_storage, tmp_path, changes, message):
    layout = StorageLayout(tiny_storage)
    with pytest.raises(UserError) as err:
        evaluate(layout, "micro-mtp", "humaneval", tmp_path, max_tasks=1, **changes)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_float32_on_a_cpu_merges_the_adapter_exactly(policy):
    """``W + (alpha / r) B A`` from the checkpoint's own files, computed here in fp32."""
    layout, final = policy
    model, _, mode = load_for_evaluation(layout, str(final), "cpu")  # dtype auto
    assert mode == "alpaca" and {p.dtype for p in model.parameters()} == {torch.float32}
    want = load_pretrained(layout.model("micro-mtp").root, dtype="float32").state_dict()
    config = json.loads((final / "adapter_config.json").read_text())
    tensors = load_tensors(final)
    for name, a in tensors.items():
        if ".lora_A." in name:
            b = tensors[name.replace("lora_A", "lora_B")]
            weight = name.split(".lora_A.")[0] + ".weight"
            want[weight] = want[weight] + config["lora_alpha"] / config["r"] * (b @ a)
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_bfloat16_loads_bf16_weights_with_the_adapter_merged(policy, tmp_path):
    layout, final = policy
    model, _, _ = load_for_evaluation(layout, str(final), "cpu", "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope.dtype == torch.float32  # positions stay exact
    reference = load_trained(final, layout).state_dict()
    base = load_for_evaluation(layout, "micro-mtp", "cpu", "bfloat16")[0].state_dict()
    merged = 0
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor.float(), reference[name], rtol=1e-2, atol=1e-3), name
        merged += not torch.equal(tensor, base[name])
    assert merged > 0  # the adapter is in the weights
    # bf16 generates and scores end to end, and says so in the summary
    summary = evaluate(layout, str(final), "humaneval", tmp_path, max_tasks=1,
                       max_new_tokens=4, workers=1, device="cpu", dtype="bfloat16")  # fmt: skip
    assert summary is not None and summary["settings"]["dtype"] == "bfloat16"


# ---- under torchrun ----


def _evaluate_cli(tmp_path, out, *extra, launcher=(sys.executable, "-m", "weighted_mtp")):
    args = ["evaluate", "--checkpoint", "micro-mtp", "--dataset", "humaneval", "--max-tasks", "3",
            "--num-samples", "2", "--temperature", "0.8", "--max-new-tokens", "6",
            "--workers", "1", "--no-mlflow", "--out", str(out), *extra]  # fmt: skip
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path
    )


@pytest.mark.distributed
def test_a_slow_rank_and_stale_shards_still_give_what_one_process_writes(tiny_storage, tmp_path):
    storage = ["--storage", str(tiny_storage)]
    result = _evaluate_cli(tmp_path, tmp_path / "one", *storage)
    assert result.returncode == 0, result.stderr[-3000:]
    # an earlier killed run's shards, in the same folder, with other texts
    stale = {(i, j): "def stale(): pass" for i in range(3) for j in range(2)}
    for rank in (0, 1):
        write_shard(tmp_path / "two" / SHARDS, rank, _header(run="killed", world=2), stale,
                    {"tokens": 99}, 1.0)  # fmt: skip
    (tmp_path / "launch.py").write_text(LAUNCHER)
    launch = [*TORCHRUN, str(tmp_path / "launch.py"), "slow"]
    result = _evaluate_cli(tmp_path, tmp_path / "two", *storage, launcher=launch)
    assert result.returncode == 0, result.stderr[-3000:]
    for file in ("samples.jsonl", "results.jsonl"):
        assert (tmp_path / "one" / file).read_text() == (tmp_path / "two" / file).read_text()
    two = json.loads((tmp_path / "two/summary.json").read_text())
    assert two["settings"]["ranks"] == 2 and two["decoding"]["seconds"] >= 4.0
    assert not (tmp_path / "two" / SHARDS).exists()


@pytest.mark.distributed
def test_a_rank_whose_shard_never_comes_is_one_line(tiny_storage, tmp_path):
    (tmp_path / "launch.py").write_text(LAUNCHER)
    launch = [*TORCHRUN, str(tmp_path / "launch.py"), "lost"]
    started = time.monotonic()
    result = _evaluate_cli(tmp_path, tmp_path / "out", "--storage", str(tiny_storage),
                           "--shard-wait-s", "2", launcher=launch)  # fmt: skip
    assert result.returncode != 0 and time.monotonic() - started < 120
    ours = [line for line in result.stderr.splitlines() if line.startswith("wmtp: ")]
    assert ours == [
        f"wmtp: error: rank 1 of 2 gave no samples within 2 s: no shard of this run in "
        f"{tmp_path / 'out' / SHARDS}; a rank writes its shard there when its generation ends "
        "(a folder every node sees; --shard-wait-s for slow ranks)"
    ], result.stderr[-3000:]
    # no traceback of ours: what follows the line is torchrun's own report of a failed rank
    assert "Traceback" not in result.stderr.split("wmtp: error:")[0]
    assert f'File "{REPO / "src"}' not in result.stderr


# ---- the generation batch ----


def test_greedy_tokens_do_not_depend_on_the_batch_and_a_bad_size_is_one_line(policy, tmp_path):
    layout, final = policy
    model, tokenizer, _ = load_for_evaluation(layout, str(final), "cpu")
    common = {"num_samples": 1, "max_new_tokens": 8, "temperature": 0.0, "top_p": 0.95,
              "seed": 0, "speculative": False}  # fmt: skip
    alone = generate_completions(model, tokenizer, PROMPTS, ["\n\n"], batch_size=1, **common)
    together = generate_completions(model, tokenizer, PROMPTS, ["\n\n"], batch_size=3, **common)
    assert alone[0] == together[0] and alone[1]["tokens"] == together[1]["tokens"] > 0
    with pytest.raises(UserError, match=r"^batch size must be >= 1, got 0$"):
        evaluate(layout, str(final), "humaneval", tmp_path / "out", batch_size=0, device="cpu")
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written
