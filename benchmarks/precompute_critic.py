"""Verifiable Critic training with the critic's values precomputed against the critic run at
every use, whole processes side by side (docs/METHOD.md §4, ``weighting.verifiable.precompute``).

Needs a storage built by ``make quickstart`` (its critic run). Each round runs
``wmtp train configs/quickstart/verifiable.yaml`` twice as a fresh process (interpreter start,
imports and loading included), alternating which goes first: ``weighting.verifiable.precompute``
false (the critic's forward on every training, validation and placement batch) and true (the
values computed once before training; the cache under ``<storage>/cache/critic_values`` is
removed first, so the precomputation is paid every time, as in a fresh quickstart). Each run
writes its own run folder (``bench-precompute-<mode>-<round>``, removed afterwards). Reported:
the median wall seconds of each, their ratio, and whether the last validation's metrics (the
losses and the weight-placement figures) are equal to 4 decimals.

    .venv/bin/python benchmarks/precompute_critic.py --storage storage --rounds 2

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/quickstart/verifiable.yaml"


def run(storage: Path, precompute: bool, name: str) -> tuple[float, dict]:
    """One training process: its wall seconds and its last validation metrics."""
    if precompute:
        shutil.rmtree(storage / "cache" / "critic_values", ignore_errors=True)
    command = [sys.executable, "-m", "weighted_mtp", "train", str(CONFIG), "--storage",
               str(storage), f"run_name={name}", f"weighting.verifiable.precompute={precompute}",
               "log.mlflow=false"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    run_dir = storage / "checkpoints" / "verifiable" / name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if any(k.startswith("val/") for k in r)][-1]
    shutil.rmtree(run_dir)
    return seconds, {k: round(v, 4) for k, v in last.items() if k.startswith("val/")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="storage", help="a quickstart's storage root")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    storage = Path(args.storage).resolve()
    seconds: dict[bool, list[float]] = {False: [], True: []}
    metrics: dict[bool, dict] = {}
    for round_ in range(args.rounds):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for precompute in order:
            mode = "on" if precompute else "off"
            took, metrics[precompute] = run(
                storage, precompute, f"bench-precompute-{mode}-{round_}"
            )
            seconds[precompute].append(took)
            print(f"round {round_}: precompute {mode}: {took:.1f} s", flush=True)
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    same = metrics[False] == metrics[True]
    print(f"precompute off {off:.1f} s, on {on:.1f} s: {off / on:.2f}x; "
          f"last validation equal to 4 decimals: {same}")  # fmt: skip
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "rounds": args.rounds,
                      "seconds_off": round(off, 2), "seconds_on": round(on, 2),
                      "speedup": round(off / on, 2), "same_validation": same}))  # fmt: skip


if __name__ == "__main__":
    main()
