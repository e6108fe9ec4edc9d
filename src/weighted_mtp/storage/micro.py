"""Micro models for laptops and tests: ``models/micro-mtp`` and ``models/micro-reference``.

Both are 512 wide, FFN 1365, vocabulary 32000. ``micro-reference`` is a plain 4-layer LLaMA
stored with Hugging Face names (like the real Sheared-LLaMA reference, so the HF key map is
exercised). ``micro-mtp`` has a real shared trunk: 3 trunk blocks plus 4 head blocks, so
``layers`` holds 4 blocks (3 trunk + head 1: the micro model's "4 layers") and head 1's path is as
deep as the reference. With Meta's own convention (``n_layers = 4``, 4 heads) the trunk
would be empty and the heads would all read the raw embeddings.

``random`` initialises Xavier-uniform with seed 42; ``slice`` cuts the weights out of the
converted full model (first trunk blocks, head blocks, the leading rows/columns), keeping
the source's head size so RoPE stays meaningful.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import torch

from weighted_mtp.base.io import StorageError, write_json_atomic, write_sha256sums
from weighted_mtp.base.layout import ModelPaths, StorageLayout
from weighted_mtp.models.checkpoints import (
    _OURS_TO_HF,
    args_to_hf_config,
    check_shapes,
    locate,
    map_key,
    meta_to_hf_qk,
    write_safetensors,
)
from weighted_mtp.models.tokenizer import train_local_tokenizer
from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights
from weighted_mtp.storage.tokenizer_folder import write_tokenizer_folder

MICRO_DIM, MICRO_FFN, MICRO_VOCAB, MICRO_HEAD_DIM = 512, 1365, 32000, 64
MICRO_TRUNK_LAYERS = 3
SEED = 42
MICRO_SOURCES = {"mtp": "meta-llama-mtp", "reference": "ref-sheared-llama-2.7b"}
"""The full model a ``slice`` micro model is cut from, per micro type."""


def micro_args(micro_type: str, head_dim: int = MICRO_HEAD_DIM, kv_ratio: int = 1) -> ModelArgs:
    n_heads = MICRO_DIM // head_dim
    n_future = 4 if micro_type == "mtp" else 1
    return ModelArgs(
        dim=MICRO_DIM,
        n_layers=MICRO_TRUNK_LAYERS + n_future if micro_type == "mtp" else 4,
        n_heads=n_heads,
        n_kv_heads=max(1, n_heads // kv_ratio),
        vocab_size=MICRO_VOCAB,
        ffn_hidden_dim=MICRO_FFN,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=2048,
        n_future_tokens=n_future,
    )


def _block_map(micro: ModelArgs, source: ModelArgs) -> dict[str, str]:
    """Micro block prefix -> source block prefix: leading trunk blocks, then the heads."""
    if (
        micro.n_trunk_layers > source.n_trunk_layers
        or micro.n_future_tokens > source.n_future_tokens
    ):
        raise StorageError(
            f"slice source has {source.n_trunk_layers} trunk blocks and {source.n_future_tokens} "
            f"heads; the micro model needs {micro.n_trunk_layers} and {micro.n_future_tokens}"
        )
    mapping = {f"layers.{i}.": f"layers.{i}." for i in range(micro.n_trunk_layers)}
    mapping[f"layers.{micro.n_trunk_layers}."] = f"layers.{source.n_trunk_layers}."
    mapping.update(
        {f"extra_heads.{i}.": f"extra_heads.{i}." for i in range(micro.n_future_tokens - 1)}
    )
    return mapping


def _sliced_state(
    layout: StorageLayout, micro_type: str, source_name: str
) -> tuple[ModelArgs, dict]:
    paths = layout.model(source_name)
    if not paths.weights.is_file():
        raise StorageError(
            f"{paths.weights}: slice needs the converted source model; run "
            f"--model {source_name} --steps download,convert,config first, or use --micro-init random"
        )
    ckpt = locate(paths.root)
    check_shapes(ckpt, str(paths.weights))
    src = ckpt.args
    kv_ratio = src.n_heads // src.n_kv_heads
    args = micro_args(micro_type, head_dim=src.head_dim, kv_ratio=kv_ratio)
    blocks = _block_map(args, src)
    source_names = {ours: name for name, ours in ckpt.our_names()}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    state = {}
    for ours, shape in shapes.items():
        src_key = ours
        for micro_prefix, src_prefix in blocks.items():
            if ours.startswith(micro_prefix):
                src_key = src_prefix + ours[len(micro_prefix) :]
        tensor = ckpt.read(source_names[src_key], src_key)
        state[ours] = tensor[tuple(slice(0, n) for n in shape)].to(torch.float32).clone()
    return args, state


def _random_state(micro_type: str) -> tuple[ModelArgs, dict]:
    args = micro_args(micro_type)
    model = Transformer(args)
    init_weights(model, seed=SEED)
    return args, model.state_dict()


def shape_metadata(args: ModelArgs, micro_type: str, parameters: int) -> dict[str, Any]:
    """The ``metadata.json`` keys that describe a micro model's shape and tensor names."""
    return {
        "n_future_tokens": args.n_future_tokens,
        "n_trunk_layers": args.n_trunk_layers,
        "n_layers_total": args.n_layers,
        "tensor_names": "huggingface" if micro_type == "reference" else "meta",
        "parameters": parameters,
        "dtype": "float32",
    }


def write_micro_weights(paths: ModelPaths, micro_type: str, args: ModelArgs, state: dict) -> None:
    """The weights (Hugging Face names for the reference), their checksum and config.json of
    a micro model."""
    stored = _to_hf_names(args, state) if micro_type == "reference" else state
    specs = {k: (tuple(v.shape), torch.float32) for k, v in stored.items()}
    digest = write_safetensors(
        paths.weights, specs, stored.__getitem__, {"wmtp": f"micro-{micro_type}"}
    )
    write_sha256sums(paths.safetensors_dir, {paths.weights.name: digest})
    write_json_atomic(paths.configs / "config.json", args_to_hf_config(args))


def _to_hf_names(args: ModelArgs, state: dict) -> dict:
    """Our (Meta) names and RoPE layout -> Hugging Face Llama names and layout."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("attention.wq.weight"):
            tensor = meta_to_hf_qk(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = meta_to_hf_qk(tensor, args.n_kv_heads)
        out[map_key(name, _OURS_TO_HF)] = tensor
    return out


def _tokenizer_for_micro(layout: StorageLayout, paths: ModelPaths) -> dict:
    """Reuse a real (or sibling) tokenizer from storage; otherwise train one locally."""
    candidates = [
        ("meta-llama-mtp", layout.model("meta-llama-mtp").tokenizer),
        ("meta-llama-mtp", layout.model("meta-llama-mtp").raw / "tokenizer.model"),
        ("ref-sheared-llama-2.7b", layout.model("ref-sheared-llama-2.7b").tokenizer),
        ("micro-mtp", layout.model("micro-mtp").tokenizer),
        ("micro-reference", layout.model("micro-reference").tokenizer),
    ]
    for origin, path in candidates:
        if path.is_file() and path != paths.tokenizer:
            write_tokenizer_folder(path, paths, force=True)
            return {"origin": f"copied from models/{origin}", "path": str(path)}
    print(
        "  no tokenizer in storage: training a local 32000-piece BPE SentencePiece model "
        "on the Python standard library (about 15 s)",
        flush=True,
    )
    staging = paths.root / ".tokenizer-training" / "tokenizer.model"
    trained = train_local_tokenizer(staging, vocab_size=MICRO_VOCAB)
    write_tokenizer_folder(staging, paths, force=True)
    staging.unlink()
    staging.parent.rmdir()
    return {
        "origin": "trained locally: no real LLaMA-2 tokenizer was in storage",
        "algorithm": "SentencePiece BPE, byte fallback, <unk> <s> </s> = 0 1 2, whitespace kept",
        "corpus": "Python standard library source files (sorted)",
        "corpus_files": trained.corpus_files,
        "corpus_bytes": trained.corpus_bytes,
        "corpus_sha256": trained.corpus_sha256,
    }


def _up_to_date(paths: ModelPaths, micro_type: str, micro_init: str) -> bool:
    if not (paths.weights.is_file() and paths.checksums.is_file() and paths.metadata.is_file()):
        return False
    meta = json.loads(paths.metadata.read_text())
    return meta.get("micro_type") == micro_type and meta.get("init") == micro_init


def create_micro(
    layout: StorageLayout,
    micro_type: str,
    micro_init: str,
    source: str | None = None,
    force: bool = False,
) -> ModelPaths:
    """Write ``models/micro-<type>/`` (weights, checksums, config, tokenizer, metadata)."""
    paths = layout.model(f"micro-{micro_type}")
    if _up_to_date(paths, micro_type, micro_init) and not force:
        print(f"  {paths.root}: already built ({micro_init}); use --force to rebuild", flush=True)
        return paths
    source = source or MICRO_SOURCES[micro_type]
    print(f"[micro-{micro_type}] building ({micro_init})", flush=True)
    if micro_init == "slice":
        args, state = _sliced_state(layout, micro_type, source)
    else:
        args, state = _random_state(micro_type)
    write_micro_weights(paths, micro_type, args, state)
    tokenizer = _tokenizer_for_micro(layout, paths)
    blocks = (
        "layers.0-2: shared trunk; layers.3: head 1; extra_heads.0-2: heads 2-4"
        if micro_type == "mtp"
        else "layers.0-3: a plain 4-layer LLaMA (Hugging Face names)"
    )
    write_json_atomic(
        paths.metadata,
        {
            "name": paths.root.name,
            "micro_type": micro_type,
            "init": micro_init,
            "seed": SEED if micro_init == "random" else None,
            "init_rule": "xavier_uniform on matrices, ones on norms"
            if micro_init == "random"
            else "leading slices of the source's tensors",
            "source_model": f"models/{source}" if micro_init == "slice" else None,
            "blocks": blocks,
            **shape_metadata(args, micro_type, sum(v.numel() for v in state.values())),
            "tokenizer": tokenizer,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "created_by": "wmtp storage models --create-micro",
        },
    )
    return paths
