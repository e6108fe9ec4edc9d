"""Data processing at scale (the README's performance table, "data processing").

Builds a synthetic CodeContests-schema source (parquet shards in the Hub layout) of two
sizes, runs the ``process`` and ``metadata`` steps on each in a fresh subprocess, and
prints records/s and peak RSS (VmHWM): peak RSS must not grow with the source. Then it
reads a random sample of lines of the large processed split through the byte-offset index
and compares with a full scan of the file.

    python benchmarks/data.py            # 100k and 500k solutions, 50k sampled lines
    python benchmarks/data.py --quick    # 10k and 30k solutions, 5k sampled lines

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

SOLUTIONS_PER_PROBLEM = 100
PROBLEMS_PER_SHARD = 100
WORDS = ("the", "array", "of", "integers", "each", "query", "print", "answer", "given", "number")


def synthetic_problem(rng: random.Random, index: int, n_solutions: int) -> dict:
    """One CodeContests-schema problem, sized like the real ones.

    Real descriptions average ~2 KB and Python solutions ~0.5-1 KB, so processed lines are
    ~3 KB: the description here is ~2 KB and each solution ~0.6 KB.
    """
    words = " ".join(rng.choice(WORDS) for _ in range(330))
    description = (
        f"Problem {index}. {words}\n\nInput\n\nOne line with n.\n\nOutput\n\nPrint the answer.\n"
    )

    def solution(k: int) -> str:
        body = "".join(
            f"    acc = (acc * {k + j} + values[i % len(values)]) % {index + 1_000_003}\n"
            for j in range(6)
        )
        return (
            "import sys\n\n\ndef solve(n):\n"
            f"    values = [i * {k} % {index + 7} for i in range(n)]\n    acc = 0\n"
            f"    for i in range(n):\n{body.replace('    acc', '        acc')}"
            f"    return acc + {rng.randint(0, 99)}\n\n\n"
            "print(solve(int(sys.stdin.readline())))\n"
        )

    half = n_solutions // 2
    languages = [3 if rng.random() < 0.9 else rng.choice((1, 2)) for _ in range(n_solutions)]
    tests = {"input": ["3\n"], "output": ["6\n"]}
    return {
        "name": f"{index}_A. Synthetic {index}",
        "description": description,
        "public_tests": tests,
        "private_tests": tests,
        "generated_tests": {"input": ["5\n"] * 3, "output": ["10\n"] * 3},
        "source": 2,
        "difficulty": 7 + index % 5,
        "solutions": {"language": languages[:half], "solution": [solution(k) for k in range(half)]},
        "incorrect_solutions": {
            "language": languages[half:],
            "solution": [solution(k) for k in range(half, n_solutions)],
        },
        "cf_contest_id": index,
        "cf_index": "A",
        "cf_points": 500.0,
        "cf_rating": 800 + 100 * (index % 10),
        "cf_tags": ["implementation"],
        "is_description_translated": False,
        "untranslated_description": "",
        "time_limit": {"seconds": 2, "nanos": 0},
        "memory_limit_bytes": 256_000_000,
        "input_file": "",
        "output_file": "",
    }


def write_source(root: Path, n_solutions: int, seed: int = 0) -> None:
    """``root/code_contests/data/{train,valid,test}-*.parquet`` in the Hub layout."""
    from weighted_mtp.storage.dataset_sources import hub_shard_path, write_hub_parquet

    rng = random.Random(seed)
    n_problems = n_solutions // SOLUTIONS_PER_PROBLEM
    n_shards = -(-n_problems // PROBLEMS_PER_SHARD)
    for shard in range(n_shards):
        first = shard * PROBLEMS_PER_SHARD
        rows = [
            synthetic_problem(rng, i, SOLUTIONS_PER_PROBLEM)
            for i in range(first, min(n_problems, first + PROBLEMS_PER_SHARD))
        ]
        write_hub_parquet(
            "codecontests", rows, hub_shard_path(root, "codecontests", "train", shard, n_shards)
        )
    for split in ("valid", "test"):
        rows = [synthetic_problem(rng, 10**6 + i, 10) for i in range(3)]
        write_hub_parquet("codecontests", rows, hub_shard_path(root, "codecontests", split))


def make_tokenizer(storage: Path) -> None:
    from weighted_mtp.models.tokenizer import train_local_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [
        stdlib / name for name in ("textwrap.py", "argparse.py", "json/decoder.py", "string.py")
    ]
    train_local_tokenizer(storage / "models/micro-mtp/tokenizer/tokenizer.model", 1000, files=files)


def child(storage: Path, source: Path) -> None:
    """Runs in a fresh process: process + metadata, then report time and peak RSS."""
    start = time.perf_counter()
    # Imported before timing: a fixed start-up cost (torch, datasets), not throughput.
    for module in ("datasets", "weighted_mtp.models.tokenizer", "weighted_mtp.storage.models"):
        importlib.import_module(module)
    from weighted_mtp.base.layout import StorageLayout
    from weighted_mtp.storage.datasets import run

    imports = time.perf_counter() - start
    start = time.perf_counter()
    run(StorageLayout(storage), ["codecontests"], ["process", "metadata"], source=source)
    seconds = time.perf_counter() - start
    manifest = json.loads((storage / "datasets/codecontests/manifest.json").read_text())
    records = sum(s["records"] for s in manifest["process"]["splits"].values())
    status = Path("/proc/self/status").read_text()
    peak_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "imports_s": imports,
                "records": records,
                "peak_rss_mb": peak_kb / 1024,
            }
        )
    )


def measure(work: Path, n_solutions: int) -> dict:
    source, storage = work / f"source-{n_solutions}", work / f"storage-{n_solutions}"
    write_source(source, n_solutions)
    make_tokenizer(storage)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(work / "hf"),
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(storage), str(source)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["storage"] = storage
    return result


def read_benchmark(jsonl: Path, n_samples: int) -> dict:
    """Sampled lines through the offset index vs scanning the whole file for them."""
    from weighted_mtp.data.jsonl import JsonlFile

    reader = JsonlFile(jsonl)
    wanted = sorted(random.Random(0).sample(range(len(reader)), n_samples))
    wanted_set = set(wanted)

    def timed(fn, repeats: int = 3):
        """Best of ``repeats`` (the machine may be shared), and the last result."""
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            value = fn()
            best = min(best, time.perf_counter() - start)
        return best, value

    raw_index, lines_a = timed(lambda: reader.raw_many(wanted))
    raw_scan, lines_b = timed(lambda: _scan_raw(jsonl, wanted_set))
    assert lines_a == lines_b
    parsed_index, records = timed(lambda: reader.read(wanted))
    parsed_scan, records_scan = timed(lambda: [json.loads(x) for x in _scan_raw(jsonl, wanted_set)])
    load_all, _ = timed(lambda: _load_all(jsonl, wanted))
    assert records == records_scan
    return {
        "lines": len(reader),
        "sampled": n_samples,
        "index_s": raw_index,
        "scan_s": raw_scan,
        "index_parsed_s": parsed_index,
        "scan_parsed_s": parsed_scan,
        "load_all_s": load_all,
    }


def _scan_raw(path: Path, wanted: set[int]) -> list[bytes]:
    with open(path, "rb") as handle:
        return [line for i, line in enumerate(handle) if i in wanted]


def _load_all(path: Path, wanted: list[int]) -> list[dict]:
    with open(path, "rb") as handle:
        records = [json.loads(line) for line in handle]
    return [records[i] for i in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run, under a minute")
    parser.add_argument("--child", nargs=2, metavar=("STORAGE", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return
    small, large, samples = (10_000, 30_000, 5_000) if args.quick else (100_000, 500_000, 50_000)
    with tempfile.TemporaryDirectory(prefix="wmtp-bench-data-") as tmp:
        work = Path(tmp)
        runs = {name: measure(work, n) for name, n in (("small", small), ("large", large))}
        for name, r in runs.items():
            print(
                f"{name}: {r['records']} records in {r['seconds']:.1f} s "
                f"({r['records'] / r['seconds']:.0f} records/s; imports {r['imports_s']:.1f} s before), "
                f"peak RSS {r['peak_rss_mb']:.0f} MB"
            )
        jsonl = runs["large"]["storage"] / "datasets/codecontests/processed/train.jsonl"
        reads = read_benchmark(jsonl, samples)
    print(
        f"{samples} of {reads['lines']} lines: index {reads['index_s']:.3f} s, scan {reads['scan_s']:.3f} s "
        f"(raw lines); parsed: index {reads['index_parsed_s']:.3f} s, scan {reads['scan_parsed_s']:.3f} s, "
        f"load-all {reads['load_all_s']:.3f} s"
    )
    figures = {
        "source_solutions_small": small,
        "source_solutions_large": large,
        "records_small": runs["small"]["records"],
        "records_large": runs["large"]["records"],
        "records_per_s_small": round(runs["small"]["records"] / runs["small"]["seconds"]),
        "records_per_s_large": round(runs["large"]["records"] / runs["large"]["seconds"]),
        "peak_rss_mb_small": round(runs["small"]["peak_rss_mb"], 1),
        "peak_rss_mb_large": round(runs["large"]["peak_rss_mb"], 1),
        "rss_growth_ratio": round(runs["large"]["peak_rss_mb"] / runs["small"]["peak_rss_mb"], 3),
        "sampled_lines": samples,
        "index_speedup_vs_scan": round(reads["scan_s"] / reads["index_s"], 1),
        "index_speedup_vs_scan_parsed": round(reads["scan_parsed_s"] / reads["index_parsed_s"], 2),
        "index_speedup_vs_load_all": round(reads["load_all_s"] / reads["index_parsed_s"], 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
