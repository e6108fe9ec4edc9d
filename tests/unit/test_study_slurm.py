"""``wmtp study --executor slurm`` against a stand-in ``sbatch`` and ``squeue`` (shell scripts
on PATH that record submissions and print a queue we write): what is submitted, with which
dependencies, what a rerun does with a job that ended without its outputs. The real cluster's
test is ``tests/integration/test_slurm.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

SBATCH = """#!/bin/bash
n=$(( $(cat "$FAKE/next" 2>/dev/null || echo 100) + 1 ))
echo $n > "$FAKE/next"
echo "$n $*" >> "$FAKE/submitted"
echo "$n|PENDING" >> "$FAKE/queue"
echo "$n"
"""
SQUEUE = """#!/bin/bash
# From the second look on, the job named in $FAKE/vanish has left the queue.
n=$(( $(cat "$FAKE/looks" 2>/dev/null || echo 0) + 1 ))
echo $n > "$FAKE/looks"
if [ $n -gt 1 ] && [ -f "$FAKE/vanish" ]; then
    grep -v "^$(cat "$FAKE/vanish")|" "$FAKE/queue" || true
else
    cat "$FAKE/queue" 2>/dev/null || true
fi
"""


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("squeue", SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE": str(tmp_path),
            "COLUMNS": "200"}  # fmt: skip


def spec_file(tmp_path: Path) -> Path:
    spec = {
        "name": "fk", "configs": str(REPO / "configs/local"), "seeds": [0, 1],
        "budget": {"steps": 2}, "arms": {"baseline": {"recipe": "baseline"},
                                          "rho1": {"recipe": "rho1"}},
    }  # fmt: skip
    path = tmp_path / "fk.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weighted_mtp", "study", str(spec_file(tmp_path)), "--storage",
         str(tmp_path / "storage"), "--no-mlflow", "--executor", "slurm", "--gpus-per-node", "0",
         *extra],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def submissions(tmp_path: Path) -> list[tuple[str, str]]:
    lines = (tmp_path / "submitted").read_text().splitlines()
    return [tuple(line.split(" ", 1)) for line in lines]  # type: ignore[misc]


def test_jobs_wait_for_their_helper_and_training_and_a_rerun_resubmits_failures(tmp_path):
    env = fake_slurm(tmp_path)
    first = study(tmp_path, env)
    assert first.returncode == 0, first.stderr
    jobs = submissions(tmp_path)
    # the tuned reference, then per seed: baseline train + eval, rho1 train + eval
    assert len(jobs) == 9, jobs
    ref_job = jobs[0][0]
    assert jobs[0][1].endswith("study-fk-ref_tuning-seed0/slurm/train.sbatch")
    assert "--dependency" not in jobs[0][1]
    for _, args in jobs[1:]:
        script = Path(args.split()[-1])
        if script.name == "train.sbatch" and "rho1" in str(script):
            assert f"--dependency=afterok:{ref_job} --kill-on-invalid-dep=yes" in args
        elif script.name == "train.sbatch":
            assert "--dependency" not in args
        else:  # each evaluation after its own run's training
            assert script.name == "evaluate.sbatch"
            train = next(j for j, a in jobs if a.endswith(str(script.parent / "train.sbatch")))
            assert f"--dependency=afterok:{train} " in args
            text = script.read_text()
            assert f"--execute evaluate:{script.parent.parent.name}" in text
            assert "--no-mlflow" in text and "#SBATCH --no-requeue" in text
    assert "0 of 5 runs finished, 0 running, 5 queued" in first.stdout
    state = json.loads((tmp_path / "storage/reports/study/fk/slurm/jobs.json").read_text())
    assert state["study-fk-ref_tuning-seed0"] == {"train": ref_job}

    # Nothing changed: the rerun shows the queue and submits nothing.
    (tmp_path / "queue").write_text(
        "".join(f"{j}|{'RUNNING' if j == ref_job else 'PENDING'}\n" for j, _ in jobs)
    )
    second = study(tmp_path, env)
    assert second.returncode == 0, second.stderr
    assert f"ref_tuning seed 0: train running (job {ref_job})" in second.stdout
    assert "submitted" not in second.stdout and len(submissions(tmp_path)) == 9

    # The reference's job ended without a final checkpoint: the rerun names its log and
    # resubmits it; its dependents, no longer in the queue (cancelled), follow it.
    (tmp_path / "queue").write_text("")
    third = study(tmp_path, env)
    assert third.returncode == 0, third.stderr
    log = tmp_path / "storage/checkpoints/ref_tuning/study-fk-ref_tuning-seed0/slurm"
    assert f"train resubmitted as job 110 (job {ref_job} failed, log {log}/{ref_job}.err)" in (
        third.stdout.replace("\n", "")
    ), third.stdout
    new = submissions(tmp_path)[9:]
    assert len(new) == 9
    rho1 = [a for _, a in new if "rho1-seed" in a and a.endswith("train.sbatch")]
    assert len(rho1) == 2 and all("--dependency=afterok:110 " in a for a in rho1)

    # --wait: a job that ends without its outputs stops the wait with one line naming it.
    (tmp_path / "queue").write_text("".join(f"{j}|RUNNING\n" for j, _ in new))
    (tmp_path / "looks").write_text("0")
    (tmp_path / "vanish").write_text("110")
    waited = study(tmp_path, env, "--wait", "--poll-s", "0.1")
    assert waited.returncode == 1
    assert "train job 110 ended without its outputs; log" in waited.stderr, waited.stderr
    assert len(waited.stderr.strip().splitlines()) == 1


def test_allocation_options_need_the_slurm_executor(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "weighted_mtp", "study", str(spec_file(tmp_path)), "--storage",
         str(tmp_path), "--wait"], cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and "go with --executor slurm" in result.stderr
