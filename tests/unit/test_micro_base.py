"""The micro-base pretraining step on a tiny config: layout, metadata, loss, loading, decoding;
the training loop's ``pretrain`` recipe it runs (docs/DATA.md §7)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO
from weighted_mtp.base.errors import MissingInputError, UserError
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.cli import main
from weighted_mtp.config import load_config
from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.evaluation.generate import generate, speculative_generate
from weighted_mtp.micro_base import (
    MicroBaseConfig,
    corpus_texts,
    pretrain_config,
    pretrain_micro_base,
    training_records,
    work_layout,
    write_corpus,
    write_random_model,
)
from weighted_mtp.models.checkpoints import load_pretrained
from weighted_mtp.models.tokenizer import Tokenizer, train_local_tokenizer
from weighted_mtp.storage.models import verify_model
from weighted_mtp.train.loop import Trainer

TINY = MicroBaseConfig(
    dim=32, trunk_layers=1, attention_heads=2, ffn_hidden_dim=64, vocab_size=320,
    max_length=256, batch_size=4, steps=40, reference_steps=20, lr=1e-2, warmup_steps=4,
)  # fmt: skip


def _records() -> list[dict]:
    """Correct and incorrect solutions of a few tiny stdin/stdout problems."""
    rows = []
    for i in range(12):
        k = 3 + i
        problem = f"synthetic_train_{i:05d}_add"
        statement = f"Read an integer x and print x plus {k}.\n\nInput\n\nOne integer.\n"
        for j, (code, ok) in enumerate(
            [(f"x = int(input())\nprint(x + {k})\n", True),
             (f"print(int(input()) + {k})\n", True),
             (f"x = int(input())\nprint(x - {k})\n", False)]
        ):  # fmt: skip
            rows.append({
                "instruction": statement, "input": "", "output": code,
                "task_id": f"{problem}_{j}", "is_correct": ok,
                "metadata": {"problem_id": problem, "source": "code_contests"},
            })  # fmt: skip
    return rows


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def layout(tmp_path) -> StorageLayout:
    layout = StorageLayout(tmp_path / "storage")
    path = layout.dataset("codecontests").split("train")
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in _records()))
    return layout


def test_pretrain_writes_loadable_models_that_learned(layout):
    results = pretrain_micro_base(layout, TINY, progress=False)
    assert set(results) == {"mtp", "reference"}
    for micro_type in results:
        paths = layout.model(f"micro-{micro_type}")
        for path in (paths.weights, paths.checksums, paths.configs / "config.json",
                     paths.tokenizer, paths.metadata):  # fmt: skip
            assert path.is_file(), path
        assert all(check.ok for check in verify_model(paths)), verify_model(paths)
        meta = json.loads(paths.metadata.read_text())
        assert meta["init"] == "pretrained" and meta["micro_type"] == micro_type
        assert meta["steps"] == (40 if micro_type == "mtp" else 0)  # the reference is derived
        assert meta["data"]["records"] == 24  # the correct solutions only
        assert meta["sizes"]["dim"] == 32 and meta["tokenizer"]["vocab_size"] == 320
        # The derived reference is a copy: its wall time may round to 0.0 s.
        assert meta["wall_seconds"] >= (0 if micro_type == "reference" else 0.1)
        assert meta["seed"] == 0
        # Trained by the training loop's pretrain recipe (the reference: derived, untrained).
        run = meta["train_config"]
        if micro_type == "mtp":
            assert run["train"]["recipe"] == "pretrain" and run["lora"] == {"enabled": False}
            assert run["data"]["train_prompt"] is True and run["train"]["max_steps"] == 40
            assert len(meta["loss_every_10_steps"]) == 4 and meta["data"]["examples"] == 24
        else:
            assert run is None and meta["trained_by"] is None
    assert not (layout.root / "cache").exists()  # the run's folder is removed (and cache/)
    mtp_result = results["mtp"]
    assert mtp_result.final_loss < 0.7 * mtp_result.first_loss, mtp_result
    # Both models read the same tokenizer.
    mtp, ref = layout.model("micro-mtp"), layout.model("micro-reference")
    assert mtp.tokenizer.read_bytes() == ref.tokenizer.read_bytes()

    model = load_pretrained(mtp.root)
    assert model.n_future_tokens == 4 and model.args.dim == 32
    reference = load_pretrained(ref.root)
    assert reference.n_future_tokens == 1 and reference.args.n_layers == 2
    # The derived reference is head 1 of micro-mtp: the same logits, through HF names and back.
    probe = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        torch.testing.assert_close(reference(probe)[:, :, 0], model(probe)[:, :, 0])
    ref_meta = json.loads(ref.metadata.read_text())
    assert ref_meta["source_model"].startswith("micro-mtp") and results["reference"].steps == 0
    # ... and it has learned what head 1 learned: its loss is near micro-mtp's final loss.
    assert results["reference"].final_loss < 0.7 * mtp_result.first_loss
    names = json.loads(ref.metadata.read_text())["tensor_names"]
    assert names == "huggingface"
    tok = Tokenizer(mtp.tokenizer)
    prompt = [tok.bos_id, *tok.encode("### Instruction:\nRead an integer x")]
    plain = generate(model, [prompt], 12, eos_id=tok.eos_id)[0]
    spec, stats = speculative_generate(model, prompt, 12, eos_id=tok.eos_id)
    assert spec == plain  # greedy self-speculative decoding reproduces plain greedy
    assert len(stats.draft_proposed) == 3
    assert generate(reference, [prompt], 4, eos_id=tok.eos_id)[0] is not None


def test_same_seed_same_weights_and_rerun_is_a_no_op(layout, tmp_path, capsys):
    config = MicroBaseConfig(**{**TINY.__dict__, "steps": 6, "reference_steps": 3})
    pretrain_micro_base(layout, config, micro_types=("mtp",), progress=False)
    first = layout.model("micro-mtp").checksums.read_text()
    other = StorageLayout(tmp_path / "other")
    other.dataset("codecontests").processed.mkdir(parents=True)
    src = layout.dataset("codecontests").split("train")
    other.dataset("codecontests").split("train").write_bytes(src.read_bytes())
    pretrain_micro_base(other, config, micro_types=("mtp",), progress=False)
    assert other.model("micro-mtp").checksums.read_text() == first
    capsys.readouterr()
    again = pretrain_micro_base(layout, config, micro_types=("mtp",), progress=False)
    assert again["mtp"].skipped and "already pretrained" in capsys.readouterr().out


def test_reference_from_scratch_and_derived_needs_mtp(layout):
    scratch = MicroBaseConfig(**{**TINY.__dict__, "steps": 4, "reference_steps": 6,
                                 "reference_from": "scratch"})  # fmt: skip
    with pytest.raises(UserError, match="pretrain micro-mtp first"):
        pretrain_micro_base(layout, TINY, micro_types=("reference",), progress=False)
    result = pretrain_micro_base(layout, scratch, micro_types=("reference",), progress=False)
    assert result["reference"].steps == 6 and not layout.model("micro-mtp").weights.exists()
    meta = json.loads(layout.model("micro-reference").metadata.read_text())
    assert meta["steps"] == 6 and meta["source_model"] is None
    with pytest.raises(UserError, match="reference_from"):
        MicroBaseConfig(reference_from="other")


def test_pretrain_recipe_loss_is_the_mean_of_the_heads_mean_cross_entropies(layout, tmp_path):
    """On a fixed batch the loop's loss (recipe pretrain, as micro-base configures it) equals
    the mean over heads of each head's mean CE computed from the full logits, with the prompt's
    tokens as targets; the optimizer decays matrices only, the warm-up is in steps."""
    config = TINY
    records = training_records(layout)
    work = work_layout(layout)
    tokenizer_model = tmp_path / "tok" / "tokenizer.model"
    train_local_tokenizer(tokenizer_model, vocab_size=config.vocab_size,
                          texts=corpus_texts(records))  # fmt: skip
    write_corpus(work, records)
    write_random_model(work, "mtp", config, tokenizer_model)
    run_config = pretrain_config(config, "mtp", len(records))
    trainer = Trainer(run_config, work)
    batch = trainer.train_stream.collate([0, 1, 2, 3])
    tokens, labels, mask = batch.tokens, batch.labels, batch.attention_mask
    # data.train_prompt: every real token but BOS is a target, the prompt's too.
    assert torch.equal(labels[:, 1:], tokens[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX))
    assert (labels[:, 0] == IGNORE_INDEX).all()

    with torch.no_grad():
        logits = trainer.model(tokens).float()  # [B, L, heads, V]
    length, heads = tokens.shape[1], logits.shape[2]
    expected = [
        F.cross_entropy(logits[:, : length - k, k - 1].flatten(0, 1), labels[:, k:].flatten(),
                        ignore_index=IGNORE_INDEX)
        for k in range(1, heads + 1)
    ]  # fmt: skip
    metrics = trainer.step([batch])
    assert heads == 4
    for k in range(heads):
        assert metrics[f"ce/head{k + 1}"] == pytest.approx(float(expected[k]), rel=1e-5)
    assert metrics["loss"] == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)

    # AdamW: weight decay on the matrices only; linear warm-up over min(4, 40 // 10) steps.
    groups = trainer.optimizer.param_groups
    assert {g["weight_decay"] for g in groups} == {0.1, 0.0}
    for group in groups:
        assert all((p.ndim >= 2) == (group["weight_decay"] > 0) for p in group["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(trainer.model.parameters()))
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(config.lr * 2 / 4)


def test_shipped_quickstart_pretrain_config_is_the_micro_base_recipe():
    """configs/quickstart/pretrain.yaml runs what ``wmtp storage micro-base`` runs (its model,
    data set and length aside), so ``wmtp train`` reproduces the recipe."""
    shipped = load_config(REPO / "configs/quickstart/pretrain.yaml")
    ours = pretrain_config(MicroBaseConfig(), "mtp", 2300)
    assert shipped.optim == ours.optim and shipped.lora == ours.lora
    assert shipped.data.train_prompt and shipped.data.max_length == ours.data.max_length
    for key in ("recipe", "batch_size", "grad_accum", "max_steps", "device"):
        assert getattr(shipped.train, key) == getattr(ours.train, key), key
    assert shipped.model.dtype == ours.model.dtype == "float32"


def test_errors_are_one_line(tmp_path):
    with pytest.raises(MissingInputError, match="storage synthetic"):
        pretrain_micro_base(StorageLayout(tmp_path), TINY, progress=False)
    with pytest.raises(UserError, match="attention_heads"):
        MicroBaseConfig(dim=30, attention_heads=4)
    assert main(["storage", "micro-base", "--storage", str(tmp_path), "--steps", "2"]) == 1


def test_cli_runs_the_step(layout, capsys):
    code = main([
        "storage", "micro-base", "--storage", str(layout.root), "--only", "reference",
        "--dim", "32", "--trunk-layers", "1", "--attention-heads", "2", "--ffn-hidden-dim", "64",
        "--vocab-size", "320", "--reference-steps", "3", "--batch-size", "4", "--threads", "1",
        "--reference-from", "scratch",
    ])  # fmt: skip
    assert code == 0
    assert "micro-reference: 3 steps" in capsys.readouterr().out
    assert not layout.model("micro-mtp").root.exists()
