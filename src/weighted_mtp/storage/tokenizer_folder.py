"""A model's ``tokenizer/`` folder: ``tokenizer.model`` plus the files Hugging Face loaders read.

Written by the ``config`` step of the real models and by the micro models. Next to
SentencePiece's ``tokenizer.model`` it holds a ``tokenizer.json`` checked to give the same ids
(``models.export.write_hf_tokenizer``) and a config naming the generic fast tokenizer class:
transformers' ``LlamaTokenizer`` would rebuild its own pre-tokeniser from ``tokenizer.model``
and split leading spaces, and so code indentation, differently (docs/DECISIONS.md 2026-12-01).
A SentencePiece normalisation that ``tokenizer.json`` cannot express (``nmt_nfkc``, whitespace
folding) leaves it out, with one warning line: ``tokenizer.model`` is what the project uses
(docs/DECISIONS.md 2026-12-07).
"""

from __future__ import annotations

from pathlib import Path

from weighted_mtp.base.io import copy_atomic
from weighted_mtp.base.layout import ModelPaths
from weighted_mtp.models.export import write_hf_tokenizer

MODEL_MAX_LENGTH = 2048


def write_tokenizer_folder(model_file: Path, paths: ModelPaths, force: bool = False) -> str | None:
    """``tokenizer/`` with ``tokenizer.model``, ``tokenizer.json`` and the config files HF
    loaders expect; ``force`` replaces a ``tokenizer.model`` already there. Returns the warning
    line printed when ``tokenizer.json`` is left out, else None."""
    if force or not paths.tokenizer.is_file():
        copy_atomic(model_file, paths.tokenizer)
    return write_hf_tokenizer(
        paths.tokenizer, paths.tokenizer_dir, MODEL_MAX_LENGTH, copy_model=False
    )
