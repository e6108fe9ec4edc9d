"""One verification result, shared by the model and dataset checks and the report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Check:
    """One verification result: ``name`` is what was checked, ``detail`` why it failed."""

    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"[{mark}] {self.name}" + (f": {self.detail}" if self.detail else "")
