"""The SentencePiece wrapper and the locally trained tokenizer."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm

from weighted_mtp.models.tokenizer import (
    Tokenizer,
    hf_unsupported_normalisation,
    sentencepiece_spec,
    train_local_tokenizer,
)

CODE = 'def f(x):\n    if x:\n\t\treturn  "héllo"  # two spaces\n\n    return None\n'


def test_round_trip_keeps_indentation_and_specials(small_tokenizer):
    tok = Tokenizer(small_tokenizer)
    ids = tok.encode(CODE, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.pad_id == tok.eos_id == 2
    assert tok.decode(ids) == CODE
    assert tok.sp.piece_to_id("<0x0A>") == 13  # newline byte as in LLaMA-2


def test_token_texts_concatenate_to_the_text(small_tokenizer):
    tok = Tokenizer(small_tokenizer)
    text = CODE + "中文 ✓"  # multi-byte characters fall back to byte pieces
    ids = tok.encode(text, bos=True, eos=True)
    texts = tok.token_texts(ids)
    assert len(texts) == len(ids) and texts[0] == texts[-1] == ""  # BOS, EOS
    assert "".join(texts).lstrip(" ") == text  # sentencepiece's dummy prefix is a space


def test_offsets_are_character_positions(small_tokenizer):
    tok = Tokenizer(small_tokenizer)
    text = "é = 'ü'\n  x"
    ids, starts = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert starts == sorted(starts) and starts[0] == 0 and max(starts) < len(text)
    # the first token starting at or after the newline is the newline itself
    assert tok.id_to_piece(ids[starts.index(text.index("\n"))]) == "<0x0A>"


def test_training_is_deterministic(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / "textwrap.py", stdlib / "string.py"]
    a = train_local_tokenizer(tmp_path / "a.model", vocab_size=600, files=files)
    b = train_local_tokenizer(tmp_path / "b.model", vocab_size=600, files=list(reversed(files)))
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.corpus_sha256 == b.corpus_sha256


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path)


def train_nfkc_tokenizer(folder: Path) -> Path:
    """A 1000-piece BPE ``tokenizer.model`` with SentencePiece's default ``nmt_nfkc`` rule and
    whitespace folding, which no ``tokenizer.json`` here reproduces (docs/DECISIONS.md
    2026-12-07), trained on a few stdlib files (~0.2 s)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in ("textwrap.py", "argparse.py", "string.py")]
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=",".join(str(f) for f in files),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=1000,
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc",
        remove_extra_whitespaces=True,
        num_threads=1,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


def test_normalisation_a_tokenizer_json_cannot_express_is_named(tmp_path, small_tokenizer):
    nfkc = train_nfkc_tokenizer(tmp_path)
    spec = sentencepiece_spec(nfkc)
    assert (spec.model_type, spec.normalisation, spec.folds_whitespace) == ("BPE", "nmt_nfkc", True)
    assert hf_unsupported_normalisation(nfkc) == (
        "SentencePiece normalisation 'nmt_nfkc' with whitespace folding"
    )
    assert sentencepiece_spec(small_tokenizer).normalisation == "identity"
    assert hf_unsupported_normalisation(small_tokenizer) is None
