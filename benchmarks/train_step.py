"""Training throughput: one full LoRA optimizer step, ours vs transformers + PEFT.

Same shape, precision, LoRA targets/rank and optimizer on both sides: the micro reference
shape (d 512, 4 layers, 8 heads, FFN 1365, V 32000), NTP mode (one head), batch 4 x 512.
Ours runs ``mtp_forward_backward`` (logits only where a target is valid, chunked fp32 CE);
theirs runs ``LlamaForCausalLM(labels=...)`` (logits for every position). Two cases: no prompt
tokens, and the first half of every row prompt. Prints tokens/s and the ratios; the last line
is one JSON object of the figures.

    python benchmarks/train_step.py [--quick] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from weighted_mtp.config import LoraConfig
from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.models.checkpoints import meta_to_hf_qk
from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights
from weighted_mtp.train.loop import compile_blocks
from weighted_mtp.train.mtp_loss import mtp_forward_backward
from weighted_mtp.train.recipes import apply_lora

TARGETS = ["wq", "wk", "wv", "wo"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def ours(model: Transformer, rank: int, device: str, dtype: torch.dtype, compile: bool = False):
    model = model.to(device=device, dtype=dtype)
    torch.manual_seed(1)  # the same LoRA initialisation, compiled or not
    apply_lora(model, LoraConfig(rank=rank, alpha=2 * rank, dropout=0.0, targets=TARGETS))
    if compile:
        compile_blocks(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> None:
        mtp_forward_backward(model, tokens, labels, None, None, [1.0], n_heads=1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def theirs(model_ours: Transformer, args: ModelArgs, rank: int, device: str, dtype: torch.dtype):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        vocab_size=args.vocab_size, max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    _copy_weights(model_ours, model, args)
    model = model.to(device=device, dtype=dtype)
    model = get_peft_model(
        model,
        PeftLoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=HF_TARGETS),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> None:
        model(input_ids=tokens, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _copy_weights(src: Transformer, dst, args: ModelArgs) -> None:
    """Same base weights on both sides, so both compute the same function."""
    from weighted_mtp.models.checkpoints import _OURS_TO_HF, map_key

    state = {}
    for name, tensor in src.state_dict().items():
        if name.endswith("wq.weight"):
            tensor = meta_to_hf_qk(tensor, args.n_heads)
        elif name.endswith("wk.weight"):
            tensor = meta_to_hf_qk(tensor, args.n_kv_heads)
        state[map_key(name, _OURS_TO_HF)] = tensor
    dst.load_state_dict(state, strict=True)


def interleaved_tokens_per_s(steps, tokens, labels, warmup: int, reps: int, sync) -> list[float]:
    """Tokens/s of each step function, timed in alternation (A B A B ...) so that drift in the
    machine's speed affects both sides alike; median of ``reps`` rounds."""
    for step in steps:
        for _ in range(warmup):
            step(tokens, labels)
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(reps):
        for i, step in enumerate(steps):
            sync()
            start = time.perf_counter()
            step(tokens, labels)
            sync()
            times[i].append(time.perf_counter() - start)
    return [tokens.numel() / statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run (under a minute)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1365)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled run")
    opts = parser.parse_args()
    batch, seq, reps = (2, 256, 3) if opts.quick else (opts.batch, opts.seq, 7)
    dtype = getattr(torch, opts.dtype)
    torch.manual_seed(0)
    args = ModelArgs(
        dim=opts.dim,
        n_layers=opts.layers,
        n_heads=opts.heads,
        vocab_size=32000,
        ffn_hidden_dim=opts.ffn,
        n_future_tokens=1,
        max_seq_len=max(seq, 2048),
    )
    base = Transformer(args)
    init_weights(base, seed=0)
    compiled_base = None if opts.no_compile else copy.deepcopy(base)
    theirs_step = theirs(base, args, opts.rank, opts.device, dtype)
    _, ours_step = ours(base, opts.rank, opts.device, dtype)
    sync = torch.cuda.synchronize if opts.device.startswith("cuda") else (lambda: None)
    tokens = torch.randint(3, 32000, (batch, seq), device=opts.device)
    full = tokens.clone()
    half = tokens.clone()
    half[:, : seq // 2] = IGNORE_INDEX
    steps = [ours_step, theirs_step]
    figures = {}
    first_compiled_s = None
    if compiled_base is not None:
        _, compiled_step = ours(compiled_base, opts.rank, opts.device, dtype, compile=True)
        sync()
        start = time.perf_counter()
        compiled_step(tokens, full)  # compiles the blocks' forward and backward graphs
        sync()
        first_compiled_s = time.perf_counter() - start
        steps.append(compiled_step)
    for case, labels in (("no_prompt", full), ("half_prompt", half)):
        rates = interleaved_tokens_per_s(steps, tokens, labels, 1, reps, sync)
        a, b = rates[:2]
        figures[f"ours_tokens_per_s_{case}"] = round(a, 1)
        figures[f"hf_peft_tokens_per_s_{case}"] = round(b, 1)
        figures[f"ratio_{case}"] = round(a / b, 3)
        print(
            f"{case:12s} ours {a:9.1f} tok/s   transformers+PEFT {b:9.1f} tok/s   ratio {a / b:.2f}x"
        )
        if first_compiled_s is not None:
            c = rates[2]
            figures[f"compiled_tokens_per_s_{case}"] = round(c, 1)
            figures[f"compiled_vs_eager_{case}"] = round(c / a, 3)
            print(f"{case:12s} ours compiled {c:9.1f} tok/s   eager {a:9.1f} tok/s   "
                  f"ratio {c / a:.2f}x")  # fmt: skip
    if first_compiled_s is not None:
        compile_s = first_compiled_s - tokens.numel() / figures["compiled_tokens_per_s_no_prompt"]
        figures["compile_s"] = round(compile_s, 1)
        print(f"compilation: {compile_s:.1f} s (first compiled step {first_compiled_s:.1f} s)")
    print(
        f"shape: B {batch} T {seq} d {opts.dim} layers {opts.layers} V 32000, LoRA r {opts.rank} "
        f"on {','.join(TARGETS)}, {opts.dtype} on {opts.device}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
