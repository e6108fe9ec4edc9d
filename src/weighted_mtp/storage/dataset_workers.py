"""Token lengths and JSON lines of processed records, in parallel worker processes.

Measuring every record's templated token length is most of the process step's time, so the
records of a split go out in chunks of about :data:`CHUNK_RECORDS` (whole problems: a
problem's records never straddle two chunks) to ``workers`` processes, each of which loads
the tokenizer once and returns, per record, its token length and its finished JSON line. The
results are taken back in submission order, so the output bytes are the same for any number
of workers, and at most :data:`IN_FLIGHT_PER_WORKER` chunks per worker are out at once, so
memory stays flat however large the source (docs/DATA.md §6).

With one worker, or while a split still fits in a single chunk, the same function runs in
this process: the worker pool starts only when the first full chunk is ready, so small
sources never pay for it. Workers are started with ``spawn`` (never ``fork`` from a process
whose reader threads may hold locks) and import only this module, SentencePiece and the
JSON-lines writer, not torch.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import sentencepiece as spm

from weighted_mtp.data.alpaca import format_text
from weighted_mtp.data.jsonl import encode_line

CHUNK_RECORDS = 256
IN_FLIGHT_PER_WORKER = 2

# One chunk's result: per problem, per record, (token length or None, the JSON line).
Encoded = list[list[tuple[int | None, bytes]]]


def default_workers() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class ChunkEncoder:
    """Token-counts and serialises chunks of records with one SentencePiece model (or none)."""

    def __init__(self, tokenizer_path: str | None):
        self.sp = spm.SentencePieceProcessor(model_file=tokenizer_path) if tokenizer_path else None

    def __call__(self, chunk: list[list[dict[str, Any]]]) -> Encoded:
        """Set ``metadata.token_length`` on every record and return it with its JSON line.

        The length is the training length: BOS + the templated prompt and response + the
        appended EOS (docs/METHOD.md §7); ``None`` without a tokenizer. One thread per
        worker: the workers are the parallelism.
        """
        flat = [record for group in chunk for record in group]
        if self.sp is None:
            lengths: list[int | None] = [None] * len(flat)
        else:
            ids = self.sp.encode([format_text(r) for r in flat], num_threads=1)
            lengths = [len(x) + 2 for x in ids]
        out: Encoded = []
        position = 0
        for group in chunk:
            lines = []
            for record in group:
                length = lengths[position]
                record["metadata"]["token_length"] = length
                lines.append((length, encode_line(record)))
                position += 1
            out.append(lines)
        return out


_WORKER_ENCODER: ChunkEncoder | None = None


def _start_worker(tokenizer_path: str | None) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = ChunkEncoder(tokenizer_path)


def _encode_in_worker(chunk: list[list[dict[str, Any]]]) -> Encoded:
    assert _WORKER_ENCODER is not None, "worker started without its tokenizer"
    return _WORKER_ENCODER(chunk)


class _Done:
    """A result computed in this process, with the interface of ``AsyncResult.get``."""

    def __init__(self, value: Encoded):
        self.value = value

    def get(self) -> Encoded:
        return self.value


class RecordEncoder:
    """Ordered, bounded encoding of record chunks: in this process or in worker processes.

    ``submit`` hands over one chunk and a callback; callbacks run in this process, in
    submission order, when the chunk's result is taken back (at the latest in ``flush``).
    """

    def __init__(self, tokenizer_path: str | None, workers: int):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.tokenizer_path, self.workers = tokenizer_path, workers
        self.local: ChunkEncoder | None = None
        self.pool: Any = None
        self.pending: deque[tuple[Any, Callable[[Encoded], None]]] = deque()

    @property
    def started_pool(self) -> bool:
        return self.pool is not None

    def submit(
        self, chunk: list[list[dict[str, Any]]], done: Callable[[Encoded], None], last: bool
    ) -> None:
        """Encode ``chunk``; ``last`` says no full chunk follows (a pool is not worth starting)."""
        if self.workers > 1 and (self.pool is not None or not last):
            if self.pool is None:
                context = multiprocessing.get_context("spawn")
                self.pool = context.Pool(
                    self.workers, initializer=_start_worker, initargs=(self.tokenizer_path,)
                )
            self.pending.append((self.pool.apply_async(_encode_in_worker, (chunk,)), done))
            while len(self.pending) > IN_FLIGHT_PER_WORKER * self.workers:
                self._take_one()
            return
        if self.local is None:
            self.local = ChunkEncoder(self.tokenizer_path)
        self.flush()  # earlier chunks first: the order of the output is the order of submission
        done(self.local(chunk))

    def _take_one(self) -> None:
        result, done = self.pending.popleft()
        done(result.get())

    def flush(self) -> None:
        """Take back every chunk still out, in order."""
        while self.pending:
            self._take_one()

    def close(self, ok: bool = True) -> None:
        """Stop the workers: after the last result when ``ok``, at once after a failure."""
        if self.pool is None:
            return
        if ok:
            self.flush()
            self.pool.close()
        else:
            self.pending.clear()
            self.pool.terminate()
        self.pool.join()
        self.pool = None
