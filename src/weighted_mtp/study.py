"""``wmtp study``: a controlled comparison of recipes and their control arms (docs/EVALUATION.md §6).

A study spec (``configs/study/*.yaml``) names arms (a config file of the configs folder plus a
weighting control), seeds, one compute budget and the evaluation: one or more datasets, each
with its samples per problem and sampling settings. The study plans every (arm, seed) run, and
the frozen helpers the arms need (the critic of ``verifiable``, the tuned reference of
``rho1``), trains and evaluates what is not finished, then, per dataset, pools the seeds per
problem and compares the arms on the same problems (``evaluation/compare.py``), Holm-adjusted
over every contrast of every dataset. It writes ``study.json`` and one HTML page under
``<storage>/reports/study/<name>/`` and, with tracking on, logs a summary to MLflow.

The recipes' config files are taken unchanged; the study only adds overrides: the run name
(``study-<name>-<arm>-seed<seed>``, so runs never collide with the quickstart's), the seed
(``train.seed``), the budget (``train.max_steps`` and, when the spec sets them, the batch size
and gradient accumulation), the control, the helper's checkpoint, and ``checkpoint.resume``.
A run is finished when its ``final`` checkpoint exists and every dataset's evaluation
(``final/eval/<dataset>/``) was made with the planned settings; those are skipped, a trained
run is evaluated on the datasets it lacks, a half-trained run resumes from its last step
checkpoint.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from rich.console import Console
from rich.table import Table

from weighted_mtp import registry
from weighted_mtp.base.errors import UserError
from weighted_mtp.base.io import read_json_or_none, write_json_atomic, write_text_atomic
from weighted_mtp.base.layout import EVAL_DATASETS, StorageLayout
from weighted_mtp.config import (
    Config,
    ConfigError,
    Section,
    config_differences,
    config_to_dict,
    load_config,
    load_validated,
)
from weighted_mtp.slurm import JobOptions

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
STUDY_EXPERIMENT = "study"
"""The MLflow experiment of the study summaries."""
POOLING_RULE = (
    "per dataset and problem, the estimated pass rate (the fraction of the problem's samples "
    "that passed) averaged over seeds; an arm's pass@1 is the mean of those over the problems "
    "every run was scored on, its pass@k the unbiased estimator averaged the same way"
)
EVAL_SEED = 0
"""The sampling seed given to every evaluation: the same for every arm and seed, so each
run's samples can be drawn again."""
Counts = tuple[int, int]
"""(n samples, c passed) of one problem in one run."""
LEGACY_MAX_NEW_TOKENS = 192
"""``max_new_tokens`` of the one-dataset shape when it gave none (its default then)."""
FAMILY_ID = re.compile(r"^synthetic_[A-Za-z]+_\d+_(?P<family>\w+)$")
"""A known-answer problem's name: ``synthetic_<split>_<index>_<family>`` (docs/DATA.md §1)."""


class BudgetSpec(Section):
    """The compute every compared arm gets: the same optimizer steps of the same examples."""

    steps: int = Field(ge=1)
    """``train.max_steps`` of every arm."""
    batch_size: int | None = Field(default=None, ge=1)
    """``train.batch_size`` of every arm; None keeps each recipe's (they must agree)."""
    grad_accum: int | None = Field(default=None, ge=1)
    """``train.grad_accum`` of every arm; None keeps each recipe's (they must agree)."""


class ArmSpec(Section):
    recipe: str
    """A config file of the configs folder, without ``.yaml``."""
    control: Literal["none", "shuffled", "random_matched"] = "none"
    """``weighting.control`` (docs/METHOD.md §6)."""
    overrides: list[str] = Field(default_factory=list)
    """More ``key=value`` overrides of this arm's runs."""


class DatasetEvaluation(Section):
    """How one dataset is evaluated: ``samples`` completions per problem, greedy (temperature
    0, one sample) or sampled (docs/EVALUATION.md §6)."""

    samples: int = Field(default=1, ge=1)
    """Completions per problem: a problem's estimated pass rate is the fraction that pass;
    pass@k is reported for every k of 1, 5, 10, 20 up to ``samples``."""
    temperature: float = Field(default=0.0, ge=0)
    """0: greedy decoding, which gives one completion, so ``samples`` must be 1."""
    top_p: float = Field(default=0.95, gt=0, le=1)
    """Nucleus sampling; unused when greedy."""
    max_new_tokens: int = Field(default=512, ge=1)
    speculative: bool = False
    """Self-speculative decoding (greedy: the same tokens as plain greedy; sampled: the same
    distribution), one prompt at a time: the latency setting; an evaluation of many prompts
    is faster batched (docs/EVALUATION.md §1, "Decoding")."""
    batch_size: int = Field(default=8, ge=1)
    """Prompts decoded together when not speculative. Greedy tokens do not depend on it (up
    to floating-point rounding); sampled completions are seeded per batch, so a sampled
    evaluation records it and counts as done only with the same size."""

    @model_validator(mode="after")
    def _greedy_is_one_sample(self) -> DatasetEvaluation:
        if self.temperature == 0 and self.samples != 1:
            raise ValueError(
                f"temperature 0 (greedy) gives one completion, so samples must be 1, got "
                f"{self.samples}; set a temperature above 0 to sample"
            )
        return self


class EvaluationSpec(Section):
    """The datasets every arm run is evaluated on, each with its own settings, and what they
    share. The older one-dataset shape (``dataset``, ``max_new_tokens``, ``speculative``) is
    read as that dataset, greedy, one sample per problem."""

    datasets: dict[str, DatasetEvaluation] = Field(
        default_factory=lambda: {"codecontests": DatasetEvaluation()}, min_length=1
    )
    max_tasks: int | None = Field(default=None, ge=1)
    """The first N problems of each dataset; None: all."""
    workers: int = Field(default=2, ge=1)
    """Sandbox processes at once."""
    device: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _one_dataset_shape(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "dataset" not in data:
            for key in ("max_new_tokens", "speculative"):
                if key in data:
                    raise ValueError(f"{key} is set per dataset: evaluation.datasets.<name>.{key}")
            return data
        if "datasets" in data:
            raise ValueError("give datasets (per dataset settings) or dataset, not both")
        data = dict(data)
        entry = {"samples": 1, "temperature": 0.0,
                 "max_new_tokens": data.pop("max_new_tokens", LEGACY_MAX_NEW_TOKENS)}  # fmt: skip
        if "speculative" in data:
            entry["speculative"] = data.pop("speculative")
        data["datasets"] = {data.pop("dataset"): entry}
        return data

    @field_validator("datasets")
    @classmethod
    def _known(cls, value: dict[str, DatasetEvaluation]) -> dict[str, DatasetEvaluation]:
        for name in value:
            if name not in EVAL_DATASETS:
                raise ValueError(
                    f"unknown dataset {name!r}; choose from {', '.join(EVAL_DATASETS)}"
                )
        return value

    def expected(self, dataset: str) -> dict[str, Any]:
        """The settings ``summary.json`` of ``dataset``'s evaluation must record to count as
        this evaluation (sampling settings only when sampled)."""
        d = self.datasets[dataset]
        out: dict[str, Any] = {"num_samples": d.samples, "temperature": d.temperature,
                               "max_tasks": self.max_tasks, "max_new_tokens": d.max_new_tokens,
                               "speculative": d.speculative}  # fmt: skip
        if d.temperature > 0:
            from weighted_mtp.evaluation.harness import generation_batch

            out.update(
                top_p=d.top_p,
                seed=EVAL_SEED,
                batch_size=generation_batch(d.speculative, d.batch_size),
            )
        return out


class StudySpec(Section):
    name: str = Field(pattern=NAME_PATTERN)
    """Names the runs (``study-<name>-...``) and the report folder."""
    configs: str = "../local"
    """The recipes' config folder, relative to the spec file (``--configs`` overrides it)."""
    seeds: list[int] = Field(min_length=1)
    baseline: str = "baseline"
    """The arm every other arm is compared with."""
    helpers: Literal["once", "per_seed"] = "once"
    """Train each helper (critic, tuned reference) once, with the first seed, or once per seed."""
    budget: BudgetSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    arms: dict[str, ArmSpec] = Field(min_length=2)
    overrides: list[str] = Field(default_factory=list)
    """``key=value`` overrides of every run, helpers included (``train.device=cuda``)."""
    run_name: str = "study-{study}-{arm}-seed{seed}"
    """Each run's folder name under ``checkpoints/<experiment>/``: ``{study}`` the spec's name,
    ``{arm}`` the arm (a helper's: its config file), ``{seed}`` the seed. Two runs of a plan may not
    share a folder (the quickstart's spec uses ``quickstart``: one seed, one arm per
    experiment)."""
    contrasts: list[tuple[str, str]] | None = None
    """The comparisons, each ``[arm, reference]``; None: every arm against the baseline and
    every arm without a control against its ``shuffled`` control (docs/EVALUATION.md §5)."""
    cluster: Literal["problem", "family"] = "problem"
    """The unit of the paired test: each problem, or each task family of the known-answer
    problems (``synthetic_<split>_<index>_<family>``; held-out problems share one wording)."""

    @field_validator("run_name")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            example = value.format(study="s", arm="a", seed=0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{value!r}: only {{study}}, {{arm}} and {{seed}} ({err})") from None
        if not re.match(NAME_PATTERN, example):
            raise ValueError(f"{value!r}: letters, digits, '_', '.' or '-' only")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: repeated seed in {self.seeds}")
        if self.baseline not in self.arms:
            raise ValueError(f"baseline: {self.baseline!r} is not an arm ({', '.join(self.arms)})")
        bad = [a for a in self.arms if not re.match(NAME_PATTERN, a)]
        if bad:
            raise ValueError(f"arms: name {bad[0]!r} must be letters, digits, '_', '.' or '-'")
        seen: set[frozenset[str]] = set()
        for arm, reference in self.contrasts or []:
            for name in (arm, reference):
                if name not in self.arms:
                    raise ValueError(f"contrasts: {name!r} is not an arm ({', '.join(self.arms)})")
            if arm == reference:
                raise ValueError(f"contrasts: {arm!r} against itself")
            if frozenset((arm, reference)) in seen:
                raise ValueError(f"contrasts: {arm!r} and {reference!r} compared twice")
            seen.add(frozenset((arm, reference)))
        return self

    def contrast_pairs(self) -> list[tuple[str, str]]:
        """The declared contrasts, or the default ones."""
        from weighted_mtp.evaluation.compare import default_contrasts

        if self.contrasts is not None:
            return list(self.contrasts)
        arms = {name: (a.recipe, a.control) for name, a in self.arms.items()}
        return default_contrasts(arms, self.baseline)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """The study spec of ``path`` with ``key=value`` overrides; bad input is one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study spec not found")
    return load_validated(StudySpec, path, overrides)


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the study (an arm at a seed, or a helper) and where it lands."""

    arm: str
    """The arm, or the config file that trains a helper (``critic``, ``ref_tuning``)."""
    seed: int
    config_file: Path
    overrides: tuple[str, ...]
    run_dir: Path
    evaluate: bool
    """Arms are evaluated; helpers are not."""
    datasets: tuple[str, ...] = ()
    """The datasets an arm's run is evaluated on (none for a helper)."""
    needs: Path | None = None
    """The run folder of the frozen helper this run reads, if any."""

    @property
    def label(self) -> str:
        return f"{self.arm} seed {self.seed}"

    @property
    def final(self) -> Path:
        return self.run_dir / "final"

    def eval_dir(self, dataset: str) -> Path:
        """``final/eval/<dataset>``: where the evaluation on ``dataset`` is written."""
        return self.final / "eval" / dataset


@dataclass
class RunStatus:
    run: PlannedRun
    state: Literal["done", "evaluate", "resume", "train"]
    """done: nothing to do; evaluate: trained, some dataset not (or not as planned) evaluated;
    resume: step checkpoints of an unfinished training; train: nothing yet."""


@dataclass
class StudyResult:
    summary: dict[str, Any]
    page: Path | None
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Study:
    """One study over one storage root: ``plan()``, ``statuses()``, ``run()``."""

    def __init__(
        self,
        spec: StudySpec,
        spec_path: Path,
        layout: StorageLayout,
        configs: Path | None = None,
        console: Console | None = None,
        tracking: bool = True,
        unsafe: bool = False,
        spec_overrides: list[str] | None = None,
    ):
        self.spec = spec
        self.spec_overrides = list(spec_overrides or [])
        """The ``key=value`` overrides the spec was loaded with (a SLURM job reloads it so)."""
        self.spec_path = Path(spec_path)
        self.layout = layout
        self.configs = configs if configs is not None else self.spec_path.parent / spec.configs
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.mlflow_uri = layout.mlflow_uri() if tracking else None
        self.unsafe = unsafe
        self._configs: dict[PlannedRun, Config] = {}

    # ---- where things go ----

    def run_name(self, arm: str, seed: int) -> str:
        return self.spec.run_name.format(study=self.spec.name, arm=arm, seed=seed)

    @property
    def report_dir(self) -> Path:
        return self.layout.reports_dir / "study" / self.spec.name

    def _config_file(self, recipe: str, key: str) -> Path:
        path = self.configs / f"{recipe}.yaml"
        if not path.is_file():
            raise ConfigError(f"{self.spec_path}: {key}: no config file {path}")
        return path

    def _load(self, path: Path, overrides: list[str], key: str) -> Config:
        try:
            return load_config(path, overrides)
        except ConfigError as err:
            raise ConfigError(f"{self.spec_path}: {key}: {err}") from None

    # ---- the plan ----

    def plan(self) -> list[PlannedRun]:
        """Helpers first (each before the arms that read it), then the arms seed by seed."""
        spec, runs = self.spec, []
        common = list(spec.overrides)
        tracking = [f"log.mlflow={self.mlflow_uri is not None}", "checkpoint.resume=true"]
        helper_runs: dict[tuple[str, int], PlannedRun] = {}
        helper_seeds = spec.seeds[:1] if spec.helpers == "once" else spec.seeds
        recipes = {arm: self._load(self._config_file(a.recipe, f"arms.{arm}.recipe"), [],
                                   f"arms.{arm}") for arm, a in spec.arms.items()}  # fmt: skip
        helpers = {arm: registry.helper_for(c.train.recipe, c.weighting.name)
                   for arm, c in recipes.items()}  # fmt: skip
        needed = sorted({h[1] for h in helpers.values() if h is not None})
        for helper in needed:
            path = self._config_file(helper, f"helper {helper}")
            for seed in helper_seeds:
                name = self.run_name(helper, seed)
                overrides = [*common, f"run_name={name}", f"train.seed={seed}", *tracking]
                config = self._load(path, overrides, f"helper {helper}")
                run = PlannedRun(helper, seed, path, tuple(overrides),
                                 self.layout.checkpoint(config.experiment) / name, False)  # fmt: skip
                self._configs[run] = config
                helper_runs[helper, seed] = run
                runs.append(run)
        budget = [f"train.max_steps={spec.budget.steps}"]
        if spec.budget.batch_size is not None:
            budget.append(f"train.batch_size={spec.budget.batch_size}")
        if spec.budget.grad_accum is not None:
            budget.append(f"train.grad_accum={spec.budget.grad_accum}")
        for seed in spec.seeds:
            for arm, arm_spec in spec.arms.items():
                path = self._config_file(arm_spec.recipe, f"arms.{arm}.recipe")
                name = self.run_name(arm, seed)
                overrides = [*common, *arm_spec.overrides, f"run_name={name}",
                             f"train.seed={seed}", *budget,
                             f"weighting.control={arm_spec.control}", *tracking]  # fmt: skip
                if helpers[arm] is not None:
                    key, helper = helpers[arm]
                    upstream = helper_runs[helper, seed if spec.helpers == "per_seed" else
                                           helper_seeds[0]]  # fmt: skip
                    relative = upstream.final.relative_to(self.layout.root)
                    overrides.append(f"{key}={relative.as_posix()}")
                    needs = upstream.run_dir
                else:
                    needs = None
                config = self._load(path, overrides, f"arms.{arm}")
                run_dir = self.layout.checkpoint(config.experiment) / name
                run = PlannedRun(arm, seed, path, tuple(overrides), run_dir, True,
                                 tuple(spec.evaluation.datasets), needs)  # fmt: skip
                self._configs[run] = config
                runs.append(run)
        folders: dict[Path, PlannedRun] = {}
        for run in runs:
            if run.run_dir in folders:
                raise ConfigError(
                    f"{self.spec_path}: run_name {spec.run_name!r} gives "
                    f"{folders[run.run_dir].label} and {run.label} one folder {run.run_dir}"
                )
            folders[run.run_dir] = run
        self._check_same_budget([r for r in runs if r.evaluate])
        return runs

    def _check_same_budget(self, arm_runs: list[PlannedRun]) -> None:
        """Every compared arm trains on the same data, the same examples per step, the same
        steps (docs/EVALUATION.md §6)."""
        first = arm_runs[0]
        ref = self._configs[first]
        for run in arm_runs[1:]:
            config = self._configs[run]
            data = config_differences(ref.data.model_dump(mode="json"),
                                      config.data.model_dump(mode="json"))  # fmt: skip
            if data:
                raise ConfigError(
                    f"{self.spec_path}: arms {first.arm} and {run.arm} train on different data "
                    f"(data.{data[0]} differs); a study compares arms on one data set"
                )
            per_step = (config.train.batch_size * config.train.grad_accum,
                        ref.train.batch_size * ref.train.grad_accum)  # fmt: skip
            if per_step[0] != per_step[1]:
                raise ConfigError(
                    f"{self.spec_path}: arms {first.arm} and {run.arm} differ in examples per "
                    f"step ({per_step[1]} vs {per_step[0]}); set budget.batch_size and "
                    "budget.grad_accum"
                )

    def pending_datasets(self, run: PlannedRun) -> list[str]:
        """The datasets of ``run`` not (or not as planned) evaluated yet."""
        from weighted_mtp.evaluation.harness import evaluated

        e = self.spec.evaluation
        return [d for d in run.datasets if not evaluated(run.eval_dir(d), e.expected(d))]

    def status(self, run: PlannedRun) -> RunStatus:
        """Where a planned run stands; a run folder trained with other settings is an error
        (never overwritten)."""
        from weighted_mtp.train.checkpoint import finished, latest

        written = run.run_dir / "config.yaml"
        if written.is_file():
            found = yaml.safe_load(written.read_text(encoding="utf-8")) or {}
            differ = config_differences(config_to_dict(self._configs[run]), found)
            if differ:
                raise UserError(
                    f"{run.run_dir}: trained with other settings than the study plans "
                    f"({differ[0]} differs); remove the folder or rename the study"
                )
        if finished(run.run_dir):
            if not run.evaluate or not self.pending_datasets(run):
                return RunStatus(run, "done")
            return RunStatus(run, "evaluate")
        return RunStatus(run, "resume" if latest(run.run_dir) is not None else "train")

    # ---- running ----

    def run(
        self,
        only: str | None = None,
        dry_run: bool = False,
        executor: Literal["local", "slurm"] = "local",
        jobs: JobOptions | None = None,
        wait: bool = False,
        poll_s: float = 30.0,
    ) -> StudyResult:
        """Train and evaluate what is not finished, here one run after another (``local``),
        or as SLURM jobs with dependencies (``slurm``: ``run_slurm``); the report once every
        run is finished."""
        spec = self.spec
        if only is not None and only not in spec.arms:
            raise UserError(f"--only {only!r}: not an arm of {self.spec_path} "
                            f"({', '.join(spec.arms)})")  # fmt: skip
        plan = self.plan()
        selected = self._selected(plan, only)
        statuses = [self.status(r) for r in selected]
        todo = [s for s in statuses if s.state != "done"]
        self.console.print(
            f"[bold]wmtp study {spec.name}[/bold]: {len(spec.arms)} arms x {len(spec.seeds)} "
            f"seeds, {spec.budget.steps} steps each, recipes from {self.configs}, evaluated on "
            f"{', '.join(spec.evaluation.datasets)}; "
            f"{len(statuses) - len(todo)} of {len(statuses)} runs finished"
        )
        if dry_run:
            for number, s in enumerate(statuses, start=1):
                self.console.print(f"  [{number}/{len(statuses)}] {s.run.label}: {s.state} "
                                   f"-> {s.run.run_dir}", markup=False)  # fmt: skip
            return StudyResult({}, None)
        if executor == "slurm":
            return self.run_slurm(plan, selected, jobs or JobOptions(), wait, poll_s)
        if any(s.run.evaluate for s in todo):
            self._require_sandbox()
        ran, skipped = [], []
        started, spent = time.perf_counter(), []
        for number, s in enumerate(statuses, start=1):
            head = f"[{number}/{len(statuses)}] [bold]{s.run.label}[/bold]"
            if s.state == "done":
                self.console.print(f"{head} [dim](done already, skipped)[/dim]")
                skipped.append(s.run.label)
                continue
            left = len([x for x in statuses[number - 1 :] if x.state != "done"])
            eta = f", about {sum(spent) / len(spent) * left / 60:.0f} min left" if spent else ""
            self.console.print(f"{head}: {s.state}{eta}")
            t0 = time.perf_counter()
            if s.state in ("train", "resume"):
                self.train_run(s.run)
            if s.run.evaluate:
                self.evaluate_run(s.run)
            if self.status(s.run).state != "done":
                raise UserError(f"study run {s.run.label} ran but its outputs are missing")
            spent.append(time.perf_counter() - t0)
            self.console.print(f"  [green]done[/green] in {spent[-1]:.1f} s")
            ran.append(s.run.label)
        return self.finish(plan, started, ran, skipped)

    def finish(
        self, plan: list[PlannedRun], started: float, ran: list[str], skipped: list[str]
    ) -> StudyResult:
        """Pool what is finished, write the report, print the summary."""
        summary = self.summarize(plan)
        summary["seconds_this_invocation"] = round(time.perf_counter() - started, 1)
        page = self.write(summary, log=bool(ran))
        self.print_summary(summary, page)
        return StudyResult(summary, page, ran, skipped)

    # ---- the SLURM executor (docs/SCALING.md §9) ----

    @property
    def jobs_file(self) -> Path:
        """The study's SLURM jobs by run folder name: ``{"train": id, "evaluate": id}``."""
        return self.report_dir / "slurm" / "jobs.json"

    def run_slurm(
        self,
        plan: list[PlannedRun],
        selected: list[PlannedRun],
        options: JobOptions,
        wait: bool,
        poll_s: float,
    ) -> StudyResult:
        """One pass over the runs: submit what has no job yet, resubmit what failed (naming
        its log), show the rest; with ``wait``, then poll until every run is finished (a
        failure ends the wait). The report is written once every run is finished."""
        options.check()
        started = time.perf_counter()
        # The sandbox is checked by each evaluation job on its node, not on this login node.
        counts = self._slurm_pass(selected, options, resubmit=True, verbose=True)
        while wait and counts["done"] < len(selected):
            time.sleep(poll_s)
            latest = self._slurm_pass(selected, options, resubmit=False, verbose=False)
            if latest != counts:
                self.console.print(f"  {time.strftime('%H:%M:%S')} {_progress(latest)}")
            counts = latest
        if counts["done"] < len(selected):
            self.console.print(
                f"{_progress(counts)}. The study's state is on disk ({self.jobs_file}): run "
                "the same command again to see progress and resubmit failures; the report is "
                "written when every run is finished."
            )
            return StudyResult({}, None)
        return self.finish(plan, started, [], [r.label for r in selected])

    def _slurm_pass(
        self, runs: list[PlannedRun], options: JobOptions, resubmit: bool, verbose: bool
    ) -> dict[str, int]:
        """Compare each run's outputs and its recorded jobs with SLURM's queue; submit and
        resubmit what needs it (the queue is read before the outputs, so a job that ends in
        between is seen finished, not failed)."""
        from weighted_mtp import slurm

        queue = slurm.queued()
        jobs = read_json_or_none(self.jobs_file) or {}
        counts = {"done": 0, "running": 0, "queued": 0, "submitted": 0}
        live: dict[Path, str] = {}
        """Helper run folder -> its training job still in the queue (a dependency)."""
        for number, run in enumerate(runs, start=1):
            state = self.status(run).state
            record = jobs.setdefault(run.run_dir.name, {})
            head = f"[{number}/{len(runs)}] {run.label}"
            stage = "train" if state in ("train", "resume") else "evaluate"
            job = record.get(stage)
            if state == "done":
                counts["done"] += 1
                if verbose:
                    self.console.print(f"{head}: done", markup=False)
                continue
            if job in queue:
                what = queue[job].lower()
                counts["running" if what in ("running", "completing") else "queued"] += 1
                if stage == "train":
                    live[run.run_dir] = job
                    if run.evaluate and record.get("evaluate") not in queue:
                        record["evaluate"] = self._submit_evaluation(run, options, [job])
                if verbose:
                    self.console.print(f"{head}: {stage} {what} (job {job})", markup=False)
                continue
            note = ""
            if job is not None:
                log = self._job_log(run, stage, job)
                if not resubmit:
                    self._save_jobs(jobs)
                    raise UserError(
                        f"study run {run.label}: {stage} job {job} ended without its outputs; "
                        f"log {log}; run the command again to resubmit"
                    )
                note = f" (job {job} failed, log {log})"
            if stage == "train":
                after = [live[run.needs]] if run.needs in live else []
                record["train"] = job = self._submit_training(run, options, after)
                live[run.run_dir] = job
                if run.evaluate:
                    record["evaluate"] = self._submit_evaluation(run, options, [job])
            else:
                record["evaluate"] = job = self._submit_evaluation(run, options, [])
            self._save_jobs(jobs)
            counts["submitted"] += 1
            verb = "resubmitted" if note else "submitted"
            self.console.print(f"{head}: {stage} {verb} as job {job}{note}", markup=False)
        self._save_jobs(jobs)
        if verbose:
            self.console.print(_progress(counts))
        return counts

    def _save_jobs(self, jobs: dict[str, Any]) -> None:
        write_json_atomic(self.jobs_file, jobs)

    def _job_log(self, run: PlannedRun, stage: str, job: str) -> Path:
        logs = run.run_dir / "slurm"
        return logs / (f"{job}.err" if stage == "train" else f"{stage}-{job}.err")

    def _submit_training(self, run: PlannedRun, options: JobOptions, after: list[str]) -> str:
        from weighted_mtp import slurm

        config = self._configs[run]
        root = self.layout.root.resolve()
        script = slurm.render(
            options, run.run_dir.resolve(), run.config_file.resolve(), root,
            [*run.overrides, "checkpoint.resume=auto"], config.experiment, run.run_dir.name,
        )  # fmt: skip
        return slurm.submit(run.run_dir / "slurm" / slurm.SCRIPT_NAME, script, after)

    def _submit_evaluation(self, run: PlannedRun, options: JobOptions, after: list[str]) -> str:
        from weighted_mtp import slurm

        command = [sys.executable, "-m", "weighted_mtp", "study", str(self.spec_path.resolve()),
                   *self.spec_overrides, "--configs", str(self.configs.resolve()),
                   "--storage", str(self.layout.root.resolve()),
                   "--execute", f"evaluate:{run.run_dir.name}"]  # fmt: skip
        if self.mlflow_uri is None:
            command.append("--no-mlflow")
        if self.unsafe:
            command.append("--unsafe")
        logs = run.run_dir.resolve() / "slurm"
        script = slurm.command_script(options, logs, "evaluate", command)
        return slurm.submit(logs / "evaluate.sbatch", script, after)

    def execute(self, step: str) -> None:
        """One step of one run, as a SLURM job runs it: ``evaluate:<run folder name>``."""
        stage, _, name = step.partition(":")
        runs = {r.run_dir.name: r for r in self.plan()}
        if stage != "evaluate" or name not in runs or not runs[name].evaluate:
            raise UserError(f"--execute {step!r}: give evaluate:<run> for an arm's run of "
                            f"{self.spec_path}")  # fmt: skip
        run = runs[name]
        if self.status(run).state != "evaluate":
            raise UserError(f"--execute {step!r}: the run is {self.status(run).state}, "
                            "not waiting for its evaluation")  # fmt: skip
        self._require_sandbox()
        self.evaluate_run(run)
        if self.status(run).state != "done":
            raise UserError(f"study run {run.label} was evaluated but its outputs are missing")

    def _selected(self, plan: list[PlannedRun], only: str | None) -> list[PlannedRun]:
        if only is None:
            return plan
        arm_runs = [r for r in plan if r.evaluate and r.arm == only]
        config = self._configs[arm_runs[0]]
        helper = (registry.helper_for(config.train.recipe, config.weighting.name)
                  or (None, None))[1]  # fmt: skip
        return [r for r in plan if (not r.evaluate and r.arm == helper) or r in arm_runs]

    def _require_sandbox(self) -> None:
        from weighted_mtp.evaluation.sandbox import IsolationError, require_isolation

        try:
            report = require_isolation(unsafe=self.unsafe, workers=self.spec.evaluation.workers)
        except IsolationError as err:
            raise UserError(str(err)) from None
        self.console.print(report["summary"], markup=False)

    def config_of(self, run: PlannedRun) -> Config:
        """The config ``run`` trains with (after ``plan()``)."""
        return self._configs[run]

    def train_run(self, run: PlannedRun) -> None:
        from weighted_mtp.train.loop import train

        train(self._configs[run], self.layout)

    def evaluate_run(self, run: PlannedRun) -> None:
        """Evaluate ``run`` on every dataset it lacks (or has with other settings)."""
        from weighted_mtp.evaluation.harness import evaluate

        e = self.spec.evaluation
        for dataset in self.pending_datasets(run):
            d = e.datasets[dataset]
            summary = evaluate(
                self.layout, str(run.final), dataset, run.eval_dir(dataset),
                num_samples=d.samples, temperature=d.temperature, top_p=d.top_p, seed=EVAL_SEED,
                max_tasks=e.max_tasks, max_new_tokens=d.max_new_tokens,
                speculative=d.speculative, workers=e.workers, device=e.device,
                mlflow_uri=self.mlflow_uri, batch_size=d.batch_size,
            )  # fmt: skip
            if summary is not None and "pass_at_k" in summary:
                scores = ", ".join(f"{k} {v['mean']:.3f}" for k, v in summary["pass_at_k"].items())
                decoding = summary.get("decoding") or {}
                speed = (f"; {decoding['tokens_per_step']:.2f} tokens/step, "
                         f"{decoding['tokens_per_s']:.0f} tokens/s"
                         if "tokens_per_step" in decoding and "tokens_per_s" in decoding
                         else "")  # fmt: skip
                self.console.print(
                    f"  {dataset}: {scores} on {summary['problems']} problems{speed}"
                )

    # ---- pooling ----

    def summarize(self, plan: list[PlannedRun]) -> dict[str, Any]:
        """Read every finished arm run's per-problem results and pool them per dataset
        (``pool``); Holm's adjustment runs over the contrasts of every dataset together."""
        from weighted_mtp.evaluation.compare import Comparison, holm_adjust
        from weighted_mtp.train.checkpoint import read_info

        datasets = self.spec.evaluation.datasets
        results: dict[str, dict[str, dict[int, dict[str, Counts]]]] = {d: {} for d in datasets}
        runs, missing = [], []
        for run in plan:
            if not run.evaluate:
                continue
            state = self.status(run).state
            row = {"arm": run.arm, "seed": run.seed, "run_dir": str(run.run_dir),
                   "state": state}  # fmt: skip
            if state == "done":
                for dataset in run.datasets:
                    per_arm = results[dataset].setdefault(run.arm, {})
                    per_arm[run.seed] = read_results(run.eval_dir(dataset))
                row["steps"] = read_info(run.final).get("step")
                row["train_manifest_sha256"] = _digest(run.run_dir / "manifest_train.json")
            else:
                missing.append(run.label)
            runs.append(row)
        arms = {a: s.model_dump() for a, s in self.spec.arms.items()}
        blocks: dict[str, dict[str, Any]] = {}
        for dataset, settings in datasets.items():
            complete = {a: r for a, r in results[dataset].items()
                        if len(r) == len(self.spec.seeds)}  # fmt: skip
            baseline = self.spec.baseline if self.spec.baseline in complete else None
            block = pool(complete, baseline, arms, self.spec.contrast_pairs(), self.spec.cluster)
            blocks[dataset] = {
                "settings": settings.model_dump(),
                "data_manifest_sha256": self._manifest_digest(dataset),
                **block,
            }
        # One family for Holm: every contrast of every dataset (docs/EVALUATION.md §5).
        raw = [(d, Comparison(**c)) for d, b in blocks.items() for c in b["comparisons"]]
        adjusted = holm_adjust([c for _, c in raw])
        comparisons = [{"dataset": d, **asdict(c)}
                       for (d, _), c in zip(raw, adjusted, strict=True)]  # fmt: skip
        for dataset, block in blocks.items():
            block["comparisons"] = [c for c in comparisons if c["dataset"] == dataset]
        summary: dict[str, Any] = {
            "name": self.spec.name,
            "spec": self.spec.model_dump(mode="json"),
            "spec_file": str(self.spec_path),
            "configs": str(self.configs),
            "pooling": POOLING_RULE,
            "runs": runs,
            "missing": missing,
            # The budget, as trained: every finished arm run took the same steps over the same
            # sampled examples (the same training manifest).
            "same_steps": len({r.get("steps") for r in runs if "steps" in r}) <= 1,
            "same_training_examples": len(
                {r.get("train_manifest_sha256") for r in runs if "steps" in r}
            )
            <= 1,
            "baseline": self.spec.baseline,
            "cluster": self.spec.cluster,
            "problems": sum(b["problems"] for b in blocks.values()),
            # Per arm: its recipe and control and its pass@1 on each dataset it finished.
            "arms": {
                arm: {
                    **arms[arm],
                    "pass_at_1": {
                        d: b["arms"][arm]["pass_at_1"]
                        for d, b in blocks.items()
                        if arm in b["arms"]
                    },
                }
                for arm in arms
                if any(arm in b["arms"] for b in blocks.values())
            },
            "datasets": blocks,
            "comparisons": comparisons,
            "holm_family": len(comparisons),
            # the same on every dataset: a run is done once all its datasets are evaluated
            "contrasts_pending": list(
                dict.fromkeys(p for b in blocks.values() for p in b.get("contrasts_pending", []))
            ),
        }
        return summary

    def _manifest_digest(self, dataset: str) -> str | None:
        return _digest(self.layout.dataset(dataset.removesuffix("_small")).manifest)

    # ---- outputs ----

    def write(self, summary: dict[str, Any], log: bool) -> Path:
        """``study.json`` and ``index.html`` in the report folder; the MLflow summary when
        tracking and something ran (or none was logged yet)."""
        from weighted_mtp.report.study_page import study_page

        out = self.report_dir
        write_json_atomic(out / "study.json", summary)
        page = out / "index.html"
        write_text_atomic(page, study_page(summary))
        if self.mlflow_uri is not None and summary.get("arms"):
            from weighted_mtp.train.tracking import RUN_RECORD

            if log or not (out / RUN_RECORD).is_file():
                log_study(summary, self.mlflow_uri, out, page)
        return page

    def print_summary(self, summary: dict[str, Any], page: Path) -> None:
        from weighted_mtp.report.study_page import INTERVAL_RULE, settings_text

        for dataset, block in summary.get("datasets", {}).items():
            if not block.get("arms"):
                continue
            ks = [k for k in next(iter(block["arms"].values()))["pass_at_k"] if k != "pass@1"]
            self.console.print(
                f"[bold]study {summary['name']} on {dataset}[/bold]: "
                f"{settings_text(block['settings'])}, {block['problems']} problems"
            )
            table = Table()
            for column in ("arm", "pass@1 [95%]", *ks, "per seed"):
                table.add_column(column)
            for arm, row in block["arms"].items():
                per_seed = ", ".join(f"{s}: {v:.3f}" for s, v in row["per_seed"].items())
                table.add_row(
                    arm, f"{row['pass_at_1']:.3f} [{row['low']:.3f}, {row['high']:.3f}]",
                    *(f"{row['pass_at_k'][k]:.3f}" for k in ks), per_seed,
                )  # fmt: skip
            self.console.print(table)
            self.console.print(f"  {INTERVAL_RULE}", markup=False)
        comparisons = summary.get("comparisons", [])
        if comparisons:
            unit = "family" if summary.get("cluster") == "family" else "problem"
            contrasts = Table(
                title=f"contrasts: paired per {unit}, Holm-adjusted over all {len(comparisons)} "
                "(contrasts x datasets)"
            )
            units = "families" if unit == "family" else "problems"
            for column in ("dataset", "arm - reference", "difference [95%]", f"{units} +/-",
                           "p", "Holm p", "test", "verdict"):  # fmt: skip
                contrasts.add_column(column)
            for c in comparisons:
                contrasts.add_row(
                    c["dataset"], f"{c['arm']} - {c['baseline']}",
                    f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]",
                    f"{c['arm_better']}/{c['baseline_better']}", f"{c['p_value']:.3g}",
                    f"{c['p_adjusted']:.3g}", c["test"], c["statement"],
                )  # fmt: skip
            self.console.print(contrasts)
        if summary.get("contrasts_pending"):
            pending = ", ".join(summary["contrasts_pending"])
            self.console.print(f"[yellow]contrasts waiting for runs: {pending}[/yellow]")
        if not (summary["same_steps"] and summary["same_training_examples"]):
            self.console.print(
                "[yellow]the arms did not all train the same steps over the same examples "
                "(see the runs in study.json)[/yellow]"
            )
        if summary["missing"]:
            self.console.print(f"[yellow]not finished: {', '.join(summary['missing'])}[/yellow]")
        self.console.print(f"Report: {page}", markup=False)


def _progress(counts: dict[str, int]) -> str:
    total = counts["done"] + counts["running"] + counts["queued"] + counts["submitted"]
    return (f"{counts['done']} of {total} runs finished, {counts['running']} running, "
            f"{counts['queued'] + counts['submitted']} queued")  # fmt: skip


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def read_results(eval_dir: Path) -> dict[str, Counts]:
    """Per problem, ``(n, c)``: its samples and how many passed, from ``results.jsonl``."""
    from weighted_mtp.data.jsonl import iter_jsonl

    out: dict[str, Counts] = {}
    for row in iter_jsonl(eval_dir / "results.jsonl"):
        n, c = out.get(row["task_id"], (0, 0))
        out[row["task_id"]] = (n + 1, c + bool(row["passed"]))
    return out


def clusters_of(tasks: list[str], rule: str) -> dict[str, str] | None:
    """Each problem's cluster under ``rule``: None for "problem" (every problem its own),
    the family of a known-answer problem's name for "family"; any other name is an error."""
    if rule == "problem":
        return None
    out = {}
    for task in tasks:
        match = FAMILY_ID.match(task)
        if match is None:
            raise UserError(
                f"cluster: family needs known-answer problem names "
                f"(synthetic_<split>_<index>_<family>), got {task!r}; use cluster: problem"
            )
        out[task] = match["family"]
    return out


def _counts(value: bool | Counts) -> Counts:
    """A run's result for one problem as ``(n, c)``; a bool is one sample's pass/fail."""
    if isinstance(value, bool):
        return 1, int(value)
    n, c = value
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"a problem's result needs n >= 1 and 0 <= c <= n, got {value}")
    return int(n), int(c)


def rate_interval(values: list[float]) -> tuple[float, float, str]:
    """(low, high, method): the 95% interval of the mean of per-problem values in [0, 1]:
    Wilson's score interval when every value is 0 or 1 (a binomial count), else the
    percentile bootstrap over problems (docs/EVALUATION.md §5)."""
    from weighted_mtp.evaluation.compare import bootstrap_interval, wilson_interval

    if all(v in (0.0, 1.0) for v in values):
        low, high = wilson_interval(sum(values), len(values))
        return low, high, "wilson"
    _, low, high = bootstrap_interval(values)
    return low, high, "bootstrap"


def pool(
    results: dict[str, dict[int, dict[str, bool | Counts]]],
    baseline: str | None,
    arms: dict[str, Any] | None = None,
    contrasts: list[tuple[str, str]] | None = None,
    cluster: str = "problem",
) -> dict[str, Any]:
    """Pool one dataset's ``results[arm][seed][task_id]`` (``(n, c)``: samples and passes; a
    bool for one greedy sample) over seeds and run the contrasts (docs/EVALUATION.md §5-§6).

    Only the problems scored in every run count. A problem's value in a run is its estimated
    pass rate c / n; in an arm, the mean of those over seeds. The arm's pass@1 is the mean of
    the problems' values with its 95% interval over problems (``rate_interval``), its pass@k
    the unbiased estimator of each run and problem averaged the same way, for the k of
    ``default_ks`` of the fewest samples. ``contrasts`` (default: every arm against
    ``baseline``) whose two arms both finished are compared with ``compare_arms`` on the
    per-seed pass rates, per ``cluster`` ("problem" or "family"), Holm-adjusted over the
    contrasts compared (a study adjusts again over every dataset's)."""
    from weighted_mtp.evaluation.compare import compare_arms
    from weighted_mtp.evaluation.metrics import default_ks, pass_at_k

    empty: dict[str, Any] = {"problems": 0, "arms": {}, "comparisons": [],
                             "contrasts_pending": []}  # fmt: skip
    if not results:
        return empty
    shared = set.intersection(*(set(r) for seeds in results.values() for r in seeds.values()))
    tasks = sorted(shared)
    if not tasks:
        return empty
    counts = {arm: {s: {t: _counts(seeds[s][t]) for t in tasks} for s in sorted(seeds)}
              for arm, seeds in results.items()}  # fmt: skip
    fewest = min(n for seeds in counts.values() for by in seeds.values() for n, _ in by.values())
    ks = default_ks(fewest)
    # Per arm and problem, one value per seed: the pass rate (a bool for one sample, so that
    # compare_arms can name McNemar's test where it applies).
    pooled = {
        arm: {t: [bool(c) if n == 1 else c / n for n, c in (seeds[s][t] for s in seeds)]
              for t in tasks}
        for arm, seeds in counts.items()
    }  # fmt: skip
    groups = clusters_of(tasks, cluster)
    out: dict[str, Any] = {
        "problems": len(tasks),
        "samples": fewest,
        "cluster": cluster,
        "clusters": len(set(groups.values())) if groups else len(tasks),
        "arms": {},
        "comparisons": [],
    }
    for arm, per_task in pooled.items():
        values = [sum(map(float, v)) / len(v) for v in per_task.values()]
        low, high, method = rate_interval(values)
        seeds = counts[arm]
        per_seed = {s: [c / n for n, c in by.values()] for s, by in seeds.items()}
        seed_intervals = {s: rate_interval(v) for s, v in per_seed.items()}
        at_k = {
            f"pass@{k}": sum(pass_at_k(n, c, k) for by in seeds.values() for n, c in by.values())
            / (len(seeds) * len(tasks))
            for k in ks
        }
        out["arms"][arm] = {
            **((arms or {}).get(arm) or {}),
            "seeds": sorted(seeds),
            "pass_at_1": sum(values) / len(values), "low": low, "high": high,
            "interval": method,
            "pass_at_k": at_k,
            "per_seed": {str(s): sum(v) / len(v) for s, v in per_seed.items()},
            "per_seed_interval": {str(s): [lo, hi] for s, (lo, hi, _) in seed_intervals.items()},
            "passed_any_seed": sum(any(c for _, c in (by[t] for by in seeds.values()))
                                   for t in tasks),
        }  # fmt: skip
    if baseline is not None:
        out["baseline"] = baseline
    if contrasts is None:
        contrasts = [(a, baseline) for a in pooled if a != baseline] if baseline else []
    ready = [(a, r) for a, r in contrasts if a in pooled and r in pooled]
    out["contrasts_pending"] = [f"{a} - {r}" for a, r in contrasts if (a, r) not in ready]
    if ready:
        rows = compare_arms(pooled, baseline or ready[0][1], ready, groups)
        out["comparisons"] = [asdict(c) for c in rows]
    return out


def contrast_key(comparison: dict[str, Any]) -> str:
    """``<arm>-vs-<reference>``: a contrast's name in MLflow keys."""
    return f"{comparison['arm']}-vs-{comparison['baseline']}"


def log_study(summary: dict[str, Any], mlflow_uri: str, out: Path, page: Path) -> str | None:
    """One MLflow run in the ``study`` experiment: the spec as params; per dataset and arm
    pass@1 with its interval and pass@k (``pass_at_<k>/<dataset>/<arm>``); per dataset and
    contrast the difference, raw and Holm-adjusted p-values, detectable difference
    (``difference/<dataset>/<contrast>``, ...) and the verdict as the tag
    ``wmtp.verdict.<dataset>.<contrast>``."""
    from weighted_mtp.train.tracking import TAG_KIND, TAG_REPORT, log_summary_run, source_tags

    metrics: dict[str, float] = {}
    for dataset, block in summary.get("datasets", {}).items():
        for arm, row in block["arms"].items():
            metrics[f"pass_at_1/{dataset}/{arm}"] = row["pass_at_1"]
            metrics[f"pass_at_1_low/{dataset}/{arm}"] = row["low"]
            metrics[f"pass_at_1_high/{dataset}/{arm}"] = row["high"]
            for name, value in row["pass_at_k"].items():
                if name != "pass@1":
                    metrics[f"{name.replace('@', '_at_')}/{dataset}/{arm}"] = value
    tags = {TAG_KIND: "study", TAG_REPORT: str(page.resolve()), **source_tags()}
    for c in summary.get("comparisons", []):
        # against the baseline: keyed by the arm; other contrasts: "<arm>-vs-<reference>"
        key = c["arm"] if c["baseline"] == summary.get("baseline") else contrast_key(c)
        key = f"{c['dataset']}/{key}"
        metrics[f"difference/{key}"] = c["difference"]
        metrics[f"p_value/{key}"] = c["p_value"]
        metrics[f"p_adjusted/{key}"] = c["p_adjusted"]
        if c.get("detectable") is not None:
            metrics[f"detectable/{key}"] = c["detectable"]
        tags[f"wmtp.verdict.{key.replace('/', '.')}"] = c["verdict"]
    params = {**summary["spec"], "problems": summary["problems"]}
    return log_summary_run(
        mlflow_uri, STUDY_EXPERIMENT, f"study-{summary['name']}", params, tags, metrics, out
    )


def study(
    spec: str,
    storage: str | None = None,
    overrides: list[str] | None = None,
    configs: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
    tracking: bool = True,
    unsafe: bool = False,
    executor: Literal["local", "slurm"] = "local",
    jobs: JobOptions | None = None,
    wait: bool = False,
    poll_s: float = 30.0,
    execute: str | None = None,
) -> StudyResult:
    """Run (or resume) the study of spec file ``spec`` under ``storage``: here
    (``executor="local"``) or as SLURM jobs (``"slurm"``); ``execute`` runs one step of one run
    as its SLURM job does."""
    layout = StorageLayout.from_arg(storage)
    loaded = load_spec(spec, overrides)
    runner = Study(
        loaded, Path(spec), layout, Path(configs) if configs else None, tracking=tracking,
        unsafe=unsafe, spec_overrides=overrides,
    )  # fmt: skip
    if execute is not None:
        runner.execute(execute)
        return StudyResult({}, None)
    return runner.run(only=only, dry_run=dry_run, executor=executor, jobs=jobs, wait=wait,
                      poll_s=poll_s)  # fmt: skip
