"""``wmtp storage micro-base``: micro models that have learned (docs/DATA.md §7).

The random micro models (``storage/micro.py``) cannot solve anything, so every policy the
quickstart trains from them scores 0 and their extra heads draft noise. This step pretrains
both micro starting points, all parameters, on the correct solutions of the CodeContests
``train`` split (the known-answer records of ``wmtp storage synthetic``), with a tokenizer
trained on that same text, and writes them where the random ones live
(``models/micro-mtp``, ``models/micro-reference``: same files, same formats), so every other
command loads them unchanged.

The pretraining is a run of the training loop (``train/loop.py``) with the ``pretrain`` recipe
(``train/recipes.py``): the schedule, the loss and the optimiser of every other recipe. This
module only prepares its inputs and takes its result (docs/DATA.md §7): a tokenizer trained on
the corpus, the corpus as a one-split dataset, a random model of the micro-base shape with that
tokenizer, all in ``<storage>/cache/micro-base/`` (removed afterwards); then the run's final
weights go to ``models/micro-<type>`` with a ``metadata.json``. The reference is micro-mtp's
head-1 path unless ``reference_from`` is ``scratch``. Same seed, same data and the same number
of threads give the same weights.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from weighted_mtp.base.errors import MissingInputError, UserError
from weighted_mtp.base.io import write_json_atomic
from weighted_mtp.base.layout import ModelPaths, StorageLayout
from weighted_mtp.config import Config, config_diff
from weighted_mtp.data.alpaca import format_prompt
from weighted_mtp.data.collate import EncodedExample, collate, encode_example
from weighted_mtp.data.jsonl import JsonlWriter, index_path_for, iter_jsonl
from weighted_mtp.models.checkpoints import load_pretrained
from weighted_mtp.models.tokenizer import Tokenizer, train_local_tokenizer
from weighted_mtp.models.transformer import ModelArgs, Transformer, init_weights
from weighted_mtp.storage.micro import shape_metadata, write_micro_weights
from weighted_mtp.storage.tokenizer_folder import write_tokenizer_folder
from weighted_mtp.train.checkpoint import load_tensors
from weighted_mtp.train.loop import prompt_targets, train
from weighted_mtp.train.mtp_loss import mtp_forward_backward

DATASET = "codecontests"
CREATED_BY = "wmtp storage micro-base"
REFERENCE_FROM = ("mtp", "scratch")
CORPUS = "pretrain-corpus"
"""The corpus as a dataset of the work folder: its ``train`` split is what the run reads."""


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
    """At most a tenth of the run's steps (a short test run warms up for 10% of it)."""
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


# ---- the training run's inputs: <storage>/cache/micro-base/ ----


def work_layout(layout: StorageLayout) -> StorageLayout:
    """The storage tree the pretraining run reads and writes (docs/DATA.md §7): the corpus as
    ``datasets/pretrain-corpus``, the random models under ``models/``, the run under
    ``checkpoints/pretrain/``; removed once the models are written."""
    return StorageLayout(layout.root / "cache" / "micro-base")


def write_corpus(work: StorageLayout, records: list[dict]) -> None:
    """The training records as the ``train`` split of :data:`CORPUS`: the JSONL, its line index
    and a problem map that lists every line (sampling mode ``all`` reads them all)."""
    paths = work.dataset(CORPUS)
    split = paths.split("train")
    with JsonlWriter(split, index_path_for(split)) as writer:
        for r in records:
            writer.write({"instruction": r["instruction"], "input": r.get("input", ""),
                          "output": r["output"], "task_id": r.get("task_id")})  # fmt: skip
    problem_map: dict[str, dict[str, Any]] = {}
    for line, record in enumerate(records):
        problem = record.get("metadata", {}).get("problem_id") or str(line)
        problem_map.setdefault(problem, {"difficulty": None, "indices": []})["indices"].append(line)
    write_json_atomic(paths.split_metadata("train"), {"problem_index_map": problem_map})


def write_random_model(
    work: StorageLayout, micro_type: str, config: MicroBaseConfig, tokenizer_model: Path
) -> ModelPaths:
    """The model the run starts from: Xavier initialisation from ``config.seed`` in the micro
    models' format (``storage/micro.py``), with the corpus tokenizer."""
    args = config.model_args(micro_type)
    torch.manual_seed(config.seed)
    model = Transformer(args)
    init_weights(model, seed=config.seed)
    paths = work.model(f"random-micro-{micro_type}")
    write_micro_weights(paths, micro_type, args, model.state_dict())
    paths.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_model, paths.tokenizer)
    return paths


def pretrain_config(
    config: MicroBaseConfig, micro_type: str, n_records: int, progress: bool = True
) -> Config:
    """The training loop's config of one micro model's pretraining (docs/DATA.md §7)."""
    steps = config.steps if micro_type == "mtp" else config.reference_steps
    return Config.model_validate({
        "experiment": "pretrain",
        "run_name": f"micro-{micro_type}",
        "model": {"path": f"random-micro-{micro_type}", "dtype": "float32"},
        "lora": {"enabled": False},
        "data": {"dataset": CORPUS, "max_length": config.max_length,
                 "train_prompt": config.train_prompt,
                 "sampling": {"mode": "all", "n_samples": n_records, "val_n_samples": 0,
                              "seed": config.seed}},
        "optim": {"lr": config.lr, "betas": (0.9, 0.95), "weight_decay": config.weight_decay,
                  "weight_decay_on": "matrices", "max_grad_norm": config.grad_clip,
                  "schedule": "cosine", "warmup_steps": min(config.warmup_steps,
                                                            max(1, steps // 10)),
                  "min_lr_ratio": config.min_lr_ratio},
        # Epochs only bound the run: every epoch has at least one batch, max_steps decides.
        "train": {"recipe": "pretrain", "epochs": float(steps), "max_steps": steps,
                  "batch_size": config.batch_size, "grad_accum": 1, "seed": config.seed,
                  "device": "cpu"},
        "checkpoint": {"every": steps},  # the final checkpoint only
        # A console line at each tenth of the run (every step reaches ``on_step``).
        "log": {"every": max(1, steps // 10) if progress else steps, "mlflow": False,
                "token_weights": 0, "placement_examples": 0},
    })  # fmt: skip


def run_pretraining(
    work: StorageLayout,
    micro_type: str,
    config: MicroBaseConfig,
    tokenizer_model: Path,
    n_records: int,
    progress: bool = True,
) -> tuple[Transformer, dict[str, Any], float]:
    """Pretrain one micro model with the training loop from a random model written into
    ``work``; returns it, its statistics (from the loop's per-step metrics) and the seconds
    taken."""
    t0 = time.perf_counter()
    write_random_model(work, micro_type, config, tokenizer_model)
    run_config = pretrain_config(config, micro_type, n_records, progress)
    history: list[dict[str, float]] = []
    final = train(run_config, work, on_step=lambda _step, metrics: history.append(metrics))
    model = Transformer(config.model_args(micro_type))
    model.load_state_dict(load_tensors(final))  # every parameter trained: all in the checkpoint
    model.eval()
    seconds = time.perf_counter() - t0
    manifest = json.loads((final.parent / "manifest_train.json").read_text())
    examples = len(manifest["line_indices"])
    steps = len(history)
    losses = [m["loss"] for m in history]
    # The final loss is the mean of the last 10% of steps (a single batch is noisy).
    tail = losses[-max(1, steps // 10) :]
    heads = model.n_future_tokens
    stats = {
        "history": losses,
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "final_head_losses": [history[-1][f"ce/head{k + 1}"] for k in range(heads)],
        "final_loss_rule": "mean loss of the last 10% of steps",
        "steps": steps,
        "tokens": int(sum(m["tokens"] for m in history)),
        "epochs": round(steps * config.batch_size / examples, 2),
        "examples": examples,
        "dropped": manifest["dropped_too_long"],
        "train_config": config_diff(run_config),
    }
    return model, stats, seconds


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
        "trained_by": "the training loop (train/loop.py), recipe pretrain" if stats["steps"]
        else None,
        "train_config": stats.get("train_config"),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "created_by": CREATED_BY,
    }  # fmt: skip
    return meta


PROBE_EXAMPLES = 64
"""Training examples on which a derived reference's next-token loss is measured."""


def probe_examples(
    records: list[dict], tokenizer: Tokenizer, config: MicroBaseConfig
) -> list[EncodedExample]:
    """The first :data:`PROBE_EXAMPLES` training examples (file order) as the run encodes them:
    with ``train_prompt`` the prompt's tokens are targets too."""
    examples: list[EncodedExample] = []
    for r in records:
        encoded = encode_example(tokenizer, r["instruction"], r.get("input", ""), r["output"],
                                 config.max_length)  # fmt: skip
        if encoded is not None:
            examples.append(encoded)
        if len(examples) == PROBE_EXAMPLES:
            break
    return prompt_targets(examples) if config.train_prompt else examples


@torch.no_grad()
def derive_reference(
    mtp: Transformer, config: MicroBaseConfig, examples: list[EncodedExample], pad_id: int
) -> tuple[Transformer, dict[str, Any], float]:
    """micro-reference as the head-1 path of ``mtp``: the same embedding, trunk blocks, head-1
    block, final norm and output matrix in a one-head model, so its logits are head 1's
    (docs/DATA.md §7). Returns the model, its statistics (next-token loss on ``examples``,
    :func:`probe_examples`) and the seconds taken."""
    t0 = time.perf_counter()
    model = Transformer(config.model_args("reference"))
    state = {k: v.detach().clone() for k, v in mtp.state_dict().items()
             if not k.startswith("extra_heads.")}  # fmt: skip
    model.load_state_dict(state)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), config.batch_size):
        batch = collate(examples[i : i + config.batch_size], pad_id)
        out = mtp_forward_backward(model, batch.tokens, batch.labels, None, None, [1.0],
                                   backward=False, n_heads=1)  # fmt: skip
        total, count = total + float(out.ce_sum[0]), count + int(out.n_tokens[0])
    loss = total / max(count, 1)
    stats = {
        "steps": 0, "epochs": 0.0, "tokens": 0, "history": [loss], "first_loss": loss,
        "final_loss": loss, "final_head_losses": [loss], "probe_examples": len(examples),
        "final_loss_rule": f"next-token loss on the first {len(examples)} training examples",
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
    ``progress``: the training loop's console line at each tenth of a run.
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

    work = work_layout(layout)
    shutil.rmtree(work.root, ignore_errors=True)  # what an interrupted run left
    staging = work.root / "tokenizer" / "tokenizer.model"
    started = time.perf_counter()
    corpus = train_local_tokenizer(staging, vocab_size=config.vocab_size, texts=texts)
    tokenizer = Tokenizer(staging)
    tokenizer_seconds = time.perf_counter() - started
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
    write_corpus(work, records)
    threads = torch.get_num_threads()
    trained: dict[str, tuple[Transformer, dict]] = {}
    for micro_type in todo:
        paths = layout.model(f"micro-{micro_type}")
        if micro_type == "reference" and config.reference_from == "mtp":
            if "mtp" in trained:
                mtp, data = trained["mtp"]
            else:
                mtp = _pretrained_mtp(layout, recipe)
                data = json.loads(layout.model("micro-mtp").metadata.read_text())["data"]
            probe = probe_examples(records, tokenizer, config)
            model, stats, seconds = derive_reference(mtp, config, probe, tokenizer.pad_id)
            print(f"[micro-reference] the head-1 path of micro-mtp (no second pretraining): "
                  f"next-token loss {stats['final_loss']:.3f} on {stats['probe_examples']} "
                  "training examples", flush=True)  # fmt: skip
        else:
            steps = config.steps if micro_type == "mtp" else config.reference_steps
            print(
                f"[micro-{micro_type}] pretraining {steps} steps on the {len(records)} correct "
                f"solutions of {DATASET} train (the training loop, recipe pretrain), "
                f"{threads} threads",
                flush=True,
            )
            model, stats, seconds = run_pretraining(
                work, micro_type, config, staging, len(records), progress
            )
            data = {
                "dataset": f"datasets/{DATASET}/processed/train.jsonl",
                "selection": "correct solutions (is_correct), EOS trained, "
                + ("prompt tokens are targets too" if config.train_prompt else "prompt masked"),
                "records": len(records),
                "examples": stats["examples"],
                "dropped_over_max_length": stats["dropped"],
                "sha256": recipe["data_sha256"],
            }
            trained[micro_type] = (model, data)
            print(
                f"  micro-{micro_type}: loss {stats['first_loss']:.3f} -> "
                f"{stats['final_loss']:.3f} in {seconds:.0f} s "
                f"({stats['tokens'] / max(seconds, 1e-9):.0f} tokens/s)",
                flush=True,
            )
        meta = _metadata(paths, micro_type, model, config, recipe, tokenizer_info, data, stats)
        meta.update(wall_seconds=round(seconds, 1), threads=threads)
        _write_model(paths, micro_type, model, staging, meta)
        results[micro_type] = PretrainResult(
            micro_type, paths, stats["steps"], stats["first_loss"], stats["final_loss"],
            stats["final_head_losses"], seconds, stats["tokens"],
        )  # fmt: skip
    shutil.rmtree(work.root)
    with contextlib.suppress(OSError):  # <storage>/cache itself, when nothing else is cached
        work.root.parent.rmdir()
    return results
