"""JSON-lines files and their byte-offset index.

Every JSONL file the storage steps write has an index beside it (``train.jsonl`` ->
``train.idx``): little-endian uint64 byte offsets, one per line, plus a last entry that
holds the file's size. Line ``i`` is ``data[off[i]:off[i + 1]]``, so reading a sampled
subset seeks instead of scanning, and an index left over from an older file is caught by
comparing its last entry with the file's size.

Line numbers in error messages are 1-based (``file:line``); indices are 0-based.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weighted_mtp.base.errors import UserError

if TYPE_CHECKING:
    import numpy as np

# Little-endian uint64 offsets. numpy is imported where an index is read or written, so that
# only reading JSON lines (``wmtp score``) starts without it.
INDEX_DTYPE = "<u8"
INDEX_ITEMSIZE = 8


class JsonlError(UserError):
    """A malformed line (``path:line: reason``) or a missing/stale index."""


def index_path_for(path: str | os.PathLike[str]) -> Path:
    """The index file of a JSONL file: the same name with the suffix ``.idx``."""
    return Path(path).with_suffix(".idx")


def parse_line(raw: bytes, where: str) -> dict[str, Any]:
    """Decode one line as a UTF-8 JSON object; ``where`` prefixes the error message."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JsonlError(f"{where}: not valid UTF-8 (byte {err.start})") from None
    if not text.strip():
        raise JsonlError(f"{where}: empty line")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise JsonlError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise JsonlError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def encode_line(record: dict[str, Any]) -> bytes:
    """One record as the line the storage steps write: UTF-8 JSON (no ASCII escapes) + newline."""
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def iter_raw_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """``(line number from 1, raw bytes without the newline)`` of every line."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            yield lineno, raw.rstrip(b"\r\n")


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every record of a JSONL file, in order; a bad line raises ``JsonlError`` (file:line)."""
    for lineno, raw in iter_raw_lines(path):
        yield parse_line(raw, f"{path}:{lineno}")


class JsonlWriter:
    """Write records to ``path`` and their offsets to ``index_path``, hashing as it goes.

    The caller chooses the paths (usually temporary ones renamed into place once everything
    succeeded). Offsets go to disk in blocks, so memory stays flat however long the file.
    """

    _BLOCK = 65536

    def __init__(self, path: str | os.PathLike[str], index_path: str | os.PathLike[str]):
        self.path = Path(path)
        self.index_path = Path(index_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._index = open(self.index_path, "wb")  # noqa: SIM115 - closed in close()
        self._pending: list[int] = [0]
        self._digest = hashlib.sha256()
        self.size = 0
        self.count = 0

    def write(self, record: dict[str, Any]) -> int:
        """Append one record; return its 0-based index."""
        return self.write_line(encode_line(record))

    def write_line(self, data: bytes) -> int:
        """Append one line made by :func:`encode_line` (newline included); return its index."""
        self._handle.write(data)
        self._digest.update(data)
        self.size += len(data)
        self._pending.append(self.size)
        if len(self._pending) >= self._BLOCK:
            self._flush_index()
        self.count += 1
        return self.count - 1

    def write_lines(self, data: bytes, sizes: Sequence[int]) -> None:
        """Append several lines at once: ``data`` is their concatenation, ``sizes`` their lengths."""
        if sum(sizes) != len(data):
            raise ValueError(f"line sizes add up to {sum(sizes)}, not {len(data)} bytes")
        self._handle.write(data)
        self._digest.update(data)
        for size in sizes:
            self.size += size
            self._pending.append(self.size)
        if len(self._pending) >= self._BLOCK:
            self._flush_index()
        self.count += len(sizes)

    def _flush_index(self) -> None:
        import numpy as np

        self._index.write(np.asarray(self._pending, dtype=INDEX_DTYPE).tobytes())
        self._pending = []

    def __len__(self) -> int:
        return self.count

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._handle.closed:
            return
        self._handle.close()
        self._flush_index()
        self._index.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_index(offsets: Sequence[int] | np.ndarray, index_path: str | os.PathLike[str]) -> None:
    import numpy as np

    np.asarray(offsets, dtype=INDEX_DTYPE).tofile(index_path)


def build_index(path: str | os.PathLike[str], index_path: str | os.PathLike[str]) -> int:
    """Scan ``path`` and write its index to ``index_path``; return the number of lines."""
    import numpy as np

    offsets, position, count = [0], 0, 0
    with open(path, "rb") as handle, open(index_path, "wb") as out:
        for raw in handle:
            position += len(raw)
            offsets.append(position)
            count += 1
            if len(offsets) >= JsonlWriter._BLOCK:
                out.write(np.asarray(offsets, dtype=INDEX_DTYPE).tobytes())
                offsets = []
        out.write(np.asarray(offsets, dtype=INDEX_DTYPE).tobytes())
    return count


def load_index(
    path: str | os.PathLike[str], index_path: str | os.PathLike[str] | None = None
) -> np.ndarray:
    """The offsets of ``path`` (``n_lines + 1`` entries); raise if missing or stale."""
    import numpy as np

    index_path = Path(index_path) if index_path else index_path_for(path)
    if not index_path.is_file():
        raise JsonlError(f"{index_path}: index missing (rebuild with the storage datasets step)")
    raw = index_path.read_bytes()
    if len(raw) % INDEX_ITEMSIZE or not raw:
        raise JsonlError(f"{index_path}: not a whole number of uint64 offsets")
    offsets = np.frombuffer(raw, dtype=INDEX_DTYPE)
    size = os.path.getsize(path)
    if (
        int(offsets[-1]) != size
        or int(offsets[0]) != 0
        or np.any(np.diff(offsets.astype(np.int64)) <= 0)
    ):
        raise JsonlError(
            f"{index_path}: stale index (does not match {Path(path).name}, {size} bytes)"
        )
    return offsets


class JsonlFile:
    """Random access to the lines of an indexed JSONL file.

    Lines are read with ``os.pread`` (no shared file position, no page faults of a memory
    map); the file is re-opened after a fork, so one object can be shared with DataLoader
    workers.
    """

    def __init__(
        self, path: str | os.PathLike[str], index_path: str | os.PathLike[str] | None = None
    ):
        self._fd, self._pid = -1, -1
        self.path = Path(path)
        self.offsets = load_index(self.path, index_path)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _file(self) -> int:
        if self._fd < 0 or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def raw(self, index: int) -> bytes:
        """Line ``index`` (0-based) as bytes, without its newline."""
        return self.raw_many([index])[0].rstrip(b"\r\n")

    def raw_many(self, indices: Iterable[int]) -> list[bytes]:
        """Lines at ``indices`` as bytes (with their newline), in the order asked.

        Offsets are looked up in one vectorised step and the lines are read in file order,
        which keeps a cold-cache read close to sequential.
        """
        import numpy as np

        wanted = np.fromiter(indices, dtype=np.int64)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= len(self)):
            bad = int(wanted[(wanted < 0) | (wanted >= len(self))][0])
            raise IndexError(f"{self.path}: line index {bad} out of range (0..{len(self) - 1})")
        order = np.argsort(wanted, kind="stable")
        starts = self.offsets[wanted[order]].tolist()
        ends = self.offsets[wanted[order] + 1].tolist()
        fd, pread = self._file(), os.pread
        out: list[bytes] = [b""] * len(starts)
        for position, start, end in zip(order.tolist(), starts, ends, strict=True):
            out[position] = pread(fd, end - start, start)
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.read([index])[0]

    def read(self, indices: Iterable[int]) -> list[dict[str, Any]]:
        """The records at ``indices`` (0-based), in the order asked."""
        indices = list(indices)
        records = []
        for index, raw in zip(indices, self.raw_many(indices), strict=True):
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if type(record) is not dict:
                # Slow path only to build the precise file:line message.
                record = parse_line(raw.rstrip(b"\r\n"), f"{self.path}:{index + 1}")
            records.append(record)
        return records

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"], state["_pid"] = -1, -1
        return state


def read_lines(path: str | os.PathLike[str], indices: Iterable[int]) -> list[dict[str, Any]]:
    """The records at 0-based ``indices`` of an indexed JSONL file, read by seeking."""
    reader = JsonlFile(path)
    try:
        return reader.read(indices)
    finally:
        reader.close()
