"""The bundled sources are real working/buggy code and sound data; their Hub-layout copies."""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from weighted_mtp.base.io import StorageError
from weighted_mtp.storage.dataset_sources import (
    SOURCES,
    Origin,
    iter_records,
    materialise_bundled,
    resolve_origin,
)

PYTHON3 = 3


def bundled(path: str) -> list[dict]:
    text = (importlib.resources.files("weighted_mtp") / "sources" / path).read_text("utf-8")
    return yaml.safe_load(text)


def run_program(code: str, stdin: str) -> str:
    """Our own bundled programs only: exec with redirected stdin/stdout (trusted code)."""
    out, saved = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            exec(compile(code, "<solution>", "exec"), {"__name__": "__main__"})
    except Exception as err:  # a buggy solution may crash; that is a failed test
        return f"<{type(err).__name__}>"
    finally:
        sys.stdin = saved
    return out.getvalue()


def passes(code: str, tests: list[tuple[str, str]]) -> list[bool]:
    return [run_program(code, given).split() == expected.split() for given, expected in tests]


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_bundled_codecontests_solutions_are_really_correct_or_incorrect(split):
    for row in bundled(f"code_contests/{split}.yaml"):
        tests = [
            pair
            for kind in ("public_tests", "private_tests", "generated_tests")
            for pair in zip(row[kind]["input"], row[kind]["output"], strict=True)
        ]
        assert (
            row["public_tests"]["input"]
            and row["public_tests"]["input"][0].strip() in row["description"]
        )
        solutions = row["solutions"]
        for lang, code in zip(solutions["language"], solutions["solution"], strict=True):
            if lang == PYTHON3:
                assert all(passes(code, tests)), (row["name"], code)
        wrong = row["incorrect_solutions"]
        for lang, code in zip(wrong["language"], wrong["solution"], strict=True):
            if lang == PYTHON3:
                assert not all(passes(code, tests)), (row["name"], code)


def test_bundled_mbpp_code_passes_its_asserts():
    rows = [
        row
        for split in ("prompt", "train", "validation", "test")
        for row in bundled(f"mbpp/{split}.yaml")
    ]
    assert len({row["task_id"] for row in rows}) == len(rows) >= 40
    for row in rows:
        assert len(row["test_list"]) == 3
        program = "\n".join(
            [row["test_setup_code"], row["code"], *row["test_list"], *row["challenge_test_list"]]
        )
        exec(compile(program, f"mbpp-{row['task_id']}", "exec"), {})


def test_bundled_gsm8k_calculator_annotations_and_final_answers_hold():
    for split in ("train", "test"):
        for row in bundled(f"gsm8k/{split}.yaml"):
            for expr, value in re.findall(r"<<([^=<>]+)=([^<>]+)>>", row["answer"]):
                assert abs(eval(expr) - float(value)) < 1e-9, row["question"]
            assert re.fullmatch(r"-?[\d,]+", row["answer"].rsplit("####", 1)[1].strip())


def test_materialised_sources_use_the_hub_layout_and_are_rewritten_only_on_change(tmp_path):
    root = materialise_bundled(tmp_path / "sources")
    shard = root / "code_contests/data/train-00000-of-00001.parquet"
    expected = [
        shard,
        root / "mbpp/full/prompt-00000-of-00001.parquet",
        root / "gsm8k/main/test-00000-of-00001.parquet",
        root / "openai_humaneval/openai_humaneval/test-00000-of-00001.parquet",
    ]
    assert all(p.is_file() for p in expected)
    assert pq.ParquetFile(expected[-1]).metadata.num_rows == 164
    assert b"huggingface" in pq.read_schema(shard).metadata
    stamp = shard.stat().st_mtime_ns
    materialise_bundled(tmp_path / "sources")
    assert shard.stat().st_mtime_ns == stamp


def test_records_stream_from_a_local_copy_with_their_position(tmp_path):
    origin = Origin("local", materialise_bundled(tmp_path / "sources"))
    records = list(iter_records(origin, SOURCES["codecontests"], "valid"))
    assert len(records) == len(bundled("code_contests/valid.yaml"))
    assert records[1].where.endswith("valid-00000-of-00001.parquet: record 1")
    assert (
        records[1].data["solutions"]["language"]
        == bundled("code_contests/valid.yaml")[1]["solutions"]["language"]
    )


def test_origin_is_source_then_bundled_offline_then_hub(tmp_path, monkeypatch):
    assert resolve_origin(tmp_path, tmp_path).kind == "local"
    with pytest.raises(StorageError, match="not a folder"):
        resolve_origin(tmp_path, tmp_path / "missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    origin = resolve_origin(tmp_path, None)
    assert origin.kind == "bundled" and origin.root == tmp_path / "sources"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    import weighted_mtp.storage.dataset_sources as sources

    def no_dns(*args):
        raise OSError("Name or service not known")

    monkeypatch.setattr(sources.socket, "getaddrinfo", no_dns)  # no network at all
    assert resolve_origin(tmp_path, None).kind == "bundled"
    monkeypatch.setattr(sources.socket, "getaddrinfo", lambda *args: [("resolved",)])
    assert resolve_origin(tmp_path, None) == Origin("hub")


def test_missing_split_files_name_the_expected_layout(tmp_path):
    (tmp_path / "code_contests/data").mkdir(parents=True)
    origin = Origin("local", Path(tmp_path))
    with pytest.raises(StorageError, match=r"no train-\*\.parquet .* deepmind/code_contests"):
        list(iter_records(origin, SOURCES["codecontests"], "train"))
