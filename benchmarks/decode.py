"""Self-speculative vs plain greedy decoding speed (docs/EVALUATION.md §1, "Decoding").

A micro-shaped MTP model (4 heads) is trained briefly on a predictable corpus (a fixed random
cycle through the vocabulary, so token t + k is a function of token t and every head can
learn it); the extra heads then agree with head 1 and drafts are accepted. Both decoders run
greedy on the same prompts with a KV cache; the outputs must be identical.

    .venv/bin/python benchmarks/decode.py            # d 512, 6 layers, V 2048
    .venv/bin/python benchmarks/decode.py --quick    # d 128, well under a minute

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from weighted_mtp.evaluation.generate import generate, speculative_generate
from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights


def build(dim: int, vocab: int) -> Transformer:
    args = ModelArgs(
        dim=dim, n_layers=6, n_heads=8, vocab_size=vocab, ffn_hidden_dim=int(dim * 8 / 3),
        n_future_tokens=4, max_seq_len=1024,
    )  # fmt: skip
    model = Transformer(args)
    init_weights(model, 42)
    return model


def train(model: Transformer, cycle: torch.Tensor, steps: int, seq: int = 64) -> float:
    """MTP cross-entropy on windows of the cycle; returns the last loss (sum over heads)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    n, period = model.n_future_tokens, cycle.numel()
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        starts = torch.randint(0, period, (8, 1))
        tokens = cycle[(starts + torch.arange(seq)) % period]
        logits = model(tokens)
        loss = sum(
            F.cross_entropy(logits[:, :-k, k - 1].flatten(0, 1), tokens[:, k:].flatten())
            for k in range(1, n + 1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=None)
    opts = parser.parse_args()
    dim, vocab, steps = (128, 512, 40) if opts.quick else (512, 2048, 150)
    new_tokens = opts.new_tokens or (64 if opts.quick else 128)
    torch.manual_seed(0)
    cycle = torch.randperm(vocab)[:256]
    cycle = cycle[cycle != 2]  # keep EOS out of the corpus
    model = build(dim, vocab)
    loss, train_s = timed(lambda: train(model, cycle, steps))
    print(f"model d={dim} V={vocab} n=4; trained {steps} steps in {train_s:.1f}s, loss {loss:.3f}")

    prompts = [cycle[i * 7 : i * 7 + 16].tolist() for i in range(opts.prompts)]
    generate(model, prompts[:1], 4, eos_id=-1)  # warm-up
    plain_s = spec_s = 0.0
    plain_tokens = spec_tokens = steps_total = 0
    identical = True
    proposed, accepted = [0, 0, 0], [0, 0, 0]
    for prompt in prompts:
        plain, dt = timed(lambda p=prompt: generate(model, [p], new_tokens, eos_id=-1)[0])
        plain_s, plain_tokens = plain_s + dt, plain_tokens + len(plain)
        (spec, stats), dt = timed(
            lambda p=prompt: speculative_generate(model, p, new_tokens, eos_id=-1)
        )
        spec_s, spec_tokens = spec_s + dt, spec_tokens + len(spec)
        steps_total += stats.steps
        identical &= spec == plain
        proposed = [a + b for a, b in zip(proposed, stats.draft_proposed, strict=True)]
        accepted = [a + b for a, b in zip(accepted, stats.draft_accepted, strict=True)]

    acceptance = [round(a / p, 4) if p else 0.0 for a, p in zip(accepted, proposed, strict=True)]
    result = {
        "tokens_per_s_plain": round(plain_tokens / plain_s, 2),
        "tokens_per_s_speculative": round(spec_tokens / spec_s, 2),
        "speedup": round((spec_tokens / spec_s) / (plain_tokens / plain_s), 3),
        "tokens_per_step": round(spec_tokens / steps_total, 3),
        "acceptance": acceptance,
        "identical_output": identical,
    }
    print(f"plain greedy        {result['tokens_per_s_plain']:9.1f} tokens/s")
    print(f"speculative greedy  {result['tokens_per_s_speculative']:9.1f} tokens/s")
    print(f"speedup {result['speedup']:.2f}x, {result['tokens_per_step']:.2f} tokens per step")
    print(f"acceptance by draft head 2/3/4 (given reached): {acceptance}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
