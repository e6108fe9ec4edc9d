"""The prepared GPU check: the 7B policy shape on one GPU, in one command, random weights.

    python benchmarks/gpu_check.py                       # CUDA, 7B shape (dim 4096, 32 blocks)
    python benchmarks/gpu_check.py --quick               # the same shape, fewer repetitions
    python benchmarks/gpu_check.py --device cpu --dim 256 --layers 2 --seq 128 --quick

Every weight is drawn at random on the device (nothing is downloaded or read from storage).
Each part below is measured on its own; one that fails is reported under ``errors`` and the
others still run. A readable table comes first; the last line printed is one JSON object
(its keys are listed in docs/FIGURES.md §6).

1. ``lora_step``: one training step of the policy (MTP, 4 heads, vocab 32000, bf16 weights,
   LoRA on wq/wk/wv/wo, bf16 autocast on CUDA) through the project's own code: ``apply_lora``
   from ``train/recipes.py``, ``MTPObjective`` with the ``Uniform`` weighting, and
   ``Trainer.step`` of ``train/loop.py`` (plan, normaliser, forward/backward under autocast,
   clipping, AdamW) -- with activation checkpointing off and on. Tokens/s, peak memory (CUDA)
   and MFU (see :func:`lora_step_flops` for the FLOP count; peak bf16 dense FLOP/s from the
   GPU's name or ``--peak-tflops``).
2. ``mtp_loss``: the same model's forward+backward with ``mtp_forward_backward`` (heads one at
   a time, valid rows only, chunked CE) against ``naive_mtp_loss`` (full ``[B, T, n, V]``
   logits): peak memory and time.
3. ``critic``: peak memory of the ``critic_td`` step with the frozen 2.7B critic (Sheared-LLaMA
   shape: dim 2560, 32 blocks, FFN 6912; proportionally smaller at a smaller ``--dim``)
   resident on the device and called by ``CriticTD.weigh`` every micro-batch, against the
   same step after its values were precomputed into ``batch.extras["values"]`` and the critic
   dropped (what ``CriticTD.prepare`` does with ``precompute: true``).
4. ``decode``: plain greedy decoding (``generate``, head 1, KV cache) against self-speculative
   decoding (``speculative_generate``) with acceptance forced to 1, its upper bound: the
   shared final norm's weight is set to zero, so every head's logits are all zero at every
   position and every head's argmax is token 0; every draft then equals head 1's choice. The
   compute per step is unchanged (dense matmuls do not skip zeros), both decoders run on this
   same model, and the norm is restored afterwards.
5. ``compile``: one training step of the same policy with its blocks compiled as
   ``train.compile`` does (``compile_blocks`` of ``train/loop.py``, inductor), against the same
   two steps eager from the same LoRA weights: the first (compiling) step's and the next
   step's seconds, and both steps' losses equal to eager's within ``compile_tolerance`` (bf16
   autocast on CUDA reorders roundings; fp32 on a CPU). ``--compile-backend aot_eager`` traces
   the same graphs without inductor's code generation (the CPU test uses it: inductor's first
   step took 29 s at the test's shape on 2 CPU cores).
6. ``memory``: one training step at each production config's micro-batch shape
   (``configs/production/*.yaml``: its ``train.batch_size`` rows of ``--seq`` tokens, every
   position a target -- an upper bound, real rows have a prompt and padding), the 7B shape, the
   config's LoRA (rank, targets, dropout) and activation checkpointing, bf16 on CUDA:
   ``baseline`` (12 x 2048, the policy's MTP step), ``rho1`` (32 x 2048: the reference's CE in
   chunks of ``--ref-chunk-rows`` rows (default ``REFERENCE_CHUNK_ROWS``, 4096) against one
   chunk of all rows, with the rows each call of its output layer received, then the policy step
   with the reference resident (chunked CE every micro-batch) and with its CE precomputed into
   ``batch.extras["ref_ce"]`` and the reference freed, as ``precompute: true`` does), and
   ``critic`` (24 pairs x 2048, i.e. 48 rows: the ``critic`` recipe's value-model step, the
   2.7B shape with its value head and the pairwise loss). Peak memory
   (``torch.cuda.max_memory_allocated``; on a CPU null, with the process's RSS high-water mark
   beside it) and seconds per step (the second of two).
7. ``autocast``: the micro model's (dim 512, 7 blocks, 4 heads) validation loss with bf16
   autocast against fp32, within ``AUTOCAST_RTOL``.
8. ``torchrun``: ``torchrun --standalone --nproc_per_node=N`` (N: the visible GPUs, NCCL; on a
   CPU 2 ranks, gloo) runs the ``baseline`` recipe through ``train()`` of ``train/loop.py`` on
   a tiny storage tree built in a temporary folder (micro-sized models, the bundled datasets):
   a bf16 base model, ``train.fsdp_param_dtype=bfloat16`` (FSDP2 mixed precision), activation
   checkpointing, LoRA dropout 0.05, grad_accum 2, validation every 2 steps, 4 steps. The first
   launch is interrupted right after its step-2 checkpoint; a second launch with the same
   ``run_name`` and ``checkpoint.resume=true`` resumes from it to step 4. With one GPU the
   project would create no process group, so the worker creates it and marks the run as
   distributed: the Trainer then takes its torchrun path (FSDP2 on one rank, NCCL).

Budget on one H100 (estimated, not yet measured: no GPU has been available), 8 minutes in all:
start-up and the random 7B policy 20 s, ``decode`` 25 s, ``lora_step`` 15 s, ``mtp_loss``
10 s, ``critic`` 15 s, ``compile`` 120 s (inductor compiling a block's forward and backward
graphs dominates), ``memory`` 75 s (3 model builds; 2 steps at 12 x 2048, 4 at 32 x 2048,
2 at 48 x 2048; the reference's CE twice), ``autocast`` 5 s, ``torchrun`` 70 s (tiny storage,
two launches of about 25 s, mostly start-up): about 6 minutes. ``--quick`` repeats less and
decodes 64 tokens; ``--skip`` leaves parts out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from weighted_mtp.config import Config, CriticTDConfig, LoraConfig, load_config
from weighted_mtp.data.collate import IGNORE_INDEX, Batch, PairBatch
from weighted_mtp.models.transformer import ModelArgs, Transformer
from weighted_mtp.train import distributed
from weighted_mtp.train.checkpoint import TrainState
from weighted_mtp.train.loop import Trainer, build_optimizer, compile_blocks, lr_lambda
from weighted_mtp.train.mtp_loss import head_denominators, mtp_forward_backward, naive_mtp_loss
from weighted_mtp.train.objectives import HeadCoefficients, MTPObjective
from weighted_mtp.train.recipes import apply_lora
from weighted_mtp.train.weighting import (
    REFERENCE_CHUNK_ROWS,
    CriticTD,
    Rho1,
    Uniform,
    reference_ce,
    release_memory,
)

AUTOCAST_RTOL = 0.02
"""bf16 keeps 8 bits of mantissa: the loss may move by well under 1%; 2% flags a real error."""

COMPILE_RTOL = {"bf16": 0.01, "fp32": 1e-4}
"""Compiled against eager loss: inductor fuses ops and keeps some bf16 intermediates in fp32
(well under 1% under bf16 autocast); in fp32 only the order of sums changes."""

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = REPO / "configs" / "production"
TORCHRUN_STEPS, TORCHRUN_SAVE_AT = 4, 2
TORCHRUN_LAUNCH_TIMEOUT_S = 240
"""One launch takes about 25 s; a hung collective fails after ``train.dist_timeout_s`` (120)."""

# Peak dense bf16 tensor FLOP/s (no sparsity) by GPU name; others need --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}

LORA_TARGETS = ["wq", "wk", "wv", "wo"]
N_HEADS = 4
KEYS = ("lora_step", "mtp_loss", "critic", "compile", "decode", "memory", "autocast", "torchrun")


# ---------------------------------------------------------------- set-up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--dim", type=int, default=4096, help="policy width (7B: 4096)")
    p.add_argument(
        "--layers", type=int, default=28, help="trunk blocks; +4 head blocks (7B: 28 + 4 = 32)"
    )
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048, help="tokens per training step (one row)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per decoder")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and decoded tokens")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5, quick 2)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: " + ",".join(KEYS))
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compile part (inductor, as train.compile; aot_eager "
        "traces without code generation)",
    )
    p.add_argument(
        "--ref-chunk-rows",
        type=int,
        default=REFERENCE_CHUNK_ROWS,
        help="rows of reference logits per chunk in the memory part's Rho-1 probe",
    )
    p.add_argument(
        "--nproc", type=int, default=None, help="torchrun ranks (default: the GPUs; 2 on a CPU)"
    )
    p.add_argument("--torchrun-worker", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--torchrun-launch", choices=("first", "resume"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.quick:
        args.new_tokens = min(args.new_tokens, 64)
    return args


def policy_args(opts: argparse.Namespace) -> ModelArgs:
    """The 7B MTP shape (Meta's 7B_1T_4: n_layers counts all 32 blocks) or a narrower one."""
    return ModelArgs(
        dim=opts.dim,
        n_layers=opts.layers + N_HEADS,
        n_heads=max(1, opts.dim // 128),
        vocab_size=opts.vocab,
        n_future_tokens=N_HEADS,
        max_seq_len=max(2048, opts.seq),
    )


def critic_args(opts: argparse.Namespace) -> ModelArgs:
    """Sheared-LLaMA 2.7B (dim 2560, 32 blocks, 20 heads, FFN 6912) at --dim 4096; scaled with
    the policy otherwise (width x 0.625, FFN x 2.7, as many blocks as the policy)."""
    dim = 2 * max(32, round(opts.dim * 0.625 / 2))
    return ModelArgs(
        dim=dim,
        n_layers=opts.layers + N_HEADS,
        n_heads=max(1, dim // 128),
        vocab_size=opts.vocab,
        ffn_hidden_dim=6912 if dim == 2560 else int(dim * 2.7),
        n_future_tokens=1,
        max_seq_len=max(2048, opts.seq),
    )


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``Transformer`` with weights drawn on ``device`` (no CPU copy of a 7B model)."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)  # no full-size fp32 copy anywhere
    model = model.to_empty(device=device)
    model.reset_rope(device)  # fp32 table, recomputed (to_empty left it uninitialised)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:  # Xavier-uniform, as models/transformer.py's init_weights
                bound = math.sqrt(6.0 / (param.shape[0] + param.shape[-1]))
                param.uniform_(-bound, bound, generator=gen)
    return model.eval()


class Device:
    """Timing and memory on the chosen device; CUDA-only calls stay behind ``self.cuda``."""

    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32  # of the random weights
        if self.cuda:
            torch.cuda.set_device(self.device.index or 0)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)

    def allocated_gib(self) -> float | None:
        return round(torch.cuda.memory_allocated() / 2**30, 3) if self.cuda else None

    @staticmethod
    def max_rss_gib() -> float:
        """This process's resident-memory high-water mark so far (Linux: KiB), all parts."""
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)

    def timed(self, fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
        """Median seconds of ``reps`` calls after ``warmup`` calls, synchronised."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def free(self) -> None:
        release_memory()


def batch_of(opts: argparse.Namespace, device: torch.device, seed: int = 0) -> Batch:
    """One row of ``--seq`` random tokens, every position a target (no prompt, no padding)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, opts.vocab, (1, opts.seq), generator=gen)
    return Batch(tokens, tokens.clone(), torch.ones_like(tokens)).to(device)


def bare_trainer(
    model: torch.nn.Module,
    objective: Any,
    dev: Device,
    config: Config | None = None,
    groups: list[dict] | None = None,
) -> Trainer:
    """A ``Trainer`` holding only what ``Trainer.step`` reads: the loop's own step code runs
    (plan, step normaliser, forward/backward under autocast, clipping, AdamW, statistics)
    without a storage tree or data stream. ``config``: the run's settings (default: the
    defaults); ``groups``: optimizer parameter groups (default: every trainable parameter)."""
    config = config or load_config(None, ["log.mlflow=false"])
    trainer = Trainer.__new__(Trainer)
    trainer.config, trainer.device, trainer.info = config, dev.device, distributed.DistInfo()
    trainer.model = model
    trainer.recipe = type("BareRecipe", (), {"objective": objective})()
    trainer.total_steps, trainer.state = 1000, TrainState()
    params = [p for p in model.parameters() if p.requires_grad]
    trainer.optimizer = build_optimizer(groups or [{"params": params}], config.optim)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, lr_lambda(trainer.total_steps, config.optim)
    )
    trainer.autocast = dev.autocast()
    return trainer


def uniform_objective() -> MTPObjective:
    return MTPObjective(Uniform(), N_HEADS, HeadCoefficients((1.0 / N_HEADS,) * N_HEADS))


# ---------------------------------------------------------------- FLOPs


def linear_params(args: ModelArgs) -> int:
    """Matrix parameters of one block (attention + SwiGLU FFN)."""
    attn = (
        2 * args.dim * args.n_heads * args.head_dim + 2 * args.dim * args.n_kv_heads * args.head_dim
    )
    return attn + 3 * args.dim * args.hidden_dim


def lora_step_flops(args: ModelArgs, seq: int, rows: int, rank: int) -> dict:
    """FLOPs of one LoRA training step on one row of ``seq`` tokens (model FLOPs: the forward
    that activation checkpointing recomputes is not counted, so MFU is comparable with it on
    or off).

    With ``N`` = the matrix parameters of all blocks (trunk and the 4 head blocks; every head
    block reads every position), ``T`` = tokens, ``R`` = rows that reach the unembedding
    (valid targets summed over heads), ``d`` = width, ``V`` = vocabulary, ``L`` = blocks::

        base      = 2 N T (forward) + 2 N T (backward: input gradients only; the frozen
                    base gets no weight gradient)
        unembed   = 2 d V R (forward) + 2 d V R (backward, input gradients only)
        attention = L * (2 T^2 d (forward: QK^T and AV, causal half) + 4 T^2 d (backward))
        lora      = 6 r (d_in + d_out) T per adapted matrix (forward, input and weight
                    gradients), r = rank
        total     = base + unembed + attention + lora

    The embedding lookup, norms, RoPE, softmax and the optimizer are not counted.
    """
    blocks = args.n_layers
    n_params = blocks * linear_params(args)
    base = 4 * n_params * seq
    unembed = 4 * args.dim * args.vocab_size * rows
    attention = blocks * 6 * seq * seq * args.dim
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    # d_in + d_out of wq, wk, wv, wo (the LoRA targets).
    sides = (args.dim + q) + 2 * (args.dim + kv) + (q + args.dim)
    lora = blocks * 6 * rank * sides * seq
    total = base + unembed + attention + lora
    return {"base": base, "unembed": unembed, "attention": attention, "lora": lora,
            "total": total, "matrix_params": n_params}  # fmt: skip


def peak_flops(opts: argparse.Namespace, dev: Device) -> tuple[float | None, str]:
    if opts.peak_tflops:
        return opts.peak_tflops * 1e12, "--peak-tflops"
    if not dev.cuda:
        return None, "no peak for a CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(dev.device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s bf16 dense"
    return None, f"{name}: unknown peak (pass --peak-tflops)"


# ---------------------------------------------------------------- the parts


def measure_decode(model: Transformer, opts: argparse.Namespace, dev: Device) -> dict:
    from weighted_mtp.evaluation.generate import generate, speculative_generate

    prompt = batch_of(opts, torch.device("cpu"), seed=5).tokens[0, :128].tolist()
    new = opts.new_tokens
    saved = model.norm.weight.detach().clone()
    with torch.no_grad():
        model.norm.weight.zero_()  # every head's logits 0: argmax token 0 everywhere
    try:
        plain_out: list = []
        spec_out: list = []

        def plain() -> None:
            plain_out[:] = generate(model, [prompt], new, eos_id=-1)[0]

        def spec() -> None:
            out, stats = speculative_generate(model, prompt, new, eos_id=-1)
            spec_out[:] = [out, stats]

        reps = 1 if opts.quick else 2
        plain_s = dev.timed(plain, reps)
        spec_s = dev.timed(spec, reps)
    finally:
        with torch.no_grad():
            model.norm.weight.copy_(saved)
    out, stats = spec_out
    return {
        "new_tokens": new,
        "greedy_tokens_per_s": round(len(plain_out) / plain_s, 2),
        "speculative_tokens_per_s": round(len(out) / spec_s, 2),
        "speedup": round((len(out) / spec_s) / (len(plain_out) / plain_s), 3),
        "tokens_per_step": round(stats.tokens_per_step, 3),
        "acceptance": [round(a, 3) for a in stats.acceptance],
        "same_output": out == plain_out,
    }


def measure_lora_step(model: Transformer, opts: argparse.Namespace, dev: Device) -> dict:
    args = model.args
    batch = batch_of(opts, dev.device)
    rows = sum(max(0, opts.seq - k) for k in range(1, N_HEADS + 1))
    flops = lora_step_flops(args, opts.seq, rows, opts.rank)
    peak, peak_source = peak_flops(opts, dev)
    out: dict[str, Any] = {
        "tokens": opts.seq,
        "flops_per_step": flops,
        "peak_flops_source": peak_source,
    }
    for label, ckpt in (("ckpt_off", False), ("ckpt_on", True)):
        model.activation_checkpointing = ckpt
        trainer = bare_trainer(model, uniform_objective(), dev)
        trainer.step([batch])  # warm-up (allocator, kernels, optimizer state)
        dev.reset_peak()
        seconds = dev.timed(lambda t=trainer: t.step([batch]), opts.reps, warmup=0)
        metrics = trainer.step([batch])
        out[label] = {
            "step_s": round(seconds, 4),
            "tokens_per_s": round(opts.seq / seconds, 1),
            "mfu": round(flops["total"] / seconds / peak, 4) if peak else None,
            "peak_gib": dev.peak_gib(),
            "loss": round(metrics["loss"], 4),
        }
        del trainer
        model.zero_grad(set_to_none=True)
        dev.free()
    model.activation_checkpointing = False
    return out


def measure_mtp_loss(model: Transformer, opts: argparse.Namespace, dev: Device) -> dict:
    batch = batch_of(opts, dev.device, seed=1)
    coefs = [1.0 / N_HEADS] * N_HEADS
    dens = head_denominators(batch.labels, None, N_HEADS)
    out: dict[str, Any] = {}
    for name in ("naive", "ours"):

        def step(name: str = name) -> None:
            with dev.autocast():
                if name == "naive":
                    naive_mtp_loss(model, batch.tokens, batch.labels, None, dens, coefs).backward()
                else:
                    mtp_forward_backward(model, batch.tokens, batch.labels, None, dens, coefs)

        step()
        dev.free()
        base = dev.allocated_gib()
        dev.reset_peak()
        seconds = dev.timed(step, opts.reps, warmup=0)
        peak = dev.peak_gib()
        out[name] = {
            "time_s": round(seconds, 4),
            "peak_gib": peak,
            "peak_above_start_gib": round(peak - base, 3) if peak is not None else None,
        }
        model.zero_grad(set_to_none=True)
        dev.free()
    out["time_ratio_vs_naive"] = round(out["ours"]["time_s"] / out["naive"]["time_s"], 3)
    if dev.cuda:
        out["peak_ratio_vs_naive"] = round(
            out["ours"]["peak_above_start_gib"] / out["naive"]["peak_above_start_gib"], 3
        )
    return out


def measure_critic(model: Transformer, opts: argparse.Namespace, dev: Device) -> dict:
    from weighted_mtp.models.value import ValueModel

    cargs = critic_args(opts)
    backbone = random_model(cargs, dev.device, torch.bfloat16 if dev.cuda else torch.float32, 2)
    critic = ValueModel(backbone).eval()
    critic.requires_grad_(False)
    batch = batch_of(opts, dev.device, seed=2)
    out: dict[str, Any] = {
        "critic_shape": {"dim": cargs.dim, "blocks": cargs.n_layers, "ffn": cargs.hidden_dim},
        "critic_params": sum(p.numel() for p in critic.parameters()),
    }

    def step_peak(weighting: CriticTD, label: str) -> None:
        objective = MTPObjective(weighting, N_HEADS, HeadCoefficients((1.0 / N_HEADS,) * N_HEADS))
        trainer = bare_trainer(model, objective, dev)
        trainer.step([batch])  # warm-up
        dev.reset_peak()
        start = time.perf_counter()
        trainer.step([batch])
        dev.sync()
        out[label] = {"peak_gib": dev.peak_gib(), "step_s": round(time.perf_counter() - start, 4)}
        del trainer
        model.zero_grad(set_to_none=True)

    step_peak(CriticTD(CriticTDConfig(), helper_model=critic), "resident")
    with torch.no_grad(), dev.autocast():  # what CriticTD.prepare does, for this one batch
        values = critic(batch.tokens).float()
    batch.extras["values"] = values
    del critic, backbone
    dev.free()
    step_peak(CriticTD(CriticTDConfig(), helper_model=None), "precomputed")
    if dev.cuda:
        out["peak_saved_gib"] = round(
            out["resident"]["peak_gib"] - out["precomputed"]["peak_gib"], 3
        )
    return out


def measure_autocast(opts: argparse.Namespace, dev: Device) -> dict:
    from weighted_mtp.storage.micro import micro_args

    args = micro_args("mtp")
    model = random_model(args, dev.device, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(3, args.vocab_size, (2, 64 if opts.quick else 256), generator=gen)
    labels = tokens.clone()
    labels[:, : tokens.shape[1] // 4] = IGNORE_INDEX
    batch = Batch(tokens, labels, torch.ones_like(tokens)).to(dev.device)
    objective = uniform_objective()
    kind = "cuda" if dev.cuda else "cpu"
    losses = {}
    for name, ctx in (
        ("fp32", contextlib.nullcontext()),
        ("bf16_autocast", torch.autocast(kind, dtype=torch.bfloat16)),
    ):
        plan = objective.plan(batch, 0, training=False)
        with torch.no_grad(), ctx:
            loss, _ = objective.forward_backward(model, plan, None, backward=False)
        losses[name] = float(loss)
    rel = abs(losses["bf16_autocast"] - losses["fp32"]) / abs(losses["fp32"])
    return {**{k: round(v, 6) for k, v in losses.items()}, "relative_difference": round(rel, 6),
            "tolerance": AUTOCAST_RTOL, "within_tolerance": rel <= AUTOCAST_RTOL}  # fmt: skip


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """``torch.compile`` with ``backend`` while ``compile_blocks`` (which names none) runs."""
    original = torch.compile
    if backend != "inductor":
        torch.compile = lambda fn, **kw: original(fn, **{"backend": backend, **kw})
    try:
        yield
    finally:
        torch.compile = original


def measure_compile(model: Transformer, opts: argparse.Namespace, dev: Device) -> dict:
    """Two steps eager, then the same two steps from the same LoRA weights with the blocks
    compiled by ``compile_blocks`` (``train.compile``); the blocks are restored afterwards."""
    batch = batch_of(opts, dev.device, seed=6)
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]
    blocks = [*model.layers, *model.extra_heads]
    model.activation_checkpointing = False

    def restore() -> None:
        with torch.no_grad():
            for param, value in zip(trainable, saved, strict=True):
                param.copy_(value)
        model.zero_grad(set_to_none=True)

    def two_steps() -> list[tuple[float, float]]:
        trainer = bare_trainer(model, uniform_objective(), dev)
        out = []
        for _ in range(2):
            dev.sync()
            start = time.perf_counter()
            loss = trainer.step([batch])["loss"]
            dev.sync()
            out.append((time.perf_counter() - start, loss))
        return out

    eager = two_steps()
    restore()
    torch._dynamo.reset()
    try:
        with compile_backend(opts.compile_backend):
            compiled_blocks = compile_blocks(model)
        compiled = two_steps()
    finally:
        for block in blocks:  # compile_blocks set an instance attribute: back to the class's
            block.__dict__.pop("forward", None)
        torch._dynamo.reset()
        restore()
    tolerance = COMPILE_RTOL["bf16" if dev.cuda else "fp32"]
    rel = [abs(c[1] - e[1]) / abs(e[1]) for c, e in zip(compiled, eager, strict=True)]
    return {
        "backend": opts.compile_backend,
        "compiled_blocks": compiled_blocks,
        "tokens": opts.seq,
        "first_step_s": round(compiled[0][0], 3),
        "second_step_s": round(compiled[1][0], 4),
        "eager_step_s": round(eager[1][0], 4),
        "speedup_vs_eager": round(eager[1][0] / compiled[1][0], 3),
        "losses": [round(c[1], 6) for c in compiled],
        "eager_losses": [round(e[1], 6) for e in eager],
        "relative_difference": round(max(rel), 8),
        "tolerance": tolerance,
        "within_tolerance": max(rel) <= tolerance,
    }


# ---- memory at the production micro-batch shapes ----


def production_config(name: str) -> Config:
    return load_config(PRODUCTION / f"{name}.yaml", ["log.mlflow=false"])


def rows_of(opts: argparse.Namespace, rows: int, device: torch.device, seed: int) -> Batch:
    """``rows`` rows of ``--seq`` random tokens, every position a target."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, opts.vocab, (rows, opts.seq), generator=gen)
    return Batch(tokens, tokens.clone(), torch.ones_like(tokens)).to(device)


def production_policy(config: Config, opts: argparse.Namespace, dev: Device) -> Transformer:
    """The policy at the script's shape with the config's LoRA and activation checkpointing."""
    model = random_model(policy_args(opts), dev.device, dev.dtype)
    torch.manual_seed(0)
    apply_lora(model, config.lora)
    model.activation_checkpointing = config.model.activation_checkpointing
    return model.train()


def probe_steps(trainer: Trainer, micro: list, dev: Device, label: str) -> dict:
    """Two steps of ``micro``: the peak over both (the first creates AdamW's state) and the
    second's seconds."""
    dev.free()
    start_gib = dev.allocated_gib()
    dev.reset_peak()
    times, metrics = [], {}
    for _ in range(2):
        dev.sync()
        start = time.perf_counter()
        metrics = trainer.step(micro)
        dev.sync()
        times.append(time.perf_counter() - start)
    print(f"   memory {label}: {times[-1]:.3f} s/step, peak {dev.peak_gib()} GiB", file=sys.stderr)
    return {"peak_gib": dev.peak_gib(), "allocated_before_gib": start_gib,
            "max_rss_gib": dev.max_rss_gib(), "step_s": round(times[-1], 4),
            "first_step_s": round(times[0], 4), "loss": round(metrics["loss"], 4)}  # fmt: skip


def probe_baseline(opts: argparse.Namespace, dev: Device) -> dict:
    config = production_config("baseline")
    model = production_policy(config, opts, dev)
    rows = config.train.batch_size
    objective = MTPObjective(
        Uniform(), N_HEADS, HeadCoefficients.from_config(config.train, N_HEADS)
    )
    trainer = bare_trainer(model, objective, dev, config)
    out = {"rows": rows, "seq": opts.seq, "lora_rank": config.lora.rank,
           "activation_checkpointing": model.activation_checkpointing}  # fmt: skip
    out.update(probe_steps(trainer, [rows_of(opts, rows, dev.device, 11)], dev, "baseline"))
    return out


def probe_rho1(opts: argparse.Namespace, dev: Device) -> dict:
    """The reference's CE (chunked vs one chunk), then the Rho-1 policy step with the
    reference resident and with its CE precomputed."""
    config = production_config("rho1")
    rows = config.train.batch_size
    batch = rows_of(opts, rows, dev.device, 12)
    reference = random_model(critic_args(opts), dev.device, dev.dtype, seed=4)  # 2.7B shape
    reference.requires_grad_(False)
    seen: list[int] = []  # rows of each call of the reference's output layer
    hook = reference.output.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    params = sum(p.numel() for p in reference.parameters())
    out: dict[str, Any] = {"rows": rows, "seq": opts.seq, "reference_params": params}
    ce = {}
    for label, chunk in (("chunked", opts.ref_chunk_rows), ("one_chunk", rows * opts.seq)):
        seen.clear()
        dev.free()
        base = dev.allocated_gib()
        dev.reset_peak()
        start = time.perf_counter()
        ce[label] = reference_ce(reference, batch.tokens, batch.labels, chunk)
        dev.sync()
        peak = dev.peak_gib()
        out[f"reference_ce_{label}"] = {
            "chunk_rows": chunk, "time_s": round(time.perf_counter() - start, 4),
            "max_rows_per_output_call": max(seen), "output_calls": len(seen),
            "peak_above_start_gib": round(peak - base, 3) if peak is not None else None,
        }  # fmt: skip
    hook.remove()
    out["reference_ce_max_abs_diff"] = float((ce["chunked"] - ce["one_chunk"]).abs().max())
    batch_ref = ce["chunked"]
    del ce
    model = production_policy(config, opts, dev)
    coefs = HeadCoefficients.from_config(config.train, N_HEADS)
    resident = Rho1(config.weighting.rho1, helper_model=reference, chunk_rows=opts.ref_chunk_rows)
    trainer = bare_trainer(model, MTPObjective(resident, N_HEADS, coefs), dev, config)
    out["resident"] = probe_steps(trainer, [batch], dev, "rho1 resident")
    del trainer, resident, reference
    model.zero_grad(set_to_none=True)
    dev.free()
    batch.extras["ref_ce"] = batch_ref  # what Rho1.prepare leaves with precompute: true
    precomputed = Rho1(config.weighting.rho1, helper_model=None)
    trainer = bare_trainer(model, MTPObjective(precomputed, N_HEADS, coefs), dev, config)
    out["precomputed"] = probe_steps(trainer, [batch], dev, "rho1 precomputed")
    if dev.cuda:
        out["peak_saved_gib"] = round(
            out["resident"]["peak_gib"] - out["precomputed"]["peak_gib"], 3
        )
    return out


def probe_critic(opts: argparse.Namespace, dev: Device) -> dict:
    """The ``critic`` recipe's step: a value model (the reference's 2.7B shape, the config's
    value head, LoRA and checkpointing) on ``batch_size`` pairs, pairwise loss."""
    from weighted_mtp.models.value import ValueHeadConfig, ValueModel
    from weighted_mtp.train.value_objectives import CriticObjective

    config = production_config("critic")
    crit = config.critic
    backbone = random_model(critic_args(opts), dev.device, dev.dtype, seed=5)
    head = ValueHeadConfig(crit.head_type, None, crit.head_dropout, crit.bias_init)
    model = ValueModel(backbone, head)
    torch.manual_seed(0)
    if config.lora.enabled and crit.train_backbone:
        apply_lora(model.backbone, config.lora)
    else:
        model.backbone.requires_grad_(False)
    model.head.requires_grad_(True)
    model.backbone.activation_checkpointing = config.model.activation_checkpointing
    model.train()
    objective = CriticObjective(
        loss=crit.loss, coef=crit.loss_coef,
        regression="mse" if crit.huber_delta is None else "huber",
        huber_delta=crit.huber_delta or 0.5,
    )  # fmt: skip
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n.startswith("head.")], "lr": crit.head_lr},
              {"params": [p for n, p in trainable if not n.startswith("head.")]}]  # fmt: skip
    trainer = bare_trainer(model, objective, dev, config, groups)
    pairs = config.train.batch_size
    pair = PairBatch(rows_of(opts, pairs, dev.device, 13), rows_of(opts, pairs, dev.device, 14))
    out = {"pairs": pairs, "rows": 2 * pairs, "seq": opts.seq, "objective": crit.loss,
           "value_model_params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    out.update(probe_steps(trainer, [pair], dev, "critic"))
    return out


def measure_memory(opts: argparse.Namespace, dev: Device, errors: dict) -> dict:
    """Each production shape on its own: one that fails (e.g. out of memory) is reported under
    ``errors["memory.<name>"]`` and null here, and the others still run."""
    out: dict[str, Any] = {}
    for name, probe in (
        ("baseline", probe_baseline),
        ("rho1", probe_rho1),
        ("critic", probe_critic),
    ):
        try:
            out[name] = probe(opts, dev)
        except Exception as err:
            traceback.print_exc()
            errors[f"memory.{name}"] = one_line(err)
            out[name] = None
        finally:
            dev.free()
    return out


def make_tiny_storage(root: Path) -> None:
    """Micro-sized models (64 wide, vocab 1000) and the bundled datasets, as the tests build."""
    import sysconfig

    from weighted_mtp.base.layout import StorageLayout
    from weighted_mtp.models import save_model
    from weighted_mtp.models.tokenizer import train_local_tokenizer
    from weighted_mtp.models.transformer import init_weights
    from weighted_mtp.storage import datasets
    from weighted_mtp.storage.dataset_sources import materialise_bundled
    from weighted_mtp.storage.tokenizer_folder import write_tokenizer_folder

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokenizer = root / "tokenizer.model"
    files = [stdlib / n for n in ("textwrap.py", "argparse.py", "json/decoder.py", "string.py")]
    train_local_tokenizer(tokenizer, vocab_size=1000, files=files)
    layout = StorageLayout(root / "storage")
    args = ModelArgs(dim=64, n_layers=7, n_heads=4, vocab_size=1000, ffn_hidden_dim=96,
                     n_future_tokens=4, max_seq_len=1024)  # fmt: skip
    model = Transformer(args)
    init_weights(model, seed=1)
    save_model(model, layout.model("micro-mtp").root)
    write_tokenizer_folder(tokenizer, layout.model("micro-mtp"))
    source = materialise_bundled(root / "bundled")  # never the Hub, even with a network
    datasets.run(layout, ["codecontests"], ["process", "metadata", "small"], source, workers=1)


def torchrun_overrides(device_name: str) -> list[str]:
    """The baseline recipe on the tiny storage, as a GPU node runs it: bf16 base model, FSDP2
    bf16 mixed precision, activation checkpointing, LoRA dropout, gradient accumulation,
    validation, a checkpoint every 2 steps and resume on."""
    return [
        "experiment=gpu_check", "run_name=torchrun", "train.recipe=baseline",
        "model.path=micro-mtp", "model.dtype=bfloat16", "model.activation_checkpointing=true",
        "lora.dropout=0.05", f"train.device={device_name}", "train.batch_size=2",
        "train.grad_accum=2", f"train.max_steps={TORCHRUN_STEPS}", "train.epochs=100",
        "train.fsdp_param_dtype=bfloat16", "train.dist_timeout_s=120", "data.small=true",
        "data.max_length=512", "data.sampling.n_samples=16", "data.sampling.val_n_samples=4",
        "log.every=1", f"log.val_every={TORCHRUN_SAVE_AT}", "log.mlflow=false",
        f"checkpoint.every={TORCHRUN_SAVE_AT}", "checkpoint.resume=true",
    ]  # fmt: skip


def worker_error(output: str) -> str:
    """The last exception line a worker printed (torchrun's own summary comes after it)."""
    lines = [
        line.strip() for line in output.splitlines()
        if re.match(r"(\[rank\d+\]:)?\s*[\w.]*(Error|Exception)\b", line)
        and "ChildFailedError" not in line
    ]  # fmt: skip
    return lines[-1][:300] if lines else output.strip().splitlines()[-1][:300]


def measure_torchrun(opts: argparse.Namespace, dev: Device) -> dict:
    nproc = opts.nproc or (max(1, torch.cuda.device_count()) if dev.cuda else 2)
    with tempfile.TemporaryDirectory(prefix="wmtp-gpu-check-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            make_tiny_storage(root)
        out: dict[str, Any] = {"storage_setup_s": round(time.perf_counter() - start, 1)}
        launches = {}
        for launch in ("first", "resume"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", str(Path(__file__).resolve()),
                   "--device", dev.device.type, "--torchrun-worker", str(root),
                   "--torchrun-launch", launch]  # fmt: skip
            start = time.perf_counter()
            run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)  # fmt: skip
            try:
                stdout, stderr = run.communicate(timeout=TORCHRUN_LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)  # torchrun and its workers: our session
                run.communicate()
                raise RuntimeError(
                    f"{launch} launch ran past {TORCHRUN_LAUNCH_TIMEOUT_S} s"
                ) from None
            seconds = round(time.perf_counter() - start, 1)
            if run.returncode != 0:
                print(stdout[-3000:], stderr[-6000:], sep="\n", file=sys.stderr)
                raise RuntimeError(f"{launch} launch exited {run.returncode}: "
                                   f"{worker_error(stdout + stderr)}")  # fmt: skip
            launches[launch] = {**json.loads((root / f"torchrun_{launch}.json").read_text()),
                                "seconds": seconds}  # fmt: skip
    first, resume = launches["first"], launches["resume"]
    losses = {**first.pop("losses"), **resume.pop("losses")}
    val = {**first.pop("val_ce"), **resume.pop("val_ce")}
    values = [*losses.values(), *val.values()]
    out.update({
        "backend": first["backend"], "world": first["world"], "nproc_per_node": nproc,
        "fsdp2_sharded": first["fsdp2_sharded"] and resume["fsdp2_sharded"],
        "losses": [losses[k] for k in sorted(losses, key=int)],
        "val_ce": {k: val[k] for k in sorted(val, key=int)},
        "finite": bool(values) and all(math.isfinite(x) for x in values),
        "resumed": first["start_step"] == 0 and first["end_step"] == TORCHRUN_SAVE_AT
        and resume["start_step"] == TORCHRUN_SAVE_AT and resume["end_step"] == TORCHRUN_STEPS,
        "launches": launches, "torchrun_s": round(sum(x["seconds"] for x in launches.values()), 1),
    })  # fmt: skip
    return out


class StopAfterCheckpoint(Exception):
    """Ends the first launch right after its step-``TORCHRUN_SAVE_AT`` checkpoint."""


def torchrun_worker(root: Path, device_name: str, launch: str) -> None:
    """Inside torchrun: ``train()`` of the baseline recipe, interrupted after the step-2
    checkpoint (``first``) or resumed from it to the end (``resume``); rank 0 writes what it
    saw to ``torchrun_<launch>.json``."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from weighted_mtp.base.layout import StorageLayout
    from weighted_mtp.train import loop

    seen: dict[str, Any] = {"losses": {}, "val_ce": {}}
    if distributed.env_info().world == 1:  # no group without torchrun's world > 1: make it

        class OneRankGroup(distributed.DistInfo):
            @property
            def enabled(self) -> bool:  # a group exists: take the torchrun path (FSDP2)
                return True

        def init_one_rank(device: torch.device, timeout_s: float | None = None) -> OneRankGroup:
            kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
            if timeout_s is not None:
                kwargs["timeout"] = dt.timedelta(seconds=timeout_s)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
            return OneRankGroup(0, 1, 0)

        distributed.init = init_one_rank

    class CheckedTrainer(loop.Trainer):
        def maybe_resume(self) -> None:
            super().maybe_resume()
            sharded = isinstance(self.model, FSDPModule)
            seen.update(start_step=self.state.step, backend=dist.get_backend(),
                        world=dist.get_world_size(), fsdp2_sharded=sharded)  # fmt: skip

        def step(self, micro: list) -> dict[str, float]:
            metrics = super().step(micro)
            seen["losses"][str(self.state.step + 1)] = metrics["loss"]
            return metrics

        def validate(self) -> dict[str, float]:
            metrics = super().validate()
            seen["val_ce"][str(self.state.step)] = metrics.get("val/ce", math.nan)
            return metrics

        def save(self, name: str) -> Path:
            path = super().save(name)
            seen["end_step"] = self.state.step
            if launch == "first" and name == f"step_{TORCHRUN_SAVE_AT:08d}":
                raise StopAfterCheckpoint(path)
            return path

    loop.Trainer = CheckedTrainer  # train() builds its Trainer from the module
    config = load_config(None, torchrun_overrides(device_name))
    start = time.perf_counter()
    with contextlib.suppress(StopAfterCheckpoint):  # the first launch's planned interruption
        loop.train(config, StorageLayout(root / "storage"))
    seen["train_s"] = round(time.perf_counter() - start, 1)  # the rest of a launch: start-up
    if distributed.env_info().is_main:
        (root / f"torchrun_{launch}.json").write_text(json.dumps(seen))


# ---------------------------------------------------------------- main


PART_SECONDS: dict[str, float] = {}


def one_line(err: BaseException) -> str:
    """``Type: the message's first line`` (300 characters at most)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def run_part(name: str, fn: Callable[[], dict], results: dict, errors: dict, dev: Device) -> None:
    print(f"-- {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # one failure must not lose the other parts
        traceback.print_exc()
        errors[name] = one_line(err)
        results[name] = None
    finally:
        if dev.cuda:
            torch.cuda.empty_cache()
    PART_SECONDS[name] = round(time.perf_counter() - start, 1)
    print(f"-- {name}: {PART_SECONDS[name]} s", file=sys.stderr, flush=True)


def table(results: dict, errors: dict) -> list[str]:
    lines = []

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<58} {value}")

    step = results.get("lora_step")
    if step:
        for label in ("ckpt_off", "ckpt_on"):
            r = step[label]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            row(f"LoRA step, activation checkpointing {label[5:]}",
                f"{r['tokens_per_s']:.0f} tok/s, MFU {mfu}, peak {r['peak_gib']} GiB")  # fmt: skip
        row("  FLOPs per step (model FLOPs)", f"{step['flops_per_step']['total']:.3e}")
    loss = results.get("mtp_loss")
    if loss:
        row("MTP loss fwd+bwd, ours vs naive: time", f"{loss['ours']['time_s']} s vs "
            f"{loss['naive']['time_s']} s ({loss['time_ratio_vs_naive']}x)")  # fmt: skip
        if "peak_ratio_vs_naive" in loss:
            row("MTP loss: peak above start", f"{loss['ours']['peak_above_start_gib']} GiB vs "
                f"{loss['naive']['peak_above_start_gib']} GiB ({loss['peak_ratio_vs_naive']}x)")  # fmt: skip
    critic = results.get("critic")
    if critic:
        row("critic_td step peak: critic resident vs precomputed",
            f"{critic['resident']['peak_gib']} GiB vs {critic['precomputed']['peak_gib']} GiB")  # fmt: skip
    decode = results.get("decode")
    if decode:
        row("decoding: greedy vs speculative (acceptance forced to 1)",
            f"{decode['greedy_tokens_per_s']} vs {decode['speculative_tokens_per_s']} tok/s "
            f"({decode['speedup']}x, {decode['tokens_per_step']} tokens/step)")  # fmt: skip
    auto = results.get("autocast")
    if auto:
        row("micro model loss: bf16 autocast vs fp32",
            f"{auto['bf16_autocast']} vs {auto['fp32']} (rel {auto['relative_difference']}, "
            f"within {auto['tolerance']}: {auto['within_tolerance']})")  # fmt: skip
    comp = results.get("compile")
    if comp:
        row(f"compiled step ({comp['backend']}): first (compiling), next, eager",
            f"{comp['first_step_s']} s, {comp['second_step_s']} s, {comp['eager_step_s']} s; "
            f"loss rel diff {comp['relative_difference']} (within {comp['tolerance']}: "
            f"{comp['within_tolerance']})")  # fmt: skip
    memory = results.get("memory") or {}
    for name, probe in memory.items():
        if not probe:
            continue
        rows = f"{probe['pairs']} pairs" if "pairs" in probe else probe["rows"]
        shape = f"{rows} x {probe['seq']}"
        steps = [("", probe)] if "step_s" in probe else [
            (f" ({k})", probe[k]) for k in ("resident", "precomputed") if probe.get(k)
        ]  # fmt: skip
        for label, r in steps:
            peak = (
                r["peak_gib"] if r["peak_gib"] is not None else f"n/a (max RSS {r['max_rss_gib']})"
            )
            row(f"memory: {name}{label} step, {shape}", f"peak {peak} GiB, {r['step_s']} s/step")
        if "reference_ce_chunked" in probe:
            c, o = probe["reference_ce_chunked"], probe["reference_ce_one_chunk"]
            row("  reference CE peak above start: chunked vs one chunk",
                f"{c['peak_above_start_gib']} vs {o['peak_above_start_gib']} GiB, "
                f"max |diff| {probe['reference_ce_max_abs_diff']:.2e}")  # fmt: skip
    tr = results.get("torchrun")
    if tr:
        row(f"torchrun x{tr['world']} ({tr['backend']}): 2 + 2 steps, resumed {tr['resumed']}",
            f"losses {[round(x, 4) for x in tr['losses']]}, FSDP2 {tr['fsdp2_sharded']}, "
            f"{tr['torchrun_s']} s")  # fmt: skip
    for name, message in errors.items():
        row(f"FAILED {name}", message)
    return lines


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.torchrun_worker:
        torchrun_worker(Path(opts.torchrun_worker), opts.device, opts.torchrun_launch or "first")
        return 0
    dev = Device(opts.device)
    skip = {s for s in opts.skip.split(",") if s}
    started = time.perf_counter()
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    args = policy_args(opts)
    dtype = torch.bfloat16 if dev.cuda else torch.float32
    header = {
        "device": torch.cuda.get_device_name(dev.device) if dev.cuda else "cpu",
        "torch": torch.__version__,
        "shape": {
            "dim": args.dim,
            "blocks": args.n_layers,
            "trunk_blocks": args.n_layers - N_HEADS,
            "heads": N_HEADS,
            "attention_heads": args.n_heads,
            "ffn": args.hidden_dim,
            "vocab": args.vocab_size,
            "seq": opts.seq,
            "lora_rank": opts.rank,
            "dtype": str(dtype).removeprefix("torch."),
        },
    }
    print(f"gpu_check: {header['device']}, {header['shape']}", file=sys.stderr, flush=True)
    model = None
    try:
        model = random_model(args, dev.device, dtype)
        header["policy_params"] = sum(p.numel() for p in model.parameters())
        header["policy_weights_gib"] = dev.allocated_gib()
    except Exception as err:
        traceback.print_exc()
        errors["policy"] = f"{type(err).__name__}: {err}"[:300]
    if model is not None:
        if "decode" not in skip:
            run_part("decode", lambda: measure_decode(model, opts, dev), results, errors, dev)
        torch.manual_seed(0)
        apply_lora(model, LoraConfig(rank=opts.rank, alpha=2 * opts.rank, targets=LORA_TARGETS))
        model.train()
        for name, fn in (
            ("lora_step", measure_lora_step),
            ("mtp_loss", measure_mtp_loss),
            ("critic", measure_critic),
            ("compile", measure_compile),
        ):
            if name not in skip:
                run_part(name, lambda fn=fn: fn(model, opts, dev), results, errors, dev)
        del model
        dev.free()
    if "memory" not in skip:  # after the policy above is freed: each probe builds its models
        run_part("memory", lambda: measure_memory(opts, dev, errors), results, errors, dev)
    if "autocast" not in skip:
        run_part("autocast", lambda: measure_autocast(opts, dev), results, errors, dev)
    if "torchrun" not in skip:
        run_part("torchrun", lambda: measure_torchrun(opts, dev), results, errors, dev)
    for name in KEYS:
        results.setdefault(name, None)
    total = round(time.perf_counter() - started, 1)
    print("\n".join(table(results, errors)))
    print(f"total {total} s")
    print(json.dumps({**header, **results, "errors": errors, "part_seconds": PART_SECONDS,
                      "seconds": total}))  # fmt: skip
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
