"""The quickstart's stage runner: skip what is done, refuse generated code without a sandbox."""

from __future__ import annotations

import pytest

from weighted_mtp.base.io import StorageError
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.evaluation import sandbox
from weighted_mtp.quickstart import Quickstart, Stage


def _runner(tmp_path, monkeypatch, stages, unsafe=False):
    quick = Quickstart(StorageLayout(tmp_path), configs=tmp_path, unsafe=unsafe)
    monkeypatch.setattr(quick, "stages", lambda: stages)
    return quick


def _stage(name, log, done=False, code=False):
    state = {"done": done}

    def run():
        log.append(name)
        state["done"] = True

    return Stage(name, name, lambda: state["done"], run, runs_generated_code=code)


def _refuse(unsafe=False):
    if not unsafe:
        raise sandbox.IsolationError("sandbox isolation below the minimum (missing: uid switch)")
    return {"summary": "sandbox isolation: below-minimum (unsafe)"}


def test_done_stages_are_skipped_and_unsafe_sandbox_skips_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "require_isolation", _refuse)
    log: list[str] = []
    stages = [_stage("a", log, done=True), _stage("b", log), _stage("eval", log, code=True)]
    results = _runner(tmp_path, monkeypatch, stages).run()
    assert log == ["b"]
    assert [(r.name, r.skipped) for r in results] == [("a", True), ("b", False), ("eval", True)]


def test_unsafe_runs_evaluation_anyway(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "require_isolation", _refuse)
    log: list[str] = []
    results = _runner(tmp_path, monkeypatch, [_stage("eval", log, code=True)], unsafe=True).run()
    assert log == ["eval"] and not results[0].skipped


def test_a_stage_that_leaves_no_outputs_fails_loudly(tmp_path, monkeypatch):
    broken = Stage("broken", "broken", lambda: False, lambda: None)
    with pytest.raises(StorageError, match="'broken' ran but its outputs"):
        _runner(tmp_path, monkeypatch, [broken]).run()


def test_a_run_trained_with_other_settings_stops_the_quickstart(tmp_path):
    """A run folder left by another version of the quickstart is never resumed or reused."""
    import yaml

    from tests.conftest import REPO
    from weighted_mtp.base.errors import UserError
    from weighted_mtp.config import config_to_dict

    quick = Quickstart(StorageLayout(tmp_path), configs=REPO / "configs/quickstart")
    run_dir = quick.run_dir("baseline")
    run_dir.mkdir(parents=True)
    planned = config_to_dict(quick._planned("baseline"))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(planned))
    assert quick._trained("baseline")() is False  # same settings, not finished: train (resume)
    planned["data"]["small"] = not planned["data"]["small"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(planned))
    with pytest.raises(UserError, match=r"quickstart: trained with other settings .*data\.small"):
        quick._trained("baseline")()
