"""State shared by the dataset steps: options, staged outputs, the per-dataset manifest."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weighted_mtp.base.io import StorageError, sha256_file, write_json_atomic
from weighted_mtp.base.layout import DATASET_SPLITS, DatasetPaths, StorageLayout
from weighted_mtp.storage.dataset_sources import Origin, resolve_origin

# MBPP's few-shot split (task ids 1-10) is processed too: the 3-shot prompt uses ids 2, 3, 4.
EXTRA_SPLITS = {"mbpp": ("prompt",)}


def dataset_splits(name: str) -> tuple[str, ...]:
    """The processed splits of a dataset: the storage contract's, plus MBPP's ``prompt``."""
    return DATASET_SPLITS[name] + EXTRA_SPLITS.get(name, ())


@dataclass(frozen=True)
class Options:
    """The user's choices for one ``wmtp storage datasets`` run (see the CLI flags)."""

    include_python2: bool = False
    skip_bad_records: bool = False
    max_length: int = 2048
    force: bool = False
    token_lengths: bool = True
    # Processes measuring token lengths (None: one per core); the outputs do not depend on it.
    workers: int | None = None


class Staging:
    """Temporary files beside their final paths, all moved into place by :meth:`commit`.

    A staged file is ``.<name>.partial-<host>-<pid>``. A run killed outright (``kill -9``)
    cannot remove its own; the next run on the dataset removes those of processes of this
    host that no longer exist (:func:`remove_stale_partials`).
    """

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.partial-{_HOST}-{os.getpid()}")
        self.pairs.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self.pairs:
            os.replace(tmp, final)
        self.pairs = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        for tmp, _ in self.pairs:
            tmp.unlink(missing_ok=True)


_HOST = socket.gethostname().replace("-", "_")


def remove_stale_partials(folder: Path) -> int:
    """Remove the staged files under ``folder`` left by killed runs; return how many.

    Only files of this host's processes that no longer exist: a live process's, or another
    host's on a shared filesystem, may belong to a run in progress and are left alone.
    """
    marker = f".partial-{_HOST}-"
    removed = 0
    for leftover in folder.rglob(f".*{marker}*") if folder.is_dir() else ():
        pid = leftover.name.rpartition(marker)[2]
        if pid.isdigit() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass
class Build:
    """One dataset being built: paths, options, manifest, and (resolved on first use) its source."""

    layout: StorageLayout
    name: str
    options: Options
    source: Path | None
    paths: DatasetPaths = field(init=False)
    manifest: dict[str, Any] = field(init=False)
    # (step, split) outputs this run has already built, e.g. metadata in the process pass.
    built_now: set[tuple[str, str]] = field(default_factory=set)
    _origin: Origin | None = None

    def __post_init__(self) -> None:
        self.paths = self.layout.dataset(self.name)
        path = self.paths.manifest
        try:
            self.manifest = (
                json.loads(path.read_text("utf-8")) if path.is_file() else {"dataset": self.name}
            )
        except ValueError as err:
            raise StorageError(f"{path}: not valid JSON ({err}); delete it to rebuild") from None

    @property
    def splits(self) -> tuple[str, ...]:
        return dataset_splits(self.name)

    def origin(self) -> Origin:
        if self._origin is None:
            self._origin = resolve_origin(self.layout.root, self.source)
        return self._origin

    def record(self, step: str, value: Any, split: str | None = None) -> None:
        if split is None:
            self.manifest[step] = value
        else:
            self.manifest.setdefault(step, {})[split] = value
        write_json_atomic(self.paths.manifest, self.manifest)

    def split_sha(self, split: str) -> str:
        """sha256 of ``<split>.jsonl``: from the manifest when the size still matches."""
        path = self.paths.split(split)
        if not path.is_file():
            raise StorageError(f"{path}: missing; run the process step for {self.name} first")
        info = self.manifest.get("process", {}).get("splits", {}).get(split, {})
        if info.get("bytes") == path.stat().st_size and info.get("sha256"):
            return info["sha256"]
        return sha256_file(path)

    def say(self, step: str, text: str) -> None:
        print(f"{self.name}: {step}: {text}", flush=True)
