"""Held-out pass@1 and decoding speed of the pretrained micro base (docs/DATA.md §7).

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

    .venv/bin/python benchmarks/micro_base.py --storage STORAGE [--max-tasks N]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.data.jsonl import iter_jsonl
from weighted_mtp.evaluation.generate import SpecStats, generate, speculative_generate
from weighted_mtp.evaluation.harness import score_samples, summarize
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layout = StorageLayout.from_arg(args.storage)
    paths = layout.model(args.model)
    model = load_pretrained(paths.root, dtype="float32")
    tok = Tokenizer(paths.tokenizer)
    task = TASKS["codecontests"]
    eos = [tok.id_to_piece(tok.eos_id)]
    stops = task.stop_sequences("alpaca", eos)

    def stop(ids: list[int]) -> bool:
        text = tok.decode(ids[-64:])
        return any(s in text for s in stops)

    figures: dict = {"model": args.model, "threads": args.threads,
                     "max_new_tokens": args.max_new_tokens, "splits": {}}  # fmt: skip
    totals = {"plain": [0, 0.0], "speculative": [0, 0.0], "plain_batch8": [0, 0.0]}
    spec_total = SpecStats(draft_proposed=[0, 0, 0], draft_accepted=[0, 0, 0])
    for split in args.splits.split(","):
        problems = {
            r["task_id"]: r for r in iter_jsonl(layout.dataset("codecontests").eval_file(split))
        }
        ids = list(problems)[: args.max_tasks] if args.max_tasks else list(problems)
        prompts = [[tok.bos_id, *tok.encode(task.prompt(problems[t], "alpaca"))] for t in ids]
        kw = {"eos_id": tok.eos_id, "stop": stop}
        plain, spec = [], []
        t_plain = t_spec = 0.0
        # Interleaved prompt by prompt, so a change in the machine's load hits both alike.
        for p in prompts:
            t0 = time.perf_counter()
            plain.append(generate(model, [p], args.max_new_tokens, **kw)[0])
            t1 = time.perf_counter()
            out, stats = speculative_generate(model, p, args.max_new_tokens, **kw)
            t_spec += time.perf_counter() - t1
            t_plain += t1 - t0
            spec.append(out)
            spec_total.steps += stats.steps
            spec_total.tokens += stats.tokens
            for i in range(3):
                spec_total.draft_proposed[i] += stats.draft_proposed[i]
                spec_total.draft_accepted[i] += stats.draft_accepted[i]
        t0 = time.perf_counter()
        batched = []
        for start in range(0, len(prompts), 8):
            batched += generate(model, prompts[start : start + 8], args.max_new_tokens, **kw)
        t_batch = time.perf_counter() - t0
        same = sum(a == b for a, b in zip(plain, spec, strict=True))
        n_tokens = sum(len(x) for x in plain)
        for name, seconds in (("plain", t_plain), ("speculative", t_spec),
                              ("plain_batch8", t_batch)):  # fmt: skip
            totals[name][0] += n_tokens
            totals[name][1] += seconds
        samples = [{"task_id": t, "completion": task.postprocess(tok.decode(x), "alpaca", eos)}
                   for t, x in zip(ids, plain, strict=True)]  # fmt: skip
        rows = score_samples(samples, problems, "codecontests", workers=args.workers)
        summary = summarize(rows, "codecontests")
        p1 = summary["pass_at_k"]["pass@1"]
        figures["splits"][split] = {
            "problems": len(ids), "samples_per_problem": 1, "passed": sum(r["passed"] for r in rows),
            "pass@1": round(p1["mean"], 4), "stderr": round(p1["stderr"], 4),
            "ci95": [round(p1["mean"] - 1.96 * p1["stderr"], 4),
                     round(p1["mean"] + 1.96 * p1["stderr"], 4)],
            "verdicts": summary["verdicts"], "speculative_equals_plain": f"{same}/{len(ids)}",
            "tokens": n_tokens,
        }  # fmt: skip
        print(json.dumps({split: figures["splits"][split]}), flush=True)
        for t, sample, row in list(zip(ids, samples, rows, strict=True))[:2]:
            print(f"--- {t} ({row['verdict']})\n{sample['completion']}", flush=True)
    rate = {k: v[0] / max(v[1], 1e-9) for k, v in totals.items()}
    figures["tokens_per_s"] = {k: round(v, 1) for k, v in rate.items()}
    figures["speculative_vs_plain"] = round(rate["speculative"] / rate["plain"], 3)
    figures["speculative_vs_plain_batch8"] = round(rate["speculative"] / rate["plain_batch8"], 3)
    figures["tokens_per_step"] = round(spec_total.tokens_per_step, 3)
    figures["acceptance_heads_2_4"] = [round(a, 3) for a in spec_total.acceptance]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
