"""Tokenisation, loss masking, dynamic padding and length grouping with a real tokenizer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weighted_mtp.data.alpaca import format_prompt, format_text
from weighted_mtp.data.collate import (
    IGNORE_INDEX,
    Batch,
    EncodedExample,
    collate,
    collate_pairs,
    encode_example,
    length_grouped_batches,
)
from weighted_mtp.models.tokenizer import Tokenizer

INSTRUCTION = "Read two integers and print their sum."
OUTPUT = (
    "import sys\n\ndef main():\n    a, b = map(int, sys.stdin.read().split())\n    print(a + b)\n"
)


@pytest.fixture(scope="module")
def tok(small_tokenizer) -> Tokenizer:
    return Tokenizer(small_tokenizer)


def encode(tok, output=OUTPUT, instruction=INSTRUCTION, input_text="", max_length=4096):
    return encode_example(tok, instruction, input_text, output, max_length)


def labelled(example: EncodedExample) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


def test_bos_first_eos_last_and_supervised(tok):
    ex = encode(tok)
    assert ex.input_ids[0] == tok.bos_id and ex.labels[0] == IGNORE_INDEX
    assert ex.input_ids[-1] == tok.eos_id and ex.labels[-1] == tok.eos_id
    assert ex.length == len(ex.input_ids) == len(ex.labels)


def test_prompt_masked_response_labelled(tok):
    ex = encode(tok)
    prompt = format_prompt(INSTRUCTION, "")
    assert ex.labels[: ex.prompt_length] == [IGNORE_INDEX] * ex.prompt_length
    assert ex.labels[ex.prompt_length :] == ex.input_ids[ex.prompt_length :]
    assert tok.decode(ex.input_ids[1 : ex.prompt_length]) == prompt
    # the labelled tokens are the response, then EOS
    assert labelled(ex)[-1] == tok.eos_id
    assert tok.decode(labelled(ex)[:-1]) == OUTPUT


def test_with_input_field(tok):
    ex = encode(tok, input_text="3 4")
    prompt = format_prompt(INSTRUCTION, "3 4")
    assert "### Input:\n3 4" in prompt
    assert tok.decode(ex.input_ids[1 : ex.prompt_length]) == prompt
    assert tok.decode(labelled(ex)[:-1]) == OUTPUT


def test_leading_indentation_of_the_response_survives(tok):
    output = "    return x\n\tpass  \n"
    ex = encode(tok, output=output)
    # Decode from the prompt's final newline: SentencePiece drops one leading space of a
    # sequence that starts with one, so start at a byte piece to see the exact text.
    assert tok.decode(ex.input_ids[ex.prompt_length - 1 : -1]) == "\n" + output
    assert ex.labels[ex.prompt_length - 1] == IGNORE_INDEX
    assert ex.labels[ex.prompt_length] != IGNORE_INDEX


def test_length_matches_the_metadata_token_length(tok):
    # storage measures BOS + templated text + EOS from one plain encode of format_text
    record = {"instruction": INSTRUCTION, "input": "", "output": OUTPUT}
    assert encode(tok).length == len(tok.encode(format_text(record), bos=True, eos=True))


def test_empty_response_supervises_only_eos(tok):
    ex = encode(tok, output="")
    assert labelled(ex) == [tok.eos_id]


def test_too_long_examples_are_dropped_not_truncated(tok):
    full = encode(tok)
    assert encode(tok, max_length=full.length) == full
    assert encode(tok, max_length=full.length - 1) is None
    prompt_only = encode(tok, output="")
    assert encode(tok, max_length=prompt_only.length - 1) is None  # the prompt alone does not fit
    assert encode(tok, instruction="word " * 5000, max_length=2048) is None


def make(tok, outputs):
    return [encode(tok, output=o) for o in outputs]


def test_dynamic_padding_and_masks(tok):
    examples = make(tok, ["x = 1\n", OUTPUT, "print(2)"])
    batch = collate(examples, tok.pad_id, pad_to_multiple=8)
    longest = max(e.length for e in examples)
    length = -(-longest // 8) * 8
    assert batch.tokens.shape == batch.labels.shape == batch.attention_mask.shape == (3, length)
    assert batch.tokens.dtype == batch.labels.dtype == torch.int64
    for row, ex in enumerate(examples):
        assert batch.tokens[row, : ex.length].tolist() == ex.input_ids
        assert batch.labels[row, : ex.length].tolist() == ex.labels
        assert batch.attention_mask[row].tolist() == [1] * ex.length + [0] * (length - ex.length)
        assert (batch.labels[row, ex.length :] == IGNORE_INDEX).all()
        assert (batch.tokens[row, ex.length :] == tok.pad_id).all()
    # pad == eos, yet each row's supervised EOS is distinguishable from its padding
    assert tok.pad_id == tok.eos_id
    assert int((batch.labels == tok.eos_id).sum()) == 3
    exact = collate(examples, tok.pad_id, pad_to_multiple=1)
    assert exact.tokens.shape == (3, longest) and len(exact) == 3
    assert isinstance(batch.to("cpu"), Batch)
    assert torch.equal(batch.to("cpu").tokens, batch.tokens)


def test_pair_collation_shares_one_length(tok):
    pos = make(tok, ["a = 1\n", "b = 2\n"])
    neg = make(tok, [OUTPUT, "c\n"])
    pairs = collate_pairs(pos, neg, tok.pad_id, pad_to_multiple=8)
    longest = max(e.length for e in pos + neg)
    length = -(-longest // 8) * 8
    assert pairs.pos.tokens.shape == pairs.neg.tokens.shape == (2, length)
    stacked = pairs.stacked()
    assert stacked.tokens.shape == (4, length)
    assert torch.equal(stacked.tokens[:2], pairs.pos.tokens)
    assert torch.equal(stacked.attention_mask[2:], pairs.neg.attention_mask)
    assert stacked.attention_mask.sum(1).tolist() == [e.length for e in pos + neg]
    with pytest.raises(ValueError, match="as many negatives"):
        collate_pairs(pos, neg[:1], tok.pad_id)


def test_length_grouped_batches_cover_each_index_once():
    lengths = [(i * 37) % 101 for i in range(103)]
    batches = length_grouped_batches(lengths, batch_size=4, seed=1, epoch=0, group_size=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(103))
    assert [len(b) for b in batches[:-1]] == [4] * 25 and len(batches[-1]) == 3  # partial last
    assert batches == length_grouped_batches(lengths, 4, seed=1, epoch=0, group_size=3)
    assert batches != length_grouped_batches(lengths, 4, seed=1, epoch=1, group_size=3)
    assert batches != length_grouped_batches(lengths, 4, seed=2, epoch=0, group_size=3)


def test_length_grouped_batches_group_similar_lengths():
    lengths = list(range(64))
    batches = length_grouped_batches(lengths, batch_size=8, seed=0, epoch=3, group_size=8)
    # one group holds everything: each batch is a run of 8 consecutive lengths
    assert sorted(tuple(sorted(lengths[i] for i in b)) for b in batches) == [
        tuple(range(k, k + 8)) for k in range(0, 64, 8)
    ]
    assert [min(lengths[i] for i in b) for b in batches] != list(range(0, 64, 8))  # order shuffled


# U+2581 is the SentencePiece space marker: decoding turns it into a space by design.
unicode_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
    max_size=40,
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(instruction=unicode_text, output=unicode_text)
def test_boundary_from_offsets_property(tok, instruction, output):
    ex = encode_example(tok, instruction, "", output, max_length=100_000)
    prompt = format_prompt(instruction, "")
    ids, starts = tok.encode_with_offsets(prompt + output)
    response = [t for t, s in zip(ids, starts, strict=True) if s >= len(prompt)]
    assert labelled(ex) == [*response, tok.eos_id]
    assert ex.labels[: ex.prompt_length] == [IGNORE_INDEX] * ex.prompt_length
    # the labelled tokens are exactly the response text: one token more or less would
    # change the decoded string (decoded after the prompt's final newline piece)
    assert tok.decode(ex.input_ids[ex.prompt_length - 1 : -1]) == "\n" + output
