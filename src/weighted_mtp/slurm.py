"""``wmtp slurm train``: one sbatch script per run that starts one torchrun per node through
``srun`` and requeues itself after a time-limit notice (docs/SCALING.md §8).

The script lives in the run folder (``checkpoints/<experiment>/<run>/slurm/train.sbatch``, logs
beside it) and always trains with ``checkpoint.resume=auto`` and a fixed ``run_name``, so every
start of the job, the first and each requeue, continues the run where it stopped.

Signals: Slurm sends the time-limit notice (``--signal=B:USR1@N``) to the batch shell only; its
trap forwards SIGUSR1 to the ``srun`` step, which hands it to every process of the step on every
node. torchrun's agent would die on SIGUSR1 (and gives its workers only 30 s after a SIGTERM), so
each node's agent starts with both ignored and the node's shell sends SIGUSR1 to the agent's
workers itself; the workers finish the step, write a checkpoint and exit with code 75, and the
batch shell requeues the job when the run has no ``final/``. A SIGTERM (``scancel``, a preemption,
the end of the time limit) reaches the workers straight from Slurm; the job is not requeued by the
script then (a preemption with requeue is Slurm's own).
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from weighted_mtp.base.errors import UserError
from weighted_mtp.base.io import write_text_atomic
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import load_config

SCRIPT_NAME = "train.sbatch"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+")


class SlurmError(UserError):
    """Bad ``wmtp slurm`` input or a failed ``sbatch``; reported as one line."""


@dataclass(frozen=True)
class JobOptions:
    """The allocation: ``nodes`` x (one torchrun with ``nproc_per_node`` ranks)."""

    nodes: int = 1
    gpus_per_node: int = 1
    nproc_per_node: int | None = None
    """Ranks per node; default: ``gpus_per_node`` (1 on a CPU-only allocation)."""
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    job_name: str | None = None
    notice_s: int = 300
    """Seconds before the time limit at which the job is told to checkpoint and requeue."""
    port: int | None = None
    """Rendezvous port; default: 20000 + the job id modulo 20000 (apart from other jobs)."""
    sbatch_args: list[str] = field(default_factory=list)

    def ranks_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    def check(self) -> None:
        if self.nodes < 1:
            raise SlurmError("--nodes must be >= 1")
        if self.gpus_per_node < 0:
            raise SlurmError("--gpus-per-node must be >= 0 (0: CPU ranks with gloo)")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise SlurmError("--nproc-per-node must be >= 1")
        if self.gpus_per_node and self.nproc_per_node not in (None, self.gpus_per_node):
            raise SlurmError("--nproc-per-node must equal --gpus-per-node on GPUs (one rank each)")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SlurmError("--cpus-per-task must be >= 1")
        if self.notice_s < 1:
            raise SlurmError("--notice-s must be >= 1")
        if self.port is not None and not 1024 <= self.port <= 65535:
            raise SlurmError("--port must be in 1024..65535")
        if self.time is not None and not TIME.fullmatch(self.time):
            raise SlurmError(f"--time {self.time!r}: use MM, HH:MM:SS or D-HH[:MM[:SS]]")
        for name, value in (("--partition", self.partition), ("--job-name", self.job_name)):
            if value is not None and not NAME.fullmatch(value):
                raise SlurmError(f"{name} {value!r}: letters, digits, '.', '_' and '-' only")
        bad = [a for a in self.sbatch_args if not a.startswith("--") or "\n" in a]
        if bad:
            raise SlurmError(
                f"--sbatch-arg {bad[0]!r}: give a long sbatch option, e.g. --sbatch-arg=--qos=high"
            )


@dataclass(frozen=True)
class TrainJob:
    run_dir: Path
    script_path: Path
    script: str


def run_name_for(config_path: str, overrides: list[str]) -> tuple[str, str, list[str]]:
    """(experiment, run name, overrides with ``run_name`` and ``checkpoint.resume=auto``).

    The config is validated here, so a bad key fails at submission, not in the queue."""
    config = load_config(config_path, overrides)
    name = config.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if not NAME.fullmatch(name):
        raise SlurmError(f"run_name {name!r}: letters, digits, '.', '_' and '-' only")
    kept = [o for o in overrides if o.split("=", 1)[0].strip() not in ("run_name",)]
    return config.experiment, name, [*kept, f"run_name={name}", "checkpoint.resume=auto"]


def plan_train(
    config_path: str, overrides: list[str], storage: str | None, options: JobOptions
) -> TrainJob:
    """The sbatch script of one training run and where it goes (nothing is written)."""
    options.check()
    config_file = Path(config_path).resolve()
    experiment, name, overrides = run_name_for(str(config_file), list(overrides))
    layout = StorageLayout.from_arg(storage)
    root = layout.root.resolve()
    run_dir = StorageLayout(root).checkpoint(experiment) / name
    if (run_dir / "final").exists():
        raise SlurmError(f"run {run_dir} is finished (final/ exists); choose another run_name")
    if options.gpus_per_node == 0:
        overrides.append("train.device=cpu")  # gloo ranks; no GPU was allocated
    script = render(options, run_dir, config_file, root, overrides, experiment, name)
    return TrainJob(run_dir, run_dir / "slurm" / SCRIPT_NAME, script)


def render(
    options: JobOptions,
    run_dir: Path,
    config_file: Path,
    root: Path,
    overrides: list[str],
    experiment: str,
    name: str,
) -> str:
    q = shlex.quote
    logs = run_dir / "slurm"
    nproc = options.ranks_per_node()
    directives = [
        f"--job-name={options.job_name or f'wmtp-{experiment}-{name}'}",
        f"--nodes={options.nodes}",
        "--ntasks-per-node=1",
        f"--output={logs}/%j.out",
        f"--error={logs}/%j.err",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{options.notice_s}",
    ]
    step = [f"--nodes={options.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if options.cpus_per_task:
        directives.append(f"--cpus-per-task={options.cpus_per_task}")
        step.append(f"--cpus-per-task={options.cpus_per_task}")
    if options.gpus_per_node:
        directives.append(f"--gpus-per-node={options.gpus_per_node}")
        step.append(f"--gpus-per-node={options.gpus_per_node}")
    if options.partition:
        directives.append(f"--partition={options.partition}")
    if options.time:
        directives.append(f"--time={options.time}")
    directives += options.sbatch_args
    train = [sys.executable, "-m", "weighted_mtp", "train", str(config_file),
             "--storage", str(root), *overrides]  # fmt: skip
    if options.nodes == 1 and nproc == 1:
        # One process: no torchrun agent in between; the node's shell signals it directly.
        launch, forward = " ".join(q(a) for a in train), "kill -USR1 $agent"
    else:
        launch = (
            f'{q(sys.executable)} -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" '
            f'--nproc_per_node={nproc} --rdzv_backend=c10d --rdzv_id="$SLURM_JOB_ID" '
            f'--rdzv_endpoint="$WMTP_RDZV" {" ".join(q(a) for a in train[1:])}'
        )
        forward = "pkill -USR1 -P $agent"
    # One node: the launched process (torchrun's agent, or the one worker) starts with SIGUSR1
    # and SIGTERM ignored (inherited: set before it starts); the workers install their own
    # handlers, and the node's shell sends them SIGUSR1 itself.
    node = f"""
trap "" USR1 TERM
{launch} &
agent=$!
trap "asked=1; {forward}" USR1
trap "asked=1" TERM
while kill -0 $agent 2>/dev/null; do wait $agent; done
wait $agent
rc=$?
if [ -n "${{asked:-}}" ] && [ $rc -ne 0 ]; then exit 75; fi
exit $rc
"""
    return _script(directives, step, node, run_dir, name, options)


def _script(
    directives: list[str], step: list[str], node: str, run_dir: Path, name: str,
    options: JobOptions,
) -> str:  # fmt: skip
    q = shlex.quote
    port = options.port or "$((20000 + SLURM_JOB_ID % 20000))"
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives)]
    lines += f"""
# Written by `wmtp slurm train` (docs/SCALING.md §8). Every start of this job, the first and
# each requeue, resumes run {name} from its newest checkpoint (checkpoint.resume=auto).
set -u
RUN_DIR={q(str(run_dir))}
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
export PYTHONUNBUFFERED=1
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export WMTP_RDZV="$head:{port}"
echo "wmtp: job $SLURM_JOB_ID start $((${{SLURM_RESTART_COUNT:-0}} + 1)) on $SLURM_JOB_NUM_NODES \
node(s), rendezvous $WMTP_RDZV, $(date -Is)"
usr1=""
term=""
step=""
trap 'usr1=1; echo "wmtp: SIGUSR1 (time-limit notice): stopping after this step"
      [ -n "$step" ] && kill -USR1 $step' USR1
trap 'term=1; echo "wmtp: SIGTERM"' TERM
srun {" ".join(step)} bash -c {q(node)} &
step=$!
while kill -0 $step 2>/dev/null; do wait $step; done
wait $step
rc=$?
if [ -e "$RUN_DIR/final" ]; then
    echo "wmtp: run finished: $RUN_DIR/final"
    exit 0
fi
if [ -z "$term" ] && {{ [ -n "$usr1" ] || [ $rc -eq 75 ]; }}; then
    echo "wmtp: stopped with a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 75
fi
echo "wmtp: training exited with code $rc"
exit $rc
""".splitlines()
    return "\n".join(lines) + "\n"


def command_script(options: JobOptions, logs: Path, job_name: str, command: list[str]) -> str:
    """A one-node, one-task job that runs ``command`` once (the study's evaluations): logs
    ``<logs>/<job_name>-%j.out`` and ``.err``, the allocation's partition, time, CPUs, at most
    one GPU and extra sbatch options; not requeued (a rerun of the study resubmits it)."""
    directives = [
        f"--job-name={job_name}",
        "--nodes=1",
        "--ntasks=1",
        f"--output={logs}/{job_name}-%j.out",
        f"--error={logs}/{job_name}-%j.err",
        "--open-mode=append",
        "--no-requeue",
    ]
    if options.cpus_per_task:
        directives.append(f"--cpus-per-task={options.cpus_per_task}")
    if options.gpus_per_node:
        directives.append("--gpus-per-node=1")
    if options.partition:
        directives.append(f"--partition={options.partition}")
    if options.time:
        directives.append(f"--time={options.time}")
    directives += options.sbatch_args
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives)]
    lines += [
        "# Written by `wmtp study --executor slurm` (docs/SCALING.md §8).",
        "set -u",
        "export PYTHONUNBUFFERED=1",
        'echo "wmtp: job $SLURM_JOB_ID on $(hostname), $(date -Is)"',
        "exec " + " ".join(shlex.quote(a) for a in command),
    ]
    return "\n".join(lines) + "\n"


def write_and_submit(job: TrainJob) -> str:
    """Write the script into the run folder and ``sbatch`` it; the job id."""
    return submit(job.script_path, job.script)


def submit(script_path: Path, script: str, after: list[str] | None = None) -> str:
    """Write ``script`` to ``script_path`` and ``sbatch`` it, to start once every job of
    ``after`` has ended well (a failed one cancels it: ``--kill-on-invalid-dep``); the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError("sbatch not found on PATH (not a SLURM login node?); --dry-run prints "
                         "the script")  # fmt: skip
    script_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(script_path, script)
    script_path.chmod(0o755)
    command = [sbatch, "--parsable"]
    if after:
        command += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    result = subprocess.run([*command, str(script_path)], capture_output=True, text=True,
                            check=False)  # fmt: skip
    if result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split()) or f"exit {result.returncode}"
        raise SlurmError(f"sbatch failed: {message}")
    return result.stdout.strip().split(";")[0]


def queued() -> dict[str, str]:
    """The state (``PENDING``, ``RUNNING``, ...) of every job of this user that SLURM still
    holds in its queue, by job id; a job that has ended is not there."""
    squeue = shutil.which("squeue")
    if squeue is None:
        raise SlurmError("squeue not found on PATH (not a SLURM login node?)")
    result = subprocess.run([squeue, "-h", "--me", "-o", "%i|%T"], capture_output=True,
                            text=True, check=False, timeout=120)  # fmt: skip
    if result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split()) or f"exit {result.returncode}"
        raise SlurmError(f"squeue failed: {message}")
    out = {}
    for line in result.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job:
            out[job] = state
    return out
