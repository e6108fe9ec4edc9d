"""One streaming pass over a dataset's source, feeding the process, eval and tests outputs.

CodeContests' train split is ~13k problems and millions of solutions, so each split is
read once, problem by problem, and every requested output is written as the problem goes
by: memory is bounded by the largest problem, not the split.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from weighted_mtp.base.io import StorageError, sha256_file
from weighted_mtp.base.layout import training_tokenizer_path
from weighted_mtp.data.jsonl import JsonlWriter
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.storage import dataset_workers
from weighted_mtp.storage.dataset_build import Build, Staging
from weighted_mtp.storage.dataset_metadata import MetadataWriter, split_header, summary_line
from weighted_mtp.storage.dataset_records import (
    METADATA_FIELDS,
    REQUIRED_FIELDS,
    BadRecord,
    Problem,
    ProblemNames,
    codecontests_eval_record,
    codecontests_records,
    codecontests_tests_entry,
    gsm8k_record,
    humaneval_record,
    mbpp_record,
    parse_codecontests,
)
from weighted_mtp.storage.dataset_sources import SOURCES, SourceRecord, count_problems, iter_records
from weighted_mtp.storage.dataset_workers import EncodedChunk, RecordEncoder

EVAL_SPLITS = ("valid", "test")
SOURCE_STEPS = ("process", "eval", "tests")


class BadRecords:
    """Stops at the first bad record, or counts them when skipping is allowed."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.examples: list[str] = []

    def add(self, err: BadRecord) -> None:
        if not self.skip:
            raise StorageError(f"{err} (pass --skip-bad-records to skip and count such records)")
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(str(err))

    def summary(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}


def convert(
    name: str, src: SourceRecord, names: ProblemNames, number: int
) -> Problem | dict[str, Any]:
    """A checked CodeContests problem, or the Alpaca record of another dataset."""
    if src.error is not None or src.data is None:
        raise BadRecord(src.where, src.error or "empty record")
    if name == "codecontests":
        return parse_codecontests(src.data, src.where, names)
    if name == "mbpp":
        return mbpp_record(src.data, src.where)
    if name == "humaneval":
        return humaneval_record(src.data, src.where)
    return gsm8k_record(src.data, src.where, number)


class ProcessSink:
    """``<split>.jsonl`` + index: Python solutions, templated token lengths, length filter.

    Records go to the :class:`RecordEncoder` (worker processes) in chunks of whole problems;
    each chunk comes back as its kept lines, in order, and is written here. With a
    :class:`MetadataWriter`, the split's metadata files are written in the same pass, from
    the same lines (docs/DATA.md §6).
    """

    def __init__(
        self,
        writer: JsonlWriter,
        encoder: RecordEncoder,
        include_python2: bool,
        metadata: MetadataWriter | None = None,
        metadata_header: Callable[[str], dict[str, Any]] | None = None,
    ):
        """``metadata_header`` makes the metadata files' header from the JSONL's sha256."""
        self.writer, self.encoder, self.include_python2 = writer, encoder, include_python2
        self.metadata, self.metadata_header = metadata, metadata_header
        self.metadata_stats: dict[str, Any] | None = None
        self.counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.chunk: list[list[dict[str, Any]]] = []
        self.chunk_records = 0

    def add(self, item: Problem | dict[str, Any]) -> None:
        if isinstance(item, Problem):
            if not item.description.strip():
                self.counts["no_description"] += 1
                return
            records, dropped = codecontests_records(item, self.include_python2)
            self.dropped.update(dropped)
        else:
            records = [item]
        if not records:
            return
        self.chunk.append(records)
        self.chunk_records += len(records)
        if self.chunk_records >= dataset_workers.CHUNK_RECORDS:
            self._submit(last=False)

    def _submit(self, last: bool) -> None:
        if not self.chunk:
            return
        chunk, self.chunk, self.chunk_records = self.chunk, [], 0
        self.encoder.submit(chunk, self._write, last)

    def _write(self, encoded: EncodedChunk) -> None:
        self.writer.write_lines(encoded.lines, encoded.sizes)
        self.counts.update(encoded.counts)
        if self.metadata is not None:
            self.metadata.add_lines(encoded.facts, encoded.entries)

    def finish(self) -> dict[str, Any]:
        self._submit(last=True)
        self.encoder.flush()
        self.writer.close()
        if self.metadata is not None and self.metadata_header is not None:
            self.metadata_stats = self.metadata.finish(self.metadata_header(self.writer.sha256))
        return {
            "records": len(self.writer),
            "bytes": self.writer.size,
            "sha256": self.writer.sha256,
            **{
                k: self.counts[k]
                for k in ("problems", "correct", "incorrect", "over_max_length", "no_description")
            },
            "dropped_languages": dict(sorted(self.dropped.items())),
        }

    def close(self) -> None:
        self.writer.close()
        if self.metadata is not None:
            self.metadata.close()


class EvalSink:
    """``<split>_eval.jsonl``: one record per CodeContests problem with its tests and limits."""

    def __init__(self, writer: JsonlWriter):
        self.writer, self.skipped = writer, 0

    def add(self, problem: Problem) -> None:
        if not problem.description.strip():
            self.skipped += 1
            return
        self.writer.write(codecontests_eval_record(problem))

    def finish(self) -> dict[str, Any]:
        self.writer.close()
        return {
            "records": len(self.writer),
            "bytes": self.writer.size,
            "no_description": self.skipped,
        }


class TestsSink:
    """``tests/<split>_tests.json``: ``{problem_id: {task_name, public, private, generated}}``.

    Written entry by entry, so the train split's tests never sit in memory at once.
    """

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.handle.write("{")
        self.count = 0

    def add(self, problem: Problem) -> None:
        key = json.dumps(problem.problem_id, ensure_ascii=False)
        value = json.dumps(codecontests_tests_entry(problem), ensure_ascii=False)
        self.handle.write(("\n" if self.count == 0 else ",\n") + f"{key}: {value}")
        self.count += 1

    def finish(self) -> dict[str, Any]:
        if not self.handle.closed:
            self.handle.write("\n}\n")
            self.handle.close()
        return {"problems": self.count, "bytes": self.path.stat().st_size}

    def close(self) -> None:
        self.handle.close()


def _close(sink: Any) -> None:
    if isinstance(sink, (TestsSink, ProcessSink)):
        sink.close()
    else:
        sink.writer.close()


class SourcePass:
    """Runs the source-reading steps of one dataset together, skipping those up to date."""

    def __init__(self, build: Build):
        self.build = build
        self.with_metadata, self.token_info = False, None
        self.metadata_stats: dict[str, dict[str, Any]] = {}

    def run(self, steps: list[str], with_metadata: bool = False) -> None:
        """Run the source steps among ``steps``; ``with_metadata``: when the process step
        runs, its splits' metadata files are written in the same pass (the metadata step
        then has nothing left to do for them)."""
        build = self.build
        if build.name != "codecontests":
            # Only worth saying when eval/tests were asked for on their own, not via "all".
            for step in ("eval", "tests"):
                if step in steps and "process" not in steps:
                    build.say(step, "CodeContests only; nothing to do")
            steps = [s for s in steps if s == "process"]
        if not steps:
            return
        tokenizer_path = self._tokenizer_path() if "process" in steps else None
        if "process" in steps and build.options.token_lengths and tokenizer_path is None:
            raise StorageError(
                "no tokenizer in storage to measure token lengths: create the micro models "
                "(wmtp storage models --create-micro) or set up meta-llama-mtp first, "
                "or pass --no-token-lengths"
            )
        options = {step: self._options(step, tokenizer_path) for step in steps}
        pending = [s for s in steps if build.options.force or not self._fresh(s, options[s])]
        for step in steps:
            if step not in pending:
                build.say(step, "up to date")
        if not pending:
            return
        token_info = self._tokenizer(tokenizer_path) if "process" in pending else None
        self.with_metadata, self.token_info = with_metadata, token_info
        results = self._pass(pending, tokenizer_path)
        finished = dt.datetime.now().isoformat(timespec="seconds")
        for step in pending:
            value = {"options": options[step], "splits": results[step], "finished": finished}
            if step == "process":
                value.update(origin=build.origin().describe(), token_lengths=token_info)
            build.record(step, value)
            for split, info in results[step].items():
                build.say(step, f"{split} {_describe(step, info, build.options.max_length)}")
        for split, stats in self.metadata_stats.items():
            record_metadata(build, split, results["process"][split]["sha256"], stats)
            build.built_now.add(("metadata", split))

    def _tokenizer_path(self) -> Path | None:
        if not self.build.options.token_lengths:
            return None
        return training_tokenizer_path(self.build.layout)

    def _tokenizer(self, path: Path | None) -> dict[str, Any]:
        """What the manifest says of the tokenizer (None with --no-token-lengths)."""
        if path is None:
            return {"computed": False, "reason": "built with --no-token-lengths"}
        tokenizer = Tokenizer(path)
        info = {
            "computed": True,
            "tokenizer": str(path),
            "tokenizer_sha256": sha256_file(path),
            "vocab_size": tokenizer.vocab_size,
            "counted": "BOS + Alpaca template (docs/METHOD.md §7) with the response + EOS",
            "max_length": self.build.options.max_length,
            "length_filter": self.build.name == "codecontests",
        }
        return info

    def _options(self, step: str, tokenizer_path: Path | None) -> dict[str, Any]:
        build = self.build
        options: dict[str, Any] = {"origin": build.origin().describe()}
        if step == "process":
            options["token_lengths"] = build.options.token_lengths
            options["tokenizer_sha256"] = sha256_file(tokenizer_path) if tokenizer_path else None
            if build.name == "codecontests":
                options["include_python2"] = build.options.include_python2
                options["max_length"] = build.options.max_length
        return options

    def _outputs(self, step: str, split: str) -> list[Path]:
        paths = self.build.paths
        if step == "process":
            return [paths.split(split), paths.split_index(split)]
        if step == "eval":
            return [paths.eval_file(split), paths.eval_index(split)]
        return [paths.tests_file(split)]

    def _splits(self, step: str) -> tuple[str, ...]:
        return EVAL_SPLITS if step == "eval" else self.build.splits

    def _fresh(self, step: str, options: dict[str, Any]) -> bool:
        done = self.build.manifest.get(step)
        if not done or done.get("options") != options:
            return False
        for split in self._splits(step):
            outputs = self._outputs(step, split)
            info = done.get("splits", {}).get(split, {})
            if not all(p.is_file() for p in outputs) or outputs[0].stat().st_size != info.get(
                "bytes"
            ):
                return False
        return step != "process" or self.build.paths.schema.is_file()

    def _sinks(
        self, split: str, steps: list[str], staging: Staging, encoder: RecordEncoder
    ) -> dict[str, Any]:
        build, sinks = self.build, {}
        for step in steps:
            if split not in self._splits(step):
                continue
            outputs = [staging.path(p) for p in self._outputs(step, split)]
            if step == "process":
                paths, metadata = build.paths, None
                if self.with_metadata:
                    metadata = MetadataWriter(
                        staging.path(paths.split_metadata(split)),
                        staging.path(paths.split_problems(split)),
                    )

                def header(sha: str, name: str = paths.split(split).name) -> dict[str, Any]:
                    return split_header(name, sha, self.token_info)

                sinks[step] = ProcessSink(
                    JsonlWriter(*outputs), encoder, build.options.include_python2, metadata, header
                )
            elif step == "eval":
                sinks[step] = EvalSink(JsonlWriter(*outputs))
            else:
                sinks[step] = TestsSink(outputs[0])
        return sinks

    def _pass(self, steps: list[str], tokenizer_path: Path | None) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {step: {} for step in steps}
        workers = self.build.options.workers or dataset_workers.default_workers()
        max_length = self.build.options.max_length if self.build.name == "codecontests" else None
        encoder = RecordEncoder(
            str(tokenizer_path) if tokenizer_path else None, workers, max_length
        )
        with Staging() as staging:
            for split in self.build.splits:
                sinks = self._sinks(split, steps, staging, encoder)
                if not sinks:
                    continue
                try:
                    bad = self._read(split, sinks)
                    for step, sink in sinks.items():
                        results[step][split] = {**sink.finish(), "bad_records": bad}
                        if isinstance(sink, ProcessSink) and sink.metadata_stats is not None:
                            self.metadata_stats[split] = sink.metadata_stats
                except BaseException:
                    encoder.close(ok=False)
                    for sink in sinks.values():
                        _close(sink)
                    raise
            if encoder.started_pool:
                self.build.say(
                    "process",
                    f"token lengths measured by {workers} processes "
                    f"(this one and {workers - 1} spawned)",
                )
            encoder.close()
            if "process" in steps:
                schema = staging.path(self.build.paths.schema)
                schema.write_text(
                    json.dumps(schema_for(self.build), indent=2) + "\n", encoding="utf-8"
                )
            staging.commit()
        return results

    def _read(self, split: str, sinks: dict[str, Any]) -> dict[str, Any]:
        build = self.build
        spec, origin = SOURCES[build.name], build.origin()
        bad, names = BadRecords(build.options.skip_bad_records), ProblemNames()
        total = count_problems(origin, spec, split)
        with tqdm(
            total=total, desc=f"{build.name} {split}", unit=" records", mininterval=0.5
        ) as bar:
            for number, src in enumerate(iter_records(origin, spec, split)):
                bar.update()
                try:
                    item = convert(build.name, src, names, number)
                except BadRecord as err:
                    bad.add(err)
                    continue
                for sink in sinks.values():
                    sink.add(item)
        if bad.count:
            build.say(
                "source", f"{split}: skipped {bad.count} bad records; first: {bad.examples[0]}"
            )
        return bad.summary()


def record_metadata(build: Build, split: str, sha256: str, stats: dict[str, Any]) -> None:
    """Enter a split's freshly written metadata files in the manifest (built from the JSONL
    with this sha256) and say so: by the metadata step and by the process pass alike."""
    build.record("metadata", {"source_sha256": sha256}, split)
    build.say("metadata", summary_line(split, stats))
    token_info = build.manifest.get("process", {}).get("token_lengths")
    if token_info and not token_info.get("computed"):
        build.say("metadata", f"{split}: token length lists are null ({token_info['reason']})")


def _describe(step: str, info: dict[str, Any], max_length: int) -> str:
    if step == "tests":
        return f"{info['problems']} problems"
    if step == "eval":
        return f"{info['records']} problems"
    text = f"{info['records']} records from {info['problems']} problems"
    notes = [f"dropped {k} {v}" for k, v in info["dropped_languages"].items()]
    if info["over_max_length"]:
        notes.append(f"{info['over_max_length']} over {max_length} tokens")
    if info["no_description"]:
        notes.append(f"{info['no_description']} problems without description")
    if info["bad_records"]["count"]:
        notes.append(f"{info['bad_records']['count']} bad source records skipped")
    return text + (f" ({'; '.join(notes)})" if notes else "")


DESCRIPTIONS = {
    "codecontests": "CodeContests Python solutions (correct and incorrect), one record per solution",
    "mbpp": "MBPP (full): one record per task, reference code as output, tests in metadata",
    "humaneval": "HumanEval: one record per problem, canonical solution as output",
    "gsm8k": "GSM8K (main): one record per question, worked answer as output",
}


def schema_for(build: Build) -> dict[str, Any]:
    spec = SOURCES[build.name]
    return {
        "dataset": build.name,
        "format": "alpaca",
        "required_fields": list(REQUIRED_FIELDS[build.name]),
        "optional_fields": ["metadata"],
        "metadata_fields": list(METADATA_FIELDS[build.name]),
        "description": DESCRIPTIONS[build.name],
        "source": spec.repo + (f" ({spec.config})" if spec.config else ""),
        "splits": list(build.splits),
        "notes": [
            "prompt template: Alpaca with an empty input (docs/METHOD.md §7); EOS is appended in training",
            "metadata.token_length = tokens of BOS + templated prompt and response + EOS "
            "(null when built with --no-token-lengths)",
            "CodeContests: Python 3 solutions only unless --include-python2; records over "
            "--max-length tokens dropped; correct records of a problem come first",
            "CodeContests: an incorrect record from a source with mutation spans (wmtp storage "
            "synthetic) has metadata.mutation = {start, end, kind, original}: character offsets "
            "into output of the one mutated site",
        ],
    }
