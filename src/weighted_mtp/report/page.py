"""Assemble the report: one self-contained ``index.html`` (figures embedded as data URIs, inline
CSS and a few lines of script for the head tabs, nothing fetched from the network) plus the
same figures as PNG files under ``figures/``."""

from __future__ import annotations

import base64
import html
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from weighted_mtp import registry
from weighted_mtp.report.figures import Figure, build_figures, run_color
from weighted_mtp.report.heatmap import heatmap_html, heatmap_png, scale_for
from weighted_mtp.report.runs import EvalResult, Run, load_runs
from weighted_mtp.report.style import CSS, SCRIPT

MAX_CONFIG_ROWS = 60


def build_report(
    run_dirs: list[Path], out_dir: Path, *, token_step: int | None = None, max_examples: int = 3
) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/figures/*.png`` for the runs; return the page.

    ``token_step`` picks the step of ``token_weights.jsonl`` to draw (default: the last one);
    ``max_examples`` caps the heat-map examples per run.
    """
    out_dir = Path(out_dir)
    figure_dir = out_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    runs = load_runs([Path(p) for p in run_dirs], token_step)
    figures = build_figures(runs)
    heat = _heatmap_figure(runs)
    if heat is not None:
        figures.append(heat)
    for figure in figures:
        (figure_dir / f"{figure.name}.png").write_bytes(figure.png)
    curves = [f for f in figures if f.name != "token_weights"]
    sections = [
        _header(runs),
        _config_diff(runs),
        _section("Curves", "".join(_figure_html(f) for f in curves) or _empty("metrics.jsonl")),
        _critic_diagnostics(runs),
        _placement(runs),
        _section("Evaluation", _eval_table(runs)),
        _decoding(runs),
        _section("Token weights", _heatmaps(runs, heat, max_examples)),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(_title(runs))}</title><style>{CSS}</style></head><body><main>"
        + "".join(sections)
        + f"</main><script>{SCRIPT}</script></body></html>\n"
    )
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _title(runs: list[Run]) -> str:
    return "wmtp report: " + (", ".join(r.label for r in runs) or "no runs")


def _weighting_label(run: Run) -> str:
    """The registry's display name of the run's weighting ("" for a value model)."""
    entry = registry.run_weighting(run.recipe, run.config)
    if entry is not None:
        return entry.label
    section = run.config.get("weighting") if isinstance(run.config, dict) else None
    name = section.get("name") if isinstance(section, dict) else None
    return str(name or "")


def _header(runs: list[Run]) -> str:
    rows = "".join(
        f'<tr><td><span class="swatch" style="background:{run_color(i)}"></span>'
        f"{_esc(r.label)}</td><td>{_esc(r.experiment)}</td><td>{_esc(r.recipe)}</td>"
        f"<td>{_esc(_weighting_label(r))}</td>"
        f"<td>{_esc(r.run_name)}</td><td>{_esc(r.base_model)}</td><td class='num'>{r.steps}</td>"
        f"<td class='num'>{_num(r.last('loss'))}</td>"
        f"<td class='num'>{_num(r.last('ce', 'val'))}</td>"
        f"<td class='num'>{_num(r.last('pair_accuracy', 'val'))}</td>"
        f"<td class='path'>{_esc(str(r.path))}</td></tr>"
        for i, r in enumerate(runs)
    )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"<header><h1>Weighted MTP report</h1><p class='meta'>Generated {generated} · "
        f"{len(runs)} run{'s' if len(runs) != 1 else ''}</p>"
        "<table class='runs'><thead><tr><th>run</th><th>experiment</th><th>recipe</th><th>weighting</th>"
        "<th>run name</th><th>base model</th><th>steps</th><th>last loss</th><th>last val CE</th>"
        "<th>last val pair acc.</th><th>folder</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></header>"
    )


def _config_diff(runs: list[Run]) -> str:
    """The config keys whose values differ between the runs (several runs only)."""
    if len(runs) < 2:
        return ""
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f})
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1][:MAX_CONFIG_ROWS]
    if not differ:
        return _section("Config differences", "<p>The runs' configs are identical.</p>")
    head = "".join(f"<th>{_esc(r.label)}</th>" for r in runs)
    body = "".join(
        f"<tr><td class='key'>{_esc(k)}</td>"
        + "".join(f"<td>{_esc(_short(f.get(k)))}</td>" for f in flat)
        + "</tr>"
        for k in differ
    )
    table = f"<table><thead><tr><th>key</th>{head}</tr></thead><tbody>{body}</tbody></table>"
    return _section("Config differences", f"<details><summary>{len(differ)} keys differ</summary>"
                    f"{table}</details>")  # fmt: skip


def _figure_html(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (
        f'<figure id="fig-{figure.name}"><h3>{_esc(figure.title)}</h3>'
        f'<img alt="{_esc(figure.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_esc(figure.caption)} (also <code>figures/{figure.name}.png</code>)"
        "</figcaption></figure>"
    )


def _critic_diagnostics(runs: list[Run]) -> str:
    blocks = []
    for run in runs:
        if not run.diagnostics:
            continue
        scalars = {k: v for k, v in run.diagnostics.items() if not isinstance(v, dict | list)}
        rows = "".join(f"<tr><td class='key'>{_esc(k)}</td><td class='num'>{_num(v)}</td></tr>"
                       for k, v in scalars.items())  # fmt: skip
        tables = [f"<table class='kv'><tbody>{rows}</tbody></table>"] if rows else []
        for name, value in run.diagnostics.items():
            if (
                isinstance(value, dict)
                and value
                and all(isinstance(v, dict) for v in value.values())
            ):
                tables.append(_nested_table(name, value))
        blocks.append(f"<h3>{_esc(run.label)}</h3><div class='row'>{''.join(tables)}</div>")
    if not blocks:
        return ""
    note = (
        "<p class='meta'>From <code>critic_diagnostics.json</code>: pairwise accuracy on the "
        "validation pairs and a length-only baseline, by length bin and difficulty.</p>"
    )
    return _section("Critic diagnostics", note + "".join(blocks))


PLACEMENT = "placement/"


def _placement(runs: list[Run]) -> str:
    """Per run, the last validation's placement metrics (``val/placement/*``): hit rates per
    ranking and weight mass inside the mutation span, beside the shuffled control and the
    position-only predictor (the reference a ranking must beat, docs/METHOD.md §6), with 95%
    bootstrap intervals, and a line saying which rankings fall below that predictor."""
    blocks = []
    for run in runs:
        last = {
            k[len(PLACEMENT) :]: s[-1][1] for k, s in run.val.items() if k.startswith(PLACEMENT)
        }
        if "n" not in last:
            continue
        step = run.val[f"{PLACEMENT}n"][-1][0]
        rankings = sorted({k.split("/")[0] for k in last if k.endswith("/hit")})
        rows = "".join(
            f"<tr><td class='key'>{_esc(r)} hit rate</td>"
            + "".join(f"<td class='num'>{_interval(last, f'{r}/{c}')}</td>"
                      for c in ("hit", "hit_length", "hit_shuffled"))
            + "".join(f"<td class='num'>{_difference(last, r, ref)}</td>"
                      for ref in ("length", "shuffled"))
            + "</tr>"
            for r in rankings
        )  # fmt: skip
        for name, label in (("mass_in", "weight mass inside"), ("ratio", "mean weight in / out")):
            if f"weight/{name}" in last:
                cells = "".join(f"<td class='num'>{_interval(last, f'weight/{name}{c}')}</td>"
                                for c in ("", "_length", "_shuffled"))  # fmt: skip
                rows += (f"<tr><td class='key'>{label}</td>{cells}<td class='num'>–</td>"
                         "<td class='num'>–</td></tr>")  # fmt: skip
        blocks.append(
            f"<h3>{_esc(run.label)}</h3><p class='meta'>step {step}: {int(last['n'])} incorrect "
            f"solutions, {_pct(last.get('token_frac_in'))} of their response tokens in the span"
            "</p><table><thead><tr><th></th><th>real</th><th>position-only</th>"
            "<th>shuffled control</th><th>real − position-only</th><th>real − shuffled</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>{_below_position_only(last, rankings)}"
        )
    if not blocks:
        return ""
    note = (
        "<p class='meta'>On incorrect validation solutions of a source with mutation spans: "
        "how often each ranking's top token lies in the span, and how much of the weight sits "
        "there, beside the exact shuffled control and the position-only predictor, which sees "
        "only positions and lengths and is fitted leave-one-out on the other solutions. The "
        "position-only predictor is the reference: a ranking finds the decisive token only "
        "where its hit rate is above it (real − position-only, a paired difference, with its "
        "95% interval above 0). 95% percentile bootstrap intervals over solutions in brackets; "
        "<code>adv_abs</code> ranks by |Â|, <code>adv_min</code> by the smallest TD weight, "
        "<code>delta_min</code> by the largest fall of the critic's value, <code>excess</code> "
        "by Rho-1's excess loss.</p>"
    )
    return _section("Where the weight goes", note + "".join(blocks))


def _difference(values: dict[str, float], ranking: str, reference: str) -> str:
    """``<ranking>/gain_<reference>`` (the paired difference hit − reference hit) with its
    interval; computed from the two hit rates, without an interval, where it was not logged."""
    key = f"{ranking}/gain_{reference}"
    if key in values:
        return _interval(values, key)
    hit, ref = values.get(f"{ranking}/hit"), values.get(f"{ranking}/hit_{reference}")
    return "–" if hit is None or ref is None else f"{hit - ref:.3f}"


def _below_position_only(values: dict[str, float], rankings: list[str]) -> str:
    """One line: the rankings below the position-only predictor (paired interval below 0),
    those below it by the point estimate only, and those above it (interval above 0)."""
    groups: dict[str, list[str]] = {"below": [], "lower": [], "untested": [], "above": []}
    for ranking in rankings:
        key = f"{ranking}/gain_length"
        value, low, high = values.get(key), values.get(f"{key}_lo"), values.get(f"{key}_hi")
        if value is None or low is None or high is None:  # no paired interval logged
            hit, ref = values.get(f"{ranking}/hit"), values.get(f"{ranking}/hit_length")
            if hit is not None and ref is not None and hit < ref:
                groups["untested"].append(ranking)
        elif high < 0:
            groups["below"].append(ranking)
        elif low > 0:
            groups["above"].append(ranking)
        elif value < 0:
            groups["lower"].append(ranking)
    labels = {
        "below": "below the position-only predictor",
        "lower": "below it by the point estimate only (paired interval includes 0)",
        "untested": "below it by the point estimate (no paired interval logged)",
        "above": "above it",
    }
    parts = [f"{labels[g]}: {_names(names)}" for g, names in groups.items() if names]
    if not any(groups[g] for g in ("below", "lower", "untested")):
        parts.insert(0, "no ranking below the position-only predictor")
    if parts[0].startswith("below it"):  # "it" needs its antecedent
        parts[0] = parts[0].replace("it", "the position-only predictor", 1)
    text = "; ".join(parts)
    return f"<p class='meta placement-verdict'>{text[0].upper()}{text[1:]}.</p>"


def _names(rankings: list[str]) -> str:
    return ", ".join(f"<code>{_esc(r)}</code>" for r in rankings)


def _interval(values: dict[str, float], key: str) -> str:
    if key not in values:
        return "–"
    low, high = values.get(f"{key}_lo"), values.get(f"{key}_hi")
    text = f"{values[key]:.3f}"
    if low is None or high is None:
        return text
    return text + f" <span class='se'>[{low:.3f}, {high:.3f}]</span>"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _nested_table(name: str, data: dict[str, dict[str, Any]]) -> str:
    fields = list(dict.fromkeys(f for row in data.values() for f in row))
    head = "".join(f"<th>{_esc(f)}</th>" for f in fields)
    body = "".join(
        f"<tr><td class='key'>{_esc(k)}</td>"
        + "".join(f"<td class='num'>{_num(row.get(f))}</td>" for f in fields)
        + "</tr>"
        for k, row in data.items()
    )
    return (f"<table><caption>{_esc(name)}</caption><thead><tr><th></th>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")  # fmt: skip


def _eval_table(runs: list[Run]) -> str:
    results = [(run, result) for run in runs for result in run.evals]
    if not results:
        return _empty("<checkpoint>/eval/<dataset>/summary.json (run `wmtp evaluate`)")
    metrics = sorted(
        {m for _, r in results for m in (r.summary.get("pass_at_k") or {})},
        key=lambda m: int(m.split("@")[-1]) if m.split("@")[-1].isdigit() else 0,
    )
    if any("accuracy" in r.summary for _, r in results):
        metrics.append("accuracy")
    head = "".join(f"<th>{_esc(m)}</th>" for m in metrics)
    body = "".join(_eval_row(run, result, metrics) for run, result in results)
    return (
        "<div class='scroll'><table class='eval'><thead><tr><th>run</th><th>checkpoint</th>"
        "<th>dataset</th>"
        f"<th>problems</th><th>samples / problem</th><th>temperature</th><th>prompt</th>{head}"
        "<th>tokens / step</th><th>acceptance by head</th><th>tokens / s</th></tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
        "<p class='meta'>Means over problems ± standard error [95% interval: mean ± 1.96 "
        "standard errors]. "
        "Acceptance: the share of head k's drafts accepted when verified (speculative decoding)."
        "</p>"
    )


def _eval_row(run: Run, result: EvalResult, metrics: list[str]) -> str:
    s = result.summary
    settings = s.get("settings") if isinstance(s.get("settings"), dict) else {}
    decoding = s.get("decoding") if isinstance(s.get("decoding"), dict) else {}
    scores = {**(s.get("pass_at_k") or {}), "accuracy": s.get("accuracy")}
    cells = "".join(f"<td class='num'>{_mean_se(scores.get(m))}</td>" for m in metrics)
    accept = _acceptance(decoding.get("acceptance"))
    spec = settings.get("speculative")
    return (
        f"<tr><td>{_esc(run.label)}</td><td>{_esc(result.checkpoint)}</td>"
        f"<td>{_esc(result.dataset)}</td><td class='num'>{_num(s.get('problems'))}</td>"
        f"<td class='num'>{_num(settings.get('num_samples'))}</td>"
        f"<td class='num'>{_num(settings.get('temperature'))}</td>"
        f"<td>{_esc(str(settings.get('prompt_mode', '–')))}</td>{cells}"
        f"<td class='num'>{_num(decoding.get('tokens_per_step')) if spec else '–'}</td>"
        f"<td class='accept'>{accept}</td>"
        f"<td class='num'>{_num(decoding.get('tokens_per_s'))}</td></tr>"
    )


def _acceptance(acceptance: Any) -> str:
    """Per-head acceptance as ``h2 0.97 · h3 0.98 · ...`` (heads 2.. in order), else a dash."""
    if not isinstance(acceptance, list) or not acceptance:
        return "–"
    return " · ".join(f"h{i + 2} {a:.2f}" for i, a in enumerate(acceptance))


def _decoding(runs: list[Run]) -> str:
    """``decoding.json`` beside an evaluation: plain against self-speculative greedy decoding,
    one prompt at a time (``wmtp quickstart``'s decoding stage)."""
    rows = []
    for run in runs:
        for result in run.evals:
            d = result.decoding
            if not d:
                continue
            accept = _acceptance(d.get("acceptance"))
            rows.append(
                f"<tr><td>{_esc(run.label)}</td><td>{_esc(result.checkpoint)}</td>"
                f"<td>{_esc(result.dataset)}</td><td class='num'>{_num(d.get('prompts'))}</td>"
                f"<td class='num'>{_num(d.get('same_tokens'))}</td>"
                f"<td class='num'>{_num(d.get('plain_tokens_per_s'))}</td>"
                f"<td class='num'>{_num(d.get('speculative_tokens_per_s'))}</td>"
                f"<td class='num'>{_num(d.get('speedup'))}x</td>"
                f"<td class='num'>{_num(d.get('tokens_per_step'))}</td>"
                f"<td class='accept'>{accept}</td></tr>"
            )
    if not rows:
        return ""
    return _section(
        "Decoding speed",
        "<div class='scroll'><table class='eval'><thead><tr><th>run</th><th>checkpoint</th>"
        "<th>dataset</th><th>prompts</th><th>same tokens</th><th>plain tokens / s</th>"
        "<th>speculative tokens / s</th><th>speed-up</th><th>tokens / step</th>"
        f"<th>acceptance by head</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        "<p class='meta'>Greedy decoding one prompt at a time, plain and self-speculative "
        "alternating prompt by prompt; greedy speculative decoding must give the same tokens. "
        "Acceptance of head k is conditional on the drafts before it being accepted.</p>",
    )


def _heatmap_figure(runs: list[Run]) -> Figure | None:
    """A PNG of head 1 on the first example of the run whose weights vary most
    (continuous before selection before uniform)."""
    candidates = [r for r in runs if r.token_weights]
    if not candidates:
        return None
    run = max(candidates, key=_weight_spread)
    example = run.token_weights[0]
    title = f"{run.label}: example {example.example}, step {example.step}, head 1"
    png = heatmap_png(example, scale_for(run), 0, title)
    return Figure("token_weights", "Token weights (head 1)", title, png)


def _weight_spread(run: Run) -> tuple[bool, float]:
    values = [w for w in run.token_weights[0].weights[0] if w is not None]
    spread = max(values) - min(values) if values else 0.0
    return scale_for(run).mode == "continuous" and spread > 0, spread


def _heatmaps(runs: list[Run], figure: Figure | None, max_examples: int) -> str:
    blocks = "".join(heatmap_html(run, i, max_examples) for i, run in enumerate(runs))
    if not blocks:
        return _empty("token_weights.jsonl")
    intro = (
        "<p class='meta'>Validation examples from the last logged step. Each token's background "
        "is the loss weight the selected head puts on predicting it; hover a token for its exact "
        "weight. The prompt is folded away (no head predicts it).</p>"
    )
    png = (f"<p class='meta'>A PNG of the first map is saved as "
           f"<code>figures/{figure.name}.png</code>.</p>" if figure else "")  # fmt: skip
    return intro + blocks + png


def _section(title: str, body: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>{body}</section>'


def _empty(source: str) -> str:
    return f"<p class='empty'>Nothing to show: no {_esc(source)} found in these runs.</p>"


def _mean_se(value: Any) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("mean"), int | float):
        return "–"
    se = value.get("stderr")
    text = f"{100 * value['mean']:.1f}%"
    if not isinstance(se, int | float):
        return text
    # mean +- 1.96 s.e. (docs/EVALUATION.md §3; evaluation.metrics.normal_interval, which this
    # layer may not import)
    lo, hi = value["mean"] - 1.96 * se, value["mean"] + 1.96 * se
    return text + (f" <span class='se'>± {100 * se:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]</span>")


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return _esc(str(value))


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _short(value: Any) -> str:
    text = "–" if value is None else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict)
                   else {f"{prefix}{key}": value})  # fmt: skip
    return out
