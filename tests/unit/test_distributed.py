"""FSDP2 sharding and mixed precision in one process (a gloo group of one rank), docs/SCALING.md
§2-§3: what every unit computes in, that the RoPE table and the value head stay fp32, and
gradient accumulation over several backward calls per micro-batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from weighted_mtp.models import ModelArgs, Transformer
from weighted_mtp.models.transformer import init_weights
from weighted_mtp.models.value import ValueModel
from weighted_mtp.train import distributed
from weighted_mtp.train.mtp_loss import mtp_forward_backward


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    yield
    dist.destroy_process_group()


def tiny(dtype: torch.dtype, n_future: int = 4) -> Transformer:
    args = ModelArgs(dim=32, n_layers=3 + n_future - 1, n_heads=4, vocab_size=64,
                     ffn_hidden_dim=48, n_future_tokens=n_future, max_seq_len=32)  # fmt: skip
    model = Transformer(args)
    init_weights(model, seed=3)
    return model.to(dtype)


def compute_dtypes(model: torch.nn.Module) -> dict[str, set]:
    """What each block's attention computes with and the RoPE table it receives, recorded in
    a forward pre-hook (after FSDP has gathered and cast)."""
    seen: dict[str, set] = {"weight": set(), "rope": set()}

    def hook(module, args):
        seen["weight"].add(module.attention.wq.weight.dtype)
        seen["rope"].add(args[1].dtype)

    for block in [*model.layers, *model.extra_heads]:
        block.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize(
    ("model_dtype", "setting", "expected"),
    [
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32, torch.float32),  # float32 asked: really gathered in fp32
        (torch.bfloat16, None, torch.bfloat16),  # nothing asked: the parameters' own
    ],
)
def test_units_compute_in_the_asked_dtype_and_rope_stays_fp32(group, model_dtype, setting,
                                                              expected):  # fmt: skip
    model = tiny(model_dtype)
    seen = compute_dtypes(model)
    distributed.shard(model, setting)
    tokens = torch.randint(0, 64, (2, 12))
    logits = model(tokens)
    assert seen["weight"] == {expected} and seen["rope"] == {torch.float32}
    assert torch.isfinite(logits.float()).all()


def test_value_head_is_fp32_under_bf16_fsdp(group):
    model = ValueModel(tiny(torch.float32, n_future=1))
    distributed.shard(model, torch.bfloat16)
    dtypes = set()
    model.head.register_forward_pre_hook(
        lambda m, args: dtypes.update({args[0].dtype, *(p.dtype for p in m.parameters())})
    )
    values = model(torch.randint(0, 64, (2, 12)))
    assert dtypes == {torch.float32} and values.dtype == torch.float32


@pytest.mark.parametrize(("param_dtype", "rtol"), [(None, 1e-5), (torch.bfloat16, 0.05)])
def test_accumulation_over_chunked_backwards_matches_one_process(group, param_dtype, rtol):
    """Two micro-batches without gradient sync on the first, each back-propagated in chunks of
    3 rows (many backward calls): with bf16 parameters and fp32 reduction this failed at step 1
    before every unit was gathered once (docs/SCALING.md §3)."""
    reference, sharded = tiny(torch.float32), tiny(torch.float32)
    distributed.shard(sharded, param_dtype)
    gen = torch.Generator().manual_seed(0)
    micro = [torch.randint(0, 64, (2, 12), generator=gen) for _ in range(2)]
    for model in (reference, sharded):
        for i, tokens in enumerate(micro):
            distributed.set_gradient_sync(model, i == len(micro) - 1)
            mtp_forward_backward(model, tokens, tokens.clone(), None, [100.0] * 4, [0.25] * 4,
                                 chunk_rows=3)  # fmt: skip
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, param in sharded.named_parameters():
        got = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        want = grads[name.replace("_fsdp_wrapped_module.", "")]
        # relative error of the whole gradient: bf16 compute rounds each element (about 1%)
        assert (got - want).norm() <= rtol * want.norm() + 1e-9, name
