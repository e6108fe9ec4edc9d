"""Process sandbox for running untrusted generated Python programs.

Design (EVALUATION.md sections 3.2-3.3):

* **Supervisor.** This module never executes candidate code. It hands each sample to a worker
  *slot* (its own unprivileged uid, ``SLOT_UID_BASE + 32 * block + i``), enforces the wall-clock
  deadline and the output caps from outside, and at the end of every sample SIGKILLs the sample's
  process group and every process of the slot uid, then checks /proc that nothing survived.
* **Zygote per slot.** Starting ``python -I -S`` per sample costs tens of milliseconds, so each
  slot owns a small, single-threaded, pre-warmed root process (the zygote, ``_CHILD`` run with
  ``zygote``). It imports what the driver and typical tests need, enters an empty network
  namespace once (shared by the slot's samples, as the spec's one-netns-per-pool) and, on
  request, forks one child per sample; the supervisor passes the payload, stdin and the two
  output pipes over a SEQPACKET socket. The forked child, still root, starts a new session,
  unshares a mount namespace with fresh size-capped tmpfs on /tmp, /var/tmp and /dev/shm (the
  sample directory bound back in place), sets rlimits, drops to the slot uid, chdirs into its
  private directory, replaces the environment with an allowlist, and only then runs the trusted
  driver. The zygote reports the exit status, and on the supervisor's ``kill`` request it kills
  the group and all processes of the slot uid before reaping the child. If a zygote cannot be
  started the slot falls back to spawning ``python -I -S`` with the same driver and the same
  isolation steps (``set_start_method("spawn")`` forces that path).
* **Unforgeable verdict.** The pass signal is a per-run random nonce that the driver writes to a
  result file only after the candidate code returned, so early exits or fake success markers
  cannot pass; exit status and stdout are never a pass.
* **Isolation level.** ``isolation_report()`` runs a probe sample through the real path and
  reports what it observed; ``require_isolation()`` raises :class:`IsolationError` below the
  minimum of EVALUATION.md 3.2 item 17, i.e. unless *all* of these hold: rlimits, setsid,
  supervisor-side kill, a separate uid, no network (empty netns) and a private /tmp (mount
  namespace). Pass ``unsafe=True`` (``--unsafe``) to run anyway. cgroups are not used; fork
  bombs are bounded by RLIMIT_NPROC under the slot uid.
* **Re-runs.** ``run_many`` re-runs a ``harness_error`` once (item 12) and, when asked
  (``rerun_timeouts=True``; optional in item 2), every timeout once, sequentially at the end;
  the first verdict is kept in ``detail["first_verdict"]``. Results keep the input order, so
  they do not depend on the worker count.

Verdicts: ``passed``, ``failed``, ``timeout``, ``memory``, ``syntax_error``, ``error:<Type>``,
``crashed:<SIGNAME>``, ``no_result``, ``output_limit``, ``harness_error``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
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
CLONE_NEWNS = 0x00020000
SLOT_UID_BASE = 60000
NUM_SLOTS = 32
FSIZE_BYTES = 64 << 20
STACK_BYTES = 64 << 20
NOFILE = 256
NPROC = 256
HARNESS_EXIT = 120
PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
TMPFS_OPTIONS = "mode=1777,size=64m,nr_inodes=16384"
MINIMUM_LEVEL = (
    "rlimits",
    "session",
    "supervisor_kill",
    "uid_switch",
    "netns",
    "private_tmp_mount",
)
_STDERR_KEEP = 64 << 10
_ZYGOTE_TIMEOUT_S = 30.0

# Trusted code of the sandboxed child. It runs either as ``python -I -S -c _CHILD spawn FD``
# (one fresh interpreter per sample, the fallback) or as ``... zygote SOCK SETUP``: a small
# single-threaded root process per worker slot that pre-imports what the driver and typical tests
# need, enters the slot's network namespace once, and forks one child per sample on request.
# Everything the driver needs after the candidate code ran is bound to locals beforehand, because
# the candidate may patch os/sys/builtins (cases 46-47) or close every fd (case 42).
_CHILD = r"""
import os, sys

MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
PREWARM = ("json", "resource", "ctypes", "random", "traceback", "socket", "select", "shutil", "typing",
           "re", "collections", "math", "itertools", "functools", "string", "heapq", "bisect",
           "hashlib", "copy", "operator")


def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def call(name, *args):
        if getattr(libc, name)(*args) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, "%s%r: %s" % (name, args, os.strerror(errno)))

    return call


def _cover(call, dirs, keep, options):
    # A fresh tmpfs on each of dirs; then every path of keep that got hidden is bound back to
    # the same path (through an O_PATH fd opened before covering).
    held = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in keep]
    for path in dirs:
        call("mount", b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options)
    for path, fd in held:
        want = os.fstat(fd)
        try:
            now = os.stat(path)
            same = (now.st_dev, now.st_ino) == (want.st_dev, want.st_ino)
        except OSError:
            same = False
        if not same:
            os.makedirs(path, exist_ok=True)
            src = ("/proc/self/fd/%d" % fd).encode()
            call("mount", src, path.encode(), None, MS_BIND | MS_REC, None)
        os.close(fd)


def _shared_isolation(call, netns, expose):
    # Per zygote (or per spawned child): empty network namespace; and where the interpreter lies
    # under a dir the slot uid cannot traverse (here /root, mode 0700), a mount namespace in which
    # that dir is covered by an empty tmpfs (hiding its other contents) with the prefix bound back.
    if netns:
        call("unshare", CLONE_NEWNET)
    if expose:
        prefix, hide = expose
        call("unshare", CLONE_NEWNS)
        call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
        _cover(call, [hide], [prefix], b"mode=0755,size=1m")


def _private_tmp(call, dirs, options, keep):
    # Fresh size-capped tmpfs on /tmp, /var/tmp, /dev/shm in a new mount namespace, with keep (the
    # sample dir, or the slot's parent of sample dirs) bound back in place.
    if dirs:
        call("unshare", CLONE_NEWNS)
        call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
        _cover(call, dirs, [keep], options.encode())


def _wipe(dirs, keep):
    # Between two samples of a zygote: empty its private tmpfs dirs (the sample is dead by now).
    import shutil
    for top in dirs or ():
        for name in os.listdir(top):
            path = os.path.join(top, name)
            if keep == path or keep.startswith(path + "/"):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _read_payload(fd):
    import json
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    head, _, src = b"".join(chunks).partition(b"\n")
    return json.loads(head), src.decode("utf-8")


def _enter(call, cfg):
    # Per sample, still root: private /tmp etc., rlimits, uid drop, cwd, environment.
    import resource
    import builtins, random, traceback  # needed after the uid drop; stdlib may be unreadable
    _shared_isolation(call, cfg["netns"], cfg["expose"])
    _private_tmp(call, cfg["private_tmp"], cfg["tmpfs"], cfg["workdir"])
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
    os.environ.clear()
    os.environ.update(cfg["env"])
    sys.argv = ["-c"]


def _harness_error(exc):
    try:
        os.write(2, ("HARNESS_ERROR: %r\n" % (exc,)).encode())
    finally:
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


def _spawned(fd):
    try:
        call = _libc()
        cfg, src = _read_payload(fd)
        _enter(call, cfg)
    except BaseException as exc:
        _harness_error(exc)
    _main(cfg, src)


def _forked(call, fds):
    # In the zygote's child: never return into the zygote loop, whatever happens.
    try:
        try:
            payload, stdin, out, err = fds
            os.setsid()
            for target, fd in ((0, stdin), (1, out), (2, err), (3, payload)):
                if fd != target:
                    os.dup2(fd, target)
                os.set_inheritable(target, target < 3)
            os.closerange(4, 1 << 20)  # the zygote's socket among them
            cfg, src = _read_payload(3)
            _enter(call, cfg)
        except BaseException as exc:
            _harness_error(exc)
        _main(cfg, src)
    finally:
        os._exit(121)


def _kill_all(pid, uid, gid):
    # SIGKILL the sample's group, then (under a slot uid) every process of that uid: kill(-1)
    # from a helper running as that uid signals all of them in one kernel pass.
    try:
        os.killpg(pid, 9)
    except OSError:
        pass
    if uid is None:
        return
    helper = os.fork()
    if helper == 0:
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.kill(-1, 9)
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def _reap_orphans():
    # The zygote is a child subreaper: the sample's orphans (daemons, fork-bomb children) are
    # re-parented to it. Reap them now, or their zombies would keep counting against the slot
    # uid's RLIMIT_NPROC in the next sample. No child left means no descendant is left either
    # (orphans always come back to the subreaper): the slot is clean, no /proc scan needed.
    import time
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.001)
        except ChildProcessError:
            return True
    return False


def _serve(sock, call, fds, uid, gid, setup):
    pid = os.fork()
    if pid == 0:
        sock.close()
        _forked(call, fds)
    try:
        for fd in fds:
            os.close(fd)
        _watch(sock, pid, uid, gid, setup)
    except BaseException:
        _kill_all(pid, uid, gid)
        os._exit(1)


def _watch(sock, pid, uid, gid, setup):
    import select
    sock.send(b"pid %d" % pid)
    pidfd = os.pidfd_open(pid)
    watch = [sock, pidfd]
    exited = False
    while True:
        ready = select.select(watch, [], [])[0]
        if pidfd in ready:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            rc = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            sock.send(b"exit %d" % rc)
            exited = True
            watch = [sock]
        if sock in ready:
            msg = sock.recv(64)
            if msg and msg != b"kill":
                continue
            _kill_all(pid, uid, gid)
            status = os.waitpid(pid, 0)[1]
            os.close(pidfd)
            clean = _reap_orphans()
            _wipe(setup["private_tmp"], setup["keep"])
            if not msg:
                os._exit(0)
            if not exited:
                sock.send(b"exit %d" % os.waitstatus_to_exitcode(status))
            sock.send(b"done clean" if clean else b"done")
            return


def _zygote(sock_fd, setup):
    import json, socket
    for name in PREWARM:
        try:
            __import__(name)
        except ImportError:
            pass
    sock = socket.socket(fileno=sock_fd)
    try:
        call = _libc()
        setup = json.loads(setup)
        _shared_isolation(call, setup["netns"], setup["expose"])
        _private_tmp(call, setup["private_tmp"], setup["tmpfs"], setup["keep"])
        call("prctl", 36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except BaseException as exc:
        sock.send(("error %r" % (exc,)).encode())
        os._exit(1)
    sock.send(b"ready")
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 256, 4)
        words = msg.split()
        if not words:
            os._exit(0)
        if words[0] != b"run" or len(words) != 3 or len(fds) != 4:
            for fd in fds:
                os.close(fd)
            sock.send(b"error bad request")
            continue
        uid = None if words[1] == b"-" else int(words[1])
        gid = None if words[2] == b"-" else int(words[2])
        _serve(sock, call, fds, uid, gid, setup)


if sys.argv[1] == "zygote":
    _zygote(int(sys.argv[2]), sys.argv[3])
else:
    _spawned(int(sys.argv[2]))
"""


class IsolationError(RuntimeError):
    """The sandbox cannot reach the minimum isolation level (and ``unsafe`` was not given)."""


@dataclass
class ExecResult:
    """Outcome of one sandboxed program run; ``passed`` is True only for verdict ``passed``."""

    verdict: str
    passed: bool
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


class _Zygote:
    """Supervisor's handle on one slot's zygote: a SEQPACKET socket plus the process."""

    def __init__(self, setup: dict[str, Any]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _CHILD, "zygote", str(theirs.fileno()),
                 json.dumps(setup)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=_base_env("/"),
                cwd="/",
                start_new_session=True,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        ours.settimeout(_ZYGOTE_TIMEOUT_S)
        try:
            msg = ours.recv(4096)
        except OSError as exc:
            msg = repr(exc).encode()
        if msg != b"ready":
            self.close()
            raise OSError(f"sandbox zygote failed to start: {msg.decode(errors='replace')!r}")

    def start(self, fds: list[int], slot: _Slot) -> int:
        ids = [b"-" if v is None else str(v).encode() for v in (slot.uid, slot.gid)]
        socket.send_fds(self.sock, [b"run " + b" ".join(ids)], fds)
        reply = self.sock.recv(64)
        if not reply.startswith(b"pid "):
            raise OSError(f"sandbox zygote refused the sample: {reply!r}")
        return int(reply.split()[1])

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()


@dataclass
class _Slot:
    index: int
    uid: int | None
    gid: int | None
    zygote: _Zygote | None = None
    root: str | None = None


class _ForkedRun:
    """A sample forked by a zygote; exit status and clean-up go through the zygote."""

    def __init__(self, slot: _Slot, pid: int) -> None:
        assert slot.zygote is not None
        self.slot, self.zygote, self.pid = slot, slot.zygote, pid
        self.returncode: int | None = None
        self.lost = False  # the zygote died: no exit status, clean-up from the supervisor
        self.wait_fd: int | None = self.zygote.sock.fileno()

    def on_ready(self) -> None:
        try:
            msg = self.zygote.sock.recv(64)
        except OSError:
            msg = b""
        if msg.startswith(b"exit "):
            self.returncode = int(msg.split()[1])
        elif not msg:
            self.lost = True

    def done(self) -> bool:
        return self.returncode is not None or self.lost

    def kill(self) -> bool:
        if not self.lost:
            try:
                self.zygote.sock.send(b"kill")
                while not (msg := self.zygote.sock.recv(64)).startswith(b"done"):
                    if not msg:
                        raise OSError("zygote closed its socket")
                    if msg.startswith(b"exit "):
                        self.returncode = int(msg.split()[1])
            except OSError:
                self.lost = True
        if self.lost:
            self.slot.zygote = None
            self.zygote.close()
            return _kill_slot(self.pid, self.slot)
        if msg != b"done clean" and self.slot.uid is not None and _uid_pids(self.slot.uid):
            return _kill_slot(self.pid, self.slot)
        return True


class _SpawnedRun:
    """A sample in a freshly spawned interpreter (fallback path)."""

    def __init__(self, slot: _Slot, proc: subprocess.Popen[bytes]) -> None:
        self.slot, self.proc, self.pid = slot, proc, proc.pid
        self.wait_fd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self.wait_fd = os.pidfd_open(proc.pid)
        self.returncode: int | None = None
        self.lost = False

    def on_ready(self) -> None:
        pass

    def done(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> bool:
        clean = _kill_slot(self.pid, self.slot)
        self.returncode = self.proc.wait()
        if self.wait_fd is not None:
            os.close(self.wait_fd)
        return clean


_SLOTS: _SlotPool | None = None
_SLOTS_LOCK = threading.Lock()
_PROBE: dict[str, Any] = {}
_REPORT: dict[str, Any] = {}
_START = {"method": "zygote", "zygote_error": None}
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")


def set_start_method(method: str) -> None:
    """``"zygote"`` (default: fork from a warm per-slot process) or ``"spawn"`` (a fresh
    ``python -I -S`` per sample). Both apply the same isolation steps."""
    if method not in ("zygote", "spawn"):
        raise ValueError(f"unknown start method {method!r}")
    with _SLOTS_LOCK:
        _START["method"] = method
        _START["zygote_error"] = None
        _REPORT.clear()


def _uid_switch_available() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


_NS_PROBE = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
net = libc.unshare({CLONE_NEWNET}) == 0
mnt = (libc.unshare({CLONE_NEWNS}) == 0
       and libc.mount(b"none", b"/", None, 16384 | (1 << 18), None) == 0
       and libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 6, b"size=1m") == 0)
sys.stdout.write(str(int(net)) + " " + str(int(mnt)))
"""


def _probe_namespaces() -> dict[str, bool]:
    """Check once whether a child can unshare its network and mount namespaces."""
    with _SLOTS_LOCK:
        if "netns" not in _PROBE:
            out = ""
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [sys.executable, "-I", "-S", "-c", _NS_PROBE],
                    env=_base_env("/"),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                ).stdout
            net, mnt = [*out.split(), "0", "0"][:2]
            _PROBE["netns"], _PROBE["mountns"] = net == "1", mnt == "1"
        return {"netns": _PROBE["netns"], "mountns": _PROBE["mountns"]}


def _probe_netns() -> bool:
    return _probe_namespaces()["netns"]


class _SlotPool:
    """Worker slots; each concurrent sample holds one, so per-uid kills never collide.

    With zygotes the most recently used slot is handed out first, so a run with N workers keeps
    reusing the same N zygotes. Without them the least recently used one is, so that a slot uid
    whose orphans init has not reaped yet (their zombies count against RLIMIT_NPROC) rests.
    """

    def __init__(self, slots: list[_Slot]) -> None:
        self._free = collections.deque(slots)
        self._cond = threading.Condition()

    def get(self) -> _Slot:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._free))
            return self._free.pop() if _zygote_enabled() else self._free.popleft()

    def put(self, slot: _Slot) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()


def _slots() -> _SlotPool:
    global _SLOTS
    with _SLOTS_LOCK:
        if _SLOTS is None:
            root = _uid_switch_available()
            base = SLOT_UID_BASE + NUM_SLOTS * _claim_uid_block() if root else None
            uids = [base + i if base is not None else None for i in range(NUM_SLOTS)]
            _SLOTS = _SlotPool([_Slot(i, uid, uid) for i, uid in enumerate(uids)])
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


def _expose_plan() -> list[str] | None:
    """[prefix, hidden_dir] when the stdlib lies under a dir the slot uid cannot traverse.

    Here the interpreter lives in /root/.pyenv (/root is mode 0700): after the uid drop it could
    not import anything, so the child covers /root and binds the prefix back (see ``_CHILD``).
    ``None`` when not needed.
    """
    if not _uid_switch_available():
        return None
    prefix = os.path.realpath(sys.base_prefix)
    parts = prefix.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return [prefix, ancestor]
    return None


def _private_tmp_dirs() -> list[str] | None:
    if not (_uid_switch_available() and _probe_namespaces()["mountns"]):
        return None
    return [d for d in PRIVATE_TMP_DIRS if os.path.isdir(d) and not os.path.islink(d)]


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
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as fh:
                status = fh.read(4096)
        except OSError:
            continue
        state = status.partition(b"\nState:")[2][:4].strip()
        if state[:1] in (b"Z", b"X"):
            continue
        uid_field = status.partition(b"\nUid:")[2].split(None, 1)[:1]
        if uid_field and int(uid_field[0]) == uid:
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


def _read_ready(
    sel: selectors.BaseSelector, bufs: dict[int, bytearray], limit: int, timeout: float
) -> list[Any]:
    """Read whatever the pipes hold; returns the non-pipe keys that became ready."""
    others = []
    for key, _ in sel.select(timeout):
        if key.data != "pipe":
            others.append(key)
            continue
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
    return others


def _supervise(
    run: _ForkedRun | _SpawnedRun, pipes: tuple[int, int], deadline: float, limit: int
) -> dict:
    """Drain both pipes until exit, deadline or output cap; then kill the whole slot."""
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    for fd in pipes:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, "pipe")
        bufs[fd] = bytearray()
    if run.wait_fd is not None:
        sel.register(run.wait_fd, selectors.EVENT_READ, "exit")

    def overflow() -> bool:
        return any(len(buf) > limit for buf in bufs.values())

    reason = None
    while not run.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            reason = "timeout"
            break
        wait = min(remaining, 0.25 if run.wait_fd is not None else 0.02)
        if _read_ready(sel, bufs, limit, wait):
            run.on_ready()
        if overflow():
            reason = "output_limit"
            break
    if run.wait_fd is not None:
        sel.unregister(run.wait_fd)
    # Do not wait for EOF that grandchildren may hold back: kill first, then drain briefly.
    clean = run.kill()
    grace = time.monotonic() + 0.5
    while sel.get_map() and time.monotonic() < grace:
        _read_ready(sel, bufs, limit, 0.05)
    sel.close()
    if reason is None and overflow():
        reason = "output_limit"
    out, err = (bytes(bufs[fd]) for fd in pipes)
    return {"reason": reason, "stdout": out, "stderr": err, "clean": clean}


def _classify(rc: int | None, nonce: str, result_text: str | None, stderr: str) -> str:
    """Verdict when neither the deadline nor the output cap fired (``rc`` None: status lost)."""
    if result_text is not None:
        head, _, verdict = result_text.strip().partition(" ")
        if secrets.compare_digest(head, nonce) and rc in (0, None):
            return verdict
    if rc is None:
        return "harness_error"
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


def _slot_root(slot: _Slot) -> str:
    """The slot's parent of sample dirs (root-owned, traverse-only); removed at exit."""
    if slot.root is None:
        root = tempfile.mkdtemp(prefix=f"wmtp-sbx{slot.index}-")
        os.chmod(root, 0o711)
        atexit.register(shutil.rmtree, root, True)
        slot.root = root
    return slot.root


def _make_workdir(slot: _Slot) -> str:
    workdir = tempfile.mkdtemp(prefix="s-", dir=_slot_root(slot))
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


def _zygote_enabled() -> bool:
    return _START["method"] == "zygote" and _START["zygote_error"] is None


def _zygote_for(slot: _Slot) -> _Zygote | None:
    """The slot's zygote, started on first use; None when the spawn path must be used."""
    if not _zygote_enabled():
        return None
    if slot.zygote is None or slot.zygote.proc.poll() is not None:
        if slot.zygote is not None:
            slot.zygote.close()
        slot.zygote = None
        setup = {
            "netns": _probe_netns(),
            "expose": _expose_plan(),
            "private_tmp": _private_tmp_dirs(),
            "tmpfs": TMPFS_OPTIONS,
            "keep": _slot_root(slot),
        }
        try:
            slot.zygote = _Zygote(setup)
        except OSError as exc:
            _START["zygote_error"] = str(exc)  # fall back to spawning for the rest of the run
            return None
    return slot.zygote


def _start(
    slot: _Slot, cfg: dict, src: str, stdin: str | None, out_w: int, err_w: int
) -> _ForkedRun | _SpawnedRun:
    """Start the sample by fork from the slot's zygote, or by spawn if there is none."""
    with contextlib.ExitStack() as stack:
        # Both files are closed in the supervisor once the child (or zygote) holds them.
        payload = stack.enter_context(tempfile.TemporaryFile())
        stdin_file = stack.enter_context(
            open(os.devnull, "rb") if stdin is None else tempfile.TemporaryFile()  # noqa: SIM115
        )
        if stdin is not None:
            # A file rather than a pipe: a large input can never block the supervisor.
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
        zygote = _zygote_for(slot)
        if zygote is not None:  # the zygote has done these once for all its samples
            cfg = {**cfg, "netns": False, "private_tmp": None, "expose": None}
        else:
            cfg = {**cfg, "expose": _expose_plan()}
        payload.write(json.dumps(cfg).encode() + b"\n" + src.encode("utf-8"))
        payload.seek(0)
        if zygote is not None:
            fds = [payload.fileno(), stdin_file.fileno(), out_w, err_w]
            try:
                return _ForkedRun(slot, zygote.start(fds, slot))
            except OSError:
                slot.zygote = None
                zygote.close()  # this sample goes the spawn way; the next one restarts it
        return _SpawnedRun(
            slot,
            subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _CHILD, "spawn", str(payload.fileno())],
                stdin=stdin_file,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(payload.fileno(),),
                env=cfg["env"],
                cwd=cfg["workdir"],
                start_new_session=True,
                close_fds=True,
            ),
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
        "private_tmp": _private_tmp_dirs(),
        "tmpfs": TMPFS_OPTIONS,
        "limits": _limits(timeout_s, memory_mb),
        "uid": slot.uid,
        "gid": slot.gid,
        "workdir": workdir,
        "env": _base_env(workdir),
        "nonce": nonce,
        "result": result_path,
        "check": check,
    }
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        try:
            run = _start(slot, cfg, program, stdin, out_w, err_w)
        except OSError as exc:
            return ExecResult("harness_error", False, "", repr(exc), time.monotonic() - start)
        finally:
            os.close(out_w)
            os.close(err_w)
        sup = _supervise(run, (out_r, err_r), time.monotonic() + timeout_s, limit)
    finally:
        os.close(out_r)
        os.close(err_r)
    result_text = None
    if not os.path.islink(result_path):
        try:
            with open(result_path, encoding="utf-8", errors="replace") as fh:
                result_text = fh.read(256)
        except OSError:
            pass
    stdout = sup["stdout"][:limit].decode("utf-8", errors="replace")
    stderr = sup["stderr"][-_STDERR_KEEP:].decode("utf-8", errors="replace")
    rc = run.returncode
    verdict = sup["reason"] or _classify(rc, nonce, result_text, stderr)
    detail = {
        "returncode": rc,
        "slot": slot.index,
        "uid": slot.uid,
        "tree_killed": sup["clean"],
        "start": "fork" if isinstance(run, _ForkedRun) else "spawn",
    }
    return ExecResult(
        verdict, verdict == "passed", stdout, stderr, time.monotonic() - start, detail
    )


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
    ``program`` key. ``workers`` is capped at the slot count; prefer the number of cores,
    since wall-clock limits under oversubscription create false timeouts.

    After the parallel pass, samples whose verdict was ``harness_error`` (and, with
    ``rerun_timeouts``, ``timeout``) are run once more, one at a time in input order; their
    result records the first verdict in ``detail["first_verdict"]`` (count flips with
    :func:`rerun_flips`).
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

    workers = max(1, min(workers, NUM_SLOTS))
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


_ISOLATION_PROBE = r"""
import json, os, resource, socket, sys
canaries = json.loads(sys.stdin.read())
seen = {}
try:
    s = socket.socket()
    s.settimeout(1)
    s.connect(("127.0.0.1", 9))
    seen["net"] = "connected"
except OSError as exc:
    seen["net"] = exc.errno
try:
    seen["interfaces"] = [name for _, name in socket.if_nameindex()]
except OSError:
    seen["interfaces"] = None
seen["uid"], seen["gid"], seen["groups"] = os.getuid(), os.getgid(), os.getgroups()
seen["session_leader"] = os.getsid(0) == os.getpid()
seen["host_tmp_visible"] = [c for c in canaries if os.path.exists(c)]
mounts = {}
with open("/proc/self/mountinfo") as fh:
    for line in fh:
        left, _, right = line.partition(" - ")
        mounts[left.split()[4]] = right.split()[0]
seen["tmpfs"] = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if mounts.get(d) == "tmpfs"]
try:
    with open("/tmp/.probe", "w") as fh:
        fh.write("x")
    seen["tmp_writable"] = True
except OSError:
    seen["tmp_writable"] = False
seen["limits"] = {n: resource.getrlimit(getattr(resource, n))[0]
                  for n in ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NPROC")}
seen["env"] = sorted(os.environ)
print(json.dumps(seen))
"""


def _run_isolation_probe() -> dict[str, Any]:
    canaries = []
    for base in ("/tmp", "/dev/shm"):
        if os.path.isdir(base):
            path = os.path.join(base, f".wmtp-canary-{secrets.token_hex(8)}")
            with open(path, "w") as fh:
                fh.write("host")
            canaries.append(path)
    try:
        result = run_program(
            _ISOLATION_PROBE, stdin=json.dumps(canaries), timeout_s=20.0, check="stdio"
        )
    finally:
        for path in canaries:
            with contextlib.suppress(OSError):
                os.remove(path)
    if result.verdict != "passed":
        return {"probe_error": f"{result.verdict}: {result.stderr.strip()[-300:]}"}
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    seen["start"] = result.detail.get("start")
    seen["tree_killed"] = result.detail.get("tree_killed")
    return seen


def isolation_report(refresh: bool = False) -> dict[str, Any]:
    """Which isolation layers a sample actually gets here, observed by a probe sample run
    through the real start path (cached; ``refresh`` re-probes). ``summary`` is one line."""
    with _SLOTS_LOCK:
        if _REPORT and not refresh:
            return dict(_REPORT)
    ns = _probe_namespaces()
    seen = _run_isolation_probe()
    ok = "probe_error" not in seen
    root = _uid_switch_available()
    limits = seen.get("limits", {})
    env_ok = ok and set(seen["env"]) == set(_base_env("/"))
    report: dict[str, Any] = {
        "session": ok and seen["session_leader"],
        "rlimits": ok and limits.get("RLIMIT_AS") == 2048 << 20 and limits.get("RLIMIT_CORE") == 0,
        "netns": ok and ns["netns"] and seen["net"] == 101 and seen["interfaces"] in (["lo"], []),
        "uid_switch": ok and root and seen["uid"] != 0 and seen["gid"] != 0 and not seen["groups"],
        "kill_all_of_uid": ok and root and seen["uid"] != 0,
        "rlimit_nproc_effective": ok and seen["uid"] != 0 and limits.get("RLIMIT_NPROC") == NPROC,
        "mount_ns": ns["mountns"] and root,
        "private_tmp_mount": ok
        and not seen["host_tmp_visible"]
        and seen["tmp_writable"]
        and "/tmp" in seen["tmpfs"],
        "cgroup": False,
        "scrubbed_env": env_ok,
        "supervisor_kill": ok and bool(seen["tree_killed"]),
        "zygote": ok and seen["start"] == "fork",
        "zygote_error": _START["zygote_error"],
    }
    if not ok:
        report["probe_error"] = seen["probe_error"]
    report["missing"] = [key for key in MINIMUM_LEVEL if not report[key]]
    report["level"] = "full" if not report["missing"] else "below-minimum"
    report["summary"] = _summary(report)
    with _SLOTS_LOCK:
        _REPORT.clear()
        _REPORT.update(report)
    return dict(report)


def _summary(report: dict[str, Any]) -> str:
    def yes(key: str) -> str:
        return "yes" if report[key] else "NO"

    start = "fork from zygote" if report["zygote"] else "spawn per sample"
    line = (
        f"sandbox isolation: {report['level']} (network namespace {yes('netns')}, "
        f"uid switch {yes('uid_switch')}, mount namespace + private /tmp {yes('private_tmp_mount')}, "
        f"rlimits {yes('rlimits')}, setsid {yes('session')}, "
        f"supervisor kill {yes('supervisor_kill')}; {start})"
    )
    if report["missing"]:
        line += f"; missing: {', '.join(report['missing'])}"
    return line


def require_isolation(unsafe: bool = False) -> dict[str, Any]:
    """Probe the sandbox and refuse to go on below the minimum level.

    Returns :func:`isolation_report` (print its ``summary``). Raises :class:`IsolationError`,
    with a one-line message, when a layer of ``MINIMUM_LEVEL`` is missing, unless ``unsafe``.
    """
    report = isolation_report()
    if report["missing"] and not unsafe:
        raise IsolationError(
            f"sandbox isolation below the minimum (missing: {', '.join(report['missing'])}); "
            "refusing to run untrusted code: run as root on Linux with namespaces, or pass --unsafe"
        )
    return report
