"""Text generation with the KV cache: plain decoding (head 1) and self-speculative decoding.

Decoding and sampling rules: docs/EVALUATION.md §1 ("Decoding").

* ``generate`` decodes a batch with head 1 only (caches for the trunk and head 1). Prompts
  of different lengths are left-aligned; the common prefix (the shortest prompt) is
  prefilled at once, then every row advances one position per step at the *same* absolute
  position, and a row whose prompt is still running is fed its next prompt token instead of
  the sampled one (LLaMA's reference scheme). All rows therefore share one write pointer,
  which is what ``forward_cached`` supports, and no row ever attends to padding.
* ``speculative_generate`` decodes one prompt with the model's own extra heads as drafters
  (Stern et al. 2018; Gloeckle et al. 2024 §3.2). Verification uses the speculative-sampling
  rule, which for temperature <= 0 (one-hot distributions) reduces exactly to greedy
  "accept while equal to head 1's argmax", so one code path serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from weighted_mtp.models.transformer import Transformer

StopFn = Callable[[list[int]], bool]


@dataclass
class SpecStats:
    """Counters of one speculative decode.

    ``steps`` counts model calls (the prefill included); ``draft_proposed[i]`` counts the
    drafts of head ``i + 2`` that were verified (those after a rejection are not), and
    ``draft_accepted[i]`` those accepted, so ``acceptance[i]`` is conditional on reaching i.
    """

    steps: int = 0
    tokens: int = 0
    draft_proposed: list[int] = field(default_factory=list)
    draft_accepted: list[int] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def acceptance(self) -> list[float]:
        return [
            a / p if p else 0.0
            for a, p in zip(self.draft_accepted, self.draft_proposed, strict=True)
        ]


def sample_probs(logits: Tensor, temperature: float, top_p: float = 1.0) -> Tensor:
    """The distribution decoding draws from, ``[..., V]`` in fp32.

    Greedy (temperature <= 0) is the one-hot of the argmax. Otherwise softmax(logits / T)
    restricted to the nucleus: sorted by probability, a token is kept while the mass before
    it is <= top_p (so the token that first pushes the mass past p is kept, and the top
    token always is), then renormalised.
    """
    if temperature <= 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: Tensor, generator: torch.Generator, greedy: bool) -> Tensor:
    """One token per row of ``probs`` ``[N, V]`` -> ``[N]``; argmax when greedy (no RNG use)."""
    if greedy:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def speculative_accept(
    p: Tensor, r: Tensor, q: Tensor, generator: torch.Generator, greedy: bool = False
) -> tuple[Tensor, Tensor]:
    """Speculative-sampling rule for drafts ``q`` ``[N]`` drawn from ``r`` ``[N, V]``.

    Returns ``(accepted [N] bool, replacement [N])``: ``q`` is accepted with probability
    min(1, p(q) / r(q)); otherwise the replacement is drawn from normalize(max(0, p - r)).
    The emitted token is then distributed exactly as ``p``. With one-hot ``p`` and ``r``
    this is greedy verification and the replacement is ``argmax p`` (pass ``greedy`` to
    take it without drawing).
    """
    p_q = p.gather(-1, q[:, None]).squeeze(-1)
    r_q = r.gather(-1, q[:, None]).squeeze(-1)
    u = torch.rand(q.shape, generator=generator, device=p.device)
    # Strict ``<`` so that one-hot p with p(q) = 0 is never accepted, even if u == 0.
    accepted = u * r_q < p_q
    residual = (p - r).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    # Zero residual mass means p == r (up to rounding): rejection then has probability ~0,
    # and drawing from p keeps the fallback well defined.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
    return accepted, draw(residual, generator, greedy)


def _emit(out: list[int], new: list[int], max_new: int, eos_id: int, stop: StopFn | None) -> bool:
    """Append ``new`` to ``out`` token by token; True when the row is finished.

    EOS finishes the row and is not appended; so do ``max_new`` tokens or ``stop(out)``.
    """
    for token in new:
        if token == eos_id:
            return True
        out.append(token)
        if len(out) >= max_new or (stop is not None and stop(out)):
            return True
    return False


def _check(prompts: list[list[int]], model: Transformer) -> None:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if max(len(p) for p in prompts) > 2 * model.args.max_seq_len:
        raise ValueError("prompt longer than the model's RoPE table")


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int = 2,
    stop: StopFn | None = None,
) -> list[list[int]]:
    """Decode ``prompts`` in one batch with head 1 and a KV cache; continuation ids per prompt.

    Greedy when ``temperature <= 0``, else tempered nucleus sampling from a ``torch.Generator``
    seeded with ``seed``. A row ends at EOS (excluded), after ``max_new_tokens`` tokens, or
    when ``stop(continuation)`` is true; the loop ends when every row has ended. Greedy takes
    head 1's argmax from ``Transformer.greedy_cached`` (the argmax of ``sample_probs``'
    one-hot, without the logits' softmax or one-hot), and each step is one model call plus
    one list of the new ids (docs/EVALUATION.md §1, "Decoding").
    """
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    _check(prompts, model)
    device = model.output.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    greedy = temperature <= 0
    batch, lengths = len(prompts), [len(p) for p in prompts]
    min_len, lengths_max = min(lengths), max(lengths)
    total = lengths_max + max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    in_prompt = torch.zeros(batch, total, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, device=device)
        in_prompt[row, : len(prompt)] = True
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    model.setup_caches(batch, total, n_heads=1)

    def next_tokens(feed: Tensor, start: int) -> Tensor:
        if greedy:
            return model.greedy_cached(feed, start)
        logits = model.forward_cached(feed, start, n_heads=1, last_only=True)[:, -1, 0]
        return draw(sample_probs(logits, temperature, top_p), generator, greedy)

    try:
        sampled = next_tokens(tokens[:, :min_len], 0)
        for pos in range(min_len, total):
            if pos < lengths_max:
                tokens[:, pos] = torch.where(in_prompt[:, pos], tokens[:, pos], sampled)
            else:
                tokens[:, pos] = sampled
            for row, token in enumerate(sampled.tolist()):
                if not done[row] and pos >= lengths[row]:
                    done[row] = _emit(outputs[row], [token], max_new_tokens, eos_id, stop)
            if all(done):
                break
            # Finished rows keep being fed their last token: harmless, their output is frozen.
            sampled = next_tokens(tokens[:, pos : pos + 1], pos)
    finally:
        model.clear_caches()
    return outputs


def _verify(
    probs: Tensor, drafts: Tensor, draft_probs: Tensor, generator, greedy: bool, stats: SpecStats
) -> tuple[list[int], int]:
    """Accepted tokens of one step and the row (fed position) of the last accepted input.

    ``probs`` ``[n, V]`` are head 1's distributions at the n fed positions (row i holds the
    last accepted token for i = 0, else draft i - 1); head 1 at row i judges draft i.
    """
    n = probs.shape[0]
    accepted, replacement = speculative_accept(
        probs[: n - 1], draft_probs, drafts, generator, greedy
    )
    new: list[int] = []
    for i, (ok, draft, fix) in enumerate(
        zip(accepted.tolist(), drafts.tolist(), replacement.tolist(), strict=True)
    ):
        stats.draft_proposed[i] += 1
        if not ok:
            return [*new, fix], i
        stats.draft_accepted[i] += 1
        new.append(draft)
    # Every draft accepted: head 1 at the last fed position gives one bonus token.
    bonus = int(draw(probs[n - 1][None], generator, greedy)[0])
    return [*new, bonus], n - 1


@torch.inference_mode()
def speculative_generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int = 2,
    stop: StopFn | None = None,
) -> tuple[list[int], SpecStats]:
    """Self-speculative decoding of one prompt with all ``n`` heads (docs/EVALUATION.md §1).

    Each step feeds the last accepted token and the n - 1 drafts of heads 2..n (drafted at
    the last accepted position) at their absolute positions, so all head caches see every
    accepted position. Drafts are verified against head 1 (greedy: accept while equal; with
    temperature, the exact speculative-sampling rule, so the output is distributed as head
    1's sampling). Each step gains 1..n tokens; rewinding is writing the next step at the
    first unaccepted position, since later cache entries are masked by position.
    """
    n = model.n_future_tokens
    stats = SpecStats(draft_proposed=[0] * (n - 1), draft_accepted=[0] * (n - 1))
    if max_new_tokens <= 0:
        return [], stats
    _check([prompt], model)
    device = model.output.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    greedy = temperature <= 0
    out: list[int] = []
    model.setup_caches(1, len(prompt) + max_new_tokens + n, n_heads=n)
    try:
        feed = torch.tensor([prompt], device=device)
        logits = model.forward_cached(feed, 0, n_heads=n, last_only=True)[0, -1]
        probs = sample_probs(logits, temperature, top_p)
        stats.steps, pos = 1, len(prompt)
        new = [int(draw(probs[:1], generator, greedy)[0])]
        last = probs  # [n, V]: distributions at the last accepted fed position
        while not _emit(out, new, max_new_tokens, eos_id, stop):
            draft_probs = last[1:]
            drafts = draw(draft_probs, generator, greedy)
            feed = torch.cat([torch.tensor([new[-1]], device=device), drafts])[None]
            # One output projection for all n x n rows: reading the [V, dim] matrix once
            # costs about what one row costs, four separate reads cost four times as much.
            logits = model.forward_cached(feed, pos, n_heads=n)[0]  # [n fed, n heads, V]
            # Head 1 at every fed position judges the drafts; the other heads matter only at
            # the last accepted position (the next drafts).
            head1 = sample_probs(logits[:, 0], temperature, top_p)
            stats.steps += 1
            new, row = _verify(head1, drafts, draft_probs, generator, greedy, stats)
            rest = sample_probs(logits[row, 1:], temperature, top_p)
            last, pos = torch.cat([head1[row : row + 1], rest]), pos + len(new)
    finally:
        model.clear_caches()
    stats.tokens = len(out)
    return out, stats
