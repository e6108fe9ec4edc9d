"""Placement metrics in a real run (docs/METHOD.md §6, "Where the weight goes"): a tiny verifiable and a tiny rho1 run
on the known-answer synthetic source log ``val/placement/*``; data without spans builds no
placement set."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, make_tiny_storage
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import load_config
from weighted_mtp.data.dataset import build_span_examples, split_files
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.storage import synthetic
from weighted_mtp.train.loop import train
from weighted_mtp.train.tracking import read_metrics

FAST = [
    "train.max_steps=2",
    "log.mlflow=false",
    "data.max_length=1024",
    "checkpoint.every=10",
    "log.val_every=2",
    "data.sampling.n_samples=8",
    "data.sampling.val_n_samples=2",
    "log.token_weights=0",
    "log.placement_examples=12",
]


def run(layout: StorageLayout, name: str, *extra: str):
    config = load_config(REPO / f"configs/local/{name}.yaml", [*FAST, f"run_name={name}", *extra])
    return train(config, layout)


@pytest.fixture(scope="module")
def synthetic_storage(tmp_path_factory, small_tokenizer) -> StorageLayout:
    source = tmp_path_factory.mktemp("synthetic_source")
    synthetic.run(source, seed=5, problems={"train": 10, "valid": 10, "test": 10})
    root = make_tiny_storage(tmp_path_factory.mktemp("spans"), small_tokenizer, source=source)
    return StorageLayout(root)


def placement(final) -> dict[str, float]:
    records = [m for m in read_metrics(final.parent / "metrics.jsonl") if "val/ce" in m]
    assert records, "no validation was logged"
    return {k[len("val/placement/"):]: v for k, v in records[-1].items()
            if k.startswith("val/placement/")}  # fmt: skip


def check_rate(m: dict[str, float], name: str) -> None:
    assert m[f"{name}_lo"] <= m[name] + 1e-9 and m[name] <= m[f"{name}_hi"] + 1e-9, name
    assert m[f"{name}_lo"] >= 0.0 and m[f"{name}_hi"] <= 1.0, name


@pytest.mark.slow
def test_verifiable_and_rho1_runs_log_placement_on_spans(synthetic_storage):
    layout = synthetic_storage
    run(layout, "critic")
    verifiable = placement(run(layout, "verifiable", "log.mlflow=true"))
    assert verifiable["n"] == 12
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=layout.mlflow_uri())
    (logged,) = client.search_runs([client.get_experiment_by_name("verifiable").experiment_id])
    assert logged.data.metrics["val/placement/adv_abs/hit"] == verifiable["adv_abs/hit"]
    assert logged.data.metrics["val/placement/n"] == 12
    for ranking in ("adv_abs", "adv_min", "delta_min"):
        for key in ("hit", "hit_shuffled", "hit_length"):
            check_rate(verifiable, f"{ranking}/{key}")
    # The control's value is an exact expectation: the mean share of span tokens.
    assert verifiable["adv_abs/hit_shuffled"] == pytest.approx(verifiable["token_frac_in"])
    for key in ("mass_in", "mass_in_shuffled", "mass_in_length"):
        check_rate(verifiable, f"weight/{key}")
    assert verifiable["weight/ratio"] > 0 and verifiable["weight/ratio_shuffled"] > 0

    run(layout, "ref_tuning")
    rho1 = placement(run(layout, "rho1"))
    assert rho1["n"] == 12 and set(rho1) >= {"excess/hit", "excess/gain_shuffled_lo"}
    assert not any(k.startswith("adv_") for k in rho1)
    check_rate(rho1, "excess/hit")
    check_rate(rho1, "weight/mass_in")


def test_no_spans_no_placement_set(tiny_storage, small_tokenizer):
    """The bundled CodeContests sample has no mutation column: no placement set is built
    (only the first incorrect line is read), so its runs log no ``val/placement`` keys."""
    layout = StorageLayout(tiny_storage)
    config = load_config(REPO / "configs/local/rho1.yaml")
    files = split_files(layout, config.data, config.data.val_split)
    assert build_span_examples(files, Tokenizer(small_tokenizer), 1024, 200) is None
