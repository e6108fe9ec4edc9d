"""Prompts, stop rules and answer checks of the four benchmarks (docs/EVALUATION.md §1-§2).

Two prompt modes:

* ``compat``: the published format of each benchmark, for comparability with reported numbers;
* ``alpaca``: the training template over the stored record (``format_prompt(instruction)``),
  so fine-tuned checkpoints see exactly the framing they were trained and length-filtered with
  (no text at evaluation time that was absent in training: docs/EVALUATION.md §1).

Nothing here executes code: execution-based tasks only build the program text that the sandbox
runs. Records are the processed records of ``weighted_mtp.storage.dataset_records``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from weighted_mtp.data.alpaca import format_prompt

PromptMode = Literal["compat", "alpaca"]
Record = Mapping[str, Any]

# Special-token text a decoder may leave in the continuation; cut there too, since leftovers
# such as "<|endoftext|>" turn correct code into syntax errors (bigcode#311).
EOS_STRINGS = ("<|endoftext|>", "</s>", "<|im_end|>")
# The next Alpaca section: a fine-tuned model that does not stop at EOS starts a new turn here.
ALPACA_STOPS = ("\n### ",)
MIB = 1024 * 1024


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (applied to continuations only)."""
    cut = len(text)
    for stop in stops:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$", re.MULTILINE)


def strip_fence(text: str) -> str:
    """The code inside a Markdown fence, each line kept byte for byte (indentation preserved).

    * no fence line: ``text`` unchanged;
    * the first fence has a language tag, or nothing but blank lines before it: it opens a block,
      whose content (up to the next fence line or the end) is returned;
    * otherwise it closes code the prompt already opened: the text before it is returned.

    Never ``strip()``: a HumanEval continuation starts with the body's indentation.
    """
    first = _FENCE.search(text)
    if first is None:
        return text
    before = text[: first.start()]
    if not first.group(1) and before.strip():
        return before
    body = text[first.end() + 1 :]  # skip the fence line's newline
    close = _FENCE.search(body)
    return body if close is None else body[: close.start()]


def _check_mode(mode: str, allowed: Sequence[str]) -> None:
    if mode not in allowed:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(allowed)}")


def alpaca_prompt(record: Record) -> str:
    """The training template over a stored record."""
    return format_prompt(record["instruction"], record.get("input", ""))


@dataclass(frozen=True)
class Task:
    """What every benchmark shares: prompt, stop strings, post-processing."""

    name: str = ""
    compat_stops: tuple[str, ...] = ()
    alpaca_stops: tuple[str, ...] = ALPACA_STOPS

    def prompt(self, record: Record, mode: PromptMode = "compat") -> str:
        _check_mode(mode, ("compat", "alpaca"))
        return self.compat_prompt(record) if mode == "compat" else alpaca_prompt(record)

    def compat_prompt(self, record: Record) -> str:
        raise NotImplementedError

    def stop_sequences(self, mode: PromptMode = "compat", eos: Sequence[str] = ()) -> list[str]:
        """Stop strings for ``mode``; ``eos`` adds the tokenizer's own EOS text."""
        _check_mode(mode, ("compat", "alpaca"))
        stops = self.compat_stops if mode == "compat" else self.alpaca_stops
        return list(dict.fromkeys([*stops, *EOS_STRINGS, *eos]))

    def postprocess(
        self, completion: str, mode: PromptMode = "compat", eos: Sequence[str] = ()
    ) -> str:
        """Cut the continuation at the stop strings (as generation would have), then unfence."""
        return strip_fence(cut_at_stops(completion, self.stop_sequences(mode, eos)))


# --- HumanEval (docs/EVALUATION.md §1) ---------------------------------------------------------

# The Codex paper / lm-eval five plus "\n@" (the compat default, docs/EVALUATION.md §1).
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n@")
# A fine-tuned model writes the whole function, so "\ndef" cannot stop it (bigcode#119).
HUMANEVAL_ALPACA_STOPS = (*ALPACA_STOPS, "\nif __name__", "\nprint(", "\nassert ", "\n```")


@dataclass(frozen=True)
class HumanEval(Task):
    name: str = "humaneval"
    compat_stops: tuple[str, ...] = HUMANEVAL_STOPS
    alpaca_stops: tuple[str, ...] = HUMANEVAL_ALPACA_STOPS

    def compat_prompt(self, record: Record) -> str:
        # Verbatim, trailing newline kept (bigcode's .strip() swings scores, bigcode#308).
        return record["metadata"]["prompt"]

    def program(self, record: Record, completion: str) -> str:
        """``prompt + completion + test + check(entry_point)``: passes iff it runs to the end.

        A completion that rewrites the whole function (alpaca mode) still works: the prompt's
        docstring-only ``def`` is simply redefined.
        """
        meta = record["metadata"]
        return f"{meta['prompt']}{completion}\n{meta['test']}\ncheck({meta['entry_point']})\n"

    def strict_job(self, record: Record, completion: str) -> dict[str, Any]:
        """Strict scoring: the sandbox runs ``prompt + completion`` only; the trusted tester
        runs the prompt (for its helper functions), the test and ``check(entry_point)``, and
        calls the candidate's functions over the plain-data channel."""
        meta = record["metadata"]
        tests = {
            "setup": _trusted_prompt(meta["prompt"]),
            "test": f"{meta['test']}\ncheck({meta['entry_point']})\n",
            "entry_point": meta["entry_point"],
        }
        return {"program": f"{meta['prompt']}{completion}\n", "check": "function", "tests": tests}


@functools.lru_cache(maxsize=4096)  # every sample of a task has the same prompt
def _trusted_prompt(prompt: str) -> str:
    """The prompt as trusted setup code: as is when it compiles (HumanEval's end with the
    docstring), else with a ``pass`` body closing its last ``def``, else nothing."""
    for text in (prompt, prompt.rstrip("\n") + "\n    pass\n"):
        try:
            compile(text, "<prompt>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            continue
        return text
    return ""


# --- MBPP (docs/EVALUATION.md §1) --------------------------------------------------------------

MBPP_FEWSHOT_IDS = ("2", "3", "4")  # Austin et al. / lm-eval exemplars, in this order


def _mbpp_block(record: Record) -> str:
    meta = record["metadata"]
    tests = "\n".join(meta["test_list"][:3])
    return (
        f"You are an expert Python programmer, and here is your task: {meta['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


@dataclass(frozen=True)
class MBPP(Task):
    """MBPP; compat is the 3-shot prompt with the asserts shown, which needs the exemplars."""

    name: str = "mbpp"
    compat_stops: tuple[str, ...] = ("[DONE]",)
    fewshot: tuple[Record, ...] = ()

    def with_fewshot(self, records: Sequence[Record]) -> MBPP:
        """A copy holding exemplars task_ids 2, 3, 4 (in that order) picked from ``records``."""
        by_id = {str(r["task_id"]): r for r in records}
        missing = [i for i in MBPP_FEWSHOT_IDS if i not in by_id]
        if missing:
            raise ValueError(f"MBPP few-shot exemplars missing: task_ids {missing}")
        return replace(self, fewshot=tuple(by_id[i] for i in MBPP_FEWSHOT_IDS))

    def compat_prompt(self, record: Record) -> str:
        if not self.fewshot:
            raise ValueError("MBPP compat prompt needs exemplars: use TASKS['mbpp'].with_fewshot")
        # lm-eval `mbpp`: shots end "code\n[DONE]", joined by a blank line, target at "[BEGIN]\n".
        shots = [_mbpp_block(r) + f"{r['output']}\n[DONE]" for r in self.fewshot]
        return "\n\n".join([*shots, _mbpp_block(record)])

    def program(self, record: Record, completion: str, mode: str = "default") -> str:
        """Setup code + code + the three asserts; passes iff no exception.

        ``compat`` omits ``test_setup_code``, as bigcode and lm-eval do (log those tasks with
        :meth:`has_setup_code`); the default runs it (docs/EVALUATION.md §2).
        """
        _check_mode(mode, ("default", "compat"))
        meta = record["metadata"]
        tests = "\n".join(meta["test_list"])
        if mode == "compat":
            return f"{completion}\n{tests}\n"
        return f"{meta.get('test_setup_code') or ''}\n{completion}\n\n{tests}\n"

    def strict_job(self, record: Record, completion: str) -> dict[str, Any]:
        """Strict scoring: the sandbox runs setup code + code; the trusted tester runs the setup
        code and the asserts, calling the candidate's names over the plain-data channel."""
        meta = record["metadata"]
        setup = meta.get("test_setup_code") or ""
        tests = {
            "setup": setup,
            "test": "\n".join(meta["test_list"]) + "\n",
            "entry_point": meta.get("entry_point") or "",
        }
        return {"program": f"{setup}\n{completion}\n", "check": "function", "tests": tests}

    @staticmethod
    def has_setup_code(record: Record) -> bool:
        return bool((record["metadata"].get("test_setup_code") or "").strip())


# --- CodeContests (docs/EVALUATION.md §1-§2) ---------------------------------------------------

CODECONTESTS_INSTRUCTION = (
    "Write a complete Python 3 program that reads from standard input and writes to standard "
    "output. Put the whole program in one ```python code block."
)
TEST_SETS = ("public_tests", "private_tests", "generated_tests")
# ASCII digits only (``\d`` would take "١٢" for 12, which CodeContests' checker does not).
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?|[+-]?(?:nan|inf|infinity)")
INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class Limits:
    """Per-test limits handed to the sandbox."""

    time_seconds: float
    memory_bytes: int


def _tokens(text: str) -> list[str]:
    # Split on space, \n, \t, \r, \v and lowercase, as code_contests' OutputsMatch does.
    return [t.lower() for t in re.split(r"[ \n\t\r\v]+", text) if t]


def _float(token: str) -> float | None:
    return float(token) if _FLOAT.fullmatch(token) else None


def _tokens_match_compat(a: str, b: str) -> bool:
    fa, fb = _float(a), _float(b)
    if fa is None or fb is None:
        return a == b
    ints = [int(t) if _INT.fullmatch(t) else None for t in (a, b)]
    if any(i is None or not INT32[0] <= i <= INT32[1] for i in ints):
        # Outside int32 both become doubles: absolute 1e-5 only, nan never matches.
        return abs(fa - fb) < 1e-5
    return ints[0] == ints[1]


def _tokens_match_default(expected: str, actual: str, tol: float) -> bool:
    if expected == actual:  # also "nan" == "nan", which compat's float path rejects
        return True
    if _INT.fullmatch(expected):
        # An integer answer is matched exactly (as a decimal, so "3.0" still equals "3"), never
        # within a tolerance: "1000001.0" is not 1000000 and "1e18" is not 10**18 + 7.
        if _FLOAT.fullmatch(actual) is None:
            return False
        try:
            return Decimal(actual) == Decimal(expected)
        except InvalidOperation:
            return False
    fe, fa = _float(expected), _float(actual)
    if fe is None or fa is None:
        return expected == actual
    if fe == fa:  # equal infinities ("inf" vs "1e400"), where fa - fe is nan
        return True
    if not (math.isfinite(fe) and math.isfinite(fa)):
        return False  # an infinite bound would accept any number
    return abs(fa - fe) <= tol * max(1.0, abs(fe))


def compare_output(
    expected: str, actual: str, mode: str = "default", tolerance: float = 1e-5
) -> bool:
    """Whether a program's stdout ``actual`` matches ``expected``.

    * ``default``: code_contests tokenisation and case folding; an integer expected token
      matches only the same number exactly (``3``, ``3.0``); other numbers match when
      ``|a - b| <= tolerance * max(1, |expected|)``, never against an infinity unless equal;
    * ``compat``: code_contests ``OutputsMatch`` exactly (int32 ints, absolute 1e-5 otherwise);
    * ``strip``: the upstream weighted-mtp check ``expected.strip() == actual.strip()``.
    """
    _check_mode(mode, ("default", "compat", "strip"))
    if mode == "strip":
        return expected.strip() == actual.strip()
    want, got = _tokens(expected), _tokens(actual)
    if want == got:
        return True
    if len(want) != len(got):
        return False
    if mode == "compat":
        return all(_tokens_match_compat(w, g) for w, g in zip(want, got, strict=True))
    return all(_tokens_match_default(w, g, tolerance) for w, g in zip(want, got, strict=True))


@dataclass(frozen=True)
class CodeContests(Task):
    """Records are the ``*_eval.jsonl`` ones: one per problem, with its tests and limits."""

    name: str = "codecontests"
    compat_stops: tuple[str, ...] = ALPACA_STOPS  # no standard list exists: ours, recorded
    time_factor: float = 3.0
    time_bounds: tuple[float, float] = (2.0, 10.0)
    memory_slack_bytes: int = 64 * MIB
    memory_min_bytes: int = 256 * MIB

    def compat_prompt(self, record: Record) -> str:
        # The statement already holds the Input/Output sections and the public examples.
        return f"{record['instruction']}\n\n{CODECONTESTS_INSTRUCTION}\n"

    def program(self, record: Record, completion: str) -> str:
        """The solution itself, a stdin/stdout program run once per test."""
        return completion if completion.endswith("\n") else completion + "\n"

    @staticmethod
    def tests(record: Record) -> list[tuple[str, str]]:
        """All (input, expected output) pairs: public, private, generated, in that order."""
        pairs: list[tuple[str, str]] = []
        for key in TEST_SETS:
            tests = record["metadata"].get(key) or {"input": [], "output": []}
            pairs.extend(zip(tests["input"], tests["output"], strict=True))
        return pairs

    @staticmethod
    def public_tests(record: Record) -> list[tuple[str, str]]:
        """Public tests only, for the diagnostic public-only score."""
        tests = record["metadata"].get("public_tests") or {"input": [], "output": []}
        return list(zip(tests["input"], tests["output"], strict=True))

    @staticmethod
    def uses_files(record: Record) -> bool:
        """Problems reading/writing named files instead of stdio: recorded and skipped."""
        meta = record["metadata"]
        return bool(meta.get("input_file") or meta.get("output_file"))

    def limits(self, record: Record) -> Limits:
        """``clamp(3 x time limit, 2 s, 10 s)`` wall and ``memory limit + 64 MiB`` (>= 256 MiB).

        Python needs the slack: the reference limits are set for C++. A missing time limit gets
        the upper bound, a missing memory limit the minimum.
        """
        meta = record["metadata"]
        lo, hi = self.time_bounds
        seconds = meta.get("time_limit_seconds")
        time_s = hi if not seconds else min(hi, max(lo, self.time_factor * seconds))
        memory = meta.get("memory_limit_bytes")
        memory_b = max(self.memory_min_bytes, (memory or 0) + self.memory_slack_bytes)
        return Limits(time_seconds=time_s, memory_bytes=memory_b)


# --- GSM8K (docs/EVALUATION.md §1-§2) ----------------------------------------------------------

# A number: optional sign and $, thousands commas, decimals ("42." keeps its period outside),
# or a leading-dot decimal (".5"); ASCII digits only.
_NUM = r"-?\$?(?:[0-9](?:[0-9,]*[0-9])?(?:\.[0-9]+)?|\.[0-9]+)"
# Our default extraction (docs/EVALUATION.md §2): a priority list, each pattern taking its *last* match,
# because models that recite few-shot answers make the first match wrong (lm-eval#3438).
_GSM8K_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        rf"####\s*({_NUM})",
        rf"the (?:final )?answer is\s*:?\s*({_NUM})",
        rf"answer\s*[:=]\s*({_NUM})",
        rf"therefore\b[^\n]*?({_NUM})",
        rf"=\s*({_NUM})",
        rf"({_NUM})",
    )
)
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# lm-eval exact_match's regexes_to_ignore for gsm8k, applied in this order.
_LM_EVAL_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def normalise_number(text: str) -> str:
    """Remove ``,`` and ``$`` and one trailing ``.``: ``"$1,234."`` -> ``"1234"``."""
    text = text.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def _lm_eval_normalise(text: str) -> str:
    for pattern in _LM_EVAL_IGNORE:
        text = re.sub(pattern, "", text)
    return text.strip().lower()


def _extract_default(text: str) -> str | None:
    # Only the model's response counts when an Alpaca prompt was echoed back.
    text = text.rsplit("### Response:", 1)[-1]
    for pattern in _GSM8K_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return normalise_number(matches[-1])
    return None


def extract_answer(text: str, mode: str = "default") -> str | None:
    """The predicted answer of a GSM8K response, or None (lm-eval's ``[invalid]``): wrong.

    * ``default``: ours, normalised (``"1234"``, ``"-3.5"``);
    * ``strict``: lm-eval strict-match, the *first* ``#### N``, raw;
    * ``flexible``: lm-eval flexible-extract, the *last* number-like run, raw.
    """
    _check_mode(mode, ("default", "strict", "flexible"))
    if mode == "default":
        return _extract_default(text)
    if mode == "strict":
        match = _STRICT.search(text)
        return match.group(1) if match else None
    matches = _FLEXIBLE.findall(text)
    if not matches:
        return None
    return next(g for g in matches[-1] if g)


def is_correct(pred: str | None, gold: str, mode: str = "default") -> bool:
    """Whether an extracted answer equals ``metadata.final_answer``.

    ``default`` compares numerically as Decimals (``18.00 == 18``); ``strict``/``flexible``
    reproduce lm-eval's case-insensitive exact match after its normalisation.
    """
    _check_mode(mode, ("default", "strict", "flexible"))
    if pred is None:
        return False
    if mode != "default":
        return _lm_eval_normalise(pred) == _lm_eval_normalise(gold)
    a, b = normalise_number(pred), normalise_number(gold)
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a == b


@dataclass(frozen=True)
class GSM8K(Task):
    """GSM8K; compat is lm-eval ``gsm8k`` (zero-shot unless exemplars are given)."""

    name: str = "gsm8k"
    compat_stops: tuple[str, ...] = ("Question:",)
    fewshot: tuple[Record, ...] = ()

    def with_fewshot(self, records: Sequence[Record]) -> GSM8K:
        """A copy using ``records`` (train records, full worked answers) as exemplars."""
        return replace(self, fewshot=tuple(records))

    def compat_prompt(self, record: Record) -> str:
        shots = [f"Question: {r['instruction']}\nAnswer: {r['output']}" for r in self.fewshot]
        return "\n\n".join([*shots, f"Question: {record['instruction']}\nAnswer:"])

    def postprocess(
        self, completion: str, mode: PromptMode = "compat", eos: Sequence[str] = ()
    ) -> str:
        # Prose answers: cut at the stops, but no fence handling.
        return cut_at_stops(completion, self.stop_sequences(mode, eos))

    @staticmethod
    def gold(record: Record) -> str:
        return record["metadata"]["final_answer"]

    extract_answer = staticmethod(extract_answer)
    is_correct = staticmethod(is_correct)


TASKS: dict[str, Task] = {
    "humaneval": HumanEval(),
    "mbpp": MBPP(),
    "codecontests": CodeContests(),
    "gsm8k": GSM8K(),
}
