"""The checkpoint format: file names, save, load, resolve, merge, fingerprint; exact resume.

This module is the only one that knows how a checkpoint folder is laid out; training writes
through it and evaluation reads through it.

``checkpoints/<experiment>/<run>/step_<N>/`` (and ``final/``, ``best/``) holds:

* ``wmtp_checkpoint.json`` (``INFO_FILE``): the recipe, the base model it adapts, the number of
  heads, the step, and recipe extras (a critic's value-head type and sizes);

* ``adapter_config.json`` + ``adapter_model.safetensors``: the PEFT LoRA adapter in the standard
  file format (or ``model.safetensors`` with every trainable tensor when LoRA is off);
* ``extra.safetensors``: trainable tensors outside LoRA (e.g. a value head), if any;
* ``train_state.pt``: the full optimizer and scheduler state, RNG states, the data position, the
  weighting state (e.g. the EMA of the critic's advantages) and the step.

A checkpoint is written into a temporary folder and renamed into place, so a crash leaves
either a complete checkpoint or none. State dicts are gathered with
``torch.distributed.checkpoint.state_dict`` (full, CPU-offloaded, trainable tensors only), so the
same code serves one process and FSDP2; only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weighted_mtp.base.io import StorageError, write_json_atomic
from weighted_mtp.train import distributed

if TYPE_CHECKING:
    from weighted_mtp.base.layout import StorageLayout
    from weighted_mtp.models.tokenizer import Tokenizer
    from weighted_mtp.models.transformer import Transformer

STEP_DIR = re.compile(r"^step_(\d{8})$")
PEFT_PREFIX = "base_model.model."
INFO_FILE = "wmtp_checkpoint.json"
TENSOR_FILES = ("adapter_model.safetensors", "extra.safetensors", "model.safetensors")


@dataclass
class TrainState:
    """What besides the tensors makes a resume exact."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) trainable tensors by name; frozen base weights are skipped."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_state_options(ignore_frozen_params=True))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _split_lora(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    return lora, {k: v for k, v in state.items() if k not in lora}


def _peft_name(name: str) -> str:
    """``layers.0.attention.wq.lora_A.default.weight`` -> PEFT's file naming."""
    return PEFT_PREFIX + name.replace(".default.", ".")


def _module_name(name: str) -> str:
    return (
        name.removeprefix(PEFT_PREFIX)
        .replace(".lora_A.", ".lora_A.default.")
        .replace(".lora_B.", ".lora_B.default.")
    )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_rng(saved: dict[str, Any]) -> dict[str, Any]:
    """This rank's saved random state. Under another world size than the run saved with, rank
    0's state, then a seed of its own on every other rank: the run goes on reproducibly, not
    bit-identically (docs/SCALING.md §5)."""
    info = distributed.env_info()
    ranks = saved.get("rng_ranks") or [saved["rng"]]
    if len(ranks) == info.world:
        return ranks[info.rank]
    if info.rank == 0:
        print(f"saved on {len(ranks)} rank(s), resumed on {info.world}: the random numbers "
              "(dropout masks) and the data split continue differently from an uninterrupted "
              "run (docs/SCALING.md §5)", flush=True)  # fmt: skip
    if info.rank > 0:
        seed = int(ranks[0]["torch"].long().sum()) + 1_000_003 * info.rank
        generator = torch.Generator().manual_seed(seed)
        return {**ranks[0], "torch": generator.get_state()}
    return ranks[0]


def save(
    run_dir: Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    state: TrainState,
    lora_config: Any | None,
    is_main: bool,
    keep_last: int | None = None,
) -> Path:
    """Write ``run_dir/name`` atomically (collective under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors = trainable_state(model)
    optim_state = (
        get_optimizer_state_dict(model, optimizer, options=_state_options()) if optimizer else None
    )
    rngs = distributed.gather_objects(rng_state())  # each rank draws its own dropout masks
    target = run_dir / name
    if not is_main:
        return target
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora, extra = _split_lora(tensors)
    if lora_config is not None:
        save_file({_peft_name(k): v for k, v in lora.items()}, tmp / "adapter_model.safetensors")
        lora_config.save_pretrained(str(tmp))
        if extra:
            save_file(extra, tmp / "extra.safetensors")
    else:
        save_file(extra, tmp / "model.safetensors")
    torch.save(
        {
            "step": state.step,
            "epoch": state.epoch,
            "batches_in_epoch": state.batches_in_epoch,
            "extra": state.extra,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rngs[0],
            "rng_ranks": rngs,
        },
        tmp / "train_state.pt",
    )
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    write_json_atomic(run_dir / "latest.json", {"checkpoint": name, "step": state.step})
    if keep_last:
        prune(run_dir, keep_last)
    return target


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (``final`` is never pruned)."""
    steps = sorted(p for p in run_dir.iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old)


def latest(run_dir: Path) -> Path | None:
    """The newest complete step checkpoint of a run, if any."""
    if not run_dir.is_dir():
        return None
    steps = sorted(p for p in run_dir.iterdir() if STEP_DIR.match(p.name))
    return steps[-1] if steps else None


def load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Trainable tensors of a checkpoint under the model's own parameter names."""
    tensors: dict[str, torch.Tensor] = {}
    if (ckpt / "adapter_model.safetensors").is_file():
        lora = load_file(ckpt / "adapter_model.safetensors")
        tensors.update({_module_name(k): v for k, v in lora.items()})
    for name in ("extra.safetensors", "model.safetensors"):
        if (ckpt / name).is_file():
            tensors.update(load_file(ckpt / name))
    return tensors


def load_into(model: nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's trainable tensors into ``model`` (strict on those names)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    tensors = load_tensors(ckpt)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n.replace("_fsdp_wrapped_module.", "") for n in expected}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ValueError(
            f"{ckpt}: checkpoint does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    set_model_state_dict(model, tensors, options=_state_options(strict=False))


def resume(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainState:
    """Restore tensors, optimizer, scheduler and RNG; return the saved train state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    load_into(model, ckpt)
    saved = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    # Not strict: a trainable parameter that never had a gradient (the adapters of the heads
    # ``ntp`` leaves out, docs/METHOD.md §8) has no optimizer state saved, and gets none back.
    set_optimizer_state_dict(
        model, optimizer, saved["optimizer"], options=_state_options(strict=False)
    )
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(_rank_rng(saved))
    return TrainState(saved["step"], saved["epoch"], saved["batches_in_epoch"], saved["extra"])


# ---- what a checkpoint is: its info file, its base model, its tokenizer ----


def write_info(ckpt: Path, info: dict[str, Any]) -> None:
    """Write ``wmtp_checkpoint.json`` (rank 0, after ``save``)."""
    write_json_atomic(ckpt / INFO_FILE, info)


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a finished training checkpoint (it has its info file)."""
    return (path / INFO_FILE).is_file()


def finished(run_dir: Path) -> bool:
    """Whether a training run got to the end: its ``final`` checkpoint is complete (the info
    file is written last). The quickstart's and the study's "trained?" check."""
    return is_checkpoint(run_dir / "final")


def read_info(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's info; a clear error when ``ckpt`` is not a training checkpoint."""
    if not is_checkpoint(ckpt):
        raise StorageError(f"{ckpt}: not a training checkpoint (no {INFO_FILE})")
    return json.loads((ckpt / INFO_FILE).read_text())


def resolve_model_path(layout: StorageLayout, path: str) -> Path:
    """A storage model name (``micro-mtp``) or a folder path."""
    named = layout.model(path).root
    if named.is_dir():
        return named
    if Path(path).is_dir():
        return Path(path)
    raise StorageError(
        f"model {path!r}: neither {named} nor a folder; create it with `wmtp storage models`"
    )


def tokenizer_for(layout: StorageLayout, model_dir: Path) -> Tokenizer:
    """The model folder's own tokenizer, else the storage's training tokenizer."""
    from weighted_mtp.base.layout import training_tokenizer_path
    from weighted_mtp.models.tokenizer import Tokenizer

    own = model_dir / "tokenizer" / "tokenizer.model"
    path = own if own.is_file() else training_tokenizer_path(layout)
    if path is None:
        raise StorageError(f"{own}: no tokenizer for this model and none in storage")
    return Tokenizer(path)


def resolve_checkpoint(layout: StorageLayout, path: str) -> Path:
    """``checkpoints/<experiment>`` (newest run's ``final``), a run folder, or a checkpoint."""
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = layout.root / path
    if is_checkpoint(candidate):
        return candidate
    finals = sorted(candidate.glob("final")) + sorted(
        candidate.glob("*/final"), key=lambda p: p.stat().st_mtime
    )
    finals = [f for f in finals if is_checkpoint(f)]
    if not finals:
        raise StorageError(f"{candidate}: no finished training checkpoint (run that recipe first)")
    return finals[-1]


def fingerprint(ckpt: Path) -> str:
    """SHA-256 over a checkpoint's info and tensors: a cache key part that changes with it."""
    digest = hashlib.sha256()
    for name in (INFO_FILE, *TENSOR_FILES):
        if (ckpt / name).is_file():
            digest.update(name.encode() + (ckpt / name).read_bytes())
    return digest.hexdigest()


# ---- loading a trained checkpoint as a plain model ----


def merge_adapter(model: nn.Module, ckpt: Path) -> None:
    """Fold a saved LoRA adapter into the base weights, on their device, in fp32, stored back in
    their dtype: ``W = dtype(W + (alpha / r) B A)``."""
    config = json.loads((ckpt / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_tensors(ckpt)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A.default.weight" not in name:
                continue
            b = tensors[name.replace("lora_A", "lora_B")]
            weight = modules[name.split(".lora_A.")[0]].weight
            delta = scale * (b.to(weight.device).float() @ a.to(weight.device).float())
            weight.copy_(weight.float() + delta)


def load_trained(
    ckpt: Path,
    layout: StorageLayout,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """A trained policy checkpoint as a plain model: base weights read tensor by tensor straight
    onto ``device`` in ``dtype`` (default fp32), with the adapter merged in there (no full
    fp32 copy on the CPU first)."""
    from weighted_mtp.models.checkpoints import load_pretrained

    info = read_info(ckpt)
    base = resolve_model_path(layout, info["base_model"])
    model = load_pretrained(base, dtype=dtype or torch.float32, device=device)
    if (ckpt / "adapter_config.json").is_file():
        merge_adapter(model, ckpt)
    else:
        model.load_state_dict(load_tensors(ckpt), strict=False)  # copies cast to the dtype
    return model.eval()


def load_critic(
    ckpt: Path,
    layout: StorageLayout,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A trained critic checkpoint as a frozen value model (head type and sizes from the
    checkpoint itself, so nothing is guessed)."""
    from weighted_mtp.models.value import load_value_model

    info = read_info(ckpt)
    if "value_head" not in info:
        raise StorageError(f"{ckpt}: not a critic checkpoint (recipe {info.get('recipe')!r})")
    tensors = load_tensors(ckpt)
    head = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    adapter = ckpt / "adapter_config.json"
    return load_value_model(
        resolve_model_path(layout, info["base_model"]), info["value_head"], head,
        lora or None, json.loads(adapter.read_text()) if adapter.is_file() else None,
        dtype=dtype, device=device,
    )  # fmt: skip


@dataclass
class LoadedPolicy:
    """A language model to hand to other tools: the weights (fp32, adapter merged), the
    SentencePiece file it was trained with, the dtype its base model is stored in."""

    model: Transformer
    tokenizer_model: Path | None
    stored_dtype: torch.dtype
    source: Path
    trained: bool


def load_policy(layout: StorageLayout, source: str) -> LoadedPolicy:
    """A trained policy checkpoint (or an experiment/run folder: its newest ``final``), else a
    storage model name or model folder, as a plain fp32 model with its tokenizer file."""
    from weighted_mtp.base.layout import training_tokenizer_path
    from weighted_mtp.models.checkpoints import load_pretrained, locate

    try:
        ckpt: Path | None = resolve_checkpoint(layout, source)
    except StorageError:
        ckpt = None
    if ckpt is not None:
        info = read_info(ckpt)
        if "value_head" in info:
            raise StorageError(
                f"{ckpt}: a critic checkpoint (value model) has no language-model head to export"
            )
        model_dir = resolve_model_path(layout, info["base_model"])
        model = load_trained(ckpt, layout)
    else:
        try:
            model_dir = resolve_model_path(layout, source)
        except StorageError:
            raise StorageError(
                f"{source}: neither a training checkpoint nor a model (a storage model name "
                "or a model folder)"
            ) from None
        model = load_pretrained(model_dir, dtype=torch.float32)
    located = locate(model_dir)
    stored = next(
        located.source.dtypes[name]
        for name, ours in located.our_names()
        if ours == "tok_embeddings.weight"
    )
    own = model_dir / "tokenizer" / "tokenizer.model"
    if not own.is_file():
        own = model_dir / "tokenizer.model"  # Meta raw and HF folders keep it beside the weights
    tokenizer = own if own.is_file() else training_tokenizer_path(layout)
    return LoadedPolicy(
        model.float().eval(), tokenizer, stored, ckpt or model_dir, ckpt is not None
    )
