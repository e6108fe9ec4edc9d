"""Conversion of Hub records into Alpaca records (docs/METHOD.md §7).

Every check of a source record raises :class:`BadRecord` with the record's position and a
reason, so the caller can stop with ``file:line: reason`` or skip and count.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from weighted_mtp.base.errors import UserError

PYTHON2, PYTHON3 = 1, 3
LANGUAGES = {0: "unknown", 1: "python2", 2: "cpp", 3: "python3", 4: "java"}
TASK_SUFFIX = re.compile(r"_(?:correct|incorrect)_\d+$")
# Optional source column: per incorrect solution, the span of its one mutation (docs/DATA.md §4).
MUTATION_COLUMN = "incorrect_solutions_mutation"

ALPACA_FIELDS = ("instruction", "input", "output", "task_id")
REQUIRED_FIELDS = {
    "codecontests": (*ALPACA_FIELDS, "is_correct"),
    "mbpp": ALPACA_FIELDS,
    "humaneval": ALPACA_FIELDS,
    "gsm8k": ALPACA_FIELDS,
}
# Keys every record's ``metadata`` holds (``token_length`` is null without a tokenizer).
METADATA_FIELDS = {
    "codecontests": ("source", "difficulty", "has_tests", "problem_id", "language", "token_length"),
    "mbpp": (
        "source",
        "text",
        "entry_point",
        "test_list",
        "test_setup_code",
        "challenge_test_list",
        "has_tests",
        "token_length",
    ),
    "humaneval": ("source", "prompt", "entry_point", "test", "has_tests", "token_length"),
    "gsm8k": ("source", "final_answer", "token_length"),
}
EVAL_METADATA_FIELDS = (
    "source", "name", "difficulty", "cf_rating", "time_limit", "time_limit_seconds",
    "memory_limit_bytes", "input_file", "output_file", "public_tests", "private_tests",
    "generated_tests",
)  # fmt: skip


class BadRecord(UserError):
    """A source record that cannot be converted: ``where`` it is and why."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def problem_id_of(task_id: str) -> str:
    """The problem a CodeContests ``task_id`` belongs to (its ``_correct_<i>`` suffix removed)."""
    return TASK_SUFFIX.sub("", task_id)


def line_problem_id(record: dict[str, Any]) -> str:
    """The problem a processed line belongs to: ``metadata.problem_id``, else from the task_id."""
    meta = record.get("metadata") or {}
    if meta.get("problem_id") is not None:
        return str(meta["problem_id"])
    if "is_correct" in record:
        return problem_id_of(str(record["task_id"]))
    return str(record["task_id"])


def _get(
    raw: dict[str, Any],
    key: str,
    kinds: type | tuple[type, ...],
    where: str,
    nullable: bool = False,
) -> Any:
    if key not in raw:
        raise BadRecord(where, f"missing field '{key}'")
    value = raw[key]
    if value is None and nullable:
        return None
    # bool is an int subclass; a True where an int is expected is a malformed record.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        got = "null" if value is None else type(value).__name__
        raise BadRecord(where, f"field '{key}' should be {_names(kinds)}, got {got}")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _names(kinds: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kinds))


def _str_list(value: Any, label: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRecord(where, f"field '{label}' should be a list of strings")
    return value


def _tests(raw: dict[str, Any], key: str, where: str) -> dict[str, list[str]]:
    value = _get(raw, key, dict, where)
    if "input" not in value or "output" not in value:
        raise BadRecord(where, f"field '{key}' should have 'input' and 'output' lists")
    inputs = _str_list(value["input"], f"{key}.input", where)
    outputs = _str_list(value["output"], f"{key}.output", where)
    if len(inputs) != len(outputs):
        raise BadRecord(where, f"field '{key}' has {len(inputs)} inputs but {len(outputs)} outputs")
    return {"input": inputs, "output": outputs}


def _solutions(raw: dict[str, Any], key: str, where: str) -> list[tuple[int, str]]:
    value = _get(raw, key, dict, where)
    languages, codes = value.get("language"), value.get("solution")
    if not isinstance(languages, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x in LANGUAGES for x in languages
    ):
        raise BadRecord(where, f"field '{key}.language' should be a list of language ids 0..4")
    codes = _str_list(codes, f"{key}.solution", where)
    if len(languages) != len(codes):
        raise BadRecord(
            where, f"field '{key}' has {len(languages)} languages but {len(codes)} solutions"
        )
    return list(zip(languages, codes, strict=True))


def _mutations(
    raw: dict[str, Any], where: str, incorrect: list[tuple[int, str]]
) -> list[dict[str, Any]] | None:
    """The optional mutation spans: ``{start, end, kind, original}`` lists, one entry per
    incorrect solution, ``0 <= start < end <= len(solution)`` (docs/DATA.md §4)."""
    value = raw.get(MUTATION_COLUMN)
    if value is None:
        return None
    label = MUTATION_COLUMN
    if not isinstance(value, dict) or not all(
        isinstance(value.get(k), list) and len(value[k]) == len(incorrect)
        for k in ("start", "end", "kind")
    ):
        raise BadRecord(
            where,
            f"field '{label}' should hold start, end and kind lists, one per incorrect solution",
        )
    original = value.get("original")
    if not isinstance(original, list) or len(original) != len(incorrect):
        original = [None] * len(incorrect)
    spans = []
    for i, (start, end, kind) in enumerate(
        zip(value["start"], value["end"], value["kind"], strict=True)
    ):
        code = incorrect[i][1]
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(kind, str)):
            raise BadRecord(
                where, f"field '{label}' entry {i}: start/end should be ints, kind a string"
            )
        if not 0 <= start < end <= len(code):
            raise BadRecord(
                where,
                f"field '{label}' entry {i}: span [{start}, {end}) is not inside the solution",
            )
        span: dict[str, Any] = {"start": start, "end": end, "kind": kind}
        if isinstance(original[i], str):
            span["original"] = original[i]
        spans.append(span)
    return spans


@dataclass
class Problem:
    """One CodeContests problem, checked."""

    problem_id: str
    name: str
    description: str
    difficulty: int
    source: int
    cf_rating: int | None
    time_limit: dict[str, int] | None
    memory_limit_bytes: int | None
    input_file: str
    output_file: str
    tests: dict[str, dict[str, list[str]]]
    solutions: list[tuple[int, str]]
    incorrect_solutions: list[tuple[int, str]]
    # Per incorrect solution, when the source has the mutation column.
    mutations: list[dict[str, Any]] | None = None

    @property
    def time_limit_seconds(self) -> float | None:
        if not self.time_limit:
            return None
        return self.time_limit.get("seconds", 0) + self.time_limit.get("nanos", 0) / 1e9


@dataclass
class ProblemNames:
    """Names seen in a split: a repeated name gets ``" (2)"``, so problems never merge."""

    seen: Counter[str] = field(default_factory=Counter)

    def unique(self, name: str) -> str:
        self.seen[name] += 1
        count = self.seen[name]
        return name if count == 1 else f"{name} ({count})"


def parse_codecontests(raw: dict[str, Any], where: str, names: ProblemNames) -> Problem:
    name = _get(raw, "name", str, where)
    time_limit = _get(raw, "time_limit", dict, where, nullable=True)
    if time_limit is not None and not all(
        isinstance(time_limit.get(k, 0), int) for k in ("seconds", "nanos")
    ):
        raise BadRecord(where, "field 'time_limit' should be {seconds: int, nanos: int}")
    problem = Problem(
        problem_id=name,
        name=name,
        description=_get(raw, "description", str, where),
        difficulty=_get(raw, "difficulty", int, where),
        source=_get(raw, "source", int, where),
        cf_rating=_get(raw, "cf_rating", int, where, nullable=True),
        time_limit=time_limit,
        memory_limit_bytes=_get(raw, "memory_limit_bytes", int, where, nullable=True),
        input_file=raw.get("input_file") or "",
        output_file=raw.get("output_file") or "",
        tests={k: _tests(raw, f"{k}_tests", where) for k in ("public", "private", "generated")},
        solutions=_solutions(raw, "solutions", where),
        incorrect_solutions=_solutions(raw, "incorrect_solutions", where),
    )
    problem.mutations = _mutations(raw, where, problem.incorrect_solutions)
    if not 0 <= problem.difficulty <= 28:
        raise BadRecord(where, f"field 'difficulty' should be 0..28, got {problem.difficulty}")
    if not name.strip():
        raise BadRecord(where, "field 'name' is empty")
    problem.problem_id = names.unique(name)
    return problem


def codecontests_records(
    problem: Problem, include_python2: bool
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Alpaca records of a problem's Python solutions (correct first); dropped languages counted."""
    keep = {PYTHON3, PYTHON2} if include_python2 else {PYTHON3}
    records, dropped = [], Counter()
    has_tests = bool(problem.tests["public"]["input"])
    for is_correct, solutions in ((True, problem.solutions), (False, problem.incorrect_solutions)):
        kind = "correct" if is_correct else "incorrect"
        for i, (language, code) in enumerate(solutions):
            if language not in keep:
                dropped[LANGUAGES[language]] += 1
                continue
            metadata = {
                "source": "code_contests",
                "difficulty": problem.difficulty,
                "has_tests": has_tests,
                "problem_id": problem.problem_id,
                "language": LANGUAGES[language],
            }
            if not is_correct and problem.mutations is not None:
                # Offsets into ``output``, which is the solution text unchanged.
                metadata["mutation"] = dict(problem.mutations[i])
            records.append(
                {
                    "instruction": problem.description,
                    "input": "",
                    "output": code,
                    "task_id": f"{problem.problem_id}_{kind}_{i}",
                    "is_correct": is_correct,
                    "metadata": metadata,
                }
            )
    return records, dropped


def codecontests_eval_record(problem: Problem) -> dict[str, Any]:
    """One record per problem: statement, tests and limits, for evaluation."""
    return {
        "task_id": problem.problem_id,
        "instruction": problem.description,
        "input": "",
        "metadata": {
            "source": "code_contests",
            "name": problem.name,
            "difficulty": problem.difficulty,
            "cf_rating": problem.cf_rating,
            "time_limit": problem.time_limit,
            "time_limit_seconds": problem.time_limit_seconds,
            "memory_limit_bytes": problem.memory_limit_bytes,
            "input_file": problem.input_file,
            "output_file": problem.output_file,
            "public_tests": problem.tests["public"],
            "private_tests": problem.tests["private"],
            "generated_tests": problem.tests["generated"],
        },
    }


def codecontests_tests_entry(problem: Problem) -> dict[str, Any]:
    return {
        "task_name": problem.name,
        "public_tests": problem.tests["public"],
        "private_tests": problem.tests["private"],
        "generated_tests": problem.tests["generated"],
    }


def mbpp_entry_point(code: str, tests: list[str]) -> str | None:
    """The function the tests call: a top-level ``def`` of ``code`` named in the first test.

    Upstream took the first name after ``assert``, which is wrong for tests such as
    ``assert math.isclose(f(x), y)`` or ``assert set(f(x)) == ...``.
    """
    try:
        defined = [n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)]
    except SyntaxError:
        defined = []
    first = tests[0] if tests else ""
    for name in defined:
        if re.search(rf"\b{re.escape(name)}\s*\(", first):
            return name
    match = re.match(r"\s*assert\s+([A-Za-z_]\w*)\s*\(", first)
    return match.group(1) if match else None


def mbpp_record(raw: dict[str, Any], where: str) -> dict[str, Any]:
    task_id = _get(raw, "task_id", int, where)
    text, code = _get(raw, "text", str, where), _get(raw, "code", str, where)
    tests = _str_list(_get(raw, "test_list", list, where), "test_list", where)
    challenge = _str_list(
        _get(raw, "challenge_test_list", list, where), "challenge_test_list", where
    )
    entry_point = mbpp_entry_point(code, tests)
    instruction = text + (
        f"\n\nThe function should be named '{entry_point}'." if entry_point else ""
    )
    return {
        "instruction": instruction,
        "input": "",
        "output": code,
        "task_id": str(task_id),
        "metadata": {
            "source": "mbpp",
            "text": text,
            "entry_point": entry_point,
            "test_list": tests,
            "test_setup_code": _get(raw, "test_setup_code", str, where),
            "challenge_test_list": challenge,
            "has_tests": bool(tests),
        },
    }


def humaneval_record(raw: dict[str, Any], where: str) -> dict[str, Any]:
    values = {
        k: _get(raw, k, str, where)
        for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    }
    return {
        "instruction": values["prompt"],
        "input": "",
        "output": values["canonical_solution"],
        "task_id": values["task_id"],
        "metadata": {
            "source": "humaneval",
            "prompt": values["prompt"],
            "entry_point": values["entry_point"],
            "test": values["test"],
            "has_tests": True,
        },
    }


def gsm8k_final_answer(answer: str) -> str | None:
    """The reference answer: the text after the last ``####``, stripped, commas removed."""
    if "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_record(raw: dict[str, Any], where: str, index: int) -> dict[str, Any]:
    question, answer = _get(raw, "question", str, where), _get(raw, "answer", str, where)
    final = gsm8k_final_answer(answer)
    if not final:
        raise BadRecord(where, "field 'answer' has no final '#### <number>' line")
    return {
        "instruction": question,
        "input": "",
        "output": answer,
        "task_id": f"gsm8k_{index}",
        "metadata": {"source": "gsm8k", "final_answer": final},
    }
