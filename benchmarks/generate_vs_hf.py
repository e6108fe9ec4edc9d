"""Our batched ``generate`` against transformers' ``generate`` on the same weights, whole
processes side by side (docs/EVALUATION.md §1, "Decoding").

The model is the micro MTP shape (``storage.micro.micro_args("mtp")``: d 512, 8 attention
heads, FFN 1365, V 32000, 3 trunk blocks + 4 head blocks, so head 1's path is a 4-layer
LLaMA; fp32), Xavier-initialised with seed 42 (the speed does not depend on the values; on
this model the extra heads' drafts are almost never accepted, so the self-speculative figure
is its worst case: ``benchmarks/decode.py`` measures it on a model trained to agree). It is
exported twice with the project's exporter: ``hf`` (head 1 as a Llama folder, the weights
both plain decoders load) and ``meta`` (every head, for self-speculative decoding).

Then, for each batch size, in one run and alternating which side goes first, one fresh
process per side (interpreter start, imports and weight loading included):

* ``ours``: ``load_pretrained(<hf folder>)`` and ``evaluation.generate.generate``;
* ``hf``: ``AutoModelForCausalLM.from_pretrained(<hf folder>, dtype=float32)`` and its
  ``generate`` (greedy, ``use_cache``, its default dynamic cache and SDPA attention).

Both decode the same 64-token prompts (random ids, seeded, one per row) for 128 new tokens
with EOS disabled, so every row emits 128 tokens; the greedy tokens must be identical row by
row. Reported per side: the process's wall time and the generation call's tokens/s (prefill
included); the ratio is ours over hf. A third process loads the ``meta`` export and decodes
the first few prompts one at a time, plain (batch 1) and self-speculative alternating prompt
by prompt: ``speculative_generate`` decodes one prompt at a time, so its figure is set beside
the batch-1 figures. Torch runs with its default thread count on every side unless
``--threads`` is given; each process reports the count it ran with.

On a shared machine other people's work slows either side at random, so each process starts
after a second in which the machine was quiet (waiting at most ``--quiet-wait`` s), the CPU
time that other processes used during each run is measured (``/proc/stat`` less our own), and
a batch's pair is run again (``--attempts`` in all) while either side saw more than
``--max-others`` cores of it; the pair with the least is kept and every attempt is printed.

    .venv/bin/python benchmarks/generate_vs_hf.py            # batch 1, 16, 64; 128 tokens
    .venv/bin/python benchmarks/generate_vs_hf.py --quick    # batch 1, 8; 32 tokens, 1 try

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EOS_DISABLED = -1


def read_prompts(path: str) -> list[list[int]]:
    return json.loads(Path(path).read_text())


def worker_ours(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    from weighted_mtp.evaluation.generate import generate
    from weighted_mtp.models.checkpoints import load_pretrained

    if opts.threads:
        torch.set_num_threads(opts.threads)
    start = time.perf_counter()
    model = load_pretrained(opts.folder, dtype="float32")
    loaded = time.perf_counter()
    tokens = generate(model, read_prompts(opts.prompts), opts.new_tokens, eos_id=EOS_DISABLED)
    done = time.perf_counter()
    return {"load_s": loaded - start, "generate_s": done - loaded, "tokens": tokens,
            "threads": torch.get_num_threads()}  # fmt: skip


def worker_hf(opts: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if opts.threads:
        torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(opts.folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # EOS disabled: every row runs to the end
    prompts = torch.tensor(read_prompts(opts.prompts))
    loaded = time.perf_counter()
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=opts.new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    done = time.perf_counter()
    return {"load_s": loaded - start, "generate_s": done - loaded,
            "tokens": out[:, prompts.shape[1] :].tolist(), "threads": torch.get_num_threads(),
            "attention": model.config._attn_implementation}  # fmt: skip


def worker_spec(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    from weighted_mtp.evaluation.generate import generate, speculative_generate
    from weighted_mtp.models.checkpoints import load_pretrained

    if opts.threads:
        torch.set_num_threads(opts.threads)
    model = load_pretrained(opts.folder, dtype="float32")
    plain_s = spec_s = 0.0
    plain, spec, steps = [], [], 0
    proposed = [0] * (model.n_future_tokens - 1)
    accepted = list(proposed)
    for prompt in read_prompts(opts.prompts):
        start = time.perf_counter()
        plain += generate(model, [prompt], opts.new_tokens, eos_id=EOS_DISABLED)
        mid = time.perf_counter()
        tokens, stats = speculative_generate(model, prompt, opts.new_tokens, eos_id=EOS_DISABLED)
        end = time.perf_counter()
        plain_s, spec_s = plain_s + mid - start, spec_s + end - mid
        spec.append(tokens)
        steps += stats.steps
        proposed = [a + b for a, b in zip(proposed, stats.draft_proposed, strict=True)]
        accepted = [a + b for a, b in zip(accepted, stats.draft_accepted, strict=True)]
    return {"plain_s": plain_s, "spec_s": spec_s, "plain": plain, "spec": spec,
            "steps": steps, "proposed": proposed, "accepted": accepted,
            "threads": torch.get_num_threads()}  # fmt: skip


WORKERS = {"ours": worker_ours, "hf": worker_hf, "spec": worker_spec}


# ---- the driver ----


def cpu_busy() -> float | None:
    """Seconds of CPU time the whole machine has spent busy since boot (None off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_cores: float, max_wait_s: float) -> float | None:
    """Wait until the machine was busy for less than ``max_cores`` over one second (at most
    ``max_wait_s``); the load of the last second, in cores (None off Linux)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = cpu_busy()
        time.sleep(1.0)
        after = cpu_busy()
        if before is None or after is None:
            return None
        if after - before < max_cores or time.monotonic() > deadline:
            return after - before


def run_worker(side: str, folder: Path, prompts: Path, opts: argparse.Namespace) -> dict:
    """One fresh process; its figures plus the process's wall time and the CPU time the rest
    of the machine used meanwhile (other people's work on a shared CPU), in cores."""
    cmd = [sys.executable, __file__, "--worker", side, "--folder", str(folder),
           "--prompts", str(prompts), "--new-tokens", str(opts.new_tokens)]  # fmt: skip
    if opts.threads:
        cmd += ["--threads", str(opts.threads)]
    wait_for_quiet(opts.max_others, opts.quiet_wait)
    busy0, child0 = cpu_busy(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    busy1, child1 = cpu_busy(), resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    result["others_cores"] = 0.0
    if busy0 is not None and busy1 is not None:
        ours = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
        result["others_cores"] = max(0.0, (busy1 - busy0 - ours) / wall)
    return result


def run_pair(b: int, path: Path, hf_dir: Path, opts: argparse.Namespace, first: str) -> dict:
    """Both sides on batch ``b``, ``first`` first; retried (up to ``--attempts``) while
    other work on the machine took more than ``--max-others`` cores during either side; the
    attempt with the least of it is kept, every attempt is printed."""
    attempts = []
    for attempt in range(opts.attempts):
        order = (first, "hf" if first == "ours" else "ours")
        got = {side: run_worker(side, hf_dir, path, opts) for side in order}
        got["others"] = max(got["ours"]["others_cores"], got["hf"]["others_cores"])
        got["same"] = got["ours"]["tokens"] == got["hf"]["tokens"] and all(
            len(row) == opts.new_tokens for row in got["ours"]["tokens"]
        )
        attempts.append(got)
        print(f"  batch {b:3d} attempt {attempt + 1}: " + ", ".join(
            f"{s} {b * opts.new_tokens / got[s]['generate_s']:7.1f} tok/s "
            f"(process {got[s]['process_s']:.2f}s, others {got[s]['others_cores']:.2f} cores)"
            for s in order) + f"; same tokens: {got['same']}", flush=True)  # fmt: skip
        if got["others"] <= opts.max_others:
            break
    kept = min(attempts, key=lambda a: a["others"])
    kept["attempts"] = len(attempts)
    kept["all_same"] = all(a["same"] for a in attempts)
    return kept


def build_and_export(root: Path) -> tuple[Path, Path]:
    """The micro MTP model (Xavier, seed 42) exported as ``root/hf`` and ``root/meta``."""
    import torch

    from weighted_mtp.models.export import export
    from weighted_mtp.models.transformer import Transformer, init_weights
    from weighted_mtp.storage.micro import micro_args

    model = Transformer(micro_args("mtp"))
    init_weights(model, 42)
    hf, meta = root / "hf", root / "meta"
    with torch.no_grad():
        export(model, "hf", hf)
        export(model, "meta", meta)
    return hf, meta


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count()}


def driver(opts: argparse.Namespace) -> None:
    import torch
    import transformers

    batches = [int(b) for b in opts.batches.split(",")]
    info = {**machine(), "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"machine: {info['cpu']}, {info['nproc']} cores; torch {info['torch']}, "
          f"transformers {info['transformers']}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="generate_vs_hf-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        hf_dir, meta_dir = build_and_export(root)
        print(f"micro MTP model (d 512, 4 layers on head 1's path, V 32000, fp32, Xavier seed "
              f"42) exported hf + meta in {time.perf_counter() - start:.1f}s")  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(3, 32000, (max(batches), opts.prompt_len), generator=gen).tolist()
        pairs: dict[int, list[dict]] = {b: [] for b in batches}
        for repeat in range(opts.repeats):
            for b in batches:
                path = root / f"prompts-{b}.json"
                path.write_text(json.dumps(prompts[:b]))
                first = "ours" if repeat % 2 == 0 else "hf"
                pairs[b].append(run_pair(b, path, hf_dir, opts, first))
        spec_path = root / "prompts-spec.json"
        spec_path.write_text(json.dumps(prompts[: opts.spec_prompts]))
        spec = run_worker("spec", meta_dir, spec_path, opts)
        # The first rows of the largest batch hold the same prompts, so the same tokens.
        batched = pairs[max(batches)][0]["ours"]["tokens"][: opts.spec_prompts]
        spec_same = spec["spec"] == spec["plain"] == batched

    identical = all(p["all_same"] for b in batches for p in pairs[b])
    threads = {p[s]["threads"] for b in batches for p in pairs[b] for s in ("ours", "hf")}
    rows = []
    for b in batches:
        row: dict[str, Any] = {"batch": b}
        for side in ("ours", "hf"):
            gen = statistics.median(p[side]["generate_s"] for p in pairs[b])
            row[f"{side}_tokens_per_s"] = round(b * opts.new_tokens / gen, 1)
            row[f"{side}_generate_s"] = round(gen, 3)
            for key in ("process_s", "load_s"):
                row[f"{side}_{key}"] = round(statistics.median(p[side][key] for p in pairs[b]), 3)
        row["ratio"] = round(row["ours_tokens_per_s"] / row["hf_tokens_per_s"], 3)
        row["process_ratio"] = round(row["hf_process_s"] / row["ours_process_s"], 3)
        row["others_cores"] = round(max(p["others"] for p in pairs[b]), 3)
        row["attempts"] = [p["attempts"] for p in pairs[b]]
        rows.append(row)
    spec_tokens = sum(len(t) for t in spec["spec"])
    speculative = {
        "prompts": opts.spec_prompts,
        "one_prompt_at_a_time": True,
        "plain_tokens_per_s": round(spec_tokens / spec["plain_s"], 1),
        "speculative_tokens_per_s": round(spec_tokens / spec["spec_s"], 1),
        "tokens_per_step": round(spec_tokens / spec["steps"], 3),
        "acceptance": [round(a / p, 3) if p else 0.0
                       for a, p in zip(spec["accepted"], spec["proposed"], strict=True)],
        "identical_to_plain": spec_same,
    }  # fmt: skip

    print(f"\n{opts.prompt_len}-token prompts, {opts.new_tokens} new tokens, greedy, EOS off, "
          f"fp32, torch threads {sorted(threads)}; median of {opts.repeats} run(s) per side; "
          f"hf attention: {pairs[batches[0]][0]['hf']['attention']}")  # fmt: skip
    print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} "
          f"{'ours proc s':>12} {'hf proc s':>10} {'proc ratio':>10} {'others':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['batch']:5d} {r['ours_tokens_per_s']:11.1f} {r['hf_tokens_per_s']:9.1f} "
              f"{r['ratio']:5.2f}x {r['ours_process_s']:12.2f} {r['hf_process_s']:10.2f} "
              f"{r['process_ratio']:9.2f}x {r['others_cores']:7.2f}")  # fmt: skip
    print(f"greedy tokens identical row by row (ours vs hf, every run): {identical}")
    print(f"self-speculative (one prompt at a time, {opts.spec_prompts} prompts, all 4 heads): "
          f"{speculative['speculative_tokens_per_s']:.1f} tok/s against plain batch-1 "
          f"{speculative['plain_tokens_per_s']:.1f} tok/s in the same process; "
          f"{speculative['tokens_per_step']:.2f} tokens/step, acceptance "
          f"{speculative['acceptance']}, same tokens as plain: {spec_same}")  # fmt: skip
    print("others: cores that other processes on this machine used, the most of either side")
    result = {
        "machine": info,
        "threads": sorted(threads),
        "prompt_len": opts.prompt_len,
        "new_tokens": opts.new_tokens,
        "repeats": opts.repeats,
        "batches": rows,
        "identical_tokens": identical,
        "speculative": speculative,
        "max_others": opts.max_others,
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, 32 new tokens")
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,16,64)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="runs per side and batch")
    parser.add_argument("--spec-prompts", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.25,
        help="rerun a pair when other work took more cores (default 0.25)",
    )
    parser.add_argument("--attempts", type=int, default=None, help="runs per pair at most (3)")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="seconds to wait for a quiet second before each process (60)")  # fmt: skip
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(WORKERS[opts.worker](opts)))
        return
    quick = opts.quick
    opts.batches = opts.batches or ("1,8" if quick else "1,16,64")
    opts.new_tokens = opts.new_tokens or (32 if quick else 128)
    opts.repeats = opts.repeats or 1
    opts.spec_prompts = opts.spec_prompts or (1 if quick else 4)
    opts.attempts = opts.attempts or (1 if quick else 3)
    opts.quiet_wait = opts.quiet_wait if opts.quiet_wait is not None else (2 if quick else 60)
    driver(opts)


if __name__ == "__main__":
    main()
