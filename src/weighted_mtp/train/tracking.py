"""Metrics go through one call, ``MetricLogger.log(metrics, step)``, to three sinks:
the console, ``metrics.jsonl`` in the run folder, and MLflow (a local sqlite store under the
storage root by default). Only rank 0 logs. Secrets never reach a sink: values are numbers,
and the logged config has ``*token*``/``*secret*``/``*password*`` keys removed.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SECRET = re.compile(r"token|secret|password|api_key", re.IGNORECASE)


def scrub(data: Any) -> Any:
    """Drop keys that look like secrets from nested dicts."""
    if isinstance(data, dict):
        return {k: scrub(v) for k, v in data.items() if not SECRET.search(str(k))}
    if isinstance(data, list):
        return [scrub(v) for v in data]
    return data


class MetricLogger:
    def __init__(
        self,
        run_dir: Path | None,
        enabled: bool = True,
        mlflow_uri: str | None = None,
        experiment: str = "wmtp",
        run_name: str | None = None,
        params: dict | None = None,
        console: Callable[[str], None] | None = None,
    ):
        self.enabled = enabled
        self.console = console
        # ``run_dir`` None: MLflow (and the console) only, e.g. one evaluation summary.
        self.path = run_dir / "metrics.jsonl" if run_dir is not None else None
        self._mlflow = None
        if not enabled:
            return
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        if mlflow_uri:
            self._mlflow = _start_mlflow(mlflow_uri, experiment, run_name, scrub(params or {}))

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
            self._mlflow.log_metrics(
                {k.replace("@", "_at_"): v for k, v in clean.items()}, step=step
            )

    def close(self) -> None:
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None


SHOWN = (
    "loss", "ce", "val/ce", "val/loss", "lr", "grad_norm", "tokens_per_s",
    "rho1/selected_fraction", "pair_accuracy", "val/pair_accuracy", "margin", "td/weight_mean",
)  # fmt: skip


def _shown(key: str) -> bool:
    return key in SHOWN or key.startswith(("ce/head", "val/ce/head"))


def _short(key: str, value: float) -> str:
    return f"{key} {value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{key} {value:.4f}"


def _start_mlflow(uri: str, experiment: str, run_name: str | None, params: dict):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None and uri.startswith("sqlite:///"):
        # Keep any artifacts beside the sqlite store, not in the current directory.
        artifacts = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        mlflow.create_experiment(experiment, artifact_location=artifacts.resolve().as_uri())
    mlflow.set_experiment(experiment)
    mlflow.start_run(run_name=run_name)
    flat = _flatten(params)
    # MLflow caps a param value at 6000 characters; configs are far below that.
    mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
    return mlflow


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
