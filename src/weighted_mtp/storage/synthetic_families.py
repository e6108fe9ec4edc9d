"""The problem families of the known-answer CodeContests source (docs/DATA.md §1-§3).

A family is a stdin/stdout task: how to draw its statement variant and its test inputs, its
statement wordings (the last one is held out for the valid and test splits), a reference
``solve(params, data, bug)``, and several correct solution styles. The task's numbers and
letters (a threshold, a modulus, a base, the letters to count) are part of every test's input,
as in CodeContests problems; a statement variant (``params``: strict or non-strict comparison)
is a choice of words that changes an operator of the solution. A style is Python 3 source
with ``{{name}}`` markers: a variant parameter (its value) or a *mutation site* (a short piece
of code that a :class:`Mutation` may replace by one wrong alternative). ``solve`` with ``bug`` set to a
mutation's ``bug`` name computes what the mutated program prints, so the generator can check,
in-process and without running any candidate code, that each incorrect solution fails at least
one test. :data:`CRASH` stands for a mutated program that raises.

Every family also has edge inputs: the cases that tell its mutations apart (a value equal to
the threshold, an empty selection, all values negative, ...).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from typing import Any

# The six recorded mutation kinds (docs/DATA.md §2).
KINDS = (
    "comparison_flipped",
    "off_by_one",
    "wrong_variable",
    "wrong_operator",
    "missing_case",
    "wrong_initial_value",
)
CRASH = None  # what ``solve`` returns for a mutated program that raises
MARK = re.compile(r"\{\{(\w+)\}\}")

Params = dict[str, Any]


@dataclass(frozen=True)
class Mutation:
    """One wrong alternative of a site: its kind, its text and the reference's bug name."""

    site: str
    kind: str
    text: str
    bug: str


@dataclass(frozen=True)
class Style:
    """A correct solution written one way, with its mutation sites and their mutations."""

    name: str
    code: str
    sites: dict[str, str]
    mutations: tuple[Mutation, ...]


@dataclass(frozen=True)
class Rendered:
    """A solution's text; for a mutant, the ``[start, end)`` span of the replaced site."""

    code: str
    span: tuple[int, int] | None = None
    original: str = ""


def _fill(text: str, params: Params) -> str:
    return MARK.sub(lambda m: str(params[m.group(1)]), text)


def render(style: Style, params: Params, mutation: Mutation | None = None) -> Rendered:
    """The style's code with parameters filled in, and with ``mutation`` applied if given.

    The span is in characters of the returned code: where the replacement text sits."""
    parts: list[str] = []
    length, pos = 0, 0
    span, original = None, ""
    for match in MARK.finditer(style.code):
        parts.append(style.code[pos : match.start()])
        length += match.start() - pos
        pos = match.end()
        name = match.group(1)
        if name in style.sites:
            text = _fill(style.sites[name], params)
            if mutation is not None and name == mutation.site:
                original = text
                text = _fill(mutation.text, params)
                span = (length, length + len(text))
        else:
            text = str(params[name])
        parts.append(text)
        length += len(text)
    parts.append(style.code[pos:])
    if mutation is not None and span is None:
        raise ValueError(f"style {style.name}: no site {mutation.site}")
    return Rendered("".join(parts), span, original)


@dataclass(frozen=True)
class Family:
    """A task: statement variant, test inputs, statement, reference and solution styles."""

    name: str
    tags: tuple[str, ...]
    intros: tuple[str, ...]  # str.format templates over the params; the last is held out
    input_spec: str
    output_spec: str
    draw_params: Callable[[random.Random], Params]  # the statement variant ({} if none)
    draw_input: Callable[[random.Random, Params, int], Any]  # level 1..3
    edge_inputs: Callable[[random.Random, Params], list[Any]]
    format_input: Callable[[Params, Any], str]  # the stdin of one test
    solve: Callable[[Params, Any, str | None], str | None]
    styles: tuple[Style, ...]


# ---- shared helpers ----


def _size(rng: random.Random, level: int, sizes: tuple[tuple[int, int], ...]) -> int:
    lo, hi = sizes[level - 1]
    return rng.randint(lo, hi)


LIST_SIZES = ((1, 8), (5, 40), (30, 200))
VALUE_SPAN = (20, 500, 10**6)


def _int_list(rng: random.Random, level: int, around: int = 0, lo: int | None = None) -> list[int]:
    n = _size(rng, level, LIST_SIZES)
    span = VALUE_SPAN[level - 1]
    low = around - span if lo is None else lo
    return [rng.randint(low, around + span) for _ in range(n)]


def _list_text(head: Any, values: list[int]) -> str:
    """``n head`` on the first line (``n`` alone when ``head`` is None), the values on the second."""
    first = f"{len(values)}" if head is None else f"{len(values)} {head}"
    return f"{first}\n{' '.join(map(str, values))}\n"


def _lines(values: list[Any]) -> str:
    return "".join(f"{v}\n" for v in values)


def _strictness(
    rng: random.Random, strict_words: tuple[str, str], loose_words: tuple[str, str]
) -> Params:
    """A strict or non-strict "at least" variant: its operator, the reversed and the shifted
    operator (the mutations' texts), and two wordings of the relation for the statement."""
    strict = rng.random() < 0.5
    words = strict_words if strict else loose_words
    return {
        "strict": strict,
        "cmp": ">" if strict else ">=",
        "cmp_flip": "<" if strict else "<=",
        "cmp_not": "<=" if strict else "<",
        "cmp_edge": ">=" if strict else ">",
        "relation": words[0],
        "relation2": words[1],
    }


READ_NK = "n, k = map(int, input().split())\na = list(map(int, input().split()))\n"


# ---- 1. sum of the values over a threshold (list processing) ----


def _threshold_solve(p: Params, data: tuple[int, list[int]], bug: str | None) -> str | None:
    k, a = data
    strict = p["strict"]
    if bug == "boundary":
        strict = not strict
    if bug == "skip_first":
        a = a[1:]
    if bug == "flip":
        chosen = [x for x in a if (x < k if strict else x <= k)]
    else:
        chosen = [x for x in a if (x > k if strict else x >= k)]
    added = [len(data[1]) for _ in chosen] if bug == "wrong_var" else chosen
    return f"{(1 if bug == 'init' else 0) + sum(added)}\n"


def _threshold_input(rng: random.Random, p: Params, level: int) -> tuple[int, list[int]]:
    k = rng.randint(-50, 50)
    return k, _int_list(rng, level, around=k)


SUM_THRESHOLD = Family(
    name="sum_threshold",
    tags=("implementation",),
    intros=(
        "You are given n integers and a number k. Print the sum of those that are {relation} k.",
        "A list of n numbers is written on a board, together with a bound k. Add up every "
        "number that is {relation2} k (only the numbers {relation} k count) and print the total.",
        "Petya keeps the scores of n games and has a target k. He wants the total of the scores "
        "{relation} k. Help him.",
        "Compute the sum of all elements of the array that are {relation} k. If there is no "
        "such element, the sum is 0.",
        "Among n given integers, select the ones {relation} the given k and output their sum "
        "(0 when nothing is selected).",
    ),
    input_spec="The first line contains n and k. The second line contains n integers.",
    output_spec="Print one integer: the sum.",
    draw_params=lambda rng: _strictness(
        rng, ("strictly greater than", "larger than"), ("greater than or equal to", "at least")
    ),
    draw_input=_threshold_input,
    edge_inputs=lambda rng, p: [
        (k, a) for k in [rng.randint(-50, 50)] for a in ([k], [k - 1, k, k + 1], [k - 3])
    ],
    format_input=lambda p, data: _list_text(data[0], data[1]),
    solve=_threshold_solve,
    styles=(
        Style(
            "loop",
            READ_NK + "total = {{init}}\nfor x in a:\n    if x {{op}} k:\n"
            "        total += {{add}}\nprint(total)\n",
            {"init": "0", "op": "{{cmp}}", "add": "x"},
            (
                Mutation("op", "comparison_flipped", "{{cmp_flip}}", "flip"),
                Mutation("op", "off_by_one", "{{cmp_edge}}", "boundary"),
                Mutation("init", "wrong_initial_value", "1", "init"),
                Mutation("add", "wrong_variable", "n", "wrong_var"),
            ),
        ),
        Style(
            "generator",
            "k = int(input().split()[1])\n"
            "print(sum(x for x in map(int, input().split()) if x {{op}} k))\n",
            {"op": "{{cmp}}"},
            (
                Mutation("op", "comparison_flipped", "{{cmp_flip}}", "flip"),
                Mutation("op", "off_by_one", "{{cmp_edge}}", "boundary"),
            ),
        ),
        Style(
            "filter",
            "import sys\n\ndata = sys.stdin.read().split()\nn, k = int(data[0]), int(data[1])\n"
            "values = [int(t) for t in data[{{lo}}:2 + n]]\n"
            "chosen = [v for v in values if v {{op}} k]\nprint(sum(chosen))\n",
            {"lo": "2", "op": "{{cmp}}"},
            (
                Mutation("lo", "off_by_one", "3", "skip_first"),
                Mutation("op", "comparison_flipped", "{{cmp_flip}}", "flip"),
            ),
        ),
    ),
)


# ---- 2. counting two letters (string processing) ----


def _letters_pair(rng: random.Random) -> tuple[str, str]:
    c, d = sorted(rng.sample(string.ascii_lowercase, 2))
    return c, d


def _letters_input(rng: random.Random, p: Params, level: int) -> tuple[str, str, str]:
    c, d = _letters_pair(rng)
    n = _size(rng, level, ((1, 10), (5, 60), (50, 300)))
    pool = [c, d, *rng.sample(string.ascii_lowercase, 3)]
    return c, d, "".join(rng.choice(pool) for _ in range(n))


def _letters_solve(p: Params, data: tuple[str, str, str], bug: str | None) -> str | None:
    c, d, s = data
    if bug == "and":
        count = sum(1 for ch in s if ch == c and ch == d)
    elif bug == "flip_first":
        count = sum(1 for ch in s if ch != c or ch == d)
    elif bug == "minus":
        count = s.count(c) - s.count(d)
    elif bug == "only_c":
        count = s.count(c)
    elif bug == "not_in":
        count = sum(1 for ch in s if ch not in (c, d))
    else:
        count = s.count(c) + s.count(d)
    return f"{count + (bug == 'init')}\n"


def _letters_edges(rng: random.Random, p: Params) -> list[tuple[str, str, str]]:
    c, d = _letters_pair(rng)
    other = next(ch for ch in "xyzw" if ch not in (c, d))
    return [(c, d, s) for s in (other, c, d * 2 + c, c + d)]


READ_LETTERS = "c, d = input().split()\ns = input().strip()\n"

COUNT_LETTERS = Family(
    name="count_letters",
    tags=("strings",),
    intros=(
        "Given two letters c and d and a string s of lowercase letters, count how many "
        "characters of s are c or d.",
        "A message consists of lowercase English letters. How many letters of the message are "
        "either of the two given letters?",
        "Vasya typed a word. Count the positions holding the letter c plus the positions "
        "holding the letter d.",
        "Print the total number of occurrences of the letters c and d in the given string.",
        "Each character of the string is a letter. Report how many characters belong to the set "
        "{{c, d}} of the two letters on the first line.",
    ),
    input_spec="The first line contains two different lowercase letters c and d. The second "
    "line contains the string s (1 <= |s|).",
    output_spec="Print one integer: the count.",
    draw_params=lambda rng: {},
    draw_input=_letters_input,
    edge_inputs=_letters_edges,
    format_input=lambda p, data: f"{data[0]} {data[1]}\n{data[2]}\n",
    solve=_letters_solve,
    styles=(
        Style(
            "loop",
            READ_LETTERS + "count = {{init}}\nfor ch in s:\n"
            "    if ch {{eq}} c {{logic}} ch == d:\n        count += 1\nprint(count)\n",
            {"init": "0", "eq": "==", "logic": "or"},
            (
                Mutation("init", "wrong_initial_value", "1", "init"),
                Mutation("eq", "comparison_flipped", "!=", "flip_first"),
                Mutation("logic", "wrong_operator", "and", "and"),
            ),
        ),
        Style(
            "count",
            READ_LETTERS + "print(s.count(c) {{plus}} s.count(d))\n",
            {"plus": "+"},
            (Mutation("plus", "wrong_operator", "-", "minus"),),
        ),
        Style(
            "set",
            READ_LETTERS
            + "wanted = {{wanted}}\nprint(sum(1 for ch in s if ch {{member}} wanted))\n",
            {"wanted": "{c, d}", "member": "in"},
            (
                Mutation("wanted", "missing_case", "{c}", "only_c"),
                Mutation("member", "comparison_flipped", "not in", "not_in"),
            ),
        ),
    ),
)


# ---- 3. best period after a daily fee (simple DP: maximum segment sum) ----


def _fee_solve(p: Params, data: tuple[int, list[int]], bug: str | None) -> str | None:
    f, a = data
    values = [x + f if bug == "fee_plus" else x - f for x in a]
    if bug == "prefix_flip":
        best, prefix, lowest = None, 0, 0
        for v in values:
            prefix += v
            if best is None or prefix - lowest < best:
                best = prefix - lowest
            lowest = min(lowest, prefix)
        return f"{best}\n"
    best, cur = (0 if bug == "init0" else -(10**18)), 0
    for x, v in zip(a, values, strict=True):
        cur = max(v, cur + (x if bug == "cur_x" else v))
        best = max(best, cur)
    return f"{best}\n"


def _fee_input(rng: random.Random, p: Params, level: int) -> tuple[int, list[int]]:
    f = rng.randint(0, 300)
    return f, _int_list(rng, level, around=f)


READ_NF = "n, f = map(int, input().split())\na = list(map(int, input().split()))\n"

BEST_PERIOD = Family(
    name="best_period",
    tags=("dp",),
    intros=(
        "A shop earned a_i coins on day i, but renting the stall costs f coins per day. Choose "
        "a non-empty block of consecutive days with the largest net profit (earnings minus "
        "rent) and print that profit.",
        "You are given n integers and a cost f. For a non-empty contiguous segment, its "
        "value is the sum of (a_i - f) over the segment. Print the maximum value.",
        "Subtract f from every element of the array, then find the largest sum of a "
        "non-empty contiguous subarray.",
        "A miner digs for n days; day i yields a_i grams of gold and costs f grams of supplies. "
        "Over which consecutive days (at least one) is the net gain largest? Print that gain.",
        "Each of n consecutive hours has a score a_i, and staying costs f per hour. Pick a "
        "non-empty interval of hours maximising the total score minus the cost; print the "
        "maximum (it may be negative).",
    ),
    input_spec="The first line contains n (n >= 1) and f. The second line contains n integers a_i.",
    output_spec="Print one integer: the maximum net value.",
    draw_params=lambda rng: {},
    draw_input=_fee_input,
    edge_inputs=lambda rng, p: [
        (f, a)
        for f in [rng.randint(0, 300)]
        for a in (
            [f - 5, f - 3],
            [f + 4],
            [f + 10, f - 30, f + 12],
            [f - 1, f + 50, f - 60, f + 50],
        )
    ],
    format_input=lambda p, data: _list_text(data[0], data[1]),
    solve=_fee_solve,
    styles=(
        Style(
            "kadane",
            READ_NF + "best = {{init}}\ncur = 0\nfor x in a:\n    v = x {{minus}} f\n"
            "    cur = max(v, cur + {{v}})\n    best = max(best, cur)\nprint(best)\n",
            {"init": "-10**18", "minus": "-", "v": "v"},
            (
                Mutation("init", "wrong_initial_value", "0", "init0"),
                Mutation("minus", "wrong_operator", "+", "fee_plus"),
                Mutation("v", "wrong_variable", "x", "cur_x"),
            ),
        ),
        Style(
            "prefix",
            READ_NF + "best = None\nprefix = 0\nlowest = 0\nfor x in a:\n"
            "    prefix += x {{minus}} f\n"
            "    if best is None or prefix - lowest {{gt}} best:\n        best = prefix - lowest\n"
            "    lowest = min(lowest, prefix)\nprint(best)\n",
            {"minus": "-", "gt": ">"},
            (
                Mutation("minus", "wrong_operator", "+", "fee_plus"),
                Mutation("gt", "comparison_flipped", "<", "prefix_flip"),
            ),
        ),
    ),
)


# ---- 4. range sums modulo M (prefix sums, queries) ----

Ranges = tuple[int, list[int], list[tuple[int, int]]]


def _queries(rng: random.Random, level: int, n: int) -> list[tuple[int, int]]:
    q = _size(rng, level, ((1, 4), (3, 10), (10, 40)))
    queries = []
    for _ in range(q):
        left = rng.randint(1, n)
        queries.append((left, rng.randint(left, n)))
    return queries


def _ranges_input(rng: random.Random, p: Params, level: int) -> Ranges:
    m = rng.randint(2, 1000)
    a = _int_list(rng, level)
    return m, a, _queries(rng, level, len(a))


def _ranges_text(data: Ranges) -> str:
    m, a, queries = data
    lines = [f"{len(a)} {len(queries)} {m}", " ".join(map(str, a))]
    return "\n".join(lines + [f"{lo} {hi}" for lo, hi in queries]) + "\n"


def _ranges_solve(p: Params, data: Ranges, bug: str | None) -> str | None:
    m, a, queries = data
    out = []
    for left, right in queries:
        lo = left if bug == "left_l" else left - 1
        hi = right - 1 if bug == "right_short" else right
        total = sum(a[lo:hi])
        out.append(total // m if bug == "floordiv" else total % m)
    return _lines(out)


RANGE_SUMS = Family(
    name="range_sums",
    tags=("prefix sums", "queries"),
    intros=(
        "You are given an array a_1..a_n, a modulus m and q queries (l, r). For each query "
        "print (a_l + ... + a_r) mod m, as a number between 0 and m - 1.",
        "A ledger holds n signed amounts. Answer q questions: the total of the entries l "
        "through r (inclusive, 1-based), reduced modulo m to the range [0, m).",
        "For every query l r, output the sum of the array elements with indices from l to r "
        "inclusive, taken modulo m (the result is never negative).",
        "Answer q range-sum queries on an array of n integers; print each sum modulo m, "
        "normalised to 0..m-1. Indices start at 1.",
        "Given n integers and q pairs of 1-based positions l <= r, report for every pair the "
        "remainder of a_l + a_(l+1) + ... + a_r when divided by m (between 0 and m - 1).",
    ),
    input_spec="The first line contains n, q and m (m >= 2). The second line contains n "
    "integers. Each of the next q lines contains l and r (1 <= l <= r <= n).",
    output_spec="Print q lines, one answer per query.",
    draw_params=lambda rng: {},
    draw_input=_ranges_input,
    edge_inputs=lambda rng, p: [
        (m, a, queries)
        for m in [rng.randint(2, 1000)]
        for a, queries in (
            ([1, 2, 3], [(1, 1), (1, 3), (3, 3)]),
            ([m - 1, 1, -1], [(1, 2), (2, 3), (1, 1)]),
        )
    ],
    format_input=lambda p, data: _ranges_text(data),
    solve=_ranges_solve,
    styles=(
        Style(
            "prefix",
            "import sys\n\n\ndef main():\n    data = sys.stdin.read().split()\n"
            "    n, q, m = int(data[0]), int(data[1]), int(data[2])\n"
            "    a = [int(t) for t in data[3:3 + n]]\n"
            "    prefix = [0] * (n + 1)\n    for i in range(n):\n"
            "        prefix[i + 1] = prefix[i] + a[i]\n    out = []\n    pos = 3 + n\n"
            "    for _ in range(q):\n        l, r = int(data[pos]), int(data[pos + 1])\n"
            "        pos += 2\n        out.append((prefix[r] - prefix[{{left}}]) {{mod}} m)\n"
            "    print('\\n'.join(map(str, out)))\n\n\nmain()\n",
            {"left": "l - 1", "mod": "%"},
            (
                Mutation("left", "off_by_one", "l", "left_l"),
                Mutation("mod", "wrong_operator", "//", "floordiv"),
            ),
        ),
        Style(
            "slices",
            "n, q, m = map(int, input().split())\na = list(map(int, input().split()))\n"
            "for _ in range(q):\n    l, r = map(int, input().split())\n"
            "    print(sum(a[{{lo}}:{{hi}}]) % m)\n",
            {"lo": "l - 1", "hi": "r"},
            (
                Mutation("lo", "off_by_one", "l", "left_l"),
                Mutation("hi", "off_by_one", "r - 1", "right_short"),
            ),
        ),
    ),
)


# ---- 5. digit sums in base B (integer processing) ----


def _digit_sum(x: int, base: int, bug: str | None) -> int:
    if bug == "rec_le":  # recursive style with ``x <= base`` as its base case
        return x if x <= base else _digit_sum(x // base, base, bug) + x % base
    s = 1 if bug == "init1" else 0
    while x > (1 if bug == "cond1" else 0):
        s += x // base if bug == "moddiv" else x % base
        x //= base
    return s


Digits = tuple[int, int, list[int]]


def _digits_input(rng: random.Random, p: Params, level: int) -> Digits:
    return rng.randint(2, 16), rng.randint(2, 30), _int_list(rng, level, lo=0)


def _digits_solve(p: Params, data: Digits, bug: str | None) -> str | None:
    b, k, nums = data
    divisible = [_digit_sum(x, b, bug) % k == 0 for x in nums]
    return f"{sum((not d) if bug == 'neq' else d for d in divisible)}\n"


DIGIT_SUMS = Family(
    name="digit_sums",
    tags=("math", "number theory"),
    intros=(
        "Write each of the n given numbers in base b and add up its digits. How many numbers "
        "have a digit sum divisible by k?",
        "For a non-negative integer x let S(x) be the sum of the digits of x in base b. Count "
        "the given numbers x with S(x) divisible by k.",
        "A number is lucky when the sum of its base-b digits is a multiple of k. Among the n "
        "given numbers, how many are lucky?",
        "Print how many of the given integers have a base-b digit sum that leaves remainder 0 "
        "when divided by k.",
        "Convert every input number to base b; count those whose digits add up to a multiple "
        "of k (the digit sum of 0 is 0).",
    ),
    input_spec="The first line contains n, b (2 <= b) and k (k >= 1). The second line contains "
    "n non-negative integers.",
    output_spec="Print one integer: the count.",
    draw_params=lambda rng: {},
    draw_input=_digits_input,
    edge_inputs=lambda rng, p: [
        (b, k, nums)
        for b, k in [(rng.randint(2, 16), rng.randint(2, 30))]
        for nums in ([0], [1], [b], [k, b * k, b**2 + 1])
    ],
    format_input=lambda p, data: _list_text(f"{data[0]} {data[1]}", data[2]),
    solve=_digits_solve,
    styles=(
        Style(
            "loop",
            "def digit_sum(x, b):\n    s = {{init}}\n    while x {{cond}}:\n"
            "        s += x {{mod}} b\n        x //= b\n    return s\n\n\n"
            "n, b, k = map(int, input().split())\nnums = list(map(int, input().split()))\n"
            "print(sum(1 for x in nums if digit_sum(x, b) % k {{eq}} 0))\n",
            {"init": "0", "cond": "> 0", "mod": "%", "eq": "=="},
            (
                Mutation("init", "wrong_initial_value", "1", "init1"),
                Mutation("cond", "off_by_one", "> 1", "cond1"),
                Mutation("mod", "wrong_operator", "//", "moddiv"),
                Mutation("eq", "comparison_flipped", "!=", "neq"),
            ),
        ),
        Style(
            "recursive",
            "import sys\n\nsys.setrecursionlimit(10000)\n\n\ndef ds(x, b):\n"
            "    if x {{base}} b:\n        return x\n    return ds(x // b, b) + x % b\n\n\n"
            "data = sys.stdin.read().split()\nb, k = int(data[1]), int(data[2])\n"
            "values = [int(v) for v in data[3:]]\n"
            "print(len([v for v in values if ds(v, b) % k == 0]))\n",
            {"base": "<"},
            (Mutation("base", "off_by_one", "<=", "rec_le"),),
        ),
    ),
)


# ---- 6. staircase ways (simple DP) ----

Stairs = tuple[int, int, list[int]]


def _stairs_input(rng: random.Random, p: Params, level: int) -> Stairs:
    t = _size(rng, level, ((1, 3), (2, 6), (3, 10)))
    top = (10, 100, 1000)[level - 1]
    return rng.randint(2, 6), rng.randint(10, 10**6), [rng.randint(0, top) for _ in range(t)]


def _stairs_solve(p: Params, data: Stairs, bug: str | None) -> str | None:
    s, m, queries = data
    top = max(queries)
    ways = [0 if bug == "base0" else 1 % m]
    for i in range(1, top + 1):
        if bug == "no_clamp":
            ways.append(sum(ways[i - s : i]) % m)
            continue
        steps = range(1, s) if bug == "fewer_steps" else range(1, s + 1)
        total = 0
        for step in steps:
            if i - step > 0 or (i - step == 0 and bug != "gt"):
                total += ways[i - step]
        ways.append(total % m)
    return _lines([ways[q] for q in queries])


STAIRS = Family(
    name="stairs",
    tags=("dp",),
    intros=(
        "A staircase has n steps. In one move you climb between 1 and s steps. In how many "
        "different ways can you reach the top? Print the answer modulo m.",
        "Count the sequences of positive integers, each at most s, whose sum is n (order "
        "matters; the empty sequence is the only one for n = 0). Output the count modulo m.",
        "A frog jumps forward 1, 2, ..., or s cells at a time. Count the ways to advance "
        "exactly n cells, modulo m.",
        "How many ordered ways are there to write n as a sum of parts from 1 to s? Give each "
        "answer modulo m (for n = 0 the answer is 1).",
        "Tiles of lengths 1..s are laid in a row to cover exactly n units. Count the different "
        "sequences of tiles, modulo m.",
    ),
    input_spec="The first line contains t, s (s >= 2) and m (m >= 2). Each of the next t lines "
    "contains n (0 <= n).",
    output_spec="Print t lines: the answer for each n.",
    draw_params=lambda rng: {},
    draw_input=_stairs_input,
    edge_inputs=lambda rng, p: [
        (s, m, queries)
        for s, m in [(rng.randint(2, 6), rng.randint(10, 10**6))]
        for queries in ([0], [1, 2], [s, s + 1])
    ],
    format_input=lambda p, data: f"{len(data[2])} {data[0]} {data[1]}\n" + _lines(data[2]),
    solve=_stairs_solve,
    styles=(
        Style(
            "table",
            "import sys\n\ndata = sys.stdin.read().split()\n"
            "t, s, m = int(data[0]), int(data[1]), int(data[2])\n"
            "queries = [int(v) for v in data[3:3 + t]]\ntop = max(queries)\n"
            "ways = [0] * (top + 1)\nways[0] = {{base}}\nfor i in range(1, top + 1):\n"
            "    for step in range(1, {{steps}}):\n        if i - step {{ge}} 0:\n"
            "            ways[i] = (ways[i] + ways[i - step]) % m\n"
            "print('\\n'.join(str(ways[v]) for v in queries))\n",
            {"base": "1", "steps": "s + 1", "ge": ">="},
            (
                Mutation("base", "wrong_initial_value", "0", "base0"),
                Mutation("steps", "off_by_one", "s", "fewer_steps"),
                Mutation("ge", "off_by_one", ">", "gt"),
            ),
        ),
        Style(
            "window",
            "t, s, m = map(int, input().split())\nqs = [int(input()) for _ in range(t)]\n"
            "limit = max(qs)\ndp = [{{first}}]\nfor i in range(1, limit + 1):\n"
            "    dp.append(sum(dp[{{lo}}:i]) % m)\nfor q in qs:\n    print(dp[q])\n",
            {"first": "1", "lo": "max(0, i - s)"},
            (
                Mutation("first", "wrong_initial_value", "0", "base0"),
                Mutation("lo", "off_by_one", "max(0, i - s + 1)", "fewer_steps"),
                Mutation("lo", "missing_case", "i - s", "no_clamp"),
            ),
        ),
    ),
)


# ---- 7. parsing a record line (parsing) ----

SEPARATORS = (";", ",", "|", "&", "/")
ASSIGNS = ("=", ":", "~")
Record = tuple[str, str, str, list[tuple[str, int]]]


def _record_input(rng: random.Random, p: Params, level: int) -> Record:
    sep, assign, x = rng.choice(SEPARATORS), rng.choice(ASSIGNS), rng.choice(string.ascii_lowercase)
    n = _size(rng, level, ((1, 5), (3, 20), (20, 80)))
    names = [x, *rng.sample(string.ascii_lowercase, 3)]
    span = VALUE_SPAN[level - 1]
    return sep, assign, x, [(rng.choice(names), rng.randint(-span, span)) for _ in range(n)]


def _record_solve(p: Params, data: Record, bug: str | None) -> str | None:
    _, _, x, items = data
    if bug == "int_key":
        return CRASH if any(k == x for k, _ in items) else "0\n"
    if bug == "last":
        values = [v for k, v in items if k == x]
        return f"{values[-1] if values else 0}\n"
    total = sum(v for k, v in items if (k != x if bug == "neq" else k == x))
    return f"{total + (bug == 'init')}\n"


def _record_edges(rng: random.Random, p: Params) -> list[Record]:
    sep, assign, x = rng.choice(SEPARATORS), rng.choice(ASSIGNS), rng.choice(string.ascii_lowercase)
    other = "b" if x == "a" else "a"
    return [
        (sep, assign, x, items) for items in ([(other, 4)], [(x, 3)], [(x, -2), (other, 7), (x, 9)])
    ]


def _record_text(data: Record) -> str:
    sep, assign, x, items = data
    return f"{sep} {assign} {x}\n" + sep.join(f"{k}{assign}{v}" for k, v in items) + "\n"


READ_RECORD = "sep, assign, x = input().split()\n"

PARSE_RECORD = Family(
    name="parse_record",
    tags=("parsing", "strings"),
    intros=(
        "A line describes items as name-value pairs: a name, the assignment character and a "
        "value, the pairs separated by the separator character. Print the total value of all "
        "items named x (0 if there are none).",
        "You receive a log line such as p=5;q=-2. Each entry is a one-letter name, the "
        "assignment character and an integer; entries are separated by the separator. Sum the "
        "values of the entries whose name is x.",
        "Parse the record: fields are separated by the separator character, and each field is "
        "a letter, then the assignment character, then a signed integer. What is the sum of "
        "the fields with the letter x?",
        "An inventory string lists letter-amount pairs joined by the separator. Report how much "
        "of item x there is in total.",
        "Entries of the form key, assignment character, number are glued together with the "
        "separator. Output the sum of the numbers whose key equals x; when the key never "
        "appears, output 0.",
    ),
    input_spec="The first line contains three characters separated by spaces: the separator, "
    "the assignment character and the name x. The second line contains at least one entry.",
    output_spec="Print one integer: the total.",
    draw_params=lambda rng: {},
    draw_input=_record_input,
    edge_inputs=_record_edges,
    format_input=lambda p, data: _record_text(data),
    solve=_record_solve,
    styles=(
        Style(
            "loop",
            READ_RECORD + "line = input().strip()\ntotal = {{init}}\nfor item in line.split(sep):\n"
            "    key, value = item.split(assign)\n    if key {{eq}} x:\n"
            "        total += int({{value}})\nprint(total)\n",
            {"init": "0", "eq": "==", "value": "value"},
            (
                Mutation("init", "wrong_initial_value", "1", "init"),
                Mutation("eq", "comparison_flipped", "!=", "neq"),
                Mutation("value", "wrong_variable", "key", "int_key"),
            ),
        ),
        Style(
            "partition",
            READ_RECORD
            + "pairs = [part.partition(assign) for part in input().strip().split(sep)]\n"
            "print(sum(int(v) for k, _, v in pairs if k {{eq}} x))\n",
            {"eq": "=="},
            (Mutation("eq", "comparison_flipped", "!=", "neq"),),
        ),
        Style(
            "totals",
            "from collections import defaultdict\n\n" + READ_RECORD + "totals = defaultdict(int)\n"
            "for chunk in input().strip().split(sep):\n"
            "    name, _, amount = chunk.partition(assign)\n"
            "    totals[name] {{acc}} int(amount)\nprint(totals[x])\n",
            {"acc": "+="},
            (Mutation("acc", "wrong_operator", "=", "last"),),
        ),
    ),
)


# ---- 8. words by first letter and length (string processing, counting) ----

Words = tuple[str, int, list[str]]


def _words_input(rng: random.Random, p: Params, level: int) -> Words:
    c, length = rng.choice(string.ascii_lowercase), rng.randint(1, 8)
    n = _size(rng, level, ((1, 6), (4, 25), (20, 100)))
    letters = [c, *rng.sample(string.ascii_lowercase, 4)]
    words = [
        "".join(rng.choice(letters) for _ in range(rng.randint(1, length + 2))) for _ in range(n)
    ]
    return c, length, words


def _words_solve(p: Params, data: Words, bug: str | None) -> str | None:
    c, length, words = data
    strict = p["strict"] != (bug == "boundary")

    def first(w: str) -> bool:
        if bug == "ends":
            return w.endswith(c)
        if bug == "second":
            return len(w) > 1 and w[1] == c
        return w.startswith(c)

    def long_enough(w: str) -> bool:
        return len(w) > length if strict else len(w) >= length

    if bug == "or":
        count = sum(1 for w in words if first(w) or long_enough(w))
    else:
        count = sum(1 for w in words if first(w) and long_enough(w))
    if bug == "second" and any(len(w) == 1 and long_enough(w) for w in words):
        return CRASH  # w[1] of a one-letter word that passed the length test
    return f"{count + (bug == 'init')}\n"


def _words_edges(rng: random.Random, p: Params) -> list[Words]:
    c, length = rng.choice(string.ascii_lowercase), rng.randint(1, 8)
    other = "q" if c != "q" else "z"
    return [
        (c, length, words)
        for words in (
            [c * length],
            [c * (length + 1)],
            [other * (length + 1) + c, c + other * length],
            [c],
            [other * (length + 1)],
        )
    ]


WORDS = Family(
    name="words",
    tags=("strings", "implementation"),
    intros=(
        "Count the words of the sentence that start with the letter c and are {relation} l "
        "letters long.",
        "A text is a sequence of lowercase words separated by single spaces. How many words "
        "begin with c and have {relation2} l characters?",
        "Masha likes words that start with c, but only if they are {relation} l letters long. "
        "How many such words are in the line?",
        "Print the number of words w in the line with w[0] = c and |w| {cmp} l.",
        "From a line of words, select those whose first letter is c and whose length is "
        "{relation} l; output how many were selected.",
    ),
    input_spec="The first line contains a lowercase letter c and an integer l (l >= 1). The "
    "second line contains lowercase words separated by single spaces.",
    output_spec="Print one integer.",
    draw_params=lambda rng: _strictness(rng, ("more than", "over"), ("at least", "no fewer than")),
    draw_input=_words_input,
    edge_inputs=_words_edges,
    format_input=lambda p, data: f"{data[0]} {data[1]}\n" + " ".join(data[2]) + "\n",
    solve=_words_solve,
    styles=(
        Style(
            "loop",
            "c, l = input().split()\nl = int(l)\nwords = input().split()\ncount = {{init}}\n"
            "for w in words:\n    if w.{{fn}}(c) {{logic}} len(w) {{ge}} l:\n"
            "        count += 1\nprint(count)\n",
            {"init": "0", "fn": "startswith", "logic": "and", "ge": "{{cmp}}"},
            (
                Mutation("init", "wrong_initial_value", "1", "init"),
                Mutation("fn", "wrong_operator", "endswith", "ends"),
                Mutation("logic", "wrong_operator", "or", "or"),
                Mutation("ge", "off_by_one", "{{cmp_edge}}", "boundary"),
            ),
        ),
        Style(
            "generator",
            "c, l = input().split()\n"
            "print(sum(1 for w in input().split() if len(w) {{ge}} int(l) and w[{{i}}] == c))\n",
            {"ge": "{{cmp}}", "i": "0"},
            (
                Mutation("ge", "off_by_one", "{{cmp_edge}}", "boundary"),
                Mutation("i", "off_by_one", "1", "second"),
            ),
        ),
    ),
)


# ---- 9. longest warm streak (list processing) ----


def _streak_solve(p: Params, data: tuple[int, list[int]], bug: str | None) -> str | None:
    thr, temps = data
    strict = p["strict"] != (bug == "boundary")

    def good(t: int) -> bool:
        ok = t > thr if strict else t >= thr
        return not ok if bug == "flip" else ok

    if bug in ("reset1", "best_t"):
        best = run = 0
        for t in temps:
            if good(t):
                run += 1
                best = max(best, t if bug == "best_t" else run)
            else:
                run = 1 if bug == "reset1" else 0
        return f"{best}\n"
    runs = [len(list(g)) for k, g in groupby(temps, key=good) if k]
    return f"{max(runs, default=0)}\n"


def _streak_input(rng: random.Random, p: Params, level: int) -> tuple[int, list[int]]:
    t = rng.randint(-100, 100)
    return t, _int_list(rng, level, around=t)


STREAK = Family(
    name="streak",
    tags=("implementation",),
    intros=(
        "The temperature was measured on n consecutive days. Find the length of the longest "
        "block of consecutive days on which the temperature was {relation} t.",
        "Given n integers and a number t, print the maximum number of consecutive elements that "
        "are all {relation} t (0 if no element is).",
        "A runner logs n daily distances. A streak is a run of consecutive days with a distance "
        "{relation} t. How long is the longest streak?",
        "Find the longest contiguous segment of the array whose elements are all {cmp} t; print "
        "its length.",
        "Each of n readings is either acceptable ({relation2} t) or not. Report the length of "
        "the longest uninterrupted run of acceptable readings.",
    ),
    input_spec="The first line contains n and t. The second line contains n integers.",
    output_spec="Print one integer: the length.",
    draw_params=lambda rng: _strictness(
        rng, ("strictly greater than", "strictly above"), ("at least", "not below")
    ),
    draw_input=_streak_input,
    edge_inputs=lambda rng, p: [
        (t, a)
        for t in [rng.randint(-100, 100)]
        for a in ([t - 1], [t, t, t - 5, t + 1], [t - 9, t - 8, t + 3, t - 1, t + 5])
    ],
    format_input=lambda p, data: _list_text(data[0], data[1]),
    solve=_streak_solve,
    styles=(
        Style(
            "loop",
            "n, t = map(int, input().split())\na = list(map(int, input().split()))\n"
            "best = 0\nrun = 0\nfor v in a:\n    if v {{ge}} t:\n        run += 1\n"
            "        best = max(best, {{run}})\n    else:\n        run = {{reset}}\nprint(best)\n",
            {"ge": "{{cmp}}", "run": "run", "reset": "0"},
            (
                Mutation("ge", "comparison_flipped", "{{cmp_not}}", "flip"),
                Mutation("ge", "off_by_one", "{{cmp_edge}}", "boundary"),
                Mutation("run", "wrong_variable", "v", "best_t"),
                Mutation("reset", "wrong_initial_value", "1", "reset1"),
            ),
        ),
        Style(
            "groupby",
            "from itertools import groupby\n\n"
            "n, t = map(int, input().split())\na = list(map(int, input().split()))\nbest = 0\n"
            "for good, group in groupby(a, key=lambda v: v {{ge}} t):\n"
            "    if {{which}}:\n        best = max(best, len(list(group)))\nprint(best)\n",
            {"ge": "{{cmp}}", "which": "good"},
            (
                Mutation("which", "comparison_flipped", "not good", "flip"),
                Mutation("ge", "off_by_one", "{{cmp_edge}}", "boundary"),
            ),
        ),
    ),
)


# ---- 10. pairs with a sum divisible by K (counting) ----


def _pairs_solve(p: Params, data: tuple[int, list[int]], bug: str | None) -> str | None:
    k, a = data
    if bug == "no_wrap" and any(x % k == 0 for x in a):
        return CRASH  # seen[k] is out of range
    count = 0
    for i in range(len(a)):
        for j in range(i if bug == "self_pairs" else i + 1, len(a)):
            divisible = (a[i] + a[j]) % k == 0
            count += (not divisible) if bug == "neq" else divisible
    return f"{count + (bug == 'init')}\n"


PAIRS = Family(
    name="pairs",
    tags=("math", "counting"),
    intros=(
        "Count the pairs of indices i < j such that a_i + a_j is divisible by k.",
        "There are n cards with numbers. How many unordered pairs of different cards have a "
        "sum that is a multiple of k?",
        "Given an array, print the number of pairs (i, j) with 1 <= i < j <= n and "
        "(a_i + a_j) mod k = 0.",
        "Two different boxes can be packed together when their weights add up to a multiple of "
        "k. Count the pairs of boxes that can be packed together.",
        "How many ways are there to choose two distinct positions of the array so that the sum "
        "of the chosen values is divisible by k?",
    ),
    input_spec="The first line contains n and k (k >= 2). The second line contains n "
    "non-negative integers.",
    output_spec="Print one integer: the number of pairs.",
    draw_params=lambda rng: {},
    draw_input=lambda rng, p, level: (rng.randint(2, 200), _int_list(rng, level, lo=0)),
    edge_inputs=lambda rng, p: [
        (k, a) for k in [rng.randint(2, 200)] for a in ([k], [1, k - 1, k + 1], [k, 2 * k, 3])
    ],
    format_input=lambda p, data: _list_text(data[0], data[1]),
    solve=_pairs_solve,
    styles=(
        Style(
            "brute",
            READ_NK + "pairs = {{init}}\nfor i in range(n):\n    for j in range({{start}}, n):\n"
            "        if (a[i] + a[j]) % k {{eq}} 0:\n            pairs += 1\nprint(pairs)\n",
            {"init": "0", "start": "i + 1", "eq": "=="},
            (
                Mutation("init", "wrong_initial_value", "1", "init"),
                Mutation("start", "off_by_one", "i", "self_pairs"),
                Mutation("eq", "comparison_flipped", "!=", "neq"),
            ),
        ),
        Style(
            "remainders",
            READ_NK + "seen = [0] * k\npairs = 0\nfor x in a:\n    r = x % k\n"
            "    pairs += seen[{{need}}]\n    seen[r] += 1\nprint(pairs)\n",
            {"need": "(-r) % k"},
            (Mutation("need", "missing_case", "k - r", "no_wrap"),),
        ),
    ),
)


FAMILIES: tuple[Family, ...] = (
    SUM_THRESHOLD,
    COUNT_LETTERS,
    BEST_PERIOD,
    RANGE_SUMS,
    DIGIT_SUMS,
    STAIRS,
    PARSE_RECORD,
    WORDS,
    STREAK,
    PAIRS,
)
