"""The positive-control study (docs/EVALUATION.md §9) end to end, shrunk onto a tiny storage of
the known-answer source: every arm of ``configs/study/positive_control.yaml`` trains on the
mixed data and is evaluated, the oracle arms train with exactly the weights their rows call
for (docs/METHOD.md §6), and every arm and contrast appears in the report. A tiny model and two
steps cannot show the oracle's effect: this checks the mechanics, not the p-value."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, make_tiny_storage
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import load_config
from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.data.dataset import BatchStream, build_examples, split_files
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.storage import synthetic
from weighted_mtp.train.tracking import read_metrics
from weighted_mtp.train.weighting import drop_weights, span_weights

SPEC = REPO / "configs/study/positive_control.yaml"
SHRINK = [
    "seeds=[0]",
    "budget.steps=2",
    "evaluation.max_tasks=3",
    "evaluation.datasets.codecontests.max_new_tokens=8",
    # every run, helpers included: tiny sizes (the arms' steps come from the budget)
    "overrides=[data.max_length=1024, data.sampling.n_samples=8, data.sampling.val_n_samples=4,"
    " train.max_steps=2, checkpoint.every=2, log.val_every=2, log.placement_examples=4]",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def storage(tmp_path_factory, small_tokenizer) -> StorageLayout:
    source = tmp_path_factory.mktemp("synthetic_source")
    synthetic.run(source, seed=5, problems={"train": 10, "valid": 10, "test": 10})
    root = make_tiny_storage(tmp_path_factory.mktemp("positive"), small_tokenizer, source=source,
                             evaluation=True)  # fmt: skip
    return StorageLayout(root)


def expected_zeroed(run_dir, tokenizer, weights) -> float:
    """The zeroed share of step 1's head-1 targets, rebuilt from the run's own config: the same
    sampled rows, the same first batches, the oracle's weights computed here."""
    config = load_config(run_dir / "config.yaml")
    data = config.data
    files = split_files(StorageLayout(run_dir.parents[2]), data, data.train_split)
    examples = build_examples(files, data.sampling, tokenizer, data.max_length,
                              data.sampling.n_samples)  # fmt: skip
    stream = BatchStream(examples, config.train.batch_size, config.train.seed, tokenizer.pad_id)
    zeroed = scored = 0
    for chosen in stream.plan(0)[: config.train.grad_accum]:
        batch = stream.collate(chosen)
        mask = batch.labels != IGNORE_INDEX
        zeroed += int((weights(batch)[mask] == 0).sum())
        scored += int(mask.sum())
    return zeroed / scored


@pytest.mark.slow
def test_the_positive_control_runs_every_arm_with_the_oracles_weights(storage, small_tokenizer):
    command = [sys.executable, "-m", "weighted_mtp", "study", str(SPEC), *SHRINK,
               "--storage", str(storage.root), "--no-mlflow"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=1500)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]

    summary = json.loads((storage.reports_dir / "study/positive_control/study.json").read_text())
    arms = {"baseline", "oracle_span", "oracle_span_shuffled", "oracle_drop", "verifiable",
            "verifiable_shuffled", "rho1", "rho1_shuffled"}  # fmt: skip
    assert set(summary["arms"]) == arms and summary["missing"] == []
    assert summary["problems"] == 3 and summary["cluster"] == "problem"
    assert summary["same_steps"] and summary["same_training_examples"]
    contrasts = {(c["arm"], c["baseline"]) for c in summary["comparisons"]}
    assert ("oracle_span", "baseline") in contrasts and ("oracle_drop", "baseline") in contrasts
    assert ("verifiable", "verifiable_shuffled") in contrasts
    assert ("rho1", "rho1_shuffled") in contrasts
    page = (storage.reports_dir / "study/positive_control/index.html").read_text()
    for arm in arms:
        assert arm in page

    # Every arm trained on the same mixed rows: the manifest says how many are incorrect.
    runs = {r["arm"]: storage.root / r["run_dir"] for r in summary["runs"]}
    manifest = json.loads((runs["baseline"] / "manifest_train.json").read_text())
    assert manifest["mode"] == "mixed" and 0 < manifest["incorrect"] < len(manifest["line_indices"])
    assert manifest["incorrect_with_span"] == manifest["incorrect"]

    tokenizer = Tokenizer(small_tokenizer)
    zeroed = {}
    for arm in ("oracle_span", "oracle_span_shuffled", "oracle_drop"):
        first = next(m for m in read_metrics(runs[arm] / "metrics.jsonl") if m["step"] == 1)
        zeroed[arm] = first["oracle/zeroed_fraction"]
    span = expected_zeroed(runs["oracle_span"], tokenizer, span_weights)
    drop = expected_zeroed(runs["oracle_drop"], tokenizer, drop_weights)
    assert zeroed["oracle_span"] == pytest.approx(span, abs=1e-9)
    assert zeroed["oracle_drop"] == pytest.approx(drop, abs=1e-9)
    # Shuffling moves the span's zeros within their rows: as many zeros, elsewhere.
    assert zeroed["oracle_span_shuffled"] == pytest.approx(span, abs=1e-9)
    assert 0 < span < drop  # a step with incorrect rows: the span is a part of its row
    config = load_config(runs["oracle_span_shuffled"] / "config.yaml")
    assert config.weighting.name == "oracle_span" and config.weighting.control == "shuffled"
