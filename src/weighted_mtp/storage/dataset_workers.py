"""The per-record work of the process step, in parallel processes.

Measuring every record's templated token length is most of the process step's time, so the
records of a split go out in chunks of about :data:`CHUNK_RECORDS` (whole problems: a
problem's records never straddle two chunks) to ``workers`` processes: ``workers - 1``
spawned ones and this one, which encodes a chunk itself whenever the others have enough to
do. Each loads the tokenizer once and does everything a record needs on its own: its token
length, the length filter, its finished JSON line and its metadata entry. A chunk comes back
as one block of kept lines with their sizes, counts and metadata facts, so the main process
only writes (docs/DATA.md §6). The results are taken back in submission order, so the output
bytes are the same for any number of workers, and at most :data:`IN_FLIGHT_PER_WORKER` chunks
per worker are out at once, so memory stays flat however large the source.

With one worker, or while a split still fits in a single chunk, the same function runs in
this process: the worker pool starts only when the first full chunk is ready, so small
sources never pay for it. A worker that dies fails the step with a one-line error (see
:func:`_encode_in_worker`). Workers are started with ``spawn`` (never ``fork`` from a process
whose reader threads may hold locks) and import only this module, SentencePiece and the
JSON-lines and record helpers, not torch or numpy.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import shutil
import tempfile
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece as spm

from weighted_mtp.base.io import StorageError
from weighted_mtp.data.alpaca import format_text
from weighted_mtp.data.jsonl import encode_line
from weighted_mtp.storage.dataset_metadata import LineFacts, line_entry_text, line_facts

CHUNK_RECORDS = 256
IN_FLIGHT_PER_WORKER = 2


@dataclass
class EncodedChunk:
    """One chunk's kept lines, in order, and what the counts and the metadata need of them."""

    lines: bytes = b""
    sizes: list[int] = field(default_factory=list)  # byte size of each kept line
    facts: list[LineFacts] = field(default_factory=list)  # per kept line, for the metadata
    entries: list[str] = field(default_factory=list)  # per kept line, its metadata entry (JSON)
    # problems (with a kept line), correct, incorrect, over_max_length
    counts: Counter[str] = field(default_factory=Counter)


def default_workers() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class ChunkEncoder:
    """Token-counts, filters and serialises chunks of records with one SentencePiece model."""

    def __init__(self, tokenizer_path: str | None):
        self.sp = spm.SentencePieceProcessor(model_file=tokenizer_path) if tokenizer_path else None

    def __call__(self, chunk: list[list[dict[str, Any]]], max_length: int | None) -> EncodedChunk:
        """Set ``metadata.token_length`` on every record; keep those within ``max_length``.

        The length is the training length: BOS + the templated prompt and response + the
        appended EOS (docs/METHOD.md §7); ``None`` without a tokenizer, and then no record
        is dropped. One thread per worker: the workers are the parallelism.
        """
        flat = [record for group in chunk for record in group]
        if self.sp is None:
            lengths: list[int | None] = [None] * len(flat)
        else:
            ids = self.sp.encode([format_text(r) for r in flat], num_threads=1)
            lengths = [len(x) + 2 for x in ids]
        out, lines, position = EncodedChunk(), [], 0
        for group in chunk:
            kept = 0
            for record in group:
                length = lengths[position]
                position += 1
                if max_length is not None and length is not None and length > max_length:
                    out.counts["over_max_length"] += 1
                    continue
                record["metadata"]["token_length"] = length
                line = encode_line(record)
                lines.append(line)
                out.sizes.append(len(line))
                facts = line_facts(record)
                out.facts.append(facts)
                out.entries.append(line_entry_text(facts))
                kept += 1
                if facts[2] is not None:
                    out.counts["correct" if facts[2] else "incorrect"] += 1
            out.counts["problems"] += kept > 0
        out.lines = b"".join(lines)
        return out


_WORKER_ENCODER: ChunkEncoder | None = None
_WORKER_OUT: Path | None = None


def _start_worker(tokenizer_path: str | None, out_dir: str) -> None:
    global _WORKER_ENCODER, _WORKER_OUT
    _WORKER_ENCODER, _WORKER_OUT = ChunkEncoder(tokenizer_path), Path(out_dir)
    # Records hold no reference cycles: reference counting frees them, and the collector's
    # passes over a chunk's many small objects would only cost time.
    gc.disable()
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_end_with, args=(parent, out_dir), daemon=True).start()


def _end_with(parent: Any, out_dir: str) -> None:
    """Exit when the main process ends, however it ends.

    A worker waits for chunks on a pipe it also holds the writing end of, so it would never
    see the main process go if that was killed (the out-of-memory killer, a scheduler's
    ``kill -9``): it would idle for ever, holding its memory. The results folder goes with it.
    """
    parent.join()
    shutil.rmtree(out_dir, ignore_errors=True)
    os._exit(1)


def _encode_in_worker(chunk: list[list[dict[str, Any]]], max_length: int | None, name: str) -> str:
    """Encode ``chunk`` into a file of the encoder's folder; return the file's path.

    The result travels as a file and only its path goes through the executor's pipe: a
    message that small is written to a pipe in one piece, so a worker killed at any moment
    never leaves half a message that the executor would wait on for ever; it is seen as a
    dead worker instead (docs/DATA.md §6).
    """
    assert _WORKER_ENCODER is not None and _WORKER_OUT is not None, "worker not started"
    encoded = _WORKER_ENCODER(chunk, max_length)
    path = _WORKER_OUT / name
    with open(path, "wb") as handle:
        pickle.dump(encoded, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return str(path)


def _read_result(path: str) -> EncodedChunk:
    with open(path, "rb") as handle:
        encoded = pickle.load(handle)
    os.unlink(path)
    return encoded


class _Done:
    """A chunk encoded in this process, with the interface of a ``Future``."""

    def __init__(self, value: EncodedChunk):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> EncodedChunk:
        return self.value


class RecordEncoder:
    """Ordered, bounded encoding of record chunks by ``workers`` processes, this one included.

    With ``workers`` > 1, ``workers - 1`` processes are spawned, and this process, which
    reads the source and writes the output, encodes a chunk itself whenever every spawned
    worker already has :data:`IN_FLIGHT_PER_WORKER` chunks to do: N processes on N cores,
    none idle and none oversubscribed. Records longer than ``max_length`` tokens are dropped
    (and counted); ``None`` keeps all. ``submit`` hands over one chunk and a callback;
    callbacks run in this process, in submission order, when the chunk's result is taken back
    (at the latest in ``flush``).
    """

    def __init__(self, tokenizer_path: str | None, workers: int, max_length: int | None = None):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.tokenizer_path, self.workers, self.max_length = tokenizer_path, workers, max_length
        self.local: ChunkEncoder | None = None
        self.pool: Any = None
        self.pending: deque[tuple[Any, Callable[[EncodedChunk], None]]] = deque()
        self.results: tempfile.TemporaryDirectory[str] | None = None  # the workers' results
        self.sent = 0

    @property
    def started_pool(self) -> bool:
        return self.pool is not None

    def _encode_here(self, chunk: list[list[dict[str, Any]]]) -> EncodedChunk:
        if self.local is None:
            self.local = ChunkEncoder(self.tokenizer_path)
        return self.local(chunk, self.max_length)

    def submit(
        self, chunk: list[list[dict[str, Any]]], done: Callable[[EncodedChunk], None], last: bool
    ) -> None:
        """Encode ``chunk``; ``last`` says no full chunk follows (a pool is not worth starting)."""
        if self.workers > 1 and (self.pool is not None or not last):
            if self.pool is None:
                self.results = tempfile.TemporaryDirectory(prefix="wmtp-chunks-")
                self.pool = ProcessPoolExecutor(
                    self.workers - 1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(self.tokenizer_path, self.results.name),
                )
            busy = sum(not result.done() for result, _ in self.pending)
            if busy < IN_FLIGHT_PER_WORKER * (self.workers - 1):
                self.sent += 1
                name = f"chunk-{self.sent}.pickle"
                result = self.pool.submit(_encode_in_worker, chunk, self.max_length, name)
            else:
                result = _Done(self._encode_here(chunk))
            self.pending.append((result, done))
            while self.pending and self.pending[0][0].done():
                self._take_one()
            while len(self.pending) > IN_FLIGHT_PER_WORKER * self.workers:
                self._take_one()
            return
        self.flush()  # earlier chunks first: the order of the output is the order of submission
        done(self._encode_here(chunk))

    def _take_one(self) -> None:
        result, done = self.pending.popleft()
        try:
            value = result.result()
        except BrokenProcessPool:
            raise StorageError(
                "a tokenising worker process died before returning its records (killed, or out "
                "of memory?); nothing was written: run the step again, with fewer --workers if "
                "memory is short"
            ) from None
        except OSError as err:  # the results folder: full, or not writable
            raise StorageError(
                f"a tokenising worker could not hand back its records: {err}"
            ) from None
        done(value if isinstance(value, EncodedChunk) else _read_result(value))

    def flush(self) -> None:
        """Take back every chunk still out, in order."""
        while self.pending:
            self._take_one()

    def close(self, ok: bool = True) -> None:
        """Stop the workers: after the last result when ``ok``; after a failure, with the
        chunks not yet started cancelled (a worker finishes the one it holds, then exits)."""
        if self.pool is None:
            return
        if ok:
            self.flush()
        else:
            self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=not ok)
        self.pool = None
        if self.results is not None:
            self.results.cleanup()
            self.results = None
