"""The prepared GPU check (``benchmarks/gpu_check.py``) on the CPU at a small width: every part
runs (the compiled step through ``aot_eager``: inductor's code generation alone takes about 30 s
on 2 cores), the JSON line has its keys and sane values, and the FLOP count matches the model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks/gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_flop_count_uses_the_models_own_matrices(kv_heads):
    """``lora_step_flops``' N and LoRA sizes are those of the model's own matrices (also with
    grouped-query attention)."""
    import dataclasses

    from weighted_mtp.config import LoraConfig
    from weighted_mtp.models.transformer import Transformer
    from weighted_mtp.train.recipes import apply_lora

    gpu_check = load_script()
    opts = gpu_check.parse_args(["--dim", "128", "--layers", "2", "--vocab", "500"])
    args = gpu_check.policy_args(opts)
    if kv_heads:
        args = dataclasses.replace(args, n_heads=4, n_kv_heads=kv_heads)
    model = Transformer(args)
    blocks = [*model.layers, *model.extra_heads]
    assert len(blocks) == args.n_layers == 6
    matrices = sum(
        m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)
    )
    seq, rows, rank = 64, 64 * 4 - 10, 8
    flops = gpu_check.lora_step_flops(args, seq, rows, rank)
    assert flops["matrix_params"] == matrices
    assert flops["base"] == 4 * matrices * seq
    assert flops["unembed"] == 4 * args.dim * args.vocab_size * rows
    assert flops["attention"] == args.n_layers * 6 * seq * seq * args.dim
    apply_lora(model, LoraConfig(rank=rank, targets=gpu_check.LORA_TARGETS))
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora > 0
    assert flops["lora"] == 6 * lora * seq  # 2 FLOPs per LoRA weight and token, three passes
    assert flops["total"] == sum(flops[k] for k in ("base", "unembed", "attention", "lora"))


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_run_reports_every_part(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--dim", "128", "--layers", "1",
           "--seq", "64", "--vocab", "1000", "--new-tokens", "16", "--quick", "--reps", "1",
           "--compile-backend", "aot_eager", "--ref-chunk-rows", "256"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"),
           "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    gpu_check = load_script()
    assert set(result["part_seconds"]) == set(gpu_check.KEYS) == {
        "lora_step", "mtp_loss", "critic", "compile", "decode", "memory", "autocast", "torchrun"
    }  # fmt: skip
    assert {"device", "shape", "policy_params", *gpu_check.KEYS, "part_seconds",
            "seconds"} <= result.keys()  # fmt: skip
    assert result["shape"] == {"dim": 128, "blocks": 5, "trunk_blocks": 1, "heads": 4,
                               "attention_heads": 1, "ffn": 512, "vocab": 1000, "seq": 64,
                               "lora_rank": 8, "dtype": "float32"}  # fmt: skip

    step = result["lora_step"]
    for label in ("ckpt_off", "ckpt_on"):
        r = step[label]
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
        assert r["mfu"] is None and r["peak_gib"] is None  # no peak FLOP/s or CUDA memory on a CPU
        assert 0 < r["loss"] < 10  # ln(1000) = 6.9 for random logits
    # Checkpointing recomputes, it does not change the function: the same loss.
    assert step["ckpt_on"]["loss"] == pytest.approx(step["ckpt_off"]["loss"], rel=1e-3)
    assert step["flops_per_step"]["total"] > step["flops_per_step"]["base"] > 0

    loss = result["mtp_loss"]
    assert loss["ours"]["time_s"] > 0 and loss["naive"]["time_s"] > 0
    assert loss["time_ratio_vs_naive"] == pytest.approx(
        loss["ours"]["time_s"] / loss["naive"]["time_s"], rel=0.01
    )
    critic = result["critic"]
    assert critic["critic_shape"]["dim"] == 80 and critic["critic_params"] > 0
    assert critic["resident"]["step_s"] > 0 and critic["precomputed"]["step_s"] > 0

    decode = result["decode"]
    # The zeroed norm forces every draft to be accepted: 4 tokens per step but the prefill's 1.
    assert decode["acceptance"] == [1.0, 1.0, 1.0] and decode["same_output"] is True
    assert 3.0 <= decode["tokens_per_step"] <= 4.0
    assert decode["greedy_tokens_per_s"] > 0 and decode["speculative_tokens_per_s"] > 0

    auto = result["autocast"]
    assert auto["within_tolerance"] is True and auto["relative_difference"] <= auto["tolerance"]

    compiled = result["compile"]
    assert compiled["backend"] == "aot_eager" and compiled["compiled_blocks"] == 5
    assert compiled["first_step_s"] > 0 and compiled["second_step_s"] > 0
    assert compiled["within_tolerance"] is True and compiled["tolerance"] == 1e-4
    assert compiled["losses"] == pytest.approx(compiled["eager_losses"], rel=1e-4)

    memory = result["memory"]
    # The production configs' micro-batch shapes, at --seq 64 (rows from configs/production).
    assert (memory["baseline"]["rows"], memory["rho1"]["rows"]) == (12, 32)
    assert (memory["critic"]["pairs"], memory["critic"]["rows"]) == (24, 48)
    assert memory["baseline"]["lora_rank"] == 64 and memory["baseline"]["activation_checkpointing"]
    steps = [memory["baseline"], memory["rho1"]["resident"], memory["rho1"]["precomputed"],
             memory["critic"]]  # fmt: skip
    for step in steps:
        assert step["peak_gib"] is None and step["max_rss_gib"] > 0  # no CUDA: RSS beside
        assert step["step_s"] > 0 and math.isfinite(step["loss"])
    rho1 = memory["rho1"]
    chunked, whole = rho1["reference_ce_chunked"], rho1["reference_ce_one_chunk"]
    # 32 rows x 63 targets: chunks of at most 256 rows, against all 2016 rows in one call.
    assert chunked["max_rows_per_output_call"] <= 256 and chunked["output_calls"] == 8
    assert whole["max_rows_per_output_call"] == 2016 and whole["output_calls"] == 1
    assert rho1["reference_ce_max_abs_diff"] < 1e-4

    torchrun = result["torchrun"]
    assert torchrun["backend"] == "gloo" and torchrun["world"] == 2
    assert torchrun["fsdp2_sharded"] is True and torchrun["finite"] is True
    assert torchrun["resumed"] is True and len(torchrun["losses"]) == 4
    assert set(torchrun["val_ce"]) == {"2", "4"}  # validation at the checkpoint and the end
    first, resume = torchrun["launches"]["first"], torchrun["launches"]["resume"]
    assert (first["start_step"], first["end_step"]) == (0, 2)
    assert (resume["start_step"], resume["end_step"]) == (2, 4)
    assert "LoRA step, activation checkpointing off" in run.stdout
