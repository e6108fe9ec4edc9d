"""THE training loop, shared by every recipe (docs/METHOD.md §8).

It knows a recipe's loss only through the ``Objective`` contract (``train/objectives.py``)
and writes checkpoints only through ``train/checkpoint.py``. Steps are optimizer steps
(epochs are converted once). Each step accumulates ``grad_accum`` micro-batches whose loss is
normalised by the step's total (all micro-batches, all ranks), so a step's gradient does not
depend on how it is split. AdamW (fp32 state for fp32 LoRA
parameters), linear warmup then cosine to a floor, gradient clipping, bf16 autocast on CUDA,
validation with the same objective, checkpoints that resume exactly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import json
import math
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from weighted_mtp.base.io import write_json_atomic, write_text_atomic
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import Config, OptimConfig, config_to_dict
from weighted_mtp.data.collate import IGNORE_INDEX, EncodedExample
from weighted_mtp.data.dataset import (
    SPAN_EXTRA,
    BatchStream,
    batch_tokens,
    build_examples,
    build_span_examples,
    split_files,
)
from weighted_mtp.train import checkpoint, distributed, recipes
from weighted_mtp.train.checkpoint import TrainState
from weighted_mtp.train.placement import collect, placement_metrics
from weighted_mtp.train.tracking import (
    TAG_KIND,
    TAG_RECIPE,
    TAG_RUN_DIR,
    MetricLogger,
    source_tags,
)


def build_optimizer(params: list[dict], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``params``' groups; with ``optim.weight_decay_on == "matrices"`` each group is
    split so that only its parameters with two or more dimensions decay."""
    if optim.weight_decay_on == "matrices":
        params = decay_groups(params, optim.weight_decay)
    return torch.optim.AdamW(
        params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )


def decay_groups(groups: list[dict], weight_decay: float) -> list[dict]:
    """Each group as its matrices (decayed as the group says, else by ``weight_decay``) and its
    vectors and scalars (norm gains, biases: no decay); empty parts are left out."""
    out = []
    for group in groups:
        params = list(group["params"])
        matrices = [p for p in params if p.ndim >= 2]
        vectors = [p for p in params if p.ndim < 2]
        if matrices:
            out.append({**group, "params": matrices,
                        "weight_decay": group.get("weight_decay", weight_decay)})  # fmt: skip
        if vectors:
            out.append({**group, "params": vectors, "weight_decay": 0.0})
    return out


def lr_lambda(total_steps: int, optim: OptimConfig):
    """Linear warmup from ~0 to 1 over ``warmup_steps`` (else ``warmup_ratio`` of the run), then
    cosine (or linear) decay to ``min_lr_ratio``."""
    warmup = max(1, optim.warmup_steps or int(total_steps * optim.warmup_ratio))

    def factor(step: int) -> float:
        if optim.schedule == "constant":
            return 1.0
        if step < warmup:
            return max(1e-8, (step + 1) / warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = (
            0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
        )
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape

    return factor


def total_steps(config: Config, batches_per_epoch: int) -> int:
    steps = math.ceil(int(config.train.epochs * batches_per_epoch) / config.train.grad_accum)
    if config.train.max_steps is not None:
        steps = min(steps, config.train.max_steps) if steps else config.train.max_steps
    return max(1, steps)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile the ``forward`` of every transformer block in place; returns how many.

    Blocks, not the model: the MTP loss calls ``trunk``/``head_hidden``/``unembed`` rather than
    ``forward``, so ``torch.compile(model)`` would compile nothing it runs. Replacing each
    block's ``forward`` attribute keeps the module tree, so parameter names (and checkpoints)
    have no ``_orig_mod.`` prefix, and hooks around ``forward`` (FSDP's gathers, activation
    checkpointing) stay outside the compiled code (docs/DECISIONS.md, 2026-12-01). Every
    block has the same code, so one graph serves them all; sequence lengths are dynamic.
    """
    base = getattr(model, "backbone", model)  # a value model holds its Transformer there
    blocks = [*base.layers, *base.extra_heads]
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    return len(blocks)


def run_dir_for(config: Config, layout: StorageLayout, info: distributed.DistInfo) -> Path:
    """``checkpoints/<experiment>/<run>``; on resume without a name, the newest run."""
    base = layout.checkpoint(config.experiment)
    name = config.run_name
    if name is None and config.checkpoint.resume is True and base.is_dir():
        runs = sorted(
            (p for p in base.iterdir() if (p / "config.yaml").is_file()), key=lambda p: p.name
        )
        name = runs[-1].name if runs else None
    if name is None:
        name = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if info.enabled:  # every rank must agree on rank 0's clock
        box = [name]
        torch.distributed.broadcast_object_list(box, src=0)
        name = box[0]
    return base / name


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""A scheduler's notice (preemption, the end of a time limit): finish the optimizer step,
write a checkpoint, stop (docs/SCALING.md §6)."""
PREEMPTED_EXIT_CODE = 75
"""``wmtp train``'s exit code after such a stop (EX_TEMPFAIL: run it again to continue)."""


class Preempted(Exception):
    """Training stopped on a signal after writing a step checkpoint; the run goes on with
    ``checkpoint.resume=auto`` (or ``true``) and the same ``run_name``."""

    def __init__(self, signal_name: str, step: int, path: Path) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}: checkpoint {path}; "
                         "run the same command with checkpoint.resume=auto to continue")  # fmt: skip
        self.step, self.path = step, path


class Trainer:
    """Holds what one run needs; ``fit()`` is the loop."""

    def __init__(
        self,
        config: Config,
        layout: StorageLayout,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ):
        self.config = config
        self.layout = layout
        self.on_step = on_step
        """Called on the main rank after every optimizer step with the step number and its
        metrics (what an in-process caller records beyond ``log.every``)."""
        # The rank (and so this rank's CUDA device) is known before anything is loaded.
        self.info, self.device = distributed.setup(config.train.device, config.train.dist_timeout_s)
        if self.device.type == "cpu":
            keep_freed_cpu_memory()  # the same numbers, fewer page faults (docs/METHOD.md §8)
        torch.manual_seed(config.train.seed)  # identical LoRA init on every rank
        self.recipe = recipes.build(config, layout, self.device)
        self.model = self.recipe.model
        if config.train.compile:  # after LoRA, before sharding: FSDP's hooks stay eager
            compile_blocks(self.model)
        if self.info.enabled:
            param_dtype = distributed.fsdp_param_dtype(
                config.train.fsdp_param_dtype, self.device, config.train.autocast
            )
            distributed.shard(self.model, param_dtype, torch.float32)
            if self.info.is_main:
                gathered = str(param_dtype or "their own dtype").removeprefix("torch.")
                print(f"FSDP2 on {self.info.world} ranks: parameters gathered in {gathered}, "
                      "gradients reduced and optimizer state in float32", flush=True)  # fmt: skip
            # From here each rank draws its own random numbers (LoRA dropout masks, value-head
            # dropout); reproducible, and saved per rank in every checkpoint.
            torch.manual_seed(rank_seed(config.train.seed, self.info.rank))
        self.run_dir = run_dir_for(config, layout, self.info)
        self.train_stream, self.val_batches = self._data()
        self.total_steps = total_steps(config, self.train_stream.batches_per_epoch())
        groups = (
            self.recipe.param_groups(self.model)
            if self.recipe.param_groups
            else [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        )
        self.optimizer = build_optimizer(groups, config.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, config.optim)
        )
        self.state = TrainState()
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda" and config.train.autocast
            else nullcontext()
        )

    def _data(self) -> tuple[BatchStream, list]:
        data, sampling, tok = self.config.data, self.config.data.sampling, self.recipe.tokenizer
        rank, world, batch_size = self.info.rank, self.info.world, self.config.train.batch_size
        train = build_examples(split_files(self.layout, data, data.train_split), sampling, tok,
                               data.max_length, sampling.n_samples, rank, world)  # fmt: skip
        if data.train_prompt:
            train.examples = prompt_targets(train.examples)
        # Ranks may drop different numbers of too-long examples: every rank keeps as many as
        # the rank with the fewest, so all ranks run the same number of batches (and
        # collectives) in training and in validation (docs/SCALING.md §4).
        train.examples = train.examples[: distributed.min_over_ranks(len(train), self.device)]
        streams = [BatchStream(train, batch_size, self.config.train.seed, tok.pad_id)]
        if sampling.val_n_samples:
            val = build_examples(split_files(self.layout, data, data.val_split), sampling, tok,
                                 data.max_length, sampling.val_n_samples, rank, world,
                                 allow_fewer=True)  # fmt: skip
            if data.train_prompt:
                val.examples = prompt_targets(val.examples)
            kept = distributed.min_over_ranks(len(val), self.device)
            if kept < len(val) and self.info.enabled:
                print(f"rank {rank}: validates {kept} of its {len(val)} examples (the fewest "
                      f"of any rank)", flush=True)  # fmt: skip
            val.examples = val.examples[:kept]
            if len(val):
                streams.append(BatchStream(val, batch_size, sampling.seed, tok.pad_id))
        self.val_stream = streams[1] if len(streams) > 1 else None
        spans = self._span_stream()
        self.recipe.objective.prepare([*streams, *([spans] if spans else [])], self.device,
                                      batch_size)  # fmt: skip
        self.span_batches = spans.all_batches() if spans else []
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "manifest_train.json", train.manifest)
        return streams[0], self.val_stream.all_batches() if self.val_stream else []

    def _span_stream(self) -> BatchStream | None:
        """The placement set (docs/METHOD.md §6, "Where the weight goes"): incorrect validation solutions with a
        mutation span, the same on every rank; None unless the objective ranks tokens, there is
        a validation pass and the split carries spans."""
        data, log = self.config.data, self.config.log
        if not (self.recipe.objective.scores_tokens and self.val_stream and log.placement_examples):
            return None
        files = split_files(self.layout, data, data.val_split)
        built = build_span_examples(files, self.recipe.tokenizer, data.max_length,
                                    log.placement_examples)  # fmt: skip
        if built is None:
            return None
        examples, spans = built
        stream = BatchStream(examples, self.config.train.batch_size, data.sampling.seed,
                             self.recipe.tokenizer.pad_id)  # fmt: skip
        stream.extras[SPAN_EXTRA] = spans
        return stream

    # ---- one optimizer step ----

    def step(self, micro: list) -> dict[str, float]:
        objective = self.recipe.objective
        objective.begin_step(self.state.step, self.total_steps)
        plans = [objective.plan(b.to(self.device), i) for i, b in enumerate(micro)]
        dens = distributed.all_reduce_sum(sum(plan.denominators for plan in plans).to(self.device))
        # The loss is normalised by the step's global total (all micro-batches, all ranks), so
        # rank gradients must be summed; FSDP2 averages them (gloo has no pre-scaled sum), so
        # each rank back-propagates world x its share.
        world = self.info.world
        stats, loss, tokens = 0, 0.0, 0
        for i, plan in enumerate(plans):
            distributed.set_gradient_sync(self.model, i == len(plans) - 1)
            with self.autocast:
                part, part_stats = objective.forward_backward(self.model, plan, dens / world)
            loss += float(part) / world
            stats = stats + part_stats
            tokens += batch_tokens(plan.batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(  # FSDP2: the global norm, all shards
            [p for p in self.model.parameters() if p.requires_grad], self.config.optim.max_grad_norm
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = objective.end_step().to(self.device)
        if sums.numel():  # the same length on every rank: one objective
            sums = distributed.all_reduce_sum(sums)
        totals = distributed.all_reduce_sum(
            torch.cat([stats.flatten(), torch.tensor([loss, tokens], device=stats.device)])
        )
        metrics = objective.summarize(totals[:-2].view_as(stats))
        metrics.update(objective.step_metrics(sums))
        metrics.update(
            {
                "loss": float(totals[-2]),
                "tokens": float(totals[-1]),
                "grad_norm": float(grad_norm),
                "lr": self.scheduler.get_last_lr()[0],
            }
        )
        return metrics

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        objective, stats = self.recipe.objective, 0
        self.model.eval()
        for i, batch in enumerate(self.val_batches):
            plan = objective.plan(batch.to(self.device), i, training=False)
            with self.autocast:
                _, part = objective.forward_backward(self.model, plan, None, backward=False)
            stats = stats + part
        self.write_token_weights()
        placement = self.placement()
        self.model.train()
        if isinstance(stats, int):
            return placement
        stats = distributed.all_reduce_sum(stats)
        return {**{f"val/{k}": v for k, v in objective.summarize(stats).items()}, **placement}

    def placement(self) -> dict[str, float]:
        """``val/placement/*``: where the objective's token scores fall on incorrect solutions
        relative to their mutation spans (docs/METHOD.md §6, "Where the weight goes"). Every rank scores the same
        solutions (the policy's forward may be sharded), so no gathering is needed."""
        objective, solutions = self.recipe.objective, []
        for batch in self.span_batches:
            batch = batch.to(self.device)
            with self.autocast:
                scores = objective.token_scores(self.model, batch)
            if scores is None:
                return {}
            mask = batch.labels != IGNORE_INDEX
            solutions.extend(collect(scores, mask, batch.extras[SPAN_EXTRA]))
        return {f"val/placement/{k}": v for k, v in placement_metrics(solutions).items()}

    def write_token_weights(self) -> None:
        """Append the first validation examples' per-head token weights to
        ``token_weights.jsonl`` (tokens as text, weights NaN -> null where a head has no
        target): what the report's heat maps show."""
        count, objective = self.config.log.token_weights, self.recipe.objective
        if not count or not self.val_batches:
            return
        batch = self.val_batches[0].to(self.device)
        with self.autocast:
            weights = objective.token_weights(self.model, batch)
        if weights is None or not self.info.is_main:
            return
        weights = weights.float().cpu()
        lines = []
        for row in range(min(count, len(batch))):
            n = int(batch.attention_mask[row].sum())
            w = weights[row, :n].T  # [heads, n]
            lines.append(json.dumps({
                "step": self.state.step, "split": "val", "example": row,
                "recipe": self.recipe.name,
                "pieces": self.recipe.tokenizer.token_texts(batch.tokens[row, :n].tolist()),
                "weights": [[None if math.isnan(v) else round(v, 5) for v in head.tolist()]
                            for head in w],
            }) + "\n")  # fmt: skip
        with open(self.run_dir / "token_weights.jsonl", "a", encoding="utf-8") as handle:
            handle.writelines(lines)

    # ---- checkpoints ----

    def save(self, name: str) -> Path:
        self.state.extra["objective"] = self.recipe.objective.state_dict()
        self.state.extra["schedule"] = {"total_steps": self.total_steps, **self._length_settings()}
        path = checkpoint.save(
            self.run_dir, name, self.model, self.optimizer, self.scheduler, self.state,
            self.recipe.lora_config, self.info.is_main,
            keep_last=self.config.checkpoint.keep_last if name != "final" else None,
        )  # fmt: skip
        if self.info.is_main:
            checkpoint.write_info(path, {
                "recipe": self.recipe.name, "base_model": self.recipe.base_model,
                "n_heads": self.recipe.objective.n_heads, "step": self.state.step,
                "experiment": self.config.experiment, "run": self.run_dir.name,
                **self.recipe.checkpoint_info,
            })  # fmt: skip
        distributed.barrier()
        return path

    def maybe_resume(self) -> None:
        latest = checkpoint.latest(self.run_dir) if self.config.checkpoint.resume else None
        if latest is not None:
            self.state = checkpoint.resume(latest, self.model, self.optimizer, self.scheduler)
            extra = self.state.extra  # checkpoints before 2026-11-30 kept only "weighting"
            state = extra.get("objective") or {"weighting": extra.get("weighting", {})}
            self.recipe.objective.load_state_dict(state)
            self._keep_saved_schedule(extra.get("schedule"))
            if self.info.is_main:
                print(f"resumed from {latest} at step {self.state.step}", flush=True)

    def _length_settings(self) -> dict:
        train = self.config.train
        return {"epochs": train.epochs, "max_steps": train.max_steps,
                "grad_accum": train.grad_accum, "batch_size": train.batch_size}  # fmt: skip

    def _keep_saved_schedule(self, saved: dict | None) -> None:
        """A run resumed with the same length settings keeps the length it was planned with,
        so its LR schedule continues exactly: on another world size each rank's share of an
        epoch, and so the planned step count, would differ (docs/SCALING.md §5)."""
        if not saved or saved["total_steps"] == self.total_steps:
            return
        if {k: v for k, v in saved.items() if k != "total_steps"} != self._length_settings():
            return  # the length settings changed: the new length is what was asked for
        if self.info.is_main:
            print(f"keeps the planned {saved['total_steps']} steps and their LR schedule "
                  f"(this world size would plan {self.total_steps})", flush=True)  # fmt: skip
        self.total_steps = saved["total_steps"]
        factor = lr_lambda(self.total_steps, self.config.optim)
        self.scheduler.lr_lambdas = [factor] * len(self.optimizer.param_groups)

    # ---- the loop ----

    @contextmanager
    def stop_signals(self) -> Iterator[None]:
        """Within: SIGTERM and SIGUSR1 ask the loop to stop after the current step
        (``self.stop_requested``); the previous handlers come back afterwards."""
        self.stop_requested: str | None = None
        if threading.current_thread() is not threading.main_thread():
            yield  # handlers can only be installed from the main thread
            return

        def ask(signum: int, frame: object) -> None:
            self.stop_requested = signal.Signals(signum).name

        previous = {s: signal.signal(s, ask) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def should_stop(self) -> str | None:
        """The signal that asked to stop, if any rank got one (every rank calls this after every
        step, so all stop after the same step)."""
        asked = self.stop_requested
        if self.info.enabled:
            flag = torch.tensor([0 if asked is None else 1], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = asked or ("a signal to another rank" if int(flag) else None)
        return asked

    def fit(self) -> Path:
        with self.stop_signals():
            return self._fit()

    def _fit(self) -> Path:
        config, info = self.config, self.info
        self.maybe_resume()
        if info.is_main:
            write_text_atomic(
                self.run_dir / "config.yaml",
                yaml.safe_dump(config_to_dict(config), sort_keys=False),
            )
        batches = self.train_stream.iterate(self.state)
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            disable=not info.is_main,
        )
        logger = MetricLogger(
            self.run_dir,
            enabled=info.is_main,
            mlflow_uri=self._mlflow_uri(),
            experiment=config.experiment,
            run_name=self.run_dir.name,
            params=config_to_dict(config),
            console=progress.console.print,
            tags={
                TAG_KIND: "train",
                TAG_RECIPE: config.train.recipe,
                TAG_RUN_DIR: str(self.run_dir.resolve()),
                **(source_tags() if info.is_main else {}),
            },
            resume=self.state.step > 0,
        )
        with progress:
            task = progress.add_task(
                f"{config.train.recipe}",
                total=self.total_steps,
                completed=self.state.step,
                status="",
            )
            while self.state.step < self.total_steps:
                started = time.perf_counter()
                metrics = self.step([next(batches) for _ in range(config.train.grad_accum)])
                self.state.step += 1
                metrics["tokens_per_s"] = metrics["tokens"] / (time.perf_counter() - started)
                metrics["memory_mb"] = memory_mb(self.device)
                metrics["epoch"] = (
                    self.state.epoch
                    + self.state.batches_in_epoch / self.train_stream.batches_per_epoch()
                )
                progress.update(
                    task,
                    advance=1,
                    status=f"loss {metrics['loss']:.4f}  "
                    f"{metrics['tokens_per_s']:.0f} tok/s  {metrics['memory_mb']:.0f} MB",
                )
                if self.state.step % config.log.every == 0 or self.state.step == 1:
                    logger.log(metrics, self.state.step)
                if self.on_step is not None and info.is_main:
                    self.on_step(self.state.step, metrics)
                if self.val_batches and self.state.step % config.log.val_every == 0:
                    self.after_validation(self.validate(), logger)
                saved = (
                    self.state.step % config.checkpoint.every == 0
                    and self.state.step < self.total_steps
                )
                if saved:
                    self.save(f"step_{self.state.step:08d}")
                asked = self.should_stop()
                if asked and self.state.step < self.total_steps:
                    name = f"step_{self.state.step:08d}"
                    path = self.run_dir / name if saved else self.save(name)
                    logger.close()
                    raise Preempted(asked, self.state.step, path)
        if self.val_batches and self.state.step % config.log.val_every != 0:
            self.after_validation(self.validate(), logger)
        final = self.save("final")
        if self.recipe.on_finish is not None:  # every rank: it may run the sharded model
            self.recipe.on_finish(self.model, self.val_stream, self.run_dir, self.device)
        logger.close()
        if info.is_main:
            print(f"final checkpoint: {final}", flush=True)
        return final

    def after_validation(self, metrics: dict[str, float], logger: MetricLogger) -> None:
        """Log validation metrics; keep ``best/`` when the chosen metric improves."""
        logger.log(metrics, self.state.step)
        name, mode = self.config.checkpoint.best_metric, self.config.checkpoint.best_mode
        if name is None:
            return
        if name not in metrics:
            raise ValueError(
                f"checkpoint.best_metric {name!r} is not a validation metric: {sorted(metrics)}"
            )
        value, best = metrics[name], self.state.extra.get("best")
        if best is None or (value < best if mode == "min" else value > best):
            self.state.extra["best"] = value
            self.save("best")

    def _mlflow_uri(self) -> str | None:
        if not self.config.log.mlflow:
            return None
        return self.config.log.mlflow_tracking_uri or self.layout.mlflow_uri()


def prompt_targets(examples: list) -> list[EncodedExample]:
    """``data.train_prompt``: every token but BOS is a target, the prompt's included
    (docs/DATA.md §7); the examples of a pair mode have no such meaning."""
    if examples and not isinstance(examples[0], EncodedExample):
        raise ValueError("data.train_prompt applies to pointwise sampling modes, not pairs")
    return [EncodedExample(e.input_ids, [IGNORE_INDEX, *e.input_ids[1:]], 1) for e in examples]


CPU_MALLOC_MMAP_THRESHOLD = 32 << 20
"""Bytes below which glibc's malloc serves a CPU tensor from its heap rather than a fresh mmap
(glibc's largest allowed value on 64-bit)."""
CPU_MALLOC_TRIM_THRESHOLD = 1 << 30
"""Free bytes at the top of glibc's heap before it returns them to the system."""


def keep_freed_cpu_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory instead of returning it to the system
    (docs/METHOD.md §8, "CPU memory"): a training step frees and re-allocates the same buffers
    (each head's logits, the activations), and memory handed back is faulted in again, page by
    page, on the next step. Process-wide and idempotent; False where the C library has no
    ``mallopt`` (not glibc), which changes nothing but speed."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, CPU_MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, CPU_MALLOC_TRIM_THRESHOLD)
    )


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random numbers after the identical initialisation."""
    return seed + 1_000_003 * (rank + 1)


def train(
    config: Config,
    layout: StorageLayout,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Run one training job to its final checkpoint; returns the checkpoint folder.
    ``on_step(step, metrics)`` runs on the main rank after every optimizer step."""
    trainer = None
    try:
        trainer = Trainer(config, layout, on_step)
        final = trainer.fit()
    except Preempted:
        distributed.destroy()  # every rank stopped after the same step and saved
        raise
    except BaseException as error:
        info = distributed.env_info()
        if info.enabled:  # which rank failed, and where (a timed-out collective too)
            where = (f"optimizer step {trainer.state.step + 1} of {trainer.total_steps}"
                     if trainer is not None else "while setting up")  # fmt: skip
            error.add_note(f"rank {info.rank} of {info.world}, {where}")
        distributed.destroy(clean=False)
        raise
    distributed.destroy()
    return final
