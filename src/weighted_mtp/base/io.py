"""File writing that never leaves a half file behind, and checksums.

Everything that writes the storage tree goes through :func:`atomic_path` (write to a
temporary file in the same folder, then ``os.replace``), so an interrupted step leaves
either the old file or nothing, and a re-run starts clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from weighted_mtp.base.errors import UserError

CHUNK = 1 << 20


class StorageError(UserError):
    """A storage step failed for a reason the user can act on (one-line message)."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def read_json_or_none(path: str | Path) -> Any:
    """A JSON file's value, or None when it is missing, unreadable or not JSON (readers of
    optional outputs: reports, the quickstart's results)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_sha256sums(folder: Path, digests: dict[str, str]) -> Path:
    """Write ``SHA256SUMS`` in the format ``sha256sum -c`` reads (two spaces, relative name)."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
    out = folder / "SHA256SUMS"
    write_text_atomic(out, lines)
    return out


def read_sha256sums(path: Path) -> dict[str, str]:
    entries = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise StorageError(f"{path}:{lineno}: malformed checksum line")
        entries[parts[1].lstrip("*").strip()] = parts[0].lower()
    return entries


def check_sha256sums(path: Path) -> list[str]:
    """Names (relative to the file's folder) whose checksum is missing or wrong."""
    bad = []
    for name, digest in read_sha256sums(path).items():
        target = path.parent / name
        if not target.is_file() or sha256_file(target) != digest:
            bad.append(name)
    return bad
