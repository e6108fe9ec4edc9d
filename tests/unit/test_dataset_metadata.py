"""``<split>_metadata.json``: problem index map, stats, sidecar, and small-split selection."""

from __future__ import annotations

import json

from weighted_mtp.data.jsonl import JsonlWriter
from weighted_mtp.data.metadata import load_problem_index, problems_path_for
from weighted_mtp.storage.dataset_metadata import build_metadata, select_small


def cc(pid: str, i: int, correct: bool, length: int, difficulty: int = 7) -> dict:
    kind = "correct" if correct else "incorrect"
    return {
        "instruction": "d",
        "input": "",
        "output": "x",
        "task_id": f"{pid}_{kind}_{i}",
        "is_correct": correct,
        "metadata": {"difficulty": difficulty, "problem_id": pid, "token_length": length},
    }


def write(path, records):
    with JsonlWriter(path, path.with_suffix(".idx")) as writer:
        for record in records:
            writer.write(record)


def test_problem_index_map_and_stats_follow_the_lines(tmp_path):
    records = [
        cc("A_correct_1", 0, True, 10),  # a name that itself looks like a task suffix
        cc("A_correct_1", 3, True, 11),
        cc("A_correct_1", 1, False, 12),
        cc("B", 0, True, 20, difficulty=27),
        cc("C", 0, False, 30),
        cc("C", 4, False, 31),
    ]
    path = tmp_path / "train.jsonl"
    write(path, records)
    meta_path = tmp_path / "train_metadata.json"
    stats = build_metadata(
        path, meta_path, problems_path_for(meta_path), {"source_file": "train.jsonl"}
    )
    stored = json.loads(meta_path.read_text())
    assert stored["metadata"][3] == {"is_correct": True, "difficulty": 27, "problem_id": "B"}
    assert stored["problem_index_map"]["A_correct_1"] == {
        "difficulty": 7,
        "correct_indices": [0, 1],
        "incorrect_indices": [2],
        "correct_token_lengths": [10, 11],
        "incorrect_token_lengths": [12],
    }
    assert stats == stored["stats"]
    assert (stats["total"], stats["correct"], stats["incorrect"]) == (6, 3, 3)
    assert (stats["n_problems"], stats["n_valid_problems"], stats["total_possible_pairs"]) == (
        3,
        1,
        2,
    )
    assert stats["difficulty_dist"] == {"7": 5, "27": 1}
    sidecar = load_problem_index(meta_path)
    assert "metadata" not in sidecar and sidecar["problem_index_map"] == stored["problem_index_map"]
    assert sidecar["token_lengths_computed"] is True


def test_datasets_without_is_correct_list_each_record_as_its_own_problem(tmp_path):
    records = [
        {
            "instruction": "q",
            "input": "",
            "output": "a",
            "task_id": f"gsm8k_{i}",
            "metadata": {"token_length": 5 + i},
        }
        for i in range(3)
    ]
    path = tmp_path / "test.jsonl"
    write(path, records)
    meta_path = tmp_path / "test_metadata.json"
    stats = build_metadata(path, meta_path, problems_path_for(meta_path), {})
    entry = load_problem_index(meta_path)["problem_index_map"]["gsm8k_2"]
    assert entry["indices"] == [2] and entry["token_lengths"] == [7]
    assert entry["correct_indices"] == [] and not stats["has_is_correct"]


def test_small_selection_takes_whole_problems_paired_first_within_budget():
    def entry(n_correct, n_incorrect, start):
        return {
            "correct_indices": list(range(start, start + n_correct)),
            "incorrect_indices": list(range(start + n_correct, start + n_correct + n_incorrect)),
        }

    problem_map = {f"p{i}": entry(3, 2, 5 * i) for i in range(10)}
    problem_map["only_correct"] = entry(2, 0, 100)
    problem_map["huge"] = entry(40, 40, 200)
    chosen = select_small(problem_map, budget=22, seed=42)
    sizes = [
        len(problem_map[p]["correct_indices"]) + len(problem_map[p]["incorrect_indices"])
        for p in chosen
    ]
    assert sum(sizes) <= 22 and "huge" not in chosen
    assert chosen[:4] == [p for p in chosen if p.startswith("p")][:4] and len(chosen) >= 4
    assert select_small(problem_map, budget=22, seed=42) == chosen
    assert select_small(problem_map, budget=22, seed=7) != chosen
