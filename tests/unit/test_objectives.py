"""The weighted MTP loss: memory-efficient path against the naive one, alignment golden values,
micro-batch splitting invariance, empty heads, the weight_fn (Rho-1) path, frozen parameters."""

from __future__ import annotations

import pytest
import torch

from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights
from weighted_mtp.train.mtp_loss import (
    head_denominators,
    mtp_forward_backward,
    naive_mtp_loss,
    target_weights,
    valid_rows,
)

N_HEADS = 4
VOCAB = 101
COEFS = [0.4, 0.3, 0.2, 0.1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices: thread hand-offs cost more than they save, badly so on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model() -> Transformer:
    args = ModelArgs(
        dim=64,
        n_layers=7,
        n_heads=4,
        vocab_size=VOCAB,
        ffn_hidden_dim=96,
        n_future_tokens=N_HEADS,
        max_seq_len=64,
    )
    model = Transformer(args)
    init_weights(model, seed=0)
    return model


def make_batch(bsz: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random prompts of varied lengths, right padding, one row whose prompt fills it all."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (bsz, length), generator=gen)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    for b in range(bsz):
        prompt = int(torch.randint(1, length - 2, (1,), generator=gen))
        end = int(torch.randint(prompt + 1, length + 1, (1,), generator=gen))
        if b == 1:
            prompt = end = length  # prompt only: no target in this row
        labels[b, prompt:end] = tokens[b, prompt:end]
        tokens[b, end:] = 0  # padding
    weights = torch.rand(bsz, length, N_HEADS, generator=gen) * 2
    return tokens, labels, weights


def grads(model: Transformer) -> dict[str, torch.Tensor]:
    return {
        name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def naive_grads(model, tokens, labels, weights, dens, coefs=COEFS):
    model.zero_grad(set_to_none=True)
    loss = naive_mtp_loss(model, tokens, labels, weights, dens, coefs)
    loss.backward()
    return loss.detach(), grads(model)


def efficient_grads(model, tokens, labels, weights, dens, coefs=COEFS, **kwargs):
    model.zero_grad(set_to_none=True)
    out = mtp_forward_backward(model, tokens, labels, weights, dens, coefs, **kwargs)
    return out, grads(model)


def assert_grads_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode", ["weight_sum", "token_count"])
def test_efficient_matches_naive(mode):
    model = tiny_model()
    tokens, labels, weights = make_batch(6, 24, seed=1)
    dens = head_denominators(labels, weights, N_HEADS, mode)
    n_valid = int((labels != IGNORE_INDEX).sum())
    assert n_valid > 16  # so chunk_rows=7 gives several chunks per head
    want_loss, want = naive_grads(model, tokens, labels, weights, dens)
    out, got = efficient_grads(model, tokens, labels, weights, dens, chunk_rows=7)
    torch.testing.assert_close(out.loss, want_loss, atol=1e-6, rtol=1e-5)
    assert_grads_close(got, want)
    assert any(g.abs().sum() > 0 for g in got.values())
    # The logged per-head statistics agree with a direct computation.
    dense = target_weights(labels, weights, N_HEADS)
    torch.testing.assert_close(out.weight_sum, dense.sum((0, 1)))
    torch.testing.assert_close(
        out.n_tokens, head_denominators(labels, None, N_HEADS, "token_count")
    )
    assert torch.all(out.ce_sum > 0) and torch.all(out.weighted_ce_sum > 0)


def test_two_d_weights_broadcast_to_every_head():
    model = tiny_model()
    tokens, labels, weights = make_batch(4, 20, seed=2)
    w2 = weights[..., 0]
    dens = head_denominators(labels, w2, N_HEADS)
    out2, g2 = efficient_grads(model, tokens, labels, w2, dens, chunk_rows=5)
    w3 = w2.unsqueeze(-1).expand(-1, -1, N_HEADS).contiguous()
    out3, g3 = efficient_grads(model, tokens, labels, w3, dens, chunk_rows=5)
    torch.testing.assert_close(out2.loss, out3.loss)
    assert_grads_close(g2, g3)


def test_golden_alignment_of_worked_example():
    """docs/METHOD.md §2 worked example: L=6, response at j=3,4,5, W=[0,0,0,2,0.5,1]."""
    model = tiny_model()
    tokens = torch.tensor([[1, 10, 11, 12, 13, 14]])
    labels = torch.tensor([[IGNORE_INDEX] * 3 + [12, 13, 14]])
    w = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.5, 1.0]])
    # Head k scores input positions t = j - k for the valid targets j.
    scored = {k: (valid_rows(labels, k)[1] - k).tolist() for k in range(1, 5)}
    assert scored == {1: [2, 3, 4], 2: [1, 2, 3], 3: [0, 1, 2], 4: [0, 1]}
    with torch.no_grad():
        out = mtp_forward_backward(model, tokens, labels, w, None, [0.25] * 4, backward=False)
        want = naive_mtp_loss(model, tokens, labels, w, None, [0.25] * 4)
    assert out.n_tokens.tolist() == [3.0, 3.0, 3.0, 2.0]
    assert out.weight_sum.tolist() == [3.5, 3.5, 3.5, 1.5]
    assert head_denominators(labels, w, 4).tolist() == [3.5, 3.5, 3.5, 1.5]
    assert head_denominators(labels, w, 4, "token_count").tolist() == [3.0, 3.0, 3.0, 2.0]
    torch.testing.assert_close(out.loss, want)


def test_splitting_into_micro_batches_gives_the_same_gradient():
    model = tiny_model()
    tokens, labels, weights = make_batch(8, 24, seed=3)
    parts = [slice(i, i + 2) for i in range(0, 8, 2)]
    counts = [int((labels[p] != IGNORE_INDEX).sum()) for p in parts]
    assert len(set(counts)) > 1  # uneven valid-token counts per micro-batch
    total = sum(head_denominators(labels[p], weights[p], N_HEADS) for p in parts)
    torch.testing.assert_close(total, head_denominators(labels, weights, N_HEADS))
    full, want = efficient_grads(model, tokens, labels, weights, total, chunk_rows=9)
    model.zero_grad(set_to_none=True)
    loss = sum(
        mtp_forward_backward(model, tokens[p], labels[p], weights[p], total, COEFS).loss
        for p in parts
    )
    torch.testing.assert_close(loss, full.loss, atol=1e-6, rtol=1e-5)
    assert_grads_close(grads(model), want)


def test_micro_batch_without_any_target():
    model = tiny_model()
    tokens = torch.randint(3, VOCAB, (3, 12))
    labels = torch.full_like(tokens, IGNORE_INDEX)  # prompts fill every row
    dens = torch.tensor([5.0, 5.0, 4.0, 4.0])  # step totals from other micro-batches
    out, got = efficient_grads(model, tokens, labels, None, dens, chunk_rows=4)
    assert out.loss.item() == 0.0
    assert out.n_tokens.tolist() == [0.0] * 4 and out.weight_sum.tolist() == [0.0] * 4
    assert all(torch.all(g == 0) for g in got.values())
    with torch.no_grad():
        val = mtp_forward_backward(model, tokens, labels, None, None, COEFS, backward=False)
    assert val.loss.item() == 0.0 and torch.isfinite(val.loss)


def test_heads_without_targets_contribute_nothing():
    model = tiny_model()
    tokens, _, weights = make_batch(2, 10, seed=4)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, 1:3] = tokens[:, 1:3]  # targets j=1,2: heads 3 and 4 have none (t = j-k < 0)
    dens = head_denominators(labels, weights, N_HEADS)
    want_loss, want = naive_grads(model, tokens, labels, weights, dens)
    out, got = efficient_grads(model, tokens, labels, weights, dens, chunk_rows=3)
    assert out.n_tokens.tolist() == [4.0, 2.0, 0.0, 0.0]
    torch.testing.assert_close(out.loss, want_loss)
    assert_grads_close(got, want)
    assert torch.all(got["extra_heads.1.feed_forward.w1.weight"] == 0)


def test_first_heads_only():
    """``n_heads=1`` on a 4-head model: the NTP control; the other head blocks stay untouched."""
    model = tiny_model()
    tokens, labels, weights = make_batch(4, 16, seed=9)
    w = weights[..., :1]
    dens = head_denominators(labels, w, 1)
    model.zero_grad(set_to_none=True)
    naive_mtp_loss(model, tokens, labels, w, dens, [1.0], n_heads=1).backward()
    want = grads(model)
    out, got = efficient_grads(model, tokens, labels, w, dens, [1.0], chunk_rows=5, n_heads=1)
    assert out.n_tokens.shape == (1,)
    assert_grads_close(got, want)
    assert model.extra_heads[0].feed_forward.w1.weight.grad is None
    assert torch.all(want["extra_heads.0.feed_forward.w1.weight"] == 0)


def test_validation_mode_builds_no_graph():
    model = tiny_model()
    tokens, labels, weights = make_batch(4, 16, seed=5)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = mtp_forward_backward(model, tokens, labels, weights, None, COEFS, backward=False)
        want = naive_mtp_loss(model, tokens, labels, weights, None, COEFS)
    torch.testing.assert_close(out.loss, want)
    assert out.loss.grad_fn is None
    assert all(p.grad is None for p in model.parameters())


def top_half(head: int, ce: torch.Tensor, b_idx: torch.Tensor, j_idx: torch.Tensor):
    """Rho-1-like selection: the half of the rows with the largest policy CE."""
    return (ce >= ce.median()).float()


@pytest.mark.parametrize("per_head", [False, True])
def test_weight_fn_equals_naive_with_the_returned_weights(per_head):
    model = tiny_model()
    tokens, labels, weights = make_batch(6, 20, seed=6)
    seen = torch.zeros(6, 20, N_HEADS)
    seen_ce = {}

    def fn(head, ce, b_idx, j_idx):
        w = top_half(head, ce, b_idx, j_idx)
        seen[b_idx, j_idx, head] = w
        seen_ce[head] = (ce, b_idx, j_idx)
        return w

    weight_fn = [fn, None, fn, None] if per_head else fn
    out, got = efficient_grads(
        model, tokens, labels, weights, [None] * 4, chunk_rows=6, weight_fn=weight_fn
    )
    dense = seen.clone() if not per_head else target_weights(labels, weights, N_HEADS)
    if per_head:
        dense[..., [0, 2]] = seen[..., [0, 2]]
    assert 0 < dense.sum() < (labels != IGNORE_INDEX).sum() * N_HEADS
    want_loss, want = naive_grads(model, tokens, labels, dense, None)
    torch.testing.assert_close(out.loss, want_loss, atol=1e-6, rtol=1e-5)
    assert_grads_close(got, want)
    torch.testing.assert_close(out.weight_sum, target_weights(labels, dense, N_HEADS).sum((0, 1)))
    # weight_fn saw the policy's real per-token CE of head 1.
    ce, b_idx, j_idx = seen_ce[0]
    with torch.no_grad():
        logits = model(tokens)[b_idx, j_idx - 1, 0]
    torch.testing.assert_close(
        ce, torch.nn.functional.cross_entropy(logits, labels[b_idx, j_idx], reduction="none")
    )


@pytest.mark.parametrize("trainable", ["lora_like", "frozen_trunk", "output_only"])
def test_partly_frozen_models(trainable):
    model = tiny_model()
    for name, p in model.named_parameters():
        if trainable == "lora_like":  # embedding frozen, attention/ffn projections trained
            p.requires_grad_(name.split(".")[-2] in {"wq", "wv", "w2"})
        elif trainable == "frozen_trunk":  # trunk output needs no grad: no trunk backward
            p.requires_grad_(not (name.startswith("tok_") or name.startswith("layers.0.")))
        else:
            p.requires_grad_(name == "output.weight")
    tokens, labels, weights = make_batch(4, 16, seed=7)
    dens = head_denominators(labels, weights, N_HEADS)
    want_loss, want = naive_grads(model, tokens, labels, weights, dens)
    out, got = efficient_grads(model, tokens, labels, weights, dens, chunk_rows=5)
    torch.testing.assert_close(out.loss, want_loss)
    assert_grads_close(got, want)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_bad_inputs_are_rejected():
    model = tiny_model()
    tokens, labels, weights = make_batch(2, 10, seed=8)
    with pytest.raises(ValueError, match="coefficients"):
        mtp_forward_backward(model, tokens, labels, weights, None, [1.0])
    with pytest.raises(ValueError, match="weights must be"):
        head_denominators(labels, weights[:, :5], N_HEADS)
    with pytest.raises(ValueError, match="mode"):
        head_denominators(labels, weights, N_HEADS, "mean")
    with torch.no_grad(), pytest.raises(RuntimeError, match="backward=False"):
        mtp_forward_backward(model, tokens, labels, weights, None, COEFS)
