"""Integrity and schema checks of the storage tree, and the verification report.

The checks themselves live beside the code that writes what they check
(:func:`weighted_mtp.storage.models.verify_model`,
:func:`weighted_mtp.storage.datasets.verify_datasets`); this module runs them, prints one
line per check, and writes ``reports/verification_report_<time>.json`` when asked.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from pathlib import Path

from weighted_mtp.storage.io import write_json_atomic
from weighted_mtp.storage.layout import StorageLayout


@dataclass
class Check:
    """One verification result: ``name`` is what was checked, ``detail`` why it failed."""

    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"[{mark}] {self.name}" + (f": {self.detail}" if self.detail else "")


def run_checks(
    layout: StorageLayout,
    check: str,
    include_small: bool = False,
    generate_report: bool = False,
    models: list[str] | None = None,
) -> tuple[list[Check], Path | None]:
    """Run the model and/or dataset checks; return them and the report path if written."""
    checks: list[Check] = []
    if check in ("models", "all"):
        from weighted_mtp.storage.models import verify_models

        checks += verify_models(layout, models)
    if check in ("datasets", "all"):
        from weighted_mtp.storage.datasets import verify_datasets

        checks += verify_datasets(layout, include_small=include_small)
    report = None
    if generate_report:
        stamp = dt.datetime.now().strftime("%Y%m%d_%H%M%S")
        report = layout.reports_dir / f"verification_report_{stamp}.json"
        write_json_atomic(
            report,
            {
                "storage": str(layout.root),
                "check": check,
                "include_small": include_small,
                "passed": all(c.ok for c in checks),
                "n_checks": len(checks),
                "n_failed": sum(not c.ok for c in checks),
                "checks": [asdict(c) for c in checks],
            },
        )
    return checks, report
