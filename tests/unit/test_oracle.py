"""The positive control's pieces (docs/EVALUATION.md §9): the ``mixed`` sampling mode, the row
labels and mutation spans a labelled mode puts into every batch, and the two oracle
weightings (docs/METHOD.md §6): exact weights, a zero row under the loss's normalisation, and
the control arms applied to them."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from weighted_mtp import registry
from weighted_mtp.config import ConfigError, SamplingConfig, load_config
from weighted_mtp.data.alpaca import format_prompt
from weighted_mtp.data.collate import IGNORE_INDEX, Batch, encode_with_mutation
from weighted_mtp.data.dataset import (
    INCORRECT_EXTRA,
    MUTATION_EXTRA,
    BatchStream,
    SplitFiles,
    build_examples,
)
from weighted_mtp.data.jsonl import JsonlWriter
from weighted_mtp.data.sampling import NotEnoughSamples, mixed_lines, sample
from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights
from weighted_mtp.train.mtp_loss import head_denominators, mtp_forward_backward
from weighted_mtp.train.weighting import (
    WEIGHTINGS,
    Micro,
    OracleDrop,
    OracleSpan,
    apply_control,
    control_generator,
)

N_HEADS = 4


# ---- the mixed sampling mode ----


def problem_map(n_problems: int = 10, n_correct: int = 3, n_incorrect: int = 5) -> dict:
    pmap, line = {}, 0
    for p in range(n_problems):
        correct = list(range(line, line + n_correct))
        incorrect = list(range(line + n_correct, line + n_correct + n_incorrect))
        line += n_correct + n_incorrect
        pmap[f"p{p}"] = {"difficulty": 1, "correct_indices": correct,
                         "incorrect_indices": incorrect}  # fmt: skip
    return pmap


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_mixed_draws_the_declared_share_of_labelled_incorrect_rows(fraction):
    pmap = problem_map()
    incorrect = {i for e in pmap.values() for i in e["incorrect_indices"]}
    got = mixed_lines(pmap, 20, fraction, max_per_problem=4, seed=3)
    assert len(got) == 20 and len({s.index for s in got}) == 20
    labels = Counter(s.is_correct for s in got)
    assert labels[False] == round(20 * fraction) and labels[True] == 20 - round(20 * fraction)
    assert all((s.index in incorrect) == (s.is_correct is False) for s in got)
    assert all(s.index in pmap[s.problem_id]["correct_indices"] + pmap[s.problem_id][
        "incorrect_indices"] for s in got)  # fmt: skip
    assert got == mixed_lines(pmap, 20, fraction, max_per_problem=4, seed=3)
    assert got != mixed_lines(pmap, 20, fraction, max_per_problem=4, seed=4)


def test_mixed_caps_each_side_per_problem_and_refuses_a_short_side():
    pmap = problem_map(n_problems=4)
    got = mixed_lines(pmap, 16, 0.5, max_per_problem=2, seed=0)  # 2 x 4 per side: all of them
    per = Counter((s.problem_id, s.is_correct) for s in got)
    assert set(per.values()) == {2}
    with pytest.raises(NotEnoughSamples, match="mixed: 9 incorrect rows requested but only 8"):
        mixed_lines(pmap, 12, 0.75, max_per_problem=2, seed=0)
    fewer = mixed_lines(pmap, 12, 0.75, max_per_problem=2, seed=0, allow_fewer=True)
    assert Counter(s.is_correct for s in fewer) == {True: 3, False: 8}


def test_mixed_needs_its_fraction_and_other_modes_refuse_it():
    config = SamplingConfig(mode="mixed", incorrect_fraction=0.25, n_samples=8,
                            max_pairs_per_problem=4, seed=1)  # fmt: skip
    got = sample({"problem_index_map": problem_map()}, config)
    assert Counter(s.is_correct for s in got) == {True: 6, False: 2}
    with pytest.raises(ConfigError, match="mode 'mixed' needs incorrect_fraction"):
        load_config(None, ["data.sampling.mode=mixed"])
    with pytest.raises(ConfigError, match="applies to mode 'mixed' only"):
        load_config(None, ["data.sampling.incorrect_fraction=0.5"])
    # Every other mode keeps its config exactly: the new key is None by default.
    assert SamplingConfig().incorrect_fraction is None


# ---- labels and spans in the batches ----


class CharTokenizer:
    """One token per character (offsets are the character positions): span tokens are exact."""

    bos_id, eos_id, pad_id = 1, 2, 2

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        return [3 + ord(c) % 200 for c in text], list(range(len(text)))


CORRECT = "print(sum(x > k for x in a))"
MUTATED = "print(sum(x < k for x in a))"  # one recorded mutation: ">" -> "<" at 12..13


def write_split(tmp_path, with_spans: bool = True) -> SplitFiles:
    records, pmap = [], {}
    for p in range(6):
        prompt = {"instruction": f"Problem {p}: count the values above k.", "input": ""}
        meta = {"mutation": {"start": 12, "end": 13, "kind": "comparison_flipped",
                             "original": ">"}} if with_spans else {}  # fmt: skip
        records.append({**prompt, "output": CORRECT, "is_correct": True, "metadata": {}})
        records.append({**prompt, "output": MUTATED, "is_correct": False, "metadata": meta})
        pmap[f"p{p}"] = {"difficulty": 1, "correct_indices": [2 * p],
                         "incorrect_indices": [2 * p + 1]}  # fmt: skip
    jsonl, index = tmp_path / "train.jsonl", tmp_path / "train.idx"
    with JsonlWriter(jsonl, index) as writer:
        for record in records:
            writer.write(record)
    metadata = tmp_path / "train_metadata.json"
    metadata.write_text(json.dumps({"problem_index_map": pmap}))
    return SplitFiles(jsonl, metadata)


def labelled_batch(tmp_path, mode: str = "mixed", **sampling) -> tuple[Batch, list[bool]]:
    config = SamplingConfig(mode=mode, seed=0, max_pairs_per_problem=4, **sampling)
    data = build_examples(write_split(tmp_path), config, CharTokenizer(), 512, 8)
    stream = BatchStream(data, 8, 0, CharTokenizer.pad_id)
    return stream.collate(list(range(len(data)))), data.correct


def test_a_mixed_batch_carries_each_rows_label_and_its_mutation_span(tmp_path):
    batch, correct = labelled_batch(tmp_path, incorrect_fraction=0.5)
    assert Counter(correct) == {True: 4, False: 4}
    # One token per character: BOS, the prompt (the same length for problems 0-5), then the
    # response, whose mutated character ">" -> "<" is response token 12.
    prompt_length = 1 + len(format_prompt("Problem 0: count the values above k.", ""))
    for row, ok in enumerate(correct):
        length = int(batch.attention_mask[row].sum())
        incorrect, span = batch.extras[INCORRECT_EXTRA][row], batch.extras[MUTATION_EXTRA][row]
        assert incorrect[:length].tolist() == [0.0 if ok else 1.0] * length
        assert not incorrect[length:].any()  # padding
        expected = [] if ok else [prompt_length + 12]
        assert span.nonzero().flatten().tolist() == expected, row
        if not ok:
            token = int(batch.tokens[row, prompt_length + 12])
            assert token == CharTokenizer().encode_with_offsets("<")[0][0]


class PieceTokenizer:
    """Greedy longest match over a few multi-character pieces, else one character: a mutation
    re-cuts the text around it as a real subword tokenizer does."""

    bos_id, eos_id, pad_id = 1, 2, 2
    pieces = (" ==", " k", " 0", "range(", " n)", " +", " 1")

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        ids, starts, at = [], [], 0
        while at < len(text):
            piece = next((p for p in self.pieces if text.startswith(p, at)), text[at])
            ids.append(3 + (self.pieces.index(piece) if piece in self.pieces else 10 + ord(piece)))
            starts.append(at)
            at += len(piece)
        return ids, starts

    def pieces_of(self, text: str, positions: list[int], prompt: int) -> list[str]:
        _, starts = self.encode_with_offsets(text)
        ends = [*starts[1:], len(text)]
        return [text[starts[p - 1 - prompt] : ends[p - 1 - prompt]] for p in positions]


@pytest.mark.parametrize(
    ("output", "mutation", "expected"),
    [
        # " k !=" is cut " k", " ", "!", "=" where the correct " k ==" is " k", " ==": the lone
        # space is a target only the mistake teaches.
        ("x % k != 0", {"start": 6, "end": 8, "original": "=="}, [" ", "!", "="]),
        # A shortened site keeps its first token; the wrong target is the one after it.
        ("range(i, n)", {"start": 6, "end": 7, "original": "i + 1"}, ["i", ","]),
        # A one-token swap: the span and the re-tokenised tokens are the same one.
        ("x % k == 1", {"start": 9, "end": 10, "original": "0"}, [" 1"]),
    ],
)
def test_the_mutation_tokens_are_the_span_and_what_the_mutation_re_tokenised(
    output, mutation, expected
):
    tokenizer = PieceTokenizer()
    example, positions = encode_with_mutation(tokenizer, "Count.", "", output, mutation, 512)
    prompt = len(tokenizer.encode_with_offsets(format_prompt("Count.", ""))[0])
    assert example.prompt_length == 1 + prompt
    text = format_prompt("Count.", "") + output
    assert tokenizer.pieces_of(text, positions, 0) == expected
    assert all(p >= example.prompt_length for p in positions)


def test_all_mode_is_labelled_too_and_pair_or_correct_modes_are_not(tmp_path):
    batch, correct = labelled_batch(tmp_path, mode="all")
    assert len(correct) == 8 and set(batch.extras) == {INCORRECT_EXTRA, MUTATION_EXTRA}
    config = SamplingConfig(mode="correct_of_pairs", seed=0, max_pairs_per_problem=4)
    data = build_examples(write_split(tmp_path), config, CharTokenizer(), 512, 4)
    assert data.correct == [] and data.spans == []
    assert BatchStream(data, 4, 0, 2).collate([0, 1]).extras == {}
    assert "incorrect" not in data.manifest


def test_the_mixed_manifest_counts_incorrect_rows_and_their_spans(tmp_path):
    config = SamplingConfig(mode="mixed", incorrect_fraction=0.5, seed=0, max_pairs_per_problem=4)
    data = build_examples(write_split(tmp_path), config, CharTokenizer(), 512, 8)
    assert data.manifest["incorrect"] == 4 and data.manifest["incorrect_with_span"] == 4
    assert data.manifest["incorrect_fraction"] == 0.5


# ---- the oracle weightings ----


def oracle_batch() -> Batch:
    """Four rows of length 12: prompt 0..3, responses of varied length, right padding.
    Rows 1 and 3 are incorrect with spans {6, 7} and {9}; row 2 is correct."""
    tokens = torch.arange(48).reshape(4, 12) % 40 + 3
    labels = tokens.clone()
    labels[:, :4] = IGNORE_INDEX
    ends = [12, 11, 10, 12]
    for row, end in enumerate(ends):
        labels[row, end:] = IGNORE_INDEX
    attention = (labels != IGNORE_INDEX).long()
    attention[:, :4] = 1
    incorrect = torch.zeros(4, 12)
    span = torch.zeros(4, 12)
    for row in (1, 3):
        incorrect[row, : ends[row]] = 1.0
    span[1, [6, 7]] = 1.0
    span[3, 9] = 1.0
    return Batch(tokens, labels, attention, {INCORRECT_EXTRA: incorrect, MUTATION_EXTRA: span})


def test_oracles_are_registered_built_ins_without_settings_or_helper():
    for name, cls in (("oracle_span", OracleSpan), ("oracle_drop", OracleDrop)):
        entry = registry.entry(name)
        assert entry.load() is cls and WEIGHTINGS[name] is cls
        assert entry.settings is None and entry.helper is None and entry.selection
        assert registry.helper_for("baseline", name) is None
        config = load_config(None, [f"weighting.name={name}", "weighting.control=shuffled"])
        assert config.weighting.name == name


def test_oracle_span_zeroes_exactly_the_span_tokens_of_incorrect_rows():
    batch = oracle_batch()
    out = OracleSpan().weigh(batch, N_HEADS, Micro(0, 0, True))
    expected = torch.ones(4, 12)
    expected[1, [6, 7]] = 0.0
    expected[3, 9] = 0.0
    assert torch.equal(out.dense, expected)
    # The normaliser is the weight sum over valid targets: 3 zeroed response tokens fewer.
    torch.testing.assert_close(
        out.denominators, head_denominators(batch.labels, expected, N_HEADS, "weight_sum")
    )
    tokens = int((batch.labels != IGNORE_INDEX).sum())
    assert float(out.denominators[0]) == tokens - 3


def test_oracle_drop_zeroes_every_token_of_incorrect_rows():
    batch = oracle_batch()
    out = OracleDrop().weigh(batch, N_HEADS, Micro(0, 0, True))
    expected = torch.ones(4, 12)
    expected[[1, 3]] = 0.0
    assert torch.equal(out.dense, expected)
    kept = int((batch.labels[[0, 2]] != IGNORE_INDEX).sum())
    assert float(out.denominators[0]) == kept
    metrics = OracleDrop.metrics(OracleDrop(), {"zeroed": 3.0, "scored": 12.0})
    assert metrics == {"oracle/zeroed_fraction": 0.25}


def test_statistics_count_the_zeroed_targets_of_training_micro_batches():
    batch, weighting = oracle_batch(), OracleDrop()
    weighting.weigh(batch, N_HEADS, Micro(0, 0, True))
    weighting.weigh(batch, N_HEADS, Micro(0, 1, False))  # validation: not counted
    zeroed, scored = weighting.take_sums().tolist()
    mask = batch.labels != IGNORE_INDEX
    assert scored == int(mask.sum()) and zeroed == int(mask[[1, 3]].sum())


def tiny_model() -> Transformer:
    args = ModelArgs(dim=32, n_layers=5, n_heads=4, vocab_size=64, ffn_hidden_dim=48,
                     n_future_tokens=N_HEADS, max_seq_len=32)  # fmt: skip
    model = Transformer(args)
    init_weights(model, seed=0)
    return model


def test_a_zero_row_drops_out_of_the_loss_and_leaves_the_other_rows_scale_alone():
    """weight_sum (docs/METHOD.md §1): the step's loss with oracle_drop equals the uniform loss
    of the correct rows alone; a micro-batch of incorrect rows only gives 0, never NaN."""
    torch.manual_seed(0)
    model, batch = tiny_model(), oracle_batch()
    coefficients = [1 / N_HEADS] * N_HEADS
    drop = OracleDrop().weigh(batch, N_HEADS, Micro(0, 0, True))
    with torch.no_grad():
        dropped = mtp_forward_backward(model, batch.tokens, batch.labels, drop.dense,
                                       drop.denominators, coefficients, backward=False)  # fmt: skip
        kept = [0, 2]
        alone = mtp_forward_backward(
            model, batch.tokens[kept], batch.labels[kept], None,
            head_denominators(batch.labels[kept], None, N_HEADS), coefficients, backward=False,
        )  # fmt: skip
    torch.testing.assert_close(dropped.loss, alone.loss)
    incorrect_only = Batch(batch.tokens[[1, 3]], batch.labels[[1, 3]],
                           batch.attention_mask[[1, 3]],
                           {k: v[[1, 3]] for k, v in batch.extras.items()})  # fmt: skip
    zero = OracleDrop().weigh(incorrect_only, N_HEADS, Micro(0, 0, True))
    assert float(zero.denominators.sum()) == 0.0
    loss = mtp_forward_backward(model, incorrect_only.tokens, incorrect_only.labels, zero.dense,
                                zero.denominators, coefficients)  # fmt: skip
    assert float(loss.loss) == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_shuffled_moves_the_span_zeros_within_their_rows():
    batch, micro = oracle_batch(), Micro(3, 1, True)
    mask = batch.labels != IGNORE_INDEX
    plain = OracleSpan().weigh(batch, N_HEADS, micro)
    moved = OracleSpan(control="shuffled", seed=7).weigh(batch, N_HEADS, micro)
    expected = apply_control(plain.dense, mask, "shuffled", control_generator(7, 3, 1, 0))
    assert torch.equal(moved.dense, expected) and not torch.equal(moved.dense, plain.dense)
    for row in range(4):  # each row keeps its number of zeros among its response tokens
        assert int((moved.dense[row][mask[row]] == 0).sum()) == int(
            (plain.dense[row][mask[row]] == 0).sum()
        )
    torch.testing.assert_close(
        moved.denominators, head_denominators(batch.labels, moved.dense, N_HEADS, "weight_sum")
    )


def test_shuffling_a_row_constant_oracle_changes_nothing_random_matched_does():
    """oracle_drop's weights are constant along each row, so ``shuffled`` (a permutation within
    the row) is the oracle itself; ``random_matched`` redraws every token from the
    micro-batch's weights and breaks the row link (docs/METHOD.md §6)."""
    batch, micro = oracle_batch(), Micro(0, 0, True)
    mask = batch.labels != IGNORE_INDEX
    plain = OracleDrop().weigh(batch, N_HEADS, micro).dense * mask
    shuffled = OracleDrop(control="shuffled", seed=1).weigh(batch, N_HEADS, micro).dense
    assert torch.equal(shuffled, plain)
    matched = OracleDrop(control="random_matched", seed=1).weigh(batch, N_HEADS, micro).dense
    assert not torch.equal(matched, plain)
    assert set(matched[mask].tolist()) <= {0.0, 1.0}
    assert float(matched[[1, 3]][mask[[1, 3]]].sum()) > 0  # incorrect rows get some weight


def test_without_labels_or_spans_the_oracles_say_what_data_they_need():
    batch = oracle_batch()
    plain = Batch(batch.tokens, batch.labels, batch.attention_mask)
    for cls in (OracleSpan, OracleDrop):
        with pytest.raises(ValueError, match="labelled sampling mode .*all or mixed"):
            cls().weigh(plain, N_HEADS, Micro())
    no_span = Batch(batch.tokens, batch.labels, batch.attention_mask,
                    {**batch.extras, MUTATION_EXTRA: torch.zeros(4, 12)})  # fmt: skip
    with pytest.raises(ValueError, match="incorrect row 1 of the batch has no mutation token"):
        OracleSpan().weigh(no_span, N_HEADS, Micro())
    # oracle_drop needs no span: a split without recorded mutations still has row labels.
    assert OracleDrop().weigh(no_span, N_HEADS, Micro()).dense is not None
