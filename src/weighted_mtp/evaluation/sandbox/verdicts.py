"""Verdicts: what a sample's run means (docs/EVALUATION.md §4).

Every verdict but ``passed`` is a failure. Exit status and stdout are never a pass: in strict
function mode only the trusted tester says ``passed``; in compat and stdio modes only the
driver's line carrying the run's nonce does (compat is not robust to adversarial code, which can
find the nonce in its own process).
"""

from __future__ import annotations

import re
import secrets
import signal
from dataclasses import dataclass, field
from typing import Any

VERDICTS = (
    "passed",
    "failed",
    "timeout",
    "memory",
    "syntax_error",
    "error:<Type>",
    "crashed:<signal>",
    "no_result",
    "output_limit",
    "harness_error",
)
HARNESS_EXIT = 120
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")
_TESTER_VERDICT = re.compile(
    r"^(passed|failed|memory|no_result|output_limit|harness_error|error:[A-Za-z_]\w{0,99})$"
)


@dataclass
class ExecResult:
    """Outcome of one sandboxed run; ``passed`` is True only for verdict ``passed``."""

    verdict: str
    passed: bool
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


def _signal_name(number: int) -> str:
    try:
        return f"crashed:{signal.Signals(number).name}"
    except ValueError:
        return f"crashed:{number}"


def _death(rc: int | None, stderr: str, oom: bool) -> str | None:
    """How the candidate's process ended, when that is the story."""
    if oom or "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    if rc is not None and rc < 0:
        return _signal_name(-rc)
    return None


def classify(
    mode: str,
    reason: str | None,
    done: dict[str, Any] | None,
    nonce: str,
    stderr: str,
    oom: bool = False,
) -> str:
    """The verdict of one run from the supervisor's view (``reason``: timeout/output_limit it
    enforced), the zygote's report (``done``: rc, verdict line, CPU timeout) and stderr."""
    if reason is not None:
        return reason
    if done is None:
        return "harness_error"
    if done.get("cpu_timeout"):
        return "timeout"
    rc, report = done.get("rc"), str(done.get("report", "")).strip()
    if rc == HARNESS_EXIT and "HARNESS_ERROR" in stderr:
        return "harness_error"
    if mode == "function":
        if not _TESTER_VERDICT.match(report):
            return "harness_error"
        if report == "no_result":  # the candidate's process went away mid-test
            return _death(rc, stderr, oom) or "no_result"
        if report.startswith("error:") and oom:
            return "memory"
        return report
    head, _, verdict = report.partition(" ")
    if secrets.compare_digest(head.encode(), nonce.encode()) and rc == 0 and verdict:
        return verdict
    death = _death(rc, stderr, oom)
    if death is not None:
        return death
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if rc not in (0, None) and lines and "Traceback (most recent call last)" in stderr:
        match = _ERROR_LINE.match(lines[-1])
        if match:
            name = match.group(1).rsplit(".", 1)[-1]
            return "failed" if name == "AssertionError" else f"error:{name}"
    return "no_result"
