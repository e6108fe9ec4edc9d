"""Tokenisation, loss masking and dynamic padding of Alpaca examples (docs/METHOD.md §7).

An example is tokenised once, as the full templated text, with character offsets: BOS is
prepended, EOS appended and supervised (the model must learn to stop), and
every token that starts before the response's first character is masked with ``-100``. The
boundary comes from the offsets of that single tokenisation, not from a second tokenisation
of the prompt, which can split differently at the junction.

Examples longer than ``max_length`` are dropped (``encode_example`` returns ``None``), never
tail-truncated: a cut program has an arbitrary last token, which the critic would treat as
the terminal position (docs/METHOD.md §4, §7).

``EncodedExample.length`` equals the ``token_length`` the storage step records per line (the
same text, tokenised once, plus BOS and EOS), so the loop can drop over-long lines from the
metadata before reading them.

Batches are right-padded to the batch maximum rounded up to a multiple (never to a fixed
2048). Padding uses ``pad_id`` (= EOS for LLaMA), so it is identified by the attention
mask and the ``-100`` labels, never by token id (docs/METHOD.md §7).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from weighted_mtp.data.alpaca import format_prompt

IGNORE_INDEX = -100


class OffsetTokenizer(Protocol):
    """What :func:`encode_example` needs of ``weighted_mtp.models.tokenizer.Tokenizer``."""

    bos_id: int
    eos_id: int

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]: ...


@dataclass(frozen=True, slots=True)
class EncodedExample:
    """``input_ids`` = BOS + templated text + EOS; ``labels`` the same with ``-100`` on BOS and
    the prompt. ``prompt_length`` counts the masked leading tokens (BOS included), so
    ``input_ids[prompt_length:]`` is the response followed by EOS."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int

    @property
    def length(self) -> int:
        return len(self.input_ids)


def encode_example(
    tokenizer: OffsetTokenizer,
    instruction: str,
    input_text: str,
    output: str,
    max_length: int,
) -> EncodedExample | None:
    """Tokenise one Alpaca example; ``None`` when it does not fit ``max_length`` tokens.

    ``None`` covers both a prompt that alone does not fit and a full text (BOS and EOS
    included) longer than ``max_length``: such examples are dropped, not truncated; the
    caller counts them.
    """
    encoded = _encode(tokenizer, instruction, input_text, output, max_length)
    return None if encoded is None else encoded[0]


def _encode(
    tokenizer: OffsetTokenizer, instruction: str, input_text: str, output: str, max_length: int
) -> tuple[EncodedExample, list[int], int, int] | None:
    """``encode_example`` plus the token start offsets, the prompt length and the text length."""
    prompt = format_prompt(instruction, input_text)
    text = prompt + output
    ids, starts = tokenizer.encode_with_offsets(text)
    if len(ids) + 2 > max_length:
        return None
    boundary = len(prompt)
    # Tokens are in text order, so the prompt is a prefix; a token that straddles the
    # boundary starts in the prompt and stays masked.
    n_prompt = sum(1 for start in starts if start < boundary)
    input_ids = [tokenizer.bos_id, *ids, tokenizer.eos_id]
    labels = [IGNORE_INDEX] * (1 + n_prompt) + input_ids[1 + n_prompt :]
    return EncodedExample(input_ids, labels, 1 + n_prompt), starts, boundary, len(text)


def span_tokens(
    starts: Sequence[int], text_length: int, boundary: int, lo: int, hi: int
) -> list[int]:
    """Indices (into ``starts``) of the response tokens whose characters overlap ``[lo, hi)``.

    Token ``i`` covers ``[starts[i], starts[i + 1])`` (the last one runs to ``text_length``);
    a response token starts at or after ``boundary``, the prompt's length, as
    ``encode_example`` masks. ``lo``/``hi`` are offsets into the whole templated text
    (docs/DATA.md §4: a mutation span's offsets into ``output`` plus ``boundary``).
    """
    ends = [*starts[1:], text_length]
    return [
        i
        for i, (start, end) in enumerate(zip(starts, ends, strict=True))
        if start >= boundary and start < hi and end > lo
    ]


def encode_with_span(
    tokenizer: OffsetTokenizer,
    instruction: str,
    input_text: str,
    output: str,
    span: tuple[int, int],
    max_length: int,
) -> tuple[EncodedExample, list[int]] | None:
    """``encode_example`` of one record (one tokenisation) and the positions in
    ``input_ids`` (BOS counted) of the response tokens that overlap ``span``, a character
    range ``[start, end)`` of ``output``; ``None`` when the example does not fit."""
    encoded = _encode(tokenizer, instruction, input_text, output, max_length)
    if encoded is None:
        return None
    example, starts, boundary, text_length = encoded
    lo, hi = boundary + span[0], boundary + span[1]
    return example, [1 + i for i in span_tokens(starts, text_length, boundary, lo, hi)]


def encode_with_mutation(
    tokenizer: OffsetTokenizer,
    instruction: str,
    input_text: str,
    output: str,
    mutation: dict,
    max_length: int,
) -> tuple[EncodedExample, list[int]] | None:
    """``encode_example`` of an incorrect record and the positions in ``input_ids`` of the
    tokens its recorded mutation (docs/DATA.md §4: ``start``, ``end``, ``original``) wrote or
    re-tokenised; ``None`` when the example does not fit.

    The positions are those of ``encode_with_span`` (the tokens that overlap the span's
    characters) together with the tokens where this row's tokenisation departs from the
    correct solution's, ``output[:start] + original + output[end:]``, tokenised the same way:
    from the first token that differs to the last before the two agree again (at least the
    first differing token). A mutation also changes how the text around it is cut: ``" k !="``
    gives ``" k", " ", "!", "="`` where the correct ``" k =="`` gives ``" k", " =="``, so the
    lone ``" "`` is a target only the mistake teaches; a shortened site (``"i"`` for
    ``"i + 1"``) keeps its first token and the wrong target is the one after it.
    """
    encoded = encode_with_span(
        tokenizer, instruction, input_text, output, (mutation["start"], mutation["end"]),
        max_length,
    )  # fmt: skip
    if encoded is None:
        return None
    example, overlap = encoded
    restored = output[: mutation["start"]] + mutation["original"] + output[mutation["end"] :]
    right = _encode(tokenizer, instruction, input_text, restored, max(max_length, 1 << 30))
    wrong, correct = example.input_ids, right[0].input_ids if right else []
    first = 0
    while first < min(len(wrong), len(correct)) and wrong[first] == correct[first]:
        first += 1
    tail = 0
    while (tail < min(len(wrong), len(correct)) - first
           and wrong[-1 - tail] == correct[-1 - tail]):  # fmt: skip
        tail += 1
    differ = list(range(first, max(len(wrong) - tail, min(first + 1, len(wrong)))))
    positions = {*overlap, *(p for p in differ if p >= example.prompt_length)}
    return example, sorted(positions)


@dataclass
class Batch:
    """Right-padded tensors ``[B, L]``: ``tokens`` (int64), ``labels`` (``-100`` on prompt and
    padding), ``attention_mask`` (int64, 1 = real token)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-token precomputed signals ``[B, L]`` (e.g. ``ref_ce``: the reference's CE)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            move(self.tokens),
            move(self.labels),
            move(self.attention_mask),
            {k: move(v) for k, v in self.extras.items()},
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(examples: Sequence[EncodedExample], pad_id: int, length: int) -> Batch:
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = example.length
        tokens[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        mask[row, :n] = 1
    return Batch(tokens, labels, mask)


def collate(examples: Sequence[EncodedExample], pad_id: int, pad_to_multiple: int = 8) -> Batch:
    """Right-pad ``examples`` to the longest one rounded up to ``pad_to_multiple``."""
    if not examples:
        raise ValueError("collate: empty batch")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    length = _round_up(max(e.length for e in examples), pad_to_multiple)
    return _pad(examples, pad_id, length)


@dataclass
class PairBatch:
    """Correct (``pos``) and incorrect (``neg``) sides of P pairs, padded to one length ``L``,
    so :meth:`stacked` gives one ``[2P, L]`` batch (pos rows first) for a single forward."""

    pos: Batch
    neg: Batch

    def stacked(self) -> Batch:
        return Batch(
            torch.cat([self.pos.tokens, self.neg.tokens]),
            torch.cat([self.pos.labels, self.neg.labels]),
            torch.cat([self.pos.attention_mask, self.neg.attention_mask]),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        return PairBatch(self.pos.to(device, non_blocking), self.neg.to(device, non_blocking))

    def __len__(self) -> int:
        return len(self.pos)


def collate_pairs(
    pos_examples: Sequence[EncodedExample],
    neg_examples: Sequence[EncodedExample],
    pad_id: int,
    pad_to_multiple: int = 8,
) -> PairBatch:
    """Pad both sides of the pairs to their common maximum length (rounded up)."""
    if len(pos_examples) != len(neg_examples) or not pos_examples:
        raise ValueError(
            f"collate_pairs: need as many negatives as positives (>0), "
            f"got {len(pos_examples)} and {len(neg_examples)}"
        )
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    longest = max(e.length for e in (*pos_examples, *neg_examples))
    length = _round_up(longest, pad_to_multiple)
    return PairBatch(_pad(pos_examples, pad_id, length), _pad(neg_examples, pad_id, length))


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    group_size: int = 50,
) -> list[list[int]]:
    """Batches of indices into ``lengths`` with similar lengths, for one epoch.

    Shuffle all indices, cut them into groups of ``batch_size * group_size``, sort each group
    by length, cut it into batches and shuffle the order of the full batches. Every index
    appears exactly once; the result depends only on ``(seed, epoch)``, so a resumed run
    can rebuild the epoch and skip the batches already done. The one partial batch, if
    any, comes last so that ``drop_last`` can drop it.
    """
    if batch_size < 1 or group_size < 1:
        raise ValueError("batch_size and group_size must be >= 1")
    # A string seed is hashed with SHA-512, independent of PYTHONHASHSEED.
    rng = random.Random(f"length_grouped:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group_size
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lengths.__getitem__)
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    partial = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    rng.shuffle(full)
    return full + partial
