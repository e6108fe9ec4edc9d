"""The sandbox's verdicts, limits and isolation (docs/EVALUATION.md §4); attacks in
test_sandbox_attacks.py."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from weighted_mtp.evaluation import sandbox
from weighted_mtp.evaluation.sandbox import (
    ExecResult,
    isolation_report,
    run_many,
    run_program,
    supervisor,
)

ADD_OK = "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n"
ADD_BAD = "def add(a, b):\n    return a - b\n"
CHECK = "\nassert add(1, 2) == 3\n"


def _run(program: str, timeout_s: float = 2.0, **kwargs: object) -> ExecResult:
    return run_program(program, timeout_s=timeout_s, **kwargs)  # type: ignore[arg-type]


def _ps_count(needle: str) -> int:
    """Live processes on the host whose command line contains ``needle``."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ")
                state = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            count += needle.encode() in cmd and state != "Z"
    return count


def test_pass_and_fail_basics() -> None:
    ok = _run(ADD_OK + "print('hello')")
    assert ok.verdict == "passed" and ok.passed
    assert ok.stdout == "hello\n"
    bad = _run(ADD_BAD + CHECK)
    assert bad.verdict == "failed" and not bad.passed


@pytest.mark.parametrize(
    ("program", "verdict"),
    [
        ("while True:\n    pass\n", "timeout"),
        ("import time\ntime.sleep(60)\n", "timeout"),
        (
            "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):\n"
            "    signal.signal(s, signal.SIG_IGN)\n"
            "while True:\n    try:\n        pass\n    except BaseException:\n        pass\n",
            "timeout",
        ),
    ],
    ids=["busy", "sleep", "ignores-signals"],
)
def test_timeouts_are_enforced_externally(program: str, verdict: str) -> None:
    start = time.monotonic()
    result = _run(program, timeout_s=1.0)
    assert result.verdict == verdict
    assert time.monotonic() - start < 6.0  # CPU limit 1 s; wall backstop 3 x 1 s + 1 s


@pytest.mark.parametrize(
    ("program", "verdict"),
    [
        (ADD_BAD + "import os\nos._exit(0)\n" + CHECK, "no_result"),
        (ADD_BAD + "import sys\nsys.exit(0)\n" + CHECK, "no_result"),
        (ADD_BAD + "import atexit, os\natexit.register(lambda: os._exit(0))\n" + CHECK, "failed"),
        (ADD_BAD + "print('passed')\nprint('OK')\nimport os\nos._exit(0)\n" + CHECK, "no_result"),
        ("def add(a, b:\n    return a + b\n", "syntax_error"),
        ("raise ValueError('boom')\n", "error:ValueError"),
        ("import os\nos.kill(os.getpid(), 9)\n", "crashed:SIGKILL"),
        ("import ctypes\nctypes.string_at(0)\n", "crashed:SIGSEGV"),
        ("x = bytearray(6 << 30)\n", "memory"),
        ("def f():\n    return f()\nf()\n", "error:RecursionError"),
        ("input()\n", "error:EOFError"),
        (
            ADD_BAD + "import sys, threading\nsys.settrace(lambda *a: None)\n"
            "sys.setprofile(lambda *a: None)\nthreading.settrace(lambda *a: None)\n" + CHECK,
            "failed",
        ),
        (
            ADD_OK
            + "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n",
            "passed",
        ),
        (
            ADD_BAD
            + "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n"
            + CHECK,
            "failed",
        ),
    ],
    ids=[
        "os-exit",
        "sys-exit",
        "atexit",
        "fake-marker",
        "syntax",
        "value-error",
        "sigkill",
        "segfault",
        "memory",
        "recursion",
        "stdin-devnull",
        "trace-hooks",
        "thread-left-running-pass",
        "thread-left-running-fail",
    ],
)
def test_verdict_categories(program: str, verdict: str) -> None:
    start = time.monotonic()
    result = _run(program)
    assert result.verdict == verdict, result.stderr
    assert result.passed == (verdict == "passed")
    assert time.monotonic() - start < 1.95  # none of these waits for the 2 s deadline


def test_output_flood_is_cut_fast() -> None:
    start = time.monotonic()
    result = _run("import os\nwhile True:\n    os.write(1, b'x' * 65536)\n", timeout_s=5.0)
    assert result.verdict == "output_limit"
    assert len(result.stdout) <= 1 << 20
    assert time.monotonic() - start < 2.0


def test_stdin_and_stdio_mode() -> None:
    program = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\nsys.exit(0)\n"
    result = _run(program, stdin="1 2 3\n", check="stdio")
    assert result.verdict == "passed"
    assert result.stdout.strip() == "6"


def test_fork_bomb_is_bounded_and_reaped() -> None:
    program = (
        "import os, time\n"
        "for _ in range(400):\n"
        "    try:\n        os.fork()\n    except OSError:\n        break\n"
        "time.sleep(5)\n"
    )
    result = _run(program, timeout_s=1.5)
    assert result.verdict in {"timeout", "no_result", "passed"}
    assert _ps_count("time.sleep(5)") == 0


def test_daemon_children_are_killed() -> None:
    program = (
        "import os, subprocess\n"
        "subprocess.Popen(['sleep', '60.4242'], start_new_session=True)\n"
        "if os.fork() == 0:\n    os.setsid()\n    os.execvp('sleep', ['sleep', '61.4242'])\n"
        + ADD_OK
    )
    result = _run(program)
    assert result.verdict == "passed"
    assert _ps_count("sleep 61.4242") == 0 and _ps_count("sleep 60.4242") == 0


def test_writes_outside_the_sample_fail(tmp_path: Path) -> None:
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir(mode=0o777)
    os.chmod(tmp_path, 0o755)
    canary = victim_dir / "canary.txt"
    canary.write_text("original")
    program = (
        f"paths = [{str(canary)!r}, {str(victim_dir / 'new.txt')!r}, '/etc_pwned', '/usr/x']\n"
        "for p in paths:\n"
        "    try:\n        open(p, 'w').write('pwned')\n    except OSError:\n        pass\n"
        + ADD_OK
    )
    assert _run(program).verdict == "passed"
    assert canary.read_text() == "original"
    assert sorted(p.name for p in victim_dir.iterdir()) == ["canary.txt"]
    assert not Path("/etc_pwned").exists()


def test_no_network_to_loopback() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        program = (
            "import socket\ns = socket.socket()\ns.settimeout(1)\n"
            f"s.connect(('127.0.0.1', {port}))\n"
        )
        result = _run(program)
        # The jail's own loopback: nothing listens there, and the host's is out of reach.
        assert result.verdict in ("error:OSError", "error:ConnectionRefusedError")
        with pytest.raises(TimeoutError):
            listener.accept()


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    program = "import os\nassert 'HF_TOKEN' not in os.environ\nprint(sorted(os.environ))\n"
    result = _run(program)
    assert result.verdict == "passed"
    assert "hf_secret_value" not in result.stdout


def test_workdir_is_a_private_tmpfs_that_does_not_outlive_the_sample() -> None:
    program = "import os\nprint(os.getcwd())\nopen('f.txt', 'w').write('x')\nos.mkdir('d', 0)\n"
    first = run_many([program, "import os\nprint(sorted(os.listdir('.')))\n"], workers=1)
    assert [r.verdict for r in first] == ["passed", "passed"]
    assert first[0].stdout.strip() == "/tmp/work"
    assert first[1].stdout.strip() == "[]"  # the next sample of the same jail starts empty


def test_run_many_is_deterministic() -> None:
    programs = [
        ADD_OK,
        ADD_BAD + CHECK,
        "raise KeyError(1)\n",
        "import random\nassert random.random() >= 0.5\n",
        "import sys\nsys.exit(3)\n",
    ]
    expected = ["passed", "failed", "error:KeyError", None, "no_result"]
    one = [r.verdict for r in run_many(programs, workers=1, timeout_s=2.0)]
    two = [r.verdict for r in run_many(programs, workers=2, timeout_s=2.0)]
    assert one == two
    assert [e or v for e, v in zip(expected, one, strict=True)] == one


def test_isolation_report_keys() -> None:
    report = isolation_report()
    for key in sandbox.MINIMUM_LEVEL:
        assert report[key] is True, (key, report)
    assert report["level"] == "full" and report["summary"].startswith("sandbox isolation: full")


def test_samples_of_a_slot_share_one_warm_jail() -> None:
    results = run_many([ADD_OK] * 6, workers=2, timeout_s=2.0)
    assert [r.verdict for r in results] == ["passed"] * 6
    assert max(r.duration_s for r in results[1:]) < 0.5  # no jail or interpreter start


def test_require_isolation(monkeypatch: pytest.MonkeyPatch) -> None:
    report = sandbox.require_isolation()
    assert report["summary"].startswith("sandbox isolation: ")
    assert report["level"] == "full" and report["missing"] == []
    weak = {**report, "net_ns": False, "missing": ["net_ns"], "level": "below-minimum"}
    monkeypatch.setattr(sandbox, "isolation_report", lambda: weak)
    with pytest.raises(sandbox.IsolationError, match="net_ns"):
        sandbox.require_isolation()
    assert sandbox.require_isolation(unsafe=True)["missing"] == ["net_ns"]
    sandbox.set_unsafe(False)


def test_reruns_are_sequential_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake(program: str, **_: object) -> ExecResult:
        calls.append(program)
        first = calls.count(program) == 1
        verdict = {"t": "timeout" if first else "passed", "h": "harness_error", "p": "passed"}
        return ExecResult(verdict[program], verdict[program] == "passed")

    monkeypatch.setattr(supervisor, "run_program", fake)
    plain = run_many(["t", "h", "p"], workers=2)
    assert [r.verdict for r in plain] == ["timeout", "harness_error", "passed"]
    assert plain[1].detail["first_verdict"] == "harness_error"  # harness errors: always re-run
    calls.clear()
    again = run_many(["t", "h", "p"], workers=2, rerun_timeouts=True)
    assert [r.verdict for r in again] == ["passed", "harness_error", "passed"]
    assert calls[3:] == ["t", "h"]  # the re-runs come last, in input order
    assert sandbox.rerun_flips(again) == {"rerun": 2, "flipped": 1}


def test_real_timeout_rerun_stays_timeout() -> None:
    results = run_many(
        ["import time\ntime.sleep(9)\n"], workers=1, timeout_s=0.5, rerun_timeouts=True
    )
    assert results[0].verdict == "timeout" and results[0].detail["first_verdict"] == "timeout"


def test_run_many_reports_each_finished_program() -> None:
    ticks: list[int] = []
    results = run_many([ADD_OK, ADD_BAD + CHECK, ADD_OK], 2, on_done=lambda: ticks.append(1))
    assert [r.verdict for r in results] == ["passed", "failed", "passed"] and len(ticks) == 3


def test_the_long_lived_tester_is_replaced_when_a_sample_ends_without_its_verdict() -> None:
    """The jail's tester serves sample after sample; a sample that leaves it waiting (here a
    candidate sleeping mid-call, stopped by the wall-clock backstop) costs it its life, and the
    next samples get a fresh tester whose verdicts are theirs, never a late one."""
    tests = {"setup": "", "test": "assert add(1, 2) == 3\nassert add(2, 2) == 4\n",
             "entry_point": "add"}  # fmt: skip
    sleepy = "def add(a, b):\n    import time\n    time.sleep(30)\n"
    jobs = [
        {"program": sleepy, "check": "function", "tests": tests},
        {"program": "def add(a, b):\n    return a + b\n", "check": "function", "tests": tests},
        {"program": ADD_BAD, "check": "function", "tests": tests},
        {"program": "def add(a, b):\n    return a + b\n", "check": "function", "tests": tests},
    ]
    start = time.monotonic()
    results = run_many(jobs, workers=1, timeout_s=0.5)
    assert [r.verdict for r in results] == ["timeout", "passed", "failed", "passed"]
    assert time.monotonic() - start < 10
