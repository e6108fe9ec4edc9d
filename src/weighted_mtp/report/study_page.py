"""The one page of a study (``wmtp study``): pass@1 per arm with its interval, every arm against
the baseline with its test and verdict, and the runs behind them.

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
        + _section("Arms against the baseline", _arms_table(summary))
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
    comparisons = {c["arm"]: c for c in summary.get("comparisons", [])}
    rows = []
    for arm, row in arms.items():
        c = comparisons.get(arm)
        if c is not None:
            versus = (
                f"<td class='num'>{_pct(c['difference'], True)} <span class='se'>"
                f"[{_pct(c['low'], True)}, {_pct(c['high'], True)}]</span></td>"
                f"<td class='num'>{c['p_value']:.3g}</td><td>{_esc(c['test'])}</td>"
                f"<td><b>{_esc(c['verdict'])}</b></td>"
            )
        elif arm == summary.get("baseline"):
            versus = "<td colspan='4' class='note'>the baseline</td>"
        else:
            versus = "<td colspan='4' class='note'>no baseline to compare with</td>"
        per_seed = ", ".join(f"{s}: {_pct(v)}" for s, v in row.get("per_seed", {}).items())
        rows.append(
            f"<tr><td>{_esc(arm)}</td><td>{_esc(str(row.get('recipe', '')))}</td>"
            f"<td>{_esc(str(row.get('control', '')))}</td>"
            f"<td class='num'>{_pct(row['pass_at_1'])} <span class='se'>"
            f"[{_pct(row['low'])}, {_pct(row['high'])}]</span></td>"
            f"<td class='num'>{_esc(per_seed)}</td>{versus}</tr>"
        )
    note = (
        "<p class='meta'>Intervals: 95% percentile bootstrap over problems. Against the "
        "baseline: McNemar's exact test with one seed, else the paired bootstrap of per-problem "
        "scores; the verdict is 'better' or 'worse' when p &lt; 0.05, else 'not "
        "distinguishable'.</p>"
    )
    return (
        "<div class='scroll'><table class='eval'><thead><tr><th>arm</th><th>recipe</th>"
        "<th>control</th><th>pass@1 [95%]</th><th>per seed</th><th>arm − baseline [95%]</th>"
        "<th>p</th><th>test</th><th>verdict</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
        + note
    )


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
