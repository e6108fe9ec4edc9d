"""Dataset steps of the storage tree: process, metadata, small, stats, eval, tests.

``process``, ``eval`` and ``tests`` read the source (Hub, ``--source`` copy, or bundled
sources offline) in one streaming pass per split; ``metadata``, ``small`` and ``stats`` read
the processed JSONL. Every output is written to a temporary file and renamed into place
only when the whole step succeeded. ``datasets/<name>/manifest.json`` records what each
step built, from which input and with which options, so re-running a finished step is a
no-op unless ``force`` (or its input or options changed).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from weighted_mtp.base.io import StorageError, write_json_atomic
from weighted_mtp.base.layout import DATASET_NAMES, SMALL_SIZES, StorageLayout
from weighted_mtp.data.jsonl import JsonlFile, JsonlWriter
from weighted_mtp.data.metadata import load_problem_index
from weighted_mtp.storage.dataset_build import (
    Build,
    Options,
    Staging,
    dataset_splits,
    remove_stale_partials,
)
from weighted_mtp.storage.dataset_metadata import (
    build_metadata,
    problem_lines,
    select_small,
    split_header,
    split_summary,
)
from weighted_mtp.storage.dataset_passes import SourcePass, record_metadata

__all__ = ["SMALL_SEED", "dataset_splits", "run"]

SMALL_SEED = 42
STEPS = ("process", "metadata", "small", "stats", "eval", "tests")


def run(
    layout: StorageLayout,
    names: list[str],
    steps: list[str],
    source: Path | None = None,
    include_python2: bool = False,
    skip_bad_records: bool = False,
    max_length: int = 2048,
    force: bool = False,
    token_lengths: bool = True,
    workers: int | None = None,
) -> None:
    """Run ``steps`` for each dataset in ``names`` (see the module docstring).

    ``workers`` processes measure token lengths (default: one per core); the outputs are
    byte-identical for any number.
    """
    if max_length <= 0:
        raise StorageError(f"--max-length must be positive, got {max_length}")
    if workers is not None and workers < 1:
        raise StorageError(f"--workers must be at least 1, got {workers}")
    unknown = [n for n in names if n not in DATASET_NAMES] + [s for s in steps if s not in STEPS]
    if unknown:
        raise StorageError(f"unknown dataset or step {', '.join(unknown)}")
    options = Options(include_python2, skip_bad_records, max_length, force, token_lengths, workers)
    for name in names:
        build = Build(layout, name, options, source)
        folders = {build.paths.root, build.paths.small_split(build.splits[0]).parent}
        removed = sum(remove_stale_partials(folder) for folder in folders)
        if removed:
            build.say("storage", f"removed {removed} partial files left by a killed run")
        SourcePass(build).run(
            [s for s in ("process", "eval", "tests") if s in steps],
            with_metadata="metadata" in steps,
        )
        for step, function in (
            ("metadata", metadata_step),
            ("small", small_step),
            ("stats", stats_step),
        ):
            if step in steps:
                function(build)


def metadata_step(build: Build) -> None:
    """``<split>_metadata.json`` + ``<split>_problems.json`` for every processed split."""
    paths, token_info = build.paths, build.manifest.get("process", {}).get("token_lengths")
    for split in build.splits:
        if ("metadata", split) in build.built_now:
            continue  # written by the process step's pass, from the same lines
        sha = build.split_sha(split)
        outputs = (paths.split_metadata(split), paths.split_problems(split))
        if _fresh(build, "metadata", split, sha, outputs):
            build.say("metadata", f"{split} up to date")
            continue
        header = split_header(paths.split(split).name, sha, token_info)
        with Staging() as staging:
            stats = build_metadata(paths.split(split), *map(staging.path, outputs), header)
            staging.commit()
        record_metadata(build, split, sha, stats)


def _fresh(build: Build, step: str, split: str, sha: str, outputs: tuple[Path, ...]) -> bool:
    done = build.manifest.get(step, {}).get(split, {})
    return (
        not build.options.force
        and done.get("source_sha256") == sha
        and all(p.is_file() for p in outputs)
    )


def small_step(build: Build) -> None:
    """Seed-sized small splits of whole problems (seeded), each with its own metadata."""
    paths = build.paths
    for split, budget in SMALL_SIZES[build.name].items():
        sha = build.split_sha(split)
        outputs = tuple(
            f(split)
            for f in (
                paths.small_split,
                paths.small_split_index,
                paths.small_split_metadata,
                paths.small_split_problems,
            )
        )
        if _fresh(build, "small", split, sha, outputs):
            build.say("small", f"{split} up to date")
            continue
        if build.manifest.get("metadata", {}).get(split, {}).get("source_sha256") != sha:
            raise StorageError(
                f"{paths.split_metadata(split)}: missing or stale; run the metadata step for {build.name} first"
            )
        index = load_problem_index(paths.split_metadata(split))
        chosen = select_small(index["problem_index_map"], budget, SMALL_SEED)
        lines = sorted(i for pid in chosen for i in problem_lines(index["problem_index_map"][pid]))
        with Staging() as staging:
            _write_small(build, split, staging, outputs, chosen, lines, sha)
            staging.commit()
        build.record(
            "small", {"source_sha256": sha, "lines": len(lines), "problems": len(chosen)}, split
        )
        build.say(
            "small",
            f"{split} {len(lines)} lines from {len(chosen)} whole problems (budget {budget}, seed {SMALL_SEED})",
        )


def _write_small(
    build: Build,
    split: str,
    staging: Staging,
    outputs: tuple[Path, ...],
    chosen: list[str],
    lines: list[int],
    sha: str,
) -> None:
    jsonl, idx, metadata, problems = (staging.path(p) for p in outputs)
    source = JsonlFile(build.paths.split(split))
    try:
        with JsonlWriter(jsonl, idx) as writer:
            for line in lines:
                writer.write(source[line])
    finally:
        source.close()
    header = {
        "source_file": outputs[0].name,
        "source_sha256": writer.sha256,
        "token_lengths": build.manifest.get("process", {}).get("token_lengths"),
        "small": {
            "seed": SMALL_SEED,
            "budget": SMALL_SIZES[build.name][split],
            "drawn_from": os.path.relpath(build.paths.split(split), build.layout.root),
            "drawn_from_sha256": sha,
            "problems": chosen,
            "source_indices": lines,
        },
    }
    build_metadata(jsonl, metadata, problems, header)


def stats_step(build: Build) -> None:
    """``stats/<YYYY-MM-DD>_summary.json``: per split counts, lengths and process counts."""
    inputs = {split: build.split_sha(split) for split in build.splits}
    done = build.manifest.get("stats", {})
    if (
        not build.options.force
        and done.get("inputs") == inputs
        and (build.paths.root / done.get("file", "-")).is_file()
    ):
        build.say("stats", "up to date")
        return
    process = build.manifest.get("process", {})
    splits = {}
    for split in build.splits:
        summary = split_summary(build.paths.split(split), build.options.max_length)
        summary["process"] = process.get("splits", {}).get(split)
        splits[split] = summary
    out = build.paths.stats_dir / f"{dt.date.today().isoformat()}_summary.json"
    write_json_atomic(
        out,
        {
            "dataset": build.name,
            "created": dt.datetime.now().isoformat(timespec="seconds"),
            "origin": process.get("origin"),
            "options": process.get("options"),
            "token_lengths": process.get("token_lengths"),
            "splits": splits,
        },
    )
    build.record("stats", {"inputs": inputs, "file": os.path.relpath(out, build.paths.root)})
    build.say("stats", f"wrote {out}")
