"""The one page of a study (``wmtp study``): pass@1 per arm with its interval, every contrast
(an arm against the baseline or its shuffled control) with its discordant counts, raw and
Holm-adjusted p-values, detectable difference and verdict, and the runs behind them.

It takes the study's summary (the content of ``study.json``) and returns a self-contained HTML
page in the report's style (``report/style.py``): nothing is fetched, nothing is drawn.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

from weighted_mtp.report.style import CSS


def study_page(summary: dict[str, Any]) -> str:
    """The HTML page of a study summary."""
    name = str(summary.get("name", "study"))
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    spec = summary.get("spec", {})
    budget = spec.get("budget", {})
    evaluation = spec.get("evaluation", {})
    header = (
        f"<header><h1>Study {_esc(name)}</h1><p class='meta'>Generated {generated} · "
        f"spec {_esc(str(summary.get('spec_file', '')))} · recipes from "
        f"{_esc(str(summary.get('configs', '')))}</p>"
        f"<p>Greedy pass@1 on <code>{_esc(str(summary.get('dataset')))}</code> "
        f"({summary.get('problems', 0)} problems scored by every run), seeds "
        f"{_esc(', '.join(str(s) for s in spec.get('seeds', [])))}, "
        f"{budget.get('steps')} optimizer steps per arm, at most "
        f"{evaluation.get('max_new_tokens')} new tokens.</p>"
        f"<p>{_budget_line(summary)}</p>"
        f"<p class='meta'>Pooling: {_esc(str(summary.get('pooling', '')))}. Data manifest "
        f"SHA-256: <code>{_esc(str(summary.get('data_manifest_sha256')))}</code></p></header>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>wmtp study: {_esc(name)}</title><style>{CSS}</style></head><body><main>"
        + header
        + _section("Arms", _arms_table(summary))
        + _section("Contrasts", _contrasts_table(summary))
        + _section("Runs", _runs_table(summary))
        + "</main></body></html>\n"
    )


def _budget_line(summary: dict[str, Any]) -> str:
    if summary.get("same_steps", True) and summary.get("same_training_examples", True):
        return "Every finished arm run trained the same steps over the same sampled examples."
    return (
        "<b>The finished arm runs did not all train the same steps over the same examples</b> "
        "(steps and training manifests in the runs table)."
    )


def _arms_table(summary: dict[str, Any]) -> str:
    arms = summary.get("arms", {})
    if not arms:
        return "<p class='empty'>No arm has finished all its seeds yet.</p>"
    rows = []
    for arm, row in arms.items():
        intervals = row.get("per_seed_interval", {})
        per_seed = ", ".join(
            f"{s}: {_pct(v)}" + (f" [{_pct(intervals[s][0])}, {_pct(intervals[s][1])}]"
                                 if s in intervals else "")
            for s, v in row.get("per_seed", {}).items()
        )  # fmt: skip
        role = " (baseline)" if arm == summary.get("baseline") else ""
        rows.append(
            f"<tr><td>{_esc(arm)}{role}</td><td>{_esc(str(row.get('recipe', '')))}</td>"
            f"<td>{_esc(str(row.get('control', '')))}</td>"
            f"<td class='num'>{_pct(row['pass_at_1'])} <span class='se'>"
            f"[{_pct(row['low'])}, {_pct(row['high'])}]</span></td>"
            f"<td class='num'>{_esc(per_seed)}</td></tr>"
        )
    note = (
        "<p class='meta'>Intervals: 95% Wilson score intervals, over problems for the pooled "
        "pass@1 (a problem's score is the mean over seeds) and per seed.</p>"
    )
    return (
        "<div class='scroll'><table class='eval'><thead><tr><th>arm</th><th>recipe</th>"
        "<th>control</th><th>pass@1 [95%]</th><th>per seed [95%]</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
        + note
    )


def _contrasts_table(summary: dict[str, Any]) -> str:
    comparisons = summary.get("comparisons", [])
    pending = summary.get("contrasts_pending", [])
    waiting = (
        f"<p class='note'>Waiting for runs: {_esc(', '.join(pending))}.</p>" if pending else ""
    )
    if not comparisons:
        return "<p class='empty'>No contrast has both its arms finished yet.</p>" + waiting
    unit = "family" if summary.get("cluster") == "family" else "problem"
    units = "families" if unit == "family" else "problems"
    rows = "".join(
        f"<tr><td>{_esc(c['arm'])} − {_esc(c['baseline'])}</td>"
        f"<td class='num'>{_pct(c['difference'], True)} <span class='se'>"
        f"[{_pct(c['low'], True)}, {_pct(c['high'], True)}]</span></td>"
        f"<td class='num'>{c['arm_better']} / {c['baseline_better']}</td>"
        f"<td class='num'>{c['problems_arm_better']} / {c['problems_baseline_better']}</td>"
        f"<td class='num'>{c['p_value']:.3g}</td><td class='num'>{c['p_adjusted']:.3g}</td>"
        f"<td class='num'>{_detectable(c.get('detectable'))}</td><td>{_esc(c['test'])}</td>"
        f"<td><b>{_esc(c['verdict'])}</b><br><span class='se'>{_esc(c['statement'])}"
        "</span></td></tr>"
        for c in comparisons
    )
    note = (
        f"<p class='meta'>Paired per {unit} ({summary.get('clusters')} clusters; seeds are "
        "averaged inside a cluster): the exact sign-flip test of the per-cluster mean "
        "differences (random sign patterns past 20 non-zero clusters), its inversion for the "
        f"95% interval, Holm's adjustment over the {len(comparisons)} contrasts for the "
        "verdict ('better' or 'worse' when the adjusted p &lt; 0.05). + / −: clusters and "
        "problems where the arm scored higher / lower. Detectable: the difference this study "
        "would find with 80% power at alpha 0.05, (1.96 + 0.84) × SD of the per-cluster "
        "differences / √clusters.</p>"
    )
    return (
        "<div class='scroll'><table class='eval'><thead><tr><th>arm − reference</th>"
        f"<th>difference [95%]</th><th>{units} + / −</th><th>problems + / −</th><th>p</th>"
        "<th>Holm p</th><th>detectable</th><th>test</th><th>verdict</th></tr></thead><tbody>"
        + rows
        + "</tbody></table></div>"
        + note
        + waiting
    )


def _detectable(value: float | None) -> str:
    return "–" if value is None else _pct(value)


def _runs_table(summary: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_esc(str(r['arm']))}</td><td class='num'>{r['seed']}</td>"
        f"<td>{_esc(str(r['state']))}</td><td class='num'>{r.get('steps', '–')}</td>"
        f"<td class='path'>{_esc(str(r['run_dir']))}</td></tr>"
        for r in summary.get("runs", [])
    )
    missing = summary.get("missing", [])
    note = f"<p class='note'>Not finished: {_esc(', '.join(missing))}.</p>" if missing else ""
    return (
        "<table><thead><tr><th>arm</th><th>seed</th><th>state</th><th>steps</th>"
        f"<th>folder</th></tr></thead><tbody>{rows}</tbody></table>{note}"
    )


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_esc(title)}</h2>{body}</section>"


def _pct(value: float, signed: bool = False) -> str:
    return f"{100 * value:+.1f}%" if signed else f"{100 * value:.1f}%"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)
