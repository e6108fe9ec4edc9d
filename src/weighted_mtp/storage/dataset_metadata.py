"""``<split>_metadata.json`` and its ``_problems.json`` sidecar, small splits, and stats.

Everything streams the JSONL once; the problem map is held as typed arrays (8 bytes a line),
and the per-line list is written out as it is read.
"""

from __future__ import annotations

import json
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from weighted_mtp.data.jsonl import iter_jsonl
from weighted_mtp.storage.dataset_records import line_problem_id

NO_LENGTH = -1


@dataclass
class ProblemEntry:
    """Line indices and token lengths of one problem, as 4-byte typed arrays."""

    difficulty: int | None
    correct: array = field(default_factory=lambda: array("I"))
    incorrect: array = field(default_factory=lambda: array("I"))
    correct_lengths: array = field(default_factory=lambda: array("i"))
    incorrect_lengths: array = field(default_factory=lambda: array("i"))
    other: array = field(default_factory=lambda: array("I"))
    other_lengths: array = field(default_factory=lambda: array("i"))

    def to_json(self, with_lengths: bool, has_is_correct: bool) -> dict[str, Any]:
        def lengths(values: array) -> list[int] | None:
            return values.tolist() if with_lengths else None

        out = {
            "difficulty": self.difficulty,
            "correct_indices": self.correct.tolist(),
            "incorrect_indices": self.incorrect.tolist(),
            "correct_token_lengths": lengths(self.correct_lengths),
            "incorrect_token_lengths": lengths(self.incorrect_lengths),
        }
        if not has_is_correct:
            out["indices"] = self.other.tolist()
            out["token_lengths"] = lengths(self.other_lengths)
        return out


# What the metadata needs of one line: problem id, difficulty, is_correct, token length.
LineFacts = tuple[str, "int | None", "bool | None", "int | None"]


def line_facts(record: dict[str, Any]) -> LineFacts:
    """The facts of one processed record that its metadata entry and the problem map hold."""
    meta = record.get("metadata") or {}
    correct = bool(record["is_correct"]) if "is_correct" in record else None
    return line_problem_id(record), meta.get("difficulty"), correct, meta.get("token_length")


def line_entry(facts: LineFacts) -> dict[str, Any]:
    """The per-line entry of ``<split>_metadata.json`` for a line with these facts."""
    pid, difficulty, correct, _ = facts
    line: dict[str, Any] = {}
    if correct is not None:
        line["is_correct"] = correct
    if difficulty is not None:
        line["difficulty"] = difficulty
    line["problem_id"] = pid
    return line


def line_entry_text(facts: LineFacts) -> str:
    """:func:`line_entry` as the JSON text the metadata file holds."""
    return _dumps(line_entry(facts))


@dataclass
class MetadataBuilder:
    """Accumulates the problem map of one split line by line."""

    problems: dict[str, ProblemEntry] = field(default_factory=dict)
    total: int = 0
    correct: int = 0
    incorrect: int = 0
    has_is_correct: bool = False
    all_lengths: bool = True
    difficulty_dist: dict[str, int] = field(default_factory=dict)

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add line ``self.total``; return its per-line metadata entry."""
        facts = line_facts(record)
        self.add_facts(facts)
        return line_entry(facts)

    def add_facts(self, facts: LineFacts) -> None:
        """Add line ``self.total`` from its :func:`line_facts`."""
        pid, difficulty, correct, length = facts
        self.all_lengths &= isinstance(length, int)
        length = length if isinstance(length, int) else NO_LENGTH
        entry = self.problems.setdefault(pid, ProblemEntry(difficulty))
        if correct is not None:
            self.has_is_correct = True
            side = (
                (entry.correct, entry.correct_lengths)
                if correct
                else (entry.incorrect, entry.incorrect_lengths)
            )
            side[0].append(self.total)
            side[1].append(length)
            self.correct += correct
            self.incorrect += not correct
        else:
            entry.other.append(self.total)
            entry.other_lengths.append(length)
        if difficulty is not None:
            self.difficulty_dist[str(difficulty)] = self.difficulty_dist.get(str(difficulty), 0) + 1
        self.total += 1

    def stats(self) -> dict[str, Any]:
        valid = [p for p in self.problems.values() if p.correct and p.incorrect]
        return {
            "total": self.total,
            "correct": self.correct,
            "incorrect": self.incorrect,
            "difficulty_dist": dict(
                sorted(self.difficulty_dist.items(), key=lambda kv: int(kv[0]))
            ),
            "has_is_correct": self.has_is_correct,
            "has_difficulty": bool(self.difficulty_dist),
            "has_problem_id": True,
            "n_problems": len(self.problems),
            "n_valid_problems": len(valid),
            "total_possible_pairs": sum(len(p.correct) * len(p.incorrect) for p in valid),
        }


class MetadataWriter:
    """Writes ``<split>_metadata.json`` and its ``_problems.json`` sidecar line by line.

    The per-line list streams to disk as lines are added; the problem map, the stats and
    ``header`` (source file, its sha256, token-length provenance) are written by
    :meth:`finish`, once the JSONL is complete. Used by the metadata step, which reads the
    processed JSONL, and by the process step, which feeds the lines as it writes them
    (docs/DATA.md §6); both give the same bytes.
    """

    def __init__(self, metadata_out: Path, problems_out: Path):
        self.problems_out = problems_out
        self.builder = MetadataBuilder()
        self.handle = open(metadata_out, "w", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.handle.write('{"metadata": [')

    def add(self, record: dict[str, Any]) -> None:
        facts = line_facts(record)
        self.add_lines([facts], [line_entry_text(facts)])

    def add_lines(self, facts: list[LineFacts], texts: list[str]) -> None:
        """Add lines by their facts and their entries' JSON texts (:func:`line_entry_text`)."""
        if not facts:
            return
        first = self.builder.total == 0
        for one in facts:
            self.builder.add_facts(one)
        self.handle.write(("\n" if first else ",\n") + ",\n".join(texts))

    def finish(self, header: dict[str, Any]) -> dict[str, Any]:
        """Write the problem map, the stats and ``header`` into both files; return the stats."""
        builder, meta = self.builder, self.handle
        meta.write("\n],\n")
        stats = builder.stats()
        tail = {**header, "token_lengths_computed": builder.all_lengths and builder.total > 0}
        with open(self.problems_out, "w", encoding="utf-8") as side:
            side.write("{")
            _write_tail(meta, builder, stats, tail)
            _write_tail(side, builder, stats, tail)
        meta.close()
        return stats

    def close(self) -> None:
        self.handle.close()


def build_metadata(
    jsonl: Path, metadata_out: Path, problems_out: Path, header: dict[str, Any]
) -> dict[str, Any]:
    """Write the metadata file (docs/STORAGE.md §3) and the sidecar for ``jsonl``; return the stats.

    ``header`` (source file, sha256, token-length provenance, ...) goes into both files.
    """
    writer = MetadataWriter(metadata_out, problems_out)
    try:
        for record in iter_jsonl(jsonl):
            writer.add(record)
        return writer.finish(header)
    finally:
        writer.close()


def split_header(source_file: str, sha256: str, token_lengths: Any) -> dict[str, Any]:
    """The provenance both metadata files of a split carry: the JSONL's name and sha256, and
    what the manifest says of its token lengths."""
    return {"source_file": source_file, "source_sha256": sha256, "token_lengths": token_lengths}


def summary_line(split: str, stats: dict[str, Any]) -> str:
    """What the metadata step says of one split it built."""
    pairs = (
        f", {stats['n_valid_problems']} with pairs, {stats['total_possible_pairs']} pairs"
        if stats["has_is_correct"]
        else ""
    )
    return f"{split} {stats['total']} lines, {stats['n_problems']} problems{pairs}"


def _write_tail(
    out: IO[str], builder: MetadataBuilder, stats: dict[str, Any], tail: dict[str, Any]
) -> None:
    with_lengths = tail["token_lengths_computed"]
    out.write('"problem_index_map": {')
    for number, (pid, entry) in enumerate(builder.problems.items()):
        body = entry.to_json(with_lengths, builder.has_is_correct)
        out.write(("\n" if number == 0 else ",\n") + f"{_dumps(pid)}: {_dumps(body)}")
    out.write("\n},\n")
    out.write(f'"stats": {_dumps(stats)}')
    for key, value in tail.items():
        out.write(f",\n{_dumps(key)}: {_dumps(value)}")
    out.write("\n}\n")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---- small splits: whole problems, fixed seed ----


def select_small(problem_map: dict[str, dict[str, Any]], budget: int, seed: int) -> list[str]:
    """Whole problems, in a seeded random order, while they fit in ``budget`` lines.

    Problems with both correct and incorrect lines come first, so pair sampling works on
    the small split; a problem that does not fit is passed over for a smaller one.
    """
    rng = random.Random(seed)

    def lines(entry: dict[str, Any]) -> int:
        return (
            len(entry["correct_indices"])
            + len(entry["incorrect_indices"])
            + len(entry.get("indices") or [])
        )

    ids = list(problem_map)
    rng.shuffle(ids)
    paired = [
        p for p in ids if problem_map[p]["correct_indices"] and problem_map[p]["incorrect_indices"]
    ]
    paired_set = set(paired)
    ordered = paired + [p for p in ids if p not in paired_set]
    chosen, used = [], 0
    for pid in ordered:
        size = lines(problem_map[pid])
        if size and used + size <= budget:
            chosen.append(pid)
            used += size
        if used == budget:
            break
    return chosen


def problem_lines(entry: dict[str, Any]) -> list[int]:
    return sorted(
        [*entry["correct_indices"], *entry["incorrect_indices"], *(entry.get("indices") or [])]
    )


# ---- stats ----


def split_summary(jsonl: Path, max_length: int) -> dict[str, Any]:
    """Counts, ratio, char lengths and templated token lengths of one processed split."""
    builder = MetadataBuilder()
    instruction, output, tokens = array("I"), array("I"), array("i")
    for record in iter_jsonl(jsonl):
        builder.add(record)
        instruction.append(len(record["instruction"]))
        output.append(len(record["output"]))
        length = (record.get("metadata") or {}).get("token_length")
        if isinstance(length, int):
            tokens.append(length)
    stats = builder.stats()
    has_lengths = bool(tokens) and len(tokens) == len(instruction)
    summary = {
        "count": stats["total"],
        "problems": stats["n_problems"],
        "correct": stats["correct"] if stats["has_is_correct"] else None,
        "incorrect": stats["incorrect"] if stats["has_is_correct"] else None,
        "correct_ratio": round(stats["correct"] / stats["total"], 4)
        if stats["has_is_correct"] and stats["total"]
        else None,
        "valid_problems": stats["n_valid_problems"],
        "possible_pairs": stats["total_possible_pairs"],
        "difficulty_dist": stats["difficulty_dist"],
        "instruction_chars": _describe(instruction),
        "output_chars": _describe(output),
        "token_length": _describe(tokens) if has_lengths else None,
    }
    if has_lengths:
        import numpy as np

        summary["token_length"]["over_max_length"] = int(
            np.count_nonzero(np.frombuffer(tokens, np.int32) > max_length)
        )
    return summary


def _describe(values: array) -> dict[str, float] | None:
    if not values:
        return None
    import numpy as np  # here, so the tokenising workers that use this module start without it

    data = np.frombuffer(values, dtype=np.int32 if values.typecode == "i" else np.uint32)
    return {
        "mean": round(float(data.mean()), 2),
        "p50": int(np.percentile(data, 50, method="lower")),
        "p95": int(np.percentile(data, 95, method="lower")),
        "max": int(data.max()),
    }
