"""The model: golden sizes, head layout, KV-cache decoding."""

from __future__ import annotations

import pytest
import torch

from weighted_mtp.models.transformer import (
    ModelArgs,
    Transformer,
    count_parameters,
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
