"""Runs three optimizer steps on fixed batches, under torchrun (FSDP2) or in one process.

Step s has two micro-batches: with 2 ranks, rank r takes micro-batch r; in one process both
run as gradient accumulation. The loss of a step is normalised over both, so the two set-ups
must follow the same curve. Writes ``losses.json`` and a ``final`` checkpoint under OUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import load_config
from weighted_mtp.data.collate import Batch
from weighted_mtp.train.loop import Trainer


def fixed_batches(steps: int = 3, micro: int = 2) -> list[list[Batch]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(micro):
            tokens = torch.randint(3, 1000, (2, 24), generator=gen)
            labels = tokens.clone()
            prompt = int(torch.randint(4, 12, (1,), generator=gen))
            labels[:, :prompt] = -100
            labels[1, 20:] = -100  # uneven valid counts
            mask = torch.ones_like(tokens)
            mask[1, 20:] = 0
            step.append(Batch(tokens, labels, mask))
        out.append(step)
    return out


def main(storage: str, out: str, config_path: str) -> None:
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
    # Small chunks: the ranks' micro-batches have different numbers of valid rows, so without
    # a common chunk count they would call the sharded norm/output a different number of times.
    trainer.recipe.objective.chunk_rows = 7
    losses = []
    for step in fixed_batches():
        micro = [step[trainer.info.rank]] if trainer.info.enabled else step
        losses.append(trainer.step(micro)["loss"])
        trainer.state.step += 1
    trainer.save("final")
    if trainer.info.is_main:
        (trainer.run_dir / "losses.json").write_text(json.dumps(losses))
    torch.distributed.destroy_process_group() if trainer.info.enabled else None


if __name__ == "__main__":
    main(*sys.argv[1:4])
