"""``wmtp storage micro-base``: micro models that have learned (docs/DATA.md §7).

The random micro models (``storage/micro.py``) cannot solve anything, so every policy the
quickstart trains from them scores 0 and their extra heads draft noise. This step pretrains
both micro starting points, all parameters, on the correct solutions of the CodeContests
``train`` split (the known-answer records of ``wmtp storage synthetic``), with a tokenizer
trained on that same text, and writes them where the random ones live
(``models/micro-mtp``, ``models/micro-reference``: same files, same formats), so every other
command loads them unchanged.

The recipe (docs/DATA.md §7): Alpaca prompt (BOS + ``format_prompt(instruction)``) and the
solution + EOS, encoded as the training loop encodes examples, but with the prompt's tokens as
targets too (``train_prompt``: a base model reads whole documents); the MTP model's loss is
the mean of its heads' cross-entropies (head k predicts the token k positions ahead), the
reference's is plain next-token cross-entropy; AdamW with linear warm-up and a cosine decay,
gradient clipping, length-grouped batches drawn from the seed. Same seed, same data and the
same number of threads give the same weights.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from weighted_mtp.base.errors import MissingInputError, UserError
from weighted_mtp.base.io import StorageError, write_json_atomic
from weighted_mtp.base.layout import ModelPaths, StorageLayout
from weighted_mtp.data.alpaca import format_prompt
from weighted_mtp.data.collate import (
    IGNORE_INDEX,
    Batch,
    EncodedExample,
    collate,
    encode_example,
    length_grouped_batches,
)
from weighted_mtp.data.jsonl import iter_jsonl
from weighted_mtp.models.checkpoints import load_pretrained
from weighted_mtp.models.tokenizer import Tokenizer, train_local_tokenizer
from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights
from weighted_mtp.storage.micro import shape_metadata, write_micro_weights
from weighted_mtp.storage.tokenizer_folder import write_tokenizer_folder

DATASET = "codecontests"
CREATED_BY = "wmtp storage micro-base"
REFERENCE_FROM = ("mtp", "scratch")


@dataclass(frozen=True)
class MicroBaseConfig:
    """Sizes and schedule of the pretraining (defaults: docs/DATA.md §7)."""

    dim: int = 128
    trunk_layers: int = 3
    """MTP trunk blocks; the reference has ``trunk_layers + 1`` blocks (head 1's depth)."""
    n_future_tokens: int = 4
    attention_heads: int = 4
    ffn_hidden_dim: int = 352
    vocab_size: int = 1024
    max_length: int = 512
    batch_size: int = 4
    steps: int = 900
    """Optimizer steps of the MTP model."""
    reference_steps: int = 900
    """Optimizer steps of the reference when ``reference_from`` is ``scratch``."""
    reference_from: str = "mtp"
    """``mtp``: micro-reference is the head-1 path of the pretrained micro-mtp (its trunk, head 1
    block, final norm and output matrix), no second pretraining; ``scratch``: the reference is
    pretrained on its own for ``reference_steps`` (docs/DATA.md §7)."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    train_prompt: bool = True
    """Targets on the prompt's tokens too (a base model reads whole documents), not only on
    the solution: three times the supervised tokens per forward pass (docs/DATA.md §7)."""
    max_problems: int | None = None
    """Use only the first N training problems (tests use a handful)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("dim", "trunk_layers", "n_future_tokens", "attention_heads",
                     "ffn_hidden_dim", "batch_size", "steps", "reference_steps"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.reference_from not in REFERENCE_FROM:
            problems.append(f"reference_from must be one of {', '.join(REFERENCE_FROM)}")
        if self.vocab_size < 300:
            problems.append("vocab_size must be >= 300 (256 byte pieces + specials + merges)")
        if self.dim % self.attention_heads or (self.dim // self.attention_heads) % 2:
            problems.append("dim must be a multiple of attention_heads with an even head size")
        if problems:
            raise UserError("micro-base: " + "; ".join(problems))

    def model_args(self, micro_type: str) -> ModelArgs:
        n_future = self.n_future_tokens if micro_type == "mtp" else 1
        return ModelArgs(
            dim=self.dim,
            n_layers=self.trunk_layers + n_future if micro_type == "mtp" else self.trunk_layers + 1,
            n_heads=self.attention_heads,
            n_kv_heads=self.attention_heads,
            vocab_size=self.vocab_size,
            ffn_hidden_dim=self.ffn_hidden_dim,
            norm_eps=1e-5,
            rope_theta=10000.0,
            max_seq_len=2048,
            n_future_tokens=n_future,
        )


@dataclass
class PretrainResult:
    """What one model's pretraining did (its ``metadata.json`` holds the same)."""

    micro_type: str
    paths: ModelPaths
    steps: int
    first_loss: float
    final_loss: float
    final_head_losses: list[float]
    seconds: float
    tokens: int
    skipped: bool = False


# ---- data ----


def training_records(layout: StorageLayout, max_problems: int | None = None) -> list[dict]:
    """The correct solutions of the CodeContests ``train`` split, in file order."""
    path = layout.dataset(DATASET).split("train")
    if not path.is_file():
        raise MissingInputError(
            f"{path}: missing; build it with `wmtp storage synthetic --out DIR` then "
            f"`wmtp storage datasets --datasets {DATASET} --source DIR`"
        )
    records, problems = [], []
    for record in iter_jsonl(path):
        problem = record.get("metadata", {}).get("problem_id")
        if problem not in problems:
            if max_problems is not None and len(problems) >= max_problems:
                break
            problems.append(problem)
        if record.get("is_correct"):
            records.append(record)
    if not records:
        raise UserError(f"{path}: no correct solutions to pretrain on")
    return records


def corpus_texts(records: list[dict]) -> list[str]:
    """The templated texts (prompt + solution) the tokenizer is trained on."""
    return [format_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in records]


def _sha256_texts(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


# ---- training ----


def _lr_at(step: int, config: MicroBaseConfig, total: int) -> float:
    """Linear warm-up to ``lr`` then cosine down to ``min_lr_ratio * lr`` (step is 0-based)."""
    warmup = min(config.warmup_steps, max(1, total // 10))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def mtp_losses(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each head ``[n]``: head k (0-based) at position t predicts
    ``labels[t + 1 + k]`` (docs/METHOD.md §1 with all weights 1). Only positions with a
    target are unembedded: the prompt costs the trunk, not the output matrix."""
    hidden = model.trunk(tokens)
    length = tokens.shape[1]
    losses = []
    for k in range(model.n_future_tokens):
        z = model.head_hidden(hidden, k)[:, : length - 1 - k]
        target = labels[:, 1 + k :]
        keep = target != IGNORE_INDEX
        logits = model.unembed(z[keep])
        losses.append(F.cross_entropy(logits.float(), target[keep]))
    return torch.stack(losses)


def _targets(batch: Batch, config: MicroBaseConfig) -> torch.Tensor:
    """The labels pretraining scores: with ``train_prompt`` every real token but BOS."""
    if not config.train_prompt:
        return batch.labels
    labels = batch.tokens.masked_fill(batch.attention_mask == 0, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    return labels


def _optimizer(model: Transformer, config: MicroBaseConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip


def train_model(
    micro_type: str,
    examples: list[EncodedExample],
    config: MicroBaseConfig,
    pad_id: int,
    steps: int,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Transformer, dict[str, Any]]:
    """Pretrain one micro model from Xavier initialisation; returns it and its loss history."""
    args = config.model_args(micro_type)
    torch.manual_seed(config.seed)
    model = Transformer(args)
    init_weights(model, seed=config.seed)
    model.train()
    optimizer = _optimizer(model, config)
    lengths = [e.length for e in examples]
    batches: list[list[int]] = []
    epoch = 0
    history: list[float] = []
    tokens = 0
    head_losses = torch.zeros(args.n_future_tokens)
    for step in range(steps):
        if not batches:
            batches = length_grouped_batches(lengths, config.batch_size, config.seed, epoch)
            batches = [b for b in batches if len(b) == config.batch_size] or batches
            epoch += 1
        batch = collate([examples[i] for i in batches.pop(0)], pad_id)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config, steps)
        losses = mtp_losses(model, batch.tokens, _targets(batch, config))
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        history.append(float(loss.detach()))
        head_losses = losses.detach()
        tokens += int(batch.attention_mask.sum())
        if on_step is not None:
            on_step(step, history[-1])
    model.eval()
    # The final loss is the mean of the last 10% of steps (a single batch is noisy).
    tail = history[-max(1, steps // 10) :]
    return model, {
        "history": history,
        "first_loss": history[0],
        "final_loss": sum(tail) / len(tail),
        "final_head_losses": [float(x) for x in head_losses],
        "final_loss_rule": "mean loss of the last 10% of steps",
        "steps": steps,
        "tokens": tokens,
        "epochs": round(steps * config.batch_size / len(examples), 2),
    }


# ---- writing ----


def _write_model(
    paths: ModelPaths, micro_type: str, model: Transformer, tokenizer_model: Path, meta: dict
) -> None:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_micro_weights(paths, micro_type, model.args, state)
    write_tokenizer_folder(tokenizer_model, paths, force=True)
    write_json_atomic(paths.metadata, meta)


def _recipe(config: MicroBaseConfig, data_sha256: str) -> dict:
    return {**asdict(config), "data_sha256": data_sha256}


def _up_to_date(paths: ModelPaths, recipe: dict) -> bool:
    if not (paths.weights.is_file() and paths.metadata.is_file() and paths.tokenizer.is_file()):
        return False
    meta = json.loads(paths.metadata.read_text())
    return meta.get("init") == "pretrained" and meta.get("recipe") == recipe


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), transient=True,
        disable=not enabled,
    )  # fmt: skip


def _train_with_progress(
    micro_type: str,
    examples: list[EncodedExample],
    config: MicroBaseConfig,
    pad_id: int,
    steps: int,
    progress: bool,
) -> tuple[Transformer, dict[str, Any], float]:
    t0 = time.perf_counter()
    every = max(1, steps // 10)
    with _progress(progress) as bar:
        task = bar.add_task(f"micro-{micro_type}", total=steps, loss=float("nan"))

        def on_step(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1, loss=loss)
            if (step + 1) % every == 0:  # a line per 10%: logs of non-interactive runs
                print(f"  step {step + 1}/{steps} loss {loss:.3f} "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip

        model, stats = train_model(micro_type, examples, config, pad_id, steps, on_step=on_step)
    return model, stats, time.perf_counter() - t0


def _metadata(
    paths: ModelPaths,
    micro_type: str,
    model: Transformer,
    config: MicroBaseConfig,
    recipe: dict,
    tokenizer_info: dict,
    data: dict,
    stats: dict[str, Any],
) -> dict[str, Any]:
    args = model.args
    derived = micro_type == "reference" and config.reference_from == "mtp"
    if micro_type == "mtp":
        blocks = (
            f"layers.0-{args.n_trunk_layers - 1}: shared trunk; layers.{args.n_trunk_layers}: "
            f"head 1; extra_heads.0-{args.n_future_tokens - 2}: heads 2-{args.n_future_tokens}"
        )
    else:
        blocks = (
            f"layers.0-{args.n_layers - 1}: a plain {args.n_layers}-layer LLaMA (Hugging Face "
            "names)" + ("; micro-mtp's trunk and head-1 block" if derived else "")
        )
    if micro_type == "mtp":
        objective = "mean over heads of the cross-entropy, head k predicting t+k"
    elif derived:
        objective = (
            "none of its own: the head-1 path of micro-mtp, trained by micro-mtp's objective"
        )
    else:
        objective = "next-token cross-entropy"
    meta = {
        "name": paths.root.name,
        "micro_type": micro_type,
        "init": "pretrained",
        "seed": config.seed,
        "init_rule": "xavier_uniform on matrices, ones on norms, then pretrained (all parameters)",
        "source_model": "micro-mtp (head-1 path: trunk, head-1 block, norm, output)"
        if derived
        else None,
        "blocks": blocks,
        **shape_metadata(args, micro_type, sum(p.numel() for p in model.parameters())),
        "sizes": {
            "dim": args.dim,
            "ffn_hidden_dim": args.hidden_dim,
            "attention_heads": args.n_heads,
            "vocab_size": args.vocab_size,
        },
        "tokenizer": tokenizer_info,
        "data": data,
        "objective": objective,
        "recipe": recipe,
        "steps": stats["steps"],
        "epochs": stats["epochs"],
        "tokens_seen": stats["tokens"],
        "first_loss": round(stats["first_loss"], 4),
        "final_loss": round(stats["final_loss"], 4),
        "final_loss_rule": stats["final_loss_rule"],
        "final_head_losses": [round(x, 4) for x in stats["final_head_losses"]],
        "loss_every_10_steps": [round(x, 4) for x in stats["history"][::10]],
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "created_by": CREATED_BY,
    }
    return meta


PROBE_EXAMPLES = 64
"""Training examples on which a derived reference's next-token loss is measured."""


@torch.no_grad()
def derive_reference(
    mtp: Transformer, config: MicroBaseConfig, examples: list[EncodedExample], pad_id: int
) -> tuple[Transformer, dict[str, Any], float]:
    """micro-reference as the head-1 path of ``mtp``: the same embedding, trunk blocks, head-1
    block, final norm and output matrix in a one-head model, so its logits are head 1's
    (docs/DATA.md §7). Returns the model, its statistics (next-token loss on the first
    :data:`PROBE_EXAMPLES` training examples, prompt included when ``train_prompt``) and the
    seconds taken."""
    t0 = time.perf_counter()
    model = Transformer(config.model_args("reference"))
    state = {k: v.detach().clone() for k, v in mtp.state_dict().items()
             if not k.startswith("extra_heads.")}  # fmt: skip
    model.load_state_dict(state)
    model.eval()
    probe = examples[:PROBE_EXAMPLES]
    total, count = 0.0, 0
    for i in range(0, len(probe), config.batch_size):
        batch = collate(probe[i : i + config.batch_size], pad_id)
        labels = _targets(batch, config)
        loss = mtp_losses(model, batch.tokens, labels)[0]
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total, count = total + float(loss) * n, count + n
    loss = total / max(count, 1)
    stats = {
        "steps": 0, "epochs": 0.0, "tokens": 0, "history": [loss], "first_loss": loss,
        "final_loss": loss, "final_head_losses": [loss], "probe_examples": len(probe),
        "final_loss_rule": f"next-token loss on the first {len(probe)} training examples",
    }  # fmt: skip
    return model, stats, time.perf_counter() - t0


def _pretrained_mtp(layout: StorageLayout, recipe: dict) -> Transformer:
    """The micro-mtp of this recipe already in storage (a reference derived from it alone)."""
    paths = layout.model("micro-mtp")
    if not _up_to_date(paths, recipe):
        raise UserError(
            f"{paths.root}: micro-reference is derived from micro-mtp pretrained with the same "
            "recipe; pretrain micro-mtp first (drop --only reference), or pass "
            "--reference-from scratch"
        )
    return load_pretrained(paths.root)


def pretrained(layout: StorageLayout, config: MicroBaseConfig | None = None) -> bool:
    """Whether both micro models were pretrained with ``config``'s recipe on the CodeContests
    train split now in ``layout`` (what ``pretrain_micro_base`` would skip)."""
    config = config or MicroBaseConfig()
    try:
        _, _, recipe = _corpus_and_recipe(layout, config)
    except (MissingInputError, UserError):
        return False
    return all(_up_to_date(layout.model(f"micro-{t}"), recipe) for t in ("mtp", "reference"))


def _corpus_and_recipe(
    layout: StorageLayout, config: MicroBaseConfig
) -> tuple[list[dict], list[str], dict]:
    """The training records, their templated texts and the recipe they make with ``config``
    (what a pretrained model's metadata must record to be up to date)."""
    records = training_records(layout, config.max_problems)
    texts = corpus_texts(records)
    return records, texts, _recipe(config, _sha256_texts(texts))


def pretrain_micro_base(
    layout: StorageLayout,
    config: MicroBaseConfig | None = None,
    *,
    micro_types: tuple[str, ...] = ("mtp", "reference"),
    force: bool = False,
    progress: bool = True,
) -> dict[str, PretrainResult]:
    """Pretrain ``models/micro-mtp`` and ``models/micro-reference`` on the CodeContests train
    split of ``layout`` and write them (weights, checksums, config, tokenizer, metadata).

    A model whose ``metadata.json`` already records this recipe on the same data is skipped
    (``force`` redoes it). Both models share one tokenizer, trained first on the corpus.
    """
    config = config or MicroBaseConfig()
    unknown = set(micro_types) - {"mtp", "reference"}
    if unknown or not micro_types:
        raise UserError(f"micro-base: micro types are mtp and reference, got {sorted(unknown)}")
    records, texts, recipe = _corpus_and_recipe(layout, config)
    todo = [t for t in micro_types if force or not _up_to_date(layout.model(f"micro-{t}"), recipe)]
    results: dict[str, PretrainResult] = {}
    for micro_type in micro_types:
        if micro_type not in todo:
            paths = layout.model(f"micro-{micro_type}")
            meta = json.loads(paths.metadata.read_text())
            print(f"  {paths.root}: already pretrained with this recipe; --force redoes it")
            results[micro_type] = PretrainResult(
                micro_type, paths, meta["steps"], meta["first_loss"], meta["final_loss"],
                meta["final_head_losses"], meta["wall_seconds"], meta["tokens_seen"], True,
            )  # fmt: skip
    if not todo:
        return results

    staging = layout.models_dir / ".micro-base-tokenizer" / "tokenizer.model"
    started = time.perf_counter()
    corpus = train_local_tokenizer(staging, vocab_size=config.vocab_size, texts=texts)
    tokenizer = Tokenizer(staging)
    tokenizer_seconds = time.perf_counter() - started
    examples = [
        e
        for r in records
        if (e := encode_example(tokenizer, r["instruction"], r.get("input", ""), r["output"],
                                config.max_length)) is not None
    ]  # fmt: skip
    if not examples:
        raise UserError(f"micro-base: every example is longer than {config.max_length} tokens")
    tokenizer_info = {
        "origin": "trained on the pretraining corpus (CodeContests train, correct solutions)",
        "algorithm": "SentencePiece BPE, byte fallback, <unk> <s> </s> = 0 1 2, whitespace kept, "
        "digits split",
        "vocab_size": tokenizer.vocab_size,
        "corpus": "Alpaca prompt + solution of each record, in file order",
        "corpus_records": corpus.corpus_files,
        "corpus_bytes": corpus.corpus_bytes,
        "corpus_sha256": corpus.corpus_sha256,
        "seconds": round(tokenizer_seconds, 2),
    }
    threads = torch.get_num_threads()
    trained: dict[str, Transformer] = {}
    for micro_type in todo:
        paths = layout.model(f"micro-{micro_type}")
        if micro_type == "reference" and config.reference_from == "mtp":
            mtp = trained.get("mtp") or _pretrained_mtp(layout, recipe)
            model, stats, seconds = derive_reference(mtp, config, examples, tokenizer.pad_id)
            print(f"[micro-reference] the head-1 path of micro-mtp (no second pretraining): "
                  f"next-token loss {stats['final_loss']:.3f} on {stats['probe_examples']} "
                  "training examples", flush=True)  # fmt: skip
        else:
            steps = config.steps if micro_type == "mtp" else config.reference_steps
            print(
                f"[micro-{micro_type}] pretraining {steps} steps on {len(examples)} examples "
                f"({DATASET} train, correct solutions), {threads} threads",
                flush=True,
            )
            model, stats, seconds = _train_with_progress(
                micro_type, examples, config, tokenizer.pad_id, steps, progress
            )
            trained[micro_type] = model
            print(
                f"  micro-{micro_type}: loss {stats['first_loss']:.3f} -> "
                f"{stats['final_loss']:.3f} in {seconds:.0f} s "
                f"({stats['tokens'] / max(seconds, 1e-9):.0f} tokens/s)",
                flush=True,
            )
        data = {
            "dataset": f"datasets/{DATASET}/processed/train.jsonl",
            "selection": "correct solutions (is_correct), EOS trained, "
            + ("prompt tokens are targets too" if config.train_prompt else "prompt masked"),
            "records": len(records),
            "examples": len(examples),
            "dropped_over_max_length": len(records) - len(examples),
            "sha256": recipe["data_sha256"],
        }
        meta = _metadata(paths, micro_type, model, config, recipe, tokenizer_info, data, stats)
        meta.update(wall_seconds=round(seconds, 1), threads=threads)
        _write_model(paths, micro_type, model, staging, meta)
        results[micro_type] = PretrainResult(
            micro_type, paths, stats["steps"], stats["first_loss"], stats["final_loss"],
            stats["final_head_losses"], seconds, stats["tokens"],
        )  # fmt: skip
    staging.unlink()
    try:
        staging.parent.rmdir()
    except OSError as err:
        raise StorageError(f"{staging.parent}: could not remove the staging folder: {err}") from err
    return results
