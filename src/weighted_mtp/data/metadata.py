"""Reading the ``<split>_metadata.json`` of a processed split (docs/METHOD.md §7, "Metadata").

``<split>_metadata.json`` is the storage contract's file (docs/STORAGE.md §3): the per-line ``metadata`` list, then
``problem_index_map`` and ``stats``. The per-line list makes it large (one entry per
solution), so the storage step also writes ``<split>_problems.json``, the same file without
that list; :func:`load_problem_index` reads it when present.

``problem_index_map[problem_id]``: ``difficulty``, ``correct_indices``,
``incorrect_indices`` (0-based line numbers of ``<split>.jsonl``) and the parallel
``correct_token_lengths`` / ``incorrect_token_lengths`` (templated length: BOS + prompt +
response + EOS). Datasets without ``is_correct`` have empty correct/incorrect lists and
``indices`` / ``token_lengths`` instead. Length lists are ``null`` when the split was built
without a tokenizer (``token_lengths.computed`` is then false).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def problems_path_for(metadata_path: str | os.PathLike[str]) -> Path:
    """``train_metadata.json`` -> ``train_problems.json``."""
    path = Path(metadata_path)
    return path.with_name(path.name.replace("_metadata.json", "_problems.json"))


def load_problem_index(metadata_path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{problem_index_map, stats, token_lengths, source_file, source_sha256}`` of a split.

    Reads ``<split>_problems.json`` (written with the metadata file, without the per-line
    list) when it exists, else the full metadata file.
    """
    metadata_path = Path(metadata_path)
    sidecar = problems_path_for(metadata_path)
    with open(sidecar if sidecar.is_file() else metadata_path, encoding="utf-8") as handle:
        data = json.load(handle)
    data.pop("metadata", None)
    return data
