"""The dataset steps on test-made sources: bad records, atomicity, lengths, re-runs, small splits."""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from weighted_mtp.base.io import StorageError
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.data.alpaca import format_text
from weighted_mtp.data.jsonl import JsonlFile, iter_jsonl
from weighted_mtp.data.metadata import load_problem_index
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.storage.dataset_sources import hub_shard_path, write_hub_parquet
from weighted_mtp.storage.datasets import run


@pytest.fixture(scope="module")
def cc_rows():
    text = (
        importlib.resources.files("weighted_mtp") / "sources/code_contests/train.yaml"
    ).read_text()
    return yaml.safe_load(text)


@pytest.fixture
def layout(tmp_path, small_tokenizer):
    target = tmp_path / "storage/models/micro-mtp/tokenizer/tokenizer.model"
    target.parent.mkdir(parents=True)
    shutil.copy(small_tokenizer, target)
    return StorageLayout(tmp_path / "storage")


def write_cc_source(root: Path, rows: list[dict]) -> Path:
    """A CodeContests copy in the Hub layout: ``rows`` as train, two problems per eval split."""
    write_hub_parquet("codecontests", rows, hub_shard_path(root, "codecontests", "train"))
    for split in ("valid", "test"):
        write_hub_parquet("codecontests", rows[:2], hub_shard_path(root, "codecontests", split))
    return root


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial-" in p.name]


def test_bad_parquet_records_stop_with_position_or_are_skipped_and_counted(
    tmp_path, layout, cc_rows, capsys
):
    rows = copy.deepcopy(cc_rows[:3])
    rows[1]["solutions"]["language"].append(3)  # malformed: more languages than solutions
    source = write_cc_source(tmp_path / "src", rows)
    # A second train shard lacking a column, as a hand-made copy could.
    shard = pa.Table.from_pylist([{k: v for k, v in cc_rows[3].items() if k != "difficulty"}])
    pq.write_table(shard, source / "code_contests/data/train-00001-of-00001.parquet")

    with pytest.raises(
        StorageError, match=r"train-00000-of-00001\.parquet: record 1: field 'solutions' has"
    ):
        run(layout, ["codecontests"], ["process"], source=source)
    assert not layout.dataset("codecontests").processed.exists() or not any(
        layout.dataset("codecontests").processed.iterdir()
    )
    assert leftovers(layout.root) == []

    run(layout, ["codecontests"], ["process"], source=source, skip_bad_records=True)
    assert "skipped 2 bad records" in capsys.readouterr().out
    manifest = json.loads(layout.dataset("codecontests").manifest.read_text())
    bad = manifest["process"]["splits"]["train"]["bad_records"]
    assert bad["count"] == 2 and "missing field 'difficulty'" in bad["examples"][1]
    ids = {
        r["metadata"]["problem_id"]
        for r in iter_jsonl(layout.dataset("codecontests").split("train"))
    }
    assert ids == {rows[0]["name"], rows[2]["name"]}


def test_bad_json_lines_report_file_and_line(tmp_path, layout, cc_rows):
    source = write_cc_source(tmp_path / "src", copy.deepcopy(cc_rows[:2]))
    (source / "code_contests/data/train-00000-of-00001.parquet").unlink()
    missing = {k: v for k, v in cc_rows[1].items() if k != "solutions"}
    lines = [
        json.dumps(cc_rows[0]).encode(),
        b'{"name": "x\xff"}',
        json.dumps(missing).encode(),
        json.dumps(cc_rows[2]).encode(),
    ]
    (source / "code_contests/data/train-00000-of-00001.jsonl").write_bytes(
        b"\n".join(lines) + b"\n"
    )

    with pytest.raises(StorageError, match=r"train-00000-of-00001\.jsonl:2: not valid UTF-8"):
        run(layout, ["codecontests"], ["process"], source=source)
    assert leftovers(layout.root) == []
    run(layout, ["codecontests"], ["process"], source=source, skip_bad_records=True)
    manifest = json.loads(layout.dataset("codecontests").manifest.read_text())
    bad = manifest["process"]["splits"]["train"]["bad_records"]
    assert bad["count"] == 2 and bad["examples"][1].endswith(".jsonl:3: missing field 'solutions'")
    assert manifest["process"]["splits"]["train"]["problems"] == 2


def test_failed_rerun_keeps_the_previous_outputs_intact(tmp_path, layout, cc_rows):
    good = write_cc_source(tmp_path / "good", copy.deepcopy(cc_rows[:3]))
    run(layout, ["codecontests"], ["process", "eval", "tests"], source=good)
    paths = layout.dataset("codecontests")
    before = {p: p.read_bytes() for p in paths.root.rglob("*") if p.is_file()}
    broken = copy.deepcopy(cc_rows[:3])
    broken[2]["description"] = None
    bad = write_cc_source(tmp_path / "bad", broken)
    with pytest.raises(StorageError, match="record 2: field 'description' should be str, got null"):
        run(layout, ["codecontests"], ["process", "eval", "tests"], source=bad, force=True)
    assert {p: p.read_bytes() for p in paths.root.rglob("*") if p.is_file()} == before
    assert leftovers(layout.root) == []


def test_token_lengths_are_exact_and_the_length_filter_applies_to_codecontests(
    tmp_path, layout, cc_rows, small_tokenizer
):
    source = write_cc_source(tmp_path / "src", copy.deepcopy(cc_rows[:4]))
    run(layout, ["codecontests"], ["process", "metadata"], source=source)
    tokenizer = Tokenizer(small_tokenizer)
    path = layout.dataset("codecontests").split("train")
    records = list(iter_jsonl(path))
    lengths = [len(tokenizer.encode(format_text(r), bos=True, eos=True)) for r in records]
    assert [r["metadata"]["token_length"] for r in records] == lengths
    index = load_problem_index(layout.dataset("codecontests").split_metadata("train"))
    entry = index["problem_index_map"][records[0]["metadata"]["problem_id"]]
    assert entry["correct_token_lengths"] == [lengths[i] for i in entry["correct_indices"]]

    cap = sorted(lengths)[len(lengths) // 2]
    run(layout, ["codecontests"], ["process"], source=source, max_length=cap)
    kept = [r["metadata"]["token_length"] for r in iter_jsonl(path)]
    manifest = json.loads(layout.dataset("codecontests").manifest.read_text())
    assert max(kept) <= cap and len(kept) + manifest["process"]["splits"]["train"][
        "over_max_length"
    ] == len(lengths)


def test_no_tokenizer_fails_clearly_unless_lengths_are_waived(tmp_path, cc_rows):
    layout = StorageLayout(tmp_path / "bare")
    source = write_cc_source(tmp_path / "src", copy.deepcopy(cc_rows[:2]))
    with pytest.raises(StorageError, match="no tokenizer in storage.*--no-token-lengths"):
        run(layout, ["codecontests"], ["process"], source=source)
    assert not layout.root.exists()
    run(layout, ["codecontests"], ["process", "metadata"], source=source, token_lengths=False)
    records = list(iter_jsonl(layout.dataset("codecontests").split("train")))
    assert records and all(r["metadata"]["token_length"] is None for r in records)
    index = load_problem_index(layout.dataset("codecontests").split_metadata("train"))
    assert index["token_lengths_computed"] is False
    assert all(e["correct_token_lengths"] is None for e in index["problem_index_map"].values())


def test_finished_steps_are_no_ops_until_options_change(tmp_path, layout, cc_rows, capsys):
    source = write_cc_source(tmp_path / "src", copy.deepcopy(cc_rows[:3]))
    steps = ["process", "metadata", "small", "stats", "eval", "tests"]
    run(layout, ["codecontests"], steps, source=source)
    train = layout.dataset("codecontests").split("train")
    stamp = train.stat().st_mtime_ns
    capsys.readouterr()
    run(layout, ["codecontests"], steps, source=source)
    out = capsys.readouterr().out
    assert train.stat().st_mtime_ns == stamp
    assert out.count("up to date") == 3 + 3 + 3 + 1 and "records from" not in out
    run(layout, ["codecontests"], ["process"], source=source, include_python2=True)
    assert train.stat().st_mtime_ns != stamp
    assert any(r["metadata"]["language"] == "python2" for r in iter_jsonl(train))
    with pytest.raises(StorageError, match="run the metadata step"):
        run(layout, ["codecontests"], ["small"], source=source)


def test_small_splits_are_whole_seeded_problems_within_budget(tmp_path, layout, cc_rows):
    source = write_cc_source(tmp_path / "src", copy.deepcopy(cc_rows))
    run(layout, ["codecontests"], ["process", "metadata", "small"], source=source)
    paths = layout.dataset("codecontests")
    full = load_problem_index(paths.split_metadata("train"))["problem_index_map"]
    small = load_problem_index(paths.small_split_metadata("train"))
    chosen = small["small"]["problems"]
    assert 0 < small["stats"]["total"] <= 100 and small["stats"]["n_valid_problems"] == len(chosen)
    expected_lines = sorted(
        i for p in chosen for i in full[p]["correct_indices"] + full[p]["incorrect_indices"]
    )
    assert small["small"]["source_indices"] == expected_lines
    assert JsonlFile(paths.small_split("train")).read(range(len(expected_lines))) == JsonlFile(
        paths.split("train")
    ).read(expected_lines)
    first = paths.small_split("train").read_bytes()
    run(layout, ["codecontests"], ["small"], source=source, force=True)
    assert paths.small_split("train").read_bytes() == first


def test_outputs_are_byte_identical_for_any_number_of_workers(
    tmp_path, small_tokenizer, monkeypatch, capsys
):
    """1, 2 and 3 tokenising processes on a synthetic source give the same files, byte for byte.

    Chunks of 16 records make the pool start and keep several chunks in flight, out of order
    in the workers but written back in order; a length cap makes the filter part of it.
    """
    from weighted_mtp.storage import dataset_workers, synthetic

    source = tmp_path / "synthetic"
    synthetic.run(source, seed=1, problems={"train": 40, "valid": 6, "test": 6})
    monkeypatch.setattr(dataset_workers, "CHUNK_RECORDS", 16)
    steps = ["process", "metadata", "eval", "tests"]
    root = tmp_path / "storage"  # one root: the metadata names the tokenizer's path
    target = root / "models/micro-mtp/tokenizer/tokenizer.model"
    target.parent.mkdir(parents=True)
    shutil.copy(small_tokenizer, target)
    built = {}
    for workers in (1, 2, 3):
        run(
            StorageLayout(root),
            ["codecontests"],
            steps,
            source=source,
            max_length=400,
            force=True,
            workers=workers,
        )
        said = capsys.readouterr().out
        assert (f"measured by {workers} processes" in said) == (workers > 1)
        folder = root / "datasets/codecontests"
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"
        }
        manifest = json.loads((folder / "manifest.json").read_text())
        built[workers] = files, manifest["process"]["splits"]
    files, splits = built[1]
    assert "processed/train.jsonl" in files and splits["train"]["records"] > 100
    assert 0 < splits["train"]["over_max_length"] < splits["train"]["records"]
    for workers in (2, 3):
        assert built[workers][0].keys() == files.keys()
        different = [name for name in files if built[workers][0][name] != files[name]]
        assert different == [], f"{workers} workers changed {different}"
        assert built[workers][1] == splits


def test_workers_must_be_positive(tmp_path, layout, cc_rows):
    source = write_cc_source(tmp_path / "src", copy.deepcopy(cc_rows[:2]))
    with pytest.raises(StorageError, match="--workers must be at least 1, got 0"):
        run(layout, ["codecontests"], ["process"], source=source, workers=0)


@pytest.mark.parametrize(
    ("name", "token_lengths"), [("codecontests", True), ("mbpp", True), ("gsm8k", False)]
)
def test_metadata_written_in_the_process_pass_equals_the_metadata_steps(
    tmp_path, layout, cc_rows, capsys, name, token_lengths
):
    """With process and metadata asked together, the metadata files come from the process
    pass (no second read of the split); rebuilt by the metadata step alone they are the same
    bytes. CodeContests with a length cap (dropped lines shift the indices), MBPP (lines
    without is_correct), GSM8K without token lengths (null length lists)."""
    source = write_cc_source(tmp_path / "src", cc_rows) if name == "codecontests" else None
    options = {"max_length": 300} if name == "codecontests" else {}
    run(
        layout,
        [name],
        ["process", "metadata"],
        source=source,
        token_lengths=token_lengths,
        **options,
    )
    said = capsys.readouterr().out
    paths = layout.dataset(name)
    manifest = json.loads(paths.manifest.read_text())
    splits = list(manifest["process"]["splits"])

    def outputs() -> dict[str, bytes]:
        return {
            f"{split}/{kind}": path(split).read_bytes()
            for split in splits
            for kind, path in (("meta", paths.split_metadata), ("problems", paths.split_problems))
        }

    in_pass = outputs()
    for split in splits:
        assert f"{name}: metadata: {split} " in said
        info = manifest["metadata"][split]
        assert info["source_sha256"] == manifest["process"]["splits"][split]["sha256"]
    assert "up to date" not in said
    if name == "codecontests":
        assert manifest["process"]["splits"]["train"]["over_max_length"] > 0
    if not token_lengths:
        assert "token length lists are null" in said
    run(layout, [name], ["metadata"], source=source, force=True, **options)
    assert outputs() == in_pass


def test_record_encoder_shares_the_work_with_this_process_and_keeps_the_order(
    small_tokenizer, monkeypatch
):
    """Two processes: one spawned worker, and this one encoding a chunk itself whenever the
    worker already has its share queued; the callbacks still run in submission order, with
    the same lines as a single process gives."""
    from weighted_mtp.storage import dataset_workers

    monkeypatch.setattr(dataset_workers, "IN_FLIGHT_PER_WORKER", 1)

    def chunk(number: int) -> list[list[dict]]:
        return [
            [
                {
                    "instruction": f"Problem {number}: print {k} twice " * (1 + k % 3),
                    "input": "",
                    "output": f"print({k})\nprint({k})\n",
                    "task_id": f"p{number}_correct_{k}",
                    "is_correct": k % 2 == 0,
                    "metadata": {"problem_id": f"p{number}", "difficulty": 1},
                }
                for k in range(5)
            ]
        ]

    def encode_all(workers: int) -> tuple[list[bytes], dataset_workers.RecordEncoder]:
        out: list[bytes] = []
        encoder = dataset_workers.RecordEncoder(str(small_tokenizer), workers, max_length=125)
        for number in range(40):
            encoder.submit(chunk(number), lambda e, n=number: out.append((n, e.lines)), last=False)
        encoder.flush()
        used_here = encoder.local is not None
        encoder.close()
        return out, used_here

    one, _ = encode_all(1)
    two, used_here = encode_all(2)
    assert [n for n, _ in two] == list(range(40))
    assert two == one
    kept = b"".join(lines for _, lines in one).count(b"\n")
    assert 0 < kept < 40 * 5, "the length cap should drop some records and keep others"
    assert used_here, "this process never took a chunk while the worker was busy"


KILLED_WORKER_SCRIPT = """
import multiprocessing, os, signal, sys
from weighted_mtp.base.io import StorageError
from weighted_mtp.storage import dataset_workers

def chunk(n):
    record = {"instruction": "print the sum " * 50, "input": "", "output": "print(1)",
              "task_id": f"t{n}", "metadata": {"problem_id": f"p{n}"}}
    return [[dict(record, metadata=dict(record["metadata"])) for _ in range(20)]]

if __name__ == "__main__":
    encoder = dataset_workers.RecordEncoder(sys.argv[1], 2)
    out = []
    encoder.submit(chunk(0), out.append, last=False)  # starts the worker
    encoder.flush()
    (worker,) = multiprocessing.active_children()
    os.kill(worker.pid, signal.SIGSTOP)  # it cannot take the next chunk...
    encoder.submit(chunk(1), out.append, last=False)
    os.kill(worker.pid, signal.SIGKILL)  # ...and dies holding it
    try:
        encoder.flush()
        print("no error")
    except StorageError as err:
        print("error:", err)
    encoder.close(ok=False)
    print("closed", len(out), encoder.results is None)
"""


def run_script(tmp_path: Path, text: str, tokenizer: Path) -> subprocess.CompletedProcess:
    """``text`` as a script of its own (spawned workers import the main module), given the
    tokenizer's path; two minutes at most."""
    script = tmp_path / "script.py"
    script.write_text(text)
    return subprocess.run(
        [sys.executable, str(script), str(tokenizer)], capture_output=True, text=True, timeout=120
    )


def test_a_killed_worker_fails_the_step_with_one_line_instead_of_hanging(tmp_path, small_tokenizer):
    """A worker killed while it holds a chunk (the out-of-memory killer, a cluster's limits):
    the main process says so in one line, stops the rest, and exits; with a plain process
    pool it waited for that chunk for ever."""
    result = run_script(tmp_path, KILLED_WORKER_SCRIPT, small_tokenizer)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("error: a tokenising worker process died"), result.stdout
    assert lines[1] == "closed 1 True"


ORPHAN_SCRIPT = """
import multiprocessing, os, signal, sys
from weighted_mtp.storage import dataset_workers

if __name__ == "__main__":
    encoder = dataset_workers.RecordEncoder(sys.argv[1], 2)
    record = {"instruction": "x", "input": "", "output": "y", "task_id": "t",
              "metadata": {"problem_id": "p"}}
    encoder.submit([[record]], lambda e: None, last=False)
    encoder.flush()
    (worker,) = multiprocessing.active_children()
    print(worker.pid, encoder.results.name, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
"""


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\\nState:\\tZ" in status  # exited, not yet reaped by its new parent


def test_workers_do_not_outlive_a_killed_main_process(tmp_path, small_tokenizer):
    """The main process killed with SIGKILL: its worker exits too (it would otherwise wait on
    its pipe for ever, holding its memory) and removes the temporary results folder."""
    result = run_script(tmp_path, ORPHAN_SCRIPT, small_tokenizer)
    assert result.returncode == -9, result.stderr[-2000:]
    pid, folder = result.stdout.split()
    for _ in range(100):
        if _gone(int(pid)) and not Path(folder).exists():
            break
        time.sleep(0.1)
    assert _gone(int(pid)), "the worker outlived the main process"
    assert not Path(folder).exists()


def test_a_run_removes_the_leftovers_of_killed_runs_of_this_host_only(
    tmp_path, layout, cc_rows, capsys
):
    """A run killed outright leaves its staged files; the next run on the dataset removes those
    of this host's dead processes, never a live process's or another host's (a shared
    filesystem), even when every step is up to date."""
    from weighted_mtp.storage.dataset_build import _HOST

    source = write_cc_source(tmp_path / "src", cc_rows[:3])
    run(layout, ["codecontests"], ["process", "metadata"], source=source)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    processed = layout.dataset("codecontests").split("train").parent
    dead = processed / f".train.jsonl.partial-{_HOST}-{finished.pid}"
    dead_too = processed / f".train_metadata.json.partial-{_HOST}-{finished.pid}"
    live = processed / f".train.jsonl.partial-{_HOST}-{os.getppid()}"
    elsewhere = processed / f".train.jsonl.partial-another_host-{finished.pid}"
    for path in (dead, dead_too, live, elsewhere):
        path.write_bytes(b"half a file")
    capsys.readouterr()
    run(layout, ["codecontests"], ["process", "metadata"], source=source)
    said = capsys.readouterr().out
    assert "removed 2 partial files left by a killed run" in said and "up to date" in said
    assert not dead.exists() and not dead_too.exists()
    assert live.exists() and elsewhere.exists()
