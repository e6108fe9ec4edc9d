"""The typed configuration tree.

Defaults live here and only here. A YAML file holds the differences from these defaults;
``key.path=value`` overrides from the command line apply on top. An unknown key or a value
of the wrong type fails with the key's dotted path (and, for YAML, ``file:line``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from weighted_mtp import registry
from weighted_mtp.base.errors import UserError


class ConfigError(UserError):
    """A bad configuration: the message is one line naming the key (and file:line)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Which model trains and how it is held in memory."""

    path: str = "micro-mtp"
    """A storage model name (``models/<name>``) or a path to a model folder."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the frozen base weights; LoRA parameters always stay float32."""
    n_future_tokens: int | None = Field(default=None, ge=1)
    """Heads to train; ``None`` keeps every head of the checkpoint, 1 trains head 1 only."""
    activation_checkpointing: bool = False


class LoraConfig(Section):
    enabled: bool = True
    rank: int = Field(default=8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    targets: list[Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3"]] = ["wq", "wk", "wv", "wo"]


class SamplingConfig(Section):
    """How training examples are drawn from ``<split>_metadata.json`` (docs/METHOD.md §7)."""

    mode: Literal[
        "correct_of_pairs", "correct", "pairwise", "length_balanced_pairs", "all", "mixed"
    ] = "correct_of_pairs"
    n_samples: int = Field(default=100_000, ge=1)
    val_n_samples: int = Field(default=500, ge=0)
    max_pairs_per_problem: int = Field(default=60, ge=1)
    difficulty_bins: dict[str, tuple[int, int]] = {"all": (0, 28)}
    difficulty_weights: dict[str, float] = {"all": 1.0}
    length_bins: list[int] = [0, 100, 150, 200, 300, 500, 1000, 2000]
    seed: int = 42
    incorrect_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    """``mixed`` only (and required there): the share of incorrect solutions among the drawn
    rows (docs/METHOD.md §7); None for every other mode, which keeps their configs unchanged."""

    @model_validator(mode="after")
    def _fraction_only_when_mixed(self) -> SamplingConfig:
        if self.mode == "mixed" and self.incorrect_fraction is None:
            raise ValueError("mode 'mixed' needs incorrect_fraction (the share of incorrect rows)")
        if self.mode != "mixed" and self.incorrect_fraction is not None:
            raise ValueError(f"incorrect_fraction applies to mode 'mixed' only, not {self.mode!r}")
        return self


class DataConfig(Section):
    dataset: str = "codecontests"
    train_split: str = "train"
    val_split: str = "valid"
    small: bool = False
    """Read ``datasets_local_small/<name>_small`` instead of the full processed files."""
    max_length: int = Field(default=2048, ge=8)
    train_prompt: bool = False
    """Make the prompt's tokens targets too (every token but BOS), as a base model's pretraining
    reads whole documents (the ``pretrain`` recipe, docs/DATA.md §7); False keeps fine-tuning's
    targets: the response and EOS only. Pointwise sampling modes only."""
    sampling: SamplingConfig = SamplingConfig()


class OptimConfig(Section):
    lr: float = Field(default=1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, le=1)
    warmup_steps: int | None = Field(default=None, ge=1)
    """Warm-up length in optimizer steps; None: ``warmup_ratio`` of the run's steps."""
    min_lr_ratio: float = Field(default=0.005, ge=0, le=1)
    weight_decay_on: Literal["all", "matrices"] = "all"
    """Which trainable parameters ``weight_decay`` applies to: all of them, or only those with
    two or more dimensions (no decay on norm gains and biases: the ``pretrain`` recipe,
    docs/DATA.md §7)."""


class TrainConfig(Section):
    recipe: str = "policy"
    """What trains (``registry.RECIPES``): ``policy``, ``critic``, ``reference`` or ``pretrain``,
    or an alias (``registry.ALIASES``: ``baseline``, ``verifiable``, ``rho1``, ``ntp``,
    ``ref_tuning``), kept as written (docs/METHOD.md §8)."""
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    """Caps the number of optimizer steps (epochs are converted to steps once)."""
    batch_size: int = Field(default=12, ge=1)
    grad_accum: int = Field(default=2, ge=1)
    seed: int = 42
    device: str = "auto"
    autocast: bool = True
    """bf16 autocast where the device supports it (CUDA); fp32 elsewhere."""
    head_coefficients: list[float] | None = None
    """Per-head loss coefficients c_k; default 1/n for every head."""
    head_coefficients_end: list[float] | None = None
    """If set, c_k moves linearly from ``head_coefficients`` to these over the run."""
    normalization: Literal["weight_sum", "token_count"] = "weight_sum"
    compile: bool = False
    """Run every transformer block through ``torch.compile`` (inductor), in place: parameter
    and checkpoint names do not change. The first steps pay the compilation."""
    fsdp_param_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Under torchrun, the dtype FSDP2 gathers parameters in and computes with (gradients are
    reduced and the optimizer runs in fp32): ``auto`` = bfloat16 on CUDA with ``autocast``,
    the parameters' own dtype elsewhere. ``bfloat16`` on a CPU runs the mixed-precision path of
    a GPU node (docs/SCALING.md §2)."""
    dist_timeout_s: float = Field(default=1800.0, gt=0)
    """Timeout of every collective under torchrun: a rank that waits longer for the others
    fails with an error instead of hanging (docs/SCALING.md §6)."""

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, recipe: str) -> str:
        if registry.find_recipe(recipe) is None:
            raise ValueError(registry.unknown_recipe(recipe))
        return recipe


class Rho1Config(Section):
    """``weighting.rho1``: Rho-1 selection by excess loss against a frozen tuned reference."""

    reference: str | None = None
    """The reference: a ``reference`` recipe's checkpoint (or its experiment/run folder)."""
    k_percent: float = Field(default=0.7, gt=0, le=1)
    """Fraction of a micro-batch's target tokens selected."""
    score: Literal["signed", "absolute", "difficult"] = "signed"
    """``policy CE - reference CE``, its absolute value, or the reference CE alone."""
    precompute: bool = False
    """Compute the reference's per-token CE of every example once, before training (cached
    under ``storage/cache/reference_ce/``), and free the reference."""


class VerifiableConfig(Section):
    """``weighting.verifiable`` (old name ``weighting.critic_td``): Verifiable Critic weights,
    GAE of a frozen critic's values, EMA-whitened, ``clamp(exp(A / beta), clip_min, clip_max)``
    (docs/METHOD.md §4)."""

    critic_checkpoint: str | None = None
    """The critic: a ``critic`` checkpoint (or its experiment/run folder)."""
    td_lambda: float = Field(default=0.95, ge=0, le=1)
    gamma: float = Field(default=1.0, ge=0, le=1)
    beta: float = Field(default=1.0, gt=0)
    clip_min: float = 0.1
    clip_max: float = 3.0
    ema_momentum: float = Field(default=0.1, gt=0, le=1)
    ema_rule: Literal["bias_corrected", "upstream"] = "bias_corrected"
    """Bias-corrected EMA of the first two moments, or the upstream warmup blend."""
    ema_warmup: int = Field(default=10, ge=1)
    """Steps of the upstream rule's warmup blend."""
    initial_value: float = 0.5
    """``v_{-1}``: the value before the first position in the GAE recursion."""
    precompute: bool = False
    """Compute the critic's values of every example once, before training (cached under
    ``storage/cache/critic_values/``), and free the critic."""

    @model_validator(mode="after")
    def _clip_order(self) -> VerifiableConfig:
        if self.clip_min > self.clip_max:
            raise ValueError(f"clip_min {self.clip_min} > clip_max {self.clip_max}")
        return self


CriticTDConfig = VerifiableConfig
"""The section's class name before 2026-12-07, kept for old imports."""


class WeightingConfig(Section):
    """The per-token weighting of a policy recipe: which one, its control arm, and one section
    of knobs per weighting (``weighting.<name>``), each with its own defaults.

    Every section is validated against the weighting registry (``weighted_mtp/registry.py``):
    the built-in ones are the fields below, a weighting registered by another package (entry
    point ``weighted_mtp.weightings``) brings its own ``Settings`` class, and an unknown section
    is an error. The registry sits below this module, so every command validates the same way
    whatever it imported first (docs/ARCHITECTURE.md, "The weighting registry")."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str | None = None
    """A registered weighting (or an old name of one, ``registry.WEIGHTING_ALIASES``, kept as
    written); None uses the recipe's own (``uniform``; the aliases ``rho1`` and ``verifiable``
    their weightings, ``registry.ALIASES``)."""
    control: Literal["none", "shuffled", "random_matched"] = "none"
    """Control arms: the same weights moved to other tokens (``shuffled`` within each
    sequence) or random weights matched in distribution (``random_matched``), applied to any
    weighting's output (``train/weighting/controls.py``, docs/METHOD.md §6)."""
    rho1: Rho1Config = Rho1Config()
    verifiable: VerifiableConfig = VerifiableConfig()

    @model_validator(mode="before")
    @classmethod
    def _old_section_names(cls, data: Any) -> Any:
        """A section under an old weighting name (``weighting.critic_td``) is that weighting's
        section; giving both is an error."""
        if not isinstance(data, dict):
            return data
        for old, new in registry.WEIGHTING_ALIASES.items():
            if old in data:
                if new in data:
                    raise ValueError(
                        f"weighting.{old} is the old name of weighting.{new}: give one of them"
                    )
                data = {(new if k == old else k): v for k, v in data.items()}
        return data

    @field_validator("name")
    @classmethod
    def _registered_name(cls, name: str | None) -> str | None:
        if name is not None and registry.get(name) is None:
            raise ValueError(registry.unknown_weighting(name))
        return name

    @model_validator(mode="after")
    def _registered_sections(self) -> WeightingConfig:
        extra = self.__pydantic_extra__ or {}
        for key, value in extra.items():
            settings = registry.settings_of(key)
            if settings is None:
                raise ValueError(
                    f"unknown weighting section {key!r} (no registered weighting has it)"
                )
            if not isinstance(value, settings):
                try:
                    extra[key] = settings.model_validate(value)
                except ValidationError as err:
                    first = err.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    if first["type"] == "extra_forbidden":
                        raise ValueError(f"unknown config key 'weighting.{key}.{where}'") from None
                    raise ValueError(f"{key}.{where}: {first['msg']}") from None
        return self

    def settings(self, name: str, default: type[BaseModel] | None) -> BaseModel | None:
        """The section of weighting ``name`` or of the weighting it is an old name of (its
        defaults when the config has none)."""
        section = getattr(self, registry.canonical_weighting(name), None)
        if isinstance(section, BaseModel):
            return section
        return default() if default is not None else None


class CriticConfig(Section):
    """The value model trained by the ``critic`` recipe (docs/METHOD.md §3)."""

    head_type: Literal["linear", "sigmoid", "mlp"] = "mlp"
    head_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias_init: float = 0.0
    head_lr: float = Field(default=1e-4, gt=0)
    loss: Literal["pairwise", "lambda_return", "mc"] = "pairwise"
    loss_coef: float = 1.0
    lambda_schedule: Literal["constant", "linear", "cosine"] = "constant"
    lambda_start: float = Field(default=1.0, ge=0, le=1)
    lambda_end: float = Field(default=0.95, ge=0, le=1)
    lambda_hold_steps: int = Field(default=250, ge=0)
    lambda_decay_steps: int = Field(default=500, ge=0)
    huber_delta: float | None = 0.5
    """None selects squared error for the regression losses."""
    train_backbone: bool = True
    """LoRA on the backbone (``lora`` section); False trains the head only."""


class CheckpointConfig(Section):
    every: int = Field(default=500, ge=1)
    keep_last: int = Field(default=2, ge=1)
    resume: bool | Literal["auto"] = False
    """Continue from the run's newest step checkpoint. ``true``: that of ``run_name`` (without
    one, of the experiment's newest run); ``auto``: only with a ``run_name`` whose folder holds
    one, else a fresh start (what a requeued job wants, docs/SCALING.md §6)."""
    best_metric: str | None = None
    """Also keep ``best/``: the checkpoint with the best value of this validation metric."""
    best_mode: Literal["min", "max"] = "min"


class LogConfig(Section):
    every: int = Field(default=10, ge=1)
    val_every: int = Field(default=500, ge=1)
    mlflow: bool = True
    mlflow_tracking_uri: str | None = None
    """Default: a sqlite store under the storage root."""
    token_weights: int = Field(default=3, ge=0)
    """Validation examples whose per-token, per-head weights go to ``token_weights.jsonl`` at
    every validation (the report's heat maps); 0 turns it off."""
    placement_examples: int = Field(default=200, ge=0)
    """Incorrect validation solutions with a mutation span whose token scores are placed
    against the span at every validation (``val/placement/*``, docs/METHOD.md §6, "Where the weight goes"), for
    weightings that rank tokens; 0 turns it off. Data without spans costs nothing."""


class Config(Section):
    experiment: str = "baseline"
    run_name: str | None = None
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    weighting: WeightingConfig = WeightingConfig()
    critic: CriticConfig = CriticConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()


# ---- loading ----


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key, by dotted path."""


def _yaml_with_lines(text: str, source: str) -> tuple[dict, dict[str, int]]:
    try:
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                lines[path] = key.start_mark.line + 1
                walk(value, path)

    if node is not None:
        walk(node, "")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the top level must be a mapping of sections")
    return data, lines


def _parse_value(raw: str) -> Any:
    """Parse an override value with YAML rules: ``3`` int, ``1e-4`` float, ``[a,b]`` list."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # PyYAML reads "1e-4" as a string (YAML 1.1); users mean a float.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override to the nested dict ``data`` in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.path=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = _parse_value(raw.strip())


def _format_error(err: ValidationError, lines: dict[str, int], source: str) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    where = f"{source}:{lines[path]}: " if path in lines else ""
    if not path:  # a check across keys (a model validator): its message names them
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    if first["type"] == "extra_forbidden":
        return f"{where}unknown config key '{path}'"
    if first["type"] == "value_error" and isinstance(first.get("input"), dict):
        # A section's own check (a weighting section validated through the registry): its
        # message names the key; the section's whole input would not fit on one line.
        message = first["msg"].removeprefix("Value error, ")
        if message.startswith("unknown config key '"):
            key = message.split("'")[1]
            return f"{source}:{lines[key]}: {message}" if key in lines else message
        return f"{where}config key '{path}': {message}"
    return f"{where}config key '{path}': {first['msg']} (got {first.get('input')!r})"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file's differences, then ``key=value`` overrides."""
    return load_validated(Config, path, overrides)


M = TypeVar("M", bound=BaseModel)


def load_validated(
    model: type[M], path: str | Path | None = None, overrides: list[str] | None = None
) -> M:
    """A YAML file (or nothing) validated as ``model`` after ``key=value`` overrides; errors
    are one line with the key and, for keys read from the file, ``file:line``."""
    data: dict = {}
    lines: dict[str, int] = {}
    source = "<overrides>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        source = str(path)
        data, lines = _yaml_with_lines(path.read_text(encoding="utf-8"), source)
    for item in overrides or []:
        apply_override(data, item)
        lines.pop(item.split("=", 1)[0].strip(), None)
    _lines_of_old_sections(lines)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, lines, source)) from None


def _lines_of_old_sections(lines: dict[str, int]) -> None:
    """A section written under an old weighting name is validated under its new one: its keys'
    lines go under the new name too, so an error there still names ``file:line``."""
    for old, new in registry.WEIGHTING_ALIASES.items():
        prefix = f"weighting.{old}"
        for key in [k for k in lines if k == prefix or k.startswith(prefix + ".")]:
            lines.setdefault(f"weighting.{new}{key[len(prefix) :]}", lines[key])


def config_to_dict(config: Config) -> dict:
    """Plain dict (JSON/YAML friendly) of the full, resolved config."""
    return config.model_dump(mode="json")


# Keys of a run's config.yaml that may differ from a plan without making it another run.
IGNORED_KEYS = ("log", "checkpoint.resume")


def _flatten_keys(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten_keys(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def resolve_aliases(data: dict) -> dict:
    """A config dict with its aliases replaced by what they stand for (``registry.ALIASES``,
    ``registry.WEIGHTING_ALIASES``): ``train.recipe`` by its recipe, ``weighting.name`` by the
    weighting the run uses, a section under an old weighting name by that weighting's, and
    ``model.n_future_tokens`` by the heads of a recipe that fixes them. Two configs that train
    alike give the same dict; only comparisons use it (a run's ``config.yaml`` keeps what was
    written)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    train, weighting, model = out.get("train"), out.get("weighting"), out.get("model")
    if isinstance(weighting, dict):
        for old, new in registry.WEIGHTING_ALIASES.items():
            if old in weighting and new not in weighting:
                weighting[new] = weighting.pop(old)
            if weighting.get("name") == old:
                weighting["name"] = new
    recipe = train.get("recipe") if isinstance(train, dict) else None
    found = registry.find_recipe(recipe) if isinstance(recipe, str) else None
    if isinstance(train, dict) and found is not None:
        train["recipe"] = found.recipe
        if isinstance(weighting, dict) and found.weighting is not None:
            weighting["name"] = registry.weighting_of(recipe, weighting.get("name"))
        if isinstance(model, dict) and found.n_heads is not None:
            model["n_future_tokens"] = found.n_heads
    return out


def config_differences(planned: dict, found: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts (``IGNORED_KEYS`` aside), their
    aliases resolved first (``resolve_aliases``): a run folder written under an old name is the
    run a plan now names the new way."""
    a, b = _flatten_keys(resolve_aliases(planned)), _flatten_keys(resolve_aliases(found))
    keys = sorted(set(a) | set(b))
    return [
        k
        for k in keys
        if not any(k == i or k.startswith(i + ".") for i in IGNORED_KEYS) and a.get(k) != b.get(k)
    ]


def config_diff(config: Config) -> dict:
    """Only the values that differ from the defaults (what a YAML file would hold)."""
    return config.model_dump(mode="json", exclude_defaults=True)
