"""The code that runs inside a worker's jail (docs/EVALUATION.md §4).

Standard library only, and no import from this package: the supervisor compiles it and hands
the bytecode to ``python -s -P -S`` inside bubblewrap (``jail.BOOTSTRAP``), where nothing of the
project is mounted. Tests import it as an ordinary module (the codec, the seccomp filter).

Roles, all forked from one pre-warmed process per jail, the *zygote*:

* **sample** (``_start_sample``, ``_sample``, ``_runner``): every sample gets a fresh PID
  namespace whose PID 1 is a *holder* that only waits (a clone sharing the zygote's memory, no
  Python), and the sample's process is forked into it as PID 2, so programs keep the signal
  semantics of an ordinary process. It enters fresh IPC, mount and network namespaces, mounts
  its own ``/proc`` and one size-capped tmpfs (its ``/tmp``, also bound on ``/var/tmp`` and
  ``/dev/shm``), drops every capability, sets rlimits, ``no_new_privs``, a seccomp filter and a
  scrubbed environment, and runs the candidate. Killing the holder ends the namespace: the
  kernel kills everything in it; the tmpfs and IPC objects go with the namespaces.
* **tester** (``_tester``, strict function tasks): one long-lived trusted process per jail
  that runs the test code of one sample at a time and calls the candidate's functions through
  a socket that carries plain data only (``encode``/``decode``). It lives outside the samples'
  PID namespaces, so no candidate can see or signal it; a sample that ends without its verdict
  costs the tester its life (it may be stuck), and the next sample gets a fresh one.
* **zygote** (``zygote``): first makes itself PID 1 of a PID namespace of its own (so it can
  return there after starting each sample's), then receives one sample at a time from the
  supervisor (the payloads as file descriptors it never reads), starts the roles, enforces the
  CPU-time limit of the sample's processes, and reports exit status, the verdict line and CPU
  time back.
"""

# ruff: noqa: SIM105  (the driver binds what it needs before the candidate runs; no contextlib)
from __future__ import annotations

import builtins
import ctypes
import gc
import json
import os
import platform
import resource
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWUSER = 0x20000, 0x08000000, 0x20000000, 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME = 1, 4, 15
PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 22, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
HARNESS_EXIT = 120
PREWARM = (
    "json", "random", "traceback", "typing", "re", "collections", "math", "itertools",
    "functools", "string", "heapq", "bisect", "hashlib", "copy", "operator", "fractions",
    "decimal", "statistics", "datetime",
)  # fmt: skip

# --- plain-data channel (strict mode) --------------------------------------------------------

MAX_MESSAGE = 16 << 20
MAX_DEPTH = 100
# At most this many items (keys) of one decoded set or dict may share a hash value: items of
# equal hash make building the set quadratic (20,000 ints k * (2**61 - 1): 6 s of the trusted
# tester's CPU, outside the sample's limit). Real data has a handful at most (-1 and -2 share
# one); a peer's message with more is refused before anything is built (docs/EVALUATION.md §4.3).
MAX_EQUAL_HASHES = 16
MAX_EXCEPTION_MESSAGE = 1000  # characters of a candidate's exception message carried back


class ProtocolError(Exception):
    """A message on the channel that is not well-formed plain data."""


class Handle:
    """An opaque reference to an object that stays inside the sandbox (a candidate's class
    instance, say): it can be passed back, called, or asked for an attribute, nothing else."""

    __slots__ = ("_ref", "_remote")

    def __init__(self, ref: int, remote: Any) -> None:
        self._ref, self._remote = ref, remote

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._remote.call(["h", self._ref], args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._remote.getattr(self._ref, name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Handle) and other._ref == self._ref

    def __hash__(self) -> int:
        return hash(("handle", self._ref))

    def __repr__(self) -> str:
        return f"<sandboxed object {self._ref}>"


def encode(value: Any, handle_of: Any = None, depth: int = 0) -> Any:
    """A JSON-able form of plain data with exact types: None, bool, int, float, str, bytes, list,
    tuple, dict, set, frozenset. Anything else becomes ``["h", ref]`` through ``handle_of``
    (the candidate's side), or raises TypeError (the trusted side passes no other objects)."""
    if depth > MAX_DEPTH:
        raise ProtocolError("value nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return ["i", format(value, "x")]
    if kind is float:
        return ["f", value.hex()]
    if kind is bytes:
        return ["b", value.hex()]
    if kind in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "s", frozenset: "F"}[kind]
        return [tag, [encode(v, handle_of, depth + 1) for v in value]]
    if kind is dict:
        return ["d", [[encode(k, handle_of, depth + 1), encode(v, handle_of, depth + 1)]
                      for k, v in value.items()]]  # fmt: skip
    if kind is Handle:
        return ["h", value._ref]
    if handle_of is None:
        raise TypeError(f"cannot pass a {kind.__name__} to the sandboxed candidate")
    return ["h", handle_of(value)]


def decode(obj: Any, handle: Any, depth: int = 0) -> Any:
    """The inverse of :func:`encode`; validates everything (the peer may be hostile)."""
    if depth > MAX_DEPTH:
        raise ProtocolError("value nested too deeply")
    if obj is None or type(obj) in (bool, str):
        return obj
    if type(obj) is not list or len(obj) != 2 or type(obj[0]) is not str:
        raise ProtocolError("malformed value")
    tag, body = obj
    try:
        if tag == "i" and type(body) is str and len(body) <= (1 << 22):
            return int(body, 16)
        if tag == "f" and type(body) is str:
            return float.fromhex(body)
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "h" and type(body) is int:
            return handle(body)
        if type(body) is not list:
            raise ProtocolError("malformed container")
        if tag == "d":
            pairs = []
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise ProtocolError("malformed dict item")
                pairs.append(
                    (decode(pair[0], handle, depth + 1), decode(pair[1], handle, depth + 1))
                )
            _check_hashes([key for key, _ in pairs])
            return dict(pairs)
        items = [decode(v, handle, depth + 1) for v in body]
        if tag == "l":
            return items
        if tag == "t":
            return tuple(items)
        if tag == "s":
            return set(_check_hashes(items))
        if tag == "F":
            return frozenset(_check_hashes(items))
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"bad {tag!r} value: {type(exc).__name__}") from None
    raise ProtocolError(f"unknown tag {tag!r}")


def _check_hashes(items: list[Any]) -> list[Any]:
    """``items`` if at most MAX_EQUAL_HASHES of them share a hash value, else ProtocolError:
    linear work before a set or dict is built from a peer's items (TypeError if unhashable)."""
    counts: dict[int, int] = {}
    for item in items:
        h = hash(item)
        seen = counts[h] = counts.get(h, 0) + 1
        if seen > MAX_EQUAL_HASHES:
            raise ProtocolError("too many items of equal hash")
    return items


def send_message(sock: socket.socket, message: Any) -> None:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("message too large")
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv_message(sock: socket.socket) -> Any:
    """One framed message; EOFError when the peer is gone, ProtocolError when it misbehaves."""
    head = _recv_exact(sock, 4)
    (size,) = struct.unpack(">I", head)
    if size > MAX_MESSAGE:
        raise ProtocolError("message too large")
    try:
        return json.loads(_recv_exact(sock, size).decode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError):
        raise ProtocolError("message is not JSON") from None


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            raise EOFError("channel closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --- kernel helpers ----------------------------------------------------------------------------

_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _call(name: str, *args: Any) -> None:
    if getattr(_libc(), name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _mount(src: bytes, target: bytes, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    try:
        _call("mount", src, target, fstype, flags, data)
    except OSError as exc:
        raise OSError(exc.errno, f"mount {target.decode()}: {exc.strerror}") from None


def _remount_read_only(path: str) -> None:
    """Bind-remount ``path`` read-only, keeping the flags the kernel locks in a user namespace."""
    st = os.statvfs(path).f_flag
    keep = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for st_bit, ms_bit in keep.items():
        if st & st_bit:
            flags |= ms_bit
    _mount(b"none", path.encode(), None, flags, None)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


def drop_capabilities() -> None:
    """Empty the effective, permitted, inheritable and ambient sets; set no_new_privs."""
    _call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    _call("capset", ctypes.byref(header), data)
    _call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


# Syscalls a sample never needs that reach state outside it: the kernel keyrings (which outlive
# processes), tracing and cross-process memory access. Numbers per architecture, with the number
# of rt_sigaction: a sample may not change SIGCHLD's disposition, because children reaped
# automatically (SIG_IGN, SA_NOCLDWAIT) would take their CPU time out of the sample's account.
_DENIED_SYSCALLS = {
    "x86_64": (0xC000003E, 13, {"add_key": 248, "request_key": 249, "keyctl": 250,
                                "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311}),
    "aarch64": (0xC00000B7, 134, {"add_key": 217, "request_key": 218, "keyctl": 219,
                                  "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271}),
}  # fmt: skip
SIGCHLD_NUMBER = 17  # on both architectures above


def seccomp_program(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp filter: kill on a foreign architecture; EPERM for the denied
    syscalls, for the x32 ABI on x86-64, and for setting a SIGCHLD action; allow the rest.
    None on an architecture we have no table for."""
    name = machine or platform.machine()
    if name not in _DENIED_SYSCALLS:
        return None
    audit_arch, sigaction, numbers = _DENIED_SYSCALLS[name]
    # (opcode, k, jump-if-true label, jump-if-false label); None falls through.
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    prog: list[tuple[int, int, str | None, str | None]] = [
        (ld, 4, None, None), (jeq, audit_arch, None, "kill"), (ld, 0, None, None),
    ]  # fmt: skip
    if name == "x86_64":
        prog.append((jge, 0x40000000, "eperm", None))
    prog += [(jeq, nr, "eperm", None) for nr in sorted(numbers.values())]
    prog += [
        (jeq, sigaction, None, "allow"),
        (ld, 16, None, None), (jeq, SIGCHLD_NUMBER, None, "allow"),  # args[0]: the signal
        (ld, 24, None, None), (jeq, 0, None, "eperm"),  # args[1]: the new action, low half
        (ld, 28, None, None), (jeq, 0, "allow", "eperm"),  # high half: NULL only queries
    ]  # fmt: skip
    labels = {"allow": len(prog), "eperm": len(prog) + 1, "kill": len(prog) + 2}
    out = []
    for i, (op, k, jt, jf) in enumerate(prog):
        hop = [0 if label is None else labels[label] - i - 1 for label in (jt, jf)]
        out.append(struct.pack("HBBI", op, hop[0], hop[1], k))
    for k in (0x7FFF0000, 0x00050001, 0x80000000):  # allow, EPERM, kill the process
        out.append(struct.pack("HBBI", ret, 0, 0, k))
    return b"".join(out)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


_SECCOMP: bytes | None = None  # built once in the zygote; each runner only installs it


def _install_seccomp() -> None:
    prog = _SECCOMP if _SECCOMP is not None else seccomp_program()
    if prog is None:
        return
    _call("prctl", PR_SET_SECCOMP, 2, ctypes.byref(_Fprog(len(prog) // 8, prog)), 0, 0)


def _arrange(fds: dict[int, int]) -> None:
    """Make ``fds`` (target -> source) the process's only descriptors, all inheritable."""
    import fcntl

    moved = {target: fcntl.fcntl(src, fcntl.F_DUPFD, 1000) for target, src in fds.items()}
    for target, tmp in moved.items():
        os.dup2(tmp, target)
    os.closerange(max(fds) + 1, 1 << 20)
    for target in fds:
        os.set_inheritable(target, True)


def _name(role: bytes) -> None:
    """Name the process after its role (``ps``, ``top`` and profilers show it)."""
    _libc().prctl(PR_SET_NAME, ctypes.c_char_p(b"wmtp-" + role), 0, 0, 0)


def _fatal(exc: BaseException) -> None:
    try:
        os.write(2, f"HARNESS_ERROR: {exc!r}\n".encode())
    finally:
        os._exit(HARNESS_EXIT)


def _read_fd(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


# --- the sample: namespaces, init, runner --------------------------------------------------------


CLONE_VM, CLONE_FILES = 0x100, 0x400
SIGCHLD_FLAG = 17  # the exit signal in clone's flags: SIGCHLD, as fork() has it
_OWN_PID_NS = -1  # the zygote's own PID namespace, to return to after starting a sample
_HOLDER_STACK: Any = None  # the stack of the namespace holders (one alive at a time)


def _own_pid_namespace() -> None:
    """Make the zygote PID 1 of a PID namespace of its own, with its own /proc.

    The jail's PID namespace belongs to bubblewrap's outer user namespace (``--disable-userns``
    runs us in a nested one), so a process here could not ``setns`` back to it; into a
    namespace made here it can, which is what starting each sample takes (``_start_sample``).
    The process that was the zygote stays behind, waits for it and leaves with it."""
    global _OWN_PID_NS
    _call("unshare", CLONE_NEWPID | CLONE_NEWNS)
    child = os.fork()
    if child:
        os.closerange(3, 1 << 16)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    _mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    _mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    _OWN_PID_NS = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)


def _start_sample(cfg: dict[str, Any], fds: dict[int, int]) -> tuple[int, int | None]:
    """Start a sample: ``(runner, holder)``.

    In a jail, the sample gets a fresh PID namespace whose PID 1 is a *holder*: a thread-like
    clone sharing the zygote's memory that only waits in ``pause()`` (no Python, no copy of
    the zygote's pages). The runner is forked into that namespace as PID 2, so a candidate
    keeps the ordinary signal semantics of a non-init process; killing the holder ends the
    namespace and everything in it. Orphans of the sample are re-parented to the holder and
    stay zombies until then. Without a jail (--unsafe) the sample is the runner's parent
    process, as ``_init`` describes."""
    global _HOLDER_STACK
    if not cfg["isolate"]:
        return _fork(_init, fds, cfg), None
    libc = _libc()
    if _HOLDER_STACK is None:
        _HOLDER_STACK = ctypes.create_string_buffer(1 << 16)
    top = (ctypes.addressof(_HOLDER_STACK) + len(_HOLDER_STACK) - 64) & ~15
    pause = ctypes.cast(libc.pause, ctypes.c_void_p)
    _call("unshare", CLONE_NEWPID)
    holder = runner = None
    try:
        # The holder runs no code of its own before pause(), so what it must not have is
        # arranged by the clone (docs/EVALUATION.md §4.1):
        # * CLONE_FILES: it shares the zygote's descriptor table instead of keeping copies of
        #   it (the sample's channel end and stdout/stderr, the tests' memfd, the zygote's
        #   sockets), so the tester sees end-of-file when the sample's process goes away, and
        #   the trusted tests, which the zygote closes at once, are not open in PID 1.
        # * every signal blocked (the mask is inherited; the zygote's own comes back at once):
        #   the holder has copies of the zygote's handlers, and a sample's os.kill(1, SIGINT)
        #   would run the zygote's Python handler, in the zygote's memory, and end the jail.
        #   Blocked, a signal from the sample stays pending; SIGKILL from the zygote still ends
        #   the holder, and nothing in the namespace may send it to its PID 1.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            flags = CLONE_VM | CLONE_FILES | SIGCHLD_FLAG
            holder = libc.clone(pause, ctypes.c_void_p(top), ctypes.c_int(flags), None)
            errno = ctypes.get_errno()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if holder < 0:
            raise OSError(errno, f"clone: {os.strerror(errno)}")
        runner = _fork(_sample, fds, cfg)
    finally:
        _call("setns", _OWN_PID_NS, CLONE_NEWPID)
        if runner is None and holder is not None and holder > 0:
            _kill(holder)
            os.waitpid(holder, 0)
    return runner, holder


def _sample(cfg: dict[str, Any]) -> None:
    """PID 2 of the sample's PID namespace: fresh IPC, mount and network namespaces, a private
    /proc and tmpfs, no capabilities; then the runner. fds: 0-2 stdio, 3 program, 4 channel
    (strict) or verdict pipe. Never returns."""
    try:
        os.setsid()  # the zygote's process group is not the sample's
        _call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _call("unshare", CLONE_NEWIPC | CLONE_NEWNS | CLONE_NEWNET)
        _mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
        # /dev is the jail's own tmpfs, read-only since the jail started (jail.py).
        _mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        _mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, cfg["tmpfs"].encode())
        for path in (b"/var/tmp", b"/dev/shm"):
            _mount(b"/tmp", path, None, MS_BIND, None)
        os.mkdir("/tmp/work", 0o755)
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")  # inherited: under memory pressure the sample goes first
        drop_capabilities()
    except BaseException as exc:
        _fatal(exc)
    _runner(cfg)


def _init(cfg: dict[str, Any]) -> None:
    """--unsafe without a jail: a scratch directory of the same user, a runner, and this
    process reaping until it ends. fds as for ``_sample``. Never returns."""
    try:
        os.setsid()
        _call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _name(b"init")
        import tempfile

        cfg["workdir"] = tempfile.mkdtemp(prefix="wmtp-unsafe-")
        cfg["env"].update(HOME=cfg["workdir"], TMPDIR=cfg["workdir"])
        drop_capabilities()
        runner = os.fork()
    except BaseException as exc:
        _fatal(exc)
    if runner == 0:
        _runner(cfg)
    _reap(runner)


def _reap(runner: int) -> None:
    os.closerange(0, 5)
    while True:  # reap everything re-parented to us until the runner is done
        pid, status = os.waitpid(-1, 0)
        if pid == runner:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def _runner(cfg: dict[str, Any]) -> None:
    try:
        _name(b"sample")
        src = _read_fd(3).decode("utf-8", "surrogateescape")
        os.dup2(4, 3)
        os.close(4)
        for res, value in _rlimits(cfg["limits"]):
            resource.setrlimit(res, (value, value))
        _install_seccomp()
        os.chdir(cfg.get("workdir", "/tmp/work"))
        if cfg["env"] != _ENV:
            os.environ.clear()
            os.environ.update(cfg["env"])
        sys.argv = [""]
    except BaseException as exc:
        _fatal(exc)
    if cfg["mode"] == "function":
        _serve(src)
    else:
        _run_program(src, cfg["mode"], cfg.get("nonce", ""))


_ENV: dict[str, str] = {}  # the environment the zygote already has (so its samples inherit it)
_RLIMITS: dict[str, list[tuple[int, int]]] = {}


def _rlimits(limits: dict[str, int]) -> list[tuple[int, int]]:
    """(resource, value) pairs, never above the inherited hard limits; the zygote works them
    out once per set of limits, so a runner only sets them."""
    key = json.dumps(limits, sort_keys=True)
    if key not in _RLIMITS:
        pairs = []
        for name, value in limits.items():
            res = getattr(resource, name)
            hard = resource.getrlimit(res)[1]
            pairs.append((res, value if hard == resource.RLIM_INFINITY else min(value, hard)))
        _RLIMITS[key] = pairs
    return _RLIMITS[key]


def _prepare(cfg: dict[str, Any]) -> None:
    """Per-sample work done once in the zygote instead of in every runner: the rlimits, and
    (in a jail, where the zygote runs nothing else) the samples' environment."""
    _rlimits(cfg["limits"])
    if cfg["isolate"] and cfg["env"] != _ENV:
        os.environ.clear()
        os.environ.update(cfg["env"])
        _ENV.clear()
        _ENV.update(cfg["env"])


def _run_program(src: str, mode: str, nonce: str) -> None:
    """compat and stdio modes: run the whole program, then write the verdict line to fd 3."""
    import random

    random.seed(0)
    getpid, write, exit_ = os.getpid, os.write, os._exit
    settrace, setprofile = sys.settrace, sys.setprofile
    pid, verdict = getpid(), "passed"
    try:
        exec(
            compile(src, "<candidate>", "exec"), {"__name__": "__main__", "__builtins__": builtins}
        )
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
        exit_(0)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        write(3, f"{nonce} {verdict}\n".encode())
    except OSError:
        pass
    exit_(0)


def _serve(src: str) -> None:
    """strict mode, the candidate's side: load the program, then answer calls on fd 3."""
    chan = socket.socket(fileno=3)
    objects: dict[int, Any] = {}

    def handle_of(value: Any) -> int:
        objects[id(value)] = value
        return id(value)

    def resolve(ref: int) -> Any:
        if ref not in objects:
            raise ProtocolError("unknown handle")
        return objects[ref]

    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    import random

    # Seeded as compat's programs are (``_run_program``; the hash seed is the jail's): a
    # candidate that uses ``random`` gets the same verdict in every run (docs/EVALUATION.md §4.3).
    random.seed(0)
    try:
        exec(compile(src, "<candidate>", "exec"), namespace)
        reply: Any = ["ready"]
    except SystemExit:
        os._exit(0)
    except BaseException as exc:
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
        reply = _raised(exc)
    try:
        send_message(chan, reply)
        if reply[0] == "ready":
            _answer(chan, namespace, handle_of, resolve)
    except (OSError, EOFError, ProtocolError):
        pass  # the channel is gone: closed or replaced by the candidate, or the tests are done
    # The tester sees end-of-file and says ``no_result`` unless it has its verdict.
    os._exit(0)


def _answer(chan: socket.socket, namespace: dict[str, Any], handle_of: Any, resolve: Any) -> None:
    """Answer the tester's requests on ``chan`` until it closes it (EOFError)."""
    while True:
        request = recv_message(chan)
        op = request[0]
        try:
            if op == "has":
                reply = ["names", {n: callable(namespace.get(n)) for n in request[1]}]
            elif op == "call":
                target = request[1]
                func = resolve(target[1]) if isinstance(target, list) else namespace[target]
                args = decode(request[2], resolve)
                kwargs = decode(request[3], resolve)
                reply = ["ok", encode(func(*args, **kwargs), handle_of)]
            elif op == "getattr":
                reply = ["ok", encode(getattr(resolve(request[1]), request[2]), handle_of)]
            else:
                raise ProtocolError(f"unknown request {op!r}")
        except SystemExit:
            os._exit(0)  # the program ended before the tests did: ``no_result`` (§4.4)
        except BaseException as exc:
            reply = _raised(exc)
        try:
            send_message(chan, reply)
        except ProtocolError:
            send_message(chan, ["too_large"])


def _raised(exc: BaseException) -> list[str]:
    """The reply for a candidate's exception: its type name and message, as strings only."""
    try:
        message = str(exc)[:MAX_EXCEPTION_MESSAGE]
    except BaseException:
        message = ""
    return ["raise", type(exc).__name__, message]


# --- the tester: trusted test code against the candidate over the channel ------------------------


class OutputTooLarge(Exception):
    """The candidate returned a value over the channel's size cap."""


class Remote:
    """The trusted side of the channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def request(self, message: Any) -> Any:
        send_message(self.sock, message)
        reply = recv_message(self.sock)
        if type(reply) is not list or not reply or type(reply[0]) is not str:
            raise ProtocolError("malformed reply")
        if reply[0] == "raise" and _is_raise(reply):
            raise _remote_exception(*reply[1:])
        if reply[0] == "too_large":
            raise OutputTooLarge("the candidate's value is over the channel cap")
        return reply

    def _value(self, reply: Any) -> Any:
        if reply[0] != "ok" or len(reply) != 2:
            raise ProtocolError("malformed reply")
        return decode(reply[1], lambda ref: Handle(ref, self))

    def call(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._value(self.request(["call", target, encode(list(args)), encode(kwargs)]))

    def getattr(self, ref: int, name: str) -> Any:
        return self._value(self.request(["getattr", ref, name]))

    def defines(self, names: list[str]) -> set[str]:
        reply = self.request(["has", names])
        if reply[0] != "names" or type(reply[1]) is not dict:
            raise ProtocolError("malformed reply")
        return {n for n in names if reply[1].get(n) is True}


# Exceptions that steer the trusted code's control flow if raised as themselves: a
# StopIteration from the candidate inside ``map``/``zip`` in a test would end it silently.
_NOT_REBUILT = {"StopIteration", "StopAsyncIteration"}


def _is_raise(reply: Any) -> bool:
    """``["raise", type name, message]`` (the message may be absent), all strings."""
    return (
        type(reply) is list
        and len(reply) in (2, 3)
        and reply[0] == "raise"
        and all(type(part) is str for part in reply[1:])
        and len(reply[-1]) <= MAX_EXCEPTION_MESSAGE
    )


def _remote_exception(name: str, message: str = "") -> BaseException:
    """The candidate's exception, by type name: a builtin exception class where one exists
    (tests may expect ``ValueError``), else a fresh ``Exception`` subclass of that name. Made
    without the class's constructor, whose arguments the candidate never sends (a
    ``UnicodeDecodeError`` needs five): its ``args`` are the message only (docs/EVALUATION.md
    §4.3)."""
    if not name.isidentifier() or len(name) > 100:
        return ProtocolError("bad exception name")
    message = message or "raised by the candidate"
    known = getattr(builtins, name, None)
    if isinstance(known, type) and issubclass(known, Exception) and name not in _NOT_REBUILT:
        try:
            exc = known.__new__(known)  # no __init__: nothing the constructor would need
            exc.args = (message,)
            str(exc)  # printable, as the test's own handlers may need
            return exc
        except Exception:  # a class whose __new__ itself wants arguments (ExceptionGroup)
            pass
    return type(name, (Exception,), {})(message)


class CandidateFunction:
    """A name the test code calls that the candidate defines."""

    def __init__(self, remote: Remote, name: str) -> None:
        self.remote, self.__name__ = remote, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.remote.call(self.__name__, args, kwargs)


def referenced_names(code: Any) -> set[str]:
    """Every global-or-builtin name a code object (and those nested in it) may load."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= referenced_names(const)
    return names


def run_tests(spec: dict[str, Any], remote: Remote) -> str:
    """The verdict of the trusted test code with the candidate's names bound to the channel."""
    first = recv_message(remote.sock)
    if first == ["ready"]:
        pass
    elif _is_raise(first):
        return _verdict(_remote_exception(*first[1:]))
    else:
        raise ProtocolError("malformed greeting")
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    setup, test = _compiled(spec)
    exec(setup, namespace)
    wanted = sorted(
        n for n in referenced_names(test) if n not in namespace and not hasattr(builtins, n)
    )
    entry = spec["entry_point"]
    for name in remote.defines([entry, *wanted] if entry else wanted):
        namespace[name] = CandidateFunction(remote, name)
    if entry and not isinstance(namespace.get(entry), CandidateFunction):
        return "error:NameError"  # as the test's own call would have raised
    try:
        exec(test, namespace)
    except BaseException as exc:
        return _verdict(exc)
    return "passed"


def _verdict(exc: BaseException) -> str:
    if isinstance(exc, AssertionError):
        return "failed"
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, EOFError):
        return "no_result"  # the candidate's process went away
    if isinstance(exc, OutputTooLarge):
        return "output_limit"
    return "error:" + type(exc).__name__


_COMPILED: dict[tuple[str, str], tuple[Any, Any]] = {}  # the tester's cache of trusted code


def _compiled(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The trusted setup and test code, compiled once per task (a task has many samples)."""
    key = (spec["setup"], spec["test"])
    if key not in _COMPILED:
        if len(_COMPILED) >= 1024:
            _COMPILED.clear()
        _COMPILED[key] = (compile(key[0], "<trusted setup>", "exec"),
                          compile(key[1], "<trusted test>", "exec"))  # fmt: skip
    return _COMPILED[key]


def _tester(sock_fd: int) -> None:
    """The jail's trusted tester: one long-lived process (fd 3 its socket to the zygote) that
    runs the tests of one sample at a time. Each job brings the test spec, the channel to the
    sample and the sample's stderr as descriptors, under a sequence number the verdict echoes.
    The zygote kills it whenever a sample ends without its verdict, and forks a fresh one."""
    try:
        _name(b"tester")
        drop_capabilities()
        jobs = socket.socket(fileno=sock_fd)
        gc.freeze()
    except BaseException as exc:
        _fatal(exc)
    while True:
        msg, fds, _, _ = socket.recv_fds(jobs, 64, 3)
        if not msg:
            os._exit(0)
        spec_fd, chan_fd, err_fd = fds
        # Closed through its object: a stale object must never close a reused descriptor.
        chan = socket.socket(fileno=chan_fd)
        import random

        random.seed(0)
        try:
            spec = json.loads(_read_fd(spec_fd))
            verdict = run_tests(spec, Remote(chan))
        except EOFError:
            verdict = "no_result"
        except ProtocolError:
            verdict = "error:ProtocolError"
        except BaseException as exc:
            verdict = "harness_error"
            try:
                os.write(err_fd, f"HARNESS_ERROR: {exc!r}\n".encode())
            except OSError:
                pass
        chan.close()
        os.close(err_fd)
        jobs.send(msg + b" " + verdict.encode())


# --- the zygote --------------------------------------------------------------------------------


def _cpu_seconds(skip: set[int]) -> tuple[float, list[int]]:
    """CPU time of every process of the jail but ``skip`` (with what they already reaped), and
    their pids."""
    ticks, pids = 0, []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rpartition(b")")[2].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        pids.append(int(name))
    return ticks / os.sysconf("SC_CLK_TCK"), pids


class _Governor:
    """A CPU share for a sample where no cgroup gives one: after each tick in which the sample
    used more than ``share`` CPUs, all its processes are stopped (SIGSTOP, which nothing can
    catch) until its average is back to ``share``."""

    def __init__(self, share: float | None) -> None:
        self.share = share
        self.start = time.monotonic()
        self.stopped: list[int] = []

    def tick(self, now: float, cpu: float, pids: list[int]) -> None:
        if not self.share:
            return
        allowed = self.share * (now - self.start) + 0.05
        if cpu > allowed and not self.stopped:
            self.stopped = pids
            self._signal(signal.SIGSTOP)
        elif cpu <= allowed and self.stopped:
            self.release()

    def release(self) -> None:
        self._signal(signal.SIGCONT)
        self.stopped = []

    def _signal(self, sig: int) -> None:
        for pid in self.stopped:
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def _fork(role: Any, fds: dict[int, int], *args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            # The zygote is not dumpable (zygote()); a forked copy is, so that its /proc files
            # stay its own (the sample writes its oom_score_adj, mounts its /proc).
            _call("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)
            _arrange(fds)
            role(*args)
        except BaseException as exc:
            _fatal(exc)
        os._exit(HARNESS_EXIT)
    return pid


def _kill(pid: int | None) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class _TesterHandle:
    """The zygote's side of the jail's long-lived tester: started on first use, killed (and
    reaped with the sample) whenever a sample ends without its verdict."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self.seq = 0

    def submit(self, tests: int, chan: int, err: int) -> bytes:
        if self.sock is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            null = os.open("/dev/null", os.O_RDWR)
            self.pid = _fork(_tester, {0: null, 1: null, 2: null, 3: theirs.fileno()}, 3)
            os.close(null)
            theirs.close()
            self.sock = ours
        self.seq += 1
        tag = b"%d" % self.seq
        socket.send_fds(self.sock, [tag], [tests, chan, err])
        return tag

    def kill(self) -> int | None:
        pid, self.pid = self.pid, None
        _kill(pid)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        return pid


_TESTER = _TesterHandle()


def _run_one(sock: socket.socket, cfg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    program, tests, stdin, out, err = fds
    function = cfg["mode"] == "function"
    report_r, report_w = os.pipe()
    tag = b""
    if function:
        mine, theirs = socket.socketpair()
        tag = _TESTER.submit(tests, mine.fileno(), err)
        mine.close()
        chan = theirs.fileno()
    else:
        chan = report_w
    runner, holder = _start_sample(cfg, {0: stdin, 1: out, 2: err, 3: program, 4: chan})
    if function:
        theirs.close()
    for fd in (*fds, report_w):
        os.close(fd)
    sock.send(b"started")
    report = b""
    timed_out = False
    skip = {os.getpid(), _TESTER.pid or 0}  # the zygote, the tester
    deadline_tick = time.monotonic()
    governor = _Governor(cfg.get("cpu_share"))
    pidfd = os.pidfd_open(runner)
    watch: list[Any] = [sock, pidfd, _TESTER.sock if function else report_r]
    sample_done = report_done = False
    stopped: bytes | None = None
    while True:
        ready = select.select(watch, [], [], 0.02)[0]
        if report_r in ready:
            chunk = os.read(report_r, 256)
            report += chunk
            if not chunk or len(report) >= 256:
                watch.remove(report_r)
                report_done = True
        if function and _TESTER.sock in ready:
            reply = _TESTER.sock.recv(1024)
            if not reply:  # the tester died: no verdict
                watch.remove(_TESTER.sock)
                report_done = True
            elif reply.partition(b" ")[0] == tag:  # else a late verdict of an earlier sample
                report = reply.partition(b" ")[2]
                report_done = True
        if pidfd in ready:
            watch.remove(pidfd)
            sample_done = True
            if function and not report_done:
                # The candidate's process is gone, so is the sample: end its namespace now
                # (a child of it may hold the channel), and the tester sees end-of-file at
                # once, ``no_result`` (docs/EVALUATION.md §4.4), instead of the wall limit.
                _kill(holder)
        if sock in ready:
            stopped = sock.recv(64)  # the supervisor says stop (deadline, output cap) or left
            break
        if function and report_done:
            break  # the trusted side has its verdict
        if sample_done and (not function or report_done):
            break
        now = time.monotonic()
        if now >= deadline_tick:
            deadline_tick = now + 0.05
            cpu, pids = _cpu_seconds(skip)
            if cpu > cfg["cpu_s"]:
                timed_out = True
                break
            governor.tick(now, cpu, pids)
    if function and not sample_done and report.strip() == b"no_result":
        # The channel's end-of-file comes as the candidate's process exits; give its exit
        # status a moment to tell how (a crash, a MemoryError) before the kill below.
        sample_done = bool(select.select([pidfd], [], [], 0.1)[0])
    _kill(holder or runner)  # in a jail the kernel kills the rest of the sample's namespace
    tester = _TESTER.kill() if function and not report else None  # it may be stuck: a new one
    if governor.stopped:
        governor.release()  # a stopped process dies of SIGKILL too, but do not leave any stopped
    if not cfg["isolate"]:
        try:
            os.killpg(runner, signal.SIGKILL)  # the session the sample started in
        except OSError:
            pass
    os.set_blocking(report_r, False)
    try:
        while len(report) < 256 and (chunk := os.read(report_r, 256)):
            report += chunk
    except BlockingIOError:
        pass
    for fd in (report_r, pidfd):
        os.close(fd)
    pending = [pid for pid in (runner, holder, tester) if pid]
    rc = None
    if not (function and report.strip() not in (b"", b"no_result", b"harness_error")):
        # The exit status tells the story (compat, stdio, a candidate that went away): reap
        # now. Otherwise the tester's verdict stands, and the zygote reaps after reporting.
        code = os.waitstatus_to_exitcode(os.waitpid(runner, 0)[1])
        # Without a jail the runner's parent exits 128+n when the runner died of signal n.
        rc = 128 - code if code >= 128 and not cfg["isolate"] else code
        pending.remove(runner)
        if function and not sample_done:
            rc = None  # alive until the kill above: its end was ours, not the story
    return {
        "rc": rc,
        "report": report[:256].decode("utf-8", "replace"),
        "cpu_timeout": timed_out,
        "stopped": stopped,
        "pending": pending,
    }


def zygote(sock_fd: int, jailed: bool = False) -> None:
    """Serve samples from the supervisor, one at a time, until it closes the socket. In a
    jail (``jailed``) it first becomes PID 1 of a namespace of its own."""
    if jailed:
        _own_pid_namespace()
    # Not dumpable: no process without CAP_SYS_PTRACE over us may read our memory or /proc files,
    # nor those of a sample's holder, which shares this memory (_start_sample). A second wall
    # behind the capability rule that already keeps a sample out (docs/EVALUATION.md §4).
    _call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)
    for name in PREWARM:
        try:
            __import__(name)
        except ImportError:
            pass
    global _SECCOMP
    sock = socket.socket(fileno=sock_fd)
    _name(b"zygote")
    _SECCOMP = seccomp_program()
    # Objects made so far are never collected: a forked process's collector then leaves their
    # pages shared instead of touching (and so copying) them.
    gc.freeze()
    sock.send(b"ready")
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 8)
        if not msg:
            os._exit(0)
        if msg == b"kill" and not fds:
            continue  # a stop that crossed the sample's natural end: nothing left to stop
        if len(fds) != 5:
            for fd in fds:
                os.close(fd)
            sock.send(b"error expected 5 descriptors")
            continue
        cfg = json.loads(msg)
        _prepare(cfg)
        result = _run_one(sock, cfg, fds)
        pending = result.pop("pending")
        if result.pop("stopped") == b"":
            os._exit(0)  # the supervisor went away
        sock.send(b"done " + json.dumps(result).encode())
        for pid in pending:  # killed already; the supervisor reads the verdict meanwhile
            os.waitpid(pid, 0)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] in ("zygote", "jailed-zygote"):
    zygote(int(sys.argv[2]), jailed=sys.argv[1] == "jailed-zygote")
