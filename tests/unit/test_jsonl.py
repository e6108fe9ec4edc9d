"""JSONL files with a byte-offset index: round trip, seeking reads, stale index, bad lines."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from weighted_mtp.data.jsonl import (
    JsonlError,
    JsonlFile,
    JsonlWriter,
    build_index,
    encode_line,
    index_path_for,
    iter_jsonl,
    load_index,
    read_lines,
)


def write_records(path, records):
    with JsonlWriter(path, index_path_for(path)) as writer:
        for record in records:
            writer.write(record)
    return writer


@pytest.fixture
def records():
    rng = random.Random(0)
    return [
        {"task_id": f"t{i}", "output": "x" * rng.randint(0, 50) + "é\n", "n": i} for i in range(500)
    ]


def test_writer_index_has_one_offset_per_line_plus_the_size(tmp_path, records):
    path = tmp_path / "train.jsonl"
    writer = write_records(path, records)
    offsets = np.fromfile(tmp_path / "train.idx", dtype="<u8")
    assert len(offsets) == len(records) + 1
    assert offsets[0] == 0 and offsets[-1] == path.stat().st_size == writer.size
    assert len(writer) == len(records)
    assert list(iter_jsonl(path)) == records


def test_build_index_matches_the_writer(tmp_path, records):
    path = tmp_path / "train.jsonl"
    write_records(path, records)
    assert build_index(path, tmp_path / "rebuilt.idx") == len(records)
    assert (tmp_path / "rebuilt.idx").read_bytes() == (tmp_path / "train.idx").read_bytes()


def test_writing_lines_in_blocks_gives_the_same_file_index_and_digest(tmp_path, records):
    one = tmp_path / "one.jsonl"
    by_line = write_records(one, records)
    lines = [encode_line(r) for r in records]
    block = tmp_path / "block.jsonl"
    with JsonlWriter(block, index_path_for(block)) as writer:
        for start in range(0, len(lines), 37):  # uneven blocks, one of them empty
            part = lines[start : start + 37] if start != 74 else []
            writer.write_lines(b"".join(part), [len(x) for x in part])
            if start == 74:
                writer.write_lines(b"".join(lines[74:111]), [len(x) for x in lines[74:111]])
    assert block.read_bytes() == one.read_bytes()
    assert index_path_for(block).read_bytes() == index_path_for(one).read_bytes()
    assert (writer.sha256, writer.size, len(writer)) == (by_line.sha256, by_line.size, len(by_line))
    with (
        JsonlWriter(tmp_path / "x.jsonl", tmp_path / "x.idx") as bad,
        pytest.raises(ValueError, match="add up to"),
    ):
        bad.write_lines(lines[0], [1])


def test_sampled_reads_return_the_lines_asked_in_the_order_asked(tmp_path, records):
    path = tmp_path / "train.jsonl"
    write_records(path, records)
    wanted = [417, 3, 3, 0, 499, 250]
    assert read_lines(path, wanted) == [records[i] for i in wanted]
    reader = JsonlFile(path)
    assert reader[42] == records[42]
    assert reader.raw(1) == path.read_bytes().splitlines()[1]
    with pytest.raises(IndexError, match="out of range"):
        reader.read([500])


def test_reader_survives_pickling_for_dataloader_workers(tmp_path, records):
    path = tmp_path / "train.jsonl"
    write_records(path, records)
    reader = JsonlFile(path)
    assert reader[7] == records[7]
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read([8, 9]) == records[8:10]


def test_stale_or_missing_index_is_refused(tmp_path, records):
    path = tmp_path / "train.jsonl"
    write_records(path, records)
    with open(path, "ab") as handle:
        handle.write(b'{"late": true}\n')
    with pytest.raises(JsonlError, match="stale index"):
        load_index(path)
    (tmp_path / "train.idx").unlink()
    with pytest.raises(JsonlError, match="index missing"):
        JsonlFile(path)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"a": "\xff\xfe"}', "not valid UTF-8"),
        (b'{"a": ', "invalid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_malformed_line_reports_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"ok": 1}\n{"ok": 2}\n' + line + b"\n")
    with pytest.raises(JsonlError, match=rf"bad\.jsonl:3: {reason}"):
        list(iter_jsonl(path))
    build_index(path, index_path_for(path))
    reader = JsonlFile(path)
    assert reader[1] == {"ok": 2}
    with pytest.raises(JsonlError, match=rf"bad\.jsonl:3: {reason}"):
        reader[2]
