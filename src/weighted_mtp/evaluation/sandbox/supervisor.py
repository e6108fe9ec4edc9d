"""Supervision: worker slots, deadlines, output caps, reruns (docs/EVALUATION.md §4).

The supervisor never runs candidate code and never walks a file tree a sample could touch. Each
worker slot owns one jail (``jail.py``) whose zygote forks every sample; the supervisor sends the
payloads as file descriptors, drains stdout/stderr through capped pipes, enforces the wall-clock
backstop and turns what the zygote reports into a verdict (``verdicts.py``). Any exception while
handling a sample becomes that sample's ``harness_error`` (re-run once by ``run_many``).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import secrets
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from weighted_mtp.evaluation.sandbox import jail as jails
from weighted_mtp.evaluation.sandbox.verdicts import ExecResult, classify

MODES = ("exit_code", "stdio", "function")
FSIZE_BYTES = 64 << 20
STACK_BYTES = 64 << 20
NOFILE = 256
NPROC = 256
TMPFS_OPTIONS = "mode=1777,size=64m,nr_inodes=8192"
# The wall-clock backstop, for programs that sleep or block: 3 x the CPU-time limit + 1 s, wide
# enough that a loaded machine does not turn CPU-bound correct programs into timeouts.
WALL_FACTOR, WALL_SLACK_S = 3.0, 1.0
_STDERR_KEEP = 64 << 10
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0


def sample_env() -> dict[str, str]:
    """The whole environment of a sample: an allowlist, never the parent's variables."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/tmp/work",
        "TMPDIR": "/tmp/work",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def limits(timeout_s: float, memory_mb: int) -> dict[str, int]:
    """Per-process rlimits of a sample's runner (inherited by everything it starts)."""
    mem = memory_mb << 20
    return {
        "RLIMIT_AS": mem,
        "RLIMIT_DATA": mem,
        "RLIMIT_STACK": STACK_BYTES,
        "RLIMIT_CPU": int(timeout_s) + 2,
        "RLIMIT_FSIZE": FSIZE_BYTES,
        "RLIMIT_CORE": 0,
        "RLIMIT_NOFILE": NOFILE,
        "RLIMIT_NPROC": NPROC,  # counted in the jail's own user namespace
    }


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.jail: jails.Jail | _UnsafeJail | None = None


class _UnsafeJail:
    """``--unsafe`` where no jail can be built: the zygote as a plain process of this user."""

    cgroup = None

    def __init__(self, uid: int | None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
        self.uid = uid
        self.proc = subprocess.Popen(
            [sys.executable, *jails.PYTHON_FLAGS, "-c", jails.INSIDE_SOURCE.read_text(), "zygote",
             str(theirs.fileno())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),), env=sample_env() | {"HOME": "/"}, cwd="/",
            start_new_session=True, **ids,  # type: ignore[arg-type]
        )  # fmt: skip
        theirs.close()
        self.sock = ours
        ours.settimeout(_START_TIMEOUT_S * 3)
        if ours.recv(64) != b"ready":
            self.close()
            raise jails.SandboxUnavailable("the unsafe zygote did not start")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait()


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.plan: jails.JailPlan | None = None
        self.plan_error: str | None = None
        self.unsafe = False
        self.free: collections.deque[_Slot] = collections.deque(
            _Slot(i) for i in range(jails.NUM_SLOTS)
        )
        self.cond = threading.Condition(self.lock)
        self.report: dict[str, Any] = {}


_STATE = _State()
_LAUNCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-launcher")


def set_unsafe(unsafe: bool) -> None:
    """With ``unsafe``, samples still run (without a jail) where no jail can be built."""
    _STATE.unsafe = unsafe


def jail_plan() -> jails.JailPlan:
    """The shared jail plan, found once; raises SandboxUnavailable with a one-line reason."""
    with _STATE.lock:
        if _STATE.plan is None and _STATE.plan_error is None:
            try:
                _STATE.plan = jails.plan()
            except jails.SandboxUnavailable as exc:
                _STATE.plan_error = str(exc)
        if _STATE.plan is None:
            raise jails.SandboxUnavailable(_STATE.plan_error or "no sandbox")
        return _STATE.plan


def _get_slot() -> _Slot:
    with _STATE.cond:
        _STATE.cond.wait_for(lambda: bool(_STATE.free))
        return _STATE.free.pop()  # most recently used first: its jail is warm


def _put_slot(slot: _Slot) -> None:
    with _STATE.cond:
        _STATE.free.append(slot)
        _STATE.cond.notify()


def prestart(count: int) -> None:
    """Start the jails of the ``count`` slots that samples will use first, without waiting for
    them: they boot side by side (and beside the isolation probe); each sample's slot waits
    for its own jail to be ready."""
    try:
        plan = jail_plan()
    except jails.SandboxUnavailable:
        return  # the first sample reports it (or runs unsafe)
    with _STATE.cond:
        slots = [_STATE.free.pop() for _ in range(min(count, len(_STATE.free)))]
    try:
        for slot in slots:
            if slot.jail is None or slot.jail.proc.poll() is not None:
                if slot.jail is not None:
                    slot.jail.close()
                slot.jail = _LAUNCHER.submit(jails.Jail, plan, slot.index, wait=False).result()
    finally:
        with _STATE.cond:
            _STATE.free.extend(reversed(slots))
            _STATE.cond.notify_all()


def _jail_for(slot: _Slot) -> jails.Jail | _UnsafeJail:
    if isinstance(slot.jail, jails.Jail) and not slot.jail.ready:
        try:
            slot.jail.wait_ready()  # started by prestart()
        except jails.SandboxUnavailable:
            slot.jail = None  # closed by wait_ready; start afresh below (and report from there)
    if slot.jail is not None and slot.jail.proc.poll() is None:
        return slot.jail
    if slot.jail is not None:
        slot.jail.close()
        slot.jail = None
    try:
        plan = jail_plan()
        # Started from one long-lived thread: --die-with-parent follows the thread that forked
        # bubblewrap, and a worker thread of run_many ends with its pool.
        slot.jail = _LAUNCHER.submit(jails.Jail, plan, slot.index).result()
    except jails.SandboxUnavailable:
        if not _STATE.unsafe:
            raise
        base = jails.SLOT_UID_BASE + slot.index if jails.is_root() else None
        slot.jail = _UnsafeJail(base)
    return slot.jail


def _memfd(name: str, data: bytes | None) -> int:
    if data is None:
        return os.open(os.devnull, os.O_RDONLY)
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _check_syntax(program: str) -> str | None:
    try:
        compile(program, "<candidate>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_program(
    program: str,
    *,
    stdin: str | None = None,
    timeout_s: float,
    memory_mb: int = 2048,
    output_limit_bytes: int = 1 << 20,
    check: str = "exit_code",
    tests: dict[str, str] | None = None,
) -> ExecResult:
    """Run untrusted Python source in a jail and return the supervisor's verdict.

    * ``check="exit_code"`` (compat): passes when the whole program, asserts included, ran to
      its end; the asserts run in the candidate's own process.
    * ``check="stdio"``: a clean run yields ``passed``; the caller compares ``stdout``.
    * ``check="function"`` (strict): ``program`` is the candidate's code only; ``tests`` holds
      the trusted ``setup`` and ``test`` code and the ``entry_point``. The tests run in a trusted
      process and call the candidate over a plain-data channel.

    ``timeout_s`` is CPU time of all the sample's processes, with a wall-clock backstop of
    ``WALL_FACTOR`` times it plus ``WALL_SLACK_S``.
    """
    if check not in MODES:
        raise ValueError(f"unknown check mode {check!r}; expected one of {', '.join(MODES)}")
    if (check == "function") != (tests is not None):
        raise ValueError("tests= goes with check='function' and only with it")
    start = time.monotonic()
    syntax = _check_syntax(program)
    if syntax is not None:
        return ExecResult("syntax_error", False, "", syntax, 0.0, {"compile": syntax})
    slot = _get_slot()
    try:
        return _run_in_slot(
            slot, program, stdin, timeout_s, memory_mb, output_limit_bytes, check, tests, start
        )
    except Exception as exc:  # any failure here is this sample's harness_error
        if slot.jail is not None:
            slot.jail.close()
            slot.jail = None
        return ExecResult(
            "harness_error", False, "", repr(exc), time.monotonic() - start, {"slot": slot.index}
        )
    finally:
        _put_slot(slot)


def _run_in_slot(
    slot: _Slot,
    program: str,
    stdin: str | None,
    timeout_s: float,
    memory_mb: int,
    limit: int,
    check: str,
    tests: dict[str, str] | None,
    start: float,
) -> ExecResult:
    jail = _jail_for(slot)
    nonce = secrets.token_hex(16)
    cfg = {
        "mode": check,
        "limits": limits(timeout_s, memory_mb),
        "cpu_s": timeout_s,
        "tmpfs": TMPFS_OPTIONS,
        "env": sample_env(),
        "nonce": nonce,
        "isolate": isinstance(jail, jails.Jail),
        # Without a cgroup's CPU weight, the zygote holds the sample to one CPU itself.
        "cpu_share": None if jail.cgroup is not None else 1.0,
    }
    if jail.cgroup is not None:
        jail.cgroup.set_memory((memory_mb << 20) + jails.JAIL_OVERHEAD_BYTES)
    fds = [
        _memfd("program", program.encode("utf-8", "surrogateescape")),
        _memfd("tests", None if tests is None else json.dumps(tests).encode()),
        _memfd("stdin", None if stdin is None else stdin.encode("utf-8", "surrogateescape")),
    ]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        try:
            socket.send_fds(jail.sock, [json.dumps(cfg).encode()], [*fds, out_w, err_w])
        finally:
            for fd in (*fds, out_w, err_w):
                os.close(fd)
        jail.sock.settimeout(_START_TIMEOUT_S)
        if jail.sock.recv(64) != b"started":
            raise OSError("the zygote did not start the sample")
        sup = _supervise(
            slot,
            jail,
            (out_r, err_r),
            time.monotonic() + WALL_FACTOR * timeout_s + WALL_SLACK_S,
            limit,
        )
    finally:
        os.close(out_r)
        os.close(err_r)
    oom = jail.cgroup is not None and slot.jail is jail and jail.cgroup.oom_kills_since_last()
    stdout = sup["stdout"][:limit].decode("utf-8", errors="replace")
    stderr = sup["stderr"][-_STDERR_KEEP:].decode("utf-8", errors="replace")
    verdict = classify(check, sup["reason"], sup["done"], nonce, stderr, oom)
    detail = {"slot": slot.index, "mode": check, **(sup["done"] or {})}
    detail.pop("report", None)
    return ExecResult(
        verdict, verdict == "passed", stdout, stderr, time.monotonic() - start, detail
    )


def _read_pipes(
    sel: selectors.BaseSelector, bufs: dict[int, bytearray], limit: int, wait: float
) -> bool:
    """Read what the pipes hold (keeping at most limit + 1 bytes each); True if the zygote's
    socket became readable."""
    sock_ready = False
    for key, _ in sel.select(wait):
        if key.data == "sock":
            sock_ready = True
            continue
        try:
            chunk = os.read(key.fd, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            sel.unregister(key.fd)
            continue
        buf = bufs[key.fd]
        if len(buf) <= limit:
            buf += chunk[: limit + 1 - len(buf)]
    return sock_ready


def _done(msg: bytes) -> dict[str, Any]:
    if not msg.startswith(b"done "):
        raise OSError(f"unexpected message from the zygote: {msg[:80]!r}")
    return json.loads(msg[5:])


def _final_verdict(done: dict[str, Any] | None) -> bool:
    """A strict-mode verdict of the trusted tester that needs no more of the sample's output
    (the zygote reports it before the sample's processes are gone, and reaps them after)."""
    if done is None or done.get("rc") is not None or done.get("cpu_timeout"):
        return False
    report = str(done.get("report", "")).strip()
    return report in ("passed", "failed") or report.startswith("error:")


def _supervise(
    slot: _Slot, jail: Any, pipes: tuple[int, int], deadline: float, limit: int
) -> dict[str, Any]:
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    for fd in pipes:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, "pipe")
        bufs[fd] = bytearray()
    sel.register(jail.sock, selectors.EVENT_READ, "sock")

    def overflow() -> bool:
        return any(len(buf) > limit for buf in bufs.values())

    reason, done = None, None
    while done is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            reason = "timeout"
            break
        if _read_pipes(sel, bufs, limit, min(remaining, 0.25)):
            done = _done(jail.sock.recv(1 << 16))
        elif overflow():
            reason = "output_limit"
            break
    if done is None:  # stop the sample: the zygote kills it and still reports
        try:
            jail.sock.send(b"kill")
            jail.sock.settimeout(_STOP_TIMEOUT_S)
            done = _done(jail.sock.recv(1 << 16))
        except OSError:
            jail.close()  # the whole jail goes: nothing it ran survives
            slot.jail = None
    sel.unregister(jail.sock)
    if not _final_verdict(done):
        grace = time.monotonic() + 0.5  # everything of the sample is dead: EOF comes at once
        while sel.get_map() and time.monotonic() < grace:
            _read_pipes(sel, bufs, limit, 0.05)
    else:
        _read_pipes(sel, bufs, limit, 0)  # what is there; the verdict needs no more
    sel.close()
    if reason is None and overflow():
        reason = "output_limit"
    out, err = (bytes(bufs[fd]) for fd in pipes)
    return {"reason": reason, "done": done, "stdout": out, "stderr": err}


def run_many(
    programs: Sequence[str | dict[str, Any]],
    workers: int,
    *,
    timeout_s: float = 3.0,
    rerun_timeouts: bool = False,
    on_done: Callable[[], None] | None = None,
    **kwargs: Any,
) -> list[ExecResult]:
    """Run programs concurrently; results keep the input order. ``on_done`` is called (from a
    worker thread) after each program of the parallel pass, e.g. to advance a progress bar.

    Each item is program source, or a dict of ``run_program`` keyword arguments with a
    ``program`` key. ``workers`` is capped at the slot count; prefer the number of cores.

    After the parallel pass, samples whose verdict was ``harness_error`` (and, with
    ``rerun_timeouts``, ``timeout``) are run once more, one at a time in input order; their
    result records the first verdict in ``detail["first_verdict"]``.
    """
    jobs = [p if isinstance(p, dict) else {"program": p} for p in programs]

    def _one(job: dict[str, Any]) -> ExecResult:
        args = {"timeout_s": timeout_s, **kwargs, **job}
        return run_program(args.pop("program"), **args)

    def _counted(job: dict[str, Any]) -> ExecResult:
        result = _one(job)
        if on_done is not None:
            on_done()
        return result

    workers = max(1, min(workers, jails.NUM_SLOTS))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_counted, jobs))
    again = {"harness_error", "timeout"} if rerun_timeouts else {"harness_error"}
    for i, first in enumerate(results):
        if first.verdict in again:
            second = _one(jobs[i])
            second.detail["first_verdict"] = first.verdict
            results[i] = second
    return results


def rerun_flips(results: Sequence[ExecResult]) -> dict[str, int]:
    """How many samples were re-run and how many of them changed verdict."""
    rerun = [r for r in results if "first_verdict" in r.detail]
    return {
        "rerun": len(rerun),
        "flipped": sum(r.verdict != r.detail["first_verdict"] for r in rerun),
    }


@atexit.register
def shutdown() -> None:
    """Kill every jail and remove its cgroup (at exit too; --die-with-parent covers a crash)."""
    with _STATE.lock:
        slots = list(_STATE.free)
    for slot in slots:
        if slot.jail is not None:
            slot.jail.close()
            slot.jail = None
