"""``wmtp study`` without training: the spec, the plan, the "done?" checks over several datasets,
skipping, pooling n samples per problem (docs/EVALUATION.md §6), the pooled statistics checked
against independent computations."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO
from weighted_mtp.base.errors import UserError
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import ConfigError, config_differences, config_to_dict
from weighted_mtp.study import Study, load_spec, pool, read_results

SPEC = REPO / "configs/study/known_answer.yaml"
PRODUCTION = REPO / "configs/study/production.yaml"


def _spec_file(tmp_path: Path, **changes) -> Path:
    data = {
        "name": "t",
        "configs": str(REPO / "configs/local"),
        "seeds": [0, 1],
        "budget": {"steps": 3},
        "evaluation": {"datasets": {"codecontests": {"max_new_tokens": 8}}, "max_tasks": 4},
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


def test_the_known_answer_spec_is_greedy_on_one_dataset():
    e = load_spec(SPEC).evaluation
    assert list(e.datasets) == ["codecontests"]
    greedy = e.datasets["codecontests"]
    assert (greedy.samples, greedy.temperature, greedy.max_new_tokens) == (1, 0.0, 256)


def test_the_production_spec_states_the_published_comparison():
    """Baseline, NTP, Verifiable Critic and Rho-1 with the shuffled control of each weighting,
    5 seeds, HumanEval and MBPP at 20 samples per problem, the production recipes at one batch
    shape and their own length."""
    spec = load_spec(PRODUCTION)
    assert {a: (s.recipe, s.control) for a, s in spec.arms.items()} == {
        "baseline": ("baseline", "none"), "ntp": ("ntp", "none"),
        "verifiable": ("verifiable", "none"), "verifiable_shuffled": ("verifiable", "shuffled"),
        "rho1": ("rho1", "none"), "rho1_shuffled": ("rho1", "shuffled"),
    }  # fmt: skip
    assert spec.seeds == [0, 1, 2, 3, 4] and spec.cluster == "problem"
    assert list(spec.evaluation.datasets) == ["humaneval", "mbpp"]
    for dataset in spec.evaluation.datasets.values():
        assert (dataset.samples, dataset.temperature, dataset.top_p) == (20, 0.8, 0.95)
    # above 1.5 x the longest reference solution in Llama 2 tokens (docs/EVALUATION.md §6)
    assert spec.evaluation.datasets["humaneval"].max_new_tokens >= 1.5 * 648
    assert spec.evaluation.datasets["mbpp"].max_new_tokens >= 1.5 * 469
    assert spec.evaluation.max_tasks is None
    assert len(spec.contrast_pairs()) == 7  # 5 against the baseline, 2 against a control
    study = Study(spec, PRODUCTION, StorageLayout(Path("/nonexistent-storage")), tracking=False)
    plan = study.plan()
    assert len([r for r in plan if r.evaluate]) == 30
    assert sorted(r.arm for r in plan if not r.evaluate) == ["critic", "ref_tuning"]
    for run in plan:
        config = study._configs[run]
        if run.evaluate:
            assert run.datasets == ("humaneval", "mbpp")
            assert run.config_file.parent.resolve() == REPO / "configs/production"
            assert (config.train.max_steps, config.train.batch_size, config.train.grad_accum) == (
                8334, 12, 2,
            )  # fmt: skip
            # one epoch of the recipes' 200,000 examples at 24 per step
            assert config.data.sampling.n_samples == 200_000
            assert math.ceil(math.ceil(200_000 / 12) / 2) == 8334
        else:
            assert run.datasets == () and config.train.max_steps is None  # helpers: as written


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
    assert shuffled.datasets == ("codecontests",)
    assert shuffled.eval_dir("codecontests") == shuffled.run_dir / "final/eval/codecontests"
    config = study._configs[shuffled]
    assert config.train.seed == 1 and config.train.max_steps == 3
    assert config.weighting.control == "shuffled" and config.checkpoint.resume
    # helpers "once": every seed's arm reads the first seed's critic
    assert config.weighting.verifiable.critic_checkpoint == (
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
        ({"evaluation": {"datasets": {"mbpp": {}, "nope": {}}}},
         r"spec.yaml:\d+: config key 'evaluation.datasets': unknown dataset 'nope'; choose from"),
        ({"evaluation": {"datasets": {"humaneval": {"samples": 5}}}},
         r"spec.yaml:\d+: config key 'evaluation.datasets.humaneval': temperature 0 \(greedy\) "
         "gives one completion, so samples must be 1, got 5"),
        ({"evaluation": {"datasets": {"mbpp": {"samples": 0, "temperature": 0.8}}}},
         r"spec.yaml:\d+: config key 'evaluation.datasets.mbpp.samples'"),
        ({"evaluation": {"datasets": {"mbpp": {"samples": 4, "temperature": -0.1}}}},
         r"spec.yaml:\d+: config key 'evaluation.datasets.mbpp.temperature'"),
        ({"evaluation": {"datasets": {"mbpp": {"samples": 4, "temperature": 1, "top_p": 0}}}},
         r"spec.yaml:\d+: config key 'evaluation.datasets.mbpp.top_p'"),
        ({"evaluation": {"datasets": {"mbpp": {"temp": 1}}}},
         r"spec.yaml:\d+: unknown config key 'evaluation.datasets.mbpp.temp'"),
        ({"evaluation": {"datasets": {}}}, r"spec.yaml:\d+: config key 'evaluation.datasets'"),
        ({"evaluation": {"datasets": {"mbpp": {}}, "max_new_tokens": 9}},
         r"spec.yaml:\d+: config key 'evaluation': max_new_tokens is set per dataset: "
         r"evaluation.datasets.<name>.max_new_tokens"),
        ({"evaluation": {"dataset": "mbpp", "datasets": {"mbpp": {}}}},
         "give datasets \\(per dataset settings\\) or dataset, not both"),
        ({"surprise": 1}, r"spec.yaml:\d+: unknown config key 'surprise'"),
        ({"contrasts": [["nope", "baseline"]]}, "spec.yaml: contrasts: 'nope' is not an arm"),
        ({"contrasts": [["baseline", "baseline"]]}, "contrasts: 'baseline' against itself"),
        ({"contrasts": [["verifiable", "baseline"], ["baseline", "verifiable"]]},
         "contrasts: 'baseline' and 'verifiable' compared twice"),
        ({"cluster": "seed"}, r"spec.yaml:\d+: config key 'cluster'"),
        ({"run_name": "{study}-{run}"}, r"spec.yaml:\d+: config key 'run_name': .*only \{study\}"),
        ({"run_name": "a/{arm}"}, r"config key 'run_name': .*'a/\{arm\}': letters, digits"),
    ],
)  # fmt: skip
def test_bad_specs_fail_in_one_line_with_the_file_and_key(tmp_path, change, message):
    with pytest.raises(UserError, match=message) as err:
        _study(tmp_path, **change)
    assert "\n" not in str(err.value)


def test_the_run_name_template_names_folders_and_two_runs_may_not_share_one(tmp_path):
    plan = _study(tmp_path, run_name="x-{arm}-{seed}-{study}").plan()
    assert sorted(r.run_dir.name for r in plan) == sorted(
        ["x-critic-0-t"] + [f"x-{a}-{s}-t" for a in ("baseline", "verifiable",
                                                     "verifiable_shuffled") for s in (0, 1)]
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"run_name '\{arm\}' gives baseline seed 0 and "
                       r"baseline seed 1 one folder .*checkpoints/baseline/baseline"):  # fmt: skip
        _study(tmp_path, run_name="{arm}").plan()


def test_missing_recipes_and_bad_arm_overrides_name_the_key(tmp_path):
    with pytest.raises(UserError, match="arms.b.recipe: no config file"):
        _study(tmp_path, arms={"baseline": {"recipe": "baseline"}, "b": {"recipe": "x"}}).plan()
    bad = {"baseline": {"recipe": "baseline"}, "b": {"recipe": "ntp", "overrides": ["x.y=1"]}}
    with pytest.raises(UserError, match="arms.b: unknown config key 'x'"):
        _study(tmp_path, arms=bad).plan()


# ---- "done?" and skipping, on fake run folders ----

TWO_DATASETS = {
    "datasets": {"codecontests": {"max_new_tokens": 8},
                 "humaneval": {"samples": 3, "temperature": 0.8, "max_new_tokens": 16}},
    "max_tasks": 4,
}  # fmt: skip
HARNESS_SETTINGS = {
    "codecontests": {"num_samples": 1, "temperature": 0.0, "top_p": 0.95, "seed": 0,
                     "max_new_tokens": 8, "max_tasks": 4, "speculative": False, "batch_size": 8},
    "humaneval": {"num_samples": 3, "temperature": 0.8, "top_p": 0.95, "seed": 0,
                  "max_new_tokens": 16, "max_tasks": 4, "speculative": False, "batch_size": 8},
}  # fmt: skip
"""What ``evaluate`` records in ``summary.json`` for the spec's settings of each dataset."""


def _fake_training(study: Study, run) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(study._configs[run])))
    (run.final).mkdir(parents=True, exist_ok=True)
    (run.final / "wmtp_checkpoint.json").write_text(json.dumps({"step": 3}))


def _fake_evaluation(run, passed: dict, dataset: str = "codecontests", **settings) -> None:
    """What ``evaluate`` leaves in ``final/eval/<dataset>``: one ``results.jsonl`` row per sample
    (``passed[task]``: a bool, or a list with one bool per sample) and ``summary.json`` with the
    settings it ran with (``HARNESS_SETTINGS`` unless changed)."""
    out = run.eval_dir(dataset)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"task_id": t, "sample": j, "verdict": "passed" if p else "failed", "passed": p}
            for t, v in passed.items() for j, p in enumerate(v if isinstance(v, list) else [v])]  # fmt: skip
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ran = {**HARNESS_SETTINGS[dataset], **settings}
    ran = {k: v for k, v in ran.items() if v is not None or k != "batch_size"}  # None: not written
    (out / "summary.json").write_text(json.dumps({"settings": ran}))


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


def test_a_run_is_done_when_every_dataset_is_evaluated_as_planned(tmp_path, monkeypatch):
    study = _study(tmp_path, evaluation=TWO_DATASETS)
    run = study.plan()[1]
    assert run.datasets == ("codecontests", "humaneval")
    assert run.eval_dir("humaneval") == run.run_dir / "final/eval/humaneval"
    _fake_training(study, run)
    assert study.status(run).state == "evaluate"
    assert study.pending_datasets(run) == ["codecontests", "humaneval"]
    _fake_evaluation(run, {"a": True})
    assert study.status(run).state == "evaluate"
    assert study.pending_datasets(run) == ["humaneval"]
    three = {"a": [True, False, True]}
    for other in ({"temperature": 0.2}, {"num_samples": 2}, {"top_p": 0.9}, {"seed": 1},
                  {"max_new_tokens": 8}, {"max_tasks": None}, {"batch_size": 4}):  # fmt: skip
        _fake_evaluation(run, three, "humaneval", **other)
        assert study.pending_datasets(run) == ["humaneval"], other
    _fake_evaluation(run, three, "humaneval")
    assert study.status(run).state == "done" and study.pending_datasets(run) == []
    # A summary from before the batch size was recorded: the default size (8), the same one.
    _fake_evaluation(run, three, "humaneval", batch_size=None)
    assert study.status(run).state == "done"
    # Greedy decoding does not read top_p, the seed or the batch size (the same tokens):
    # another value is the same evaluation.
    _fake_evaluation(run, {"a": True}, top_p=0.5, seed=3, batch_size=100)
    assert study.status(run).state == "done"

    # Evaluating a run does only the datasets it lacks, each with its own settings.
    calls = []

    def evaluate(layout, checkpoint, dataset, out, **kwargs):
        calls.append((dataset, out, kwargs))
        _fake_evaluation(run, three if dataset == "humaneval" else {"a": True}, dataset)

    monkeypatch.setattr("weighted_mtp.evaluation.harness.evaluate", evaluate)
    study.evaluate_run(run)
    assert calls == []
    (run.eval_dir("humaneval") / "summary.json").unlink()
    study.evaluate_run(run)
    ((dataset, out, kwargs),) = calls
    assert dataset == "humaneval" and out == run.eval_dir("humaneval")
    assert {k: kwargs[k] for k in ("num_samples", "temperature", "top_p", "seed",
                                   "max_new_tokens", "max_tasks", "speculative", "batch_size")} == {
        "num_samples": 3, "temperature": 0.8, "top_p": 0.95, "seed": 0, "max_new_tokens": 16,
        "max_tasks": 4, "speculative": False, "batch_size": 8,
    }  # fmt: skip
    assert study.status(run).state == "done"


def test_the_one_dataset_shape_reads_as_one_greedy_dataset(tmp_path):
    old = {"dataset": "mbpp", "max_tasks": 4, "max_new_tokens": 8, "speculative": True}
    study = _study(tmp_path, evaluation=old)
    e = study.spec.evaluation
    assert list(e.datasets) == ["mbpp"] and e.max_tasks == 4
    mbpp = e.datasets["mbpp"]
    assert (mbpp.samples, mbpp.temperature, mbpp.max_new_tokens, mbpp.speculative) == (
        1, 0.0, 8, True,
    )  # fmt: skip
    default = load_spec(_spec_file(tmp_path, evaluation={"dataset": "mbpp"})).evaluation
    assert default.datasets["mbpp"].max_new_tokens == 192  # the old default
    # An evaluation made under the old shape still counts: the same settings.
    run = study.plan()[1]
    _fake_training(study, run)
    out = run.eval_dir("mbpp")
    out.mkdir(parents=True)
    (out / "results.jsonl").write_text(json.dumps({"task_id": "a", "passed": True}) + "\n")
    written = {"num_samples": 1, "temperature": 0.0, "top_p": 0.95, "max_tasks": 4,
               "max_new_tokens": 8, "speculative": True, "seed": 0}  # fmt: skip
    (out / "summary.json").write_text(json.dumps({"settings": written}))
    assert study.status(run).state == "done"


def test_config_differences_ignore_only_logging_and_resume():
    a = {"log": {"mlflow": True}, "checkpoint": {"resume": True, "every": 2}, "x": [1, 2]}
    b = {"log": {"mlflow": False}, "checkpoint": {"resume": False, "every": 3}, "x": [1, 2]}
    assert config_differences(a, b) == ["checkpoint.every"]
    assert config_differences(a, {**a, "y": 1}) == ["y"]


def _holm_by_hand(p_values: list[float]) -> list[float]:
    """Holm's adjusted p-values as the textbook writes them, for an independent check."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    for rank, i in enumerate(order):
        adjusted[i] = min(1.0, max((m - r) * p_values[order[r]] for r in range(rank + 1)))
    return adjusted


def test_run_trains_and_evaluates_only_what_is_missing_then_skips_everything(tmp_path, monkeypatch):
    study = _study(tmp_path, evaluation=TWO_DATASETS)
    plan = study.plan()
    outcome = {0: {"a": True, "b": False, "c": False, "d": True},
               1: {"a": False, "b": False, "c": True, "d": True}}  # fmt: skip
    # HumanEval, 3 samples per problem: the arms differ by how many samples pass.
    passes = {"baseline": [0, 1, 2, 0], "verifiable": [3, 2, 2, 1],
              "verifiable_shuffled": [1, 1, 3, 0]}  # fmt: skip
    trained, evaluated = [], []

    def train(run):
        trained.append(run.label)
        _fake_training(study, run)

    def evaluate(run):
        evaluated.append(run.label)
        _fake_evaluation(run, outcome[run.seed])
        sampled = {
            t: [j < k for j in range(3)] for t, k in zip("abcd", passes[run.arm], strict=True)
        }
        _fake_evaluation(run, sampled, "humaneval")

    monkeypatch.setattr(study, "train_run", train)
    monkeypatch.setattr(study, "evaluate_run", evaluate)
    monkeypatch.setattr(study, "_require_sandbox", lambda: None)
    done_before = plan[1]  # baseline seed 0 finished earlier
    _fake_training(study, done_before)
    evaluate(done_before)
    evaluated.clear()
    half = plan[2]  # verifiable seed 0: trained, its evaluation missing
    _fake_training(study, half)

    result = study.run()
    assert "baseline seed 0" not in trained + evaluated
    assert "verifiable seed 0" not in trained and "verifiable seed 0" in evaluated
    assert len(trained) == len(plan) - 2 and len(evaluated) == len(plan) - 2
    summary = json.loads((study.report_dir / "study.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["missing"] == [] and set(summary["datasets"]) == {"codecontests", "humaneval"}
    assert summary["problems"] == 8  # 4 per dataset
    assert summary["same_steps"] and summary["same_training_examples"]
    greedy, sampled = summary["datasets"]["codecontests"], summary["datasets"]["humaneval"]
    assert greedy["settings"]["samples"] == 1 and sampled["settings"]["samples"] == 3
    assert greedy["arms"]["verifiable_shuffled"]["pass_at_1"] == pytest.approx(0.5)
    for arm, k in passes.items():
        row = sampled["arms"][arm]
        assert row["pass_at_1"] == pytest.approx(sum(k) / 12)  # the same in both seeds
        assert row["per_seed"] == {"0": pytest.approx(sum(k) / 12), "1": pytest.approx(sum(k) / 12)}
        assert list(row["pass_at_k"]) == ["pass@1"]  # 3 samples: no k of 5 or more
        assert summary["arms"][arm]["pass_at_1"] == {
            "codecontests": greedy["arms"][arm]["pass_at_1"], "humaneval": row["pass_at_1"],
        }  # fmt: skip
    # the default contrasts on each dataset, Holm-adjusted over all six together
    pairs = [("verifiable", "baseline"), ("verifiable_shuffled", "baseline"),
             ("verifiable", "verifiable_shuffled")]  # fmt: skip
    assert [(c["dataset"], c["arm"], c["baseline"]) for c in summary["comparisons"]] == [
        (d, a, r) for d in ("codecontests", "humaneval") for a, r in pairs
    ]
    assert summary["holm_family"] == 6
    raw = [c["p_value"] for c in summary["comparisons"]]
    assert [c["p_adjusted"] for c in summary["comparisons"]] == pytest.approx(_holm_by_hand(raw))
    assert [c["difference"] for c in sampled["comparisons"]] == pytest.approx(
        [(8 - 3) / 12, (5 - 3) / 12, (8 - 5) / 12]
    )
    assert sampled["comparisons"] == summary["comparisons"][3:]
    assert [c["test"] for c in summary["comparisons"]] == ["sign-flip (exact)"] * 6
    assert summary["contrasts_pending"] == [] and summary["cluster"] == "problem"
    page = (study.report_dir / "index.html").read_text()
    assert "verifiable_shuffled" in page and "not distinguishable" in page
    assert "Holm p" in page and "detectable" in page and "bootstrap" in page
    assert "Arms on humaneval" in page and "3 samples per problem, temperature 0.8" in page
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
    monkeypatch.setattr(study, "train_run", lambda run: (ran.append(run.label),
                                                      _fake_training(study, run)))  # fmt: skip
    monkeypatch.setattr(study, "evaluate_run", lambda run: _fake_evaluation(run, {"a": True}))
    monkeypatch.setattr(study, "_require_sandbox", lambda: None)
    result = study.run(only="verifiable_shuffled")
    assert ran == ["critic seed 0", "verifiable_shuffled seed 0", "verifiable_shuffled seed 1"]
    assert result.summary["arms"].keys() == {"verifiable_shuffled"}
    assert result.summary["comparisons"] == []  # no baseline yet
    assert len(result.summary["missing"]) == 4
    with pytest.raises(UserError, match="--only 'nope'"):
        study.run(only="nope")


def test_read_results_counts_the_samples_and_passes_of_each_problem(tmp_path):
    rows = [("a", 0, True), ("a", 1, False), ("b", 0, False), ("a", 2, True), ("b", 1, False)]
    (tmp_path / "results.jsonl").write_text(
        "".join(json.dumps({"task_id": t, "sample": j, "passed": p}) + "\n" for t, j, p in rows)
    )
    assert read_results(tmp_path) == {"a": (3, 2), "b": (2, 0)}


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


# ---- n samples per problem: estimated pass rates ----

# 2 arms x 2 seeds x 5 problems, 10 samples each: the passes c of (n = 10, c).
PASSES = {
    "base": {0: [0, 3, 10, 5, 1], 1: [2, 3, 9, 5, 0]},
    "arm": {0: [4, 2, 10, 9, 3], 1: [6, 0, 10, 7, 1]},
}


def _counts(passes: dict, n: int = 10) -> dict:
    return {a: {s: {f"p{i}": (n, c) for i, c in enumerate(v)} for s, v in seeds.items()}
            for a, seeds in passes.items()}  # fmt: skip


def test_pooling_n_samples_against_a_computation_by_hand():
    """Per problem the pass rate c / n, averaged over seeds; pass@1 its mean over problems
    (base 0.1, 0.3, 0.95, 0.5, 0.05: 0.38; arm 0.5, 0.1, 1.0, 0.8, 0.2: 0.52); pass@k from
    1 - C(n - c, k) / C(n, k) per run and problem; the contrast's p-value from all 2^5 sign
    patterns of the five per-problem differences."""
    out = pool(_counts(PASSES), "base")
    assert out["problems"] == 5 and out["samples"] == 10
    base, arm = out["arms"]["base"], out["arms"]["arm"]
    assert base["pass_at_1"] == pytest.approx(0.38, abs=1e-12)
    assert arm["pass_at_1"] == pytest.approx(0.52, abs=1e-12)
    assert base["per_seed"] == {"0": pytest.approx(0.38), "1": pytest.approx(0.38)}
    assert arm["per_seed"] == {"0": pytest.approx(0.56), "1": pytest.approx(0.48)}
    for name, row in (("base", base), ("arm", arm)):
        assert list(row["pass_at_k"]) == ["pass@1", "pass@5", "pass@10"]
        for k in (1, 5, 10):
            by_hand = [1 - math.comb(10 - c, k) / math.comb(10, k)
                       for seed in PASSES[name].values() for c in seed]  # fmt: skip
            assert row["pass_at_k"][f"pass@{k}"] == pytest.approx(sum(by_hand) / 10, abs=1e-12)
        assert row["interval"] == "bootstrap" and row["low"] <= row["pass_at_1"] <= row["high"]
    assert base["passed_any_seed"] == 5 and arm["passed_any_seed"] == 5
    (c,) = out["comparisons"]
    diff = [0.4, -0.2, 0.05, 0.3, 0.15]
    flipped = [abs(sum(s * d for s, d in zip(signs, diff, strict=True)))
               for signs in itertools.product((1, -1), repeat=5)]  # fmt: skip
    assert c["difference"] == pytest.approx(0.14, abs=1e-12)
    assert c["p_value"] == pytest.approx(sum(f >= 0.7 - 1e-12 for f in flipped) / 32, rel=1e-12)
    assert c["test"] == "sign-flip (exact)" and c["problems"] == c["clusters"] == 5
    assert (c["problems_arm_better"], c["problems_baseline_better"]) == (4, 1)
    assert c["statement"] == "not distinguishable; with 5 clusters no result can reach p < 0.05"


def test_fractional_pass_rates_match_scipys_paired_permutation_test():
    """Sampled results on 14 problems (exact: every sign pattern) and 60 problems (100,000
    random patterns): the study's p-value against SciPy's ``permutation_test`` on the same
    per-problem differences of estimated pass rates (each pair's members swapped = a sign
    flip)."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(12)
    for problems, exact in ((14, True), (60, False)):
        rates = {"base": rng.uniform(0, 1, problems), "arm": rng.uniform(0, 1, problems)}
        passes = {a: {s: [int(x) for x in rng.binomial(20, r)] for s in (0, 1, 2)}
                  for a, r in rates.items()}  # fmt: skip
        (c,) = pool(_counts(passes, 20), "base")["comparisons"]
        per_problem = {a: np.mean([passes[a][s] for s in (0, 1, 2)], axis=0) / 20
                       for a in passes}  # fmt: skip
        kwargs = {"n_resamples": np.inf if exact else 200_000, "random_state": 3}
        ref = stats.permutation_test(
            (per_problem["arm"], per_problem["base"]),
            lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
            permutation_type="samples", alternative="two-sided", **kwargs,
        )  # fmt: skip
        assert c["difference"] == pytest.approx(ref.statistic, abs=1e-12)
        if exact:
            assert c["test"] == "sign-flip (exact)"
            assert c["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
        else:
            assert c["test"] == "sign-flip (100,000 random patterns)"
            assert c["p_value"] == pytest.approx(ref.pvalue, abs=0.006)


def test_pass_at_1_interval_is_wilson_for_pass_fail_and_the_bootstrap_for_rates():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    # One seed of one greedy sample, or rates that all came out 0 or 1: a binomial count.
    flags = {f"p{i}": bool(x) for i, x in enumerate(rng.random(50) < 0.3)}
    row = pool({"b": {0: flags}}, "b")["arms"]["b"]
    ref = stats.binomtest(sum(flags.values()), 50).proportion_ci(method="wilson")
    assert row["interval"] == "wilson"
    assert (row["low"], row["high"]) == (pytest.approx(ref.low), pytest.approx(ref.high))
    # 20 samples per problem: the percentile bootstrap of the mean over problems.
    rates = rng.beta(0.6, 0.9, 80)
    passes = {"b": {0: [int(x) for x in rng.binomial(20, rates)]}}
    row = pool(_counts(passes, 20), "b")["arms"]["b"]
    values = np.asarray(passes["b"][0]) / 20
    ref = stats.bootstrap((values,), np.mean, n_resamples=20_000, method="percentile",
                          random_state=4).confidence_interval  # fmt: skip
    assert row["interval"] == "bootstrap"
    assert row["low"] == pytest.approx(ref.low, abs=0.01)
    assert row["high"] == pytest.approx(ref.high, abs=0.01)
    assert row["per_seed_interval"]["0"] == [row["low"], row["high"]]  # one seed: the same


def test_mcnemar_only_for_single_samples_and_bad_counts_are_refused():
    """One seed of n = 5 samples whose rates all came out 0 or 1 is not McNemar's table (a
    rate of 1 is five passes, not one): the sign-flip test, exact for equal-size differences."""
    stats = pytest.importorskip("scipy.stats")
    arm = {f"p{i}": (5, 5 if i < 25 or i >= 30 else 0) for i in range(40)}
    base = {f"p{i}": (5, 5 if i >= 30 else 0) for i in range(40)}
    (c,) = pool({"b": {0: base}, "a": {0: arm}}, "b")["comparisons"]
    assert c["test"] == "sign-flip (exact)" and c["clusters"] == 40
    assert c["p_value"] == pytest.approx(stats.binomtest(25, 25, 0.5).pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pool({"b": {0: {"p": (3, 4)}}}, "b")


def test_the_summary_goes_to_mlflow_once_with_verdicts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    path = _spec_file(tmp_path, seeds=[0])
    layout = StorageLayout(tmp_path / "storage")
    study = Study(load_spec(path), path, layout, tracking=True)
    outcome = {"baseline": {"a": False, "b": False, "c": True, "d": False}}
    monkeypatch.setattr(study, "train_run", lambda run: _fake_training(study, run))
    monkeypatch.setattr(
        study,
        "evaluate_run",
        lambda run: _fake_evaluation(run, outcome.get(run.arm, {t: True for t in "abcd"})),
    )
    monkeypatch.setattr(study, "_require_sandbox", lambda: None)
    assert study.run().ran
    study.run()  # nothing ran: the summary is not logged again
    client = MlflowClient(tracking_uri=layout.mlflow_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    assert run.info.run_name == "study-t"
    assert run.data.metrics["pass_at_1/codecontests/verifiable"] == 1.0
    assert run.data.metrics["pass_at_1_low/codecontests/verifiable"] < 1.0
    assert run.data.metrics["difference/codecontests/verifiable"] == pytest.approx(0.75)
    # 3 of 3: p 0.25
    assert run.data.tags["wmtp.verdict.codecontests.verifiable"] == "not distinguishable"
    assert run.data.tags["wmtp.verdict.codecontests.verifiable-vs-verifiable_shuffled"] == (
        "not distinguishable"
    )
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
