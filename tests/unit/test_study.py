"""``wmtp study`` without training: the spec, the plan, the "done?" checks, skipping, pooling
(docs/EVALUATION.md §6), the pooled statistics checked against independent computations."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from weighted_mtp.base.errors import UserError
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import ConfigError, config_differences, config_to_dict
from weighted_mtp.study import Study, load_spec, pool

SPEC = REPO / "configs/study/known_answer.yaml"


def _spec_file(tmp_path: Path, **changes) -> Path:
    data = {
        "name": "t",
        "configs": str(REPO / "configs/local"),
        "seeds": [0, 1],
        "budget": {"steps": 3},
        "evaluation": {"dataset": "codecontests", "max_tasks": 4, "max_new_tokens": 8},
        "arms": {
            "baseline": {"recipe": "baseline"},
            "verifiable": {"recipe": "verifiable"},
            "verifiable_shuffled": {"recipe": "verifiable", "control": "shuffled"},
        },
        **changes,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _study(tmp_path: Path, overrides: list[str] | None = None, **changes) -> Study:
    path = _spec_file(tmp_path, **changes)
    return Study(load_spec(path, overrides), path, StorageLayout(tmp_path / "storage"),
                 tracking=False)  # fmt: skip


def test_the_shipped_spec_plans_every_arm_and_seed_with_local_and_production_configs():
    spec = load_spec(SPEC)
    layout = StorageLayout(Path("/nonexistent-storage"))
    plan = Study(spec, SPEC, layout, tracking=False).plan()
    arms = [r for r in plan if r.evaluate]
    assert len(arms) == len(spec.arms) * len(spec.seeds)
    assert sorted(r.arm for r in plan if not r.evaluate) == ["critic", "ref_tuning"]
    # Production recipes unchanged, once the budget names one batch shape for every arm.
    production = REPO / "configs/production"
    with pytest.raises(ConfigError, match="differ in examples per step"):
        Study(spec, SPEC, layout, production, tracking=False).plan()
    fixed = load_spec(SPEC, ["budget.batch_size=12", "budget.grad_accum=2"])
    plan = Study(fixed, SPEC, layout, production, tracking=False).plan()
    assert all("train.batch_size=12" in r.overrides for r in plan if r.evaluate)


def test_plan_names_runs_and_adds_only_the_study_overrides(tmp_path):
    study = _study(tmp_path)
    plan = study.plan()
    helper, *arms = plan
    assert (helper.arm, helper.seed, helper.evaluate) == ("critic", 0, False)
    assert helper.run_dir == tmp_path / "storage/checkpoints/critic/study-t-critic-seed0"
    assert [(r.arm, r.seed) for r in arms] == [
        (a, s) for s in (0, 1) for a in ("baseline", "verifiable", "verifiable_shuffled")
    ]
    shuffled = arms[-1]
    assert shuffled.run_dir.name == "study-t-verifiable_shuffled-seed1"
    assert shuffled.run_dir.parent.name == "verifiable"  # the recipe's experiment
    assert shuffled.eval_dir == shuffled.run_dir / "final/eval/codecontests"
    config = study._configs[shuffled]
    assert config.train.seed == 1 and config.train.max_steps == 3
    assert config.weighting.control == "shuffled" and config.checkpoint.resume
    # helpers "once": every seed's arm reads the first seed's critic
    assert config.weighting.critic_td.critic_checkpoint == (
        "checkpoints/critic/study-t-critic-seed0/final"
    )
    per_seed = _study(tmp_path, helpers="per_seed").plan()
    assert [r.seed for r in per_seed if not r.evaluate] == [0, 1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seeds": [1, 1]}, "spec.yaml: seeds: repeated seed"),
        ({"baseline": "nope"}, "spec.yaml: baseline: 'nope' is not an arm"),
        ({"budget": {"steps": 0}}, r"spec.yaml:\d+: config key 'budget.steps'"),
        ({"arms": {"baseline": {"recipe": "baseline", "control": "odd"}, "b": {"recipe": "ntp"}}},
         r"spec.yaml:\d+: config key 'arms.baseline.control'"),
        ({"evaluation": {"dataset": "nope"}}, "unknown dataset 'nope'"),
        ({"surprise": 1}, r"spec.yaml:\d+: unknown config key 'surprise'"),
        ({"contrasts": [["nope", "baseline"]]}, "spec.yaml: contrasts: 'nope' is not an arm"),
        ({"contrasts": [["baseline", "baseline"]]}, "contrasts: 'baseline' against itself"),
        ({"contrasts": [["verifiable", "baseline"], ["baseline", "verifiable"]]},
         "contrasts: 'baseline' and 'verifiable' compared twice"),
        ({"cluster": "seed"}, r"spec.yaml:\d+: config key 'cluster'"),
    ],
)  # fmt: skip
def test_bad_specs_fail_in_one_line_with_the_file_and_key(tmp_path, change, message):
    with pytest.raises(UserError, match=message) as err:
        _study(tmp_path, **change)
    assert "\n" not in str(err.value)


def test_missing_recipes_and_bad_arm_overrides_name_the_key(tmp_path):
    with pytest.raises(UserError, match="arms.b.recipe: no config file"):
        _study(tmp_path, arms={"baseline": {"recipe": "baseline"}, "b": {"recipe": "x"}}).plan()
    bad = {"baseline": {"recipe": "baseline"}, "b": {"recipe": "ntp", "overrides": ["x.y=1"]}}
    with pytest.raises(UserError, match="arms.b: unknown config key 'x'"):
        _study(tmp_path, arms=bad).plan()


# ---- "done?" and skipping, on fake run folders ----


def _fake_training(study: Study, run) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(study._configs[run])))
    (run.final).mkdir(parents=True, exist_ok=True)
    (run.final / "wmtp_checkpoint.json").write_text(json.dumps({"step": 3}))


def _fake_evaluation(run, passed: dict[str, bool], **settings) -> None:
    run.eval_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"task_id": t, "sample": 0, "verdict": "passed" if p else "failed", "passed": p}
            for t, p in passed.items()]  # fmt: skip
    (run.eval_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = {"num_samples": 1, "temperature": 0.0, "max_tasks": 4, "max_new_tokens": 8,
                "speculative": False, **settings}  # fmt: skip
    (run.eval_dir / "summary.json").write_text(json.dumps({"settings": expected}))


def test_status_follows_what_is_on_disk(tmp_path):
    study = _study(tmp_path)
    run = study.plan()[1]
    assert study.status(run).state == "train"
    (run.run_dir / "step_00000001").mkdir(parents=True)
    assert study.status(run).state == "resume"
    _fake_training(study, run)
    assert study.status(run).state == "evaluate"
    _fake_evaluation(run, {"a": True}, max_new_tokens=99)  # evaluated otherwise: again
    assert study.status(run).state == "evaluate"
    _fake_evaluation(run, {"a": True})
    assert study.status(run).state == "done"
    changed = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    changed["optim"]["lr"] = 1.0
    changed["log"]["mlflow"] = True  # tracking on or off is not another run
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(UserError, match="trained with other settings .*optim.lr differs"):
        study.status(run)


def test_config_differences_ignore_only_logging_and_resume():
    a = {"log": {"mlflow": True}, "checkpoint": {"resume": True, "every": 2}, "x": [1, 2]}
    b = {"log": {"mlflow": False}, "checkpoint": {"resume": False, "every": 3}, "x": [1, 2]}
    assert config_differences(a, b) == ["checkpoint.every"]
    assert config_differences(a, {**a, "y": 1}) == ["y"]


def test_run_trains_and_evaluates_only_what_is_missing_then_skips_everything(tmp_path, monkeypatch):
    study = _study(tmp_path)
    plan = study.plan()
    outcome = {0: {"a": True, "b": False, "c": False, "d": True},
               1: {"a": False, "b": False, "c": True, "d": True}}  # fmt: skip
    trained, evaluated = [], []

    def train(run):
        trained.append(run.label)
        _fake_training(study, run)

    def evaluate(run):
        evaluated.append(run.label)
        _fake_evaluation(run, outcome[run.seed])

    monkeypatch.setattr(study, "_train", train)
    monkeypatch.setattr(study, "_evaluate", evaluate)
    monkeypatch.setattr(study, "_require_sandbox", lambda: None)
    done_before = plan[1]  # baseline seed 0 finished earlier
    _fake_training(study, done_before)
    _fake_evaluation(done_before, outcome[0])
    half = plan[2]  # verifiable seed 0: trained, its evaluation missing
    _fake_training(study, half)

    result = study.run()
    assert "baseline seed 0" not in trained + evaluated
    assert "verifiable seed 0" not in trained and "verifiable seed 0" in evaluated
    assert len(trained) == len(plan) - 2 and len(evaluated) == len(plan) - 2
    summary = json.loads((study.report_dir / "study.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["problems"] == 4 and summary["missing"] == []
    assert summary["same_steps"] and summary["same_training_examples"]
    assert summary["arms"]["verifiable_shuffled"]["pass_at_1"] == pytest.approx(0.5)
    # the default contrasts: each arm against the baseline, the weighting against its control
    assert [(c["arm"], c["baseline"]) for c in summary["comparisons"]] == [
        ("verifiable", "baseline"), ("verifiable_shuffled", "baseline"),
        ("verifiable", "verifiable_shuffled"),
    ]  # fmt: skip
    assert [c["test"] for c in summary["comparisons"]] == ["sign-flip (exact)"] * 3
    assert all(c["p_adjusted"] >= c["p_value"] for c in summary["comparisons"])
    assert summary["contrasts_pending"] == [] and summary["cluster"] == "problem"
    page = (study.report_dir / "index.html").read_text()
    assert "verifiable_shuffled" in page and "not distinguishable" in page
    assert "Holm p" in page and "detectable" in page and "Wilson" in page
    assert "http://" not in page and "https://" not in page

    trained.clear(), evaluated.clear()
    again = study.run()
    assert trained == evaluated == [] and len(again.skipped) == len(plan)
    only = study.run(only="baseline")
    assert only.ran == [] and len(only.skipped) == 2
    # A run that stopped early (an epoch cap below the budget) is flagged, not hidden.
    (plan[-1].final / "wmtp_checkpoint.json").write_text(json.dumps({"step": 2}))
    flagged = study.run()
    assert not flagged.summary["same_steps"] and flagged.summary["same_training_examples"]
    assert "did not all train the same steps" in (study.report_dir / "index.html").read_text()


def test_only_runs_one_arm_and_its_helper(tmp_path, monkeypatch):
    study = _study(tmp_path)
    ran = []
    monkeypatch.setattr(study, "_train", lambda run: (ran.append(run.label),
                                                      _fake_training(study, run)))  # fmt: skip
    monkeypatch.setattr(study, "_evaluate", lambda run: _fake_evaluation(run, {"a": True}))
    monkeypatch.setattr(study, "_require_sandbox", lambda: None)
    result = study.run(only="verifiable_shuffled")
    assert ran == ["critic seed 0", "verifiable_shuffled seed 0", "verifiable_shuffled seed 1"]
    assert result.summary["arms"].keys() == {"verifiable_shuffled"}
    assert result.summary["comparisons"] == []  # no baseline yet
    assert len(result.summary["missing"]) == 4
    with pytest.raises(UserError, match="--only 'nope'"):
        study.run(only="nope")


# ---- pooling, against independent computations ----


def _fake_results(arms: int, seeds: int, problems: int, seed: int = 7):
    rng = random.Random(seed)
    rates = [0.3, 0.6, 0.45][:arms]
    return {
        f"arm{i}": {s: {f"p{t}": rng.random() < rates[i] for t in range(problems)}
                    for s in range(seeds)}
        for i in range(arms)
    }  # fmt: skip


def test_pooled_pass_at_1_is_the_mean_over_problems_of_the_mean_over_seeds():
    results = _fake_results(3, 3, 12)
    results["arm1"][2].pop("p5")  # a problem missing in one run leaves every arm
    out = pool(results, "arm0")
    tasks = [f"p{t}" for t in range(12) if t != 5]
    assert out["problems"] == 11
    for arm, seeds in results.items():
        by_problem = [sum(seeds[s][t] for s in seeds) / 3 for t in tasks]
        expected = sum(by_problem) / len(by_problem)
        row = out["arms"][arm]
        assert row["pass_at_1"] == pytest.approx(expected, abs=1e-12)
        assert row["low"] <= expected <= row["high"]
        for s in seeds:
            assert row["per_seed"][str(s)] == pytest.approx(
                sum(seeds[s][t] for t in tasks) / len(tasks)
            )
        assert row["passed_any_seed"] == sum(any(seeds[s][t] for s in seeds) for t in tasks)
    assert [c["arm"] for c in out["comparisons"]] == ["arm1", "arm2"]


def test_one_seed_is_mcnemar_and_matches_scipys_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    results = _fake_results(2, 1, 40, seed=11)
    (comparison,) = pool(results, "arm0")["comparisons"]
    a, b = results["arm1"][0], results["arm0"][0]
    only_arm = sum(a[t] and not b[t] for t in a)
    only_base = sum(b[t] and not a[t] for t in a)
    assert comparison["test"] == "McNemar (exact)"
    assert comparison["p_value"] == pytest.approx(
        stats.binomtest(only_arm, only_arm + only_base, 0.5).pvalue, rel=1e-12
    )
    assert comparison["difference"] == pytest.approx((only_arm - only_base) / 40)
    assert (comparison["arm_better"], comparison["baseline_better"]) == (only_arm, only_base)


def test_several_seeds_match_every_sign_pattern_enumerated_by_hand():
    """Seeds pooled by hand into per-problem differences, then every one of the 2^6 sign
    patterns of six problems enumerated: the exact two-sided sign-flip p-value."""
    results = _fake_results(2, 3, 6, seed=5)
    tasks = [f"p{t}" for t in range(6)]
    diff = [
        sum(results["arm1"][s][t] for s in range(3)) / 3
        - sum(results["arm0"][s][t] for s in range(3)) / 3
        for t in tasks
    ]
    observed = sum(diff) / 6
    flipped = [abs(sum(s * d for s, d in zip(signs, diff, strict=True))) / 6
               for signs in itertools.product((1, -1), repeat=6)]  # fmt: skip
    exact_p = sum(f >= abs(observed) - 1e-12 for f in flipped) / 64
    (comparison,) = pool(results, "arm0")["comparisons"]
    assert comparison["test"] == "sign-flip (exact)"
    assert comparison["difference"] == pytest.approx(observed, abs=1e-12)
    assert comparison["p_value"] == pytest.approx(exact_p, rel=1e-12)
    assert comparison["p_adjusted"] == comparison["p_value"]  # one contrast
    assert comparison["low"] <= observed <= comparison["high"]
    assert comparison["arm_better"] == sum(d > 0 for d in diff)
    assert comparison["baseline_better"] == sum(d < 0 for d in diff)
    # the bootstrap called these inputs "better" (p < 0.05); six problems cannot support it
    assert exact_p > 0.05 and comparison["verdict"] == "not distinguishable"


def test_family_clusters_and_declared_contrasts(tmp_path):
    spec = load_spec(SPEC)
    assert spec.cluster == "family"
    pairs = spec.contrast_pairs()
    assert len(pairs) == 9 and pairs[-2:] == [
        ("verifiable", "verifiable_shuffled"), ("rho1", "rho1_shuffled"),
    ]  # fmt: skip
    rng = random.Random(3)
    names = [f"synthetic_test_{i:05d}_{['sum_threshold', 'caesar'][i % 2]}" for i in range(8)]
    results = {arm: {s: {t: rng.random() < 0.5 for t in names} for s in (0, 1)}
               for arm in ("b", "a", "c")}  # fmt: skip
    out = pool(results, "b", None, [("a", "b"), ("a", "c"), ("c", "x")], "family")
    assert out["clusters"] == 2 and [c["clusters"] for c in out["comparisons"]] == [2, 2]
    assert out["contrasts_pending"] == ["c - x"]
    assert all("no result can reach" in c["statement"] for c in out["comparisons"])
    with pytest.raises(UserError, match="cluster: family needs known-answer problem names"):
        pool({"b": {0: {"HumanEval/0": True}}}, "b", cluster="family")
    declared = _study(tmp_path, contrasts=[["verifiable", "verifiable_shuffled"]])
    assert declared.spec.contrast_pairs() == [("verifiable", "verifiable_shuffled")]


def test_the_summary_goes_to_mlflow_once_with_verdicts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    path = _spec_file(tmp_path, seeds=[0])
    layout = StorageLayout(tmp_path / "storage")
    study = Study(load_spec(path), path, layout, tracking=True)
    outcome = {"baseline": {"a": False, "b": False, "c": True, "d": False}}
    monkeypatch.setattr(study, "_train", lambda run: _fake_training(study, run))
    monkeypatch.setattr(
        study,
        "_evaluate",
        lambda run: _fake_evaluation(run, outcome.get(run.arm, {t: True for t in "abcd"})),
    )
    monkeypatch.setattr(study, "_require_sandbox", lambda: None)
    assert study.run().ran
    study.run()  # nothing ran: the summary is not logged again
    client = MlflowClient(tracking_uri=layout.mlflow_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    assert run.info.run_name == "study-t"
    assert run.data.metrics["pass_at_1/verifiable"] == 1.0
    assert run.data.metrics["difference/verifiable"] == pytest.approx(0.75)
    assert run.data.tags["wmtp.verdict.verifiable"] == "not distinguishable"  # 3 of 3: p 0.25
    assert run.data.tags["wmtp.report"] == str((study.report_dir / "index.html").resolve())


def test_cli_dry_run_prints_the_plan_and_bad_input_is_one_line(tmp_path, capsys):
    from weighted_mtp.cli import main

    path = _spec_file(tmp_path)
    storage = str(tmp_path / "storage")
    assert main(["study", str(path), "--storage", storage, "--dry-run", "seeds=[3]"]) == 0
    out = capsys.readouterr().out
    assert "0 of 4 runs finished" in out and "[4/4] verifiable_shuffled seed 3: train" in out
    assert not (tmp_path / "storage").exists()  # a dry run writes nothing
    assert main(["study", str(path), "--storage", storage, "--only", "x", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only 'x': not an arm" in err
