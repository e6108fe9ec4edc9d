"""MTP loss memory and time (docs/FIGURES.md §4): heads + norm + unembedding + CE, forward and backward.

Variants (peak memory of each measured in a fresh subprocess, so one's allocations cannot hide
another's peak):
  naive    ``naive_mtp_loss`` on the full ``[B, T, n, V]`` logits of ``model(tokens)``
  ours     ``mtp_forward_backward`` with n heads
  ours_n1  the same code with one head

What is measured: the trunk is replaced by a random leaf ``[B, T, d]`` tensor (so its gradient is
still produced), the head blocks are real ``TransformerBlock``s, then the shared norm, output
projection and CE; the first half of each row is prompt. Parameter gradients are allocated
before measuring, so the peak is that of activations, logits and their gradients. Peak = highest
resident set (CPU: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, after a
warm-up call and ``malloc_trim``, with glibc's mmap threshold fixed at 64 KiB so freed tensors
leave the resident set) or ``torch.cuda.max_memory_allocated`` (CUDA), minus the value just
before the measured call. Time = median of ``--reps`` forward+backward calls after a warm-up
round, in one more child that runs the three variants in turn (so that load from other
processes falls on all of them alike).

    .venv/bin/python benchmarks/mtp_loss.py            # d 512, V 32000, T 2048, B 2, n 4
    .venv/bin/python benchmarks/mtp_loss.py --quick    # smaller shape, under a minute
    python benchmarks/mtp_loss.py --device cuda --dim 4096   # 7B shape, bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.models.transformer import ModelArgs, Transformer
from weighted_mtp.train.mtp_loss import head_denominators, mtp_forward_backward, naive_mtp_loss

VARIANTS = ("naive", "ours", "ours_n1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="d 256, V 8000, T 512")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--reps", type=int, default=2, help="timed rounds after one warm-up round")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # peak child
    p.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)  # timing child
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.vocab, args.seq = 256, 8000, 512
    return args


def build(args: argparse.Namespace, n_heads: int):
    """Model with no trunk block whose trunk output is a random leaf, and a half-prompt batch."""
    torch.manual_seed(0)
    dev = torch.device(args.device)
    margs = ModelArgs(
        dim=args.dim,
        n_layers=n_heads,  # every block is a head block
        n_heads=max(1, args.dim // 128),
        vocab_size=args.vocab,
        n_future_tokens=n_heads,
        max_seq_len=args.seq,
    )
    model = Transformer(margs).to(dev)
    h0 = torch.randn(args.batch, args.seq, args.dim, device=dev).requires_grad_()
    model.trunk = lambda tokens, start_pos=None: h0  # isolate the loss part
    tokens = torch.randint(3, args.vocab, (args.batch, args.seq), device=dev)
    labels = tokens.clone()
    labels[:, : args.seq // 2] = IGNORE_INDEX  # first half of each row is prompt
    weights = torch.rand(args.batch, args.seq, device=dev) * 2
    for p in [*model.parameters(), h0]:
        p.grad = torch.zeros_like(p)  # gradients exist before measuring, as in a training loop
    return model, h0, tokens, labels, weights


def make_step(args: argparse.Namespace, variant: str):
    """A closure running one forward+backward of ``variant`` on its own model and batch."""
    n = 1 if variant == "ours_n1" else args.heads
    model, _, tokens, labels, weights = build(args, n)
    dens = head_denominators(labels, weights, n)
    coefs = [1.0 / n] * n
    cuda = args.device == "cuda"

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext():
            if variant == "naive":
                naive_mtp_loss(model, tokens, labels, weights, dens, coefs).backward()
            else:
                mtp_forward_backward(
                    model, tokens, labels, weights, dens, coefs, chunk_rows=args.chunk_rows
                )
        if cuda:
            torch.cuda.synchronize()

    return step


def measure_peak(args: argparse.Namespace) -> dict:
    """Child process: peak memory of one call of one variant, after a warm-up call."""
    step = make_step(args, args.variant)
    step()  # warm-up: lazy initialisations, thread pools
    gc.collect()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back first
        Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark
        base = _status_kb("VmRSS") * 1024
    step()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    return {"variant": args.variant, "peak_bytes": peak - base}


def measure_times(args: argparse.Namespace) -> dict:
    """Child process: median time of every variant over ``reps`` rounds after a warm-up round,
    the variants interleaved so that load from other processes falls on all of them alike."""
    steps = {v: make_step(args, v) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rnd in range(args.reps + 1):
        for v, step in steps.items():
            start = time.perf_counter()
            step()
            if rnd:
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(argv: list[str], extra: list[str], env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, *argv, *extra]
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=full_env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure_peak(args)))
        return
    if args.timing:
        print(json.dumps(measure_times(args)))
        return
    print(
        f"MTP loss part (heads+norm+unembedding+CE, fwd+bwd) on {args.device}: "
        f"d {args.dim}, V {args.vocab}, T {args.seq}, B {args.batch}, n {args.heads}, "
        f"chunk_rows {args.chunk_rows}, half of each row prompt, torch threads "
        f"{torch.get_num_threads()}"
    )
    # A fixed mmap threshold stops glibc from keeping freed tensors of up to 32 MiB in its heap
    # (its default adapts), so the resident set follows the memory actually in use.
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    res = {v: run_child(argv, ["--variant", v], env) for v in VARIANTS}
    for v, t in run_child(argv, ["--timing"]).items():  # default allocator settings
        res[v]["time_s"] = t
    print(f"{'variant':<10}{'peak MiB':>12}{'time s':>10}")
    for v in VARIANTS:
        print(f"{v:<10}{res[v]['peak_bytes'] / 2**20:>12.1f}{res[v]['time_s']:>10.3f}")
    figures = {
        "peak_ratio_vs_naive": round(res["ours"]["peak_bytes"] / res["naive"]["peak_bytes"], 4),
        "peak_ratio_vs_n1": round(res["ours"]["peak_bytes"] / res["ours_n1"]["peak_bytes"], 4),
        "time_ratio_vs_naive": round(res["ours"]["time_s"] / res["naive"]["time_s"], 4),
    }
    print("targets: peak vs naive <= 0.15, peak vs n1 <= 1.3, time vs naive <= 0.5")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
