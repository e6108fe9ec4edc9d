"""The model: golden sizes, head layout, KV-cache decoding."""

from __future__ import annotations

import pytest
import torch

import weighted_mtp.models.transformer as transformer_module
from weighted_mtp.models.transformer import (
    DECODE_GEMM_MAX_ROWS,
    SCREEN_MAX_CANDIDATES,
    ArgmaxScreen,
    ModelArgs,
    Transformer,
    count_parameters,
    decode_linear,
    ffn_hidden_size,
    init_weights,
)


def tiny(n_future: int = 4, n_kv_heads: int | None = None) -> Transformer:
    args = ModelArgs(
        dim=64,
        n_layers=3 + n_future,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        vocab_size=97,
        ffn_hidden_dim=80,
        n_future_tokens=n_future,
        max_seq_len=64,
    )
    model = Transformer(args)
    init_weights(model, seed=0)
    return model.eval()


def test_ffn_golden_sizes():
    assert ffn_hidden_size(4096, 256) == 11008
    assert ffn_hidden_size(512, 256) == 1536
    assert ffn_hidden_size(512, 1) == 1365


def test_7b_parameter_count_and_layout():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, n_future_tokens=4)
    with torch.device("meta"):
        model = Transformer(args)
    assert count_parameters(model) == 6_738_415_616
    assert len(model.layers) == 29 and len(model.extra_heads) == 3
    names = set(model.state_dict())
    assert "layers.28.attention.wq.weight" in names and "extra_heads.2.ffn_norm.weight" in names
    assert len(names) == 291


def test_invalid_args_fail_with_reason():
    with pytest.raises(ValueError, match="n_layers 3 < n_future_tokens 4"):
        ModelArgs(dim=64, n_layers=3, n_heads=4, n_future_tokens=4)
    with pytest.raises(ValueError, match="not divisible by n_kv_heads"):
        ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=3)


def test_heads_are_parallel_blocks_on_the_trunk():
    model = tiny()
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        logits = model(tokens)
        trunk = model.trunk(tokens)
        for k in range(4):
            expected = model.unembed(model.head_blocks[k](trunk, model.rope[:11]))
            assert torch.allclose(logits[:, :, k], expected, atol=1e-6)
    assert logits.shape == (2, 11, 4, 97)
    assert model.head_blocks[0] is model.layers[-1]


def test_causal_no_future_leak():
    model = tiny()
    tokens = torch.randint(0, 97, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_kv_cache_matches_full_forward(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(max_batch=2, max_len=32, n_heads=4)
        prefill = model.forward_cached(tokens[:, :9], start_pos=0, n_heads=4)
        steps = [
            model.forward_cached(tokens[:, t : t + 1], start_pos=t, n_heads=4) for t in range(9, 15)
        ]
        model.clear_caches()
    cached = torch.cat([prefill, *steps], dim=1)
    assert torch.allclose(cached, full, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 7, 64, DECODE_GEMM_MAX_ROWS, DECODE_GEMM_MAX_ROWS + 1])
@pytest.mark.parametrize("pad_one_row", [False, True])
def test_decode_linear_is_linear(rows, pad_one_row):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(300, 48, generator=gen)
    x = torch.randn(rows, 1, 48, generator=gen)
    got = decode_linear(x, weight, pad_one_row=pad_one_row)
    assert got.shape == (rows, 1, 300)
    assert torch.allclose(got, torch.nn.functional.linear(x, weight), atol=1e-5, rtol=1e-5)


def test_cache_of_a_partly_filled_prefix_matches_full_forward():
    """A cache longer than what is written (the unfilled tail never read); prefill, one-token
    steps of a single row (the padded output projection) and a block of several tokens after
    a prefix (the masked path of self-speculative steps) all give the full forward's logits."""
    model = tiny()
    tokens = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(max_batch=3, max_len=64, n_heads=4)
        parts = [model.forward_cached(tokens[:, :1], start_pos=0, n_heads=4)]
        parts += [model.forward_cached(tokens[:, t : t + 1], start_pos=t, n_heads=4)
                  for t in range(1, 12)]  # fmt: skip
        parts.append(model.forward_cached(tokens[:, 12:16], start_pos=12, n_heads=4))
        parts.append(model.forward_cached(tokens[:, 16:], start_pos=16, n_heads=4))
        last = model.forward_cached(tokens[:, :20], start_pos=0, n_heads=2, last_only=True)
        model.clear_caches()
    cached = torch.cat(parts, dim=1)
    assert torch.allclose(cached, full, atol=1e-5)
    assert last.shape == (1, 1, 2, 97)
    assert torch.allclose(last, full[:, -1:, :2], atol=1e-5)


def test_training_forward_does_not_take_the_decoding_path(monkeypatch):
    """Training math is untouched by the inference kernels: forward and backward never call
    ``decode_linear`` (even with caches allocated), and give the same numbers either way."""
    model = tiny().train()
    tokens = torch.randint(0, 97, (2, 9))
    before = model(tokens)

    def refuse(*args, **kwargs):
        raise AssertionError("decode_linear on the training path")

    monkeypatch.setattr(transformer_module, "decode_linear", refuse)
    model.setup_caches(max_batch=2, max_len=16, n_heads=4)
    after = model(tokens)
    after.float().logsumexp(-1).mean().backward()
    model.clear_caches()
    assert torch.equal(before, after)


def test_argmax_screen_bound_holds_and_gives_the_fp32_argmax():
    """The bf16 screen's error stays within its bound on this machine's kernels, and the
    screened argmax is the fp32 logits' argmax, near-ties included."""
    gen = torch.Generator().manual_seed(0)
    vocab, dim = 8192, 512
    weight = torch.empty(vocab, dim).uniform_(-0.03, 0.03, generator=gen)
    # Near-ties far below bf16 resolution (2^-8): token 7 is token 3 scaled by 1 + 2^-16,
    # token 11 token 3 shifted by 1e-4.
    weight[7] = weight[3] * (1 + 2.0**-16)
    weight[11] = weight[3] + 1e-4
    z = torch.randn(48, dim, generator=gen)
    z[:8] = weight[3] * 40  # rows whose winner is among the near-tied tokens
    screen = ArgmaxScreen(weight, 48)
    scores = screen.scores(z).float()
    logits = torch.nn.functional.linear(z.double(), weight.double())
    assert ((scores - logits).abs().amax(-1) <= screen.coeff * z.norm(dim=-1)).all()
    assert torch.equal(screen.argmax(z), torch.nn.functional.linear(z, weight).argmax(-1))


def test_argmax_screen_ties_and_fallbacks():
    gen = torch.Generator().manual_seed(0)
    weight = torch.ones(300, 16)  # every logit equal: every token a candidate, first one wins
    z = torch.randn(3, 16, generator=gen)
    assert torch.equal(ArgmaxScreen(weight, 3).argmax(z), torch.zeros(3, dtype=torch.long))
    assert SCREEN_MAX_CANDIDATES < 300  # so the full product was taken
    weight = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=-1)
    weight[5] = weight[9]  # an exact tie between 5 and 9 in a row where both win
    z = torch.stack(
        [weight[9] * 10, torch.full((16,), float("nan")), torch.randn(16, generator=gen)]
    )
    got = ArgmaxScreen(weight, 3).argmax(z)
    assert got[0] == 5 and 0 <= got[1] < 300
    assert got[2] == torch.nn.functional.linear(z[2], weight).argmax()


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_cached_is_the_argmax_of_forward_cached(batch):
    model = tiny()
    tokens = torch.randint(0, 97, (batch, 12))
    with torch.no_grad():
        model.setup_caches(max_batch=batch, max_len=16, n_heads=1)
        logits = model.forward_cached(tokens[:, :9], 0, last_only=True)[:, -1, 0]
        steps = [model.forward_cached(tokens[:, t : t + 1], t)[:, -1, 0] for t in range(9, 12)]
        model.setup_caches(max_batch=batch, max_len=16, n_heads=1)
        greedy = [model.greedy_cached(tokens[:, :9], 0)]
        greedy += [model.greedy_cached(tokens[:, t : t + 1], t) for t in range(9, 12)]
        screened = model._screen is not None
        model.clear_caches()
    assert model._screen is None
    assert screened == transformer_module.bf16_matmul_is_native()
    for got, expected in zip(greedy, [logits, *steps], strict=True):
        assert torch.equal(got, expected.argmax(-1))


def test_cache_for_head1_only_skips_extra_heads():
    model = tiny()
    model.setup_caches(max_batch=1, max_len=16, n_heads=1)
    assert all(block.attention.cache is None for block in model.extra_heads)
    assert model.layers[-1].attention.cache is not None
    with pytest.raises(RuntimeError, match="no KV cache"):
        model.forward_cached(torch.zeros(1, 2, dtype=torch.long), start_pos=0, n_heads=2)


def test_hidden_states_and_backward():
    model = tiny(n_future=1).train()
    tokens = torch.randint(0, 97, (2, 9))
    hidden = model.hidden_states(tokens)
    assert hidden.shape == (2, 9, 64)
    model(tokens).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rope_table_bound():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds the RoPE table"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_a_bf16_model_keeps_its_rope_table_in_fp32():
    """Casting the model rounds its weights, never the rotation angles (a bf16 table would keep
    8 significant bits of cos/sin)."""
    model = tiny()
    table = model.rope.clone()
    model = model.to(torch.bfloat16)
    assert model.output.weight.dtype == torch.bfloat16
    assert model.rope.dtype == torch.float32 and torch.equal(model.rope, table)
    assert not torch.equal(table.to(torch.bfloat16).float(), table)  # what a cast would lose
    assert model(torch.randint(0, model.args.vocab_size, (1, 6))).dtype == torch.bfloat16
