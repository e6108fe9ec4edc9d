"""Recipes: name -> (model to train, frozen helpers, objective, weighting, data mode).

Every recipe runs through the same loop (``train/loop.py``); a recipe only says which model
trains, which frozen models it needs, and how tokens are weighted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weighted_mtp.base.io import StorageError, write_json_atomic
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import Config, LoraConfig
from weighted_mtp.data.dataset import BatchStream
from weighted_mtp.models.checkpoints import DTYPES, load_pretrained
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.models.transformer import Transformer
from weighted_mtp.train.objectives import (
    head_weight_fn,
    mtp_forward_backward,
    target_weights,
    valid_rows,
)
from weighted_mtp.train.weighting import (
    CriticTD,
    Rho1,
    Uniform,
    Weighting,
    critic_values_for,
    precompute_reference_ce,
)

CHECKPOINT_INFO = "wmtp_checkpoint.json"


# ---- models ----


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
    from weighted_mtp.base.layout import training_tokenizer_path

    own = model_dir / "tokenizer" / "tokenizer.model"
    path = own if own.is_file() else training_tokenizer_path(layout)
    if path is None:
        raise StorageError(f"{own}: no tokenizer for this model and none in storage")
    return Tokenizer(path)


def apply_lora(model: nn.Module, lora: LoraConfig) -> Any:
    """Inject PEFT LoRA adapters (fp32) into every block's target linears; freeze the rest."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.targets), bias="none",
    )  # fmt: skip
    inject_adapter_in_model(peft_config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
        if ".lora_" in name:
            param.data = param.data.float()
    return peft_config


def merge_adapter(model: Transformer, ckpt_dir: Path) -> None:
    """Fold a saved LoRA adapter into the base weights: ``W += (alpha / r) B A``."""
    from weighted_mtp.train.checkpoint import load_tensors

    config = json.loads((ckpt_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_tensors(ckpt_dir)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A.default.weight" not in name:
                continue
            b = tensors[name.replace("lora_A", "lora_B")]
            linear = modules[name.split(".lora_A.")[0]]
            linear.weight += (scale * (b.float() @ a.float())).to(linear.weight.dtype)


def load_trained(
    ckpt_dir: Path,
    layout: StorageLayout,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """A trained checkpoint as a plain model: base weights with the adapter merged in."""
    info_path = ckpt_dir / CHECKPOINT_INFO
    if not info_path.is_file():
        raise StorageError(f"{ckpt_dir}: not a training checkpoint (no {CHECKPOINT_INFO})")
    info = json.loads(info_path.read_text())
    model = load_pretrained(resolve_model_path(layout, info["base_model"]), dtype=torch.float32)
    if (ckpt_dir / "adapter_config.json").is_file():
        merge_adapter(model, ckpt_dir)
    else:
        from weighted_mtp.train.checkpoint import load_tensors

        model.load_state_dict(load_tensors(ckpt_dir), strict=False)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def resolve_checkpoint(layout: StorageLayout, path: str) -> Path:
    """``checkpoints/<experiment>`` (newest run's ``final``), a run folder, or a checkpoint."""
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = layout.root / path
    if (candidate / CHECKPOINT_INFO).is_file():
        return candidate
    finals = sorted(candidate.glob("final")) + sorted(
        candidate.glob("*/final"), key=lambda p: p.stat().st_mtime
    )
    finals = [f for f in finals if (f / CHECKPOINT_INFO).is_file()]
    if not finals:
        raise StorageError(f"{candidate}: no finished training checkpoint (run that recipe first)")
    return finals[-1]


def checkpoint_fingerprint(ckpt_dir: Path) -> str:
    """SHA-256 over a checkpoint's tensors and info: a cache key part that changes with it."""
    digest = hashlib.sha256()
    for name in ("wmtp_checkpoint.json", "adapter_model.safetensors", "extra.safetensors",
                 "model.safetensors"):  # fmt: skip
        if (ckpt_dir / name).is_file():
            digest.update(name.encode() + (ckpt_dir / name).read_bytes())
    return digest.hexdigest()


def cached_per_example(
    layout: StorageLayout, kind: str, key: dict, stream: BatchStream, compute: Callable[[], list]
) -> list[torch.Tensor]:
    """Per-example 1-D signals of ``stream`` from ``storage/cache/<kind>/<key>.safetensors``,
    computed by ``compute()`` and stored on a miss. The key covers the frozen model's
    checkpoint and the exact data (file, sampled lines, length cap), so a stale cache is
    never read."""
    from safetensors.torch import load_file, save_file

    from weighted_mtp.base.io import atomic_path

    payload = {**key, "file": stream.data.manifest.get("file"), "lines": stream.data.line_indices}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    path = layout.root / "cache" / kind / f"{digest[:32]}.safetensors"
    if path.is_file():
        data = load_file(path)
        return list(torch.split(data["values"], data["lengths"].tolist()))
    values = compute()
    lengths = torch.tensor([v.numel() for v in values], dtype=torch.long)
    with atomic_path(path) as tmp:
        save_file({"values": torch.cat(values).float().contiguous(), "lengths": lengths}, tmp)
    return values


def precompute_hook(
    recipe: Recipe, layout: StorageLayout, kind: str, extra: str, key: dict, config: Config,
    compute: Callable[[BatchStream, torch.device, int], list[torch.Tensor]],
    release: Callable[[], None],
) -> Callable[[list[BatchStream], torch.device, int], None]:  # fmt: skip
    """A ``Recipe.prepare`` that fills ``batch.extras[extra]`` of every stream from the cache
    (or ``compute``), then drops the frozen model: training no longer needs it in memory."""
    key = {**key, "max_length": config.data.max_length}

    def prepare(streams: list[BatchStream], device: torch.device, batch_size: int) -> None:
        for stream in streams:
            stream.extras[extra] = cached_per_example(
                layout, kind, key, stream, lambda s=stream: compute(s, device, batch_size)
            )
        release()
        recipe.frozen.clear()

    return prepare


# ---- objective ----


@dataclass
class MTPObjective:
    """Weighted MTP cross-entropy over the first ``n_heads`` heads."""

    weighting: Weighting
    n_heads: int
    coefficients: Sequence[float]
    chunk_rows: int = 4096

    def denominators(self, batch: Any) -> torch.Tensor:
        return self.weighting.denominators(batch, self.n_heads)

    def __call__(
        self, model: nn.Module, batch: Any, denominators: torch.Tensor | None, backward: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = mtp_forward_backward(
            model, batch.tokens, batch.labels,
            self.weighting.dense_weights(batch, self.n_heads),
            denominators, self.coefficients,
            chunk_rows=self.chunk_rows, backward=backward,
            weight_fn=self.weighting.weight_fn(batch), n_heads=self.n_heads,
            n_chunks=self._global_chunks(batch.labels),
        )  # fmt: skip
        stats = torch.stack([out.weighted_ce_sum, out.ce_sum, out.n_tokens, out.weight_sum])
        return out.loss, stats

    @torch.no_grad()
    def token_weights(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The weight each head puts on each target token of ``batch``, ``[B, L, n]`` fp32,
        NaN where that head has no target (prompt, padding, the first k tokens): exactly the
        weights of a validation pass, for heat maps. Under FSDP every rank must call it."""
        n = self.n_heads
        weights = target_weights(batch.labels, self.weighting.dense_weights(batch, n), n)
        fn = self.weighting.weight_fn(batch)
        if fn is not None:
            recorded = weights.clone()

            def record(head: int, ce, batch_idx, target_pos):
                head_fn = head_weight_fn(fn, head)
                if head_fn is None:  # this head keeps its dense weights
                    return weights[batch_idx, target_pos, head]
                w = head_fn(head, ce, batch_idx, target_pos)
                recorded[batch_idx, target_pos, head] = w.float()
                return w

            mtp_forward_backward(
                model, batch.tokens, batch.labels, None, None, [1.0] * n,
                chunk_rows=self.chunk_rows, backward=False, weight_fn=record, n_heads=n,
                n_chunks=self._global_chunks(batch.labels),
            )  # fmt: skip
            weights = recorded
        valid = target_weights(batch.labels, None, n) > 0
        return torch.where(valid, weights, torch.full_like(weights, float("nan")))

    def _global_chunks(self, labels: torch.Tensor) -> list[int] | None:
        """Under FSDP, chunk counts from the largest row count of any rank (see objectives)."""
        if not torch.distributed.is_initialized():
            return None
        rows = torch.tensor(
            [valid_rows(labels, k + 1)[0].numel() for k in range(self.n_heads)],
            device=labels.device,
        )
        torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.MAX)
        return [max(1, -(-int(r) // self.chunk_rows)) for r in rows]

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        """Per-head unweighted and weighted CE from summed stats (always both)."""
        metrics = {}
        for k in range(self.n_heads):
            wsum, ce, count, weight = (float(v) for v in stats[:, k])
            metrics[f"ce/head{k + 1}"] = ce / count if count else float("nan")
            metrics[f"wce/head{k + 1}"] = wsum / weight if weight else float("nan")
            metrics[f"weight_mean/head{k + 1}"] = weight / count if count else float("nan")
        metrics["ce"] = float(stats[1].sum() / stats[2].sum().clamp(min=1))
        return metrics


# ---- recipes ----


@dataclass
class Recipe:
    name: str
    model: nn.Module
    tokenizer: Tokenizer
    objective: MTPObjective
    base_model: str
    lora_config: Any | None
    frozen: list[nn.Module] = field(default_factory=list)
    param_groups: Callable[[nn.Module], list[dict]] | None = None
    prepare: Callable[[list[BatchStream], torch.device, int], None] | None = None
    on_finish: Callable[[nn.Module, BatchStream | None, Path, torch.device], None] | None = None
    """Runs once on rank 0 after the final checkpoint (e.g. the critic's diagnostics)."""
    checkpoint_info: dict = field(default_factory=dict)
    """Extra entries of ``wmtp_checkpoint.json`` (e.g. the value head's type and sizes)."""
    """Runs once on the train and validation streams before training (precomputation)."""


def _trainable_model(config: Config, layout: StorageLayout, device: torch.device):
    model_dir = resolve_model_path(layout, config.model.path)
    model = load_pretrained(model_dir, dtype=DTYPES[config.model.dtype], device=device)
    lora = apply_lora(model, config.lora) if config.lora.enabled else None
    if lora is None:
        for param in model.parameters():
            param.requires_grad_(True)
    model.activation_checkpointing = config.model.activation_checkpointing
    return model.train(), model_dir, lora


def _coefficients(config: Config, n_heads: int) -> list[float]:
    coefficients = config.train.head_coefficients or [1.0 / n_heads] * n_heads
    if len(coefficients) != n_heads:
        raise ValueError(
            f"train.head_coefficients has {len(coefficients)} entries for {n_heads} heads"
        )
    return list(coefficients)


def _policy_recipe(
    config: Config,
    layout: StorageLayout,
    device: torch.device,
    weighting: Weighting,
    n_heads: int | None = None,
) -> Recipe:
    model, model_dir, lora = _trainable_model(config, layout, device)
    heads = n_heads or config.model.n_future_tokens or model.n_future_tokens
    if heads > model.n_future_tokens:
        raise ValueError(
            f"model.n_future_tokens {heads} > the checkpoint's {model.n_future_tokens} heads"
        )
    objective = MTPObjective(weighting, heads, _coefficients(config, heads))
    return Recipe(
        config.train.recipe,
        model,
        tokenizer_for(layout, model_dir),
        objective,
        config.model.path,
        lora,
    )


def baseline(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    return _policy_recipe(config, layout, device, Uniform(config.train.normalization))


def ntp(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    """The same MTP model and data trained on head 1 only: isolates the effect of MTP."""
    return _policy_recipe(config, layout, device, Uniform(config.train.normalization), n_heads=1)


def ref_tuning(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    """SFT of the reference LM (a plain LLaMA) on the same correct solutions."""
    return _policy_recipe(config, layout, device, Uniform(config.train.normalization), n_heads=1)


def rho1(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    if not config.weighting.reference:
        raise ValueError("rho1 needs weighting.reference (a ref_tuning checkpoint)")
    ref_ckpt = resolve_checkpoint(layout, config.weighting.reference)
    reference = load_trained(
        ref_ckpt,
        layout,
        dtype=DTYPES[config.model.dtype],
        device=device,
    )
    reference.requires_grad_(False)
    weighting = Rho1(
        reference,
        config.weighting.k_percent,
        config.weighting.score,
        config.train.normalization,
        config.weighting.control,
        config.train.seed,
    )
    recipe = _policy_recipe(config, layout, device, weighting)
    recipe.frozen.append(reference)
    if config.weighting.precompute_reference:

        def release() -> None:
            weighting.reference = None  # every batch now carries its reference CE

        recipe.prepare = precompute_hook(
            recipe, layout, "reference_ce", "ref_ce",
            {"reference": checkpoint_fingerprint(ref_ckpt)}, config,
            lambda stream, dev, bs: precompute_reference_ce(reference, stream, dev, bs), release,
        )  # fmt: skip
    return recipe


def critic(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    """A value model (the reference LM's trunk + a value head) on correct/incorrect pairs."""
    from weighted_mtp.models.value import ValueHeadConfig, ValueModel
    from weighted_mtp.train.value_objectives import CriticObjective, LambdaSchedule

    model_dir = resolve_model_path(layout, config.model.path)
    crit = config.critic
    head = ValueHeadConfig(crit.head_type, None, crit.head_dropout, crit.bias_init)
    model = ValueModel.from_pretrained(model_dir, head, DTYPES[config.model.dtype], device)
    lora = None
    if config.lora.enabled and crit.train_backbone:
        lora = apply_lora(model.backbone, config.lora)
    else:
        model.backbone.requires_grad_(False)
    model.head.requires_grad_(True)
    model.backbone.activation_checkpointing = config.model.activation_checkpointing
    schedule = LambdaSchedule(crit.lambda_schedule, crit.lambda_start, crit.lambda_end,
                              crit.lambda_hold_steps, crit.lambda_decay_steps)  # fmt: skip
    objective = CriticObjective(
        loss=crit.loss, coef=crit.loss_coef,
        regression="mse" if crit.huber_delta is None else "huber",
        huber_delta=crit.huber_delta or 0.5, lam=schedule,
    )  # fmt: skip

    def param_groups(m: nn.Module) -> list[dict]:
        trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        body = [p for n, p in trainable if not n.startswith("head.")]
        groups = [
            {"params": [p for n, p in trainable if n.startswith("head.")], "lr": crit.head_lr}
        ]
        return groups + ([{"params": body}] if body else [])

    return Recipe("critic", model.train(), tokenizer_for(layout, model_dir), objective,
                  config.model.path, lora, param_groups=param_groups,
                  checkpoint_info={"value_head": model.head_config},
                  on_finish=write_critic_diagnostics)  # fmt: skip


def write_critic_diagnostics(
    model: nn.Module, val: BatchStream | None, run_dir: Path, device: torch.device
) -> None:
    """``critic_diagnostics.json``: is the critic more than a length detector?"""
    from weighted_mtp.train.value_objectives import critic_diagnostics

    if val is None:
        return
    report = critic_diagnostics(model, val, device)
    write_json_atomic(run_dir / "critic_diagnostics.json", report)
    print(
        f"critic: pair accuracy {report['pair_accuracy']:.3f}, length-only predictor "
        f"{report['length_only_accuracy']:.3f} on {report['pairs']} validation pairs",
        flush=True,
    )


def load_critic(
    ckpt_dir: Path,
    layout: StorageLayout,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A trained critic checkpoint as a frozen value model (head type and sizes from the
    checkpoint itself, so nothing is guessed)."""
    from weighted_mtp.models.value import load_value_model
    from weighted_mtp.train.checkpoint import load_tensors

    info = json.loads((ckpt_dir / CHECKPOINT_INFO).read_text())
    if "value_head" not in info:
        raise StorageError(f"{ckpt_dir}: not a critic checkpoint (recipe {info.get('recipe')!r})")
    tensors = load_tensors(ckpt_dir)
    head = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    adapter = ckpt_dir / "adapter_config.json"
    return load_value_model(
        resolve_model_path(layout, info["base_model"]), info["value_head"], head,
        lora or None, json.loads(adapter.read_text()) if adapter.is_file() else None,
        dtype=dtype, device=device,
    )  # fmt: skip


def verifiable(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    """The MTP policy with TD weights from a frozen critic (GAE -> EMA whitening -> exp).

    With ``weighting.precompute_critic`` the critic's values of every example are computed
    once (or read from ``storage/cache/critic_values/``) before training, and the critic is
    not kept in memory.
    """
    if not config.weighting.critic_checkpoint:
        raise ValueError("verifiable needs weighting.critic_checkpoint (a critic run)")
    ckpt = resolve_checkpoint(layout, config.weighting.critic_checkpoint)
    dtype = DTYPES[config.model.dtype]
    critic_model = load_critic(ckpt, layout, dtype, device)
    weighting = CriticTD(critic_model, config.weighting, config.train.normalization,
                         control=config.weighting.control, seed=config.train.seed)  # fmt: skip
    recipe = _policy_recipe(config, layout, device, weighting)
    recipe.frozen.append(critic_model)
    if config.weighting.precompute_critic:

        def release() -> None:
            weighting.critic = None  # every batch now carries the critic's values

        recipe.prepare = precompute_hook(
            recipe, layout, "critic_values", "values",
            {"critic": checkpoint_fingerprint(ckpt)}, config,
            lambda stream, dev, bs: critic_values_for(stream, critic_model, dev, bs), release,
        )  # fmt: skip
    return recipe


RECIPES: dict[str, Callable[[Config, StorageLayout, torch.device], Recipe]] = {
    "critic": critic,
    "verifiable": verifiable,
    "baseline": baseline,
    "ntp": ntp,
    "ref_tuning": ref_tuning,
    "rho1": rho1,
}


def build(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    if config.train.recipe not in RECIPES:
        raise ValueError(
            f"unknown train.recipe {config.train.recipe!r}; choose from {', '.join(RECIPES)}"
        )
    return RECIPES[config.train.recipe](config, layout, device)
