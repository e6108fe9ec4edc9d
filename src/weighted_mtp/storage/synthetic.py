"""``wmtp storage synthetic``: a known-answer CodeContests source (docs/DATA.md §1-§5).

Writes ``<out>/code_contests/data/{train,valid,test}-00000-of-00001.parquet`` with the Hub
dataset's columns and types plus ``incorrect_solutions_mutation``, so that ``wmtp storage
datasets --datasets codecontests --source <out>`` reads it like a local copy of the real
dataset. Every problem comes from a family of :mod:`synthetic_families`; every incorrect
solution is one recorded mutation of a correct one, and its span says which characters
decide that it is wrong. Expected outputs come from the family's reference, run in-process on
the generated inputs; no solution text is ever executed here.

Deterministic: the same seed and counts give byte-identical files (one random generator per
problem seeded from ``(seed, split, index)``, no timestamps, pinned parquet writer options).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from weighted_mtp.base.errors import UserError
from weighted_mtp.base.io import atomic_path, write_text_atomic
from weighted_mtp.storage.dataset_records import MUTATION_COLUMN, PYTHON3
from weighted_mtp.storage.dataset_sources import hub_features, hub_shard_path
from weighted_mtp.storage.synthetic_families import (
    CRASH,
    FAMILIES,
    Family,
    Mutation,
    Params,
    Style,
    render,
)

SPLITS = ("train", "valid", "test")
DEFAULT_PROBLEMS = {"train": 1000, "valid": 100, "test": 100}
GENERATOR_VERSION = 2
LEVELS = {1: "EASY", 2: "MEDIUM", 3: "HARD"}  # CodeContests difficulty ClassLabel ids 1..3
CF_RATING = {1: 800, 2: 1300, 3: 1800}
N_PUBLIC, N_PRIVATE, N_GENERATED = 2, 3, 4
MAX_INCORRECT = 4
SEARCH_INPUTS = 200  # random inputs tried to find one that a mutant gets wrong
PARQUET_OPTIONS = {
    "compression": "snappy",
    "version": "2.6",
    "data_page_version": "1.0",
    "use_dictionary": True,
    "write_statistics": True,
    "row_group_size": 256,
}


@dataclass
class Counts:
    """What a run produced, per split (``synthetic.json``)."""

    problems: int = 0
    correct: int = 0
    incorrect: int = 0
    tests: int = 0
    dropped_mutations: int = 0  # no input found on which the mutant's output differs


def mutation_features() -> dict[str, Any]:
    """The ``datasets`` feature of the extra column: one entry per incorrect solution."""
    from datasets import List, Value

    return {
        "start": List(Value("int32")),
        "end": List(Value("int32")),
        "kind": List(Value("string")),
        "original": List(Value("string")),
    }


def source_schema() -> pa.Schema:
    """The Hub CodeContests schema with the mutation column appended."""
    from datasets import Features

    features = dict(hub_features("codecontests"))
    features[MUTATION_COLUMN] = mutation_features()
    return Features(features).arrow_schema


def _same(a: str | None, b: str | None) -> bool:
    """Outputs equal as the CodeContests checker sees them (whitespace-separated tokens)."""
    return a is not None and b is not None and a.split() == b.split()


class ProblemBuilder:
    """One problem of one family: parameters, tests, statement, solutions."""

    def __init__(self, family: Family, params: Params, rng: random.Random, held_out: bool):
        self.family, self.params, self.rng = family, params, rng
        self.held_out = held_out
        self.level = rng.randint(1, 3)
        self.inputs: dict[str, list[Any]] = {"public": [], "private": [], "generated": []}
        self.seen: set[str] = set()
        self.dropped = 0

    def text(self, data: Any) -> str:
        return self.family.format_input(self.params, data)

    def answer(self, data: Any, bug: str | None = None) -> str | None:
        return self.family.solve(self.params, data, bug)

    def add(self, kind: str, data: Any) -> bool:
        """Add a test input unless the same stdin is already a test."""
        text = self.text(data)
        if text in self.seen:
            return False
        self.seen.add(text)
        self.inputs[kind].append(data)
        return True

    def draw_tests(self) -> None:
        draw = self.family.draw_input
        for kind, count, level in (
            ("public", N_PUBLIC, 1),
            ("private", N_PRIVATE, self.level),
            ("generated", N_GENERATED, self.level),
        ):
            for _ in range(count * 5):
                if len(self.inputs[kind]) >= count:
                    break
                self.add(kind, draw(self.rng, self.params, level))
        for data in self.family.edge_inputs(self.rng, self.params):
            self.add("generated", data)

    def all_inputs(self) -> list[Any]:
        return [d for kind in ("public", "private", "generated") for d in self.inputs[kind]]

    def fails(self, bug: str) -> bool:
        """Whether the mutant gets some test wrong; else look for (and add) such an input."""
        if any(not _same(self.answer(d, bug), self.answer(d)) for d in self.all_inputs()):
            return True
        for i in range(SEARCH_INPUTS):
            data = self.family.draw_input(self.rng, self.params, 1 + i % 3)
            if not _same(self.answer(data, bug), self.answer(data)) and self.add("generated", data):
                return True
        self.dropped += 1
        return False

    def mutants(self, limit: int | None = MAX_INCORRECT) -> list[tuple[Style, Mutation]]:
        """Up to ``limit`` mutants (None: all) that fail a test, of as many kinds as possible."""
        candidates = [(s, m) for s in self.family.styles for m in s.mutations]
        self.rng.shuffle(candidates)
        chosen: list[tuple[Style, Mutation]] = []
        tried: set[tuple[str, int]] = set()
        kinds: set[str] = set()
        for fresh_kind_only in (True, False):
            for style, mutation in candidates:
                key = (style.name, style.mutations.index(mutation))
                if (limit is not None and len(chosen) >= limit) or key in tried:
                    continue
                if fresh_kind_only and mutation.kind in kinds:
                    continue
                tried.add(key)
                if self.fails(mutation.bug):
                    chosen.append((style, mutation))
                    kinds.add(mutation.kind)
        return chosen

    def statement(self) -> str:
        intros = self.family.intros
        index = len(intros) - 1 if self.held_out else self.rng.randrange(len(intros) - 1)
        parts = [
            intros[index].format(**self.params),
            "Input",
            self.family.input_spec,
            "Output",
            self.family.output_spec,
            "Examples" if len(self.inputs["public"]) > 1 else "Example",
        ]
        for data in self.inputs["public"]:
            parts += ["Input", self.text(data).rstrip("\n"), "Output", self.answer(data).rstrip()]
        return "\n\n".join(parts) + "\n"

    def tests(self, kind: str) -> dict[str, list[str]]:
        data = self.inputs[kind]
        outputs = [self.answer(d) for d in data]
        if any(o is CRASH for o in outputs):
            raise AssertionError(f"{self.family.name}: the reference crashed")  # a bug here
        return {"input": [self.text(d) for d in data], "output": outputs}

    def row(self, name: str, every_mutation: bool = False) -> dict[str, Any]:
        """The problem's source row; ``every_mutation`` keeps all the family's mutants (tests)."""
        self.draw_tests()
        mutants = self.mutants(None if every_mutation else MAX_INCORRECT)
        correct = [render(style, self.params).code for style in self.family.styles]
        wrong = [render(style, self.params, mutation) for style, mutation in mutants]
        return {
            "name": name,
            "description": self.statement(),
            "public_tests": self.tests("public"),
            "private_tests": self.tests("private"),
            "generated_tests": self.tests("generated"),
            "source": 0,  # UNKNOWN_SOURCE
            "difficulty": self.level,
            "solutions": {"language": [PYTHON3] * len(correct), "solution": correct},
            "incorrect_solutions": {
                "language": [PYTHON3] * len(wrong),
                "solution": [r.code for r in wrong],
            },
            "cf_contest_id": 0,
            "cf_index": "",
            "cf_points": 0.0,
            "cf_rating": CF_RATING[self.level],
            "cf_tags": list(self.family.tags),
            "is_description_translated": False,
            "untranslated_description": "",
            "time_limit": {"seconds": 2, "nanos": 0},
            "memory_limit_bytes": 256 * 2**20,
            "input_file": "",
            "output_file": "",
            MUTATION_COLUMN: {
                "start": [r.span[0] for r in wrong],  # type: ignore[index]
                "end": [r.span[1] for r in wrong],  # type: ignore[index]
                "kind": [m.kind for _, m in mutants],
                "original": [r.original for r in wrong],
            },
        }


def generate_split(seed: int, split: str, count: int, counts: Counts) -> list[dict[str, Any]]:
    """The rows of one split."""
    rows = []
    for index in tqdm(range(count), desc=f"synthetic {split}", unit=" problems", mininterval=0.5):
        family = FAMILIES[index % len(FAMILIES)]
        rng = random.Random(f"wmtp-synthetic:{seed}:{split}:{index}")
        params = family.draw_params(rng)
        builder = ProblemBuilder(family, params, rng, held_out=split != "train")
        row = builder.row(f"synthetic_{split}_{index:05d}_{family.name}")
        rows.append(row)
        counts.problems += 1
        counts.correct += len(row["solutions"]["solution"])
        counts.incorrect += len(row["incorrect_solutions"]["solution"])
        counts.tests += sum(
            len(row[f"{k}_tests"]["input"]) for k in ("public", "private", "generated")
        )
        counts.dropped_mutations += builder.dropped
    return rows


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """One shard with the source schema and pinned writer options (atomic)."""
    table = pa.Table.from_pylist(rows, schema=source_schema())
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **PARQUET_OPTIONS)


def run(out: Path, seed: int = 0, problems: dict[str, int] | None = None) -> dict[str, Any]:
    """Write the source under ``out``; return (and write as ``synthetic.json``) its summary."""
    problems = {**DEFAULT_PROBLEMS, **(problems or {})}
    if any(n < 0 for n in problems.values()):
        raise UserError(f"--problems: counts must be >= 0, got {problems}")
    paths = {split: hub_shard_path(out, "codecontests", split) for split in SPLITS}
    folder = paths["train"].parent
    if folder.is_dir():
        stray = sorted(p.name for p in folder.iterdir() if p.is_file() and p not in paths.values())
        if stray:
            raise UserError(f"{folder}: holds other files ({', '.join(stray)}); use a new --out")
    started = time.perf_counter()
    counts = {split: Counts() for split in SPLITS}
    for split in SPLITS:
        rows = generate_split(seed, split, problems[split], counts[split])
        write_parquet(rows, paths[split])
    kinds: Counter[str] = Counter()
    for split in SPLITS:
        table = pq.read_table(paths[split], columns=[MUTATION_COLUMN])
        for entry in table.column(MUTATION_COLUMN).to_pylist():
            kinds.update(entry["kind"])
    summary = {
        "generator": "weighted-mtp known-answer CodeContests source",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "families": [family.name for family in FAMILIES],
        "splits": {split: vars(counts[split]) for split in SPLITS},
        "mutation_kinds": dict(sorted(kinds.items())),
    }
    write_text_atomic(
        out / "code_contests" / "synthetic.json", json.dumps(summary, indent=2) + "\n"
    )
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary
