"""The quickstart's stage runner: skip what is done, refuse generated code without a sandbox;
its known-answer results read back from fabricated outputs."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from weighted_mtp.base.io import StorageError
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.evaluation import sandbox
from weighted_mtp.quickstart import Quickstart, Stage, versus


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
    """A run folder left by another version of the quickstart is never resumed or reused; the
    check is the study planner's (configs/study/quickstart.yaml)."""
    import yaml

    from tests.conftest import REPO
    from weighted_mtp.base.errors import UserError
    from weighted_mtp.config import config_to_dict

    quick = Quickstart(StorageLayout(tmp_path), configs=REPO / "configs/quickstart")
    names = [s.name for s in quick.stages()]
    # the storage first: the datasets without token lengths, the micro base (its tokenizer
    # from their text), then their lengths in that tokenizer (docs/DATA.md §7)
    assert names[:4] == ["known-answer", "datasets", "micro-base", "token-lengths"]
    assert names[4:] == [
        "critic",
        "ref_tuning",
        "baseline",
        "verifiable",
        "rho1",
        "eval-baseline",
        "eval-verifiable",
        "eval-rho1",
        "decoding",
        "report",
    ]
    (run,) = [r for r in quick.planned() if r.arm == "baseline"]
    assert run.run_dir == quick.run_dir("baseline")
    trained = next(s for s in quick.stages() if s.name == "baseline").done
    run.run_dir.mkdir(parents=True)
    planned = config_to_dict(quick.study.config_of(run))
    assert planned["train"]["seed"] == 42 and planned["train"]["max_steps"] == 16
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(planned))
    assert trained() is False  # same settings, not finished: train (resume)
    planned["data"]["small"] = not planned["data"]["small"]
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(planned))
    with pytest.raises(UserError, match=r"quickstart: trained with other settings .*data\.small"):
        trained()


def _placement_record(step: int, ranking: str, **triples: tuple[float, float, float]) -> str:
    record = {"step": step, "time": 1e9, "val/placement/n": 198.0}
    for key, (value, low, high) in triples.items():
        record.update({f"val/placement/{ranking}/{key}": value,
                       f"val/placement/{ranking}/{key}_lo": low,
                       f"val/placement/{ranking}/{key}_hi": high})  # fmt: skip
    return json.dumps(record) + "\n"


def _write_placement(quick: Quickstart, experiment: str, ranking: str, hit, gain_length) -> None:
    run = quick.run_dir(experiment)
    run.mkdir(parents=True)
    shuffled, length = (0.021, 0.019, 0.023), (0.131, 0.086, 0.182)
    early = _placement_record(4, ranking, hit=(0.9, 0.8, 1.0), hit_shuffled=shuffled,
                              hit_length=length, gain_shuffled=(0.8, 0.7, 0.9),
                              gain_length=(0.7, 0.6, 0.8))  # fmt: skip
    gain_shuffled = tuple(h - s for h, s in zip(hit, shuffled, strict=True))
    final = _placement_record(16, ranking, hit=hit, hit_shuffled=shuffled, hit_length=length,
                              gain_shuffled=gain_shuffled, gain_length=gain_length)  # fmt: skip
    (run / "metrics.jsonl").write_text(early + json.dumps({"step": 16, "loss": 1.0}) + "\n" + final)


@pytest.mark.parametrize(
    ("td_gain", "met", "verdict"),
    [
        ((-0.045, -0.101, 0.010), False, "below the position-only predictor by the point estimate"),
        ((-0.080, -0.120, -0.010), False, "below the position-only predictor"),
        ((0.050, 0.004, 0.090), True, "above the position-only predictor"),
    ],
)
def test_the_td_hit_rate_is_read_against_the_position_only_predictor(
    tmp_path, td_gain, met, verdict
):
    """The last validation's hit rates (docs/METHOD.md §6): the TD result is met only when the
    paired interval of hit - position-only hit lies above 0; Rho-1's hit is set beside it."""
    console = Console(record=True, width=400, highlight=False)
    quick = Quickstart(StorageLayout(tmp_path), configs=tmp_path, console=console)
    assert "td_decisive_token_hit" not in quick.results()  # no validation logged yet
    hit = tuple(0.131 + td_gain[0] + d for d in (0.0, -0.04, 0.04))
    _write_placement(quick, "verifiable", "adv_abs", hit, td_gain)
    only_td = quick.results()["td_decisive_token_hit"]
    assert "rho1" not in only_td  # no Rho-1 run: no Rho-1 line
    _write_placement(quick, "rho1", "excess", (0.278, 0.217, 0.338), (0.146, 0.071, 0.217))
    result = quick.results()["td_decisive_token_hit"]
    assert result["hit"] == list(hit) and result["solutions"] == 198
    assert result["position_only"] == [0.131, 0.086, 0.182]
    assert result["shuffled"] == [0.021, 0.019, 0.023]
    assert result["minus_position_only"] == list(td_gain)
    assert "position-only" in result["target"] and result["met"] is met
    assert result["met"] == (result["minus_position_only"][1] > 0)
    rho1 = result["rho1"]
    assert rho1["hit"] == [0.278, 0.217, 0.338] and rho1["versus_position_only"] == "above"
    assert rho1["position_only"] == result["position_only"]

    quick.print_results({"td_decisive_token_hit": result})
    lines = [line for line in console.export_text().splitlines() if line.strip()]
    td, rho = lines[-2], lines[-1]
    assert td.strip().startswith("met" if met else "not met") and verdict in td
    assert "position-only predictor's 0.131 (0.086..0.182)" in td and "0.021 (0.019..0.023)" in td
    assert f"minus position-only {td_gain[0]:+.3f}" in td and "198 incorrect solutions" in td
    assert rho.strip().startswith("Rho-1's largest excess loss hits 0.278 (0.217..0.338)")
    assert "+0.146 (+0.071..+0.217): above the position-only predictor" in rho


def test_versus_reads_the_paired_interval():
    assert versus([0.1, 0.01, 0.2]) == "above"
    assert versus([-0.1, -0.2, -0.01]) == "below"
    assert versus([-0.1, -0.2, 0.0]) == "not distinguishable from"
