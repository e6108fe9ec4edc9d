"""The model storage commands, offline, against raw folders written by the tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import REPO, save_hf_bin_shards
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.models import ModelArgs, Transformer, load_pretrained
from weighted_mtp.models.transformer import init_weights
from weighted_mtp.storage import models as model_storage

SETUP = [sys.executable, str(REPO / "scripts/create_storage/setup_models.py")]
VERIFY = [sys.executable, str(REPO / "scripts/create_storage/verify_storage.py")]
TOKENS = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))

# Wide enough to slice a micro model from (dim >= 512, FFN >= 1365, vocab 32000),
# with 4 trunk blocks and 4 heads; head_dim 128 as in the 7B model.
SOURCE_ARGS = ModelArgs(
    dim=640,
    n_layers=8,
    n_heads=5,
    vocab_size=32000,
    ffn_hidden_dim=1408,
    n_future_tokens=4,
    max_seq_len=256,
)


def run(cmd, storage, *args):
    return subprocess.run(
        [*cmd, *args, "--storage", str(storage)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def meta_storage(tmp_path_factory, small_tokenizer):
    """A Meta-format raw download (bf16 consolidated.pth + params.json + tokenizer.model)."""
    storage = tmp_path_factory.mktemp("storage")
    raw = storage / "models/meta-llama-mtp/raw"
    (raw / "7B_1T_4").mkdir(parents=True)
    model = Transformer(SOURCE_ARGS)
    init_weights(model, seed=5)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    state["rope.freqs"] = torch.zeros(64)
    torch.save(state, raw / "7B_1T_4/consolidated.pth")
    params = {
        "dim": 640,
        "n_layers": 8,
        "n_heads": 5,
        "vocab_size": -1,
        "multiple_of": 128,
        "ffn_dim_multiplier": 0.8,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "n_future_tokens": 4,
        "max_seq_len": 256,
        "max_batch_size": 8,
    }
    (raw / "7B_1T_4/params.json").write_text(json.dumps(params))
    shutil.copy(small_tokenizer, raw / "tokenizer.model")
    result = run(SETUP, storage, "--model", "meta-llama-mtp", "--steps", "all")
    assert result.returncode == 0, result.stderr + result.stdout
    return storage


def test_ffn_multiplier_reproduces_explicit_size():
    # params.json above only states ffn_dim_multiplier; it must land on the same 1408.
    assert (
        ModelArgs(
            dim=640,
            n_layers=8,
            n_heads=5,
            multiple_of=128,
            ffn_dim_multiplier=0.8,
            n_future_tokens=4,
        ).hidden_dim
        == 1408
    )


def test_meta_steps_write_the_seed_tree(meta_storage):
    paths = StorageLayout(meta_storage).model("meta-llama-mtp")
    for path in (
        paths.weights,
        paths.checksums,
        paths.configs / "params.json",
        paths.configs / "meta_adapter.yaml",
        paths.tokenizer,
        paths.tokenizer_dir / "tokenizer_config.json",
    ):
        assert path.is_file(), path
    check = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=paths.safetensors_dir, capture_output=True, text=True
    )
    assert check.returncode == 0 and "model.safetensors: OK" in check.stdout
    with safe_open(str(paths.weights), framework="pt") as handle:
        names = set(handle.keys())
        assert handle.get_tensor("norm.weight").dtype == torch.bfloat16
    assert "rope.freqs" not in names and len(names) == 8 * 9 + 3
    raw = load_pretrained(paths.raw / "7B_1T_4", dtype=torch.float32)
    stored = load_pretrained(paths.root, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(raw(TOKENS), stored(TOKENS))


def test_rerun_is_a_noop(meta_storage):
    paths = StorageLayout(meta_storage).model("meta-llama-mtp")
    before = {
        p: p.stat().st_mtime_ns
        for p in (paths.weights, paths.checksums, paths.configs / "params.json")
    }
    result = run(SETUP, meta_storage, "--model", "meta-llama-mtp", "--steps", "all")
    assert result.returncode == 0, result.stderr
    assert "already converted" in result.stdout
    assert before == {p: p.stat().st_mtime_ns for p in before}


@pytest.mark.slow
def test_flipped_byte_fails_verify_naming_the_file(meta_storage, tmp_path):
    storage = tmp_path / "copy"
    shutil.copytree(meta_storage, storage)
    weights = storage / "models/meta-llama-mtp/safetensors/model.safetensors"
    with open(weights, "r+b") as handle:
        handle.seek(weights.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = run(VERIFY, storage, "--check", "models")
    assert result.returncode == 1
    assert f"{weights}: checksum mismatch" in result.stdout
    result = run(SETUP, storage, "--model", "meta-llama-mtp", "--steps", "verify")
    assert result.returncode == 1 and "checksum mismatch" in result.stdout


def test_interrupted_convert_leaves_no_partial_file(meta_storage, tmp_path, monkeypatch):
    storage = tmp_path / "copy"
    shutil.copytree(
        meta_storage / "models/meta-llama-mtp/raw", storage / "models/meta-llama-mtp/raw"
    )
    real_locate = model_storage.locate

    def failing_locate(path):
        ckpt = real_locate(path)
        reads = iter(range(10**6))
        real_read = ckpt.source.read

        def read(name):
            if next(reads) == 20:
                raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of the file
            return real_read(name)

        ckpt.source.read = read
        return ckpt

    monkeypatch.setattr(model_storage, "locate", failing_locate)
    paths = StorageLayout(storage).model("meta-llama-mtp")
    spec = model_storage.resolve_model("meta-llama-mtp")
    with pytest.raises(KeyboardInterrupt):
        model_storage.convert(spec, paths)
    assert not paths.weights.exists() and not paths.checksums.exists()
    assert list(paths.safetensors_dir.iterdir()) == []


def test_micro_slice_takes_weights_from_the_source(meta_storage):
    result = run(
        SETUP,
        meta_storage,
        "--model",
        "meta-llama-mtp",
        "--create-micro",
        "--micro-type",
        "mtp",
        "--micro-init",
        "slice",
    )
    assert result.returncode == 0, result.stderr + result.stdout
    layout = StorageLayout(meta_storage)
    micro = load_pretrained(layout.model("micro-mtp").root, dtype=torch.float32)
    source = load_pretrained(layout.model("meta-llama-mtp").root, dtype=torch.float32)
    assert micro.args.dim == 512 and micro.args.head_dim == 128 and micro.args.hidden_dim == 1365
    assert micro.args.n_trunk_layers == 3 and len(micro.layers) == 4
    src, dst = source.state_dict(), micro.state_dict()
    assert torch.equal(
        dst["layers.1.attention.wq.weight"], src["layers.1.attention.wq.weight"][:512, :512]
    )
    # head 1 of the micro model is the source's head-1 block, not its 4th trunk block
    assert torch.equal(
        dst["layers.3.feed_forward.w2.weight"], src["layers.4.feed_forward.w2.weight"][:512, :1365]
    )
    assert torch.equal(
        dst["extra_heads.2.ffn_norm.weight"], src["extra_heads.2.ffn_norm.weight"][:512]
    )
    metadata = json.loads(layout.model("micro-mtp").metadata.read_text())
    assert metadata["init"] == "slice" and metadata["source_model"] == "models/meta-llama-mtp"
    assert metadata["tokenizer"]["origin"] == "copied from models/meta-llama-mtp"
    _forward_backward(micro)


def _forward_backward(model):
    model.train()
    logits = model(TOKENS)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1, 0].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1)
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_micro_random_both_types_with_a_trained_tokenizer(tmp_path):
    """The README's main job: no tokenizer in storage, so one is trained (about 15 s)."""
    for micro_type in ("mtp", "reference"):
        result = run(
            SETUP,
            tmp_path,
            "--model",
            "meta-llama-mtp",
            "--create-micro",
            "--micro-type",
            micro_type,
            "--micro-init",
            "random",
        )
        assert result.returncode == 0, result.stderr + result.stdout
    layout = StorageLayout(tmp_path)
    mtp = json.loads(layout.model("micro-mtp").metadata.read_text())
    ref = json.loads(layout.model("micro-reference").metadata.read_text())
    assert mtp["tokenizer"]["origin"].startswith("trained locally")
    assert ref["tokenizer"]["origin"] == "copied from models/micro-mtp"
    assert mtp["n_trunk_layers"] == 3 and mtp["seed"] == 42
    for name in ("micro-mtp", "micro-reference"):
        model = load_pretrained(layout.model(name).root)
        assert model.args.vocab_size == 32000 and model.args.hidden_dim == 1365
        _forward_backward(model)
    # the reference is stored with HF names, so transformers reads it too
    config = json.loads((layout.model("micro-reference").configs / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    result = run(VERIFY, tmp_path, "--check", "models", "--generate-report")
    assert result.returncode == 0, result.stdout
    report = json.loads(next((tmp_path / "reports").glob("verification_report_*.json")).read_text())
    assert report["passed"] and report["n_checks"] == 8
    again = run(SETUP, tmp_path, "--create-micro", "--micro-type", "mtp")
    assert again.returncode == 0 and "already built" in again.stdout


@pytest.fixture(scope="module")
def hf_storage(tmp_path_factory, small_tokenizer):
    storage = tmp_path_factory.mktemp("hf_storage")
    raw = storage / "models/ref-sheared-llama-2.7b/raw/reference_model"
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    save_hf_bin_shards(model, raw)
    shutil.copy(small_tokenizer, raw / "tokenizer.model")
    return storage, model


def test_hf_reference_steps_and_logits(hf_storage):
    storage, hf = hf_storage
    assert (
        len(list((storage / "models/ref-sheared-llama-2.7b/raw/reference_model").glob("*.bin"))) > 1
    )
    result = run(
        SETUP, storage, "--model", "ref-sheared-llama", "--steps", "all", "--dtype", "float32"
    )
    assert result.returncode == 0, result.stderr + result.stdout
    paths = StorageLayout(storage).model("ref-sheared-llama-2.7b")
    assert (paths.configs / "config.json").is_file() and paths.tokenizer.is_file()
    ours = load_pretrained(paths.root)
    with torch.no_grad():
        assert (ours(TOKENS)[:, :, 0] - hf(TOKENS).logits).abs().max() <= 1e-4


@pytest.mark.slow
def test_bad_input_exits_with_one_line(meta_storage, tmp_path):
    cases = [
        (["--model", "llama-9000", "--steps", "all"], "unknown --model 'llama-9000'"),
        (
            ["--model", "meta-llama-mtp", "--steps", "convert"],
            "raw weights missing; run --steps download first",
        ),
        (["--model", "meta-llama-mtp", "--steps", "convert,bake"], "unknown step bake"),
    ]
    for args, message in cases:
        result = run(SETUP, tmp_path / "empty", *args)
        assert result.returncode != 0
        assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr
    # wrong shapes: params.json claims a wider model than the tensors
    storage = tmp_path / "bad"
    shutil.copytree(
        meta_storage / "models/meta-llama-mtp/raw", storage / "models/meta-llama-mtp/raw"
    )
    params_file = storage / "models/meta-llama-mtp/raw/7B_1T_4/params.json"
    params = json.loads(params_file.read_text())
    params["n_layers"] = 9
    params_file.write_text(json.dumps(params))
    result = run(SETUP, storage, "--model", "meta-llama-mtp", "--steps", "convert")
    assert result.returncode == 1
    assert "missing tensors ['layers.5" in result.stderr and result.stderr.count("\n") == 1


def test_download_uses_the_hub_client(tmp_path, monkeypatch, small_tokenizer):
    """The real download path, with the Hub replaced by a local folder in the repo's layout."""
    import huggingface_hub

    hub = tmp_path / "hub"
    (hub / "7B_1T_4").mkdir(parents=True)
    for name in ("7B_1T_4/consolidated.pth", "7B_1T_4/params.json"):
        (hub / name).write_bytes(b"x")
    shutil.copy(small_tokenizer, hub / "tokenizer.model")
    calls = []

    def fake_download(repo_id, filename, local_dir, token):
        calls.append((repo_id, filename, token))
        target = local_dir / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(hub / filename, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    layout = StorageLayout(tmp_path / "storage")
    spec = model_storage.resolve_model("meta-llama-mtp")
    model_storage.download(spec, layout.model(spec.name))
    assert [c[1] for c in calls] == list(spec.files)
    assert {c[0] for c in calls} == {"facebook/multi-token-prediction"}
    assert (layout.model(spec.name).raw / "tokenizer.model").is_file()
    calls.clear()
    model_storage.download(spec, layout.model(spec.name))  # resumable: present files are skipped
    assert calls == []

    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        raise GatedRepoError(
            "403 Client Error: access to model is restricted hf_secret_value",
            response=SimpleNamespace(headers={}, status_code=403, request=None),
        )

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(model_storage.StorageError) as err:
        model_storage.download(spec, model_storage.StorageLayout(tmp_path / "s2").model(spec.name))
    assert "accept its licence" in str(err.value) and "hf_secret_value" not in str(err.value)


def test_hf_weights_in_meta_layout_convert_to_the_same_logits(tmp_path, small_tokenizer):
    """transformers' logits == ours from a Meta raw folder converted by the storage command."""
    from tests.unit.test_checkpoints import TOKENS as HF_TOKENS
    from tests.unit.test_checkpoints import hf_state_in_meta_names, tiny_hf

    hf = tiny_hf(n_kv_heads=2)
    raw = tmp_path / "models/meta-llama-mtp/raw"
    (raw / "7B_1T_4").mkdir(parents=True)
    torch.save(hf_state_in_meta_names(hf), raw / "7B_1T_4/consolidated.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1,
              "multiple_of": 32, "ffn_dim_multiplier": 0.57, "norm_eps": 1e-5}  # fmt: skip
    (raw / "7B_1T_4/params.json").write_text(json.dumps(params))
    shutil.copy(small_tokenizer, raw / "tokenizer.model")
    result = run(SETUP, tmp_path, "--model", "meta-llama-mtp", "--steps", "convert,config,verify")
    assert result.returncode == 0, result.stderr + result.stdout
    ours = load_pretrained(tmp_path / "models/meta-llama-mtp", dtype=torch.float32)
    with torch.no_grad():
        assert (ours(HF_TOKENS)[:, :, 0] - hf(HF_TOKENS).logits).abs().max() <= 1e-4


def test_steps_with_an_nfkc_tokenizer_write_no_tokenizer_json(tmp_path, small_tokenizer, capsys):
    """A BPE ``tokenizer.model`` normalised with ``nmt_nfkc`` and whitespace folding: the storage
    steps succeed and its ``tokenizer/`` folder has no ``tokenizer.json``, with one warning line
    (docs/DECISIONS.md 2026-12-07); an identity-normalised one keeps its ``tokenizer.json``."""
    from tests.unit.test_tokenizer import train_nfkc_tokenizer

    args = ModelArgs(dim=64, n_layers=3, n_heads=2, vocab_size=1000, ffn_hidden_dim=96,
                     multiple_of=32, n_future_tokens=2, max_seq_len=64)  # fmt: skip
    nfkc = train_nfkc_tokenizer(tmp_path / "nfkc")
    for name, tokenizer in (("nfkc", nfkc), ("identity", small_tokenizer)):
        layout = StorageLayout(tmp_path / name)
        raw = layout.model("meta-llama-mtp").raw
        (raw / "7B_1T_4").mkdir(parents=True)
        model = Transformer(args)
        init_weights(model, seed=5)
        torch.save(model.state_dict(), raw / "7B_1T_4/consolidated.pth")
        (raw / "7B_1T_4/params.json").write_text(json.dumps(args.to_dict()))
        shutil.copy(tokenizer, raw / "tokenizer.model")
        capsys.readouterr()
        steps = ["convert", "config", "verify"]
        assert model_storage.run(layout, "meta-llama-mtp", steps)
        paths = layout.model("meta-llama-mtp")
        assert paths.tokenizer.read_bytes() == tokenizer.read_bytes()
        err = capsys.readouterr().err
        if name == "nfkc":
            assert not (paths.tokenizer_dir / "tokenizer.json").exists()
            assert err.count("\n") == 1 and err.startswith("warning:") and "'nmt_nfkc'" in err
        else:
            assert (paths.tokenizer_dir / "tokenizer.json").is_file() and err == ""
