"""Curves for the report as PNG images (matplotlib, Agg backend).

A figure is a grid of panels; a panel draws named metrics for every run, one colour per run.
Training values are plain lines, validation values lines with round markers, and a second
metric in the same panel (weighted CE beside CE, the high clip fraction beside the low one) is
dashed. Panels whose metrics no run logged are dropped, and a figure with no panel left is not
drawn, so any subset of metric names works.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from weighted_mtp import registry
from weighted_mtp.report.runs import Run

RUN_COLORS = plt.get_cmap("tab10").colors
STYLES = ("-", "--", ":", "-.")
HEAD = re.compile(r"^(?:ce|wce|weight_mean)/head(\d+)$")


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]
    splits: tuple[str, ...] = ("train", "val")


@dataclass
class Figure:
    name: str
    title: str
    caption: str
    png: bytes


def run_color(index: int) -> str:
    r, g, b = RUN_COLORS[index % len(RUN_COLORS)][:3]
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def head_numbers(runs: list[Run]) -> list[int]:
    found = {
        int(m.group(1)) for r in runs for s in (r.train, r.val) for k in s if (m := HEAD.match(k))
    }
    return sorted(found)


def build_figures(runs: list[Run]) -> list[Figure]:
    """Every figure that the runs' metrics can fill, in page order."""
    colors = {run.label: run_color(i) for i, run in enumerate(runs)}
    policy = [r for r in runs if not registry.is_value_recipe(r.recipe)]
    critic = [r for r in runs if registry.is_value_recipe(r.recipe)]
    heads = head_numbers(policy)
    # Each registered weighting's own statistics (its registry entry's panels), then per head.
    weighted = [e for e in registry.report_entries() if e.report_panels]
    weight_panels = [Panel(title, keys) for e in weighted for title, keys in e.report_panels]
    weight_panels.append(
        Panel("weight mean per head", tuple(f"weight_mean/head{k}" for k in heads))
    )
    specs: list[tuple[str, str, str, list[Run], list[Panel], int]] = [
        ("loss", "Loss and cross-entropy", "Left to right: the training objective and the "
         "unweighted CE averaged over heads, training then validation.", policy, [
            Panel("loss (train)", ("loss",), ("train",)),
            Panel("loss (val)", ("loss",), ("val",)),
            Panel("CE (train)", ("ce",), ("train",)),
            Panel("CE (val)", ("ce",), ("val",)),
        ], 4),
        ("ce_heads", "CE per head: unweighted (solid) vs weighted (dashed)", "Top row "
         "training, bottom row validation; head k predicts the token k positions ahead.",
         policy, [Panel(f"head {k} ({split})", (f"ce/head{k}", f"wce/head{k}"), (split,))
                  for split in ("train", "val") for k in heads], max(1, len(heads))),
        ("weights", "Token-weight statistics", "Each weighting's own statistics ("
         + ", ".join(e.label for e in weighted) + "; a second metric in a panel is dashed, "
         "e.g. the share of weights clipped high beside those clipped low) and the per-head "
         "mean weight (heads 1-4: solid, dashed, dotted, dash-dot).", policy, weight_panels, 4),
        ("critic", "Critic training", "Pairwise accuracy (is the correct solution valued "
         "above the incorrect one) and value diagnostics, training and validation.", critic, [
            Panel("pairwise accuracy", ("pair_accuracy",)),
            Panel("loss", ("loss",)),
            Panel("margin", ("margin",)),
            Panel("value: correct / incorrect", ("value_pos", "value_neg")),
            Panel("position correlation", ("position_corr",)),
            Panel("spikiness", ("spikiness",)),
            Panel("token variance", ("token_var",)),
        ], 4),
        ("optimisation", "Optimisation", "Learning rate, gradient norm before clipping, "
         "throughput and peak memory.", runs, [
            Panel("learning rate", ("lr",), ("train",)),
            Panel("grad norm", ("grad_norm",), ("train",)),
            Panel("tokens / s", ("tokens_per_s",), ("train",)),
            Panel("memory (MB)", ("memory_mb",), ("train",)),
        ], 4),
    ]  # fmt: skip
    figures = []
    for name, title, caption, subset, panels, ncols in specs:
        png = plot_panels(subset, panels, ncols, colors)
        if png is not None:
            figures.append(Figure(name, title, caption, png))
    return figures


def plot_panels(
    runs: list[Run], panels: list[Panel], ncols: int, colors: dict[str, str]
) -> bytes | None:
    """A grid of the panels that have data, as PNG bytes (``None`` when none has)."""
    live = [p for p in panels if any(_series(r, p) for r in runs)]
    if not live:
        return None
    ncols = min(ncols, len(live))
    nrows = -(-len(live) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.4 * nrows + 0.7), squeeze=False)
    for ax in axes.flat[len(live) :]:
        ax.set_visible(False)
    # One step range for every panel, so sparse validation points line up with training.
    steps = [s for r in runs for p in live for _, _, _, series in _series(r, p) for s, _ in series]
    lo, hi = min(steps), max(steps)
    pad = max(0.5, 0.03 * (hi - lo))
    for ax, panel in zip(axes.flat, live, strict=False):
        ax.set_xlim(lo - pad, hi + pad)
        for run in runs:
            for _, split, style, series in _series(run, panel):
                xs, ys = zip(*series, strict=True)
                ax.plot(
                    xs, ys, color=colors[run.label], linestyle=style, linewidth=1.4,
                    marker="o" if split == "val" else None, markersize=3.5,
                )  # fmt: skip
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], color=colors[r.label], linewidth=2, label=r.label) for r in runs]
    handles += [
        Line2D([], [], color="#555", linewidth=1.4, label="train"),
        Line2D([], [], color="#555", linewidth=1.4, marker="o", markersize=3.5, label="val"),
    ]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False)  # fmt: skip
    # Fixed margins (inches): tight_layout would cost as much as drawing the figure.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.65 / width, right=1 - 0.15 / width, bottom=0.45 / height,
                        top=1 - 0.65 / height, wspace=0.42, hspace=0.62)  # fmt: skip
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _series(run: Run, panel: Panel) -> list[tuple[str, str, str, list[tuple[int, float]]]]:
    out = []
    for i, key in enumerate(panel.keys):
        for split in panel.splits:
            series = (run.train if split == "train" else run.val).get(key)
            if series:
                out.append((key, split, STYLES[i % len(STYLES)], series))
    return out
