"""The models' storage: download, convert, config, verify, and the micro models.

``models/<name>/raw`` holds what the Hub serves, unchanged. ``convert`` streams it into one
``safetensors/model.safetensors`` (tensor names kept as the source has them, so the file
pairs with the copied config) plus ``SHA256SUMS``; ``config`` writes ``configs/`` and a
loadable ``tokenizer/`` folder; ``verify`` re-checks all of it. Every step is idempotent
and writes atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from weighted_mtp.base.io import (
    StorageError,
    check_sha256sums,
    copy_atomic,
    write_sha256sums,
    write_text_atomic,
)
from weighted_mtp.base.layout import MODEL_ALIASES, ModelPaths, StorageLayout
from weighted_mtp.models.checkpoints import (
    DTYPES,
    CheckpointError,
    check_shapes,
    locate,
    write_safetensors,
)
from weighted_mtp.models.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizer
from weighted_mtp.storage.checks import Check
from weighted_mtp.storage.micro import create_micro as build_micro
from weighted_mtp.storage.tokenizer_folder import write_tokenizer_folder


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how its raw folder is laid out."""

    name: str
    repo: str
    kind: str  # "meta": consolidated.pth + params.json; "hf": a Llama folder
    weights_dir: str  # folder under raw/ that holds the weights and their config
    files: tuple[str, ...]  # meta: exact files; hf: allow-patterns for snapshot_download
    licence_url: str


SPECS = {
    "meta-llama-mtp": ModelSpec(
        "meta-llama-mtp",
        "facebook/multi-token-prediction",
        "meta",
        "7B_1T_4",
        ("7B_1T_4/consolidated.pth", "7B_1T_4/params.json", "tokenizer.model"),
        "https://huggingface.co/facebook/multi-token-prediction",
    ),
    "ref-sheared-llama-2.7b": ModelSpec(
        "ref-sheared-llama-2.7b",
        "princeton-nlp/Sheared-LLaMA-2.7B",
        "hf",
        "reference_model",
        ("*.json", "*.safetensors", "*.bin", "tokenizer.model"),
        "https://huggingface.co/princeton-nlp/Sheared-LLaMA-2.7B",
    ),
}


def resolve_model(name: str) -> ModelSpec:
    if name not in MODEL_ALIASES:
        raise StorageError(f"unknown --model {name!r}; choose from {', '.join(SPECS)}")
    return SPECS[MODEL_ALIASES[name]]


def say(message: str) -> None:
    print(message, flush=True)


# ---- download ----


def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def download(spec: ModelSpec, paths: ModelPaths, force: bool = False) -> None:
    """Fetch the raw files from the Hub (resumable; ``HF_TOKEN`` for gated repos)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        if spec.kind == "meta":
            for filename in spec.files:
                if (paths.raw / filename).is_file() and not force:
                    say(f"  {filename}: present")
                    continue
                say(f"  downloading {spec.repo}/{filename}")
                hf_hub_download(spec.repo, filename, local_dir=paths.raw, token=_hf_token())
        else:
            target = paths.raw / spec.weights_dir
            if _hf_folder_complete(target) and not force:
                say(f"  {target}: present")
                return
            say(f"  downloading {spec.repo} into {target}")
            snapshot_download(
                spec.repo, local_dir=target, allow_patterns=list(spec.files), token=_hf_token()
            )
    except GatedRepoError:
        raise StorageError(
            f"{spec.repo} is gated: accept its licence at {spec.licence_url} and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise StorageError(
            f"{spec.repo}: repository not found (or HF_TOKEN lacks access)"
        ) from None
    except OSError as err:  # offline, DNS, disk full: one line, never the token
        raise StorageError(f"download of {spec.repo} failed: {type(err).__name__}: {err}") from None


def _hf_folder_complete(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = set(json.loads(index.read_text())["weight_map"].values())
            return all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


# ---- convert ----


def _raw_weights(spec: ModelSpec, paths: ModelPaths) -> Path:
    folder = paths.raw / spec.weights_dir
    if not folder.is_dir():
        raise StorageError(f"{folder}: raw weights missing; run --steps download first")
    return folder


def convert(spec: ModelSpec, paths: ModelPaths, dtype: str = "keep", force: bool = False) -> None:
    """Stream the raw weights into ``safetensors/model.safetensors`` and ``SHA256SUMS``."""
    if paths.weights.is_file() and paths.checksums.is_file() and not force:
        say(f"  {paths.weights}: already converted (use --force to redo)")
        return
    source_dir = _raw_weights(spec, paths)
    try:
        ckpt = locate(source_dir)
        check_shapes(ckpt, str(source_dir))
    except CheckpointError as err:
        raise StorageError(str(err)) from None
    names = dict(ckpt.our_names())  # source name -> ours; ignored keys already dropped
    target = None if dtype == "keep" else DTYPES[dtype]
    specs = {n: (ckpt.source.shapes[n], target or ckpt.source.dtypes[n]) for n in names}
    total = sum(
        torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in specs.values()
    )
    source_dtypes = sorted({str(d).removeprefix("torch.") for d in ckpt.source.dtypes.values()})
    metadata = {
        "source_format": ckpt.layout,
        "source_dtype": ",".join(source_dtypes),
        "stored_dtype": str(target).removeprefix("torch.") if target else ",".join(source_dtypes),
    }
    with _byte_progress(f"converting {spec.name}", total) as advance:

        def read(name: str) -> torch.Tensor:
            tensor = ckpt.source.read(name)
            advance(tensor.numel() * (target or tensor.dtype).itemsize)
            return tensor

        digest = write_safetensors(paths.weights, specs, read, metadata)
    write_sha256sums(paths.safetensors_dir, {paths.weights.name: digest})
    written = set(locate_weights_names(paths.weights))
    if written != set(specs):
        raise StorageError(f"{paths.weights}: written tensor names differ from the source")
    say(
        f"  wrote {paths.weights} ({total / 2**30:.2f} GiB, {len(specs)} tensors, {metadata['stored_dtype']})"
    )


def locate_weights_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


class _byte_progress:
    """A rich progress bar over bytes that yields an ``advance(n)`` callable."""

    def __init__(self, label: str, total: int):
        self.progress = Progress(
            TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn()
        )
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self):
        self.progress.start()
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        self.progress.stop()


# ---- config ----


def config(spec: ModelSpec, paths: ModelPaths, layout: StorageLayout, force: bool = False) -> None:
    """Write ``configs/`` and a loadable ``tokenizer/`` folder."""
    source_dir = _raw_weights(spec, paths)
    if spec.kind == "meta":
        _copy_if_needed(source_dir / "params.json", paths.configs / "params.json", force)
        adapter = paths.configs / "meta_adapter.yaml"
        if force or not adapter.is_file():
            write_text_atomic(
                adapter, yaml.safe_dump(_meta_adapter(paths, source_dir), sort_keys=False)
            )
        tokenizer_src = paths.raw / "tokenizer.model"
    else:
        _copy_if_needed(source_dir / "config.json", paths.configs / "config.json", force)
        tokenizer_src = source_dir / "tokenizer.model"
        if not tokenizer_src.is_file():  # LLaMA-2 vocabulary is shared with the MTP model
            tokenizer_src = layout.model("meta-llama-mtp").tokenizer
    if not tokenizer_src.is_file():
        raise StorageError(f"{tokenizer_src}: tokenizer.model missing; run --steps download first")
    write_tokenizer_folder(tokenizer_src, paths, force)
    say(f"  wrote {paths.configs} and {paths.tokenizer_dir}")


def _copy_if_needed(src: Path, dst: Path, force: bool) -> None:
    if not src.is_file():
        raise StorageError(f"{src}: missing; run --steps download first")
    if force or not dst.is_file():
        copy_atomic(src, dst)


def _meta_adapter(paths: ModelPaths, source_dir: Path) -> dict:
    ckpt = locate(paths.root if paths.weights.is_file() else source_dir)
    args = ckpt.args
    dtypes = sorted({str(d).removeprefix("torch.") for d in ckpt.source.dtypes.values()})
    return {
        "model_name": paths.root.name,
        "n_future_tokens": args.n_future_tokens,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "n_trunk_layers": args.n_trunk_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "intermediate_size": args.hidden_dim,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "dtype": ",".join(dtypes),
    }


# ---- verify ----


def verify_model(paths: ModelPaths) -> list[Check]:
    """Files present, checksums, tensor names/shapes against the config, tokenizer loads."""
    name = paths.root.name
    checks: list[Check] = []
    required = [paths.weights, paths.checksums]
    config_file = paths.configs / (
        "params.json" if (paths.configs / "params.json").exists() else "config.json"
    )
    required += [config_file, paths.tokenizer]
    missing = [str(p) for p in required if not p.is_file()]
    checks.append(
        Check(
            f"{name}: files present",
            not missing,
            f"missing {', '.join(missing)}" if missing else "",
        )
    )
    if paths.checksums.is_file():
        bad = check_sha256sums(paths.checksums)
        checks.append(
            Check(
                f"{name}: sha256",
                not bad,
                "; ".join(f"{paths.safetensors_dir / b}: checksum mismatch" for b in bad),
            )
        )
    if paths.weights.is_file() and config_file.is_file():
        checks.append(_check_tensors(paths))
    if paths.tokenizer.is_file():
        checks.append(_check_tokenizer(paths))
    return checks


def _check_tensors(paths: ModelPaths) -> Check:
    name = f"{paths.root.name}: tensor names and shapes"
    try:
        ckpt = locate(paths.root)
        check_shapes(ckpt, str(paths.weights))
    except (CheckpointError, OSError, ValueError) as err:
        return Check(name, False, str(err).splitlines()[0])
    dtypes = sorted({str(d).removeprefix("torch.") for d in ckpt.source.dtypes.values()})
    adapter = paths.configs / "meta_adapter.yaml"
    if adapter.is_file():
        recorded = yaml.safe_load(adapter.read_text())
        if recorded.get("n_future_tokens") != ckpt.args.n_future_tokens:
            return Check(name, False, f"{adapter}: n_future_tokens disagrees with params.json")
    return Check(
        name,
        True,
        f"{len(ckpt.source.shapes)} tensors, {','.join(dtypes)}, "
        f"n_future_tokens {ckpt.args.n_future_tokens}",
    )


def _check_tokenizer(paths: ModelPaths) -> Check:
    name = f"{paths.root.name}: tokenizer loads"
    try:
        tok = Tokenizer(paths.tokenizer)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError on a bad file
        return Check(name, False, f"{paths.tokenizer}: {type(err).__name__}")
    ids = (tok.sp.unk_id(), tok.bos_id, tok.eos_id)
    if ids != (UNK_ID, BOS_ID, EOS_ID):
        return Check(name, False, f"{paths.tokenizer}: special ids {ids}, expected (0, 1, 2)")
    return Check(name, True, f"{tok.vocab_size} pieces")


def verify_models(layout: StorageLayout, names: list[str] | None = None) -> list[Check]:
    """Verify the named models, or every model folder present under ``models/``."""
    if names is None:
        present = sorted(p.name for p in layout.models_dir.glob("*") if p.is_dir())
        names = [n for n in present if (layout.model(n).safetensors_dir).exists() or n in SPECS]
    if not names:
        return [Check("models", False, f"no model folders under {layout.models_dir}")]
    checks = []
    for name in names:
        checks += verify_model(layout.model(name))
    return checks


# ---- the command ----


def run(
    layout: StorageLayout,
    model: str | None,
    steps: list[str],
    create_micro: bool = False,
    micro_type: str = "mtp",
    micro_init: str = "random",
    dtype: str = "keep",
    force: bool = False,
) -> bool:
    """Run the steps in order download, convert, config, (micro), verify; True if all passed."""
    spec = resolve_model(model) if model else None
    paths = layout.model(spec.name) if spec else None
    for step in ("download", "convert", "config"):
        if step in steps:
            say(f"[{spec.name}] {step}")
            if step == "download":
                download(spec, paths, force)
            elif step == "convert":
                convert(spec, paths, dtype, force)
            else:
                config(spec, paths, layout, force)
    ok = True
    if create_micro:
        source = spec.name if spec and micro_init == "slice" else None
        micro_paths = build_micro(layout, micro_type, micro_init, source=source, force=force)
        ok &= _report(verify_model(micro_paths))
    if "verify" in steps:
        say(f"[{spec.name}] verify")
        ok &= _report(verify_model(paths))
    return ok


def _report(checks: list[Check]) -> bool:
    for check in checks:
        say("  " + check.line())
    return all(c.ok for c in checks)
