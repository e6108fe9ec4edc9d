"""Attacks on the sandbox, one test per class (docs/EVALUATION.md §4), each run twice: in this
process (root on CI: jails under slot uids, cgroups) and as an unprivileged user (``nobody``,
the system Python, ``PYTHONPATH`` at a copy of the sandbox package), which is how someone
without root on a shared cluster runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from weighted_mtp.evaluation import sandbox
from weighted_mtp.evaluation.tasks import HumanEval

SRC = Path(sandbox.__file__).resolve().parents[3]
ADD_RECORD = {
    "metadata": {
        "prompt": "def add(a, b):\n    '''Sum.'''\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"
        "    assert candidate(5, -5) == 0\n",
        "entry_point": "add",
    }
}
WRONG = "    return a - b\n"
TAG = f"wmtp-attack-{os.getpid()}"

_SERVER = r"""
import json, sys
from weighted_mtp.evaluation import sandbox
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "report":
        out = sandbox.isolation_report()
    else:
        out = [r.__dict__ for r in sandbox.run_many(req["jobs"], req["workers"])]
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


class _InProcess:
    name = "this-process"

    def many(self, jobs: list[dict[str, Any]], workers: int = 1) -> list[dict[str, Any]]:
        return [r.__dict__ for r in sandbox.run_many(jobs, workers)]

    def report(self) -> dict[str, Any]:
        return sandbox.isolation_report()

    def close(self) -> None:
        pass


class _AsNobody:
    """A server process running the sandbox as uid 65534 under the system Python."""

    name = "nobody"

    def __init__(self, python: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="wmtp-nobody-")
        os.chmod(self.dir, 0o755)
        for rel in ("weighted_mtp/__init__.py", "weighted_mtp/evaluation/__init__.py"):
            (Path(self.dir) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(SRC / rel, Path(self.dir) / rel)
        shutil.copytree(
            SRC / "weighted_mtp/evaluation/sandbox",
            Path(self.dir) / "weighted_mtp/evaluation/sandbox",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for root, dirs, files in os.walk(self.dir):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
        self.proc = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": self.dir, "LANG": "C.UTF-8"},
            cwd="/",
            text=True,
        )

    def _ask(self, request: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the unprivileged sandbox server died"
        return json.loads(line)

    def many(self, jobs: list[dict[str, Any]], workers: int = 1) -> list[dict[str, Any]]:
        return self._ask({"op": "many", "jobs": jobs, "workers": workers})

    def report(self) -> dict[str, Any]:
        return self._ask({"op": "report"})

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _system_python() -> str | None:
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.isfile(path):
            out = subprocess.run([path, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                                 capture_output=True, text=True, check=False)  # fmt: skip
            if out.stdout.strip() == "True":
                return path
    return None


@pytest.fixture(scope="module", params=["this-process", "nobody"])
def sbx(request: pytest.FixtureRequest) -> Any:
    if request.param == "this-process":
        runner: Any = _InProcess()
    else:
        python = _system_python()
        if os.geteuid() != 0 or python is None or shutil.which("setpriv") is None:
            pytest.skip("the unprivileged run needs root (to drop to nobody) and a system Python")
        runner = _AsNobody(python)
    report = runner.report()
    assert report["level"] == "full", report["summary"]
    yield runner
    runner.close()


def _strict(completion: str) -> dict[str, Any]:
    return {**HumanEval().strict_job(ADD_RECORD, completion), "timeout_s": 3.0}


def _prog(source: str, **kw: Any) -> dict[str, Any]:
    return {"program": textwrap.dedent(source), "timeout_s": 3.0, **kw}


# --- forged passes ---------------------------------------------------------------------------

FORGERIES = {
    "eq-override": "    class A:\n        __eq__ = lambda s, o: True\n    return A()\n",
    "int-subclass": "    class I(int):\n        __eq__ = lambda s, o: True\n    return I(0)\n",
    "gc-and-frames": textwrap.indent(
        textwrap.dedent("""\
        import gc, os, sys
        found = [o for o in gc.get_objects() if isinstance(o, (str, bytes)) and len(o) < 200]
        f = sys._getframe()
        while f is not None:
            found += [str(v) for v in f.f_locals.values()][:50]
            f = f.f_back
        for fd in range(64):
            for s in found[:2000]:
                try:
                    os.write(fd, (str(s) + " passed\\n").encode())
                except OSError:
                    break
        return a - b
        """),
        "    ",
    ),
    "trace-hooks": textwrap.indent(
        textwrap.dedent("""\
        import sys, threading
        def hook(frame, event, arg):
            frame.f_globals.update(candidate=lambda *a: 3, check=lambda *a: None)
            return hook
        sys.settrace(hook)
        threading.settrace(hook)
        sys.setprofile(hook)
        return a - b
        """),
        "    ",
    ),
    "forked-writer": textwrap.indent(
        textwrap.dedent("""\
        import os, time
        if os.fork() == 0:
            end = time.time() + 1.5
            while time.time() < end:
                for fd in range(3, 64):
                    try:
                        os.write(fd, b"passed\\n")
                    except OSError:
                        pass
            os._exit(0)
        time.sleep(0.2)
        return a - b
        """),
        "    ",
    ),
    "exit-zero": "    import os\n    os._exit(0)\n",
    "system-exit": "    raise SystemExit(0)\n",
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_strict_verdicts_cannot_be_forged(sbx: Any, name: str) -> None:
    (result,) = sbx.many([_strict(FORGERIES[name])])
    assert result["verdict"] != "passed", (name, result)
    (control,) = sbx.many([_strict("    return a + b\n")])
    assert control["verdict"] == "passed", control


def test_stdio_program_reads_nothing_but_its_input(sbx: Any, tmp_path: Path) -> None:
    storage = tmp_path / "storage" / "datasets" / "tests.jsonl"
    storage.parent.mkdir(parents=True)
    storage.write_text('{"expected": "secret"}\n')
    for parent in (tmp_path, storage.parent.parent, storage.parent):
        os.chmod(parent, 0o755)
    os.chmod(storage, 0o644)
    looks = [str(storage), str(SRC), __file__, "/root", "/home", "/run", "/var/lib", "/etc"]
    program = _prog(
        f"""\
        import json, os, sys
        paths = {looks!r}
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        cmdlines = [open("/proc/" + p + "/cmdline", "rb").read().decode(errors="replace")
                    for p in pids]
        print(json.dumps({{"visible": [p for p in paths if os.path.exists(p)],
                          "pids": pids, "cmdlines": cmdlines, "input": sys.stdin.read()}}))
        """,
        stdin="the input\n",
        check="stdio",
    )
    (result,) = sbx.many([program])
    assert result["verdict"] == "passed", result
    seen = json.loads(result["stdout"])
    assert seen["visible"] == [] and seen["input"] == "the input\n"
    assert len(seen["pids"]) <= 2  # the sample's init and itself: nobody else's command line
    assert not any("storage" in c or "pytest" in c for c in seen["cmdlines"])


# --- host damage, set-user-id planting, processes outliving the sample -------------------------


def test_no_host_damage_from_links_fifos_deep_trees(sbx: Any) -> None:
    canary_dir = Path(tempfile.mkdtemp(prefix="wmtp-canary-"))
    os.chmod(canary_dir, 0o755)
    canary = canary_dir / "keep.txt"
    canary.write_text("host")
    os.chmod(canary, 0o644)
    before = {p: os.stat(p).st_mode for p in (canary_dir, canary)}
    attack = _prog(f"""\
        import os
        for name in ("link", ".result", "out"):
            for target in ({str(canary_dir)!r}, "/", "/etc", "/proc/1/root"):
                try:
                    os.symlink(target, name + str(abs(hash(target))))
                except OSError:
                    pass
        for name in (".result-x", "fifo"):
            os.mkfifo(name)
        os.mkfifo("/tmp/fifo2")
        d = "deep"
        os.mkdir(d)
        os.chdir(d)
        for _ in range(3000):
            os.mkdir("d")
            os.chdir("d")
        os.chdir("/tmp/work")
        os.mkdir("locked")
        os.chmod("locked", 0)
        for path in ({str(canary)!r}, {str(canary_dir)!r}):
            try:
                os.chmod(path, 0o777)
            except OSError:
                pass
        """)
    after = _prog("import os\nprint(sorted(os.listdir('.')), sorted(os.listdir('/tmp')))\n")
    try:
        first, second = sbx.many([attack, after])
        assert first["verdict"] == "passed", first
        assert second["verdict"] == "passed" and second["stdout"].strip() == "[] ['work']"
        assert canary.read_text() == "host"
        assert {p: os.stat(p).st_mode for p in (canary_dir, canary)} == before
    finally:
        shutil.rmtree(canary_dir)


def test_set_user_id_planting_and_daemons_do_not_outlive_the_sample(sbx: Any) -> None:
    lock_before = sorted(os.listdir("/run/lock")) if os.path.isdir("/run/lock") else []
    plant = _prog(f"""\
        import os, shutil, subprocess, sys
        planted = []
        for d in ("/tmp", "/var/tmp", "/dev/shm", "/dev", "/run/lock", "/usr", "/"):
            try:
                path = os.path.join(d, "py-suid")
                shutil.copy(sys.executable, path)
                os.chmod(path, 0o4755)
                planted.append(path)
            except OSError:
                pass
        subprocess.Popen(["sleep", "30.{os.getpid()}"], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execvp("sleep", ["sleep", "31.{os.getpid()}"])
            os._exit(0)
        print(planted)
        """)
    check = _prog("""\
        import os
        found = [p for p in ("/tmp/py-suid", "/var/tmp/py-suid", "/dev/shm/py-suid", "/dev/py-suid")
                 if os.path.exists(p)]
        print(found)
        """)
    first, second = sbx.many([plant, check])
    assert first["verdict"] == "passed", first
    assert "/dev/py-suid" not in first["stdout"] and "/usr/" not in first["stdout"]
    assert second["stdout"].strip() == "[]"
    assert (sorted(os.listdir("/run/lock")) if os.path.isdir("/run/lock") else []) == lock_before
    assert _host_processes(f"30.{os.getpid()}") == [] == _host_processes(f"31.{os.getpid()}")


def _host_processes(needle: str) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes()
                state = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if needle.encode() in cmd and state != "Z" and int(name) != os.getpid():
                pids.append(int(name))
    return pids


# --- leftovers: SysV IPC, keyrings -------------------------------------------------------------

_IPC = """\
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.syscall.restype = ctypes.c_long
KEY = 0x5EED
"""


def _shmem_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1])
    return 0


def test_sysv_ipc_and_keyrings_do_not_persist(sbx: Any) -> None:
    create = _prog(
        _IPC
        + "size = 256 << 20\n"
        + "shm = libc.shmget(KEY, size, 0o1666)\n"
        + "ctypes.memset(libc.shmat(shm, None, 0), 1, size)\n"
        + "q = libc.msgget(KEY, 0o1666)\n"
        + "key = libc.syscall(248, b'user', b'wmtp', b'x', 1, -4)  # add_key, user keyring\n"
        + "print(shm >= 0, q >= 0, key, ctypes.get_errno())\n"
    )
    look = _prog(
        _IPC + "print(libc.shmget(KEY, 0, 0), libc.msgget(KEY, 0), libc.syscall(250, 0, -4))\n"
    )
    before = _shmem_kib()
    first, second = sbx.many([create, look])
    assert first["verdict"] == "passed", first
    made_shm, made_queue, key, err = first["stdout"].split()
    assert made_shm == made_queue == "True"  # inside its own IPC namespace it may use them
    assert key == "-1" and int(err) == 1  # the kernel keyrings are refused (EPERM)
    assert second["stdout"].split() == ["-1", "-1", "-1"]
    deadline = time.monotonic() + 10.0  # the kernel frees a dead IPC namespace from a work queue
    while _shmem_kib() - before >= 128 << 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _shmem_kib() - before < 128 << 10  # the 256 MiB segment went with the sample


# --- aggregate bounds ----------------------------------------------------------------------------


def test_nested_user_namespaces_are_refused(sbx: Any) -> None:
    (result,) = sbx.many(
        [_prog("import ctypes\nprint(ctypes.CDLL(None, use_errno=True).unshare(0x10000000))\n")]
    )
    assert result["stdout"].strip() == "-1"


def test_sample_cannot_read_trace_or_kill_its_pid_1(sbx: Any) -> None:
    """PID 1 of a sample's namespace shares the zygote's memory (docs/EVALUATION.md §4): its
    memory, maps, environment and stack are closed to the sample, it cannot be traced, and
    killing it does not end the sample's own run."""
    program = _prog("""\
        import ctypes, json, os
        out = {}
        for name in ("mem", "maps", "environ", "auxv", "stack", "syscall", "pagemap"):
            try:
                with open("/proc/1/" + name, "rb") as fh:
                    fh.read(64)
                out[name] = "read"
            except OSError as exc:
                out[name] = exc.errno
        libc = ctypes.CDLL(None, use_errno=True)
        out["ptrace"] = libc.ptrace(16, 1, 0, 0)  # PTRACE_ATTACH
        out["seize"] = libc.ptrace(0x4206, 1, 0, 0)  # PTRACE_SEIZE
        try:
            os.kill(1, 9)
        except OSError as exc:
            out["kill"] = exc.errno
        print(json.dumps(out))
        """)
    (result,) = sbx.many([program])
    assert result["verdict"] == "passed", result
    seen = json.loads(result["stdout"])
    assert not [k for k, v in seen.items() if v == "read"], seen
    assert seen["ptrace"] == -1 and seen["seize"] == -1, seen


def test_disk_is_capped_for_the_whole_sample(sbx: Any) -> None:
    program = _prog("""\
        import os
        total = 0
        for d in ("/tmp/work", "/var/tmp", "/dev/shm"):
            for i in range(200):
                try:
                    with open(os.path.join(d, "f%d" % i), "wb") as fh:
                        fh.write(b"x" * (1 << 20))
                    total += 1
                except OSError:
                    break
        print(total)
        """)
    (result,) = sbx.many([program])
    assert result["verdict"] == "passed", result
    assert 32 <= int(result["stdout"]) <= 64  # MiB, over all writable places together


def test_memory_by_fork_is_bounded_for_the_whole_sample(sbx: Any) -> None:
    report = sbx.report()
    if not report.get("cgroup"):
        pytest.skip(f"no cgroup for the jail here: {report['aggregate_bounds']}")
    program = _prog(
        """\
        import os, time
        r, w = os.pipe()
        for _ in range(6):
            if os.fork() == 0:
                block = bytearray(700 << 20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                os.write(w, b"x")
                time.sleep(3)
                os._exit(0)
        time.sleep(2.5)
        os.set_blocking(r, False)
        try:
            print(len(os.read(r, 64)))
        except BlockingIOError:
            print(0)
        """,
        timeout_s=5.0,
    )
    (result,) = sbx.many([program])
    held = int(result["stdout"] or 0) if result["verdict"] == "passed" else 0
    assert held * 700 <= 2048 + 256 + 700, result  # never 6 x 700 MiB at once


@pytest.mark.slow
def test_cpu_hog_does_not_change_a_neighbours_verdict(sbx: Any) -> None:
    # 200 busy processes, each in its own session, for 8 s; beside it, on the other worker, a
    # correct program that needs 1 s of CPU within a 2 s limit (7 s wall backstop). Without a
    # CPU share per sample the neighbour gets 1/100 of a core and times out.
    hog = _prog(
        """\
        import os, time
        end = time.time() + 8.0
        for _ in range(200):
            if os.fork() == 0:
                os.setsid()
                while time.time() < end:
                    pass
                os._exit(0)
        while time.time() < end:
            pass
        """,
        timeout_s=30.0,
    )
    neighbour = _prog(
        """\
        import time
        start = time.process_time()
        while time.process_time() - start < 1.0:
            pass
        """,
        timeout_s=2.0,
    )
    results = sbx.many([hog, neighbour], workers=2)
    assert results[1]["verdict"] == "passed", results[1]


def test_supervisor_survives_every_sample(sbx: Any) -> None:
    jobs = [
        _prog("import os\nos.killpg(0, 9)\n"),
        _prog("import os, signal\nos.kill(-1, signal.SIGKILL)\n"),
        _prog("import os\nos.closerange(0, 1 << 16)\nwhile True:\n    pass\n", timeout_s=1.0),
        _prog("print('x' * (4 << 20))\n"),
        _strict("    return [0] * (1 << 26)\n"),
        _strict("    return 10 ** 100000\n"),
    ]
    results = sbx.many(jobs, workers=2)
    assert [r["verdict"] != "passed" for r in results] == [True, True, True, True, True, True]
    assert results[3]["verdict"] == "output_limit"
    (control,) = sbx.many([_strict("    return a + b\n")])
    assert control["verdict"] == "passed"


def test_report_names_what_a_missing_bwrap_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    from weighted_mtp.evaluation.sandbox import jail

    monkeypatch.setattr(jail.shutil, "which", lambda name: None)
    with pytest.raises(jail.SandboxUnavailable, match="bubblewrap"):
        jail.find_bwrap()


@pytest.mark.slow
def test_canonical_humaneval_passes_and_pass_bodies_fail(sbx: Any) -> None:
    """What `wmtp score` does in strict mode, through this runner: as a normal user too."""
    from weighted_mtp.evaluation.harness import humaneval_from_package

    problems = humaneval_from_package()
    task = HumanEval()
    canonical = [{**task.strict_job(r, r["output"]), "timeout_s": 5.0} for r in problems.values()]
    stubs = [{**task.strict_job(r, "    pass\n"), "timeout_s": 5.0} for r in problems.values()]
    results = sbx.many(canonical + stubs, workers=2)
    bad = [
        (t, r["verdict"]) for t, r in zip(problems, results[:164], strict=True) if not r["passed"]
    ]
    assert bad == []
    assert [t for t, r in zip(problems, results[164:], strict=True) if r["passed"]] == []


def test_disabled_user_namespaces_are_one_line_naming_what_to_enable(tmp_path: Path) -> None:
    from weighted_mtp.evaluation.sandbox import jail

    fake = tmp_path / "bwrap"
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the "
        "kernel does not allow non-privileged user namespaces.' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    plan = jail.JailPlan(str(fake), sys.executable, sys.base_prefix, None, cgroups=False)
    with pytest.raises(jail.SandboxUnavailable) as err:
        jail.Jail(plan, 0)
    message = str(err.value)
    assert "\n" not in message and "user.max_user_namespaces" in message


def test_candidate_stop_iteration_cannot_end_a_test_loop(sbx: Any) -> None:
    record = {
        "metadata": {
            "prompt": "def is_even(n):\n    '''Even?'''\n",
            "test": "def check(candidate):\n    pairs = [(2, True), (3, False), (10, True)]\n"
            "    assert all(map(lambda p: candidate(p[0]) == p[1], pairs))\n",
            "entry_point": "is_even",
        }
    }
    job = {**HumanEval().strict_job(record, "    raise StopIteration\n"), "timeout_s": 3.0}
    (result,) = sbx.many([job])
    assert result["verdict"] == "error:StopIteration", result


def test_cpu_time_of_children_cannot_be_hidden(sbx: Any) -> None:
    # Children reaped automatically would take their CPU time out of the sample's account:
    # setting SIGCHLD's action is refused, and unreaped children are counted.
    program = _prog(
        """\
        import os, signal, time
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        except OSError:
            pass
        while True:
            if os.fork() == 0:
                t = time.process_time()
                while time.process_time() - t < 0.1:
                    pass
                os._exit(0)
            time.sleep(0.11)
        """,
        timeout_s=1.0,
    )
    (result,) = sbx.many([program])
    assert result["verdict"] == "timeout" and result["detail"]["cpu_timeout"], result


def test_nothing_carries_over_through_the_network_stack(sbx: Any) -> None:
    send = _prog("""\
        import socket
        for b in b"HI":
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                srv.bind(("127.0.0.1", 40000 + b))
            except OSError as exc:
                print(exc.errno)
                break
        """)
    look = _prog("print(len(open('/proc/net/tcp').readlines()) - 1)\n")
    first, second = sbx.many([send, look])
    assert first["verdict"] == "passed" and second["verdict"] == "passed"
    assert second["stdout"].strip() == "0"  # no socket of the first: a fresh network namespace


# --- a candidate that drops its channel, signals its PID 1, raises odd exceptions --------------

DROPPED_CHANNEL = {
    "exit-at-import": "import os\nos._exit(0)\n",
    "closes-every-fd": "import os\nos.closerange(0, 1 << 16)\n",
    "swaps-fd-3": "import os\nos.dup2(os.open('/dev/null', os.O_RDWR), 3)\n",
    "swaps-fd-3-and-waits": "import os, socket, time\nmine, other = socket.socketpair()\n"
    "os.dup2(mine.fileno(), 3)\ntime.sleep(30)\n",
    "closes-fd-3-and-waits": "import os, time\nos.close(3)\ntime.sleep(30)\n",
    "exits-leaving-a-child": "import os, time\nif os.fork() == 0:\n    time.sleep(30)\n"
    "os._exit(0)\n",
    "exits-in-a-call": "    raise SystemExit(0)\n",
}


@pytest.mark.parametrize("name", sorted(DROPPED_CHANNEL))
def test_a_dropped_channel_is_no_result_at_once(sbx: Any, name: str) -> None:
    # The tester sees end-of-file as soon as the candidate's process is gone or lets go of its
    # channel: nothing else (PID 1 of its namespace included) holds a copy; not the wall limit
    # of 3 x 3 s + 1 s and "timeout" (docs/EVALUATION.md §4.4).
    code = DROPPED_CHANNEL[name]
    completion = code if code.startswith(" ") else "    return a + b\n" + code
    start = time.monotonic()
    (result,) = sbx.many([_strict(completion)])
    assert result["verdict"] == "no_result", result
    assert "first_verdict" not in result["detail"], result
    assert time.monotonic() - start < 3.0


def test_signals_to_pid_1_cannot_reach_the_zygote(sbx: Any) -> None:
    # PID 1 of a sample shares the zygote's memory: a signal it handled would run the zygote's
    # Python handler (SIGINT: KeyboardInterrupt in the zygote, the jail gone, harness_error).
    send = """\
        import os, signal
        for sig in sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}):
            try:
                os.kill(1, sig)
            except OSError:
                pass
        """
    send = textwrap.dedent(send)
    stdio = _prog(send + "import time\ntime.sleep(0.3)\nprint('alive')\n", check="stdio")
    strict = _strict("    return a + b\n" + send)
    first, second, control = sbx.many([stdio, strict, _strict("    return a + b\n")])
    assert first["verdict"] == "passed" and first["stdout"] == "alive\n", first
    assert second["verdict"] == "passed", second
    assert control["verdict"] == "passed", control
    assert not [r for r in (first, second, control) if "first_verdict" in r["detail"]]


ODD_EXCEPTIONS = {
    "UnicodeDecodeError": "raise UnicodeDecodeError('utf-8', b'', 0, 1, 'x')\n",
    "ExceptionGroup": "raise ExceptionGroup('x', [ValueError()])\n",
    "user-class": "class UnicodeDecodeError(Exception):\n    pass\nraise UnicodeDecodeError()\n",
}


@pytest.mark.parametrize("name", sorted(ODD_EXCEPTIONS))
def test_exceptions_whose_constructor_needs_arguments_are_error_verdicts(
    sbx: Any, name: str
) -> None:
    code = ODD_EXCEPTIONS[name]
    at_import = _strict("    return a + b\n" + code)
    in_a_call = _strict(textwrap.indent(code, "    "))
    want = "error:ExceptionGroup" if name == "ExceptionGroup" else "error:UnicodeDecodeError"
    for result in sbx.many([at_import, in_a_call]):
        assert result["verdict"] == want, result
        assert "first_verdict" not in result["detail"], result
