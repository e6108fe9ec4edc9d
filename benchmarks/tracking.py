"""The cost of experiment tracking: the quickstart's trainings with and without MLflow.

The quickstart trains its recipes one after another in one process; so does each arm here:
one fresh process that trains ``configs/local/baseline.yaml`` ``--trainings`` times on the same
micro storage (random micro models and the bundled CodeContests sample, built once in a
temporary folder). Arms, interleaved: ``off`` (``log.mlflow=false``), ``new`` (tracking into a
store that does not exist yet: MLflow creates its tables) and ``existing`` (a store that does).
Prints the median wall seconds of each arm, the difference and the ratio to ``off``, and the
seconds the process spent inside the metric logger (its start, which imports MLflow and opens
or creates the store, every ``log`` and the close): the direct cost, which a loaded machine's
noise in the wall times can hide. The last line is one JSON object of the figures.

    python benchmarks/tracking.py            # 3 processes per arm, 2 trainings of 8 steps each
    python benchmarks/tracking.py --quick    # 1 process per arm, 1 training of 2 steps
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.storage import datasets
from weighted_mtp.storage.micro import create_micro

REPO = Path(__file__).resolve().parents[1]
ARMS = ("off", "new", "existing")


def build_storage(root: Path) -> None:
    """Random micro models and the bundled CodeContests sample (a tracking cost, not results)."""
    layout = StorageLayout(root)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with contextlib.redirect_stdout(io.StringIO()):
        for micro_type in ("mtp", "reference"):
            create_micro(layout, micro_type, "random")
        datasets.run(layout, names=["codecontests"], steps=list(datasets.STEPS))


def arm_process(
    root: Path, arm: str, index: int, trainings: int, steps: int
) -> tuple[float, float]:
    """One process running ``trainings`` trainings (the ``--child`` mode): its wall seconds
    and the seconds spent inside the metric logger (start, every ``log``, close)."""
    command = [
        sys.executable, __file__, "--child", arm, "--storage", str(root), "--index", str(index),
        "--trainings", str(trainings), "--steps", str(steps),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{arm} process failed:\n{result.stderr[-3000:]}")
    return seconds, json.loads(result.stdout.strip().splitlines()[-1])["logger_s"]


def child(root: Path, arm: str, index: int, trainings: int, steps: int) -> None:
    from weighted_mtp.config import load_config
    from weighted_mtp.train import tracking
    from weighted_mtp.train.loop import train

    spent = [0.0]

    def timed(method):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        return wrapper

    for name in ("__init__", "log", "close"):
        setattr(tracking.MetricLogger, name, timed(getattr(tracking.MetricLogger, name)))
    store = root / ("mlflow-existing.db" if arm == "existing" else f"mlflow-{index}.db")
    settings = ["log.mlflow=false"] if arm == "off" else [
        "log.mlflow=true", f"log.mlflow_tracking_uri=sqlite:///{store}"
    ]  # fmt: skip
    for k in range(trainings):
        overrides = [f"run_name={arm}-{index}-{k}", f"train.max_steps={steps}", *settings]
        with contextlib.redirect_stdout(io.StringIO()):
            train(load_config(REPO / "configs/local/baseline.yaml", overrides), StorageLayout(root))
    print(json.dumps({"logger_s": spent[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 process per arm, 1 training, 2 steps"
    )
    parser.add_argument(
        "--trainings", type=int, default=None, help="trainings per process (2; --quick: 1)"
    )
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--storage", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        return child(opts.storage, opts.child, opts.index, opts.trainings, opts.steps)
    repeats, steps = (1, 2) if opts.quick else (3, 8)
    opts.trainings = opts.trainings or (1 if opts.quick else 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_storage(root)
        arm_process(root, "existing", -1, 1, 1)  # its store exists before the timed runs
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        inside: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for index in range(repeats):
            for arm in ARMS:
                wall, logger = arm_process(root, arm, index, opts.trainings, steps)
                times[arm].append(wall)
                inside[arm].append(logger)
                print(f"{arm:>8} process {index + 1}: {wall:.1f} s, {logger:.2f} s in the logger",
                      flush=True)  # fmt: skip
    median = {arm: statistics.median(t) for arm, t in times.items()}
    logger = {arm: statistics.median(t) for arm, t in inside.items()}
    figures = {
        "trainings_per_process": opts.trainings,
        "steps": steps,
        "repeats": repeats,
        **{f"{arm}_s": round(m, 2) for arm, m in median.items()},
        **{f"{arm}_logger_s": round(m, 3) for arm, m in logger.items()},
        "new_over_off": round(median["new"] / median["off"], 3),
        "existing_over_off": round(median["existing"] / median["off"], 3),
    }
    for arm in ("new", "existing"):
        extra = median[arm] - median["off"]
        print(f"tracking into the {arm} store: {median[arm]:.1f} s vs {median['off']:.1f} s off "
              f"({figures[f'{arm}_over_off']:.2f}x, {extra:+.1f} s per process of "
              f"{opts.trainings} trainings); inside the logger {logger[arm]:.2f} s vs "
              f"{logger['off']:.2f} s off")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
