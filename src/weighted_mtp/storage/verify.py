"""Integrity and schema checks of the storage tree, and the verification report.

The checks themselves live beside the code that writes what they check
(:func:`weighted_mtp.storage.models.verify_models`,
:func:`weighted_mtp.storage.dataset_verify.verify_datasets`); this module runs them and writes
``reports/verification_report_<time>.json`` when asked.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from pathlib import Path

from weighted_mtp.base.io import write_json_atomic
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.storage.checks import Check
from weighted_mtp.storage.dataset_verify import verify_datasets
from weighted_mtp.storage.models import verify_models


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
        checks += verify_models(layout, models)
    if check in ("datasets", "all"):
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
