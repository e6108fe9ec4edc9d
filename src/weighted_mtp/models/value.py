"""The value model ("critic"): our ``Transformer`` backbone plus a per-position value head
(docs/METHOD.md §3).

The backbone is the same ``Transformer`` as the policy, with ``n_future_tokens == 1`` (a plain
LLaMA, e.g. Sheared-LLaMA-2.7B); its features are ``hidden_states`` (head 1's output after the
final norm, i.e. HF ``last_hidden_state``). ``v[b, t]`` is the value of the prefix
``x_0..x_t``. The head always runs in fp32, also under bf16 autocast, because value
differences of a few 1e-3 matter to the ranking loss and to the TD weights.

A checkpoint stores the head's tensors (``head_state``) and an explicit ``head_config`` dict
(type, hidden size, dropout, bias init) so that a reload never guesses the head type from a
training config, which is how the upstream reload picked the wrong head (docs/METHOD.md §3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from weighted_mtp.base.errors import UserError
from weighted_mtp.models.checkpoints import CheckpointError, load_pretrained
from weighted_mtp.models.transformer import Transformer

HEAD_TYPES = ("linear", "sigmoid", "mlp")


@dataclass
class ValueHeadConfig:
    """``hidden_size`` None means "the backbone's ``dim``" (filled in by :class:`ValueModel`)."""

    head_type: str = "mlp"
    hidden_size: int | None = None
    dropout: float = 0.0
    bias_init: float = 0.0

    def __post_init__(self) -> None:
        if self.head_type not in HEAD_TYPES:
            raise ValueError(
                f"value head type {self.head_type!r}: choose from {', '.join(HEAD_TYPES)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"value head dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ValueHeadConfig:
        """Accepts ``type`` as an alias of ``head_type``; unknown keys are an error."""
        data = dict(data)
        if "type" in data:
            data["head_type"] = data.pop("type")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"value head config: unknown keys {unknown}")
        return cls(**data)


def build_head(config: ValueHeadConfig, hidden_size: int) -> nn.Module:
    """``linear``/``sigmoid``: Linear(H, 1) zero-initialised (+ sigmoid). ``mlp``:
    H -> H/4 -> H/8 -> 1 with GELU and dropout; only the last layer is zero-initialised, so
    every initial value equals ``bias_init`` while the hidden layers still get gradients."""
    if config.head_type == "mlp":
        h4, h8 = hidden_size // 4, hidden_size // 8
        layers: list[nn.Module] = [
            nn.Linear(hidden_size, h4), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(h4, h8), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(h8, 1),
        ]  # fmt: skip
    else:
        layers = [nn.Linear(hidden_size, 1)]
    last = layers[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(config.bias_init)
    if config.head_type == "sigmoid":
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


class ValueModel(nn.Module):
    """``forward(tokens) -> values [B, L]`` (fp32)."""

    n_future_tokens = 1

    def __init__(self, backbone: Transformer, head: ValueHeadConfig | None = None):
        super().__init__()
        if backbone.n_future_tokens != 1:
            raise UserError(
                f"the critic backbone must have n_future_tokens 1 (a plain LLaMA), got "
                f"{backbone.n_future_tokens}: load the reference model, not the MTP policy"
            )
        config = head or ValueHeadConfig()
        dim = backbone.args.dim
        if config.hidden_size is None:
            config = ValueHeadConfig(config.head_type, dim, config.dropout, config.bias_init)
        if config.hidden_size != dim:
            raise ValueError(
                f"value head hidden size {config.hidden_size} does not match the backbone's {dim}"
            )
        self.backbone = backbone
        self.config = config
        device = backbone.tok_embeddings.weight.device
        # The head is built on the backbone's device, always in fp32.
        self.head = build_head(config, dim).to(device=device, dtype=torch.float32)

    @property
    def args(self):
        return self.backbone.args

    @property
    def head_config(self) -> dict[str, Any]:
        """Store this at the top level of a checkpoint (reload needs no training config)."""
        return self.config.to_dict()

    def head_state(self) -> dict[str, Tensor]:
        """The head's tensors, names without the ``head.`` prefix."""
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def hidden_states(self, tokens: Tensor) -> Tensor:
        return self.backbone.hidden_states(tokens)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.backbone.hidden_states(tokens)
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.head(h.float()).squeeze(-1)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        head: ValueHeadConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
    ) -> ValueModel:
        """Backbone from a storage / HF / Meta folder (``load_pretrained``), fresh head."""
        return cls(load_pretrained(path, dtype=dtype, device=device), head)


def _lora_module_name(name: str) -> str:
    """A stored LoRA tensor name -> the backbone's module name after PEFT injection.

    Accepts PEFT file names (``base_model.model.`` prefix, no ``.default.``), names with a
    leading ``backbone.`` (our ValueModel) and activation-checkpoint wrappers (upstream)."""
    name = name.removeprefix("base_model.model.").removeprefix("backbone.")
    name = name.replace("._checkpoint_wrapped_module", "")
    for part in ("lora_A", "lora_B"):
        if f".{part}.weight" in name:
            name = name.replace(f".{part}.weight", f".{part}.default.weight")
    return name


def _load_lora(backbone: Transformer, tensors: Mapping[str, Tensor], config: Mapping) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    peft_config = LoraConfig(
        r=config["r"], lora_alpha=config["lora_alpha"],
        lora_dropout=config.get("lora_dropout", 0.0),
        target_modules=list(config["target_modules"]), bias="none",
    )  # fmt: skip
    inject_adapter_in_model(peft_config, backbone)
    state = {_lora_module_name(k): v for k, v in tensors.items()}
    expected = {k for k in backbone.state_dict() if ".lora_" in k}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(
            f"critic LoRA tensors do not match the adapter: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    backbone.load_state_dict(state, strict=False)


def load_value_model(
    base_model_path: str | Path,
    head_config: Mapping[str, Any],
    head_tensors: Mapping[str, Tensor],
    lora_tensors: Mapping[str, Tensor] | None = None,
    lora_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> ValueModel:
    """A trained critic, frozen and in eval mode (docs/METHOD.md §3).

    ``head_config``: :attr:`ValueModel.head_config`. ``head_tensors``: :meth:`head_state` (a
    leading ``head.`` is stripped). ``lora_config``: PEFT ``adapter_config.json`` keys (``r``,
    ``lora_alpha``, ``target_modules``); the adapter is injected, not merged.
    """
    config = ValueHeadConfig.from_dict(head_config)
    backbone = load_pretrained(base_model_path, dtype=dtype, device=device)
    if config.hidden_size is not None and config.hidden_size != backbone.args.dim:
        raise CheckpointError(
            f"critic checkpoint hidden size {config.hidden_size} does not match "
            f"the backbone's {backbone.args.dim}"
        )
    if lora_tensors:
        if lora_config is None:
            raise CheckpointError("critic checkpoint has LoRA tensors but no lora_config")
        _load_lora(backbone, lora_tensors, lora_config)
    model = ValueModel(backbone, config)
    model.head.load_state_dict({k.removeprefix("head."): v for k, v in head_tensors.items()})
    model.requires_grad_(False)
    return model.to(device).eval()
