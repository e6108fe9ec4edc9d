"""Metrics go through one call, ``MetricLogger.log(metrics, step)``, to three sinks:
the console, ``metrics.jsonl`` in the run folder, and MLflow (a local sqlite store under the
storage root by default). Only rank 0 logs. Secrets never reach a sink: values are numbers,
and the logged config has ``*token*``/``*secret*``/``*password*`` keys removed.

Every MLflow run carries tags that make it findable (docs/ARCHITECTURE.md, "Experiment
tracking"): what it is (``wmtp.kind``), its recipe, its run folder, the project's git commit
when the code sits in a git checkout; an evaluation also names the training run it evaluated.
The folder a run writes to gets ``mlflow_run.json`` with the MLflow run id and store, so the
way back from a folder to its MLflow run (and from a run id to its folder) needs no search.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from weighted_mtp.base.errors import UserError
from weighted_mtp.base.io import write_json_atomic

SECRET = re.compile(r"token|secret|password|api_key", re.IGNORECASE)

RUN_RECORD = "mlflow_run.json"
"""In a run folder (training) or a results folder (evaluation): the MLflow run it logged to."""
TAG_KIND = "wmtp.kind"
"""``train``, ``evaluate`` or ``score``."""
TAG_RECIPE = "wmtp.recipe"
TAG_RUN_DIR = "wmtp.run_dir"
"""The training run folder the MLflow run belongs to (an evaluation: the evaluated run's)."""
TAG_TRAINING_RUN = "wmtp.training_run_id"
"""On an evaluation: the MLflow run id of the training run whose checkpoint it evaluated."""
TAG_REPORT = "wmtp.report"
TAG_COMMIT = "mlflow.source.git.commit"
TAG_DIRTY = "wmtp.git_dirty"
RUN_ID = re.compile(r"[0-9a-f]{32}")


def scrub(data: Any) -> Any:
    """Drop keys that look like secrets from nested dicts."""
    if isinstance(data, dict):
        return {k: scrub(v) for k, v in data.items() if not SECRET.search(str(k))}
    if isinstance(data, list):
        return [scrub(v) for v in data]
    return data


class MetricLogger:
    """One run's metrics to the console, ``<run_dir>/metrics.jsonl`` and an MLflow run.

    With ``mlflow_uri`` the MLflow run gets ``params`` (flattened, scrubbed) and ``tags``, and
    ``record_dir`` (default: ``run_dir``) gets ``mlflow_run.json``. ``resume`` continues the
    MLflow run recorded there (a resumed training), if the store still has it.
    """

    def __init__(
        self,
        run_dir: Path | None,
        enabled: bool = True,
        mlflow_uri: str | None = None,
        experiment: str = "wmtp",
        run_name: str | None = None,
        params: dict | None = None,
        console: Callable[[str], None] | None = None,
        tags: dict[str, str] | None = None,
        record_dir: Path | None = None,
        resume: bool = False,
    ):
        self.enabled = enabled
        self.console = console
        # ``run_dir`` None: MLflow (and the console) only, e.g. one evaluation summary.
        self.path = run_dir / "metrics.jsonl" if run_dir is not None else None
        self._mlflow: _MlflowRun | None = None
        self.run_id: str | None = None
        """The MLflow run id (kept after ``close``), None without MLflow."""
        if not enabled:
            return
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        record_dir = record_dir or run_dir
        if not mlflow_uri and not resume and record_dir is not None:
            # A fresh untracked run in a folder a tracked one used: the old record would link
            # an evaluation of this run to that one.
            (record_dir / RUN_RECORD).unlink(missing_ok=True)
        if mlflow_uri:
            previous = read_run_record(record_dir) if resume and record_dir else None
            resume_id = (
                previous["run_id"]
                if previous and previous.get("tracking_uri") == mlflow_uri
                else None
            )
            self._mlflow = _MlflowRun(
                mlflow_uri, experiment, run_name, scrub(params or {}), tags or {}, resume_id
            )
            self.run_id = self._mlflow.run_id
            if record_dir is not None:
                record_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(
                    record_dir / RUN_RECORD,
                    {
                        "run_id": self._mlflow.run_id,
                        "experiment": experiment,
                        "run_name": run_name,
                        "kind": (tags or {}).get(TAG_KIND),
                        "tracking_uri": mlflow_uri,
                    },
                )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {
            k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))
        }
        if self.path is not None:
            record = {"step": step, "time": round(time.time(), 3), **clean}
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.console is not None:
            self.console(
                f"step {step}: " + "  ".join(_short(k, v) for k, v in clean.items() if _shown(k))
            )
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in clean.items()}, step)

    def close(self) -> None:
        if self._mlflow is not None:
            self._mlflow.finish()
            self._mlflow = None


SHOWN = (
    "loss", "ce", "val/ce", "val/loss", "lr", "grad_norm", "tokens_per_s",
    "rho1/selected_fraction", "pair_accuracy", "val/pair_accuracy", "margin",
    "verifiable/weight_mean",
)  # fmt: skip


def _shown(key: str) -> bool:
    return key in SHOWN or key.startswith(("ce/head", "val/ce/head"))


def _short(key: str, value: float) -> str:
    return f"{key} {value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{key} {value:.4f}"


class _MlflowRun:
    """One MLflow run through ``MlflowClient``: no process-global active run, so a failed
    run cannot block the next one in the same process (the quickstart trains five)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None,
        params: dict,
        tags: dict[str, str],
        resume_id: str | None,
    ):
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        self.client = client(uri)
        self.run_id = ""
        if resume_id:
            try:
                self.run_id = self.client.get_run(resume_id).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            except MlflowException:
                self.run_id = ""  # deleted from the store: start a new run
        if self.run_id:
            self._batches(tags=[RunTag(k, str(v)) for k, v in tags.items()])
            return
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            artifacts = None
            if uri.startswith("sqlite:///"):
                # Keep any artifacts beside the sqlite store, not in the current directory.
                store = Path(uri.removeprefix("sqlite:///"))
                artifacts = (store.parent / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        run = self.client.create_run(
            experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()}
        )
        self.run_id = run.info.run_id
        # MLflow caps a param value at 6000 characters; configs are far below that.
        flat = {k: str(v)[:500] for k, v in _flatten(params).items()}
        self._batches(params=[Param(k, v) for k, v in flat.items()])

    def _batches(self, params: list | None = None, tags: list | None = None) -> None:
        params, tags = params or [], tags or []
        for i in range(0, max(len(params), len(tags)), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100], tags=tags[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]
        )

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


_PREPARED: dict[str, Any] = {}  # uri -> Future of a client being made in the background


def log_summary_run(
    mlflow_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    metrics: dict[str, float],
    record_dir: Path,
) -> str | None:
    """One finished MLflow run holding a summary (an evaluation, a study): params, tags and
    the metrics at step 0; returns its run id."""
    logger = MetricLogger(
        None, mlflow_uri=mlflow_uri, experiment=experiment, run_name=run_name, params=params,
        tags=tags, record_dir=record_dir,
    )  # fmt: skip
    try:
        logger.log(metrics, step=0)
    finally:
        logger.close()
    return logger.run_id


def prepare_client(uri: str) -> None:
    """Start importing MLflow and opening ``uri`` on a background thread (several seconds on
    a small machine), so that :func:`client` later finds it ready. For commands whose own
    work (scoring in the sandbox) leaves the process waiting."""
    if uri not in _PREPARED:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-prepare")
        _PREPARED[uri] = pool.submit(_make_client, uri)
        pool.shutdown(wait=False)


def client(uri: str):
    """An ``MlflowClient`` on ``uri``; telemetry off (nothing leaves the machine)."""
    future = _PREPARED.pop(uri, None)
    if future is not None:
        try:
            return future.result()
        except Exception:  # made again below, so the error surfaces where it is used
            pass
    return _make_client(uri)


def _make_client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def existing_client(uri: str):
    """A client on a store that must already exist: a missing sqlite file is bad input
    (a client would silently create an empty store)."""
    store = sqlite_path(uri)
    if store is not None and not store.is_file():
        raise UserError(f"no MLflow store at {store}: train, evaluate or run the quickstart first")
    return client(uri)


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI, None for other stores."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


# ---- what a run carries: the code's commit, its run folder, the training run it evaluated ----


@functools.lru_cache(maxsize=1)
def git_commit() -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the git checkout this package runs from, None when the package
    is not in one (an installed wheel) or git is missing: tracking never fails for it."""
    package = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()  # fmt: skip
        if len(out) != 2 or (Path(out[0]) / "src" / "weighted_mtp").resolve() != package:
            return None  # site-packages inside some other repository
        status = subprocess.run(
            ["git", "-C", out[0], "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out[1], bool(status.strip())


def source_tags() -> dict[str, str]:
    """The commit tag MLflow's UI shows as the run's source version, and whether the
    checkout had uncommitted changes; empty outside a git checkout."""
    found = git_commit()
    if found is None:
        return {}
    return {TAG_COMMIT: found[0], TAG_DIRTY: str(found[1]).lower()}


def read_run_record(folder: Path) -> dict[str, Any] | None:
    """``<folder>/mlflow_run.json``, None when missing or unreadable."""
    try:
        record = json.loads((Path(folder) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def find_training_record(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """The nearest training run record at or above ``path`` (a checkpoint folder, its
    ``eval/<dataset>/`` folder, a samples file in there): ``(run folder, record)``."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        record = read_run_record(folder)
        if record is not None and record.get("kind") == "train":
            return folder, record
    return None


def training_link(path: Path | None) -> dict[str, str]:
    """Tags linking an evaluation of ``path`` to the training run that produced it."""
    found = find_training_record(path) if path is not None else None
    if found is None:
        return {}
    folder, record = found
    return {
        TAG_TRAINING_RUN: record["run_id"],
        "wmtp.training_experiment": str(record.get("experiment")),
        TAG_RUN_DIR: str(folder),
    }


def tag_runs(folders: Iterable[Path], tags: dict[str, str]) -> int:
    """Add ``tags`` to the MLflow runs recorded in ``folders`` (each in its own store);
    folders without a record, or whose run is gone from its store, are skipped. Returns
    the number of runs tagged."""
    tagged = 0
    for folder in folders:
        record = read_run_record(folder)
        if record is None or not record.get("tracking_uri"):
            continue
        from mlflow.exceptions import MlflowException  # only when a run was tracked

        store = sqlite_path(record["tracking_uri"])
        if store is not None and not store.is_file():
            continue
        mlflow_client = client(record["tracking_uri"])
        try:
            for key, value in tags.items():
                mlflow_client.set_tag(record["run_id"], key, value)
        except MlflowException:
            continue
        tagged += 1
    return tagged


def resolve_run_dir(run_id: str, uri: str) -> Path:
    """The run folder of MLflow run ``run_id`` (its ``wmtp.run_dir`` tag; an evaluation
    resolves to the training run it evaluated)."""
    from mlflow.exceptions import MlflowException

    try:
        run = existing_client(uri).get_run(run_id)
    except MlflowException:
        raise UserError(f"no MLflow run {run_id} in {uri}") from None
    folder = run.data.tags.get(TAG_RUN_DIR)
    if not folder:
        raise UserError(f"MLflow run {run_id} names no run folder (no tag {TAG_RUN_DIR})")
    return Path(folder)


# ---- MLflow's UI (the full ``mlflow`` package, the ``ui`` extra) ----


def ui_missing() -> str | None:
    """Why MLflow's UI server cannot start here (one line), None when it can."""
    from importlib import metadata, util

    try:
        metadata.version("mlflow")
    except metadata.PackageNotFoundError:
        return (
            "MLflow's UI needs the full mlflow package (the ui extra): run "
            "`pip install -e '.[ui]'` in the repository, or `make ui`"
        )
    if util.find_spec("flask") is None:
        return "MLflow's UI needs flask: reinstall the ui extra (`pip install -e '.[ui]'`)"
    return None


def free_port(host: str, preferred: int) -> int:
    """``preferred`` when nothing listens there, else a port the system picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise UserError(f"no free port on {host}")


def wait_for_server(url: str, server: subprocess.Popen, seconds: float) -> bool:
    """Poll ``<url>/health`` until the server answers (True), exits or ``seconds`` pass."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    return False


def server_command(uri: str, host: str, port: int, artifacts: Path) -> list[str]:
    """``mlflow server`` on the store ``uri``, listening on ``host:port`` only."""
    return [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
        "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def read_metrics(path: Path) -> list[dict]:
    """Read back an appended JSON-lines log of a run (``metrics.jsonl``,
    ``token_weights.jsonl``): one dict per line, ``[]`` when the file is missing. A line that
    does not parse to an object is skipped: a run killed mid-write leaves a partial last line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
