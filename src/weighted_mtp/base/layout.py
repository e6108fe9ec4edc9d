"""Every path of the storage tree, in one place.

The tree is the storage contract of docs/STORAGE.md §1: ``models/``,
``datasets/``, ``datasets_local_small/``, ``checkpoints/`` and ``reports/`` under one root.
The root is ``--storage``, else ``$WMTP_STORAGE``, else ``./storage``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODEL_NAMES = ("meta-llama-mtp", "ref-sheared-llama-2.7b", "micro-mtp", "micro-reference")
DATASET_NAMES = ("codecontests", "mbpp", "humaneval", "gsm8k")
# The split each benchmark is evaluated on (CodeContests: the problem-level file with its tests).
EVAL_FILES = {"humaneval": "test", "mbpp": "test", "gsm8k": "test", "codecontests": "test_eval"}
# Evaluation datasets: the benchmarks and the small subsets of their test splits (CodeContests'
# small split holds training-style solution records, not the evaluation file, so it is not one).
EVAL_DATASETS = (*EVAL_FILES, "humaneval_small", "mbpp_small", "gsm8k_small")

# Split names per dataset (docs/STORAGE.md §3).
DATASET_SPLITS: dict[str, tuple[str, ...]] = {
    "codecontests": ("train", "valid", "test"),
    "mbpp": ("train", "validation", "test"),
    "humaneval": ("test",),
    "gsm8k": ("train", "test"),
}

# Lines per split of the small datasets (docs/STORAGE.md §3).
SMALL_SIZES: dict[str, dict[str, int]] = {
    "codecontests": {"train": 100, "valid": 32, "test": 32},
    "mbpp": {"train": 100, "validation": 32, "test": 32},
    "humaneval": {"test": 32},
    "gsm8k": {"train": 100, "test": 32},
}


def resolve_root(storage: str | os.PathLike[str] | None = None) -> Path:
    """The storage root: the argument, else ``$WMTP_STORAGE``, else ``./storage``."""
    if storage:
        return Path(storage)
    env = os.environ.get("WMTP_STORAGE")
    return Path(env) if env else Path("storage")


@dataclass(frozen=True)
class ModelPaths:
    """Paths of one model folder under ``models/<name>/``."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def safetensors_dir(self) -> Path:
        return self.root / "safetensors"

    @property
    def weights(self) -> Path:
        return self.safetensors_dir / "model.safetensors"

    @property
    def checksums(self) -> Path:
        return self.safetensors_dir / "SHA256SUMS"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer(self) -> Path:
        return self.tokenizer_dir / "tokenizer.model"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.json"


@dataclass(frozen=True)
class DatasetPaths:
    """Paths of one dataset under ``datasets/<name>/`` and its small copy."""

    root: Path
    small_root: Path
    name: str

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    def split(self, split: str) -> Path:
        return self.processed / f"{split}.jsonl"

    def split_metadata(self, split: str) -> Path:
        return self.processed / f"{split}_metadata.json"

    def split_index(self, split: str) -> Path:
        """Byte offsets of every line of ``<split>.jsonl`` (little-endian uint64)."""
        return self.processed / f"{split}.idx"

    def split_problems(self, split: str) -> Path:
        """``<split>_metadata.json`` without its per-line list: cheap to load."""
        return self.processed / f"{split}_problems.json"

    def eval_index(self, split: str) -> Path:
        return self.processed / f"{split}_eval.idx"

    @property
    def manifest(self) -> Path:
        """What each dataset step built, from what, with which options."""
        return self.root / "manifest.json"

    def eval_file(self, split: str) -> Path:
        return self.processed / f"{split}_eval.jsonl"

    @property
    def schema(self) -> Path:
        return self.processed / "schema.json"

    @property
    def tests_dir(self) -> Path:
        return self.root / "tests"

    def tests_file(self, split: str) -> Path:
        return self.tests_dir / f"{split}_tests.json"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    @property
    def small(self) -> Path:
        return self.small_root / f"{self.name}_small"

    def small_split(self, split: str) -> Path:
        return self.small / f"{split}_small.jsonl"

    def small_split_index(self, split: str) -> Path:
        return self.small / f"{split}_small.idx"

    def small_split_metadata(self, split: str) -> Path:
        return self.small / f"{split}_small_metadata.json"

    def small_split_problems(self, split: str) -> Path:
        return self.small / f"{split}_small_problems.json"


@dataclass(frozen=True)
class StorageLayout:
    """The storage tree rooted at ``root``."""

    root: Path

    @classmethod
    def from_arg(cls, storage: str | os.PathLike[str] | None = None) -> StorageLayout:
        return cls(resolve_root(storage))

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def small_datasets_dir(self) -> Path:
        return self.root / "datasets_local_small"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def model(self, name: str) -> ModelPaths:
        return ModelPaths(self.models_dir / name)

    def dataset(self, name: str) -> DatasetPaths:
        return DatasetPaths(self.datasets_dir / name, self.small_datasets_dir, name)

    def checkpoint(self, experiment: str) -> Path:
        return self.checkpoints_dir / experiment

    def mlflow_uri(self) -> str:
        """The default MLflow tracking store: a sqlite file at the storage root."""
        return f"sqlite:///{(self.root / 'mlflow.db').resolve()}"


def training_tokenizer_path(layout: StorageLayout) -> Path | None:
    """The tokenizer data is measured with: the real model's, else a micro model's."""
    for name in ("meta-llama-mtp", "micro-mtp", "micro-reference", "ref-sheared-llama-2.7b"):
        path = layout.model(name).tokenizer
        if path.is_file():
            return path
    return None


# ``--model`` names of the storage commands -> model folders (kept here, beside the paths, so that
# the CLI can list them without importing the model code).
MODEL_ALIASES = {
    "meta-llama-mtp": "meta-llama-mtp",
    "ref-sheared-llama-2.7b": "ref-sheared-llama-2.7b",
    "ref-sheared-llama": "ref-sheared-llama-2.7b",  # the name an earlier public CLI used
}
