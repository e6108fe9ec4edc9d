"""SentencePiece tokenizer, used directly (not through transformers).

transformers' ``LlamaTokenizer`` mangles code indentation and BOS handling on a bare
``tokenizer.model``, so every place that tokenises goes through :class:`Tokenizer`.
When no real LLaMA-2 tokenizer is in storage, :func:`train_local_tokenizer` trains a
deterministic byte-fallback BPE model with the same special ids (``<unk> <s> </s>`` =
0 1 2) on local Python source.
"""

from __future__ import annotations

import hashlib
import io
import json
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from weighted_mtp.base.errors import MissingInputError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer:
    """Thin wrapper over ``sentencepiece.SentencePieceProcessor``."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise MissingInputError(f"{path}: tokenizer model not found")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # LLaMA has no pad token; padding uses EOS and is masked by the attention mask.
        self.pad_id = self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and, per token, the character offset where it starts in ``text``."""
        proto = self.sp.encode(text, return_type="proto")
        # SentencePiece reports byte offsets; map them to character offsets.
        char_at_byte = []
        for i, ch in enumerate(text):
            char_at_byte.extend([i] * len(ch.encode("utf-8")))
        char_at_byte.append(len(text))
        ids = [piece.id for piece in proto.pieces]
        starts = [char_at_byte[min(piece.begin, len(char_at_byte) - 1)] for piece in proto.pieces]
        return ids, starts

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def token_texts(self, ids: Iterable[int]) -> list[str]:
        """The text each token contributes, one string per id (for rendering tokens in place).

        ``▁`` becomes a space; byte-fallback pieces (``<0x0A>``) are gathered until they form
        valid UTF-8, whose text goes to the last byte of the character (the others get "");
        control tokens (BOS, EOS, padding) contribute "".
        """
        texts: list[str] = []
        pending = bytearray()
        for token_id in ids:
            token_id = int(token_id)
            if self.sp.is_control(token_id):
                texts.append("")
                continue
            piece = self.sp.id_to_piece(token_id)
            if self.sp.is_byte(token_id):
                pending.append(int(piece[3:-1], 16))
                try:
                    texts.append(pending.decode("utf-8"))
                    pending.clear()
                except UnicodeDecodeError:
                    texts.append("" if len(pending) < 4 else pending.decode("utf-8", "replace"))
                    if len(pending) >= 4:
                        pending.clear()
                continue
            pending.clear()
            texts.append(piece.replace("\u2581", " "))
        return texts


@dataclass(frozen=True)
class TrainedTokenizer:
    path: Path
    corpus_files: int
    corpus_bytes: int
    corpus_sha256: str


def default_corpus() -> list[Path]:
    """The Python standard library's source files, sorted: on every machine with Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _corpus_lines(documents: Iterable[bytes], max_bytes: int, digest) -> Iterator[str]:
    total = 0
    for data in documents:
        if total + len(data) > max_bytes:
            break
        total += len(data)
        digest.update(data)
        for line in data.decode("utf-8", errors="replace").splitlines():
            if line.strip():
                yield line


def train_local_tokenizer(
    out_path: str | Path,
    vocab_size: int = 32000,
    files: list[Path] | None = None,
    max_bytes: int = 50_000_000,
    texts: Sequence[str] | None = None,
) -> TrainedTokenizer:
    """Train a deterministic BPE SentencePiece model with LLaMA's special ids.

    The corpus is ``texts`` (documents, in the given order) when given, else ``files`` (sorted),
    else the Python standard library; ``corpus_files`` then counts the documents.

    Byte fallback keeps every string encodable (newlines become ``<0x0A>`` as in LLaMA-2),
    whitespace is kept as is so indentation survives a round trip, and the input order is
    fixed (sorted files, no sampling or shuffling), so the same corpus gives the same model.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if texts is not None:
        documents: Sequence[bytes] = [t.encode("utf-8") for t in texts]
    else:
        paths = default_corpus() if files is None else sorted(files)
        documents = _LazyBytes(paths)
    digest = hashlib.sha256()
    lines = list(_corpus_lines(documents, max_bytes, digest))
    if not lines:
        raise ValueError("tokenizer corpus is empty")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.99995,
        max_sentence_length=16384,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=True,
        num_threads=1,
        minloglevel=2,
    )
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)
    return TrainedTokenizer(
        out_path, len(documents), sum(len(x) for x in lines), digest.hexdigest()
    )


class _LazyBytes(Sequence[bytes]):
    """File contents read one at a time (the standard library is ~40 MB)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        return self.paths[i].read_bytes()


# ---- the same tokenizer as a Hugging Face ``tokenizer.json`` ----

SPACE = "\u2581"
PROBE_TEXTS = (
    "",
    " ",
    "x",
    "  leading spaces and trailing  ",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n",
    "\tif x:\n\t\ty = [i ** 2 for i in range(10)]  # squares\n",
    's = "héllo wörld 😀 中文"; n = 1234567890',
    "class A(object):\n    '''Doc.'''\n    pass\n",
)
"""Strings an exported ``tokenizer.json`` must encode exactly as SentencePiece does."""


def hf_tokenizer_json(model_path: str | Path, dummy_prefix: bool = True) -> dict:
    """A ``tokenizers`` BPE pipeline that gives the ids of a SentencePiece BPE model.

    SentencePiece BPE merges, at every step, the adjacent pair whose concatenation is the
    highest-scoring piece; a ``tokenizers`` BPE merges the pair of lowest rank. Ranking every
    (left, right) split of every piece by that piece's score makes the two agree. The text is
    normalised as SentencePiece does it (a ``▁`` prepended, spaces turned into ``▁``), with no
    pre-tokeniser: a ``Metaspace`` pre-tokeniser would not prepend ``▁`` to a text that
    starts with a space, and leading indentation would be split differently. Characters
    missing from the vocabulary fall back to byte pieces (``<0x0A>``), as in SentencePiece.
    BOS is added in front, as :meth:`Tokenizer.encode` does with ``bos=True``.
    """
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    size = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(size)}
    special = [i for i in range(size) if sp.is_control(i) or sp.is_unknown(i)]
    merges = []
    for i in range(size):
        if i in special or sp.is_byte(i) or sp.is_unused(i):
            continue
        piece = sp.id_to_piece(i)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-sp.get_score(i), i, left, right))
    merges.sort()
    normalizers: list[dict] = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    if dummy_prefix:
        normalizers.insert(0, {"type": "Prepend", "prepend": SPACE})
    bos = sp.id_to_piece(sp.bos_id())
    first = {"SpecialToken": {"id": bos, "type_id": 0}}
    decoders: list[dict] = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_special_token(sp.id_to_piece(i), i) for i in special],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                first,
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": sp.id_to_piece(sp.unk_id()),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[left, right] for _, _, left, right in merges],
        },
    }


@dataclass(frozen=True)
class SentencePieceSpec:
    """What a ``tokenizer.model`` says about its algorithm and normaliser."""

    model_type: str  # "BPE", "UNIGRAM", "WORD" or "CHAR"
    normalisation: str  # the normaliser's rule: "identity" (LLaMA), "nmt_nfkc" (the default), ...
    folds_whitespace: bool  # remove_extra_whitespaces: leading, trailing and repeated spaces


def sentencepiece_spec(model_path: str | Path) -> SentencePieceSpec:
    """The trainer's model type and the normaliser of a SentencePiece model file."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return SentencePieceSpec(
        model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type),
        proto.normalizer_spec.name,
        proto.normalizer_spec.remove_extra_whitespaces,
    )


def hf_unsupported_normalisation(model_path: str | Path) -> str | None:
    """The model's normalisation when :func:`hf_tokenizer_json` cannot reproduce it, else None.

    That pipeline only prepends ``▁`` and turns spaces into ``▁``: the identity rule without
    whitespace folding, as LLaMA's tokenizer has. Any other rule (``nmt_nfkc``, ``nfkc``...)
    rewrites characters before the merges, and folding drops leading, trailing and repeated
    spaces, which ``tokenizers`` normalisers do not do the same way (docs/DECISIONS.md
    2026-12-07)."""
    spec = sentencepiece_spec(model_path)
    if spec.normalisation == "identity" and not spec.folds_whitespace:
        return None
    folding = " with whitespace folding" if spec.folds_whitespace else ""
    return f"SentencePiece normalisation {spec.normalisation!r}{folding}"


def _special_token(content: str, token_id: int) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def hf_tokenizer_mismatch(
    tokenizer_json: dict, model_path: str | Path, texts: Iterable[str] = PROBE_TEXTS
) -> str | None:
    """The first text whose ids or decoded text differ between the two, or None."""
    from tokenizers import Tokenizer as FastTokenizer

    fast = FastTokenizer.from_str(json.dumps(tokenizer_json))
    ours = Tokenizer(model_path)
    for text in texts:
        ids = ours.encode(text, bos=True)
        if fast.encode(text).ids != ids or fast.decode(ids) != ours.decode(ids):
            return text
    return None
