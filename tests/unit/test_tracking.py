"""Tracking helpers without a server: run records and the training link, the git commit
(absent git must not fail), the UI's prerequisites and port, run ids that resolve or do not."""

from __future__ import annotations

import json
import socket
from importlib import metadata

import pytest

from weighted_mtp.base.errors import UserError
from weighted_mtp.cli import main
from weighted_mtp.train import tracking
from weighted_mtp.train.tracking import (
    RUN_RECORD,
    TAG_RUN_DIR,
    TAG_TRAINING_RUN,
    MetricLogger,
    find_training_record,
    free_port,
    resolve_run_dir,
    training_link,
)


def _record(folder, run_id: str, kind: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"run_id": run_id, "experiment": "baseline", "run_name": "r", "kind": kind}
    (folder / RUN_RECORD).write_text(json.dumps({**record, "tracking_uri": "sqlite:///x"}))


def test_an_evaluation_links_to_the_nearest_training_record_above_it(tmp_path):
    run = tmp_path / "checkpoints/baseline/r"
    _record(run, "a" * 32, "train")
    # An evaluation's own record sits between the samples and the run: it is not the link.
    _record(run / "final/eval/humaneval", "b" * 32, "evaluate")
    samples = run / "final/eval/humaneval/samples.jsonl"
    samples.write_text("")
    folder, record = find_training_record(samples)
    assert folder == run.resolve() and record["run_id"] == "a" * 32
    tags = training_link(run / "final")
    assert tags[TAG_TRAINING_RUN] == "a" * 32 and tags[TAG_RUN_DIR] == str(run.resolve())
    assert training_link(tmp_path / "elsewhere.jsonl") == {}
    assert training_link(None) == {}


def test_no_git_means_no_commit_tag_and_no_failure(monkeypatch):
    tracking.git_commit.cache_clear()
    monkeypatch.setenv("PATH", "")  # no git executable to be found
    try:
        assert tracking.git_commit() is None
        assert tracking.source_tags() == {}
    finally:
        tracking.git_commit.cache_clear()


def test_the_ui_says_in_one_line_how_to_install_itself(monkeypatch, capsys, tmp_path):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    reason = tracking.ui_missing()
    assert reason is not None and "\n" not in reason and ".[ui]" in reason
    assert main(["ui", "--storage", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install" in err


def test_the_ui_needs_an_existing_store(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tracking, "ui_missing", lambda: None)
    assert main(["ui", "--storage", str(tmp_path)]) == 1
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create one


def test_a_taken_port_gives_a_free_one():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = free_port("127.0.0.1", port)
        assert other != port and other > 0


@pytest.mark.slow  # a new sqlite store: MLflow's migrations take seconds
def test_report_by_unknown_run_id_is_one_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(UserError, match="no MLflow store"):
        resolve_run_dir("c" * 32, uri)
    run = tmp_path / "run"
    logger = MetricLogger(run, mlflow_uri=uri, experiment="baseline", run_name="r")
    logger.log({"loss": 1.0}, step=1)
    logger.close()
    record = json.loads((run / RUN_RECORD).read_text())
    assert record["run_id"] == logger.run_id and record["tracking_uri"] == uri
    # A run without the run-folder tag, and a run id the store does not have.
    with pytest.raises(UserError, match="names no run folder"):
        resolve_run_dir(logger.run_id, uri)
    assert main(["report", "d" * 32, "--mlflow-uri", uri, "--out", str(tmp_path / "r")]) == 1
    assert f"no MLflow run {'d' * 32}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resumed_logger_continues_its_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    first = MetricLogger(run, mlflow_uri=uri, experiment="e", run_name="r", params={"a": 1})
    first.log({"loss": 2.0}, step=1)
    first.close()
    again = MetricLogger(run, mlflow_uri=uri, experiment="e", run_name="r", resume=True)
    again.log({"loss": 1.0}, step=2)
    again.close()
    fresh = MetricLogger(run, mlflow_uri=uri, experiment="e", run_name="r")
    fresh.close()
    assert again.run_id == first.run_id != fresh.run_id
    assert json.loads((run / RUN_RECORD).read_text())["run_id"] == fresh.run_id
    MetricLogger(run).close()  # a fresh untracked run drops the stale record
    assert not (run / RUN_RECORD).exists()
    history = tracking.client(uri).get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
