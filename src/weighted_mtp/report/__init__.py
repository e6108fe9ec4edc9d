"""HTML report over training run folders: curves, evaluation tables, token-weight heat maps.

``build_report(run_dirs, out_dir)`` writes ``out_dir/index.html`` (self-contained, works offline)
and ``out_dir/figures/*.png``; ``link_report(run_dirs, page)`` tags the runs' MLflow runs
with the page's path.
"""

from weighted_mtp.report.page import build_report
from weighted_mtp.report.runs import link_report

__all__ = ["build_report", "link_report"]
