"""Process sandbox for running untrusted generated Python programs.

The supervisor (this module) never executes candidate code. Every sample runs in a fresh
``python -I -S`` child driven by a small trusted driver (``_DRIVER``) that, before any candidate
code runs, enters an empty network namespace, sets rlimits, drops to a per-slot unprivileged uid
and chdirs into a private directory. Time and output limits are enforced from the outside, the
whole process tree of the slot is killed after every sample, and the pass signal is a per-run
random nonce written by the driver to a result file only after the candidate code returned, so
early exits or fake success markers cannot pass (EVALUATION.md sections 3.2-3.3).

Verdicts: ``passed``, ``failed``, ``timeout``, ``memory``, ``syntax_error``, ``error:<Type>``,
``crashed:<SIGNAME>``, ``no_result``, ``output_limit``, ``harness_error``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import queue
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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

CLONE_NEWNET = 0x40000000
SLOT_UID_BASE = 60000
NUM_SLOTS = 32
FSIZE_BYTES = 64 << 20
STACK_BYTES = 64 << 20
NOFILE = 256
NPROC = 256
HARNESS_EXIT = 120
_STDERR_KEEP = 64 << 10

# Runs inside the child as root first (namespace + rlimits need it), then as the slot uid.
# Everything it needs after the candidate code runs is bound to locals beforehand, because the
# candidate may patch os/sys/builtins (cases 46-47) or close every fd (case 42).
_DRIVER = r"""
import os, sys

def _setup():
    import json, resource
    fd = int(sys.argv[1])
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    head, _, src = b"".join(chunks).partition(b"\n")
    cfg = json.loads(head)
    import builtins, random, traceback  # needed after the uid drop; stdlib may be unreadable
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def _call(fn, *args):
        if fn(*args) != 0:
            raise OSError(ctypes.get_errno(), "%s%r" % (fn.__name__, args))

    if cfg["netns"]:
        _call(libc.unshare, 0x40000000)
    expose = cfg["expose"]
    if expose:
        # Private mount namespace: cover the unreadable home holding the interpreter with a
        # tmpfs (hiding its secrets too) and move a bind of the stdlib prefix back into place.
        _call(libc.unshare, 0x00020000)
        _call(libc.mount, b"none", b"/", None, 16384 | (1 << 18), None)
        prefix, hide, staging = (x.encode() for x in expose)
        _call(libc.mount, prefix, staging, None, 4096 | 16384, None)
        _call(libc.mount, b"tmpfs", hide, b"tmpfs", 0, b"mode=0755,size=1m")
        os.makedirs(prefix, exist_ok=True)
        _call(libc.mount, staging, prefix, None, 8192, None)
    for name, value in cfg["limits"].items():
        res = getattr(resource, name)
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    os.chdir(cfg["workdir"])
    return cfg, src.decode("utf-8")

try:
    _cfg, _src = _setup()
except BaseException as _exc:
    sys.stderr.write("HARNESS_ERROR: %r\n" % (_exc,))
    sys.stderr.flush()
    os._exit(120)

def _main(cfg, src):
    import builtins, random
    random.seed(0)
    getpid, osopen, write, closerange, exit_ = (
        os.getpid, os.open, os.write, os.closerange, os._exit)
    settrace, setprofile, compile_, exec_ = sys.settrace, sys.setprofile, compile, exec
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    streams = (sys.stdout, sys.stderr)
    pid, nonce, path, mode = getpid(), cfg["nonce"], cfg["result"], cfg["check"]
    verdict = "passed"
    try:
        code = compile_(src, "<candidate>", "exec")
        exec_(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exc:
        if mode == "exit_code":
            verdict = "no_result"
        elif exc.code not in (None, 0):
            verdict = "error:SystemExit"
    except AssertionError:
        verdict = "failed"
    except MemoryError:
        verdict = "memory"
    except BaseException as exc:
        try:
            verdict = "error:" + type(exc).__name__
            import traceback
            traceback.print_exc()
        except BaseException:
            verdict = "error:Exception"
    settrace(None)
    setprofile(None)
    if getpid() != pid:
        exit_(0)  # a process forked by the candidate never reports a result
    for stream in streams + (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    data = ("%s %s\n" % (nonce, verdict)).encode()
    try:
        fd = osopen(path, flags, 0o600)
    except OSError:
        closerange(3, 1 << 16)  # the candidate may have exhausted RLIMIT_NOFILE (case 29)
        try:
            fd = osopen(path, flags, 0o600)
        except OSError:
            exit_(121)
    write(fd, data)
    exit_(0)

_main(_cfg, _src)
"""


@dataclass
class ExecResult:
    """Outcome of one sandboxed program run; ``passed`` is True only for verdict ``passed``."""

    verdict: str
    passed: bool
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Slot:
    index: int
    uid: int | None
    gid: int | None


_SLOTS: queue.Queue[_Slot] | None = None
_SLOTS_LOCK = threading.Lock()
_PROBE: dict[str, bool] = {}
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")


def _uid_switch_available() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _probe_netns() -> bool:
    """Check once whether a child can unshare its network namespace."""
    with _SLOTS_LOCK:
        if "netns" not in _PROBE:
            code = (
                "import ctypes,sys;libc=ctypes.CDLL(None,use_errno=True);"
                f"sys.exit(0 if libc.unshare({CLONE_NEWNET})==0 else 1)"
            )
            try:
                rc = subprocess.run(
                    [sys.executable, "-I", "-S", "-c", code],
                    env=_base_env("/"),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=30,
                    check=False,
                ).returncode
            except (OSError, subprocess.SubprocessError):
                rc = 1
            _PROBE["netns"] = rc == 0
        return _PROBE["netns"]


def _slots() -> queue.Queue[_Slot]:
    """Pool of worker slots; each concurrent sample holds one, so per-uid kills never collide."""
    global _SLOTS
    with _SLOTS_LOCK:
        if _SLOTS is None:
            _SLOTS = queue.Queue()
            root = _uid_switch_available()
            base = SLOT_UID_BASE + NUM_SLOTS * _claim_uid_block() if root else None
            for i in range(NUM_SLOTS):
                uid = base + i if base is not None else None
                _SLOTS.put(_Slot(i, uid, uid))
        return _SLOTS


_BLOCK_LOCK: Any = None


def _claim_uid_block(blocks: int = 64) -> int:
    """Claim a block of slot uids for this process, machine-wide (an flock held until exit):
    two supervisors (e.g. parallel test workers) must never share a uid, because a slot's
    clean-up kills every process of its uid."""
    global _BLOCK_LOCK
    for block in range(blocks):
        handle = open(f"/tmp/.wmtp-sandbox-uids-{block}.lock", "a+")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _BLOCK_LOCK = handle
        return block
    raise RuntimeError("no free sandbox uid block (64 supervisors already running)")


def isolation_report() -> dict[str, Any]:
    """Which isolation layers this machine provides (callers should print it)."""
    root = _uid_switch_available()
    report: dict[str, Any] = {
        "session": True,
        "rlimits": True,
        "netns": _probe_netns(),
        "uid_switch": root,
        "kill_all_of_uid": root,
        "rlimit_nproc_effective": root,
        "private_tmp_mount": False,
        "cgroup": False,
        "scrubbed_env": True,
        "supervisor_kill": True,
    }
    report["level"] = "minimum-minus-private-tmp" if root and report["netns"] else "weak"
    return report


def _base_env(workdir: str) -> dict[str, str]:
    # Allowlist only: tokens and proxies of the parent must never reach a sample (case 37).
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def _expose_plan(workdir: str) -> list[str] | None:
    """[prefix, hidden_dir, staging] when the stdlib lies under a dir the slot uid cannot traverse.

    Here the interpreter lives in /root/.pyenv (mode 0700): after the uid drop it could not
    import anything, so the driver remounts it (see ``_DRIVER``). ``None`` when not needed.
    """
    if not _uid_switch_available():
        return None
    prefix = os.path.realpath(sys.base_prefix)
    parts = prefix.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return [prefix, ancestor, workdir]
    return None


def _limits(timeout_s: float, memory_mb: int) -> dict[str, int]:
    mem = memory_mb << 20
    limits = {
        "RLIMIT_AS": mem,
        "RLIMIT_DATA": mem,
        "RLIMIT_STACK": STACK_BYTES,
        "RLIMIT_CPU": math.ceil(timeout_s) + 1,
        "RLIMIT_FSIZE": FSIZE_BYTES,
        "RLIMIT_CORE": 0,
        "RLIMIT_NOFILE": NOFILE,
    }
    if _uid_switch_available():
        limits["RLIMIT_NPROC"] = NPROC  # root ignores NPROC, so only set it under a slot uid
    return limits


def _uid_pids(uid: int) -> list[int]:
    """Live (non-zombie) processes owned by ``uid``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as fh:
                status = fh.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith(("Z", "X")):
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            pids.append(int(name))
    return pids


def _kill_slot(pgid: int, slot: _Slot) -> bool:
    """SIGKILL the sample's group and, under a slot uid, every process of that uid.

    killpg alone misses setsid'd orphans (case 31), hence the per-uid sweep. ``kill -9 -1`` run
    as the slot uid signals all of its processes in one kernel pass, which outruns fork bombs;
    the /proc loop then verifies. Returns True when nothing of the slot survives.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    if slot.uid is None:
        return True
    kill_bin = shutil.which("kill", path="/usr/bin:/bin")
    for _ in range(50):
        if kill_bin:
            subprocess.run(
                [kill_bin, "-9", "-1"],
                user=slot.uid,
                group=slot.gid,
                extra_groups=[],
                env={"PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        pids = _uid_pids(slot.uid)
        if not pids:
            return True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    return not _uid_pids(slot.uid)


def _read_ready(sel: selectors.BaseSelector, bufs: dict[int, bytearray], limit: int) -> None:
    for key, _ in sel.select(0.05):
        try:
            chunk = os.read(key.fd, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            sel.unregister(key.fd)
            continue
        # Keep at most limit + 1 bytes: enough to detect the overflow, bounded memory.
        buf = bufs[key.fd]
        if len(buf) <= limit:
            buf += chunk[: limit + 1 - len(buf)]
        else:
            bufs[-key.fd] = bytearray(b"x")  # overflow marker for this stream


def _supervise(proc: subprocess.Popen[bytes], deadline: float, limit: int, slot: _Slot) -> dict:
    """Drain both pipes until exit, deadline or output cap; then kill the whole slot."""
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    for pipe in (proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
        sel.register(pipe.fileno(), selectors.EVENT_READ)
        bufs[pipe.fileno()] = bytearray()
    reason = None
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            reason = "timeout"
            break
        _read_ready(sel, bufs, limit)
        if any(k < 0 for k in bufs):
            reason = "output_limit"
            break
    # Do not wait for EOF that grandchildren may hold back: kill first, then drain briefly.
    clean = _kill_slot(proc.pid, slot)
    proc.wait()
    grace = time.monotonic() + 0.5
    while sel.get_map() and time.monotonic() < grace:
        _read_ready(sel, bufs, limit)
    sel.close()
    if reason is None and any(k < 0 for k in bufs):
        reason = "output_limit"
    out, err = bufs[proc.stdout.fileno()], bufs[proc.stderr.fileno()]
    return {"reason": reason, "stdout": bytes(out), "stderr": bytes(err), "clean": clean}


def _classify(rc: int, nonce: str, result_text: str | None, stderr: str) -> str:
    """Verdict when neither the deadline nor the output cap fired."""
    if result_text is not None:
        head, _, verdict = result_text.strip().partition(" ")
        if secrets.compare_digest(head, nonce) and rc == 0:
            return verdict
    if rc == HARNESS_EXIT and "HARNESS_ERROR" in stderr:
        return "harness_error"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    if rc < 0:
        try:
            return f"crashed:{signal.Signals(-rc).name}"
        except ValueError:
            return f"crashed:{-rc}"
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if rc != 0 and lines and "Traceback (most recent call last)" in stderr:
        match = _ERROR_LINE.match(lines[-1])
        if match:
            name = match.group(1).rsplit(".", 1)[-1]
            return "failed" if name == "AssertionError" else f"error:{name}"
    return "no_result"


def _make_workdir(slot: _Slot) -> str:
    workdir = tempfile.mkdtemp(prefix=f"wmtp-sbx{slot.index}-")
    if slot.uid is not None:
        os.chown(workdir, slot.uid, slot.gid if slot.gid is not None else -1)
    return workdir


def _remove_workdir(workdir: str) -> None:
    """Remove from outside, restoring permissions first (the sample may leave mode-000 dirs)."""

    def _fix(func: Any, path: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    shutil.rmtree(workdir, onerror=_fix)


def _spawn(src: str, cfg: dict, workdir: str, stdin: str | None) -> subprocess.Popen[bytes]:
    # Both files are closed in the supervisor once the child inherited them.
    with contextlib.ExitStack() as stack:
        payload = stack.enter_context(tempfile.TemporaryFile())
        payload.write(json.dumps(cfg).encode() + b"\n" + src.encode("utf-8"))
        payload.seek(0)
        stdin_file: Any = subprocess.DEVNULL
        if stdin is not None:
            # A file rather than a pipe: a large input can never block the supervisor.
            stdin_file = stack.enter_context(tempfile.TemporaryFile())
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
        return subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _DRIVER, str(payload.fileno())],
            stdin=stdin_file,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(payload.fileno(),),
            env=_base_env(workdir),
            cwd=workdir,
            start_new_session=True,
            close_fds=True,
        )


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
) -> ExecResult:
    """Run untrusted Python source in an isolated child and return the supervisor's verdict.

    ``check="exit_code"``: passes only if the whole program ran to its end (the driver then
    writes the per-run nonce). ``check="stdio"``: a clean run (``sys.exit(0)`` allowed) yields
    ``passed``; the caller compares ``stdout`` with the expected output.
    """
    if check not in ("exit_code", "stdio"):
        raise ValueError(f"unknown check mode {check!r}")
    start = time.monotonic()
    syntax = _check_syntax(program)
    if syntax is not None:
        return ExecResult("syntax_error", False, "", syntax, 0.0, {"compile": syntax})
    slot = _slots().get()
    workdir = _make_workdir(slot)
    try:
        return _run_in_slot(
            program, stdin, timeout_s, memory_mb, output_limit_bytes, check, slot, workdir, start
        )
    finally:
        _remove_workdir(workdir)
        _slots().put(slot)


def _run_in_slot(
    program: str,
    stdin: str | None,
    timeout_s: float,
    memory_mb: int,
    limit: int,
    check: str,
    slot: _Slot,
    workdir: str,
    start: float,
) -> ExecResult:
    nonce = secrets.token_hex(16)
    result_path = os.path.join(workdir, f".result-{secrets.token_hex(8)}")
    cfg = {
        "netns": _probe_netns(),
        "limits": _limits(timeout_s, memory_mb),
        "uid": slot.uid,
        "gid": slot.gid,
        "expose": _expose_plan(workdir),
        "workdir": workdir,
        "nonce": nonce,
        "result": result_path,
        "check": check,
    }
    try:
        proc = _spawn(program, cfg, workdir, stdin)
    except OSError as exc:
        return ExecResult("harness_error", False, "", repr(exc), time.monotonic() - start)
    sup = _supervise(proc, time.monotonic() + timeout_s, limit, slot)
    result_text = None
    if not os.path.islink(result_path):
        try:
            with open(result_path, encoding="utf-8", errors="replace") as fh:
                result_text = fh.read(256)
        except OSError:
            pass
    stdout = sup["stdout"][:limit].decode("utf-8", errors="replace")
    stderr = sup["stderr"][-_STDERR_KEEP:].decode("utf-8", errors="replace")
    rc = proc.returncode
    verdict = sup["reason"] or _classify(rc, nonce, result_text, stderr)
    detail = {"returncode": rc, "slot": slot.index, "tree_killed": sup["clean"]}
    return ExecResult(
        verdict, verdict == "passed", stdout, stderr, time.monotonic() - start, detail
    )


def run_many(
    programs: Sequence[str | dict[str, Any]],
    workers: int,
    *,
    timeout_s: float = 3.0,
    **kwargs: Any,
) -> list[ExecResult]:
    """Run programs concurrently (one subprocess per job); results keep the input order.

    Each item is program source, or a dict of ``run_program`` keyword arguments with a
    ``program`` key. ``workers`` is capped at the slot count; prefer the number of cores,
    since wall-clock limits under oversubscription create false timeouts.
    """
    jobs = [p if isinstance(p, dict) else {"program": p} for p in programs]

    def _one(job: dict[str, Any]) -> ExecResult:
        args = {"timeout_s": timeout_s, **kwargs, **job}
        return run_program(args.pop("program"), **args)

    workers = max(1, min(workers, NUM_SLOTS))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_one, jobs))
