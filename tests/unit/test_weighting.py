"""The Verifiable Critic's TD weights (weighting ``verifiable``, docs/METHOD.md §4): GAE golden
values and a property test against the plain reverse loop, weights, EMA rules, Verifiable's
step protocol (step-1 whitening, one EMA update per step, frozen validation, exact resume,
metrics) and the control arms."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weighted_mtp.config import VerifiableConfig
from weighted_mtp.data.collate import IGNORE_INDEX, Batch
from weighted_mtp.train.mtp_loss import head_denominators
from weighted_mtp.train.weighting import (
    AdvantageEMA,
    Micro,
    Uniform,
    Verifiable,
    apply_control,
    control_generator,
    critic_values_for,
    gae_advantages,
    masked_batch_stats,
    td_weights,
)

V = torch.tensor([[0.2, 0.4, 0.5, 0.3, 0.9, 0.0]])
CLIP = {"beta": 1.0, "clip_min": 0.1, "clip_max": 3.0}
M = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.bool)
N_HEADS = 4


# ---- GAE ----


@pytest.mark.parametrize(
    ("lam", "expected"),
    [
        (0.95, [0, 0, 0.4515, 0.37, 0.6, 0]),
        (0.0, [0, 0, 0.1, -0.2, 0.6, 0]),
        (
            1.0,
            [0, 0, 0.5, 0.4, 0.6, 0],
        ),  # v_T - v_{t-1}: no lambda = 1 shortcut (docs/METHOD.md §4)
    ],
)
def test_gae_golden(lam, expected):
    adv = gae_advantages(V, M, gamma=1.0, lam=lam)
    torch.testing.assert_close(adv, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_gae_unmasked_prompt_values_match_the_documented_recursion():
    # The documented unmasked values at t = 0, 1 (0.297479, 0.628925) are the recursion's
    # values before "A * m"; unmasking t = 0, 1 keeps T = 4, so they become visible.
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    adv = gae_advantages(V, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(
        adv, torch.tensor([[0.297479, 0.628925, 0.4515, 0.37, 0.6, 0]]), atol=1e-6, rtol=0
    )


def reference_gae(values, mask, gamma, lam, initial_value=0.5):
    """The upstream reverse loop (docs/METHOD.md §4), in float64 Python."""
    out = []
    for v, m in zip(values, mask, strict=True):
        length = len(v)
        valid = [t for t in range(length) if m[t]]
        last = max(valid) if valid else 0
        adv, running = [0.0] * length, 0.0
        for t in range(last, -1, -1):
            prev = v[t - 1] if t > 0 else initial_value
            running = gamma * v[t] - prev + gamma * lam * running
            adv[t] = running
        out.append([a * float(mt) for a, mt in zip(adv, m, strict=True)])
    return out


@st.composite
def gae_cases(draw):
    rows, length = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    values = [
        draw(st.lists(st.floats(-2, 2, width=32), min_size=length, max_size=length))
        for _ in range(rows)
    ]
    masks = []
    for _ in range(rows):
        kind = draw(st.sampled_from(["random", "right_pad", "left_pad", "empty"]))
        if kind == "random":
            masks.append(draw(st.lists(st.booleans(), min_size=length, max_size=length)))
        elif kind == "empty":
            masks.append([False] * length)
        else:
            start, stop = sorted(draw(st.lists(st.integers(0, length), min_size=2, max_size=2)))
            if kind == "left_pad":
                stop = length  # response runs to the end, padding on the left
            masks.append([start <= t < stop for t in range(length)])
    return values, masks, draw(st.floats(0, 1)), draw(st.floats(0, 1))


@settings(max_examples=150, deadline=None)
@given(gae_cases())
def test_gae_vectorised_equals_reverse_loop(case):
    values, masks, gamma, lam = case
    got = gae_advantages(torch.tensor(values), torch.tensor(masks), gamma, lam)
    expected = torch.tensor(reference_gae(values, masks, gamma, lam), dtype=torch.float32)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_gae_long_rows_stay_finite():
    # L = 2048 with lambda 0.95: far Toeplitz powers underflow to 0, never NaN/inf.
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(2, 2048, generator=gen)
    mask = torch.zeros(2, 2048, dtype=torch.bool)
    mask[0, 100:2000] = True
    adv = gae_advantages(values, mask, 1.0, 0.95)
    assert torch.isfinite(adv).all()
    assert (adv[1] == 0).all() and (adv[0, 2000:] == 0).all() and (adv[0, :100] == 0).all()


# ---- weights and EMA ----


def test_weights_golden():
    adv = gae_advantages(V, M, 1.0, 0.95)
    torch.testing.assert_close(
        td_weights(adv, M, (0.1, 0.2), **CLIP),
        torch.tensor([[0.0, 0, 3, 3, 3, 0]]),
        atol=1e-6,
        rtol=0,
    )
    # A_hat = 0.015, -0.8, 1.5 -> exp = 1.0151, 0.4493, 4.4817 (clipped to 3.0)
    torch.testing.assert_close(
        td_weights(adv, M, (0.45, 0.1), **CLIP),
        torch.tensor([[0, 0, 1.0151, 0.4493, 3.0, 0]]),
        atol=1e-4,
        rtol=0,
    )


def test_weights_without_stats_are_the_mask():
    assert masked_batch_stats(torch.tensor([[0.3, 0.7]]), torch.tensor([[False, True]])) is None
    torch.testing.assert_close(td_weights(V, M, None, **CLIP), M.float())


def two_point(mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages with population mean ``mean`` and population std ``std``."""
    return torch.tensor([[mean - std, mean + std]]), torch.ones(1, 2, dtype=torch.bool)


def test_ema_upstream_rule_golden():
    ema = AdvantageEMA(0.1, "upstream", 10)
    assert ema.stats() is None
    ema.accumulate(*two_point(0.3, 0.5))
    ema.update()
    assert ema.stats() == pytest.approx((0.3, 0.5))
    ema.accumulate(*two_point(0.1, 0.3))
    ema.update()
    assert ema.stats() == pytest.approx((0.12, 0.32))


def test_ema_bias_corrected_by_hand():
    # Batch 1: mean 0.3, E[A^2] = 0.5^2 + 0.3^2 = 0.34; batch 2: mean 0.1, E[A^2] = 0.1.
    # Step 1: m1 = 0.1*0.3 = 0.03, m2 = 0.034; correction 1 - 0.9 = 0.1
    #   -> mean 0.3, sigma sqrt(0.34 - 0.09) = 0.5 (the batch's own statistics).
    # Step 2: m1 = 0.9*0.03 + 0.1*0.1 = 0.037, m2 = 0.9*0.034 + 0.1*0.1 = 0.0406;
    #   correction 1 - 0.81 = 0.19 -> mean 0.037/0.19 = 0.1947368,
    #   E[A^2] 0.0406/0.19 = 0.2136842, sigma sqrt(0.2136842 - 0.1947368^2) = 0.4192400.
    ema = AdvantageEMA(0.1, "bias_corrected", 10)
    ema.accumulate(*two_point(0.3, 0.5))
    ema.update()
    assert ema.stats() == pytest.approx((0.3, 0.5))
    ema.accumulate(*two_point(0.1, 0.3))
    ema.update()
    assert ema.stats() == pytest.approx((0.1947368, 0.4192400), abs=1e-6)


def test_ema_skips_steps_without_tokens():
    ema = AdvantageEMA(0.1, "bias_corrected", 10)
    ema.update()  # nothing accumulated
    ema.accumulate(torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool))
    ema.update()
    assert ema.steps == 0 and ema.stats() is None


def test_expected_weight_moments_of_a_standard_normal():
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.exp(z).clamp(0.1, 3.0)
    assert float(w.mean()) == pytest.approx(1.297, abs=0.01)
    assert float(w.std()) == pytest.approx(0.948, abs=0.01)


# ---- Verifiable ----


def test_the_old_class_names_are_the_verifiable_weighting():
    from weighted_mtp.config import CriticTDConfig
    from weighted_mtp.train.weighting import CriticTD

    assert CriticTD is Verifiable and CriticTDConfig is VerifiableConfig
    assert Verifiable.name == "verifiable" and Verifiable.Settings is VerifiableConfig


def make_batch(seed: int, rows: int = 3, length: int = 10) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (rows, length), generator=gen)
    labels = tokens.clone()
    for r in range(rows):
        prompt = 2 + r
        pad = r  # right padding of various sizes
        labels[r, :prompt] = IGNORE_INDEX
        if pad:
            labels[r, -pad:] = IGNORE_INDEX
    attention = torch.ones_like(tokens)
    values = torch.rand(rows, length, generator=gen)
    return Batch(tokens, labels, attention, {"values": values})


def concat(a: Batch, b: Batch) -> Batch:
    return Batch(
        torch.cat([a.tokens, b.tokens]),
        torch.cat([a.labels, b.labels]),
        torch.cat([a.attention_mask, b.attention_mask]),
        {"values": torch.cat([a.extras["values"], b.extras["values"]])},
    )


def run_step(weighting: Verifiable, micro: list[Batch], step: int = 0) -> list[torch.Tensor]:
    """The loop's call order: one ``weigh`` per micro-batch, then ``end_step``."""
    weights = [weighting.weigh(b, N_HEADS, Micro(step, i)).dense for i, b in enumerate(micro)]
    weighting.end_step()
    return weights


def adv_of(batch: Batch, config: VerifiableConfig) -> tuple[torch.Tensor, torch.Tensor]:
    mask = batch.labels != IGNORE_INDEX
    return gae_advantages(batch.extras["values"], mask, config.gamma, config.td_lambda), mask


def test_step_one_whitens_each_micro_batch_by_its_own_stats():
    config = VerifiableConfig()
    td = Verifiable(config)
    a, b = make_batch(1), make_batch(2)
    wa, wb = run_step(td, [a, b])
    for batch, w in ((a, wa), (b, wb)):
        adv, mask = adv_of(batch, config)
        stats = masked_batch_stats(adv, mask)
        assert stats is not None and stats != (0.0, 1.0)
        torch.testing.assert_close(w, td_weights(adv, mask, stats, **CLIP))


def test_ema_updates_once_per_step_from_all_micro_batches():
    config = VerifiableConfig()
    split, whole = Verifiable(config), Verifiable(config)
    a, b = make_batch(1), make_batch(2)
    run_step(split, [a, b])
    run_step(whole, [concat(a, b)])
    assert split.ema.steps == whole.ema.steps == 1
    assert split.ema.stats() == pytest.approx(whole.ema.stats(), abs=1e-9)
    # Step 2: both micro-batches use the statistics from before step 2's update.
    stats = split.ema.stats()
    c, d = make_batch(3), make_batch(4)
    _, wd = run_step(split, [c, d], step=1)
    adv, mask = adv_of(d, config)
    torch.testing.assert_close(wd, td_weights(adv, mask, stats, **CLIP))
    assert split.ema.steps == 2 and split.ema.stats() != stats


def test_validation_is_frozen():
    td = Verifiable()
    run_step(td, [make_batch(1)])
    td.take_sums()  # the training step's statistics
    before = td.ema.state_dict()
    val = make_batch(9)
    w_val = td.weigh(val, N_HEADS, Micro(1, 0, training=False)).dense  # the loop's validation
    td.weigh(make_batch(8), N_HEADS, Micro(1, 1, training=False))
    assert not td.take_sums().any()  # no statistics recorded either
    td.end_step()  # nothing accumulated: N = 0, the update is skipped
    assert td.ema.state_dict() == before
    adv, mask = adv_of(val, VerifiableConfig())
    expected = td_weights(adv, mask, td.ema.stats(), **CLIP)
    torch.testing.assert_close(w_val, expected)  # frozen training statistics, not val's own


def test_state_dict_round_trip_reproduces_the_next_step_exactly():
    config = VerifiableConfig()
    first = Verifiable(config, control="shuffled", seed=7)
    for step in range(3):
        run_step(first, [make_batch(step), make_batch(step + 10)], step)
    resumed = Verifiable(config, control="shuffled", seed=7)
    resumed.load_state_dict(first.state_dict())
    nxt = [make_batch(20), make_batch(21)]
    for w1, w2 in zip(run_step(first, nxt, 3), run_step(resumed, nxt, 3), strict=True):
        assert torch.equal(w1, w2)
    assert first.ema.state_dict() == resumed.ema.state_dict()


def test_metrics_present_sane_and_reset():
    td = Verifiable()
    run_step(td, [make_batch(1), make_batch(2)])
    td.take_sums()  # the loop reads the sums every step
    run_step(td, [make_batch(3, rows=6, length=30)], step=1)
    metrics = td.metrics(dict(zip(td.stat_names, td.take_sums().tolist(), strict=True)))
    keys = {"weight_mean", "weight_std", "clip_low_frac", "clip_high_frac"}
    keys |= {"weight_entropy_norm", "ema_mean", "ema_std", "adv_mean", "adv_std"}
    assert {f"verifiable/{k}" for k in keys} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert (
        0 <= metrics["verifiable/clip_low_frac"] <= 1
        and 0 <= metrics["verifiable/clip_high_frac"] <= 1
    )
    assert 0 < metrics["verifiable/weight_entropy_norm"] <= 1 + 1e-9
    assert 0.1 <= metrics["verifiable/weight_mean"] <= 3.0 and metrics["verifiable/weight_std"] > 0
    assert not td.take_sums().any()  # reset after reading


def test_denominators_weight_sum_and_token_count():
    batch = make_batch(5)
    planned = Verifiable().weigh(batch, N_HEADS, Micro())
    torch.testing.assert_close(
        planned.denominators, head_denominators(batch.labels, planned.dense, N_HEADS)
    )
    counts = Verifiable(normalization="token_count").weigh(batch, N_HEADS, Micro()).denominators
    torch.testing.assert_close(
        counts, head_denominators(batch.labels, None, N_HEADS, "token_count")
    )
    uniform = Uniform().weigh(batch, N_HEADS, Micro())
    assert uniform.dense is None and uniform.weight_fn is None
    torch.testing.assert_close(uniform.denominators, head_denominators(batch.labels, None, N_HEADS))


def test_critic_is_called_without_precomputed_values():
    batch = make_batch(6)
    values = batch.extras.pop("values")
    calls = []

    def critic(tokens):
        calls.append(tokens)
        return values

    td = Verifiable(helper_model=critic)
    w = td.weigh(batch, N_HEADS, Micro(training=False)).dense
    assert len(calls) == 1 and torch.equal(calls[0], batch.tokens)
    batch.extras["values"] = values
    assert torch.equal(w, td.weigh(batch, N_HEADS, Micro(training=False)).dense)


def test_critic_values_for_returns_one_tensor_per_example():
    lengths = [4, 7, 5]
    examples = [SimpleNamespace(length=n) for n in lengths]

    def collate(indices):
        length = max(lengths[i] for i in indices)
        tokens = torch.zeros(len(indices), length, dtype=torch.long)
        for row, i in enumerate(indices):
            tokens[row, : lengths[i]] = torch.arange(1, lengths[i] + 1)
        return Batch(tokens, tokens.clone(), (tokens > 0).long())

    stream = SimpleNamespace(data=SimpleNamespace(examples=examples), collate=collate)
    out = critic_values_for(stream, lambda t: t.float() / 10, torch.device("cpu"), batch_size=2)
    assert [len(v) for v in out] == lengths
    torch.testing.assert_close(out[1], torch.arange(1, 8).float() / 10)


# ---- control arms ----


def critic_like_weights(rows: int = 64, length: int = 128, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, length, generator=gen) < 0.7
    weights = torch.exp(torch.randn(rows, length, generator=gen)).clamp(0.1, 3.0) * mask
    return weights, mask


def test_shuffled_keeps_each_rows_multiset_and_is_deterministic():
    w, mask = critic_like_weights()
    out = apply_control(w, mask, "shuffled", control_generator(1, 5, 0))
    assert ((out != 0) <= mask).all()
    for r in range(w.shape[0]):
        torch.testing.assert_close(out[r][mask[r]].sort().values, w[r][mask[r]].sort().values)
    assert not torch.equal(out, w)
    assert torch.equal(out, apply_control(w, mask, "shuffled", control_generator(1, 5, 0)))
    assert not torch.equal(out, apply_control(w, mask, "shuffled", control_generator(2, 5, 0)))


def test_random_matched_keeps_the_distribution_and_breaks_the_link():
    w, mask = critic_like_weights()
    out = apply_control(w, mask, "random_matched", control_generator(1, 5, 0))
    valid, drawn = w[mask], out[mask]
    assert ((out != 0) <= mask).all()
    assert torch.isin(drawn, valid).all()  # drawn from the batch's own weights
    assert float(drawn.mean()) == pytest.approx(float(valid.mean()), rel=0.05)
    assert float(drawn.std()) == pytest.approx(float(valid.std()), rel=0.05)
    assert abs(float(torch.corrcoef(torch.stack([valid, drawn]))[0, 1])) < 0.1
    again = apply_control(w, mask, "random_matched", control_generator(1, 5, 0))
    assert torch.equal(out, again)


def test_verifiable_control_arm_applies_to_the_weights():
    config = VerifiableConfig()
    plain, shuffled = Verifiable(config), Verifiable(config, control="shuffled")
    batch = make_batch(3, rows=4, length=40)
    w_plain = run_step(plain, [batch])[0]
    w_shuf = run_step(shuffled, [batch])[0]
    mask = batch.labels != IGNORE_INDEX
    assert not torch.equal(w_plain, w_shuf)
    for r in range(4):
        torch.testing.assert_close(
            w_shuf[r][mask[r]].sort().values, w_plain[r][mask[r]].sort().values
        )
    assert plain.ema.stats() == shuffled.ema.stats()  # the EMA sees the true advantages
    with pytest.raises(ValueError):
        Verifiable(config, control="bogus")


# ---- distributed: every rank joins the all-reduce (docs/METHOD.md §4) ----


def _ema_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ema = AdvantageEMA(0.1, "bias_corrected", 10)
        if rank == 0:  # rank 1 has no valid token this step and must still join the collective
            ema.accumulate(*two_point(0.3, 0.5))
        ema.update()
        torch.save(ema.stats(), f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_ema_all_reduce_with_an_empty_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(
        _ema_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "stats")), nprocs=2, join=True
    )
    for rank in range(2):
        assert torch.load(tmp_path / f"stats.{rank}") == pytest.approx((0.3, 0.5))


# ---- a precomputing weighting frees its frozen helper ----


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def big_reference() -> torch.nn.Module:
    """A frozen reference LM of ~135 MB, almost all of it in two large tensors (embedding
    and output), so that freeing it returns the pages to the system."""
    from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights

    args = ModelArgs(dim=512, n_layers=1, n_heads=4, vocab_size=32000, ffn_hidden_dim=512,
                     n_future_tokens=1, max_seq_len=64)  # fmt: skip
    model = Transformer(args)
    init_weights(model, seed=0)  # writes every weight: its pages are resident
    return model.requires_grad_(False).eval()


def tiny_stream(n: int = 4, length: int = 12) -> SimpleNamespace:
    lengths = [length - i for i in range(n)]
    examples = [SimpleNamespace(length=k) for k in lengths]

    def collate(indices: list[int]) -> Batch:
        size = max(lengths[i] for i in indices)
        tokens = torch.zeros(len(indices), size, dtype=torch.long)
        labels = torch.full_like(tokens, IGNORE_INDEX)
        for row, i in enumerate(indices):
            tokens[row, : lengths[i]] = torch.arange(3, 3 + lengths[i])
            labels[row, 4 : lengths[i]] = tokens[row, 4 : lengths[i]]
        return Batch(tokens, labels, (tokens > 0).long())

    return SimpleNamespace(data=SimpleNamespace(examples=examples), collate=collate, extras={})


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_precompute_frees_the_reference_and_its_memory():
    import gc
    import weakref

    from weighted_mtp.config import Rho1Config
    from weighted_mtp.train.weighting import Rho1

    gc.collect()
    helper = big_reference()
    size = sum(p.numel() * p.element_size() for p in helper.parameters()) / 2**20
    loaded = rss_mb()
    weighting = Rho1(Rho1Config(precompute=True), helper_model=helper)
    alive = weakref.ref(helper)
    del helper
    stream = tiny_stream()
    weighting.prepare([stream], torch.device("cpu"), batch_size=2)
    gc.collect()
    freed = loaded - rss_mb()
    print(f"helper {size:.0f} MiB; resident memory fell by {freed:.0f} MiB after prepare")
    assert alive() is None and weighting.helper_model is None
    assert freed >= 0.8 * size
    # Training goes on from the precomputed signal alone.
    assert [len(ce) for ce in stream.extras["ref_ce"]] == [12, 11, 10, 9]
    batch = stream.collate([0, 1])
    batch.extras["ref_ce"] = torch.nn.utils.rnn.pad_sequence(stream.extras["ref_ce"][:2], True)
    planned = weighting.weigh(batch, 4, Micro())
    assert planned.weight_fn is not None and planned.denominators.shape == (4,)


# ---- Rho-1: the reference's CE in bounded chunks (docs/METHOD.md §5) ----


def small_reference(n_future_tokens: int = 2) -> torch.nn.Module:
    from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights

    args = ModelArgs(dim=32, n_layers=3, n_heads=2, vocab_size=97, ffn_hidden_dim=48,
                     n_future_tokens=n_future_tokens, max_seq_len=64)  # fmt: skip
    model = Transformer(args)
    init_weights(model, seed=3)
    return model.requires_grad_(False).eval()


def unchunked_reference_ce(reference, tokens, labels):
    """The full-vocabulary computation the chunked one replaces: every head's ``[B, L, V]``
    logits from ``reference(tokens)``, head 1's up-cast, one cross-entropy over all rows."""
    import torch.nn.functional as F

    with torch.no_grad():
        logits = reference(tokens)[:, :-1, 0].float()
        targets = labels[:, 1:]
        flat = logits.reshape(-1, logits.shape[-1])
        ce = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return F.pad(ce.view_as(targets), (1, 0))


def prompt_and_padding_batch(rows: int = 3, length: int = 20, vocab: int = 97) -> Batch:
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(3, vocab, (rows, length), generator=gen)
    labels = tokens.clone()
    labels[:, :6] = IGNORE_INDEX  # a prompt
    labels[1, 14:] = IGNORE_INDEX  # padding
    mask = (labels != IGNORE_INDEX).long()
    mask[:, :6] = 1
    return Batch(tokens, labels, mask)


class RowCounter:
    """Counts the rows each call of the reference's output layer receives."""

    def __init__(self, reference: torch.nn.Module):
        self.rows: list[int] = []
        self.handle = reference.output.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        self.rows.append(inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0])


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 4096])
def test_chunked_reference_ce_equals_the_unchunked_one(chunk_rows):
    from weighted_mtp.train.mtp_loss import valid_rows
    from weighted_mtp.train.weighting import reference_ce

    reference, batch = small_reference(), prompt_and_padding_batch()
    expected = unchunked_reference_ce(reference, batch.tokens, batch.labels)
    counter = RowCounter(reference)
    got = reference_ce(reference, batch.tokens, batch.labels, chunk_rows)
    valid = len(valid_rows(batch.labels, 1)[0])
    assert got.dtype == torch.float32 and got.shape == batch.labels.shape
    torch.testing.assert_close(got, expected)  # fp32 rounding only
    assert torch.equal(got == 0, expected == 0) and not got[:, :6].any()  # unscored: exactly 0
    # At most one chunk of [rows, V] logits at a time, only rows with a valid target.
    assert max(counter.rows) <= chunk_rows and sum(counter.rows) == valid
    assert len(counter.rows) == -(-valid // chunk_rows)


def test_rho1_bounds_the_reference_logits_per_step_and_in_precompute():
    from weighted_mtp.config import Rho1Config
    from weighted_mtp.train.weighting import Rho1

    reference, batch = small_reference(n_future_tokens=1), prompt_and_padding_batch()
    expected = unchunked_reference_ce(reference, batch.tokens, batch.labels)
    counter = RowCounter(reference)
    online = Rho1(Rho1Config(), helper_model=reference, chunk_rows=7)
    online.weigh(batch, N_HEADS, Micro())
    torch.testing.assert_close(online._reference_ce(batch), expected)
    assert counter.rows and max(counter.rows) <= 7
    counter.rows.clear()
    stream = tiny_stream()
    precomputed = Rho1(Rho1Config(precompute=True), helper_model=reference, chunk_rows=3)
    precomputed.prepare([stream], torch.device("cpu"), batch_size=2)
    assert precomputed.helper_model is None and max(counter.rows) == 3
    whole = stream.collate([0, 1, 2, 3])
    direct = unchunked_reference_ce(reference, whole.tokens, whole.labels)
    for row, ce in enumerate(stream.extras["ref_ce"]):
        torch.testing.assert_close(ce, direct[row, : len(ce)])


def test_a_new_frozen_helper_weighting_is_two_methods():
    """Another package's weighting with a frozen model (docs/ARCHITECTURE.md, "Contracts"):
    ``FrozenHelperWeighting`` names the checkpoint from its declared helper, precomputes the
    signal, drops the model."""
    from pydantic import BaseModel

    from weighted_mtp.registry import Helper
    from weighted_mtp.train.weighting import BuildContext, FrozenHelperWeighting

    class LengthSignal(FrozenHelperWeighting):
        name = "length_signal_test"  # not registered: the class's own helper is read
        helper = Helper("reference", "model_path")
        signal = ("length_signal", "lengths")

        class Settings(BaseModel):
            model_path: str = ""
            precompute: bool = True

        @classmethod
        def load_helper(cls, ckpt, ctx):
            raise AssertionError("not reached without a checkpoint")

        def helper_signal(self, stream, device, batch_size):
            return [self.helper_model(e.length) for e in stream.data.examples]

        def weights(self, batch, n_heads, micro):
            return self.dense_weights(batch, None, n_heads)

    with pytest.raises(ValueError, match=r"^length_signal_test needs "
                       r"weighting\.length_signal_test\.model_path \(a reference run\)$"):  # fmt: skip
        LengthSignal.build(None, BuildContext())
    weighting = LengthSignal(helper_model=lambda n: torch.full((n,), float(n)))
    stream = tiny_stream()
    weighting.prepare([stream], torch.device("cpu"), batch_size=2)
    assert weighting.helper_model is None
    assert [v.tolist()[:1] for v in stream.extras["lengths"]] == [[12.0], [11.0], [10.0], [9.0]]
