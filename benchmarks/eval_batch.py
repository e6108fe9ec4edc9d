"""Evaluation decoding: greedy in batches against self-speculative one prompt at a time, on a
trained policy and the held-out known-answer problems (docs/EVALUATION.md §1, "Decoding").

Needs a storage built by ``make quickstart`` (its baseline policy and the CodeContests test
problems). In one process, the model loaded once, it decodes every problem's prompt greedily
``--rounds`` times each way, alternating: self-speculative one prompt at a time (what the
quickstart's evaluations did before 2026-12-07) and plain greedy in batches of each
``--batch`` size, via ``evaluation.harness.generate_completions`` (what ``wmtp evaluate``
calls). Reported per way: the median seconds, the tokens, and how many problems got the same
text as the speculative decoding; the ratio is speculative seconds over batched seconds.

    .venv/bin/python benchmarks/eval_batch.py --storage storage
    .venv/bin/python benchmarks/eval_batch.py --storage storage --batch 16 32 100 --rounds 3

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="storage", help="a quickstart's storage root")
    parser.add_argument("--checkpoint", default=None,
                        help="default: <storage>/checkpoints/baseline/quickstart/final")  # fmt: skip
    parser.add_argument("--dataset", default="codecontests")
    parser.add_argument("--batch", type=int, nargs="+", default=[100])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()

    import torch

    from weighted_mtp.base.layout import StorageLayout
    from weighted_mtp.evaluation.harness import (
        TASKS,
        benchmark_of,
        generate_completions,
        load_for_evaluation,
        load_problems,
    )

    layout = StorageLayout(Path(args.storage))
    checkpoint = args.checkpoint or str(layout.checkpoint("baseline") / "quickstart" / "final")
    model, tokenizer, mode = load_for_evaluation(layout, checkpoint, "cpu", "float32")
    task = TASKS[benchmark_of(args.dataset)]
    problems = load_problems(layout, args.dataset, None)
    prompts = [task.prompt(record, mode) for record in problems.values()]
    stops = task.stop_sequences(mode, [tokenizer.id_to_piece(tokenizer.eos_id)])
    common = {"num_samples": 1, "max_new_tokens": args.max_new_tokens, "temperature": 0.0,
              "top_p": 0.95, "seed": 0}  # fmt: skip

    ways = {"speculative": (True, 1), **{f"batch {b}": (False, b) for b in args.batch}}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    texts: dict[str, dict] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for way, (speculative, size) in ways.items():
            started = time.perf_counter()
            out, stats = generate_completions(model, tokenizer, prompts, stops,
                                              speculative=speculative, batch_size=size, **common)  # fmt: skip
            seconds[way].append(time.perf_counter() - started)
            texts[way], tokens[way] = out, stats["tokens"]
    reference = texts["speculative"]
    figures: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "checkpoint": checkpoint,
        "problems": len(prompts),
        "rounds": args.rounds,
        "ways": {},
    }
    spec_s = statistics.median(seconds["speculative"])
    for way in ways:
        median = statistics.median(seconds[way])
        same = sum(texts[way][key] == reference[key] for key in reference)
        figures["ways"][way] = {"seconds": round(median, 3), "tokens": tokens[way],
                                "same_as_speculative": same,
                                "speedup_over_speculative": round(spec_s / median, 2)}  # fmt: skip
        print(f"{way:>12}: {median:6.2f} s  {tokens[way]} tokens  same text on {same}/"
              f"{len(reference)}  {spec_s / median:.2f}x the speculative one-at-a-time")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
