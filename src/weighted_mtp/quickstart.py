"""``wmtp quickstart``: the whole pipeline on micro models, offline, on the CPU, in minutes.

Stages, in dependency order: the known-answer CodeContests source (``wmtp storage synthetic``,
under ``datasets/codecontests/raw``); the four datasets (CodeContests from that source, MBPP,
HumanEval and GSM8K from the bundled sources), without token lengths; the micro base
(``wmtp storage micro-base``: a tokenizer trained on the known-answer training text, micro-mtp
pretrained on the training split, micro-reference its head-1 path); the datasets' token lengths
measured with that tokenizer (docs/DATA.md §7); then the runs of
``configs/study/quickstart.yaml``, planned, trained and evaluated by the study's planner
(docs/EVALUATION.md §6): the critic and the tuned reference, the baseline, Verifiable Critic and
Rho-1 (``configs/quickstart``), and the evaluation of the three policies on the held-out
known-answer test problems (greedy, in one batch); plain against self-speculative greedy
decoding of the baseline, one prompt at a time; the report; and the four known-answer results
(README, "Quickstart").

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
from typing import TYPE_CHECKING, Any

from rich.console import Console

from weighted_mtp.base.io import StorageError, read_json_or_none, write_json_atomic
from weighted_mtp.base.layout import DATASET_NAMES, StorageLayout

if TYPE_CHECKING:
    from weighted_mtp.study import PlannedRun, Study

RUN_NAME = "quickstart"
POLICIES = ("baseline", "verifiable", "rho1")
"""The MTP policies evaluated and compared (critic and ref_tuning are their helpers): the arms
of ``configs/study/quickstart.yaml``, whose planner trains and evaluates them."""
EVAL_DATASET = "codecontests"
"""The held-out known-answer test problems (100: unseen wording, unseen tests)."""
# The longest known-answer solution is under 200 tokens of the micro base's tokenizer.
MAX_NEW_TOKENS = 256
SPEC = "quickstart.yaml"
"""The quickstart's study spec, in ``configs/study/`` beside the recipes' folder."""
DECODING_PROMPTS = 40
"""Prompts of the plain-vs-speculative comparison (one at a time, alternating)."""
KNOWN_ANSWER_SEED = 0
CONFIGS = "quickstart"


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


def default_spec(configs: Path) -> Path:
    """``configs/study/quickstart.yaml`` beside the recipes' folder, else of this checkout."""
    for candidate in (
        configs.parent / "study" / SPEC,
        Path(__file__).resolve().parents[2] / "configs" / "study" / SPEC,
    ):
        if candidate.is_file():
            return candidate
    raise StorageError(f"configs/study/{SPEC} not found: run from the repository root")


def default_configs() -> Path:
    """``configs/quickstart`` of this checkout (the package sits in ``src/`` beside it), else
    of the current directory."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "configs" / CONFIGS,
        Path.cwd() / "configs" / CONFIGS,
    ):
        if (candidate / "baseline.yaml").is_file():
            return candidate
    raise StorageError(
        f"configs/{CONFIGS} not found: run from the repository root or pass --configs DIR"
    )


class Quickstart:
    """The stages over one storage root; ``run()`` executes those whose outputs are missing."""

    def __init__(
        self,
        layout: StorageLayout,
        configs: Path | None = None,
        console: Console | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        unsafe: bool = False,
        tracking: bool = True,
    ):
        self.layout = layout
        self.configs = configs or default_configs()
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.max_new_tokens = max_new_tokens
        self.unsafe = unsafe
        # Like any run: the storage's MLflow store (docs/ARCHITECTURE.md, "Experiment tracking").
        self.mlflow_uri = layout.mlflow_uri() if tracking else None
        self.tracking = tracking
        self._sandbox_ok: bool | None = None
        self._study: Study | None = None
        self._plan: list[PlannedRun] | None = None

    @property
    def study(self) -> Study:
        """The study of ``configs/study/quickstart.yaml`` over this storage and recipes: the
        planner of the training and evaluation stages (docs/EVALUATION.md §6)."""
        if self._study is None:
            from weighted_mtp.study import Study, load_spec

            path = default_spec(self.configs)
            self._study = Study(load_spec(path), path, self.layout, self.configs,
                                console=self.console, tracking=self.tracking,
                                unsafe=self.unsafe)  # fmt: skip
        return self._study

    def planned(self) -> list[PlannedRun]:
        """The study's runs: the helpers (critic, tuned reference), then the policies."""
        if self._plan is None:
            self._plan = self.study.plan()
            folders = {r.run_dir for r in self._plan}
            expected = {self.run_dir(e) for e in ("critic", "ref_tuning", *POLICIES)}
            if folders != expected:
                raise StorageError(
                    f"{default_spec(self.configs)}: plans {sorted(map(str, folders))}, the "
                    f"quickstart reads {sorted(map(str, expected))}"
                )
        return self._plan

    # ---- where each stage's outputs live ----

    def run_dir(self, experiment: str) -> Path:
        return self.layout.checkpoint(experiment) / RUN_NAME

    def final(self, experiment: str) -> Path:
        return self.run_dir(experiment) / "final"

    def eval_dir(self, policy: str) -> Path:
        return self.final(policy) / "eval" / EVAL_DATASET

    @property
    def decoding_file(self) -> Path:
        return self.eval_dir("baseline") / "decoding.json"

    @property
    def source_dir(self) -> Path:
        """Where the known-answer source is written (the raw input of ``datasets/codecontests``)."""
        return self.layout.dataset("codecontests").root / "raw"

    @property
    def report_dir(self) -> Path:
        return self.layout.reports_dir / RUN_NAME

    # ---- the stages ----

    def stages(self) -> list[Stage]:
        stages = [
            Stage("known-answer", "the known-answer CodeContests source (10 task families, "
                  "mutation spans)", self._source_ok, self._build_source),
            Stage("datasets", "CodeContests from the known-answer source; MBPP, HumanEval, GSM8K "
                  "from the bundled sources; their small subsets", self._datasets_ok,
                  self._build_datasets),
            Stage("micro-base", "the micro tokenizer, micro-mtp pretrained on the known-answer "
                  "training split, micro-reference its head-1 path", self._base_ok,
                  self._build_base),
            Stage("token-lengths", "every dataset's token lengths with the micro tokenizer "
                  "(the critic's length-balanced pairs read them)", self._lengths_ok,
                  self._measure_lengths),
        ]  # fmt: skip
        plan = self.planned()
        for run in plan:
            stages.append(
                Stage(run.arm, f"train configs/{self.configs.name}/{run.config_file.name}",
                      self._trained(run), lambda run=run: self.study.train_run(run))
            )  # fmt: skip
        for run in (r for r in plan if r.evaluate):
            stages.append(
                Stage(f"eval-{run.arm}", f"held-out known-answer problems, greedy decoding of "
                      f"{run.arm} in one batch, scored in the sandbox",
                      self._evaluated(run), lambda run=run: self.study.evaluate_run(run),
                      runs_generated_code=True)
            )  # fmt: skip
        stages += [
            Stage("decoding", f"plain vs self-speculative greedy decoding of the baseline, "
                  f"{DECODING_PROMPTS} prompts one at a time", self.decoding_file.is_file,
                  self._compare_decoding),
            Stage("report", "curves, critic diagnostics, weight placement, pass@k, decoding "
                  "speed and token-weight heat maps", self._report_ok, self._build_report),
        ]  # fmt: skip
        return stages

    def _source_ok(self) -> bool:
        from weighted_mtp.storage.synthetic import GENERATOR_VERSION

        found = read_json_or_none(self.source_dir / "code_contests" / "synthetic.json")
        if not isinstance(found, dict):
            return False
        return found.get("version") == GENERATOR_VERSION and found.get("seed") == KNOWN_ANSWER_SEED

    def _build_source(self) -> None:
        import shutil

        from weighted_mtp.storage import synthetic

        if self.source_dir.exists():  # an older generator's files: replaced as a whole
            shutil.rmtree(self.source_dir)
        with contextlib.redirect_stderr(io.StringIO()):  # per-split bars: the stage says enough
            summary = synthetic.run(self.source_dir, seed=KNOWN_ANSWER_SEED)
        counts = summary["splits"]
        self.console.print(
            "  " + ", ".join(f"{s} {c['problems']} problems ({c['correct']} correct, "
                             f"{c['incorrect']} incorrect)" for s, c in counts.items())
        )  # fmt: skip

    def _datasets_ok(self) -> bool:
        from weighted_mtp.storage.dataset_verify import verify_datasets

        if not all((self.layout.dataset(n).manifest).is_file() for n in DATASET_NAMES):
            return False
        manifest = read_json_or_none(self.layout.dataset("codecontests").manifest) or {}
        origin = manifest.get("process", {}).get("options", {}).get("origin", {})
        if origin.get("root") != str(self.source_dir):
            return False
        return all(c.ok for c in verify_datasets(self.layout, include_small=True))

    def _build_datasets(self, token_lengths: bool = False) -> None:
        """The four datasets; token lengths only once the micro tokenizer exists (the micro
        base is trained from these datasets, and its tokenizer from their text)."""
        from weighted_mtp.storage import datasets

        previous = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"  # the bundled sources, whatever the network says
        try:
            bundled = [n for n in DATASET_NAMES if n != "codecontests"]
            datasets.run(self.layout, names=bundled, steps=list(datasets.STEPS),
                         token_lengths=token_lengths)  # fmt: skip
            datasets.run(self.layout, names=["codecontests"], steps=list(datasets.STEPS),
                         source=self.source_dir, token_lengths=token_lengths)  # fmt: skip
        finally:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous

    def _lengths_ok(self) -> bool:
        """Every dataset's token lengths measured with the storage's training tokenizer (the
        micro models', unless the real model is in this storage too: docs/STORAGE.md)."""
        from weighted_mtp.base.io import sha256_file
        from weighted_mtp.base.layout import training_tokenizer_path

        tokenizer = training_tokenizer_path(self.layout)
        if tokenizer is None:
            return False
        sha = sha256_file(tokenizer)
        for name in DATASET_NAMES:
            manifest = read_json_or_none(self.layout.dataset(name).manifest) or {}
            lengths = manifest.get("process", {}).get("token_lengths") or {}
            if not (lengths.get("computed") and lengths.get("tokenizer_sha256") == sha):
                return False
        return self._datasets_ok()

    def _measure_lengths(self) -> None:
        self._build_datasets(token_lengths=True)

    def _base_ok(self) -> bool:
        from weighted_mtp.micro_base import pretrained

        return pretrained(self.layout)

    def _build_base(self) -> None:
        from weighted_mtp.micro_base import pretrain_micro_base

        pretrain_micro_base(self.layout)

    def _trained(self, run: PlannedRun) -> Callable[[], bool]:
        """Finished, and with the planned settings (the study's check): a run folder left by
        another version of the quickstart stops it with one line, never resumed."""
        return lambda: self.study.status(run).state not in ("train", "resume")

    def _evaluated(self, run: PlannedRun) -> Callable[[], bool]:
        return lambda: self.study.status(run).state == "done"

    def _compare_decoding(self) -> None:
        from weighted_mtp.evaluation.harness import decoding_comparison

        decoding_comparison(
            self.layout, str(self.final("baseline")), EVAL_DATASET, self.decoding_file,
            max_tasks=DECODING_PROMPTS, max_new_tokens=self.max_new_tokens,
        )  # fmt: skip

    def _report_inputs(self) -> list[Path]:
        return [self.run_dir(e) for e in ("baseline", "verifiable", "rho1", "critic")]

    def _report_ok(self) -> bool:
        page = self.report_dir / "index.html"
        if not page.is_file():
            return False
        built = page.stat().st_mtime
        inputs = (
            [
                f
                for run in self._report_inputs()
                for f in (run / "metrics.jsonl", run / "token_weights.jsonl")
            ]
            + [self.eval_dir(p) / "summary.json" for p in POLICIES]
            + [self.decoding_file]
        )
        return all(not f.exists() or f.stat().st_mtime <= built for f in inputs)

    def _build_report(self) -> None:
        from weighted_mtp.report import build_report, link_report

        page = build_report(self._report_inputs(), self.report_dir)
        if self.mlflow_uri is not None:
            link_report(self._report_inputs(), page)

    # ---- the known-answer results ----

    def results(self) -> dict[str, Any]:
        """The four known-answer results (README, "Quickstart") read back from the stages'
        outputs, each with its target and whether it is met; a missing output leaves its entry
        out. Written to ``reports/quickstart/results.json`` by ``run``."""
        from weighted_mtp.evaluation.metrics import normal_interval

        out: dict[str, Any] = {}
        summary = read_json_or_none(self.eval_dir("baseline") / "summary.json")
        if summary:
            p1 = summary["pass_at_k"]["pass@1"]
            lo, hi = normal_interval(p1["mean"], p1["stderr"])
            out["baseline_pass_at_1"] = {
                "mean": p1["mean"], "ci95": [lo, hi], "problems": summary["problems"],
                "target": "95% interval above 0", "met": lo > 0,
            }  # fmt: skip
        diagnostics = read_json_or_none(self.run_dir("critic") / "critic_diagnostics.json")
        if diagnostics:
            acc, length = diagnostics["pair_accuracy"], diagnostics["length_only_accuracy"]
            out["critic_pair_accuracy"] = {
                "critic": acc, "length_only": length, "points_above": 100 * (acc - length),
                "pairs": diagnostics["pairs"], "target": ">= 10 points above length-only",
                "met": acc - length >= 0.10,
            }  # fmt: skip
        # The last validation's placement metrics, as the report's "Where the weight goes"
        # reads them; the reference is the position-only predictor (docs/METHOD.md §6).
        td = _last_placement(self.run_dir("verifiable"), TD_RANKING)
        if td is not None:
            out["td_decisive_token_hit"] = {
                "ranking": "largest |whitened advantage| (the TD weight furthest from 1)",
                **td,
                "target": "paired 95% interval of hit - position-only hit above 0 "
                          "(adv_abs/gain_length_lo > 0)",
                "met": td["minus_position_only"][1] > 0,
            }  # fmt: skip
            rho1 = _last_placement(self.run_dir("rho1"), RHO1_RANKING)
            if rho1 is not None:
                out["td_decisive_token_hit"]["rho1"] = {
                    "ranking": "largest excess loss (the score Rho-1 selects by)",
                    **rho1,
                    "versus_position_only": versus(rho1["minus_position_only"]),
                }
        decoding = read_json_or_none(self.decoding_file)
        if decoding:
            out["speculative_decoding"] = {
                **{k: decoding[k] for k in ("prompts", "same_tokens", "plain_tokens_per_s",
                                            "speculative_tokens_per_s", "speedup",
                                            "tokens_per_step", "acceptance")},
                "target": "faster than plain greedy, same tokens",
                "met": decoding["speedup"] > 1 and decoding["same_tokens"] == decoding["prompts"],
            }  # fmt: skip
        return out

    def print_results(self, results: dict[str, Any]) -> None:
        lines: list[tuple[str, bool | None]] = []
        if r := results.get("baseline_pass_at_1"):
            lines.append((f"baseline pass@1 {r['mean']:.3f} (95% interval {r['ci95'][0]:.3f}.."
                          f"{r['ci95'][1]:.3f}) on {r['problems']} held-out problems", r["met"]))  # fmt: skip
        if r := results.get("critic_pair_accuracy"):
            lines.append((f"critic pairwise accuracy {r['critic']:.3f} against "
                          f"{r['length_only']:.3f} for length alone ({r['points_above']:+.1f} "
                          f"points, {r['pairs']} validation pairs)", r["met"]))  # fmt: skip
        if r := results.get("td_decisive_token_hit"):
            lines.append((f"TD weights' decisive-token hit rate {_triple(r['hit'])} against the "
                          f"position-only predictor's {_triple(r['position_only'])} and "
                          f"{_triple(r['shuffled'])} shuffled, {r['solutions']:.0f} incorrect "
                          f"solutions; {_verdict(r['minus_position_only'])}", r["met"]))  # fmt: skip
            if rho := r.get("rho1"):
                lines.append((f"Rho-1's largest excess loss hits {_triple(rho['hit'])}; "
                              f"{_verdict(rho['minus_position_only'])}", None))  # fmt: skip
        if r := results.get("speculative_decoding"):
            accept = " / ".join(f"{a:.2f}" for a in r["acceptance"])
            lines.append((f"self-speculative greedy {r['speculative_tokens_per_s']:.0f} tokens/s "
                          f"against {r['plain_tokens_per_s']:.0f} plain ({r['speedup']:.2f}x), "
                          f"{r['tokens_per_step']:.2f} tokens/step, acceptance heads 2-4 "
                          f"{accept}, same tokens on {r['same_tokens']}/{r['prompts']} prompts",
                          r["met"]))  # fmt: skip
        if not lines:
            return
        self.console.print("\n[bold]Known-answer results[/bold] (held-out problems; each with its "
                           "target):")  # fmt: skip
        for line, ok in lines:  # None: a reference beside a result, no target of its own
            mark = {True: "[green]met[/green]    ", False: "[yellow]not met[/yellow]",
                    None: "       "}[ok]  # fmt: skip
            self.console.print(f"  {mark}  {line}", highlight=False)

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
        known = self.results()
        if known:
            write_json_atomic(self.report_dir / "results.json", known)
            self.print_results(known)
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


TD_RANKING = "placement/adv_abs/"
"""The ranking whose hit rate is the TD result: the token whose weight departs most from 1."""
RHO1_RANKING = "placement/excess/"
"""Rho-1's ranking, set beside the TD result: the token with the largest excess loss."""


def _last_placement(run_dir: Path, ranking: str) -> dict[str, Any] | None:
    """One ranking's decisive-token hit rate at the run's last validation, beside the
    position-only predictor and the shuffled control, each ``[value, low, high]`` (95%
    bootstrap), with the paired differences; None when the run logged no such metrics."""
    from weighted_mtp.report.runs import read_series

    _, val = read_series(run_dir / "metrics.jsonl")
    last = {k: series[-1][1] for k, series in val.items() if k.startswith("placement/")}
    if f"{ranking}hit" not in last:
        return None

    def triple(key: str) -> list[float]:
        return [last[f"{ranking}{key}{s}"] for s in ("", "_lo", "_hi")]

    return {
        "hit": triple("hit"), "position_only": triple("hit_length"),
        "shuffled": triple("hit_shuffled"), "minus_position_only": triple("gain_length"),
        "minus_shuffled": triple("gain_shuffled"), "solutions": last.get("placement/n"),
    }  # fmt: skip


def versus(difference: list[float]) -> str:
    """``above``, ``below`` or ``not distinguishable from``: where a paired difference's 95%
    interval ``[value, low, high]`` lies with respect to 0."""
    if difference[1] > 0:
        return "above"
    if difference[2] < 0:
        return "below"
    return "not distinguishable from"


def _verdict(difference: list[float]) -> str:
    """The paired difference from the position-only predictor and where its interval lies."""
    verdict = versus(difference)
    if verdict == "not distinguishable from":
        side = "below" if difference[0] < 0 else "above" if difference[0] > 0 else "at"
        verdict = f"{side} the position-only predictor by the point estimate, not distinguishable"
    else:
        verdict += " the position-only predictor"
    return f"minus position-only {_triple(difference, signed=True)}: {verdict}"


def _triple(values: list[float], signed: bool = False) -> str:
    form = "+.3f" if signed else ".3f"
    return f"{values[0]:{form}} ({values[1]:{form}}..{values[2]:{form}})"


NEXT_STEPS = """
Go further:
  wmtp train configs/quickstart/baseline.yaml --storage {root} optim.lr=1e-4 train.max_steps=40
  wmtp evaluate --checkpoint {root}/checkpoints/rho1/quickstart/final --dataset humaneval \\
      --max-tasks 20 --storage {root}     # the micro base knows only the known-answer tasks
  wmtp study configs/study/known_answer.yaml --storage {root}   # every arm and control, 2 seeds
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
