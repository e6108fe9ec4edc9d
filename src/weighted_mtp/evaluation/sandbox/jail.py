"""Isolation set-up: the bubblewrap jail of one worker, its cgroup, its uid (docs/EVALUATION.md §4).

One jail per worker slot, started once and reused for every sample of that slot:

* ``bwrap`` with new user, PID, IPC, UTS, network and cgroup namespaces, ``--disable-userns`` (no
  nested user namespaces), ``--die-with-parent``, ``--new-session``; a read-only root holding
  only ``/usr`` (with the ``/bin``, ``/lib*`` links) and the interpreter's prefix, ``/proc`` of
  its own PID namespace, a minimal ``/dev``, an empty tmpfs ``/tmp``. No storage tree, checkout,
  home, ``/etc``, ``/run`` or ``/var`` of the host. The only capability kept is CAP_SYS_ADMIN
  *inside* the jail's user namespace, for the zygote to give every sample fresh PID, IPC and
  mount namespaces; samples and the tester drop it (see ``inside.py``).
* As root, the jail runs under a slot uid of its own (never root), in a cgroup of its own
  (memory, pids, CPU weight); bubblewrap itself then works exactly as for a normal user. Without
  root the jail runs as the user, and the aggregate bounds are those of rlimits (stated in the
  isolation report).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import marshal
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BWRAP_HINT = "install the package `bubblewrap` (Debian, Ubuntu, Fedora, Arch: `bubblewrap`)"
USERNS_HINT = (
    "unprivileged user namespaces are disabled: ask for `sysctl user.max_user_namespaces` > 0 "
    "(and `kernel.unprivileged_userns_clone=1` on Debian kernels, "
    "`kernel.apparmor_restrict_unprivileged_userns=0` on Ubuntu 24.04)"
)
SLOT_UID_BASE = 60000
NUM_SLOTS = 32
CGROUP_ROOT = Path("/sys/fs/cgroup")
JAIL_OVERHEAD_BYTES = 256 << 20  # zygote + tester, on top of the sample's own memory cap
PIDS_PER_JAIL = 320  # the sample's RLIMIT_NPROC (256) plus the jail's own processes
INSIDE_SOURCE = Path(__file__).with_name("inside.py")
# The zygote's interpreter flags: ``-I`` (isolated) but for ``-E``, so that the environment we
# set, which is all of it, fixes the hash seed (docs/EVALUATION.md §4.3); no site-packages.
PYTHON_FLAGS = ("-s", "-P", "-S")
# The zygote's program arrives as marshalled bytecode on a descriptor: compiled here once, so
# the jail's interpreter does not compile inside.py itself, which would leave it about 3 MiB
# larger, and every sample is a fork of it. The jail's Python has our minor version
# (``interpreter``), hence our bytecode format.
BOOTSTRAP = (
    "import marshal,os,sys\nf=int(sys.argv[3]);b=b''\nwhile c:=os.read(f,1<<20):b+=c\n"
    "os.close(f);exec(marshal.loads(b),{'__name__':'__main__','__builtins__':__builtins__})"
)


@functools.cache
def zygote_code() -> bytes:
    """inside.py compiled and marshalled, for the jail's interpreter."""
    return marshal.dumps(compile(INSIDE_SOURCE.read_text(), "<sandbox>", "exec", dont_inherit=True))


def code_fd() -> int:
    """A fresh, inheritable memfd holding :func:`zygote_code` (one per jail: the read offset
    is shared by whoever holds it)."""
    fd = os.memfd_create("wmtp-zygote", 0)
    data = memoryview(zygote_code())
    while data:
        data = data[os.write(fd, data) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class SandboxUnavailable(RuntimeError):
    """The jail cannot be built here; the message is one line saying what to install/enable."""


def is_root() -> bool:
    return os.geteuid() == 0


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(f"bubblewrap (`bwrap`) was not found: {BWRAP_HINT}")
    return path


def _traversable_by_others(path: str) -> bool:
    parts = Path(path).resolve().parts
    return all(os.stat(Path(*parts[:i])).st_mode & 0o005 == 0o005 for i in range(2, len(parts)))


def interpreter() -> tuple[str, str]:
    """(executable, prefix) of the Python that runs inside the jail.

    The project's own interpreter without site-packages (``PYTHON_FLAGS``: samples get the standard
    library only). As root the jail runs under a slot uid, which cannot read an interpreter
    kept under a private home (say ``/root``, mode 0700); then the system's Python of the same
    minor version is used, and the isolation report names it.
    """
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not is_root() or _traversable_by_others(exe):
        return exe, prefix
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.path.isfile(candidate) and _traversable_by_others(candidate):
            real = os.path.realpath(candidate)
            return real, str(Path(real).parent.parent)
    raise SandboxUnavailable(
        f"the interpreter {exe} is not readable by an unprivileged uid and no system {version} "
        "exists: install one, or run as a normal user"
    )


def bwrap_command(bwrap: str, exe: str, prefix: str, sock_fd: int, code: int) -> list[str]:
    """The bubblewrap command line of one jail running the zygote on ``sock_fd``, its code
    read from the descriptor ``code`` (:func:`code_fd`)."""
    cmd = [
        bwrap, "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net",
        "--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--die-with-parent",
        "--new-session", "--cap-add", "CAP_SYS_ADMIN", "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    if not prefix.startswith("/usr/"):
        cmd += ["--ro-bind", prefix, prefix]
    cmd += [
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", "/var/tmp",
        "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/", "--clearenv",
        "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
        # The zygote's str hashes are fixed at its start and inherited by every sample and the
        # tester: seeded, so set orders (and verdicts) do not depend on which jail ran a sample
        # (docs/EVALUATION.md §4.3). ``-I`` would ignore the seed (it implies ``-E``); ``-s -P``
        # are the rest of it, and --clearenv leaves no other variable to honour.
        "--setenv", "PYTHONHASHSEED", "0",
        "--", exe, *PYTHON_FLAGS, "-c", BOOTSTRAP, "jailed-zygote", str(sock_fd), str(code),
    ]  # fmt: skip
    return cmd


# --- cgroups (as root) ---------------------------------------------------------------------------


class Cgroup:
    """The cgroup of one jail: memory cap, pids cap, an equal CPU weight; v2 or v1."""

    def __init__(self, name: str) -> None:
        self.version = 2 if (CGROUP_ROOT / "cgroup.controllers").is_file() else 1
        self.dirs: dict[str, Path] = {}
        self._memory_limit: int | None = None  # the cap last written
        self._oom_seen = 0  # OOM kills seen so far (a new cgroup has none)
        if self.version == 2:
            top = CGROUP_ROOT / "wmtp-sandbox"
            top.mkdir(exist_ok=True)
            wanted = "+memory +pids +cpu"
            for parent in (CGROUP_ROOT, top):
                (parent / "cgroup.subtree_control").write_text(wanted)
            path = top / name
            path.mkdir(exist_ok=True)
            self.dirs = {"memory": path, "pids": path, "cpu": path}
            (path / "pids.max").write_text(str(PIDS_PER_JAIL))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
        else:
            for ctrl in ("memory", "pids", "cpu"):
                base = CGROUP_ROOT / ctrl
                if not (base / "cgroup.procs").is_file():
                    raise OSError(f"cgroup v1 controller {ctrl} is not mounted")
                path = base / "wmtp-sandbox" / name
                path.mkdir(parents=True, exist_ok=True)
                self.dirs[ctrl] = path
            (self.dirs["pids"] / "pids.max").write_text(str(PIDS_PER_JAIL))
        _remove_stale(self.dirs.values())

    def procs_files(self) -> list[str]:
        return sorted({str(path / "cgroup.procs") for path in self.dirs.values()})

    def allow(self, uid: int) -> None:
        """Let the jail's uid put its own starting process in (it runs the join as that uid)."""
        for path in self.procs_files():
            os.chown(path, uid, -1)

    def set_memory(self, limit: int) -> None:
        """Cap the jail's memory (written only when the cap changes)."""
        if limit == self._memory_limit:
            return
        mem = self.dirs["memory"]
        if self.version == 2:
            (mem / "memory.max").write_text(str(limit))
        else:
            # With swap accounting, memory+swap gets the same cap (no swapping past it); the
            # kernel wants memory <= memory+swap at every step, so the order depends on the move.
            files = [mem / "memory.limit_in_bytes", mem / "memory.memsw.limit_in_bytes"]
            files = [f for f in files if f.exists()]
            current = int(files[0].read_text())
            for path in files if limit < current else files[::-1]:
                path.write_text(str(limit))
            # v1 charges socket buffers only once a TCP limit is set (v2 always does).
            tcp = mem / "memory.kmem.tcp.limit_in_bytes"
            if tcp.exists():
                tcp.write_text(str(limit))
        self._memory_limit = limit

    def oom_kills_since_last(self) -> bool:
        """Whether the kernel killed anything for memory in this cgroup since the last call."""
        now = self.oom_kills()
        before, self._oom_seen = self._oom_seen, now
        return now > before

    def oom_kills(self) -> int:
        mem = self.dirs["memory"]
        try:
            if self.version == 2:
                text = (mem / "memory.events").read_text()
            else:
                text = (mem / "memory.oom_control").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Remove the cgroup once its processes are gone (they die with the jail)."""
        for _ in range(100):
            for path in list(set(self.dirs.values())):
                with contextlib.suppress(FileNotFoundError):
                    try:
                        path.rmdir()
                    except OSError:
                        continue
            if not any(path.exists() for path in self.dirs.values()):
                return
            time.sleep(0.01)


def _remove_stale(ours: Iterable[Path]) -> None:
    """Remove the empty cgroups of supervisors that are gone (named ``<pid>-<slot>``)."""
    for path in ours:
        for sibling in path.parent.iterdir():
            pid = sibling.name.split("-")[0]
            if sibling.is_dir() and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    sibling.rmdir()


# --- uids (as root) ------------------------------------------------------------------------------

_BLOCK_LOCK = None


def claim_uid_block(blocks: int = 64) -> int:
    """A machine-wide block of slot uids for this supervisor (an flock held until exit), so two
    supervisors running at once never share a uid."""
    global _BLOCK_LOCK
    for block in range(blocks):
        path = os.path.join(tempfile.gettempdir(), f".wmtp-sandbox-uids-{block}.lock")
        handle = open(path, "a+")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _BLOCK_LOCK = handle
        return block
    raise SandboxUnavailable("no free sandbox uid block (64 supervisors already running)")


# --- one jail ------------------------------------------------------------------------------------


@dataclass
class JailPlan:
    """What every jail of this supervisor shares."""

    bwrap: str
    exe: str
    prefix: str
    uid_base: int | None  # None: run as the invoking user
    cgroups: bool


_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 97; shift; done; shift; exec "$@"'


class Jail:
    """One running jail: the bubblewrap process tree with the zygote inside, and its socket."""

    def __init__(
        self, plan: JailPlan, index: int, timeout_s: float = 30.0, wait: bool = True
    ) -> None:
        """Start the jail; with ``wait`` (the default) also wait until its zygote is ready,
        else :meth:`wait_ready` does (so several jails can boot side by side)."""
        self.ready = False
        self.uid = None if plan.uid_base is None else plan.uid_base + index
        self.cgroup: Cgroup | None = None
        if plan.cgroups and self.uid is not None:
            with contextlib.suppress(OSError):
                self.cgroup = Cgroup(f"{os.getpid()}-{index}")
                self.cgroup.allow(self.uid)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = code_fd()
        cmd = bwrap_command(plan.bwrap, plan.exe, plan.prefix, theirs.fileno(), code)
        if self.cgroup is not None:
            cmd = ["/bin/sh", "-c", _JOIN, "sh", *self.cgroup.procs_files(), "--", *cmd]
        ids = {} if self.uid is None else {"user": self.uid, "group": self.uid, "extra_groups": []}
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(), code),
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                cwd="/",
                start_new_session=True,
                **ids,  # type: ignore[arg-type]
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(code)
        self.sock = ours
        self._timeout_s = timeout_s
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the zygote says it is ready; SandboxUnavailable (jail closed) if not."""
        if self.ready:
            return
        ours = self.sock
        ours.settimeout(self._timeout_s)
        try:
            msg = ours.recv(4096)
        except OSError as exc:
            msg = b""
            err = repr(exc)
        else:
            err = ""
        if msg != b"ready":
            self.close()
            stderr = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace")
            last = (stderr.strip().splitlines() or [err or "no answer"])[-1]
            if "namespace" in last.lower() and ("permission" in last.lower() or "denied" in last):
                raise SandboxUnavailable(f"{USERNS_HINT} (bwrap said: {last.strip()})")
            raise SandboxUnavailable(f"the sandbox jail did not start: {last.strip()}")
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        self.ready = True

    def close(self) -> None:
        """Kill the whole jail: bubblewrap's process group; --die-with-parent does the rest."""
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, 9)
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        if self.cgroup is not None:
            self.cgroup.remove()


def plan() -> JailPlan:
    """Find bubblewrap and the interpreter; as root, claim slot uids and try cgroups."""
    bwrap = find_bwrap()
    exe, prefix = interpreter()
    root = is_root()
    base = SLOT_UID_BASE + NUM_SLOTS * claim_uid_block() if root else None
    return JailPlan(bwrap, exe, prefix, base, cgroups=root and CGROUP_ROOT.is_dir())
