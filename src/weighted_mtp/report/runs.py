"""Read a training run folder into plain data for the report.

A run folder holds ``config.yaml``, ``metrics.jsonl``, checkpoints (``step_*/``, ``final/``,
``best/``) with ``wmtp_checkpoint.json`` and maybe ``eval/<dataset>/summary.json``, the critic's
``critic_diagnostics.json`` and ``token_weights.jsonl``. Every part is optional: a missing or
unreadable file gives an empty field, never an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weighted_mtp.base.io import read_json_or_none
from weighted_mtp.train.tracking import TAG_REPORT, read_metrics, tag_runs

CHECKPOINT_INFO = "wmtp_checkpoint.json"
DIAGNOSTICS = "critic_diagnostics.json"
TOKEN_WEIGHTS = "token_weights.jsonl"

Series = list[tuple[int, float]]

OLD_METRIC_PREFIXES = {"td/": "verifiable/"}
"""Metric names of run folders written before 2026-12-07: the Verifiable Critic's statistics
were ``td/*`` (its weighting was called ``critic_td``); they read as ``verifiable/*``."""


def metric_name(key: str) -> str:
    """A logged metric's name now (``td/weight_mean`` -> ``verifiable/weight_mean``)."""
    for old, new in OLD_METRIC_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


@dataclass
class EvalResult:
    """One ``summary.json``: a checkpoint evaluated on one dataset."""

    checkpoint: str
    dataset: str
    summary: dict[str, Any]
    folder: Path | None = None
    decoding: dict[str, Any] | None = None
    """``decoding.json`` beside the summary: plain against self-speculative decoding."""


@dataclass
class TokenWeights:
    """One example of ``token_weights.jsonl``: ``weights[k][j]`` is head k+1's weight on
    token j (``None`` where that head has no target)."""

    step: int
    split: str
    example: int
    problem_id: str | None
    pieces: list[str]
    weights: list[list[float | None]]


@dataclass
class Run:
    path: Path
    label: str
    experiment: str
    recipe: str
    run_name: str
    base_model: str
    steps: int
    config: dict[str, Any]
    train: dict[str, Series] = field(default_factory=dict)
    val: dict[str, Series] = field(default_factory=dict)
    evals: list[EvalResult] = field(default_factory=list)
    diagnostics: dict[str, Any] | None = None
    token_weights: list[TokenWeights] = field(default_factory=list)

    def last(self, key: str, split: str = "train") -> float | None:
        series = (self.train if split == "train" else self.val).get(key)
        return series[-1][1] if series else None


def load_run(path: Path, token_step: int | None = None) -> Run:
    """Read one run folder; ``token_step`` picks the token-weight step (default: the last)."""
    path = Path(path)
    config = _read_yaml(path / "config.yaml")
    info = _checkpoint_info(path)
    train, val = read_series(path / "metrics.jsonl")
    steps = max((s for series in train.values() for s, _ in series), default=0)
    recipe = _get(config, "train", "recipe") or info.get("recipe") or "?"
    return Run(
        path=path,
        label="",
        experiment=str(config.get("experiment") or info.get("experiment") or recipe),
        recipe=str(recipe),
        run_name=str(config.get("run_name") or info.get("run") or path.name),
        base_model=str(info.get("base_model") or _get(config, "model", "path") or "?"),
        steps=int(info.get("step") or steps),
        config=config,
        train=train,
        val=val,
        evals=find_evals(path),
        diagnostics=_find_diagnostics(path),
        token_weights=read_token_weights(path / TOKEN_WEIGHTS, token_step),
    )


def load_runs(paths: list[Path], token_step: int | None = None) -> list[Run]:
    """Read several run folders and give each a unique, readable label."""
    runs = [load_run(p, token_step) for p in paths]
    seen: dict[str, int] = {}
    for run in runs:
        base = f"{run.experiment}/{run.run_name}"
        seen[base] = seen.get(base, 0) + 1
        run.label = base if seen[base] == 1 else f"{base} ({seen[base]})"
    return runs


def read_series(path: Path) -> tuple[dict[str, Series], dict[str, Series]]:
    """``metrics.jsonl`` as per-metric (step, value) series, training and validation apart
    (validation names lose their ``val/`` prefix; old names read as their new ones,
    ``metric_name``). Bad lines and non-numbers are skipped."""
    train: dict[str, Series] = {}
    val: dict[str, Series] = {}
    for record in read_metrics(path):
        step = record.get("step")
        if not isinstance(step, int | float):
            continue
        for key, value in record.items():
            if key in ("step", "time") or not _is_number(value):
                continue
            target, name = (val, key[4:]) if key.startswith("val/") else (train, key)
            target.setdefault(metric_name(name), []).append((int(step), float(value)))
    return train, val


def find_evals(run_dir: Path) -> list[EvalResult]:
    """Every ``<checkpoint>/eval/<dataset>/summary.json`` (and ``eval/`` in the run folder)."""
    results = []
    paths = sorted(run_dir.glob("eval/*/summary.json")) + sorted(
        run_dir.glob("*/eval/*/summary.json")
    )
    for summary_path in paths:
        summary = read_json_or_none(summary_path)
        if not isinstance(summary, dict):
            continue
        owner = summary_path.parent.parent.parent
        checkpoint = "run" if owner == run_dir else owner.name
        dataset = str(summary.get("dataset") or summary_path.parent.name)
        decoding = read_json_or_none(summary_path.parent / "decoding.json")
        results.append(
            EvalResult(checkpoint, dataset, summary, summary_path.parent,
                       decoding if isinstance(decoding, dict) else None)
        )  # fmt: skip
    return results


def read_token_weights(path: Path, step: int | None = None) -> list[TokenWeights]:
    """The examples logged at ``step`` (default: the last logged step), validation first."""
    chosen: list[TokenWeights] = []
    best_step = -1
    for record in read_metrics(path):
        example = _token_weights(record)
        if example is None:
            continue
        if step is not None and example.step != step:
            continue
        if example.step > best_step:
            best_step, chosen = example.step, []
        if example.step == best_step:
            chosen.append(example)
    return sorted(chosen, key=lambda e: (e.split != "val", e.example))


def _token_weights(record: dict[str, Any]) -> TokenWeights | None:
    pieces, weights = record.get("pieces"), record.get("weights")
    if not isinstance(pieces, list) or not isinstance(weights, list) or not weights:
        return None
    rows = []
    for head in weights:
        if not isinstance(head, list):
            return None
        row = [float(w) if _is_number(w) else None for w in head[: len(pieces)]]
        rows.append(row + [None] * (len(pieces) - len(row)))
    return TokenWeights(
        step=int(record.get("step") or 0),
        split=str(record.get("split") or "val"),
        example=int(record.get("example") or 0),
        problem_id=record.get("problem_id"),
        pieces=[str(p) for p in pieces],
        weights=rows,
    )


def _checkpoint_info(run_dir: Path) -> dict[str, Any]:
    for name in ("final", "best"):
        info = read_json_or_none(run_dir / name / CHECKPOINT_INFO)
        if isinstance(info, dict):
            return info
    for folder in sorted(run_dir.glob("step_*"), reverse=True):
        info = read_json_or_none(folder / CHECKPOINT_INFO)
        if isinstance(info, dict):
            return info
    return {}


def _find_diagnostics(run_dir: Path) -> dict[str, Any] | None:
    for candidate in (run_dir / DIAGNOSTICS, run_dir / "final" / DIAGNOSTICS):
        data = read_json_or_none(candidate)
        if isinstance(data, dict):
            return data
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def link_report(run_dirs: list[Path], page: Path) -> int:
    """Tag the MLflow runs of the report's runs and of their evaluations with the page's
    path (``wmtp.report``); runs logged without MLflow are left alone. Returns the count."""
    folders = [Path(p) for p in run_dirs]
    folders += [e.folder for p in run_dirs for e in find_evals(Path(p)) if e.folder is not None]
    return tag_runs(folders, {TAG_REPORT: str(Path(page).resolve())})
