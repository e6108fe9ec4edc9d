"""A scheduler's notice (SIGTERM, SIGUSR1) stops training after the current optimizer step with
a step checkpoint and exit code 75; the same command with ``checkpoint.resume=auto`` ends
bit-identical to an uninterrupted run (docs/SCALING.md §6). One process and 2 ranks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO
from tests.integration.test_distributed import ENV, TIMEOUT_S, launch, torchrun
from weighted_mtp.train import checkpoint
from weighted_mtp.train.loop import PREEMPTED_EXIT_CODE
from weighted_mtp.train.tracking import read_metrics

SETTINGS = ["train.max_steps=8", "train.epochs=100", "checkpoint.every=100", "log.mlflow=false",
            "log.every=1", "data.sampling.val_n_samples=0", "lora.dropout=0.1"]  # fmt: skip


def train_args(storage, run: str, *extra: str) -> list[str]:
    return ["-m", "weighted_mtp", "train", str(REPO / "configs/local/baseline.yaml"), "--storage",
            str(storage), *SETTINGS, f"run_name={run}", *extra]  # fmt: skip


def stop_after_step(cmd: list[str], metrics, step: int, signum: int) -> subprocess.Popen:
    """Start ``cmd``, send ``signum`` to it once ``step`` is logged, wait for it to end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=REPO, start_new_session=True)  # fmt: skip
    deadline = time.time() + TIMEOUT_S
    try:
        while not (metrics.is_file() and f'"step": {step},' in metrics.read_text()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the run did not reach the step in time"
            time.sleep(0.05)
        proc.send_signal(signum)
        proc.out, proc.err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ranks", "signum"),
    [(1, signal.SIGUSR1), pytest.param(2, signal.SIGTERM, marks=pytest.mark.distributed)],
)
def test_stop_on_a_signal_then_resume_auto_is_bitwise_exact(tiny_storage, ranks, signum):
    name = f"preempt{ranks}"
    base = tiny_storage / "checkpoints/baseline"

    def command(run: str, *extra: str) -> list[str]:
        args = train_args(tiny_storage, run, *extra)
        return torchrun(*args, nproc=2) if ranks == 2 else [sys.executable, *args]

    full = launch(command(f"{name}-full"))
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = stop_after_step(command(name, "checkpoint.resume=auto"),
                              base / name / "metrics.jsonl", 2, signum)  # fmt: skip
    if ranks == 1:  # torchrun's agent ends with its own code after forwarding the signal
        assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.err[-3000:]
    assert "wmtp: stopped by SIG" in stopped.err and "checkpoint.resume=auto" in stopped.err
    saved = checkpoint.latest(base / name)
    assert saved is not None and not (base / name / "final").exists()
    step = int(saved.name.removeprefix("step_"))
    assert 2 <= step < 8
    resumed = launch(command(name, "checkpoint.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout
    a = checkpoint.load_tensors(base / f"{name}-full/final")
    b = checkpoint.load_tensors(base / name / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [{m["step"]: m["loss"] for m in read_metrics(base / run / "metrics.jsonl")
               if "lr" in m} for run in (f"{name}-full", name)]  # fmt: skip
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_resume_auto_without_a_checkpoint_starts_fresh(tiny_storage):
    """``auto`` on a run folder with no checkpoint (and on no run name) trains from step 0."""
    result = launch([sys.executable, *train_args(tiny_storage, "fresh-auto",
                                                 "checkpoint.resume=auto", "train.max_steps=2")])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" not in result.stdout
    assert checkpoint.finished(tiny_storage / "checkpoints/baseline/fresh-auto")
