"""Training and validation sets: sampled line indices -> encoded examples -> batches.

The sampled indices are written to a manifest in the run folder, so a run's data can be
reproduced and inspected. Batches come from length-grouped shuffles that depend only on
(seed, epoch), and the position inside an epoch is part of the checkpoint, so a resumed run
sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weighted_mtp.base.io import StorageError
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import DataConfig, SamplingConfig
from weighted_mtp.data.collate import (
    Batch,
    EncodedExample,
    PairBatch,
    collate,
    collate_pairs,
    encode_example,
    encode_with_mutation,
    encode_with_span,
    length_grouped_batches,
)
from weighted_mtp.data.jsonl import JsonlFile
from weighted_mtp.data.metadata import load_problem_index
from weighted_mtp.data.sampling import sample, shard_for_rank
from weighted_mtp.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class SplitFiles:
    jsonl: Path
    metadata: Path


def split_files(layout: StorageLayout, data: DataConfig, split: str) -> SplitFiles:
    paths = layout.dataset(data.dataset)
    if data.small:
        files = SplitFiles(paths.small_split(split), paths.small_split_metadata(split))
    else:
        files = SplitFiles(paths.split(split), paths.split_metadata(split))
    for path in (files.jsonl, files.metadata):
        if not path.is_file():
            raise StorageError(
                f"{path}: missing; build it with `wmtp storage datasets --datasets {data.dataset}`"
            )
    return files


@dataclass
class ExampleSet:
    """Encoded examples of one rank, with their source line indices."""

    examples: list[EncodedExample]
    line_indices: list[int]
    manifest: dict[str, Any] = field(default_factory=dict)
    problem_ids: list[str] = field(default_factory=list)
    difficulty: dict[str, int | None] = field(default_factory=dict)
    correct: list[bool] = field(default_factory=list)
    """Per example, whether its solution is correct: filled by the modes that mix correct and
    incorrect rows (``LABELLED_MODES``) on a labelled split, else empty."""
    spans: list[tuple[int, ...]] = field(default_factory=list)
    """Per example (with ``correct``), the positions in ``input_ids`` of the tokens its recorded
    mutation wrote or re-tokenised (docs/DATA.md §4, ``collate.encode_with_mutation``); empty
    for a correct row and for an incorrect row whose record has no mutation."""

    def __len__(self) -> int:
        return len(self.examples)


PAIRED_MODES = ("pairwise", "length_balanced_pairs")
LABELLED_MODES = ("all", "mixed")
"""Pointwise modes whose rows may be incorrect: their batches carry ``INCORRECT_EXTRA`` and
``MUTATION_EXTRA`` (docs/METHOD.md §7, what the oracle weightings read)."""
SPAN_EXTRA = "mutation_span"
"""``batch.extras`` key of the placement set's span indicator: 1.0 on the tokens that overlap
the mutation's characters (docs/METHOD.md §6)."""
MUTATION_EXTRA = "mutation_tokens"
"""``batch.extras`` key of a labelled batch's mutation indicator: 1.0 on the tokens an
incorrect row's recorded mutation wrote or re-tokenised (``collate.encode_with_mutation``)."""
INCORRECT_EXTRA = "incorrect"
"""``batch.extras`` key of the row label: 1.0 on every position of an incorrect row's
tokens, 0.0 on a correct row and on padding."""


def build_examples(
    files: SplitFiles,
    sampling: SamplingConfig,
    tokenizer: Tokenizer,
    max_length: int,
    n_samples: int,
    rank: int = 0,
    world: int = 1,
    allow_fewer: bool = False,
) -> ExampleSet:
    """Sample, shard by rank, read and encode. Pointwise modes give ``EncodedExample``s (the
    correct side); pair modes give ``(correct, incorrect)`` tuples of them."""
    problem_index = load_problem_index(files.metadata)
    config = sampling.model_copy(update={"n_samples": n_samples})
    items = sample(problem_index, config, allow_fewer=allow_fewer)
    # Equal counts on every rank, so every rank runs the same number of steps.
    mine = shard_for_rank(items, rank, world)[: len(items) // world]
    paired = sampling.mode in PAIRED_MODES
    lines = sorted({i for item in mine for i in _lines_of(item, paired)})
    reader = JsonlFile(files.jsonl)
    try:
        records = dict(zip(lines, reader.read(lines), strict=True))
    finally:
        reader.close()
    labelled = sampling.mode in LABELLED_MODES and any(i.is_correct is not None for i in mine)
    examples, kept, problem_ids, dropped = [], [], [], 0
    correct, spans = [], []
    for item in mine:
        prompt = records[item.correct_idx]  # a pair shares the correct side's prompt
        if labelled:
            example, span = _encode_labelled(tokenizer, records[item.correct_idx], max_length)
            encoded = [example]
        else:
            encoded = [
                encode_example(tokenizer, prompt["instruction"], prompt.get("input", ""),
                               records[i]["output"], max_length)
                for i in _lines_of(item, paired)
            ]  # fmt: skip
        if any(e is None for e in encoded):
            dropped += 1
            continue
        examples.append(tuple(encoded) if paired else encoded[0])
        kept.append(list(_lines_of(item, paired)) if paired else item.correct_idx)
        problem_ids.append(item.problem_id)
        if labelled:
            correct.append(bool(item.is_correct))
            spans.append(span)
    manifest = {
        "file": str(files.jsonl),
        "mode": sampling.mode,
        "seed": sampling.seed,
        "n_sampled": len(items),
        "rank": rank,
        "world": world,
        "dropped_too_long": dropped,
        "line_indices": kept,
    }
    if sampling.mode == "mixed":
        manifest["incorrect_fraction"] = sampling.incorrect_fraction
        manifest["incorrect"] = correct.count(False)
        manifest["incorrect_with_span"] = sum(
            1 for c, s in zip(correct, spans, strict=True) if not c and s
        )
    difficulty = {
        pid: problem_index["problem_index_map"].get(pid, {}).get("difficulty")
        for pid in set(problem_ids)
    }
    return ExampleSet(examples, kept, manifest, problem_ids, difficulty, correct, spans)


def _encode_labelled(
    tokenizer: Tokenizer, record: dict[str, Any], max_length: int
) -> tuple[EncodedExample | None, tuple[int, ...]]:
    """One record of a labelled mode: its example (None when too long) and, for a record with
    ``metadata.mutation`` (docs/DATA.md §4), the positions of the tokens its mutation wrote or
    re-tokenised (``encode_with_mutation``)."""
    fields = (record["instruction"], record.get("input", ""), record["output"])
    mutation = (record.get("metadata") or {}).get("mutation")
    if mutation is None:
        return encode_example(tokenizer, *fields, max_length), ()
    encoded = encode_with_mutation(tokenizer, *fields, mutation, max_length)
    return (None, ()) if encoded is None else (encoded[0], tuple(encoded[1]))


def build_span_examples(
    files: SplitFiles, tokenizer: Tokenizer, max_length: int, limit: int
) -> tuple[ExampleSet, list[torch.Tensor]] | None:
    """Up to ``limit`` incorrect records of a split that carry ``metadata.mutation``
    (docs/DATA.md §4), evenly spaced over the split's incorrect lines, encoded as training
    encodes them, with one indicator per example (1.0 on the response tokens that overlap the
    span). None when the split has no such record: only its first incorrect line is read then.
    """
    if limit <= 0:
        return None
    problem_index = load_problem_index(files.metadata)["problem_index_map"]
    candidates = sorted(i for entry in problem_index.values()
                        for i in entry.get("incorrect_indices") or [])  # fmt: skip
    if not candidates:
        return None
    reader = JsonlFile(files.jsonl)
    try:
        if "mutation" not in (reader.read([candidates[0]])[0].get("metadata") or {}):
            return None
        count = min(limit, len(candidates))
        lines = sorted({candidates[j * len(candidates) // count] for j in range(count)})
        records = reader.read(lines)
    finally:
        reader.close()
    examples, kept, spans, dropped = [], [], [], 0
    for line, record in zip(lines, records, strict=True):
        mutation = (record.get("metadata") or {}).get("mutation")
        if mutation is None:
            continue
        fields = (record["instruction"], record.get("input", ""), record["output"])
        span = (mutation["start"], mutation["end"])
        encoded = encode_with_span(tokenizer, *fields, span, max_length)
        if encoded is None or not encoded[1]:
            dropped += 1
            continue
        indicator = torch.zeros(encoded[0].length)
        indicator[encoded[1]] = 1.0
        examples.append(encoded[0])
        kept.append(line)
        spans.append(indicator)
    if not examples:
        return None
    manifest = {"file": str(files.jsonl), "mode": "mutation_spans", "dropped_too_long": dropped,
                "line_indices": kept}  # fmt: skip
    return ExampleSet(examples, kept, manifest), spans


def _lines_of(item: Any, paired: bool) -> tuple[int, ...]:
    return (item.correct_idx, item.incorrect_idx) if paired else (item.correct_idx,)


def example_length(example: EncodedExample | tuple[EncodedExample, ...]) -> int:
    if isinstance(example, tuple):
        return max(e.length for e in example)
    return example.length


class BatchStream:
    """Resumable stream of training batches over epochs."""

    def __init__(self, data: ExampleSet, batch_size: int, seed: int, pad_id: int):
        if len(data) == 0:
            raise StorageError("no training examples left after sampling and length filtering")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.lengths = [example_length(e) for e in data.examples]
        # Precomputed per-token signals, one 1-D tensor per example (e.g. the reference's CE),
        # padded into ``batch.extras`` when batches are built.
        self.extras: dict[str, list[torch.Tensor]] = {}

    def collate(self, chosen: list[int]) -> Batch | PairBatch:
        examples = [self.data.examples[i] for i in chosen]
        if isinstance(examples[0], tuple):
            return collate_pairs([e[0] for e in examples], [e[1] for e in examples], self.pad_id)
        batch = collate(examples, self.pad_id)
        length = batch.tokens.shape[1]
        if self.data.correct:  # a labelled mode: the row labels and spans (docs/METHOD.md §7)
            incorrect, span = torch.zeros(len(chosen), length), torch.zeros(len(chosen), length)
            for row, i in enumerate(chosen):
                if not self.data.correct[i]:
                    incorrect[row, : examples[row].length] = 1.0
                    span[row, list(self.data.spans[i])] = 1.0
            batch.extras[INCORRECT_EXTRA] = incorrect
            batch.extras[MUTATION_EXTRA] = span
        for name, values in self.extras.items():
            padded = torch.zeros(len(chosen), length)
            for row, i in enumerate(chosen):
                padded[row, : values[i].numel()] = values[i]
            batch.extras[name] = padded
        return batch

    def batches_per_epoch(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def plan(self, epoch: int) -> list[list[int]]:
        return length_grouped_batches(self.lengths, self.batch_size, self.seed, epoch)

    def iterate(self, state) -> Iterator[Batch]:
        """Yield batches from ``state.epoch``/``state.batches_in_epoch``, advancing ``state``."""
        while True:
            plan = self.plan(state.epoch)
            while state.batches_in_epoch < len(plan):
                chosen = plan[state.batches_in_epoch]
                state.batches_in_epoch += 1
                yield self.collate(chosen)
            state.epoch += 1
            state.batches_in_epoch = 0

    def all_batches(self) -> list[Batch]:
        """Every example once, in length order (validation)."""
        order = sorted(range(len(self.data)), key=self.lengths.__getitem__)
        return [
            self.collate(order[s : s + self.batch_size])
            for s in range(0, len(order), self.batch_size)
        ]


def batch_tokens(batch: Batch | PairBatch) -> int:
    """Real (non-padding) tokens of a batch, both sides of a pair batch included."""
    if isinstance(batch, PairBatch):
        return batch_tokens(batch.pos) + batch_tokens(batch.neg)
    return int(batch.attention_mask.sum())
