"""The one page of a study (``wmtp study``): per dataset, pass@1 and pass@k per arm with the
interval of pass@1, every contrast (an arm against the baseline or its shuffled control) with
its discordant counts, raw and Holm-adjusted p-values (over every contrast of every dataset),
detectable difference and verdict, and the runs behind them.

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
    blocks = summary.get("datasets", {})
    evaluated = "; ".join(
        f"<code>{_esc(d)}</code>: {_esc(settings_text(b.get('settings', {})))}, "
        f"{b.get('problems', 0)} problems scored by every run"
        for d, b in blocks.items()
    )
    digests = ", ".join(
        f"{_esc(d)} <code>{_esc(str(b.get('data_manifest_sha256')))}</code>"
        for d, b in blocks.items()
    )
    header = (
        f"<header><h1>Study {_esc(name)}</h1><p class='meta'>Generated {generated} · "
        f"spec {_esc(str(summary.get('spec_file', '')))} · recipes from "
        f"{_esc(str(summary.get('configs', '')))}</p>"
        f"<p>Seeds {_esc(', '.join(str(s) for s in spec.get('seeds', [])))}, "
        f"{budget.get('steps')} optimizer steps per arm. Evaluated on {evaluated}.</p>"
        f"<p>{_budget_line(summary)}</p>"
        f"<p class='meta'>Pooling: {_esc(str(summary.get('pooling', '')))}. Data manifests "
        f"(SHA-256): {digests}</p></header>"
    )
    sections = "".join(
        _section(f"Arms on {dataset}", _arms_table(block, summary.get("baseline")))
        for dataset, block in blocks.items()
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>wmtp study: {_esc(name)}</title><style>{CSS}</style></head><body><main>"
        + header
        + sections
        + _section("Contrasts", _contrasts_table(summary))
        + _section("Runs", _runs_table(summary))
        + "</main></body></html>\n"
    )


def settings_text(settings: dict[str, Any]) -> str:
    """A dataset's evaluation settings in words: "1 sample per problem, greedy, ..." or "20
    samples per problem, temperature 0.8, top_p 0.95, ...", with the token limit."""
    if not settings:
        return ""
    n = settings.get("samples", 1)
    how = (
        "greedy"
        if settings.get("temperature", 0) == 0
        else f"temperature {settings['temperature']:g}, top_p {settings.get('top_p', 1):g}"
    )
    return (f"{n} sample{'s' if n != 1 else ''} per problem, {how}, at most "
            f"{settings.get('max_new_tokens')} new tokens")  # fmt: skip


def _budget_line(summary: dict[str, Any]) -> str:
    if summary.get("same_steps", True) and summary.get("same_training_examples", True):
        return "Every finished arm run trained the same steps over the same sampled examples."
    return (
        "<b>The finished arm runs did not all train the same steps over the same examples</b> "
        "(steps and training manifests in the runs table)."
    )


INTERVAL_RULE = (
    "95% intervals over problems, pooled and per seed: Wilson's score interval where every "
    "problem's value is pass or fail (0 or 1), else the percentile bootstrap over problems of "
    "their pass rates (10,000 resamples)"
)
"""How an arm's pass@1 interval is made (docs/EVALUATION.md §5); ``interval`` in study.json
names the pooled one's method."""


def _arms_table(block: dict[str, Any], baseline: str | None) -> str:
    arms = block.get("arms", {})
    if not arms:
        return "<p class='empty'>No arm has finished all its seeds yet.</p>"
    ks = [k for k in next(iter(arms.values())).get("pass_at_k", {}) if k != "pass@1"]
    rows = []
    for arm, row in arms.items():
        intervals = row.get("per_seed_interval", {})
        per_seed = ", ".join(
            f"{s}: {_pct(v)}" + (f" [{_pct(intervals[s][0])}, {_pct(intervals[s][1])}]"
                                 if s in intervals else "")
            for s, v in row.get("per_seed", {}).items()
        )  # fmt: skip
        role = " (baseline)" if arm == baseline else ""
        at_k = "".join(f"<td class='num'>{_pct(row['pass_at_k'][k])}</td>" for k in ks)
        rows.append(
            f"<tr><td>{_esc(arm)}{role}</td><td>{_esc(str(row.get('recipe', '')))}</td>"
            f"<td>{_esc(str(row.get('control', '')))}</td>"
            f"<td class='num'>{_pct(row['pass_at_1'])} <span class='se'>"
            f"[{_pct(row['low'])}, {_pct(row['high'])}]</span></td>{at_k}"
            f"<td class='num'>{_esc(per_seed)}</td></tr>"
        )
    note = (
        "<p class='meta'>pass@1: per problem the fraction of its samples that passed, averaged "
        "over seeds, then over problems; pass@k: the unbiased estimator from the same samples. "
        f"{_esc(INTERVAL_RULE)}.</p>"
    )
    head_k = "".join(f"<th>{_esc(k)}</th>" for k in ks)
    return (
        "<div class='scroll'><table class='eval'><thead><tr><th>arm</th><th>recipe</th>"
        f"<th>control</th><th>pass@1 [95%]</th>{head_k}<th>per seed [95%]</th></tr></thead>"
        "<tbody>" + "".join(rows) + "</tbody></table></div>" + note
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
    clusters = ", ".join(
        f"{_esc(d)} {b.get('clusters')}" for d, b in summary.get("datasets", {}).items()
    )
    rows = "".join(
        f"<tr><td>{_esc(str(c.get('dataset', '')))}</td>"
        f"<td>{_esc(c['arm'])} − {_esc(c['baseline'])}</td>"
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
        f"<p class='meta'>Paired per {unit} (clusters: {clusters}; a problem's value is its "
        "pass rate averaged over seeds): the exact sign-flip test of the per-cluster mean "
        "differences (random sign patterns past 20 non-zero clusters of unequal sizes), its "
        "inversion for the 95% interval, Holm's adjustment over all "
        f"{len(comparisons)} contrasts of every dataset for the "
        "verdict ('better' or 'worse' when the adjusted p &lt; 0.05). + / −: clusters and "
        "problems where the arm scored higher / lower. Detectable: the difference this study "
        "would find with 80% power at alpha 0.05, (1.96 + 0.84) × SD of the per-cluster "
        "differences / √clusters.</p>"
    )
    return (
        "<div class='scroll'><table class='eval'><thead><tr><th>dataset</th>"
        "<th>arm − reference</th>"
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
