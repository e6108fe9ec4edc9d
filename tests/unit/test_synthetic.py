"""The known-answer CodeContests source (docs/DATA.md): deterministic bytes, solutions that
really pass or fail in the sandbox, mutation spans that land on response tokens, and a dataset
step that reads it with no special path and carries the spans into the records."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from weighted_mtp import cli
from weighted_mtp.base.errors import UserError
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.data.alpaca import format_prompt, format_text
from weighted_mtp.data.collate import IGNORE_INDEX, encode_with_span, span_tokens
from weighted_mtp.data.jsonl import iter_jsonl
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.storage import synthetic
from weighted_mtp.storage.dataset_records import (
    MUTATION_COLUMN,
    BadRecord,
    ProblemNames,
    codecontests_eval_record,
    parse_codecontests,
)
from weighted_mtp.storage.dataset_sources import SOURCES, Origin, iter_records
from weighted_mtp.storage.dataset_verify import line_problem, verify_datasets
from weighted_mtp.storage.synthetic_families import FAMILIES, KINDS, render

SMALL = {"train": 20, "valid": 10, "test": 10}  # two problems per family, one per family


def shards(root: Path) -> list[Path]:
    return sorted((root / "code_contests/data").glob("*.parquet"))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.run(root, seed=3, problems=SMALL)
    return root


def rows(root: Path, split: str) -> list[dict]:
    path = root / f"code_contests/data/{split}-00000-of-00001.parquet"
    return pq.read_table(path).to_pylist()


def test_same_seed_same_bytes_other_seed_other_bytes(source, tmp_path):
    again = tmp_path / "again"
    synthetic.run(again, seed=3, problems=SMALL)
    names = [p.name for p in shards(source)]
    assert names == [f"{s}-00000-of-00001.parquet" for s in ("test", "train", "valid")]
    for a, b in zip(shards(source), shards(again), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    summary = "code_contests/synthetic.json"
    assert (source / summary).read_bytes() == (again / summary).read_bytes()
    other = tmp_path / "other"
    synthetic.run(other, seed=4, problems=SMALL)
    assert shards(other)[1].read_bytes() != shards(source)[1].read_bytes()


def test_columns_and_types_are_the_hubs_plus_the_mutation_column(source):
    from datasets import Features

    from weighted_mtp.storage.dataset_sources import hub_features

    schema = pq.read_schema(shards(source)[1])
    hub = hub_features("codecontests").arrow_schema
    assert schema.names == [*hub.names, MUTATION_COLUMN]
    for field in hub:
        assert schema.field(field.name).type == field.type, field.name
    features = Features.from_arrow_schema(schema)
    assert features["solutions"]["language"].feature.names[3] == "PYTHON3"
    summary = json.loads((source / "code_contests/synthetic.json").read_text())
    assert summary["splits"]["train"]["problems"] == 20
    assert set(summary["mutation_kinds"]) == set(KINDS)  # every kind occurs in 40 problems


def test_every_incorrect_solution_is_one_recorded_mutation_of_a_correct_one(source):
    for split in synthetic.SPLITS:
        for row in rows(source, split):
            correct = set(row["solutions"]["solution"])
            spans = row[MUTATION_COLUMN]
            wrong = row["incorrect_solutions"]["solution"]
            assert 1 <= len(wrong) <= synthetic.MAX_INCORRECT and len(correct) >= 2
            for i, code in enumerate(wrong):
                start, end = spans["start"][i], spans["end"][i]
                assert 0 <= start < end <= len(code) and spans["kind"][i] in KINDS
                restored = code[:start] + spans["original"][i] + code[end:]
                assert restored in correct and restored != code, (row["name"], i)
            assert row["public_tests"]["input"][0].strip() in row["description"]


def intro_pattern(template: str) -> re.Pattern[str]:
    pieces = re.split(r"\{\w+\}", template.replace("{{", "{").replace("}}", "}"))
    return re.compile(".*?".join(re.escape(p) for p in pieces), re.DOTALL)


def test_valid_and_test_use_the_held_out_wording_and_tests_carry_the_numbers(tmp_path):
    """Training never sees the fifth wording; the held-out splits always use it. The task's
    numbers are in each test's input, never in the statement's introduction."""
    synthetic.run(tmp_path, seed=0, problems={"train": 200, "valid": 20, "test": 20})
    by_family = {f.name: f for f in FAMILIES}
    intros = defaultdict(set)
    for split in synthetic.SPLITS:
        for row in rows(tmp_path, split):
            family = by_family[re.fullmatch(r"synthetic_[a-z]+_\d{5}_(\w+)", row["name"])[1]]
            held_out = intro_pattern(family.intros[-1]).match(row["description"]) is not None
            assert held_out == (split != "train"), row["name"]
            intros[family.name, split].add(row["description"].split("\n\nInput\n\n")[0])
            first_lines = {t.split("\n")[0] for t in row["private_tests"]["input"]}
            assert len(first_lines) > 1 or len(row["private_tests"]["input"]) == 1, row["name"]
    for family in FAMILIES:  # an introduction is a wording of a statement variant: no numbers
        variants = 2 if "strict" in family.draw_params(random.Random(0)) else 1
        assert len(intros[family.name, "train"]) <= 4 * variants, family.name
        assert len(intros[family.name, "valid"] | intros[family.name, "test"]) <= variants


def every_mutation_rows() -> list[dict]:
    """One fresh instance per family carrying every mutation of every style."""
    import random

    from weighted_mtp.storage.synthetic import ProblemBuilder

    built = []
    for number, family in enumerate(FAMILIES):
        rng = random.Random(f"every-mutation:{number}")
        builder = ProblemBuilder(family, family.draw_params(rng), rng, held_out=False)
        built.append(builder.row(f"every_{family.name}", every_mutation=True))
        assert builder.dropped == 0, family.name  # each mutant got an input it fails
        n_mutations = sum(len(style.mutations) for style in family.styles)
        assert len(built[-1]["incorrect_solutions"]["solution"]) == n_mutations
    return built


@pytest.mark.slow
def test_solutions_pass_or_fail_in_the_sandbox(source):
    """Every correct solution passes all its tests and every incorrect one fails one, scored
    the way ``wmtp score`` scores CodeContests (one sandboxed run per test): the test split
    (unseen instances, one per family) and every mutation of every family once."""
    from weighted_mtp.evaluation.harness import score_samples

    problems, samples, expected = {}, [], []
    for number, row in enumerate([*rows(source, "test"), *every_mutation_rows()]):
        problem = parse_codecontests(row, f"row {number}", ProblemNames())
        problems[problem.problem_id] = codecontests_eval_record(problem)
        for ok, solutions in ((True, problem.solutions), (False, problem.incorrect_solutions)):
            for _, code in solutions:
                samples.append({"task_id": problem.problem_id, "completion": code})
                expected.append(ok)
    assert sum(not ok for ok in expected) >= sum(
        len(s.mutations) for f in FAMILIES for s in f.styles
    )
    results = score_samples(samples, problems, "codecontests", workers=2)
    wrong = [
        (s["task_id"], r["verdict"], s["completion"])
        for s, r, ok in zip(samples, results, expected, strict=True)
        if r["passed"] != ok
    ]
    assert not wrong, wrong[:3]
    # Wrong answers and exceptions only: no timeout, memory or harness verdicts.
    assert all(
        r["verdict"] in ("passed", "failed") or r["verdict"].startswith("error:") for r in results
    )


def test_every_family_renders_every_mutation(source):
    """Each style's sites exist and each mutation changes the text (family definitions), for
    both statement variants of the strict/non-strict families."""
    import random

    for family in FAMILIES:
        drawn = [family.draw_params(random.Random(seed)) for seed in range(8)]
        variants = {json.dumps(p, sort_keys=True): p for p in drawn}
        assert len(variants) == (2 if "strict" in drawn[0] else 1), family.name
        for params in variants.values():
            for style in family.styles:
                code = render(style, params).code
                compile(code, family.name, "exec")
                for mutation in style.mutations:
                    mutant = render(style, params, mutation)
                    assert mutant.code != code and mutant.span is not None
                    assert mutation.kind in KINDS


@pytest.fixture(scope="module")
def processed(source, tmp_path_factory, small_tokenizer):
    storage = tmp_path_factory.mktemp("storage")
    tokenizer = storage / "models/micro-mtp/tokenizer/tokenizer.model"
    tokenizer.parent.mkdir(parents=True)
    shutil.copy(small_tokenizer, tokenizer)
    argv = ["storage", "datasets", "--datasets", "codecontests", "--source", str(source)]
    assert cli.main([*argv, "--storage", str(storage)]) == 0
    return StorageLayout(storage)


def test_the_dataset_step_reads_it_and_writes_the_seed_schema(processed, source):
    checks = [c for c in verify_datasets(processed) if "codecontests" in c.name]
    assert checks and all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    paths = processed.dataset("codecontests")
    spans_in_source = {}
    for split in synthetic.SPLITS:
        for row in rows(source, split):
            for i, _ in enumerate(row["incorrect_solutions"]["solution"]):
                m = row[MUTATION_COLUMN]
                spans_in_source[f"{row['name']}_incorrect_{i}"] = {
                    k: m[k][i] for k in ("start", "end", "kind", "original")
                }
    seen = 0
    for split in synthetic.SPLITS:
        for record in iter_jsonl(paths.split(split)):
            mutation = record["metadata"].get("mutation")
            assert (mutation is None) == record["is_correct"]
            if mutation is not None:
                assert mutation == spans_in_source[record["task_id"]]
                seen += 1
    assert seen == len(spans_in_source)


def test_every_mutation_span_overlaps_a_response_token(processed, small_tokenizer):
    """The span, shifted past the Alpaca prompt, covers at least one token that training
    supervises (a token starting at or after the prompt's end, as ``encode_example`` masks)."""
    tokenizer = Tokenizer(small_tokenizer)
    paths = processed.dataset("codecontests")
    counted = defaultdict(int)
    for split in synthetic.SPLITS:
        for record in iter_jsonl(paths.split(split)):
            mutation = record["metadata"].get("mutation")
            if mutation is None:
                continue
            text = format_text(record)
            boundary = len(format_prompt(record["instruction"], record["input"]))
            assert text[boundary:] == record["output"]
            _, starts = tokenizer.encode_with_offsets(text)
            lo, hi = boundary + mutation["start"], boundary + mutation["end"]
            hit = span_tokens(starts, len(text), boundary, lo, hi)
            assert hit, (record["task_id"], mutation)
            span = (mutation["start"], mutation["end"])
            fields = (record["instruction"], record["input"], record["output"])
            example, positions = encode_with_span(tokenizer, *fields, span, 4096)
            assert positions == [1 + i for i in hit]  # BOS shifts every position by one
            assert all(example.labels[p] != IGNORE_INDEX for p in positions)
            counted[mutation["kind"]] += 1
    assert set(counted) == set(KINDS)


def test_records_carry_a_checked_span_and_verify_rejects_a_bad_one(source):
    origin = Origin("local", source)
    raw = next(iter_records(origin, SOURCES["codecontests"], "train")).data
    assert raw is not None
    problem = parse_codecontests(raw, "here", ProblemNames())
    assert problem.mutations and len(problem.mutations) == len(problem.incorrect_solutions)
    bad = json.loads(json.dumps(raw))
    bad[MUTATION_COLUMN]["end"][0] = 10**6
    with pytest.raises(BadRecord, match="not inside the solution"):
        parse_codecontests(bad, "here", ProblemNames())
    del bad[MUTATION_COLUMN]["kind"]
    with pytest.raises(BadRecord, match="start, end and kind"):
        parse_codecontests(bad, "here", ProblemNames())
    record = {
        "instruction": "x",
        "input": "",
        "output": "print(1)\n",
        "task_id": "p_incorrect_0",
        "is_correct": False,
        "metadata": {
            "source": "code_contests",
            "difficulty": 1,
            "has_tests": True,
            "problem_id": "p",
            "language": "python3",
            "token_length": None,
            "mutation": {"start": 3, "end": 3, "kind": "off_by_one"},
        },
    }
    assert "non-empty span" in (line_problem(record, "codecontests") or "")
    record["metadata"]["mutation"]["end"] = 4
    assert line_problem(record, "codecontests") is None


def test_command_line(tmp_path, capsys):
    out = tmp_path / "src"
    argv = ["storage", "synthetic", "--out", str(out), "--problems", "10", "1", "1"]
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert "synthetic train: 10 problems" in said and "synthetic test: 1 problems" in said
    assert cli.main([*argv[:4], "--problems", "1", "2", "3", "4"]) == 1
    assert "at most 3 counts" in capsys.readouterr().err
    (out / "code_contests/data/train-00000-of-00002.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="holds other files"):
        synthetic.run(out, problems={"train": 1, "valid": 1, "test": 1})
