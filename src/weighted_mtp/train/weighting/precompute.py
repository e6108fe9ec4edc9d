"""Precomputed frozen signals: a helper's per-example outputs computed once before training,
cached under ``<storage>/cache/<kind>/`` by the helper's checkpoint fingerprint and the exact
data, so the helper can be freed (docs/METHOD.md §4, §5; ``weighting.<name>.precompute``)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from weighted_mtp.data.dataset import BatchStream
    from weighted_mtp.train.weighting.base import BuildContext


def release_memory() -> None:
    """Give a dropped helper's memory back: collect cycles, empty the CUDA cache, and on glibc
    return the freed heap pages (``malloc_trim``; smaller tensors live on the heap)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cached_per_example(
    cache_dir: Path | None, kind: str, key: dict, stream: BatchStream,
    compute: Callable[[], list[Tensor]],
) -> list[Tensor]:  # fmt: skip
    """Per-example 1-D signals of ``stream`` from ``<cache_dir>/<kind>/<key>.safetensors``,
    computed by ``compute()`` and stored on a miss (no cache when ``cache_dir`` is None). The
    key covers the frozen model's checkpoint and the exact data (file, sampled lines, length
    cap), so a stale cache is never read."""
    from safetensors.torch import load_file, save_file

    from weighted_mtp.base.io import atomic_path

    if cache_dir is None:
        return compute()
    payload = {**key, "file": stream.data.manifest.get("file"), "lines": stream.data.line_indices}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir / kind / f"{digest[:32]}.safetensors"
    if path.is_file():
        data = load_file(path)
        return list(torch.split(data["values"], data["lengths"].tolist()))
    values = compute()
    lengths = torch.tensor([v.numel() for v in values], dtype=torch.long)
    with atomic_path(path) as tmp:
        save_file({"values": torch.cat(values).float().contiguous(), "lengths": lengths}, tmp)
    return values


@dataclass
class Precompute:
    """Where a weighting's precomputed signal goes: ``batch.extras[extra]``, cached under
    ``<cache_dir>/<kind>/`` with ``key`` (the helper's checkpoint fingerprint, length cap)."""

    kind: str
    extra: str
    key: dict
    cache_dir: Path | None = None

    def fill(
        self, streams: list[BatchStream],
        compute: Callable[[BatchStream], list[Tensor]],
    ) -> None:  # fmt: skip
        for stream in streams:
            stream.extras[self.extra] = cached_per_example(
                self.cache_dir, self.kind, self.key, stream, lambda s=stream: compute(s)
            )


def precompute_for(kind: str, extra: str, helper: str, ckpt: Path, ctx: BuildContext) -> Precompute:
    """Where a weighting built from ``ctx`` stores its helper's signal (no cache without a
    storage layout)."""
    from weighted_mtp.train.checkpoint import fingerprint

    cache_dir = ctx.layout.root / "cache" if ctx.layout is not None else None
    key = {helper: fingerprint(ckpt), "max_length": ctx.max_length}
    return Precompute(kind, extra, key, cache_dir)


# ---- Rho-1 (docs/METHOD.md §5) ----
