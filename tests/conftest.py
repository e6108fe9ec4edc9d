"""Shared fixtures: tiny tokenizers and models built in code, storage trees under tmp_path."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

from weighted_mtp.models.tokenizer import train_local_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Nothing in the test suite may reach the network or write outside its temp folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.pop("WMTP_STORAGE", None)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 1000-piece tokenizer with LLaMA's special ids, trained on a few stdlib files (~1 s)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [
        stdlib / name for name in ("textwrap.py", "argparse.py", "json/decoder.py", "string.py")
    ]
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    train_local_tokenizer(out, vocab_size=1000, files=files)
    return out


def save_hf_bin_shards(model, folder: Path, n_shards: int = 2) -> None:
    """Write an HF model as ``pytorch_model-0000i-of-0000n.bin`` shards plus their index, the
    layout of older Hub repositories (Sheared-LLaMA); transformers 5 only writes safetensors."""
    import json

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    names = list(model.state_dict())
    weight_map = {}
    for i in range(n_shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {n: model.state_dict()[n].clone() for n in names[i::n_shards]}
        torch.save(part, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def make_tiny_storage(
    root: Path,
    tokenizer: Path,
    datasets: tuple[str, ...] = ("codecontests",),
    source: Path | None = None,
    evaluation: bool = False,
) -> Path:
    """A storage tree whose ``micro-mtp``/``micro-reference`` are tiny (64 wide, vocab 1000),
    with the bundled offline datasets (or those of ``source``) processed by the real dataset
    steps; with ``evaluation``, also their evaluation problems and tests (what ``wmtp
    evaluate`` and ``wmtp study`` read)."""
    from weighted_mtp.base.layout import StorageLayout
    from weighted_mtp.models import ModelArgs, Transformer, save_model
    from weighted_mtp.models.transformer import init_weights
    from weighted_mtp.storage import datasets as dataset_storage
    from weighted_mtp.storage.tokenizer_folder import write_tokenizer_folder

    layout = StorageLayout(root)
    for name, n_layers, n_future in (("micro-mtp", 7, 4), ("micro-reference", 4, 1)):
        args = ModelArgs(
            dim=64,
            n_layers=n_layers,
            n_heads=4,
            vocab_size=1000,
            ffn_hidden_dim=96,
            n_future_tokens=n_future,
            max_seq_len=1024,
        )
        model = Transformer(args)
        init_weights(model, seed=len(name))
        save_model(model, layout.model(name).root)
        write_tokenizer_folder(tokenizer, layout.model(name))
    dataset_storage.run(
        layout,
        names=list(datasets),
        steps=["process", "metadata", "small", *(["eval", "tests"] if evaluation else [])],
        source=source,
        include_python2=False,
        skip_bad_records=False,
        max_length=2048,
        force=False,
    )
    return root


@pytest.fixture(scope="session")
def tiny_storage(tmp_path_factory, small_tokenizer) -> Path:
    return make_tiny_storage(tmp_path_factory.mktemp("tiny_storage"), small_tokenizer)
