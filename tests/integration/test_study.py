"""``wmtp study`` end to end on a tiny storage, evaluated on two datasets (one greedy, one with
two samples per problem): killed mid-run, resumed, then skipped entirely."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, make_tiny_storage
from weighted_mtp.base.layout import StorageLayout


def _storage(tmp_path, tokenizer):
    from weighted_mtp.storage import datasets

    root = make_tiny_storage(tmp_path / "storage", tokenizer)
    datasets.run(StorageLayout(root), names=["codecontests", "humaneval"], steps=["eval", "tests"],
                 source=None, include_python2=False, skip_bad_records=False, max_length=2048,
                 force=False)  # fmt: skip
    return root


def _spec(tmp_path):
    spec = {
        "name": "it",
        "configs": str(REPO / "configs/local"),
        "seeds": [0],
        "budget": {"steps": 4},
        "evaluation": {
            "datasets": {
                "codecontests": {"max_new_tokens": 8},
                "humaneval": {"samples": 2, "temperature": 0.8, "max_new_tokens": 8},
            },
            "max_tasks": 2,
        },
        "arms": {"baseline": {"recipe": "baseline"}, "ntp": {"recipe": "ntp"}},
        "overrides": ["data.max_length=1024", "checkpoint.every=1", "log.val_every=4",
                      "data.sampling.val_n_samples=4"],
    }  # fmt: skip
    path = tmp_path / "it.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _command(spec, storage):
    return [sys.executable, "-m", "weighted_mtp", "study", str(spec), "--storage", str(storage),
            "--no-mlflow"]  # fmt: skip


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


@pytest.mark.slow
def test_study_is_killed_resumes_where_it_stopped_then_skips_everything(tmp_path, small_tokenizer):
    storage = _storage(tmp_path, small_tokenizer)
    spec = _spec(tmp_path)
    ntp_run = storage / "checkpoints/ntp/study-it-ntp-seed0"
    # First invocation: killed once the second arm has a step checkpoint, before it finishes.
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - the child writes while we poll
    child = subprocess.Popen(_command(spec, storage), cwd=REPO, env=ENV, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (ntp_run / "step_00000001").is_dir():
        assert child.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    log.close()
    assert not (ntp_run / "final").exists(), "the arm finished before it could be killed"
    baseline_eval = storage / "checkpoints/baseline/study-it-baseline-seed0/final/eval"
    assert (baseline_eval / "codecontests/results.jsonl").is_file()
    assert (baseline_eval / "humaneval/results.jsonl").is_file()

    second = subprocess.run(_command(spec, storage), cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "baseline seed 0 (done already, skipped)" in out
    assert "ntp seed 0: resume" in out and "resumed from" in out
    summary = json.loads((storage / "reports/study/it/study.json").read_text())
    assert summary["problems"] == 4 and summary["missing"] == []  # 2 per dataset
    assert set(summary["arms"]) == {"baseline", "ntp"}
    assert all(r["steps"] == 4 for r in summary["runs"])
    assert summary["same_steps"] and summary["same_training_examples"]
    assert summary["runs"][0]["train_manifest_sha256"]
    greedy, sampled = summary["datasets"]["codecontests"], summary["datasets"]["humaneval"]
    assert greedy["problems"] == sampled["problems"] == 2
    assert greedy["samples"] == 1 and sampled["samples"] == 2
    ran = json.loads((baseline_eval / "humaneval/summary.json").read_text())["settings"]
    assert (ran["num_samples"], ran["temperature"], ran["top_p"]) == (2, 0.8, 0.95)
    rows = (baseline_eval / "humaneval/results.jsonl").read_text().splitlines()
    assert len(rows) == 4  # 2 problems x 2 samples
    for row in sampled["arms"].values():
        assert list(row["pass_at_k"]) == ["pass@1"] and 0 <= row["pass_at_1"] <= 1
    first, second = summary["comparisons"]
    assert (first["dataset"], second["dataset"]) == ("codecontests", "humaneval")
    assert first["test"] == "McNemar (exact)" and second["test"].startswith("sign-flip")
    assert summary["holm_family"] == 2
    for comparison in (first, second):
        assert comparison["verdict"] in ("better", "worse", "not distinguishable")
    page = (storage / "reports/study/it/index.html").read_text()
    assert "ntp" in page and first["verdict"] in page and "Arms on humaneval" in page

    started = time.perf_counter()
    third = subprocess.run(_command(spec, storage), cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("(done already, skipped)") == 2
    assert ": resume" not in third.stdout and not re.search(r"pass@1 \d", third.stdout)
    assert "study it on humaneval: 2 samples per problem" in third.stdout
    assert time.perf_counter() - started < 60
