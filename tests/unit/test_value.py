"""The critic: value heads and their inits, checkpoint reload, the pairwise BT and λ-return
losses on hand examples, the objective's micro-batch invariance, and a tiny critic that learns
a synthetic pairwise task."""

from __future__ import annotations

import math
import time

import pytest
import torch

from weighted_mtp.base.errors import UserError
from weighted_mtp.config import LoraConfig
from weighted_mtp.data.collate import IGNORE_INDEX, Batch, PairBatch
from weighted_mtp.models import save_model
from weighted_mtp.models.checkpoints import CheckpointError
from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights
from weighted_mtp.models.value import (
    ValueHeadConfig,
    ValueModel,
    build_head,
    load_value_model,
)
from weighted_mtp.train.checkpoint import _peft_name
from weighted_mtp.train.recipes import apply_lora
from weighted_mtp.train.value_objectives import (
    CriticObjective,
    LambdaSchedule,
    lambda_return_targets,
    lambda_schedule,
    pairwise_bt_loss,
    token_diagnostics,
    value_regression_loss,
)

VOCAB = 50


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices: thread hand-offs cost more than they save.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def backbone(n_future_tokens: int = 1, seed: int = 0, dim: int = 32) -> Transformer:
    args = ModelArgs(
        dim=dim, n_layers=2, n_heads=4, vocab_size=VOCAB, ffn_hidden_dim=64,
        n_future_tokens=n_future_tokens, max_seq_len=32,
    )  # fmt: skip
    model = Transformer(args)
    init_weights(model, seed=seed)
    return model


def critic(head_type: str = "mlp", bias_init: float = 0.0, dropout: float = 0.0) -> ValueModel:
    return ValueModel(backbone(), ValueHeadConfig(head_type, dropout=dropout, bias_init=bias_init))


# ---- heads ----


def test_mlp_head_sizes_at_production_width():
    with torch.device("meta"):
        head = build_head(ValueHeadConfig("mlp", 2560, dropout=0.2), 2560)
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(640, 2560), (320, 640), (1, 320)]
    assert [m.p for m in head if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2]
    assert sum(isinstance(m, torch.nn.GELU) for m in head) == 2


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
def test_initial_values_equal_bias_init(head_type):
    model = critic(head_type, bias_init=0.5)
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert torch.all(linears[-1].weight == 0)
    assert torch.all(linears[-1].bias == 0.5)
    if head_type == "mlp":
        assert all(m.weight.abs().sum() > 0 for m in linears[:-1])  # default init kept
    tokens = torch.randint(0, VOCAB, (3, 7))
    values = model(tokens)
    assert values.shape == (3, 7) and values.dtype == torch.float32
    assert torch.all(values == 0.5)


def test_sigmoid_head_starts_at_half_and_head_stays_fp32():
    model = critic("sigmoid")
    model.backbone.to(torch.bfloat16)
    values = model(torch.randint(0, VOCAB, (2, 5)))
    assert values.dtype == torch.float32
    assert torch.allclose(values, torch.full((2, 5), 0.5))
    assert model.head_config == {
        "head_type": "sigmoid", "hidden_size": 32, "dropout": 0.0, "bias_init": 0.0,
    }  # fmt: skip


def test_backbone_with_four_heads_is_refused():
    with pytest.raises(UserError, match="n_future_tokens 1"):
        ValueModel(backbone(n_future_tokens=2), ValueHeadConfig("linear"))
    with pytest.raises(UserError, match="n_future_tokens 1.*got 4"):
        ValueModel(Transformer(ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=VOCAB,
                                         ffn_hidden_dim=64, n_future_tokens=4)))  # fmt: skip


def test_unknown_head_type_is_refused():
    with pytest.raises(ValueError, match="value head type"):
        ValueHeadConfig("conv")


# ---- checkpoint reload ----


def test_reload_with_wrong_hidden_size_fails(tmp_path):
    save_model(backbone(), tmp_path / "base")
    config = {"type": "mlp", "hidden_size": 2560, "dropout": 0.2, "bias_init": 0.0}
    with pytest.raises(CheckpointError) as err:
        load_value_model(tmp_path / "base", config, {})
    assert str(err.value) == "critic checkpoint hidden size 2560 does not match the backbone's 32"


@pytest.mark.parametrize("peft_names", [False, True])
def test_reload_with_lora_gives_the_same_values(tmp_path, peft_names):
    save_model(backbone(seed=3), tmp_path / "base")
    model = ValueModel.from_pretrained(tmp_path / "base", ValueHeadConfig("mlp", dropout=0.1))
    peft_config = apply_lora(
        model.backbone,
        LoraConfig(enabled=True, rank=4, alpha=8, dropout=0.0, targets=["wq", "wv", "w2"]),
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in [*model.head.parameters(), *(p for n, p in model.named_parameters()
                                                 if "lora_B" in n)]:  # fmt: skip
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    lora = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert lora and all(k.startswith("backbone.") for k in lora)
    if peft_names:  # the loop's adapter file naming
        lora = {_peft_name(k.removeprefix("backbone.")): v for k, v in lora.items()}
    config = peft_config.to_dict()
    reloaded = load_value_model(
        tmp_path / "base", model.head_config, model.head_state(), lora, config
    )
    tokens = torch.randint(0, VOCAB, (2, 9), generator=gen)
    model.eval()
    assert not any(p.requires_grad for p in reloaded.parameters())
    assert not reloaded.training
    expected = model(tokens)
    assert expected.std() > 0
    torch.testing.assert_close(reloaded(tokens), expected)


# ---- pairwise BT ----


def test_bt_loss_hand_example_ignores_prompt_and_padding():
    labels = torch.tensor([[-100, -100, 1, 1, -100], [-100, 1, 1, 1, -100]])
    mask = labels != IGNORE_INDEX
    v_pos = torch.tensor([[9.0, 9.0, 0.6, 0.8, -9.0], [5.0, 0.7, 0.7, 0.7, 5.0]])
    v_neg = torch.tensor([[9.0, -9.0, 0.1, 0.3, 9.0], [-5.0, 0.2, 0.2, 0.2, 3.0]])
    loss_sum, stats = pairwise_bt_loss(v_pos, v_neg, mask, mask)
    expected = 2 * math.log(1 + math.exp(-0.5))
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)
    assert stats["pairs"].item() == 2 and stats["correct"].item() == 2
    assert stats["margin"].item() == pytest.approx(1.0, rel=1e-5)
    assert stats["value_pos"].item() == pytest.approx(1.4, rel=1e-5)
    assert stats["value_neg"].item() == pytest.approx(0.4, rel=1e-5)


def test_token_diagnostics_hand_example():
    mask = torch.tensor([[True] * 5 + [False], [False] + [True] * 5])
    values = torch.tensor([[0.0, 1.0, 1.0, 1.0, 5.0, 99.0], [-7.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    diag = token_diagnostics(values, mask)
    # Row 0: |dv| = 1, 0, 0, 4 -> 4 / 1.25; row 1: steps of 1 -> 1.
    assert diag["spikiness"].item() == pytest.approx(3.2 + 1.0)
    assert diag["spikiness_n"].item() == 2
    # Row 1 is exactly linear in position; row 0 correlates positively but not perfectly.
    corr0 = torch.corrcoef(torch.stack([values[0, :5], torch.arange(5.0)]))[0, 1].item()
    assert diag["position_corr"].item() == pytest.approx(1.0 + corr0, rel=1e-5)
    constant = token_diagnostics(torch.full((1, 4), 0.5), torch.ones(1, 4, dtype=torch.bool))
    assert constant["spikiness_n"].item() == 0 and constant["position_corr_n"].item() == 0


def pair_batch(n_pairs: int, length: int, seed: int) -> PairBatch:
    gen = torch.Generator().manual_seed(seed)

    def side() -> Batch:
        tokens = torch.randint(0, VOCAB, (n_pairs, length), generator=gen)
        labels = tokens.clone()
        prompt = torch.randint(1, length // 2, (n_pairs, 1), generator=gen)
        end = torch.randint(length // 2 + 1, length + 1, (n_pairs, 1), generator=gen)
        pos = torch.arange(length)
        labels[(pos < prompt) | (pos >= end)] = IGNORE_INDEX
        return Batch(tokens, labels, (pos < end).long())

    return PairBatch(side(), side())


def split(batch: PairBatch, cut: int) -> list[PairBatch]:
    def part(b: Batch, s: slice) -> Batch:
        return Batch(b.tokens[s], b.labels[s], b.attention_mask[s])

    return [PairBatch(part(batch.pos, s), part(batch.neg, s)) for s in (slice(0, cut), slice(cut, None))]  # fmt: skip


def run_objective(objective, model, batch, normaliser, backward=True):
    """One micro-batch through the objective contract: plan, then forward/backward."""
    plan = objective.plan(batch, 0, training=backward)
    return objective.forward_backward(model, plan, normaliser, backward=backward)


@pytest.mark.parametrize("loss", ["pairwise", "lambda_return", "mc"])
def test_objective_micro_batch_split_is_invariant(loss):
    torch.manual_seed(0)
    model = critic("mlp", bias_init=0.3)
    with torch.no_grad():  # a non-trivial last layer so that values differ per token
        model.head[-1].weight.normal_(0, 0.5)
    objective = CriticObjective(loss, lam=LambdaSchedule("linear", 1.0, 0.5, hold=0, decay=4))
    objective.begin_step(2, 10)
    batch = pair_batch(6, 10, seed=1)

    def run(parts: list[PairBatch]) -> tuple[float, list[torch.Tensor], torch.Tensor]:
        model.zero_grad()
        plans = [objective.plan(p, i) for i, p in enumerate(parts)]
        dens = sum(plan.denominators for plan in plans)
        outs = [objective.forward_backward(model, plan, dens) for plan in plans]
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return sum(float(o[0]) for o in outs), grads, sum(o[1] for o in outs)

    full_loss, full_grads, full_stats = run([batch])
    part_loss, part_grads, part_stats = run(split(batch, 2))
    # Every parameter but the unused LM head (the critic reads the normed hidden states).
    used = [n for n, _ in model.named_parameters() if n != "backbone.output.weight"]
    assert full_loss > 0 and len(full_grads) == len(used)
    assert part_loss == pytest.approx(full_loss, rel=1e-5)
    for a, b in zip(full_grads, part_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(part_stats, full_stats, rtol=1e-5, atol=1e-5)
    metrics = objective.summarize(full_stats)
    assert metrics["loss"] == pytest.approx(full_loss, rel=1e-5)
    assert {"pair_accuracy", "margin", "value_pos", "value_neg", "spikiness", "position_corr"} <= set(metrics)  # fmt: skip
    if loss == "lambda_return":
        assert objective.step_metrics(objective.end_step()) == {"lambda": pytest.approx(0.75)}


def test_regression_objective_hand_values_and_validation_lambda():
    model = critic("linear", bias_init=0.5)
    batch = pair_batch(3, 8, seed=2)
    # Every value is 0.5; targets 1 (correct) and 0 (incorrect) -> squared error 0.25.
    loss, _ = run_objective(CriticObjective("mc"), model, batch, None, backward=False)
    assert loss.item() == pytest.approx(0.25)
    # Validation uses λ = 1 whatever the schedule, so λ-return MSE equals MC MSE.
    objective = CriticObjective("lambda_return", regression="mse", lam=LambdaSchedule(start=0.0))
    val_loss, _ = run_objective(objective, model, batch, None, backward=False)
    assert val_loss.item() == pytest.approx(0.25)
    train_loss, _ = run_objective(objective, model, batch, None)  # λ = 0: targets v_next
    assert train_loss.item() < 0.25


def test_pairwise_needs_pairs():
    batch = pair_batch(2, 6, seed=0).pos
    with pytest.raises(TypeError, match="PairBatch"):
        run_objective(CriticObjective(), critic(), batch, None)


# ---- λ-return ----


def loop_targets(values, mask, rewards, lam, gamma):
    """The λ-return of docs/METHOD.md §3 literally: recursion over the masked positions only."""
    out = torch.zeros_like(values)
    for b in range(values.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()
        if not idx:
            continue
        out[b, idx[-1]] = rewards[b]
        for i in range(len(idx) - 2, -1, -1):
            t, nxt = idx[i], idx[i + 1]
            out[b, t] = (1 - lam) * gamma * values[b, nxt] + lam * gamma * out[b, nxt]
    return out


def test_lambda_return_hand_examples():
    values = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.3, 0.4, 0.0]])
    mask = torch.tensor([[False, False, True, True, True, True, False]])
    rewards = torch.tensor([1.0])
    g1 = lambda_return_targets(values, mask, rewards, lam=1.0)
    assert g1.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]
    g0 = lambda_return_targets(values, mask, rewards, lam=0.0)
    torch.testing.assert_close(g0, torch.tensor([[0.0, 0.0, 0.2, 0.3, 0.4, 1.0, 0.0]]))
    g_disc = lambda_return_targets(values, mask, rewards, lam=1.0, gamma=0.5)
    torch.testing.assert_close(g_disc[0, 2:6], torch.tensor([0.125, 0.25, 0.5, 1.0]))


@pytest.mark.parametrize("lam,gamma", [(0.7, 0.9), (0.95, 1.0), (0.3, 0.99)])
def test_lambda_return_matches_plain_loop(lam, gamma):
    gen = torch.Generator().manual_seed(4)
    values = torch.rand(5, 37, generator=gen)
    mask = torch.rand(5, 37, generator=gen) > 0.3  # gaps inside the response too
    mask[3] = False  # a row without any response token
    mask[4] = False
    mask[4, 36] = True  # a single token: its own terminal
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    got = lambda_return_targets(values, mask, rewards, lam, gamma)
    torch.testing.assert_close(got, loop_targets(values, mask, rewards, lam, gamma))
    assert not got.requires_grad


def test_regression_loss_per_sequence_mean():
    values = torch.tensor([[0.0, 1.0, 3.0], [5.0, 5.0, 5.0]])
    targets = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True], [False, False, False]])
    loss_sum, n = value_regression_loss(values, targets, mask, "mse")
    assert loss_sum.item() == pytest.approx(5.0) and n.item() == 1
    huber, _ = value_regression_loss(values, targets, mask, "huber", delta=0.5)
    # smooth-L1 (beta 0.5): |1| - 0.25, |3| - 0.25 -> mean 1.75
    assert huber.item() == pytest.approx(1.75)


def test_lambda_schedules():
    assert lambda_schedule(10_000) == 1.0
    kw = {"start": 1.0, "end": 0.9, "hold": 10, "decay": 20}
    assert [lambda_schedule(s, "linear", **kw) for s in (0, 10, 20, 30, 100)] == pytest.approx(
        [1.0, 1.0, 0.95, 0.9, 0.9]
    )
    assert lambda_schedule(20, "cosine", **kw) == pytest.approx(0.95)
    assert lambda_schedule(15, "cosine", **kw) == pytest.approx(
        0.9 + 0.1 * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert lambda_schedule(40, "cosine", **kw) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="lambda schedule"):
        lambda_schedule(0, "step")


# ---- a tiny critic learns ----


def synthetic_pairs(n: int, gen: torch.Generator, length: int = 12, prompt: int = 4) -> PairBatch:
    """Both sides share prompt and response except one response token: 7 (correct) vs 8."""
    tokens = torch.randint(10, VOCAB, (n, length), generator=gen)
    where = torch.randint(prompt, length, (n,), generator=gen)
    pos, neg = tokens.clone(), tokens.clone()
    pos[torch.arange(n), where] = 7
    neg[torch.arange(n), where] = 8
    labels = lambda t: torch.where(torch.arange(length) < prompt, IGNORE_INDEX, t)  # noqa: E731
    mask = torch.ones(n, length, dtype=torch.long)
    return PairBatch(Batch(pos, labels(pos), mask), Batch(neg, labels(neg), mask))


def test_tiny_critic_learns_pairwise_task():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = critic("mlp", dropout=0.0).train()
    objective = CriticObjective("pairwise")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    started = time.perf_counter()
    for step in range(150):
        objective.begin_step(step, 150)
        batch = synthetic_pairs(16, gen)
        run_objective(objective, model, batch, objective.plan(batch, 0).denominators)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.end_step()
    held_out = synthetic_pairs(256, torch.Generator().manual_seed(123))
    model.eval()
    _, stats = run_objective(objective, model, held_out, None, backward=False)
    metrics = objective.summarize(stats)
    print(f"held-out pair accuracy {metrics['pair_accuracy']:.3f} "
          f"margin {metrics['margin']:.3f} in {time.perf_counter() - started:.1f} s")  # fmt: skip
    assert metrics["pair_accuracy"] >= 0.95
    # Its TD weights should single out the token that decides correctness.
    from weighted_mtp.config import VerifiableConfig
    from weighted_mtp.train.weighting import Micro, Verifiable

    td = Verifiable(VerifiableConfig(clip_max=100.0), helper_model=model)
    correct = held_out.pos
    weights = td.weigh(correct, 1, Micro(training=False)).dense.reshape(correct.tokens.shape)
    decisive = correct.tokens == 7
    hits = (weights.argmax(dim=1) == decisive.float().argmax(dim=1)).float().mean().item()
    print(f"largest TD weight on the decisive token in {hits:.1%} of held-out samples")
    assert hits >= 0.75  # most samples (deterministic here: 82%)
