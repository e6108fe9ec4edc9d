"""Held-out pass@1 and decoding speed of the pretrained micro base (docs/DATA.md §7).

With ``--pretrain`` it first runs ``wmtp storage micro-base --force`` in this process (the
training loop's ``pretrain`` recipe, default recipe, ``--threads`` threads) and reports its wall
time, its steps' median time and its losses under ``"pretrain"``.

For the known-answer CodeContests ``valid`` and ``test`` problems (unseen instances, unseen
wording) of a storage tree where ``wmtp storage micro-base`` has run: Alpaca prompts (the
pretraining format), greedy decoding of ``micro-mtp`` three ways on the same prompts, one
process, plain and speculative alternating prompt by prompt:

* plain greedy, one prompt at a time (head 1, KV cache);
* self-speculative greedy, one prompt at a time (heads 2-4 draft, head 1 verifies);
* plain greedy in batches of 8 (what ``wmtp evaluate`` does without ``--speculative``).

Greedy speculative decoding must give the same tokens as plain greedy (checked). The plain
completions are scored in the sandbox, one run per test, as ``wmtp score`` scores CodeContests;
pass@1 comes with its standard error over problems and the 95% interval mean +- 1.96 s.e.

    .venv/bin/python benchmarks/micro_base.py --storage STORAGE [--max-tasks N] [--pretrain]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.data.jsonl import iter_jsonl
from weighted_mtp.evaluation.generate import generate
from weighted_mtp.evaluation.harness import compare_decoding, score_samples, stop_when, summarize
from weighted_mtp.evaluation.metrics import normal_interval
from weighted_mtp.evaluation.tasks import TASKS
from weighted_mtp.models.checkpoints import load_pretrained
from weighted_mtp.models.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--model", default="micro-mtp")
    parser.add_argument("--splits", default="valid,test")
    parser.add_argument("--max-tasks", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrain", action="store_true", help="pretrain the micro base first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layout = StorageLayout.from_arg(args.storage)
    pretraining = pretrain(layout) if args.pretrain else None
    paths = layout.model(args.model)
    model = load_pretrained(paths.root, dtype="float32")
    tok = Tokenizer(paths.tokenizer)
    task = TASKS["codecontests"]
    eos = [tok.id_to_piece(tok.eos_id)]
    stops = task.stop_sequences("alpaca", eos)

    figures: dict = {"model": args.model, "threads": args.threads,
                     "max_new_tokens": args.max_new_tokens, "splits": {}}  # fmt: skip
    if pretraining is not None:
        figures["pretrain"] = pretraining
    totals = {"plain": [0, 0.0], "speculative": [0, 0.0], "plain_batch8": [0, 0.0]}
    steps_tokens = [0.0, 0]  # (model calls, tokens) of the speculative decodes
    for split in args.splits.split(","):
        problems = {
            r["task_id"]: r for r in iter_jsonl(layout.dataset("codecontests").eval_file(split))
        }
        ids = list(problems)[: args.max_tasks] if args.max_tasks else list(problems)
        prompts = [task.prompt(problems[t], "alpaca") for t in ids]
        # Plain and speculative one prompt at a time, interleaved (the library's comparison).
        compared, texts = compare_decoding(model, tok, prompts, stops, args.max_new_tokens)
        n_tokens = compared["tokens"]
        for name in ("plain", "speculative"):
            totals[name][0] += n_tokens
            totals[name][1] += n_tokens / compared[f"{name}_tokens_per_s"]
        steps_tokens[0] += n_tokens / compared["tokens_per_step"]
        steps_tokens[1] += n_tokens
        encoded = [[tok.bos_id, *tok.encode(p)] for p in prompts]
        t0 = time.perf_counter()
        for start in range(0, len(encoded), 8):
            generate(model, encoded[start : start + 8], args.max_new_tokens, eos_id=tok.eos_id,
                     stop=stop_when(tok, stops))  # fmt: skip
        totals["plain_batch8"][0] += n_tokens
        totals["plain_batch8"][1] += time.perf_counter() - t0
        samples = [{"task_id": t, "completion": task.postprocess(x, "alpaca", eos)}
                   for t, x in zip(ids, texts, strict=True)]  # fmt: skip
        rows = score_samples(samples, problems, "codecontests", workers=args.workers)
        summary = summarize(rows, "codecontests")
        p1 = summary["pass_at_k"]["pass@1"]
        figures["splits"][split] = {
            "problems": len(ids), "samples_per_problem": 1, "passed": sum(r["passed"] for r in rows),
            "pass@1": round(p1["mean"], 4), "stderr": round(p1["stderr"], 4),
            "ci95": [round(x, 4) for x in normal_interval(p1["mean"], p1["stderr"])],
            "verdicts": summary["verdicts"],
            "speculative_equals_plain": f"{compared['same_tokens']}/{len(ids)}",
            "tokens": n_tokens, "acceptance_heads_2_4": compared["acceptance"],
        }  # fmt: skip
        print(json.dumps({split: figures["splits"][split]}), flush=True)
        for t, sample, row in list(zip(ids, samples, rows, strict=True))[:2]:
            print(f"--- {t} ({row['verdict']})\n{sample['completion']}", flush=True)
    rate = {k: v[0] / max(v[1], 1e-9) for k, v in totals.items()}
    figures["tokens_per_s"] = {k: round(v, 1) for k, v in rate.items()}
    figures["speculative_vs_plain"] = round(rate["speculative"] / rate["plain"], 3)
    figures["speculative_vs_plain_batch8"] = round(rate["speculative"] / rate["plain_batch8"], 3)
    figures["tokens_per_step"] = round(steps_tokens[1] / max(steps_tokens[0], 1e-9), 3)
    print(json.dumps(figures))


def pretrain(layout: StorageLayout) -> dict:
    """``pretrain_micro_base(force=True)`` with the default recipe, timed: the whole call, and
    each optimizer step through the training loop's ``on_step`` hook."""
    import weighted_mtp.micro_base as micro_base

    stamps: list[float] = []
    run = micro_base.train

    def timed_train(config, work, on_step=None):  # micro_base.train's signature
        def stamp(step: int, metrics: dict) -> None:
            stamps.append(time.perf_counter())
            if on_step is not None:
                on_step(step, metrics)

        return run(config, work, on_step=stamp)

    micro_base.train = timed_train
    t0 = time.perf_counter()
    try:
        results = micro_base.pretrain_micro_base(layout, force=True)
    finally:
        micro_base.train = run
    seconds = time.perf_counter() - t0
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    mtp = results["mtp"]
    figures = {
        "seconds": round(seconds, 1), "mtp_seconds": round(mtp.seconds, 1),
        "steps": mtp.steps, "step_median_ms": round(1000 * statistics.median(steps), 1),
        "first_loss": round(mtp.first_loss, 4), "final_loss": round(mtp.final_loss, 4),
        "reference_loss": round(results["reference"].final_loss, 4),
    }  # fmt: skip
    print(json.dumps({"pretrain": figures}), flush=True)
    return figures


if __name__ == "__main__":
    main()
