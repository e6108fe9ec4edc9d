"""`wmtp export`: head 1 as a Hugging Face Llama folder, every head in Meta's layout."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.unit.test_tokenizer import train_nfkc_tokenizer
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.cli import main
from weighted_mtp.config import LoraConfig
from weighted_mtp.models import ModelArgs, Transformer, load_pretrained, save_model
from weighted_mtp.models.export import ExportError, export, meta_params
from weighted_mtp.models.tokenizer import Tokenizer, hf_tokenizer_json, hf_tokenizer_mismatch
from weighted_mtp.models.transformer import init_weights
from weighted_mtp.storage.tokenizer_folder import write_tokenizer_folder
from weighted_mtp.train import checkpoint
from weighted_mtp.train.recipes import apply_lora

VOCAB = 1000
TOKENS = torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(5))


def tiny_mtp(n_kv_heads: int = 4, ffn: int | None = 96, seed: int = 3) -> Transformer:
    """3 heads on a 2-block trunk, non-default eps and RoPE base, norms away from 1."""
    args = ModelArgs(dim=64, n_layers=5, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=VOCAB,
                     ffn_hidden_dim=ffn, multiple_of=32, n_future_tokens=3, max_seq_len=64,
                     norm_eps=1e-6, rope_theta=50000.0)  # fmt: skip
    model = Transformer(args)
    init_weights(model, seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    return model.eval()


def hf_logits(folder: Path) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(TOKENS).logits


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_hf_export_is_head_one(tmp_path, small_tokenizer, n_kv_heads):
    model = tiny_mtp(n_kv_heads)
    out = export(model, "hf", tmp_path / "hf", small_tokenizer, torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == model.args.n_trunk_layers + 1
    assert config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == 1e-6
    with torch.no_grad():
        heads = model(TOKENS)
    got = hf_logits(out)
    assert (got - heads[:, :, 0]).abs().max() <= 1e-4
    # The comparison can fail: head 2 is a different function of the same trunk.
    assert (got - heads[:, :, 1]).abs().max() > 1e-2
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_hf_export_in_bfloat16_is_close(tmp_path, small_tokenizer):
    model = tiny_mtp()
    out = export(model, "hf", tmp_path / "hf", small_tokenizer, torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with torch.no_grad():
        expected = model(TOKENS)[:, :, 0]
    assert (hf_logits(out) - expected).abs().max() < 0.1


def stdlib_lines(n: int = 3000) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for name in ("typing.py", "dataclasses.py", "pathlib/__init__.py", "pathlib.py"):
        if (root / name).is_file():
            lines += (root / name).read_text(encoding="utf-8").splitlines()
    return lines[:n]


def test_exported_tokenizer_gives_sentencepiece_ids(tmp_path, small_tokenizer):
    out = export(tiny_mtp(), "hf", tmp_path / "hf", small_tokenizer, torch.float32)
    hf = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(small_tokenizer)
    texts = [*stdlib_lines(), "    indented", "  x\n\ty", "héllo 😀 中文", "", "a  b   c"]
    whole = "\n".join(texts[:200])  # multi-line code, as a prompt would be
    for text in [*texts, whole]:
        ids = ours.encode(text, bos=True)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)


def test_tokenizer_json_check_catches_a_wrong_pipeline(small_tokenizer):
    good = hf_tokenizer_json(small_tokenizer)
    assert hf_tokenizer_mismatch(good, small_tokenizer) is None
    # Without SentencePiece's dummy prefix every first word is split differently.
    assert hf_tokenizer_mismatch(hf_tokenizer_json(small_tokenizer, False), small_tokenizer)


@pytest.mark.parametrize("ffn", [96, None, 170])
def test_meta_export_reloads_every_head(tmp_path, small_tokenizer, ffn):
    model = tiny_mtp(n_kv_heads=2, ffn=ffn)
    out = export(model, "meta", tmp_path / "meta", small_tokenizer, torch.float32)
    assert {p.name for p in out.iterdir()} == {"consolidated.pth", "params.json", "tokenizer.model"}
    params = json.loads((out / "params.json").read_text())
    assert params["n_future_tokens"] == 3 and params["n_layers"] == 5
    # 170 = int(2 * 4 * 64 / 3): Meta's own rule with multiple_of 1 reaches it, no extra key.
    assert ("ffn_hidden_dim" in params) == (ffn == 96)
    reloaded = load_pretrained(out)
    assert reloaded.args.hidden_dim == model.args.hidden_dim
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS), model(TOKENS))


def test_meta_params_follow_meta_rounding():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_future_tokens=4)
    params = meta_params(args)
    assert "ffn_hidden_dim" not in params and params["multiple_of"] == 256
    assert ModelArgs.from_dict(params).hidden_dim == 11008


def test_export_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export(tiny_mtp(), "hf", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").is_file()
    export(tiny_mtp(), "hf", tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


# ---- the command, on a LoRA checkpoint in a storage tree ----


@pytest.fixture
def lora_run(tmp_path, small_tokenizer):
    """A storage tree with ``micro-mtp`` and a LoRA checkpoint whose adapters are not zero;
    returns (storage root, checkpoint, the adapted model unmerged)."""
    layout = StorageLayout(tmp_path / "storage")
    base = tiny_mtp(n_kv_heads=2)
    save_model(base, layout.model("micro-mtp").root)
    write_tokenizer_folder(small_tokenizer, layout.model("micro-mtp"))
    torch.manual_seed(0)
    lora = apply_lora(base, LoraConfig(rank=4, alpha=8.0, targets=["wq", "wk", "wv", "w2"]))
    with torch.no_grad():
        for name, param in base.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    run = layout.root / "checkpoints" / "exp" / "run1"
    ckpt = checkpoint.save(run, "final", base, None, None, checkpoint.TrainState(step=3), lora,
                           is_main=True)  # fmt: skip
    checkpoint.write_info(ckpt, {"recipe": "baseline", "base_model": "micro-mtp", "n_heads": 3})
    return layout.root, ckpt, base.eval()


def test_cli_exports_a_lora_checkpoint_merged(lora_run, tmp_path, capsys):
    root, ckpt, adapted = lora_run
    out = tmp_path / "served"
    code = main(["export", str(ckpt), str(out), "--format", "hf", "--storage", str(root)])
    assert code == 0, capsys.readouterr().err
    assert "trained checkpoint" in capsys.readouterr().out
    with torch.no_grad():
        expected = adapted(TOKENS)[:, :, 0]
        base = load_pretrained(root / "models" / "micro-mtp")(TOKENS)[:, :, 0]
    got = hf_logits(out)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - base).abs().max() > 1e-3  # the adapters did change head 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    ids = Tokenizer(out / "tokenizer.model").encode("  x", bos=True)
    assert AutoTokenizer.from_pretrained(out)("  x")["input_ids"] == ids


def test_cli_exports_the_experiment_folder_in_meta_layout(lora_run, tmp_path):
    root, _, adapted = lora_run
    out = tmp_path / "meta"
    experiment = "checkpoints/exp"  # relative to the storage root: its newest final
    assert main(["export", experiment, str(out), "--format", "meta", "--storage", str(root)]) == 0
    with torch.no_grad():
        assert (load_pretrained(out)(TOKENS) - adapted(TOKENS)).abs().max() <= 1e-4


def test_cli_bad_sources_are_one_line(lora_run, tmp_path, capsys):
    root, ckpt, _ = lora_run
    assert main(["export", "no-such-model", str(tmp_path / "o"), "--storage", str(root)]) == 1
    err = capsys.readouterr().err
    assert "neither a training checkpoint nor a model" in err and err.count("\n") == 1
    info = json.loads((ckpt / checkpoint.INFO_FILE).read_text())
    checkpoint.write_info(ckpt, {**info, "value_head": {"type": "linear"}})
    assert main(["export", str(ckpt), str(tmp_path / "o"), "--storage", str(root)]) == 1
    assert "critic checkpoint" in capsys.readouterr().err


def test_storage_tokenizer_folder_loads_in_transformers_with_our_ids(tmp_path, small_tokenizer):
    """A storage ``tokenizer/`` folder, read by ``AutoTokenizer``, gives SentencePiece's ids on
    leading spaces and indentation, where transformers' ``LlamaTokenizer`` splits differently."""
    paths = StorageLayout(tmp_path / "storage").model("micro-mtp")
    write_tokenizer_folder(small_tokenizer, paths)
    ours = Tokenizer(paths.tokenizer)
    hf = AutoTokenizer.from_pretrained(paths.tokenizer_dir)
    for text in ("  x", "def f(a):\n    if a > 3:\n        return a\n", " leading", "x\n\n  y"):
        assert hf(text)["input_ids"] == ours.encode(text, bos=True), text
    config = json.loads((paths.tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


# ---- a SentencePiece normalisation that tokenizer.json cannot express ----


@pytest.fixture(scope="module")
def nfkc_tokenizer(tmp_path_factory) -> Path:
    return train_nfkc_tokenizer(tmp_path_factory.mktemp("nfkc"))


def warning_lines(err: str) -> list[str]:
    """stderr's lines, less tqdm's progress bars (drawn with carriage returns)."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    return [line for line in lines if line.strip()]


def test_hf_export_without_tokenizer_json_when_the_normalisation_has_none(
    tmp_path, nfkc_tokenizer, small_tokenizer, capsys
):
    out = export(tiny_mtp(), "hf", tmp_path / "hf", nfkc_tokenizer, torch.float32)
    err = capsys.readouterr().err
    assert (out / "tokenizer.model").read_bytes() == nfkc_tokenizer.read_bytes()
    assert not (out / "tokenizer.json").exists()
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors").is_file()
    [line] = warning_lines(err)
    assert line.startswith("warning:") and "tokenizer.json not written" in line
    assert "normalisation 'nmt_nfkc' with whitespace folding" in line
    # The identity rule LLaMA uses still gets its checked tokenizer.json, silently.
    out = export(tiny_mtp(), "hf", tmp_path / "hf2", small_tokenizer, torch.float32)
    assert (out / "tokenizer.json").is_file() and "warning" not in capsys.readouterr().err


def test_cli_export_and_storage_folder_of_an_nfkc_tokenizer(tmp_path, nfkc_tokenizer, capsys):
    layout = StorageLayout(tmp_path / "storage")
    paths = layout.model("micro-mtp")
    save_model(tiny_mtp(), paths.root)
    write_tokenizer_folder(nfkc_tokenizer, paths)
    assert ["nmt_nfkc" in line for line in warning_lines(capsys.readouterr().err)] == [True]
    assert paths.tokenizer.is_file() and not (paths.tokenizer_dir / "tokenizer.json").exists()
    out = tmp_path / "served"
    assert main(["export", "micro-mtp", str(out), "--storage", str(layout.root)]) == 0
    err = capsys.readouterr().err
    [line] = warning_lines(err)
    assert line.startswith("warning:") and "'nmt_nfkc'" in line
    assert (out / "tokenizer.model").is_file() and not (out / "tokenizer.json").exists()
    assert hf_logits(out).shape == (*TOKENS.shape, VOCAB)


def test_storage_folder_drops_a_stale_tokenizer_json(tmp_path, small_tokenizer, nfkc_tokenizer):
    paths = StorageLayout(tmp_path / "storage").model("micro-mtp")
    write_tokenizer_folder(small_tokenizer, paths)
    assert (paths.tokenizer_dir / "tokenizer.json").is_file()
    write_tokenizer_folder(nfkc_tokenizer, paths, force=True)
    assert paths.tokenizer.read_bytes() == nfkc_tokenizer.read_bytes()
    assert not (paths.tokenizer_dir / "tokenizer.json").exists()
