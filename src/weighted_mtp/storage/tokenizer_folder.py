"""A model's ``tokenizer/`` folder: ``tokenizer.model`` plus the config files HF loaders expect.

Written by the ``config`` step of the real models and by the micro models.
"""

from __future__ import annotations

from pathlib import Path

from weighted_mtp.base.io import copy_atomic, write_json_atomic
from weighted_mtp.base.layout import ModelPaths

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "padding_side": "right",
    "legacy": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 2048,
}


def write_tokenizer_folder(model_file: Path, paths: ModelPaths, force: bool = False) -> None:
    """``tokenizer/`` with ``tokenizer.model`` plus the config files HF loaders expect."""
    if force or not paths.tokenizer.is_file():
        copy_atomic(model_file, paths.tokenizer)
    write_json_atomic(paths.tokenizer_dir / "tokenizer_config.json", TOKENIZER_CONFIG)
    write_json_atomic(
        paths.tokenizer_dir / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    )
