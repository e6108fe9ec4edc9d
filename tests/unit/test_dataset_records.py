"""Conversion of Hub records into Alpaca records (docs/METHOD.md §7)."""

from __future__ import annotations

import copy
import importlib.resources

import pytest
import yaml

from weighted_mtp.storage.dataset_records import (
    BadRecord,
    ProblemNames,
    codecontests_eval_record,
    codecontests_records,
    gsm8k_record,
    humaneval_record,
    mbpp_record,
    parse_codecontests,
    problem_id_of,
)


@pytest.fixture(scope="module")
def cc_rows():
    text = (
        importlib.resources.files("weighted_mtp") / "sources/code_contests/train.yaml"
    ).read_text()
    return yaml.safe_load(text)


def mixed_problem(cc_rows):
    """A bundled problem that has Python 3, Python 2 and C++ solutions."""
    for row in cc_rows:
        languages = row["solutions"]["language"] + row["incorrect_solutions"]["language"]
        if {1, 2, 3} <= set(languages):
            return copy.deepcopy(row)
    raise AssertionError("no bundled problem mixes languages")


def test_python3_only_by_default_correct_first_with_full_list_indices(cc_rows):
    row = mixed_problem(cc_rows)
    problem = parse_codecontests(row, "src: record 0", ProblemNames())
    records, dropped = codecontests_records(problem, include_python2=False)
    languages = row["solutions"]["language"]
    expected_correct = [
        f"{row['name']}_correct_{i}" for i, lang in enumerate(languages) if lang == 3
    ]
    assert [r["task_id"] for r in records if r["is_correct"]] == expected_correct
    assert all(r["metadata"]["language"] == "python3" for r in records)
    flags = [r["is_correct"] for r in records]
    assert flags == sorted(flags, reverse=True)
    assert dropped["python2"] >= 1 and dropped["cpp"] >= 1
    record = records[0]
    assert record["instruction"] == row["description"] and record["input"] == ""
    assert record["metadata"]["problem_id"] == row["name"] == problem_id_of(record["task_id"])
    assert record["metadata"]["difficulty"] == row["difficulty"]
    with_py2, _ = codecontests_records(problem, include_python2=True)
    assert {r["metadata"]["language"] for r in with_py2} == {"python2", "python3"}


def test_repeated_problem_names_do_not_merge(cc_rows):
    names = ProblemNames()
    first = parse_codecontests(copy.deepcopy(cc_rows[0]), "a", names)
    second = parse_codecontests(copy.deepcopy(cc_rows[0]), "b", names)
    assert first.problem_id == cc_rows[0]["name"]
    assert second.problem_id == f"{cc_rows[0]['name']} (2)"
    records, _ = codecontests_records(second, include_python2=False)
    assert {problem_id_of(r["task_id"]) for r in records} == {second.problem_id}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r.pop("description"), "missing field 'description'"),
        (lambda r: r.update(description=None), "field 'description' should be str, got null"),
        (
            lambda r: r["solutions"]["language"].append(3),
            "field 'solutions' has \\d+ languages but \\d+ solutions",
        ),
        (
            lambda r: r["solutions"]["language"].__setitem__(0, 9),
            "field 'solutions.language' should be a list of language ids 0..4",
        ),
        (lambda r: r.update(difficulty=True), "field 'difficulty' should be int, got bool"),
        (
            lambda r: r["public_tests"]["output"].pop(),
            "field 'public_tests' has \\d+ inputs but \\d+ outputs",
        ),
    ],
)
def test_bad_codecontests_records_name_the_record_and_the_reason(cc_rows, change, reason):
    row = copy.deepcopy(cc_rows[0])
    change(row)
    with pytest.raises(BadRecord, match=rf"^shard\.parquet: record 7: {reason}"):
        parse_codecontests(row, "shard.parquet: record 7", ProblemNames())


def test_eval_record_keeps_tests_and_limits(cc_rows):
    row = cc_rows[0]
    record = codecontests_eval_record(parse_codecontests(copy.deepcopy(row), "x", ProblemNames()))
    meta = record["metadata"]
    assert record["task_id"] == row["name"] and record["instruction"] == row["description"]
    assert (
        meta["public_tests"] == row["public_tests"]
        and meta["generated_tests"] == row["generated_tests"]
    )
    assert (
        meta["time_limit_seconds"]
        == row["time_limit"]["seconds"] + row["time_limit"]["nanos"] / 1e9
    )
    assert meta["memory_limit_bytes"] == row["memory_limit_bytes"]


def test_mbpp_entry_point_comes_from_the_code_not_the_first_word_after_assert():
    raw = {
        "task_id": 26,
        "text": "Write a function to compute the area of a circle.",
        "code": "import math\n\n\ndef circle_area(r):\n    return math.pi * r * r",
        "test_list": ["assert math.isclose(circle_area(1), math.pi)", "assert circle_area(0) == 0"],
        "test_setup_code": "import math",
        "challenge_test_list": [],
    }
    record = mbpp_record(raw, "x")
    assert record["instruction"].endswith("The function should be named 'circle_area'.")
    assert record["task_id"] == "26" and record["output"] == raw["code"]
    meta = record["metadata"]
    assert meta["test_list"] == raw["test_list"] and meta["test_setup_code"] == "import math"
    assert meta["entry_point"] == "circle_area" and meta["challenge_test_list"] == []


def test_humaneval_keeps_prompt_entry_point_and_test():
    raw = {
        "task_id": "HumanEval/0",
        "prompt": "def f(x):\n    '''Double x.'''\n",
        "canonical_solution": "    return 2 * x\n",
        "test": "def check(candidate):\n    assert candidate(2) == 4\n",
        "entry_point": "f",
    }
    record = humaneval_record(raw, "x")
    assert record["instruction"] == raw["prompt"] and record["output"] == raw["canonical_solution"]
    assert {k: record["metadata"][k] for k in ("prompt", "entry_point", "test")} == {
        k: raw[k] for k in ("prompt", "entry_point", "test")
    }


def test_gsm8k_keeps_the_final_answer_without_commas():
    raw = {"question": "How many?", "answer": "12 * 100 = <<12*100=1200>>1,200\n#### 1,200"}
    record = gsm8k_record(raw, "x", 5)
    assert record["task_id"] == "gsm8k_5" and record["metadata"]["final_answer"] == "1200"
    with pytest.raises(BadRecord, match="no final '#### <number>' line"):
        gsm8k_record({"question": "q", "answer": "no marker"}, "x", 0)
