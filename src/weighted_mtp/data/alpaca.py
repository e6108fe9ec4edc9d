"""The Alpaca prompt template (docs/METHOD.md §7), exactly as training and length filtering see it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
)
HEADER_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt: everything up to and including ``"### Response:\\n"``."""
    if input_text.strip():
        return (
            f"{HEADER_WITH_INPUT}### Instruction:\n{instruction}\n\n"
            f"### Input:\n{input_text}\n\n### Response:\n"
        )
    return f"{HEADER_NO_INPUT}### Instruction:\n{instruction}\n\n### Response:\n"


def format_text(record: Mapping[str, Any]) -> str:
    """Prompt plus response of an Alpaca record (BOS and EOS are added as token ids, not text)."""
    return format_prompt(record["instruction"], record.get("input", "")) + record["output"]
