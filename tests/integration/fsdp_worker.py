"""Runs three optimizer steps on fixed batches, under torchrun (FSDP2) or in one process.

Step s has MICRO micro-batches (default 2): with W ranks, rank r takes its consecutive
MICRO / W of them as gradient accumulation; in one process all run as gradient accumulation.
The loss of a step is normalised over all, so the set-ups must follow the same curve (and the
same global gradient norm). Writes ``losses.json`` and a ``final`` checkpoint under OUT, and
``dropout_<rank>.json``: the first random numbers each rank draws after the Trainer is built
(the LoRA-dropout stream), which must differ between ranks.

Then three more steps each with the TD weighting (critic values given as batch extras) and
with Rho-1 (reference CE given as batch extras): their statistics are summed over ranks, so
``metrics.json`` (every step's metrics but timings) must be the same for both set-ups.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import Rho1Config, VerifiableConfig, load_config
from weighted_mtp.data.collate import IGNORE_INDEX, Batch
from weighted_mtp.train.loop import Trainer
from weighted_mtp.train.weighting import Rho1, Verifiable


def fixed_batches(steps: int = 3, micro: int = 2, seed: int = 7) -> list[list[Batch]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(micro):
            tokens = torch.randint(3, 1000, (2, 24), generator=gen)
            labels = tokens.clone()
            prompt = int(torch.randint(4, 12, (1,), generator=gen))
            labels[:, :prompt] = IGNORE_INDEX
            labels[1, 20:] = IGNORE_INDEX  # uneven valid counts
            mask = torch.ones_like(tokens)
            mask[1, 20:] = 0
            extras = {"values": torch.rand(2, 24, generator=gen),
                      "ref_ce": torch.rand(2, 24, generator=gen) * 7}  # fmt: skip
            step.append(Batch(tokens, labels, mask, extras))
        out.append(step)
    return out


def main(storage: str, out: str, config_path: str, micro_count: str = "2") -> None:
    # max_steps with many epochs: both set-ups then share one LR schedule (3 steps).
    config = load_config(
        config_path,
        [
            "log.mlflow=false",
            "data.max_length=1024",
            "run_name=fsdp",
            "train.max_steps=3",
            "train.epochs=100",
            "data.sampling.val_n_samples=0",
            "lora.dropout=0.0",
        ],
    )
    trainer = Trainer(config, StorageLayout(Path(storage)))
    trainer.run_dir = Path(out) / f"world{trainer.info.world}"
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    rank, world, micro_count = trainer.info.rank, trainer.info.world, int(micro_count)
    state = torch.get_rng_state()
    (trainer.run_dir / f"dropout_{rank}.json").write_text(json.dumps(torch.rand(8).tolist()))
    torch.set_rng_state(state)
    share = micro_count // world
    # Small chunks: the ranks' micro-batches have different numbers of valid rows, so without
    # a common chunk count they would call the sharded norm/output a different number of times.
    trainer.recipe.objective.chunk_rows = 7
    losses, metrics = [], []
    for step in fixed_batches(micro=micro_count):
        losses.append(trainer.step(step[rank * share : (rank + 1) * share])["loss"])
        trainer.state.step += 1
    trainer.save("final")
    objective = trainer.recipe.objective
    for seed, weighting in (
        (8, Verifiable(VerifiableConfig())),
        (9, Rho1(Rho1Config(k_percent=0.6))),
    ):
        objective.weighting = weighting
        for step in fixed_batches(micro=micro_count, seed=seed):
            got = trainer.step(step[rank * share : (rank + 1) * share])
            metrics.append({k: v for k, v in got.items() if k not in ("tokens_per_s",)})
            trainer.state.step += 1
    if trainer.info.is_main:
        (trainer.run_dir / "losses.json").write_text(json.dumps(losses))
        (trainer.run_dir / "metrics.json").write_text(json.dumps(metrics))
    if trainer.info.enabled:
        # Every rank past its last collective before any tears the group down, as training
        # ends (train.distributed.barrier): a rank that leaves while the other still talks to
        # it can make gloo abort the other ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
