"""torchrun / FSDP2 set-up, sharding and the few collectives the loop needs.

One process runs without any process group; under ``torchrun`` the group is created from
the environment (gloo on CPU, NCCL on CUDA). Sharding is PyTorch FSDP2 (``fully_shard``):
every transformer block, the embedding and the shared norm+output are their own units, then
the root. Nothing home-made.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
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


def env_info() -> DistInfo:
    """Rank, world size and local rank as torchrun describes them (one process: 0, 1, 0).
    Read before anything is loaded, so each rank picks its own device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device, timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment, if any: NCCL bound to
    this rank's CUDA device, gloo on a CPU; every collective times out after ``timeout_s``
    (docs/SCALING.md §1)."""
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return info
    kwargs: dict = {}
    if timeout_s is not None:
        kwargs["timeout"] = dt.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kwargs)
    return info


def setup(device_name: str, timeout_s: float | None = None) -> tuple[DistInfo, torch.device]:
    """This process's device (``cuda:LOCAL_RANK`` under torchrun), then its process group."""
    device = resolve_device(device_name, env_info())
    return init(device, timeout_s), device


def destroy(clean: bool = True) -> None:
    """Leave the process group. ``clean``: after a barrier, so that no rank tears the group
    down while another still talks to it (gloo then aborts that rank: "terminate called
    without an active exception"); after an error, at once (the others may be gone)."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``auto``: the local CUDA device if there is one, else the CPU. A CUDA device without an
    index is this rank's: ``cuda:LOCAL_RANK`` (from ``info``, else from the environment)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", (info or env_info()).local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def fsdp_param_dtype(setting: str, device: torch.device, autocast: bool) -> torch.dtype | None:
    """``train.fsdp_param_dtype`` -> FSDP2's ``param_dtype`` (None: the parameters' own)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and autocast else None
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[setting]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(
    model: nn.Module, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """FSDP2: one unit per block, the embedding, norm+output, a value head; then the root.

    Mixed precision (docs/SCALING.md §2): with ``param_dtype`` (bf16) the blocks gather and
    compute in it and gradients are reduced in ``reduce_dtype``; the optimizer keeps the fp32
    shards. Only the root casts its floating-point inputs: a block's inputs are not cast, so
    the RoPE table it receives stays fp32 (its hidden states are already in the compute dtype,
    from the embedding). A value head is its own unit in fp32, as it always runs.

    The model's own methods (``trunk``, ``head_hidden``, ``unembed``, ``hidden_states``) are
    registered as FSDP forward methods, because the memory-efficient loss calls them directly
    instead of ``forward``. Every unit is gathered and freed once here, so that the per-chunk
    backward passes of gradient accumulation find each parameter's unsharded form
    (``materialize_unsharded``).
    """
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    compute = param_dtype  # FSDP casts nothing where it equals a parameter's own dtype
    # Gradients are reduced in their own dtype when nothing is cast (fp32 LoRA, fp32 models).
    reduce = reduce_dtype if compute is not None else None
    inner = MixedPrecisionPolicy(compute, reduce, cast_forward_inputs=False)
    base = _transformer_of(model)
    for block in [*base.layers, *base.extra_heads]:
        fully_shard(block, mp_policy=inner)
    fully_shard(base.tok_embeddings, mp_policy=inner)
    fully_shard([base.norm, base.output], mp_policy=inner)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module) and head is not base.output:
        fully_shard(head, mp_policy=MixedPrecisionPolicy(None, None, cast_forward_inputs=False))
    fully_shard(model, mp_policy=MixedPrecisionPolicy(compute, reduce))
    for method in ("trunk", "head_hidden", "unembed", "hidden_states"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    # Units whose output is a view (a linear layer on [B, L, d], the value model's squeeze)
    # make FSDP2 warn against in-place ops on it; the project does none, and the warning, once
    # per call, would bury every other line of a run's log.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    materialize_unsharded(model)
    return model


def materialize_unsharded(model: nn.Module) -> None:
    """Gather and free every FSDP unit once, one at a time (a collective: every rank).

    Works around FSDP2 (torch 2.13) in gradient accumulation: with gradient sync off, the
    post-backward of EVERY unit runs at the end of each backward call, and it reads the
    unsharded parameter of units that have not been gathered yet (``AttributeError:
    'FSDPParam' object has no attribute '_unsharded_param'``). Our loss calls backward once per
    chunk, before the later heads' blocks have run (docs/SCALING.md §3)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()


def _transformer_of(model: nn.Module) -> nn.Module:
    """The ``Transformer`` inside a wrapper (a value model holds it as ``backbone``)."""
    return getattr(model, "backbone", model)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip gradient reduction on all but the last micro-batch of an optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest ``value`` of all ranks (``value`` in one process)."""
    if not dist.is_initialized():
        return value
    count = torch.tensor([value], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    return int(count)
