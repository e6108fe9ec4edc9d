"""Recipes: name -> (model to train, objective with its weighting, optimizer groups).

Every recipe runs through the same loop (``train/loop.py``); a recipe only says what differs in
model and objective: ``policy`` (the MTP policy, LoRA), ``critic`` (a value model),
``reference`` (the reference LM's SFT, head 1) and ``pretrain`` (every parameter). The token
weighting is ``weighting.name``, any registered one (``weighted_mtp/registry.py``). The names
used before (``baseline``, ``verifiable``, ``rho1``, ``ntp``, ``ref_tuning``) are aliases:
``registry.recipe_of`` gives the recipe, default weighting and heads each stands for
(docs/METHOD.md §8). Frozen helpers (a reference, a critic) belong to their weighting, which
loads and frees them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weighted_mtp import registry
from weighted_mtp.base.io import write_json_atomic
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import Config, LoraConfig
from weighted_mtp.data.dataset import BatchStream
from weighted_mtp.models.checkpoints import DTYPES, load_pretrained
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.train.checkpoint import resolve_model_path, tokenizer_for
from weighted_mtp.train.objectives import HeadCoefficients, MTPObjective, Objective
from weighted_mtp.train.weighting import BuildContext, build_weighting


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


# ---- recipes ----


@dataclass
class Recipe:
    name: str
    model: nn.Module
    tokenizer: Tokenizer
    objective: Objective
    base_model: str
    lora_config: Any | None
    param_groups: Callable[[nn.Module], list[dict]] | None = None
    on_finish: Callable[[nn.Module, BatchStream | None, Path, torch.device], None] | None = None
    """Runs once on every rank after the final checkpoint (e.g. the critic's diagnostics):
    the model may be sharded, so rank 0 alone must not run it; rank 0 writes the results."""
    checkpoint_info: dict = field(default_factory=dict)
    """Extra entries of the checkpoint info (e.g. the value head's type and sizes)."""


def _trainable_model(
    config: Config, layout: StorageLayout, device: torch.device
) -> tuple[nn.Module, Path, Any | None]:
    model_dir = resolve_model_path(layout, config.model.path)
    model = load_pretrained(model_dir, dtype=DTYPES[config.model.dtype], device=device)
    lora = apply_lora(model, config.lora) if config.lora.enabled else None
    if lora is None:
        for param in model.parameters():
            param.requires_grad_(True)
    model.activation_checkpointing = config.model.activation_checkpointing
    return model.train(), model_dir, lora


def policy_recipe(
    config: Config,
    layout: StorageLayout,
    device: torch.device,
    n_heads: int | None = None,
) -> Recipe:
    """An MTP policy (LoRA) trained on its first ``n_heads`` heads (default: those its recipe or
    alias fixes, else ``model.n_future_tokens``, else all) with the weighting ``weighting.name``
    (default: its alias's, ``registry.recipe_of``)."""
    ctx = BuildContext(layout, device, DTYPES[config.model.dtype], config.train.seed,
                       config.train.normalization, config.weighting.control,
                       config.data.max_length)  # fmt: skip
    # The weighting (and its frozen helper) first: the policy's LoRA init then draws the same
    # random numbers whichever weighting is used.
    name = registry.weighting_of(config.train.recipe, config.weighting.name) or "uniform"
    chosen = build_weighting(name, config.weighting, ctx)
    model, model_dir, lora = _trainable_model(config, layout, device)
    fixed = registry.recipe_of(config.train.recipe).n_heads
    heads = n_heads or fixed or config.model.n_future_tokens or model.n_future_tokens
    if heads > model.n_future_tokens:
        raise ValueError(
            f"model.n_future_tokens {heads} > the checkpoint's {model.n_future_tokens} heads"
        )
    objective = MTPObjective(chosen, heads, HeadCoefficients.from_config(config.train, heads))
    return Recipe(config.train.recipe, model, tokenizer_for(layout, model_dir), objective,
                  config.model.path, lora)  # fmt: skip


def policy(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    """The MTP policy (LoRA) on all its heads (or ``model.n_future_tokens``; the alias ``ntp``:
    head 1 only) with the weighting ``weighting.name``: uniform (the alias ``baseline``), the
    Verifiable Critic's TD weights from a frozen critic (``verifiable``, docs/METHOD.md §4),
    Rho-1 selection against a frozen tuned reference (``rho1``, §5), or any registered one."""
    return policy_recipe(config, layout, device)


def reference(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    """SFT of the reference LM (a plain one-head LLaMA) on the same correct solutions: head 1
    only, uniform weights (the alias ``ref_tuning``)."""
    return policy_recipe(config, layout, device, n_heads=1)


def pretrain(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    """Full-parameter pretraining (no LoRA) of a model on all its heads with the policies' MTP
    objective and uniform weights: with the default coefficients (1/n) and normalisation
    (``weight_sum``) the loss is the mean over heads of each head's mean cross-entropy. With
    ``data.train_prompt`` the prompt's tokens are targets too; the micro base is trained so
    (docs/DATA.md §7)."""
    if config.lora.enabled:
        raise ValueError("the pretrain recipe trains every parameter: set lora.enabled=false")
    return policy_recipe(config, layout, device)


def critic(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    """A value model (the reference LM's trunk + a value head) on correct/incorrect pairs."""
    from weighted_mtp.models.value import ValueHeadConfig, ValueModel
    from weighted_mtp.train.value_objectives import CriticObjective, LambdaSchedule

    model_dir = resolve_model_path(layout, config.model.path)
    crit = config.critic
    head = ValueHeadConfig(crit.head_type, None, crit.head_dropout, crit.bias_init)
    model = ValueModel.from_pretrained(model_dir, head, DTYPES[config.model.dtype], device)
    lora = None
    if config.weighting.name not in (None, "uniform"):
        raise ValueError("the critic recipe has no token weighting: unset weighting.name")
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
    from weighted_mtp.train import distributed
    from weighted_mtp.train.value_objectives import critic_diagnostics

    if val is None:
        return
    report = critic_diagnostics(model, val, device)
    if not distributed.env_info().is_main:
        return
    write_json_atomic(run_dir / "critic_diagnostics.json", report)
    print(
        f"critic: pair accuracy {report['pair_accuracy']:.3f}, length-only predictor "
        f"{report['length_only_accuracy']:.3f} on {report['pairs']} validation pairs",
        flush=True,
    )


RECIPES: dict[str, Callable[[Config, StorageLayout, torch.device], Recipe]] = {
    "policy": policy,
    "critic": critic,
    "reference": reference,
    "pretrain": pretrain,
}
"""The builder of each recipe of ``registry.RECIPES``; an alias builds its recipe."""


def build(config: Config, layout: StorageLayout, device: torch.device) -> Recipe:
    """The recipe ``train.recipe`` names, directly or through an alias (``registry.recipe_of``:
    a one-line error naming the recipes and the aliases if it is neither)."""
    return RECIPES[registry.recipe_of(config.train.recipe).recipe](config, layout, device)
