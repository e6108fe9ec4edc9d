"""Writing a model for other tools: head 1 as a Hugging Face Llama folder, or every head in
Meta's layout (README, "Serving a trained model"; docs/DECISIONS.md, 2026-12-01).

* ``hf``: the next-token path of the MTP model is a plain LLaMA: the embedding, the trunk
  ``layers[:-1]``, head 1's block ``layers[-1]``, the shared norm and output. Those blocks keep
  their indices, so the folder has ``n_trunk_layers + 1`` HF layers; the other heads' blocks
  (``extra_heads``) are left out. q/k rows are permuted from Meta's adjacent-pair RoPE layout
  to HF's ``rotate_half`` layout (``meta_to_hf_qk``). Files: ``config.json`` (``LlamaConfig``),
  ``generation_config.json``, ``model.safetensors`` and, when a SentencePiece model is given,
  the tokenizer (``tokenizer.model`` + a ``tokenizer.json`` that gives the same ids; none, with
  one warning line, for a normalisation that ``tokenizer.json`` cannot express).
* ``meta``: ``consolidated.pth`` (every tensor under our names, which are Meta's, all heads)
  and ``params.json``, plus ``tokenizer.model``; ``load_pretrained`` reads it back.

A folder is written beside its target under a temporary name and renamed into place, so an
interrupted export leaves no half folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from weighted_mtp.base.errors import UserError
from weighted_mtp.base.io import copy_atomic, write_json_atomic
from weighted_mtp.models.checkpoints import (
    _OURS_TO_HF,
    map_key,
    meta_to_hf_qk,
    write_safetensors,
)
from weighted_mtp.models.tokenizer import (
    Tokenizer,
    hf_tokenizer_json,
    hf_tokenizer_mismatch,
    hf_unsupported_normalisation,
    sentencepiece_spec,
)
from weighted_mtp.models.transformer import ModelArgs, Transformer, ffn_hidden_size

FORMATS = ("hf", "meta")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ExportError(UserError):
    """An export that cannot be written as asked (one-line message)."""


# ---- Hugging Face: head 1 ----


def hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: int = 1, eos_id: int = 2) -> dict:
    """``LlamaConfig`` of head 1's path: trunk blocks plus head 1's block, untied output."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_trunk_layers + 1,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": DTYPE_NAMES[dtype],
    }


def head1_hf_tensors(
    model: Transformer,
) -> dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]]:
    """HF name -> (shape, reader) of every tensor on head 1's path (extra heads left out).
    Readers are lazy, so only one converted tensor is held at a time."""
    args = model.args
    tensors: dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("extra_heads."):
            continue
        hf_name = map_key(name, _OURS_TO_HF)
        if hf_name is None:
            raise ExportError(f"tensor {name} has no Hugging Face Llama name")
        heads = {"wq": args.n_heads, "wk": args.n_kv_heads}.get(name.split(".")[-2])
        if heads is not None and ".attention." in name:
            read = lambda t=tensor, h=heads: meta_to_hf_qk(t, h)  # noqa: E731
        else:
            read = lambda t=tensor: t  # noqa: E731
        tensors[hf_name] = (tuple(tensor.shape), read)
    return tensors


def export_hf(
    model: Transformer,
    out: str | Path,
    tokenizer_model: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """Write head 1 of ``model`` as a Hugging Face Llama folder (see the module docstring)."""
    bos_id, eos_id = 1, 2
    if tokenizer_model is not None:
        tok = Tokenizer(tokenizer_model)
        if tok.vocab_size > model.args.vocab_size:
            raise ExportError(
                f"{tokenizer_model}: {tok.vocab_size} pieces, more than the model's "
                f"{model.args.vocab_size} embeddings"
            )
        bos_id, eos_id = tok.bos_id, tok.eos_id
    tensors = head1_hf_tensors(model)
    specs = {name: (shape, dtype) for name, (shape, _) in tensors.items()}
    with _staged_folder(out, force) as folder:
        with tqdm(total=len(specs), desc="model.safetensors", unit="tensor", leave=False) as bar:

            def read(name: str) -> Tensor:
                bar.update()
                return tensors[name][1]()

            write_safetensors(folder / "model.safetensors", specs, read)
        write_json_atomic(folder / "config.json", hf_config(model.args, dtype, bos_id, eos_id))
        write_json_atomic(
            folder / "generation_config.json",
            {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False},
        )
        if tokenizer_model is not None:
            write_hf_tokenizer(tokenizer_model, folder, model.args.max_seq_len)
    return Path(out)


def write_hf_tokenizer(
    tokenizer_model: str | Path, folder: Path, max_length: int, copy_model: bool = True
) -> str | None:
    """``tokenizer.model`` plus a ``tokenizer.json`` checked to give SentencePiece's ids.

    The config names the generic fast tokenizer class: transformers' ``LlamaTokenizer``
    rebuilds its own pre-tokeniser and would split leading spaces differently. With
    ``copy_model`` false, ``tokenizer.model`` is already in ``folder`` (storage folders).

    A normalisation no ``tokenizer.json`` here can express (``nmt_nfkc``, whitespace folding:
    ``hf_unsupported_normalisation``) is not an error: ``tokenizer.model``, which this project
    tokenises with, is written without ``tokenizer.json`` (a stale one is removed) and one
    warning line goes to stderr; that line is returned, else None (docs/DECISIONS.md 2026-12-07).
    """
    spec = sentencepiece_spec(tokenizer_model)
    if spec.model_type != "BPE":
        raise ExportError(
            f"{tokenizer_model}: a {spec.model_type} SentencePiece model has no tokenizer.json "
            "here (only BPE models are supported)"
        )
    unsupported = hf_unsupported_normalisation(tokenizer_model)
    tokenizer_json = None if unsupported else _checked_tokenizer_json(tokenizer_model)
    tok = Tokenizer(tokenizer_model)
    pieces = {name: tok.id_to_piece(i) for name, i in
              (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("unk_token", 0))}  # fmt: skip
    if copy_model:
        copy_atomic(tokenizer_model, folder / "tokenizer.model")
    warning = None
    if tokenizer_json is None:
        (folder / "tokenizer.json").unlink(missing_ok=True)
        warning = (
            f"warning: {tokenizer_model}: tokenizer.json not written: {unsupported} has no "
            "tokenizers equivalent; tokenizer.model is used"
        )
        print(warning, file=sys.stderr, flush=True)
    else:
        write_json_atomic(folder / "tokenizer.json", tokenizer_json, indent=None)
    write_json_atomic(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **pieces,
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_length,
        },
    )
    write_json_atomic(folder / "special_tokens_map.json", pieces)
    return warning


def _checked_tokenizer_json(tokenizer_model: str | Path) -> dict:
    """The first ``hf_tokenizer_json`` candidate (with, then without SentencePiece's dummy
    prefix) that gives SentencePiece's ids on ``PROBE_TEXTS``."""
    first_mismatch = None
    for dummy_prefix in (True, False):
        candidate = hf_tokenizer_json(tokenizer_model, dummy_prefix)
        mismatch = hf_tokenizer_mismatch(candidate, tokenizer_model)
        if mismatch is None:
            return candidate
        first_mismatch = first_mismatch if first_mismatch is not None else mismatch
    raise ExportError(
        f"{tokenizer_model}: no tokenizer.json reproduces this SentencePiece model's ids "
        f"(first differing text: {first_mismatch!r})"
    )


# ---- Meta: every head ----


def meta_params(args: ModelArgs) -> dict:
    """Meta's ``params.json`` for ``args``; the FFN width is written as Meta's rounding rule
    when the rule reaches it, else as our extra ``ffn_hidden_dim`` key."""
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_seq_len": args.max_seq_len,
        "n_future_tokens": args.n_future_tokens,
    }
    if args.ffn_hidden_dim is not None and args.ffn_hidden_dim != ffn_hidden_size(
        args.dim, args.multiple_of, args.ffn_dim_multiplier
    ):
        if ffn_hidden_size(args.dim, 1) == args.ffn_hidden_dim:
            params.update(multiple_of=1, ffn_dim_multiplier=None)
        else:
            params["ffn_hidden_dim"] = args.ffn_hidden_dim
    return params


def export_meta(
    model: Transformer,
    out: str | Path,
    tokenizer_model: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """Write every head of ``model`` as ``consolidated.pth`` + ``params.json``."""
    state = {
        name: tensor.detach().to("cpu", dtype).contiguous()
        for name, tensor in tqdm(
            model.state_dict().items(), desc="consolidated.pth", unit="tensor", leave=False
        )
    }
    with _staged_folder(out, force) as folder:
        torch.save(state, folder / "consolidated.pth")
        write_json_atomic(folder / "params.json", meta_params(model.args))
        if tokenizer_model is not None:
            copy_atomic(tokenizer_model, folder / "tokenizer.model")
    return Path(out)


@contextmanager
def _staged_folder(out: str | Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces it when the block succeeds."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"{out}: exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(
    model: Transformer,
    fmt: str,
    out: str | Path,
    tokenizer_model: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """Write ``model`` in format ``fmt`` (``hf`` or ``meta``) to ``out``."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    writer = export_hf if fmt == "hf" else export_meta
    return writer(model, out, tokenizer_model, dtype, force)
