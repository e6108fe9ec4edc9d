"""torchrun / FSDP2 set-up, sharding and the few collectives the loop needs.

One process runs without any process group; under ``torchrun`` the group is created from
the environment (gloo on CPU, NCCL on CUDA). Sharding is PyTorch FSDP2 (``fully_shard``):
every transformer block, the embedding and the shared norm+output are their own units, then
the root. Nothing home-made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``auto``: the local CUDA device if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank if info else 0)
        torch.cuda.set_device(device)
    return device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(
    model: nn.Module, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype
) -> nn.Module:
    """FSDP2: one unit per block, the embedding, and norm+output; then the root.

    The model's own methods (``trunk``, ``head_hidden``, ``unembed``) are registered as FSDP
    forward methods, because the memory-efficient loss calls them directly instead of
    ``forward``.
    """
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    base = _transformer_of(model)
    for block in [*base.layers, *base.extra_heads]:
        fully_shard(block, mp_policy=policy)
    fully_shard(base.tok_embeddings, mp_policy=policy)
    fully_shard([base.norm, base.output], mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for method in ("trunk", "head_hidden", "unembed", "hidden_states"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def _transformer_of(model: nn.Module) -> nn.Module:
    """The ``Transformer`` inside a wrapper (a value model holds it as ``backbone``)."""
    return getattr(model, "backbone", model)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip gradient reduction on all but the last micro-batch of an optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
