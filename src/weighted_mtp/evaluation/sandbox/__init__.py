"""The sandbox that runs generated programs (docs/EVALUATION.md §4).

* ``jail.py``: isolation set-up: one bubblewrap jail per worker (user, PID, IPC, UTS, network,
  mount namespaces, read-only minimal root, no nested user namespaces), its cgroup and uid.
* ``inside.py``: the code that runs inside the jail: the zygote, each sample's init and runner
  (fresh PID/IPC/mount namespaces, tmpfs, no capabilities, seccomp), the trusted tester and the
  plain-data channel of strict mode.
* ``supervisor.py``: slots, deadlines, output caps, reruns; never runs candidate code.
* ``verdicts.py``: what each outcome means.

This package uses the standard library only, so it can run under any Python 3.11+ with
``PYTHONPATH=src`` (the tests run it as an unprivileged user that way).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from weighted_mtp.evaluation.sandbox.jail import SandboxUnavailable
from weighted_mtp.evaluation.sandbox.supervisor import (
    NPROC,
    TMPFS_OPTIONS,
    jail_plan,
    prestart,
    rerun_flips,
    run_many,
    run_program,
    sample_env,
    set_unsafe,
    shutdown,
)
from weighted_mtp.evaluation.sandbox.verdicts import VERDICTS, ExecResult

__all__ = [
    "VERDICTS",
    "ExecResult",
    "IsolationError",
    "SandboxUnavailable",
    "isolation_report",
    "prestart",
    "require_isolation",
    "rerun_flips",
    "run_many",
    "run_program",
    "shutdown",
]

# Every layer of the minimum; ``require_isolation`` refuses to run below it.
MINIMUM_LEVEL = (
    "user_ns", "pid_ns", "ipc_ns", "net_ns", "mount_ns", "uts_ns", "no_network",
    "read_only_root", "host_paths_hidden", "private_tmp", "no_capabilities", "no_new_privs",
    "no_nested_userns", "rlimits", "scrubbed_env",
)  # fmt: skip


class IsolationError(RuntimeError):
    """The sandbox cannot reach the minimum isolation level (and ``unsafe`` was not given)."""


_PROBE = r"""
import ctypes, errno, json, os, resource, socket, sys
given = json.loads(sys.stdin.read())
seen = {"pid": os.getpid(), "uid": os.getuid()}
seen["ns"] = {n: os.stat("/proc/self/ns/" + n).st_ino for n in given["ns"]}
try:
    s = socket.socket(); s.settimeout(1); s.connect(("127.0.0.1", 9)); seen["net"] = "connected"
except OSError as exc:
    seen["net"] = exc.errno
seen["interfaces"] = [name for _, name in socket.if_nameindex()]
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
seen["caps"] = [int(status[k].strip(), 16) for k in ("CapEff", "CapPrm", "CapAmb")]
seen["no_new_privs"] = status.get("NoNewPrivs", "0").strip() == "1"
seen["seccomp"] = status.get("Seccomp", "0").strip() == "2"
seen["visible"] = [p for p in given["hidden"] if os.path.lexists(p)]
writable = []
for d in ("/", "/usr", "/etc", "/dev", "/proc/sys"):
    try:
        with open(os.path.join(d, ".wmtp-probe"), "w"):
            writable.append(d)
    except OSError:
        pass
seen["writable"] = writable
mounts = {}
for line in open("/proc/self/mountinfo"):
    left, _, right = line.partition(" - ")
    mounts[left.split()[4]] = right.split()[0]
seen["tmpfs"] = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if mounts.get(d) == "tmpfs"]
try:
    open("/tmp/.probe", "w").write("x"); seen["tmp_writable"] = True
except OSError:
    seen["tmp_writable"] = False
libc = ctypes.CDLL(None, use_errno=True)
seen["nested_userns"] = libc.unshare(0x10000000) == 0
seen["limits"] = {n: resource.getrlimit(getattr(resource, n))[0]
                  for n in ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NPROC")}
seen["env"] = sorted(os.environ)
print(json.dumps(seen))
"""

_REPORT: dict[str, Any] = {}
_NAMESPACES = ("user", "pid", "ipc", "net", "mnt", "uts")


def _hidden_paths() -> list[str]:
    """Host paths a sample must not see: this checkout, the storage root, homes, /etc, /run,
    /var, and fresh canaries in the host's /tmp and /dev/shm."""
    here = Path(__file__).resolve()
    paths = [str(here), str(here.parents[3]), str(Path.cwd()), str(Path.home()), "/etc/passwd",
             "/run", "/var/log", "/root", "/home", os.environ.get("WMTP_STORAGE", "")]  # fmt: skip
    return sorted({p for p in paths if p and os.path.lexists(p) and p not in ("/", "/tmp")})


def _probe() -> dict[str, Any]:
    canaries = []
    for base in ("/tmp", "/dev/shm"):
        if os.path.isdir(base):
            fd, path = tempfile.mkstemp(prefix=".wmtp-canary-", dir=base)
            os.close(fd)
            canaries.append(path)
    given = {
        "ns": list(_NAMESPACES),
        "hidden": _hidden_paths() + canaries,
    }
    try:
        result = run_program(_PROBE, stdin=json.dumps(given), timeout_s=20.0, check="stdio")
    finally:
        for path in canaries:
            os.remove(path)
    if result.verdict != "passed":
        return {"probe_error": f"{result.verdict}: {result.stderr.strip()[-300:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def isolation_report(refresh: bool = False) -> dict[str, Any]:
    """Which layers a sample actually gets here, observed by a probe sample run through the
    real path (cached; ``refresh`` probes again). ``summary`` is one line."""
    if _REPORT and not refresh:
        return dict(_REPORT)
    report: dict[str, Any] = {"jail": None, "cgroup": None, "interpreter": None}
    try:
        plan = jail_plan()
        report["jail"] = "bubblewrap"
        report["interpreter"] = plan.exe
        report["uid"] = "slot uids" if plan.uid_base is not None else "the invoking user"
    except SandboxUnavailable as exc:
        report["unavailable"] = str(exc)
    seen = _probe() if report["jail"] else {"probe_error": report["unavailable"]}
    ok = "probe_error" not in seen
    host = {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in _NAMESPACES}
    for name, key in zip(
        _NAMESPACES, ("user_ns", "pid_ns", "ipc_ns", "net_ns", "mount_ns", "uts_ns"), strict=True
    ):
        report[key] = ok and seen["ns"][name] != host[name]
    limits = seen.get("limits", {})
    report.update(
        no_network=ok and seen["net"] != "connected" and seen["interfaces"] in (["lo"], []),
        read_only_root=ok and not seen["writable"],
        host_paths_hidden=ok and not seen["visible"],
        private_tmp=ok and seen["tmp_writable"] and "/tmp" in seen["tmpfs"],
        no_capabilities=ok and not any(seen["caps"]),
        no_new_privs=ok and seen["no_new_privs"],
        seccomp=ok and seen["seccomp"],
        no_nested_userns=ok and not seen["nested_userns"],
        rlimits=ok
        and limits.get("RLIMIT_AS") == 2048 << 20
        and limits.get("RLIMIT_NPROC") == NPROC,
        scrubbed_env=ok and set(seen["env"]) == set(sample_env()),
    )
    if ok:
        report["visible_host_paths"] = seen["visible"]
    else:
        report["probe_error"] = seen["probe_error"]
    cgroup = _cgroup_of_a_jail()
    report["cgroup"] = cgroup
    report["aggregate_bounds"] = (
        f"cgroup v{cgroup} per worker: memory, {NPROC}+ processes, equal CPU weight"
        if cgroup
        else f"rlimits only: 2 GiB address space per process, {NPROC} processes per jail, "
        f"tmpfs {TMPFS_OPTIONS.split('size=')[1].split(',')[0]} per sample"
    )
    report["missing"] = [key for key in MINIMUM_LEVEL if not report[key]]
    report["level"] = "full" if not report["missing"] else "below-minimum"
    report["summary"] = _summary(report)
    _REPORT.clear()
    _REPORT.update(report)
    return dict(report)


def _cgroup_of_a_jail() -> int | None:
    from weighted_mtp.evaluation.sandbox import supervisor

    for slot in list(supervisor._STATE.free):
        cg = getattr(slot.jail, "cgroup", None)
        if cg is not None:
            return cg.version
    return None


def _summary(report: dict[str, Any]) -> str:
    if report["jail"] is None:
        return f"sandbox isolation: below-minimum ({report['unavailable']})"
    line = (
        f"sandbox isolation: {report['level']} (bubblewrap jail as {report['uid']}; "
        f"namespaces user/pid/ipc/net/mount/uts; read-only minimal root; private tmpfs; "
        f"no capabilities, no_new_privs{', seccomp' if report['seccomp'] else ''}, "
        f"no nested user namespaces; aggregate bounds: {report['aggregate_bounds']}; "
        f"python {report['interpreter']})"
    )
    if report["missing"]:
        line += f"; missing: {', '.join(report['missing'])}"
    return line


def require_isolation(unsafe: bool = False, workers: int = 1) -> dict[str, Any]:
    """Probe the sandbox and refuse to go on below the minimum level. The jails of the first
    ``workers`` slots start meanwhile (:func:`prestart`), so they are ready when samples come.

    Returns :func:`isolation_report` (print its ``summary``). Raises :class:`IsolationError`
    with a one-line message saying what to install or enable, unless ``unsafe``; with
    ``unsafe`` samples run anyway (without a jail where none can be built).
    """
    set_unsafe(unsafe)
    if not _REPORT:
        prestart(max(1, workers))
    report = isolation_report()
    if report["missing"] and not unsafe:
        if report["jail"] is None:
            reason = report["unavailable"]
        else:
            reason = f"missing: {', '.join(report['missing'])}"
            if "probe_error" in report:
                reason += f" ({report['probe_error'][:200]})"
        raise IsolationError(
            f"sandbox isolation below the minimum: {reason}; refusing to run untrusted code "
            "(pass --unsafe to run anyway)"
        )
    return report
