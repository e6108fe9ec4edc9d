"""The dataset commands, run as a user would, offline on the bundled sources.

``setup_datasets.py --datasets all --steps all`` builds the storage tree; every output is read
back field by field; ``verify_storage.py`` passes, and fails once the metadata is corrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from weighted_mtp.base.layout import DATASET_SPLITS, SMALL_SIZES, StorageLayout
from weighted_mtp.data.alpaca import format_text
from weighted_mtp.data.jsonl import JsonlFile, iter_jsonl
from weighted_mtp.models.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
EXPECTED_LINES = {  # the bundled sources, Python 3 solutions only
    "codecontests": {"train": 120, "valid": 34, "test": 33},
    "mbpp": {"train": 16, "validation": 8, "test": 16, "prompt": 4},
    "humaneval": {"test": 164},
    "gsm8k": {"train": 24, "test": 16},
}


def script(name: str, *args: str, storage: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WMTP_STORAGE"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(storage.parent / "hf-home"))
    command = [
        sys.executable,
        str(REPO / "scripts/create_storage" / name),
        *args,
        "--storage",
        str(storage),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_tokenizer):
    storage = tmp_path_factory.mktemp("wmtp") / "storage"
    tokenizer = storage / "models/micro-mtp/tokenizer/tokenizer.model"
    tokenizer.parent.mkdir(parents=True)
    shutil.copy(small_tokenizer, tokenizer)
    result = script("setup_datasets.py", "--datasets", "all", "--steps", "all", storage=storage)
    assert result.returncode == 0, result.stderr[-2000:]
    return StorageLayout(storage), Tokenizer(tokenizer), result.stdout


def check_alpaca_line(name: str, record: dict, tokenizer: Tokenizer) -> None:
    required = {"instruction", "input", "output", "task_id", "metadata"} | (
        {"is_correct"} if name == "codecontests" else set()
    )
    assert set(record) == required
    assert all(isinstance(record[k], str) for k in ("instruction", "input", "output", "task_id"))
    assert record["input"] == ""
    meta = record["metadata"]
    assert meta["token_length"] == len(tokenizer.encode(format_text(record), bos=True, eos=True))
    if name == "codecontests":
        assert isinstance(record["is_correct"], bool) and meta["language"] == "python3"
        kind = "correct" if record["is_correct"] else "incorrect"
        assert record["task_id"].startswith(f"{meta['problem_id']}_{kind}_")
        assert 0 <= meta["difficulty"] <= 28 and meta["source"] == "code_contests"
        assert meta["has_tests"] is True
    elif name == "mbpp":
        assert len(meta["test_list"]) == 3 and isinstance(meta["test_setup_code"], str)
        assert f"named '{meta['entry_point']}'" in record["instruction"]
        assert all(meta["entry_point"] in test for test in meta["test_list"])
    elif name == "humaneval":
        assert meta["prompt"] == record["instruction"] and meta["entry_point"] in meta["prompt"]
        assert "def check(candidate)" in meta["test"]
    else:
        assert meta["final_answer"] == record["output"].rsplit("####", 1)[1].strip().replace(
            ",", ""
        )
        assert meta["final_answer"].lstrip("-").isdigit()


def test_processed_splits_have_the_seed_schema_in_every_field(built):
    layout, tokenizer, _ = built
    for name, splits in EXPECTED_LINES.items():
        paths = layout.dataset(name)
        schema = json.loads(paths.schema.read_text())
        assert schema["dataset"] == name and schema["format"] == "alpaca"
        assert set(DATASET_SPLITS[name]) <= set(splits)
        for split, n_lines in splits.items():
            records = list(iter_jsonl(paths.split(split)))
            assert len(records) == n_lines == len(JsonlFile(paths.split(split)))
            for record in records:
                check_alpaca_line(name, record, tokenizer)


def test_metadata_matches_the_lines(built):
    layout, _, _ = built
    paths = layout.dataset("codecontests")
    for split in DATASET_SPLITS["codecontests"]:
        records = list(iter_jsonl(paths.split(split)))
        stored = json.loads(paths.split_metadata(split).read_text())
        assert stored["metadata"] == [
            {
                "is_correct": r["is_correct"],
                "difficulty": r["metadata"]["difficulty"],
                "problem_id": r["metadata"]["problem_id"],
            }
            for r in records
        ]
        seen = []
        for pid, entry in stored["problem_index_map"].items():
            for side in ("correct", "incorrect"):
                indices = entry[f"{side}_indices"]
                assert all(records[i]["metadata"]["problem_id"] == pid for i in indices)
                assert all(records[i]["is_correct"] == (side == "correct") for i in indices)
                assert entry[f"{side}_token_lengths"] == [
                    records[i]["metadata"]["token_length"] for i in indices
                ]
                seen += indices
        assert sorted(seen) == list(range(len(records)))
        stats = stored["stats"]
        assert stats["total"] == len(records) and stats["correct"] == sum(
            r["is_correct"] for r in records
        )
        valid = [
            e
            for e in stored["problem_index_map"].values()
            if e["correct_indices"] and e["incorrect_indices"]
        ]
        assert stats["n_valid_problems"] == len(valid)
        assert stats["total_possible_pairs"] == sum(
            len(e["correct_indices"]) * len(e["incorrect_indices"]) for e in valid
        )
        sidecar = json.loads(paths.split_problems(split).read_text())
        assert (
            sidecar["problem_index_map"] == stored["problem_index_map"]
            and "metadata" not in sidecar
        )


def test_eval_and_tests_files_hold_every_problem_with_its_tests(built):
    layout, _, _ = built
    paths = layout.dataset("codecontests")
    for split in ("valid", "test"):
        evals = list(iter_jsonl(paths.eval_file(split)))
        tests = json.loads(paths.tests_file(split).read_text())
        problem_ids = json.loads(paths.split_problems(split).read_text())["problem_index_map"]
        assert [e["task_id"] for e in evals] == list(tests) == list(problem_ids)
        for record in evals:
            meta = record["metadata"]
            entry = tests[record["task_id"]]
            assert (
                meta["public_tests"] == entry["public_tests"]
                and meta["private_tests"] == entry["private_tests"]
            )
            assert meta["generated_tests"]["input"] and meta["memory_limit_bytes"] is not None
            assert meta["public_tests"]["input"][0].strip() in record["instruction"]
            assert meta["time_limit_seconds"] is None or meta["time_limit_seconds"] > 0
    assert len(json.loads(paths.tests_file("train").read_text())) == 24


def test_small_datasets_are_whole_problems_within_the_seed_sizes(built):
    layout, _, _ = built
    for name, sizes in SMALL_SIZES.items():
        paths = layout.dataset(name)
        for split, budget in sizes.items():
            small = json.loads(paths.small_split_problems(split).read_text())
            full = json.loads(paths.split_problems(split).read_text())["problem_index_map"]
            lines = len(JsonlFile(paths.small_split(split)))
            assert 0 < lines <= budget
            if name != "codecontests":  # one line per problem: the budget or all of them
                assert lines == min(budget, EXPECTED_LINES[name][split])
            assert small["small"]["seed"] == 42 and small["stats"]["total"] == lines
            for pid in small["small"]["problems"]:
                for key in ("correct_indices", "incorrect_indices", "indices"):
                    assert len(small["problem_index_map"][pid].get(key, [])) == len(
                        full[pid].get(key, [])
                    )


def test_stats_and_rerun(built):
    layout, _, stdout = built
    for name in EXPECTED_LINES:
        summaries = list(layout.dataset(name).stats_dir.glob("*_summary.json"))
        assert len(summaries) == 1
        splits = json.loads(summaries[0].read_text())["splits"]
        assert {s: v["count"] for s, v in splits.items()} == EXPECTED_LINES[name]
    assert "dropped python2" in stdout and "dropped cpp" in stdout
    again = script(
        "setup_datasets.py", "--datasets", "codecontests", "--steps", "all", storage=layout.root
    )
    assert (
        again.returncode == 0
        and "records from" not in again.stdout
        and "up to date" in again.stdout
    )


@pytest.mark.slow
def test_verify_passes_then_catches_a_corrupted_index_map_and_a_flipped_byte(built, tmp_path):
    layout, _, _ = built
    storage = tmp_path / "copy"
    shutil.copytree(layout.root, storage)
    result = script(
        "verify_storage.py",
        "--check",
        "datasets",
        "--include-small",
        "--generate-report",
        storage=storage,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads(next((storage / "reports").glob("verification_report_*.json")).read_text())
    assert report["passed"] and report["n_checks"] > 50

    metadata = storage / "datasets/codecontests/processed/train_metadata.json"
    data = json.loads(metadata.read_text())
    first = next(iter(data["problem_index_map"].values()))
    first["correct_indices"][0] = 10_000
    metadata.write_text(json.dumps(data))
    result = script("verify_storage.py", "--check", "datasets", storage=storage)
    assert result.returncode == 1
    assert "correct_indices 10000 out of range (0..119)" in result.stdout

    jsonl = storage / "datasets/gsm8k/processed/test.jsonl"
    raw = bytearray(jsonl.read_bytes())
    raw[raw.index(b"####") + 5] ^= 0x01  # a digit of the answer, same length
    jsonl.write_bytes(bytes(raw))
    result = script("verify_storage.py", "--check", "datasets", storage=storage)
    assert "[FAIL] datasets/gsm8k/test: sha256" in result.stdout
