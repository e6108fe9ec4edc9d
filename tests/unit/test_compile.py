"""`train.compile`: compiled blocks give eager's losses and gradients, and the same names."""

from __future__ import annotations

import copy

import pytest
import torch

from weighted_mtp.config import LoraConfig
from weighted_mtp.models import ModelArgs, Transformer
from weighted_mtp.models.transformer import init_weights
from weighted_mtp.train import checkpoint
from weighted_mtp.train.loop import compile_blocks
from weighted_mtp.train.mtp_loss import mtp_forward_backward
from weighted_mtp.train.recipes import apply_lora

VOCAB = 200


def lora_model() -> Transformer:
    args = ModelArgs(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                     ffn_hidden_dim=96, n_future_tokens=3, max_seq_len=64)  # fmt: skip
    model = Transformer(args)
    init_weights(model, 7)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=["wq", "wk", "wv", "wo", "w2"]))
    with torch.no_grad():  # zero B would leave A without gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model.train()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two steps of different lengths (the loop pads each batch to its own longest row)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for length in (24, 19):
        tokens = torch.randint(0, VOCAB, (3, length), generator=gen)
        labels = tokens.clone()
        labels[:, :5] = -100  # a prompt
        out.append((tokens, labels))
    return out


def train_two_steps(model: Transformer) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses, grads = [], []
    for tokens, labels in batches():
        out = mtp_forward_backward(model, tokens, labels, None, None, [1 / 3] * 3)
        losses.append(float(out.loss))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.slow  # inductor compiles a forward and a backward graph: about a minute on 2 cores
def test_compiled_training_equals_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = lora_model()
    compiled = copy.deepcopy(eager)
    names = list(compiled.state_dict())
    assert compile_blocks(compiled) == 5  # 2 trunk blocks + 3 head blocks
    eager_losses, eager_grads = train_two_steps(eager)
    compiled_losses, compiled_grads = train_two_steps(compiled)
    assert counters["stats"]["unique_graphs"] >= 1  # inductor really ran
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    for step in range(2):
        assert set(compiled_grads[step]) == set(eager_grads[step])
        for name, grad in eager_grads[step].items():
            assert (compiled_grads[step][name] - grad).abs().max() <= 1e-5, (step, name)
    # The grads are not all tiny: the 1e-5 bound says something.
    assert max(g.abs().max() for g in eager_grads[1].values()) > 1e-3
    # The module tree is unchanged: no ``_orig_mod.`` in state-dict or checkpoint names.
    assert list(compiled.state_dict()) == names
    assert set(checkpoint.trainable_state(compiled)) == set(checkpoint.trainable_state(eager))
    assert all("_orig_mod" not in n for n in checkpoint.trainable_state(compiled))


def test_the_loop_compiles_every_block_when_asked(tiny_storage, monkeypatch):
    """``train.compile=true`` reaches the loop; ``torch.compile`` is replaced by a recorder
    here (the real one is tested above), so the run takes seconds."""
    from tests.conftest import REPO
    from weighted_mtp.base.layout import StorageLayout
    from weighted_mtp.config import load_config
    from weighted_mtp.train.loop import Trainer

    calls: list[int] = []

    def recorder(fn, **kwargs):
        def run(*args, **kw):
            calls.append(1)
            return fn(*args, **kw)

        assert kwargs == {"dynamic": True}
        return run

    monkeypatch.setattr(torch, "compile", recorder)
    overrides = ["train.max_steps=1", "log.mlflow=false", "data.max_length=1024",
                 "data.sampling.val_n_samples=0", "run_name=compiled", "train.compile=true"]  # fmt: skip
    config = load_config(REPO / "configs/local/baseline.yaml", overrides)
    assert load_config(REPO / "configs/local/baseline.yaml").train.compile is False
    trainer = Trainer(config, StorageLayout(tiny_storage))
    blocks = [*trainer.model.layers, *trainer.model.extra_heads]
    assert all("forward" in vars(block) for block in blocks)
    final = trainer.fit()
    assert len(calls) >= len(blocks)  # every block ran through the compiled forward
    tensors = checkpoint.load_tensors(final)
    assert tensors and all("_orig_mod" not in name for name in tensors)
