"""Checks of the dataset part of the storage tree (``verify_storage.py --check datasets``).

Per split: the JSONL and its offset index agree, every line has the schema of its dataset,
the sha256 matches the manifest (a flipped byte is caught), and the metadata file is what
the JSONL implies: the per-line list, ``problem_index_map`` (indices in range, each line in
exactly one problem) and ``stats`` are rebuilt from the JSONL and compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weighted_mtp.base.io import sha256_file
from weighted_mtp.base.layout import DATASET_NAMES, SMALL_SIZES, DatasetPaths, StorageLayout
from weighted_mtp.data.jsonl import JsonlError, JsonlFile, iter_jsonl, iter_raw_lines, load_index
from weighted_mtp.storage.checks import Check
from weighted_mtp.storage.dataset_build import dataset_splits
from weighted_mtp.storage.dataset_metadata import MetadataBuilder
from weighted_mtp.storage.dataset_records import (
    EVAL_METADATA_FIELDS,
    METADATA_FIELDS,
    REQUIRED_FIELDS,
)

EVAL_SPLITS = ("valid", "test")


def verify_datasets(layout: StorageLayout, include_small: bool = False) -> list[Check]:
    """Every check of every dataset (and of the small datasets when asked)."""
    checks: list[Check] = []
    for name in DATASET_NAMES:
        paths = layout.dataset(name)
        if not paths.split(dataset_splits(name)[0]).is_file():
            checks.append(
                Check(
                    f"datasets/{name}", False, f"not built; run setup_datasets.py --datasets {name}"
                )
            )
            continue
        manifest = _load_json(paths.manifest) or {}
        checks.append(_check_schema(paths, name))
        for split in dataset_splits(name):
            sha = manifest.get("process", {}).get("splits", {}).get(split, {}).get("sha256")
            checks += check_split(
                f"datasets/{name}/{split}",
                name,
                paths.split(split),
                paths.split_metadata(split),
                paths.split_problems(split),
                sha,
            )
        if name == "codecontests":
            checks += [
                _check_eval(paths.eval_file(s), f"datasets/{name}/{s}_eval") for s in EVAL_SPLITS
            ]
            checks += [
                _check_tests(paths.tests_file(s), f"datasets/{name}/tests/{s}")
                for s in dataset_splits(name)
            ]
        checks.append(_check_stats(paths, manifest, name))
        if include_small:
            checks += _check_small(paths, name)
    return checks


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _check_schema(paths: DatasetPaths, name: str) -> Check:
    schema = _load_json(paths.schema)
    label = f"datasets/{name}/schema.json"
    if not isinstance(schema, dict):
        return Check(label, False, "missing or not JSON")
    expected = list(REQUIRED_FIELDS[name])
    if (
        schema.get("dataset") != name
        or schema.get("format") != "alpaca"
        or schema.get("required_fields") != expected
    ):
        return Check(
            label, False, f"expected dataset {name}, format alpaca, required_fields {expected}"
        )
    return Check(label, True)


def line_problem(record: dict[str, Any], name: str) -> str | None:
    """Why a processed line does not have its dataset's schema, or None."""
    for key in REQUIRED_FIELDS[name]:
        if key not in record:
            return f"missing field '{key}'"
    for key in ("instruction", "input", "output", "task_id"):
        if not isinstance(record[key], str):
            return f"field '{key}' is not a string"
    if name == "codecontests" and not isinstance(record["is_correct"], bool):
        return "field 'is_correct' is not a boolean"
    meta = record.get("metadata")
    if not isinstance(meta, dict):
        return "field 'metadata' is not an object"
    missing = [k for k in METADATA_FIELDS[name] if k not in meta]
    if missing:
        return f"metadata lacks {', '.join(missing)}"
    length = meta["token_length"]
    if length is not None and (not isinstance(length, int) or length <= 0):
        return "metadata.token_length is not a positive integer"
    return _dataset_line_problem(record, meta, name)


def _dataset_line_problem(record: dict[str, Any], meta: dict[str, Any], name: str) -> str | None:
    if name == "codecontests":
        if not isinstance(meta["difficulty"], int) or not 0 <= meta["difficulty"] <= 28:
            return "metadata.difficulty is not an integer 0..28"
        if meta["language"] not in ("python3", "python2") or not record["task_id"].startswith(
            str(meta["problem_id"])
        ):
            return "metadata.language/problem_id do not match the record"
        if "mutation" in meta:
            return _mutation_problem(record, meta["mutation"])
    elif name == "gsm8k":
        if not isinstance(meta["final_answer"], str) or not meta["final_answer"]:
            return "metadata.final_answer is empty"
    elif name == "mbpp":
        if not isinstance(meta["test_list"], list) or not isinstance(meta["test_setup_code"], str):
            return "metadata.test_list/test_setup_code have the wrong type"
    elif name == "humaneval" and not all(
        isinstance(meta[k], str) and meta[k] for k in ("prompt", "entry_point", "test")
    ):
        return "metadata.prompt/entry_point/test are not all non-empty strings"
    return None


def _mutation_problem(record: dict[str, Any], span: Any) -> str | None:
    """An optional mutation span (docs/DATA.md §4): an incorrect record, a non-empty span of
    ``output``, and a kind."""
    if record["is_correct"]:
        return "metadata.mutation on a correct solution"
    if not isinstance(span, dict) or not isinstance(span.get("kind"), str):
        return "metadata.mutation is not an object with a kind"
    start, end = span.get("start"), span.get("end")
    if not (isinstance(start, int) and isinstance(end, int)) or not (
        0 <= start < end <= len(record["output"])
    ):
        return "metadata.mutation start/end are not a non-empty span of the output"
    return None


def check_split(
    label: str, name: str, jsonl: Path, metadata: Path, problems: Path, sha256: str | None
) -> list[Check]:
    """Index, per-line schema, checksum, and metadata consistency of one JSONL split."""
    if not jsonl.is_file():
        return [Check(label, False, f"{jsonl} missing")]
    checks = []
    try:
        n_lines = len(load_index(jsonl)) - 1
        checks.append(Check(f"{label}: offset index", True))
    except JsonlError as err:
        return [Check(f"{label}: offset index", False, str(err))]
    if sha256 is not None:
        ok = sha256_file(jsonl) == sha256
        checks.append(
            Check(f"{label}: sha256", ok, "" if ok else "content differs from the manifest")
        )
    stored = _load_json(metadata)
    if (
        not isinstance(stored, dict)
        or not {"metadata", "problem_index_map", "stats"} <= stored.keys()
    ):
        checks.append(
            Check(f"{label}: metadata", False, f"{metadata.name} missing, not JSON, or lacks keys")
        )
        stored = None
    builder, problem = _scan(jsonl, name, stored)
    checks.append(Check(f"{label}: schema of {n_lines} lines", problem is None, problem or ""))
    if stored is not None and problem is None:
        checks.append(_compare_metadata(f"{label}: metadata", builder, stored, n_lines))
        checks.append(_compare_sidecar(f"{label}: {problems.name}", stored, _load_json(problems)))
    return checks


def _scan(
    jsonl: Path, name: str, stored: dict[str, Any] | None
) -> tuple[MetadataBuilder, str | None]:
    """Rebuild the metadata from the JSONL; the first schema or per-line mismatch, if any."""
    builder = MetadataBuilder()
    per_line = stored["metadata"] if stored else None
    try:
        for number, record in enumerate(iter_jsonl(jsonl)):
            problem = line_problem(record, name)
            if problem:
                return builder, f"{jsonl}:{number + 1}: {problem}"
            entry = builder.add(record)
            if per_line is not None and (number >= len(per_line) or per_line[number] != entry):
                return (
                    builder,
                    f"{jsonl}:{number + 1}: per-line metadata entry {number} does not match the line",
                )
    except JsonlError as err:
        return builder, str(err)
    return builder, None


def _compare_metadata(
    label: str, builder: MetadataBuilder, stored: dict[str, Any], n_lines: int
) -> Check:
    if len(stored["metadata"]) != n_lines:
        return Check(
            label, False, f"{len(stored['metadata'])} per-line entries for {n_lines} lines"
        )
    stored_map = stored["problem_index_map"]
    keys = ("correct_indices", "incorrect_indices", "indices")
    for pid, entry in stored_map.items():
        for key in keys:
            bad = [i for i in entry.get(key) or [] if not (isinstance(i, int) and 0 <= i < n_lines)]
            if bad:
                return Check(
                    label, False, f"problem {pid!r}: {key} {bad[0]} out of range (0..{n_lines - 1})"
                )
    with_lengths = bool(stored.get("token_lengths_computed"))
    expected = {
        pid: e.to_json(with_lengths, builder.has_is_correct) for pid, e in builder.problems.items()
    }
    if stored_map != expected:
        differing = sorted(set(stored_map) ^ set(expected)) or [
            p for p in expected if stored_map.get(p) != expected[p]
        ]
        return Check(
            label, False, f"problem_index_map differs from the JSONL (first: {differing[0]!r})"
        )
    if stored["stats"] != builder.stats():
        return Check(label, False, "stats differ from the counts in the JSONL")
    return Check(label, True, f"{len(stored_map)} problems")


def _compare_sidecar(label: str, stored: dict[str, Any], sidecar: Any) -> Check:
    if not isinstance(sidecar, dict):
        return Check(label, False, "missing or not JSON")
    same = all(
        sidecar.get(k) == stored.get(k) for k in ("problem_index_map", "stats", "source_sha256")
    )
    return Check(label, same, "" if same else "differs from the metadata file")


def _check_eval(path: Path, label: str) -> Check:
    if not path.is_file():
        return Check(label, False, f"{path} missing")
    try:
        n_lines = len(load_index(path)) - 1
        for number, record in enumerate(iter_jsonl(path), 1):
            meta = record.get("metadata")
            if (
                not isinstance(record.get("task_id"), str)
                or not isinstance(record.get("instruction"), str)
                or not isinstance(meta, dict)
            ):
                return Check(label, False, f"{path}:{number}: needs task_id, instruction, metadata")
            missing = [k for k in EVAL_METADATA_FIELDS if k not in meta]
            tests_ok = all(
                _tests_ok(meta.get(f"{k}_tests")) for k in ("public", "private", "generated")
            )
            if missing or not tests_ok:
                return Check(
                    label,
                    False,
                    f"{path}:{number}: metadata lacks {missing or 'well-formed tests'}",
                )
    except JsonlError as err:
        return Check(label, False, str(err))
    return Check(label, True, f"{n_lines} problems")


def _tests_ok(tests: Any) -> bool:
    return (
        isinstance(tests, dict)
        and isinstance(tests.get("input"), list)
        and isinstance(tests.get("output"), list)
        and len(tests["input"]) == len(tests["output"])
    )


def _check_tests(path: Path, label: str) -> Check:
    """``{problem: {task_name, public_tests, ...}}``, read one problem per line (as written)."""
    if not path.is_file():
        return Check(label, False, f"{path} missing")
    count, closed = 0, False
    for lineno, raw in iter_raw_lines(path):
        text = raw.decode("utf-8", errors="replace").rstrip(",")
        if lineno == 1 and text == "{":
            continue
        if text == "}":
            closed = True
            continue
        try:
            (entry,) = json.loads("{" + text + "}").values()
        except ValueError:
            return Check(label, False, f"{path}:{lineno}: not one 'problem: tests' entry per line")
        if not isinstance(entry, dict) or not all(
            _tests_ok(entry.get(f"{k}_tests")) for k in ("public", "private", "generated")
        ):
            return Check(
                label,
                False,
                f"{path}:{lineno}: tests are not {{input: [...], output: [...]}} pairs",
            )
        count += 1
    return Check(label, closed, f"{count} problems" if closed else "file is truncated")


def _check_stats(paths: DatasetPaths, manifest: dict[str, Any], name: str) -> Check:
    label = f"datasets/{name}/stats"
    stats = manifest.get("stats", {})
    if not stats.get("file") or not (paths.root / stats["file"]).is_file():
        return Check(label, False, "no summary; run the stats step")
    built = {s: i.get("sha256") for s, i in manifest.get("process", {}).get("splits", {}).items()}
    if stats.get("inputs") != built:
        return Check(
            label,
            False,
            f"{stats['file']} is older than the processed splits; re-run the stats step",
        )
    return Check(label, True, stats["file"])


def _check_small(paths: DatasetPaths, name: str) -> list[Check]:
    checks = []
    for split, budget in SMALL_SIZES[name].items():
        label = f"datasets_local_small/{name}_small/{split}"
        small = paths.small_split(split)
        checks += check_split(
            label,
            name,
            small,
            paths.small_split_metadata(split),
            paths.small_split_problems(split),
            None,
        )
        if small.is_file():
            checks.append(_check_small_origin(label, paths, split, budget))
    return checks


def _check_small_origin(label: str, paths: DatasetPaths, split: str, budget: int) -> Check:
    """The small lines are the recorded lines of the full split, whole problems, within budget."""
    info = (_load_json(paths.small_split_problems(split)) or {}).get("small") or {}
    indices = info.get("source_indices")
    if not isinstance(indices, list):
        return Check(f"{label}: drawn from", False, "small metadata lacks 'small.source_indices'")
    try:
        small, full = JsonlFile(paths.small_split(split)), JsonlFile(paths.split(split))
        same = len(small) == len(indices) <= budget and small.raw_many(
            range(len(small))
        ) == full.raw_many(indices)
    except (JsonlError, IndexError) as err:
        return Check(f"{label}: drawn from", False, str(err))
    detail = (
        f"{len(indices)} lines from {len(info.get('problems', []))} problems"
        if same
        else "lines differ from the recorded source lines"
    )
    return Check(f"{label}: drawn from", same, detail)
