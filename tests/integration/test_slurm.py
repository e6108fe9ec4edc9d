"""``wmtp slurm train`` on a real one-node SLURM cluster started here (munged, slurmctld,
slurmd in a temp folder; docs/SCALING.md §8): a job trains to its final checkpoint, and a job
told to stop (the time-limit notice, SIGUSR1 to the batch shell) checkpoints, requeues itself
and ends bit-identical to an uninterrupted run. The cluster needs root and Debian's ``munge``
and ``slurm-wlm`` packages (``.ci/run`` installs them); without them those tests skip."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, make_tiny_storage
from tests.integration.test_distributed import ENV, launch, torchrun
from weighted_mtp.train import checkpoint

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "srun")
START_S = 60
"""Longest wait for the cluster to come up."""
JOB_S = 600
"""Longest wait for one job (a requeued one starts again about 10 s after its stop)."""
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
SETTINGS = ["train.epochs=100", "checkpoint.every=100", "log.mlflow=false", "log.every=1",
            "data.sampling.val_n_samples=0", "lora.dropout=0.1"]  # fmt: skip
ALLOCATION = ["--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
              "--cpus-per-task", str(min(2, os.cpu_count() or 1))]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_line() -> str:
    """This machine's CPUs and memory as ``slurmd -C`` sees them, for ``NodeName=localhost``."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    first = out.splitlines()[0] if out else ""
    fields = [f for f in first.split() if not f.startswith(("NodeName=", "RealMemory="))]
    memory = re.search(r"RealMemory=(\d+)", first)
    mem = int(memory.group(1)) * 9 // 10 if memory else 1000  # leave slack below the probe
    return " ".join(["NodeName=localhost NodeAddr=127.0.0.1", *fields, f"RealMemory={mem}"])


def write_config(root: Path) -> Path:
    for d in ("state", "spool", "munge"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=wmtptest
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/sock,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
MailProg=/bin/true
{node_line()}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def start_munged(root: Path) -> None:
    key = root / "munge/munge.key"
    if shutil.which("mungekey"):
        subprocess.run(["mungekey", "-c", "-f", "-k", str(key)], check=True, timeout=30,
                       capture_output=True)  # fmt: skip
    else:
        key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    subprocess.run(
        ["munged", "--force", f"--socket={root}/munge/sock", f"--key-file={key}",
         f"--pid-file={root}/munge/pid", f"--log-file={root}/munge/log",
         f"--seed-file={root}/munge/seed"],
        check=True, timeout=30, capture_output=True,
    )  # fmt: skip


def stop_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(path.read_text().split()[0]), signal.SIGTERM)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A one-node cluster (partition ``debug``); the environment its clients need."""
    if os.geteuid() != 0:
        pytest.skip("SLURM test cluster: needs root (slurmd runs jobs as any user)")
    missing = [n for n in (*DAEMONS, *CLIENTS) if shutil.which(n) is None]
    if missing:
        pytest.skip(f"SLURM test cluster: {', '.join(missing)} not installed (munge, slurm-wlm)")
    root = tmp_path_factory.mktemp("slurm")
    conf = write_config(root)
    env = {**ENV, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []
    try:
        try:
            start_munged(root)
        except (subprocess.SubprocessError, OSError) as err:
            pytest.skip(f"SLURM test cluster: munged did not start ({err})")
        for cmd in (["slurmctld", "-D", "-f", str(conf)],
                    ["slurmd", "-D", "-f", str(conf), "-N", "localhost"]):  # fmt: skip
            daemons.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True))  # fmt: skip
        deadline = time.time() + START_S
        state = ""
        while "idle" not in state:
            if time.time() > deadline or any(d.poll() is not None for d in daemons):
                logs = " ".join((root / f).read_text()[-300:].replace("\n", " | ")
                                for f in ("slurmctld.log", "slurmd.log") if (root / f).exists())  # fmt: skip
                pytest.skip(f"SLURM test cluster: the node is not idle ({state!r}); {logs}")
            time.sleep(0.5)
            result = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                    text=True, timeout=30)  # fmt: skip
            state = result.stdout.strip()
        yield env
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["scancel", "--user=root"], env=env, timeout=30, capture_output=True)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
        stop_pidfile(root / "munge/pid")


@pytest.fixture(scope="module")
def storage(tmp_path_factory, small_tokenizer) -> Path:
    return make_tiny_storage(tmp_path_factory.mktemp("slurm_storage"), small_tokenizer)


def wmtp(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weighted_mtp", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def submit(storage: Path, run: str, env: dict[str, str], *overrides: str) -> str:
    result = wmtp("slurm", "train", "configs/local/baseline.yaml", "--storage", str(storage),
                  *ALLOCATION, *SETTINGS, f"run_name={run}", *overrides, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    match = re.search(r"submitted job (\d+)", result.stdout)
    assert match, result.stdout
    return match.group(1)


def job_fields(job: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                         text=True, timeout=30).stdout  # fmt: skip
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_job(job: str, env: dict[str, str], logs: Path) -> dict[str, str]:
    """Poll until the job has ended (MinJobAge keeps it in ``scontrol``); its last fields."""
    deadline = time.time() + JOB_S
    while True:
        fields = job_fields(job, env)
        if fields.get("JobState") in DONE:
            return fields
        if time.time() > deadline:
            subprocess.run(["scancel", job], env=env, timeout=30)
            pytest.fail(f"job {job} still {fields.get('JobState')} after {JOB_S} s: "
                        f"{read_logs(logs, job)[-3000:]}")  # fmt: skip
        time.sleep(1)


def read_logs(logs: Path, job: str) -> str:
    return "".join(p.read_text() for p in (logs / f"{job}.out", logs / f"{job}.err") if p.exists())


@pytest.mark.slow
@pytest.mark.distributed
def test_a_job_trains_to_the_final_checkpoint(slurm_env, storage):
    job = submit(storage, "slurm-done", slurm_env, "train.max_steps=3")
    run_dir = storage / "checkpoints/baseline/slurm-done"
    assert (run_dir / "slurm/train.sbatch").is_file()
    fields = wait_job(job, slurm_env, run_dir / "slurm")
    logs = read_logs(run_dir / "slurm", job)
    assert fields["JobState"] == "COMPLETED", logs[-3000:]
    assert checkpoint.finished(run_dir) and (run_dir / "final").is_dir()
    assert "wmtp: run finished" in logs


@pytest.mark.slow
@pytest.mark.distributed
def test_the_time_limit_notice_requeues_and_resumes_bitwise_exact(slurm_env, storage):
    run, steps = "slurm-preempt", "train.max_steps=12"
    run_dir = storage / "checkpoints/baseline" / run
    job = submit(storage, run, slurm_env, steps)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + JOB_S
    while not (metrics.is_file() and '"step": 2,' in metrics.read_text()):
        state = job_fields(job, slurm_env).get("JobState")
        assert state not in DONE, read_logs(run_dir / "slurm", job)[-3000:]
        assert time.time() < deadline, "the job did not reach step 2 in time"
        time.sleep(0.1)
    # What Slurm does at --signal=B:USR1@N before the time limit: SIGUSR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True,
                   timeout=30)  # fmt: skip
    fields = wait_job(job, slurm_env, run_dir / "slurm")
    logs = read_logs(run_dir / "slurm", job)
    assert fields["JobState"] == "COMPLETED", logs[-3000:]
    assert int(fields["Restarts"]) == 1, logs[-3000:]
    assert "requeueing job" in logs and "stopped by SIGUSR1" in logs, logs[-3000:]
    resumed = re.search(r"at step (\d+)", logs)
    assert resumed and 2 <= int(resumed.group(1)) < 12, logs[-3000:]
    # The same settings without SLURM and without a stop.
    reference = storage / "checkpoints/baseline/slurm-reference"
    full = launch(torchrun("-m", "weighted_mtp", "train", str(REPO / "configs/local/baseline.yaml"),
                           "--storage", str(storage), *SETTINGS, steps, "train.device=cpu",
                           "run_name=slurm-reference"))  # fmt: skip
    assert full.returncode == 0, full.stderr[-3000:]
    a = checkpoint.load_tensors(reference / "final")
    b = checkpoint.load_tensors(run_dir / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    env = {**ENV, "PATH": str(tmp_path)}  # no sbatch anywhere: nothing could be submitted
    result = wmtp("slurm", "train", "configs/local/baseline.yaml", "--storage", str(tmp_path),
                  "--nodes", "2", "--gpus-per-node", "4", "--time", "1:00:00", "run_name=r1",
                  "--sbatch-arg=--qos=high", "--dry-run", "optim.lr=1e-4", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --requeue",
                 "#SBATCH --time=1:00:00", "#SBATCH --qos=high", "#SBATCH --signal=B:USR1@300",
                 f"#SBATCH --output={tmp_path}/checkpoints/baseline/r1/slurm/%j.out"):  # fmt: skip
        assert line in script
    assert "srun --nodes=2 --ntasks-per-node=1" in script
    assert re.search(r"-m torch\.distributed\.run --nnodes=\"\$SLURM_JOB_NUM_NODES\" "
                     r"--nproc_per_node=4 --rdzv_backend=c10d --rdzv_id=\"\$SLURM_JOB_ID\"",
                     script)  # fmt: skip
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in script
    assert "optim.lr=1e-4 run_name=r1 checkpoint.resume=auto" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert not (tmp_path / "checkpoints").exists()
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_errors_are_one_line(tmp_path):
    env = {**ENV, "PATH": str(tmp_path)}
    base = ["slurm", "train", "configs/local/baseline.yaml", "--storage", str(tmp_path)]
    for extra, message in (
        ([], "sbatch not found on PATH"),
        (["--nodes", "0"], "--nodes must be >= 1"),
        (["--time", "soon"], "--time 'soon'"),
        (["--sbatch-arg=qos"], "--sbatch-arg 'qos'"),
        (["no_such.key=1"], "no_such"),
    ):
        result = wmtp(*base, *extra, env=env)
        assert result.returncode == 1 and message in result.stderr, (extra, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _study_spec(path: Path) -> Path:
    import yaml

    spec = {
        "name": "sl",
        "configs": str(REPO / "configs/local"),
        "seeds": [0],
        "budget": {"steps": 3},
        "evaluation": {"dataset": "codecontests", "max_tasks": 3, "max_new_tokens": 8},
        "arms": {"baseline": {"recipe": "baseline"}, "rho1": {"recipe": "rho1"},
                 "rho1_shuffled": {"recipe": "rho1", "control": "shuffled"}},
        "overrides": ["data.max_length=1024", "log.val_every=100", "train.device=cpu",
                      "data.sampling.val_n_samples=0", "train.max_steps=3"],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
@pytest.mark.distributed
def test_a_study_through_slurm_reports_what_the_local_executor_reports(
    slurm_env, tmp_path_factory, small_tokenizer
):
    """Helpers, arms and evaluations as jobs with dependencies; the report equals the one the
    same spec gives run here, and a second invocation only reads the finished state."""
    local_root = make_tiny_storage(
        tmp_path_factory.mktemp("study"), small_tokenizer, evaluation=True
    )
    slurm_root = tmp_path_factory.mktemp("study_slurm") / "storage"
    shutil.copytree(local_root, slurm_root)
    spec = _study_spec(tmp_path_factory.mktemp("spec") / "sl.yaml")
    started = time.perf_counter()
    local = subprocess.run([sys.executable, "-m", "weighted_mtp", "study", str(spec), "--storage",
                            str(local_root), "--no-mlflow"], env=slurm_env, cwd=REPO,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert local.returncode == 0, (local.stdout + local.stderr)[-3000:]
    local_s = time.perf_counter() - started
    command = [sys.executable, "-m", "weighted_mtp", "study", str(spec), "--storage",
               str(slurm_root), "--no-mlflow", "--executor", "slurm", "--gpus-per-node", "0",
               "--cpus-per-task", "1"]  # fmt: skip
    started = time.perf_counter()
    first = subprocess.run([*command, "--wait", "--poll-s", "1"], env=slurm_env, cwd=REPO,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    out = first.stdout + first.stderr
    logs = "".join(p.read_text()[-1500:] for p in slurm_root.rglob("slurm/*.err"))
    assert first.returncode == 0, (out + logs)[-4000:]
    slurm_s = time.perf_counter() - started
    # One training job per helper and arm, one evaluation job per arm; the arms wait for the
    # tuned reference's job, each evaluation for its arm's training.
    assert out.count("train submitted as job") == 4, out
    jobs = json_file(slurm_root / "reports/study/sl/slurm/jobs.json")
    assert set(jobs) == {"study-sl-ref_tuning-seed0", "study-sl-baseline-seed0",
                         "study-sl-rho1-seed0", "study-sl-rho1_shuffled-seed0"}  # fmt: skip
    assert all(set(j) == {"train", "evaluate"} for n, j in jobs.items() if "ref_tuning" not in n)
    a = json_file(local_root / "reports/study/sl/study.json")
    b = json_file(slurm_root / "reports/study/sl/study.json")
    assert a["arms"] == b["arms"] and a["problems"] == b["problems"] == 3
    assert a["comparisons"] == b["comparisons"] and len(a["comparisons"]) == 3
    for name in ("baseline/study-sl-baseline-seed0", "rho1/study-sl-rho1_shuffled-seed0"):
        x = checkpoint.load_tensors(local_root / "checkpoints" / name / "final")
        y = checkpoint.load_tensors(slurm_root / "checkpoints" / name / "final")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    again = subprocess.run(command, env=slurm_env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(": done") == 4 and "submitted" not in again.stdout
    print(f"study of 4 runs + 3 evaluations: local {local_s:.0f} s, slurm {slurm_s:.0f} s")


def json_file(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
