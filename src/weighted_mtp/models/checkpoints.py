"""Loading and saving weights: our storage folders, Meta raw folders and HF Llama folders.

Every format is a declarative key map onto our (Meta) tensor names, plus the q/k row
permutation for Hugging Face checkpoints (HF uses the ``rotate_half`` RoPE layout).
Loading is lazy: the model is built on the ``meta`` device, tensors are read one by one
(safetensors ``safe_open`` or a memory-mapped ``torch.load``), converted, and assigned, so
peak memory stays near one copy of the weights. Every derived size is checked against the
tensor shapes before anything is assigned.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from weighted_mtp.base.errors import MissingInputError, UserError
from weighted_mtp.base.io import atomic_path, write_json_atomic, write_sha256sums
from weighted_mtp.models.transformer import ModelArgs, Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Meta checkpoints: our names are Meta's names. These keys carry no weights for us.
META_IGNORED = (re.compile(r"^rope\.freqs$"),)

# Hugging Face Llama -> ours; "{}" is the layer index.
HF_TO_OURS: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_IGNORED = (re.compile(r"\.rotary_emb\.inv_freq$"),)


class CheckpointError(UserError):
    """A checkpoint that does not match its config or our model (one-line message)."""


def _compile(key_map: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [
        (re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst)
        for src, dst in key_map.items()
    ]


_HF_PATTERNS = _compile(HF_TO_OURS)
_OURS_TO_HF = _compile({v: k for k, v in HF_TO_OURS.items()})


def map_key(name: str, patterns: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in patterns:
        match = pattern.match(name)
        if match:
            return target.replace("{}", match.group(1)) if match.groups() else target
    return None


def hf_to_meta_qk(weight: Tensor, n_heads: int) -> Tensor:
    """Undo the HF q/k permutation: rotate_half halves back to adjacent RoPE pairs."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    return weight.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_to_hf_qk(weight: Tensor, n_heads: int) -> Tensor:
    """Apply the HF q/k permutation (what the official LLaMA -> HF conversion does)."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    return weight.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# ---- configs ----


def args_from_meta_params(params: dict, vocab_from_weights: int | None = None) -> ModelArgs:
    """Meta ``params.json``: unknown keys ignored, missing ones defaulted, vocab -1 resolved."""
    params = dict(params)
    if params.get("vocab_size", -1) is None or params.get("vocab_size", -1) <= 0:
        if vocab_from_weights is None:
            raise CheckpointError("params.json has no vocab_size and no embedding to infer it from")
        params["vocab_size"] = vocab_from_weights
    params.setdefault("n_future_tokens", 1)
    return ModelArgs.from_dict(params)


def args_from_hf_config(config: dict) -> ModelArgs:
    """HF ``LlamaConfig`` dict (our micro models add ``n_future_tokens``)."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in config:
            raise CheckpointError(f"config.json lacks '{key}'")
    if config.get("rope_scaling"):
        raise CheckpointError("config.json uses rope_scaling, which this model does not implement")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"config.json hidden_act {config['hidden_act']!r}: only silu is supported"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointError("config.json asks for biases, which LLaMA blocks do not have")
    args = ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab_size=config.get("vocab_size", 32000),
        ffn_hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=config.get("rope_theta", 10000.0),
        max_seq_len=config.get("max_position_embeddings", 2048),
        n_future_tokens=config.get("n_future_tokens", 1),
    )
    if config.get("head_dim") not in (None, args.head_dim):
        raise CheckpointError(
            f"config.json head_dim {config['head_dim']} != hidden_size/num_attention_heads"
        )
    return args


def args_to_hf_config(args: ModelArgs, extra: dict | None = None) -> dict:
    """The HF-style ``config.json`` we write for our own folders (loadable by transformers
    when ``n_future_tokens == 1``)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "n_future_tokens": args.n_future_tokens,
        "n_trunk_layers": args.n_trunk_layers,
    }
    config.update(extra or {})
    return config


# ---- tensor sources ----


@dataclass
class TensorSource:
    """Lazily readable tensors: names, shapes, and a reader for one tensor at a time."""

    files: list[Path]
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], Tensor]
    dtypes: dict[str, torch.dtype]


def _safetensors_source(files: list[Path]) -> TensorSource:
    owner: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                owner[name] = path
                sl = handle.get_slice(name)
                shapes[name] = tuple(sl.get_shape())
                dtypes[name] = _st_dtype(sl.get_dtype())

    def read(name: str) -> Tensor:
        with safe_open(str(owner[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    return TensorSource(files, shapes, read, dtypes)


def _st_dtype(code: str) -> torch.dtype:
    return {
        "F32": torch.float32,
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "F64": torch.float64,
        "I64": torch.int64,
    }.get(code, torch.float32)


def _torch_source(files: list[Path]) -> TensorSource:
    tensors: dict[str, Tensor] = {}
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # a truncated or non-zip file: say which one
            raise CheckpointError(
                f"{path}: cannot read checkpoint ({type(err).__name__})"
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
        tensors.update(state)
    return TensorSource(
        files,
        {k: tuple(v.shape) for k, v in tensors.items()},
        tensors.__getitem__,
        {k: v.dtype for k, v in tensors.items()},
    )


def _hf_weight_files(folder: Path) -> list[Path]:
    for pattern in (
        "model.safetensors",
        "model-*-of-*.safetensors",
        "pytorch_model.bin",
        "pytorch_model-*-of-*.bin",
    ):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model*.bin weights")


def open_tensors(files: list[Path]) -> TensorSource:
    if all(f.suffix == ".safetensors" for f in files):
        return _safetensors_source(files)
    return _torch_source(files)


# ---- the format of a folder ----


@dataclass
class Checkpoint:
    """A located checkpoint: model sizes, where the tensors are, and how names map."""

    args: ModelArgs
    source: TensorSource
    layout: str  # "meta" (our names) or "hf"

    def our_names(self) -> Iterator[tuple[str, str]]:
        """(source name, our name) for every tensor we load; ignored keys skipped."""
        ignored = META_IGNORED if self.layout == "meta" else HF_IGNORED
        for name in self.source.shapes:
            if any(p.search(name) for p in ignored):
                continue
            ours = name if self.layout == "meta" else map_key(name, _HF_PATTERNS)
            yield name, ours if ours is not None else f"<unmapped:{name}>"

    def read(self, name: str, ours: str) -> Tensor:
        tensor = self.source.read(name)
        if self.layout == "hf":
            if ours.endswith("attention.wq.weight"):
                tensor = hf_to_meta_qk(tensor, self.args.n_heads)
            elif ours.endswith("attention.wk.weight"):
                tensor = hf_to_meta_qk(tensor, self.args.n_kv_heads)
        return tensor


def _detect_layout(names: set[str]) -> str:
    if "model.embed_tokens.weight" in names:
        return "hf"
    if "tok_embeddings.weight" in names:
        return "meta"
    raise CheckpointError("unrecognised tensor names (neither Meta nor Hugging Face Llama)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None


def locate(path: str | Path) -> Checkpoint:
    """Find the config and weights of a storage folder, Meta raw folder or HF folder."""
    folder = Path(path)
    if not folder.exists():
        raise MissingInputError(f"{folder}: no such model folder")
    if (folder / "safetensors" / "model.safetensors").is_file():
        files = [folder / "safetensors" / "model.safetensors"]
        config_dir = folder / "configs"
    elif (folder / "consolidated.pth").is_file() or list(folder.glob("consolidated.*.pth")):
        files = sorted(folder.glob("consolidated*.pth"))
        if len(files) > 1:
            raise CheckpointError(f"{folder}: model-parallel shards are not supported; merge first")
        config_dir = folder
    else:
        files = _hf_weight_files(folder)
        config_dir = folder
    source = open_tensors(files)
    layout = _detect_layout(set(source.shapes))
    if (config_dir / "params.json").is_file():
        vocab = source.shapes.get("tok_embeddings.weight", (None,))[0]
        args = args_from_meta_params(_read_json(config_dir / "params.json"), vocab)
    elif (config_dir / "config.json").is_file():
        args = args_from_hf_config(_read_json(config_dir / "config.json"))
    else:
        raise CheckpointError(f"{folder}: no params.json or config.json next to the weights")
    if layout == "hf" and "lm_head.weight" not in source.shapes:
        raise CheckpointError(f"{folder}: tied embeddings (no lm_head.weight) are not supported")
    return Checkpoint(args, source, layout)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_shapes(ckpt: Checkpoint, where: str = "") -> None:
    """Fail with one line unless the tensors are exactly those the config implies."""
    expected = expected_shapes(ckpt.args)
    found = {ours: ckpt.source.shapes[name] for name, ours in ckpt.our_names()}
    prefix = f"{where}: " if where else ""
    unexpected = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if unexpected:
        raise CheckpointError(
            f"{prefix}unexpected tensors {unexpected[:3]} ({len(unexpected)} in all)"
            " for the config's layer and head counts"
        )
    if missing:
        raise CheckpointError(f"{prefix}missing tensors {missing[:3]} ({len(missing)} in all)")
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(
                f"{prefix}tensor {name} has shape {list(found[name])} but the config implies {list(shape)}"
            )


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> Transformer:
    """Load a storage model folder, a Meta raw folder or a Hugging Face Llama folder.

    ``dtype`` None keeps the stored dtype. The model comes back in eval mode.
    """
    ckpt = locate(path)
    check_shapes(ckpt, str(path))
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = Transformer(ckpt.args)
    state = {}
    for name, ours in ckpt.our_names():
        tensor = ckpt.read(name, ours)
        state[ours] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope(device)
    return model.eval()


def save_model(
    model: Transformer,
    folder: str | Path,
    dtype: torch.dtype | None = None,
    config_extra: dict | None = None,
) -> Path:
    """Write ``folder/{safetensors/model.safetensors, SHA256SUMS, configs/config.json}``."""
    folder = Path(folder)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    specs = {k: (tuple(v.shape), dtype or v.dtype) for k, v in state.items()}
    digest = write_safetensors(
        folder / "safetensors" / "model.safetensors", specs, state.__getitem__
    )
    write_sha256sums(folder / "safetensors", {"model.safetensors": digest})
    write_json_atomic(
        folder / "configs" / "config.json", args_to_hf_config(model.args, config_extra)
    )
    return folder


_ST_CODES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
}


def write_safetensors(
    path: str | Path,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    read: Callable[[str], Tensor],
    metadata: dict[str, str] | None = None,
) -> str:
    """Stream tensors into a ``.safetensors`` file one at a time; return its SHA-256.

    The header is computed from ``specs`` (shape and target dtype per name) before any data
    is read, so memory holds one tensor at a time. The file appears atomically.
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, (shape, dtype) in specs.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _ST_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            handle.write(chunk)
            digest.update(chunk)
        for name, (shape, dtype) in specs.items():
            tensor = read(name)
            if tuple(tensor.shape) != tuple(shape):
                raise CheckpointError(f"tensor {name}: shape {list(tensor.shape)} != {list(shape)}")
            data = tensor.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8)
            view = memoryview(data.numpy())
            handle.write(view)
            digest.update(view)
    return digest.hexdigest()
