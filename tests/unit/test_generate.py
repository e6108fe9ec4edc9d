"""Plain and self-speculative decoding (docs/EVALUATION.md §1, "Decoding") on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weighted_mtp.evaluation.generate import (
    generate,
    sample_probs,
    speculative_accept,
    speculative_generate,
)
from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights

NO_EOS = -1  # random models emit token 2 (the default EOS) at times; most tests ignore EOS


def tiny_model(seed: int = 0, vocab: int = 97, n_future: int = 4) -> Transformer:
    args = ModelArgs(
        dim=32, n_layers=5, n_heads=2, vocab_size=vocab, ffn_hidden_dim=48,
        n_future_tokens=n_future, max_seq_len=256,
    )  # fmt: skip
    model = Transformer(args)
    init_weights(model, seed)
    return model.eval()


def random_prompts(count: int, vocab: int = 97, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def reference_greedy(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(model(torch.tensor([seq]))[0, -1, 0].argmax()))
    return seq[len(prompt) :]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from threads and suffer badly from oversubscription on a
    # shared CPU; restore the setting for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_model() -> Transformer:
    # fp64 so that block-wise and token-wise evaluation cannot flip an argmax by rounding.
    return tiny_model().double()


@pytest.fixture(scope="module")
def trained_model() -> Transformer:
    """Trained ~100 steps on the cycle 3, 4, ..., 18, 3, ...: every head can learn it."""
    torch.manual_seed(0)
    model = tiny_model(seed=3)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    n = model.n_future_tokens
    for _ in range(100):
        starts = torch.randint(0, 16, (4, 1))
        tokens = 3 + (starts + torch.arange(24)) % 16
        logits = model(tokens)
        loss = sum(
            F.cross_entropy(logits[:, :-k, k - 1].flatten(0, 1), tokens[:, k:].flatten())
            for k in range(1, n + 1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()  # fp32: after training its argmaxes are far from ties


def test_cached_greedy_matches_full_forward(random_model):
    for prompt in random_prompts(2):
        got = generate(random_model, [prompt], 8, eos_id=NO_EOS)[0]
        assert got == reference_greedy(random_model, prompt, 8)


def test_batched_ragged_equals_row_by_row(random_model):
    prompts = random_prompts(8, seed=2)
    assert len({len(p) for p in prompts}) > 2
    batched = generate(random_model, prompts, 25, eos_id=NO_EOS)
    rows = [generate(random_model, [p], 25, eos_id=NO_EOS)[0] for p in prompts]
    assert batched == rows
    assert all(len(r) == 25 for r in batched)


def test_fp32_batched_greedy_equals_row_by_row_and_full_forward():
    """fp32 with a larger vocabulary: batched greedy steps go through the bf16 screen (on a
    CPU with bf16 hardware), single rows through the logits; both give the full forward's
    argmaxes."""
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, vocab_size=3000, ffn_hidden_dim=96,
                     n_future_tokens=2, max_seq_len=64)  # fmt: skip
    model = Transformer(args)
    init_weights(model, 5)
    model.eval()
    prompts = random_prompts(6, vocab=3000, seed=4)
    batched = generate(model, prompts, 12, eos_id=NO_EOS)
    assert batched == [generate(model, [p], 12, eos_id=NO_EOS)[0] for p in prompts]
    assert batched[:2] == [reference_greedy(model, p, 12) for p in prompts[:2]]


def test_speculative_greedy_equals_plain_random_model(random_model):
    prompts = random_prompts(20)
    plain = generate(random_model, prompts, 40, eos_id=NO_EOS)
    for prompt, expected in zip(prompts, plain, strict=True):
        tokens, stats = speculative_generate(random_model, prompt, 40, eos_id=NO_EOS)
        assert tokens == expected
        assert stats.tokens == 40 and 1 <= stats.tokens_per_step <= 4


def test_speculative_greedy_trained_model_accepts_drafts(trained_model):
    prompts = [[3 + (s + i) % 16 for i in range(5)] for s in range(0, 16, 3)]
    plain = generate(trained_model, prompts, 40, eos_id=NO_EOS)
    proposed = accepted = 0
    for prompt, expected in zip(prompts, plain, strict=True):
        tokens, stats = speculative_generate(trained_model, prompt, 40, eos_id=NO_EOS)
        assert tokens == expected
        proposed += sum(stats.draft_proposed)
        accepted += sum(stats.draft_accepted)
        assert stats.tokens_per_step > 1.5
    assert accepted / proposed > 0.5


def test_sampling_reproducible_and_seed_dependent(random_model):
    prompts = random_prompts(4)
    kwargs = dict(temperature=1.0, top_p=0.95, eos_id=NO_EOS)
    a = generate(random_model, prompts, 20, seed=7, **kwargs)
    assert a == generate(random_model, prompts, 20, seed=7, **kwargs)
    assert a != generate(random_model, prompts, 20, seed=8, **kwargs)
    s7, _ = speculative_generate(random_model, prompts[0], 20, seed=7, **kwargs)
    assert s7 == speculative_generate(random_model, prompts[0], 20, seed=7, **kwargs)[0]
    assert s7 != speculative_generate(random_model, prompts[0], 20, seed=8, **kwargs)[0]


def test_top_p_near_zero_is_greedy(random_model):
    prompts = random_prompts(4)
    greedy = generate(random_model, prompts, 15, eos_id=NO_EOS)
    nucleus = generate(random_model, prompts, 15, temperature=1.0, top_p=1e-9, eos_id=NO_EOS)
    assert nucleus == greedy
    spec, _ = speculative_generate(
        random_model, prompts[0], 15, temperature=1.0, top_p=1e-9, eos_id=NO_EOS
    )
    assert spec == greedy[0]


def test_top_p_keeps_tokens_until_mass_exceeds_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.allclose(sample_probs(logits, 1.0, 0.7), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(sample_probs(logits, 1.0, 0.45), torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(sample_probs(logits, 0.0), torch.tensor([1.0, 0, 0, 0]))


def test_eos_and_stop_end_a_row(random_model):
    prompts = random_prompts(3)
    free = generate(random_model, prompts, 20, eos_id=NO_EOS)
    eos = free[0][6]
    cut = free[0].index(eos)  # the first occurrence is where row 0 must stop
    out = generate(random_model, prompts, 20, eos_id=eos)
    assert out[0] == free[0][:cut]
    assert speculative_generate(random_model, prompts[0], 20, eos_id=eos)[0] == free[0][:cut]
    for row, cont in enumerate(out[1:], start=1):  # other rows run on unaffected until EOS
        assert cont == free[row][: free[row].index(eos)] if eos in free[row] else free[row]
    stop = lambda ids: len(ids) >= 5 and ids[-1] % 2 == 0  # noqa: E731
    stopped = generate(random_model, prompts, 20, eos_id=NO_EOS, stop=stop)
    for cont, full in zip(stopped, free, strict=True):
        assert full[: len(cont)] == cont and (len(cont) == 20 or stop(cont))
    spec = speculative_generate(random_model, prompts[0], 20, eos_id=NO_EOS, stop=stop)[0]
    assert spec == stopped[0]


def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def test_speculative_rule_preserves_target_distribution():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=gen) * 1.5, -1)
    r = torch.softmax(torch.randn(6, generator=gen) * 1.5, -1)
    n = 20000
    q = torch.multinomial(r, n, replacement=True, generator=gen)
    accepted, fix = speculative_accept(p.expand(n, 6), r.expand(n, 6), q, gen)
    emitted = torch.where(accepted, q, fix)
    assert _tv(torch.bincount(emitted, minlength=6).float(), p) < 0.02
    assert _tv(torch.bincount(q, minlength=6).float(), p) > 0.1  # the drafts alone are off


def test_speculative_sampling_matches_head1_end_to_end():
    """Second generated token (the first drafted one) follows head 1's marginal."""
    vocab, prompt, temp = 6, [3, 1, 4], 1.5
    model = tiny_model(seed=5, vocab=vocab)
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt]))[0, -1, 0] / temp, -1)
        seconds = torch.tensor([[*prompt, x] for x in range(vocab)])
        p2 = torch.softmax(model(seconds)[:, -1, 0] / temp, -1)
        marginal = (p1[:, None] * p2).sum(0)
    counts = torch.zeros(vocab)
    for seed in range(400):
        tokens, _ = speculative_generate(model, prompt, 2, temperature=temp, seed=seed, eos_id=-1)
        counts[tokens[1]] += 1
    assert _tv(counts, marginal) < 0.1  # sampling noise alone gives ~0.05


class _IdsTokenizer:
    """Text is space-separated token ids (what ``compare_decoding`` needs of a tokenizer)."""

    bos_id, eos_id = 3, NO_EOS

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def test_compare_decoding_times_both_on_the_same_tokens(trained_model):
    from weighted_mtp.evaluation.harness import compare_decoding

    prompts = [" ".join(str(3 + (s + i) % 16) for i in range(1, 5)) for s in range(0, 16, 4)]
    figures, texts = compare_decoding(trained_model, _IdsTokenizer(), prompts, [], 30)
    assert figures["prompts"] == figures["same_tokens"] == 4 and figures["tokens"] == 4 * 30
    plain = generate(trained_model, [[3, *_IdsTokenizer().encode(p)] for p in prompts], 30,
                     eos_id=NO_EOS)  # fmt: skip
    assert texts == [" ".join(map(str, row)) for row in plain]
    rate = figures["speculative_tokens_per_s"] / figures["plain_tokens_per_s"]
    assert figures["speedup"] == pytest.approx(rate)
    assert figures["tokens_per_step"] > 1.5 and len(figures["acceptance"]) == 3
    assert all(0 <= a <= 1 for a in figures["acceptance"])
