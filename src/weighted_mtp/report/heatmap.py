"""Token-weight heat maps: logged validation examples drawn as code, each token's background
coloured by the loss weight a head puts on it.

Continuous weights (Verifiable Critic TD weights) use a diverging map on a log scale centred on
1, so a uniform weight is white, up-weighted tokens red and down-weighted tokens blue. 0/1
weights (a weighting whose registry entry says ``selection``, Rho-1) are drawn as selected (green) or dropped (grey, struck through). Tokens where a
head has no target (the prompt, the first k-1 completion tokens of head k) stay uncoloured.
The same colouring is drawn with matplotlib into a PNG for one example.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap, to_hex, to_rgb
from matplotlib.patches import Rectangle

from weighted_mtp import registry
from weighted_mtp.report.runs import Run, TokenWeights

CMAP = plt.get_cmap("RdBu_r")
SELECTED, DROPPED = "#b7e4c7", "#e2e2e2"
MAX_EXAMPLES = 3


@dataclass(frozen=True)
class WeightScale:
    """How a weight maps to a colour: ``selection`` (0/1) or ``continuous`` in [low, high]."""

    mode: str
    low: float = 0.1
    high: float = 3.0
    clipped: bool = False  # low and high are the weighting's clip range

    def position(self, weight: float) -> float:
        """Place on the colour map in [0, 1]; 0.5 is weight 1 (log scale either side)."""
        w = min(max(weight, self.low), self.high)
        if w >= 1.0:
            return 0.5 + 0.5 * math.log(w) / math.log(self.high) if self.high > 1 else 0.5
        return 0.5 - 0.5 * math.log(w) / math.log(self.low) if self.low < 1 else 0.5

    def color(self, weight: float) -> str:
        if self.mode == "selection":
            return SELECTED if weight > 0.5 else DROPPED
        # The outer 8% of RdBu is almost black: keep to the readable middle.
        return to_hex(CMAP(0.08 + 0.84 * self.position(weight)))


def scale_for(run: Run) -> WeightScale:
    """A weighting whose registry entry says 0/1 selection (Rho-1), or any 0/1 weights with a
    zero, is a selection; otherwise a continuous scale spanning the weighting's clip range
    (its entry's ``clip_keys`` in its config section) and the logged values."""
    values = [w for ex in run.token_weights for head in ex.weights for w in head if w is not None]
    binary = bool(values) and all(w in (0.0, 1.0) for w in values)
    entry = registry.run_weighting(run.recipe, run.config)
    if (entry is not None and entry.selection) or (binary and 0.0 in values):
        return WeightScale("selection", 0.0, 1.0)
    weighting = run.config.get("weighting") if isinstance(run.config, dict) else None
    low, high, clipped = 0.5, 2.0, False
    if isinstance(weighting, dict) and entry is not None and entry.clip_keys:
        # ``weighting.<name>.clip_*`` (or under an old name of the weighting); runs before
        # 2026-11-30 kept them in ``weighting``.
        section = registry.section_of(weighting, entry.name) or weighting
        low = float(section.get(entry.clip_keys[0]) or low)
        high = float(section.get(entry.clip_keys[1]) or high)
        clipped = True
    positive = [w for w in values if w > 0]
    low = min([low, *positive]) if positive else low
    high = max([high, *values]) if values else high
    return WeightScale("continuous", min(low, 0.99), max(high, 1.01), clipped)


def text_color(background: str) -> str:
    r, g, b = to_rgb(background)
    return "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "#111"


def legend_html(scale: WeightScale) -> str:
    """A colour bar (continuous) or two swatches (selection), in HTML/CSS."""
    if scale.mode == "selection":
        return (
            '<div class="legend"><span class="swatch" style="background:' + SELECTED + '"></span>'
            'selected (weight 1) <span class="swatch" style="background:' + DROPPED + '"></span>'
            '<s>dropped</s> (weight 0) <span class="swatch none"></span>no target</div>'
        )
    stops = ", ".join(f"{to_hex(CMAP(0.08 + 0.84 * t / 10))} {t * 10}%" for t in range(11))
    ticks = sorted({scale.low, 1.0, scale.high, *_nice_ticks(scale)})
    labels = "".join(
        f'<span class="tick" style="left:{100 * scale.position(t):.1f}%">{t:g}</span>'
        for t in ticks
    )
    return (
        '<div class="legend"><span class="cbar-label">weight</span>'
        '<div class="cbar"><div class="grad" '
        f'style="background:linear-gradient(to right, {stops})">'
        f'</div><div class="ticks">{labels}</div></div>'
        '<span class="note">log scale, 1 = uniform (white)</span>'
        '<span class="swatch none"></span>no target</div>'
    )


def _nice_ticks(scale: WeightScale) -> list[float]:
    return [t for t in (0.25, 0.5, 2.0) if scale.low < t < scale.high]


def token_spans(example: TokenWeights, head: int, scale: WeightScale, start: int = 0) -> str:
    """The example's tokens from ``start`` as escaped ``<span>``s coloured by head ``head``."""
    parts = []
    for j in range(start, len(example.pieces)):
        piece, weight = example.pieces[j], example.weights[head][j]
        newline = " nl" if piece.strip() == "" and "\n" in piece else ""
        if weight is None:
            tip = f"token {j} {piece!r}: head {head + 1} has no target here"
            parts.append(f'<span class="t{newline}" title="{html.escape(tip)}">'
                         f"{html.escape(piece)}</span>")  # fmt: skip
            continue
        bg = scale.color(weight)
        dropped = " drop" if scale.mode == "selection" and weight <= 0.5 else ""
        tip = f"token {j} {piece!r}: head {head + 1} weight {weight:.4f}"
        parts.append(
            f'<span class="t w{newline}{dropped}" style="background:{bg};color:{text_color(bg)}"'
            f' title="{html.escape(tip)}">{html.escape(piece)}</span>'
        )
    return "".join(parts)


def prompt_length(example: TokenWeights) -> int:
    """Leading tokens that no head predicts: the prompt."""
    for j in range(len(example.pieces)):
        if any(head[j] is not None for head in example.weights):
            return j
    return len(example.pieces)


def head_stats(values: list[float | None], scale: WeightScale) -> str:
    kept = [w for w in values if w is not None]
    if not kept:
        return "no targets"
    if scale.mode == "selection":
        chosen = sum(w > 0.5 for w in kept)
        return f"{chosen} of {len(kept)} tokens selected ({chosen / len(kept):.0%})"
    if min(kept) == max(kept):
        return f"{len(kept)} targets, all weighing {kept[0]:.3f} (uniform)"
    mean = sum(kept) / len(kept)
    text = f"{len(kept)} targets · mean {mean:.3f} · min {min(kept):.3f} · max {max(kept):.3f}"
    if scale.clipped:
        low, high = sum(w <= scale.low for w in kept), sum(w >= scale.high for w in kept)
        text += f" · at the clip bounds: {low} low, {high} high"
    return text


def example_html(example: TokenWeights, scale: WeightScale, uid: str) -> str:
    """One example: the prompt folded away, then the completion per head in tabs."""
    start = prompt_length(example)
    heads = len(example.weights)
    prompt = html.escape("".join(example.pieces[:start]))
    title = f"example {example.example} ({example.split}, step {example.step})"
    if example.problem_id:
        title += f" · problem {html.escape(str(example.problem_id))}"
    tabs = "".join(
        f'<button class="tab{" on" if k == 0 else ""}" data-head="{k + 1}" '
        f'onclick="showHead(this)">head {k + 1}</button>'
        for k in range(heads)
    )
    tabs += '<button class="tab" data-head="all" onclick="showHead(this)">all heads</button>'
    views = "".join(
        f'<div class="headview" data-head="{k + 1}"{"" if k == 0 else " hidden"}>'
        f'<div class="headname">{_head_name(k)}</div>'
        f'<pre class="code heat">{token_spans(example, k, scale, start)}</pre>'
        f'<div class="stats">{head_stats(example.weights[k][start:], scale)}</div></div>'
        for k in range(heads)
    )
    return (
        f'<div class="tw" id="{uid}"><h4>{title}</h4>'
        f"<details><summary>prompt ({start} tokens, not weighted)</summary>"
        f'<pre class="code prompt">{prompt}</pre></details>'
        f'<div class="tabs">{tabs}</div>{views}</div>'
    )


def _head_name(k: int) -> str:
    if k == 0:
        return "head 1 (next token): the weight on predicting each token"
    return f"head {k + 1}: the weight on predicting each token from {k + 1} positions back"


def heatmap_html(run: Run, index: int, max_examples: int = MAX_EXAMPLES) -> str:
    """The heat-map block of one run ('' when it logged no token weights)."""
    if not run.token_weights:
        return ""
    scale = scale_for(run)
    examples = "".join(
        example_html(ex, scale, f"tw-{index}-{i}")
        for i, ex in enumerate(run.token_weights[:max_examples])
    )
    title = f"<h3>{html.escape(run.label)}</h3>"
    return f'<div class="heatrun">{title}{legend_html(scale)}{examples}</div>'


def heatmap_png(
    example: TokenWeights, scale: WeightScale, head: int = 0, title: str = "",
    max_lines: int = 40, max_cols: int = 100,
) -> bytes:  # fmt: skip
    """The completion of one example drawn as a character grid, coloured by head ``head``."""
    start = prompt_length(example)
    cells: list[list[tuple[str, float | None]]] = [[]]
    for piece, weight in zip(example.pieces[start:], example.weights[head][start:], strict=True):
        for char in piece:
            if char == "\n":
                cells[-1].append(("↵", weight))
                cells.append([])
            else:
                cells[-1].append((char, weight))
    cells = [row[:max_cols] for row in cells[:max_lines]]
    ncols = max(30, max((len(row) for row in cells), default=0))
    cell_w, cell_h = 0.085, 0.2  # inches; DejaVu Sans Mono advances 0.602 em per character
    left, right, top, bottom = 0.15, 1.1, 0.4, 0.15
    width, height = ncols * cell_w, len(cells) * cell_h
    fig_w, fig_h = left + width + right, top + max(height, 1.2) + bottom
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110)
    ax = fig.add_axes((left / fig_w, 1 - (top + height) / fig_h, width / fig_w, height / fig_h))
    ax.set_xlim(0, ncols)
    ax.set_ylim(len(cells), 0)
    ax.axis("off")
    for y, row in enumerate(cells):
        for x, (char, weight) in enumerate(row):
            if weight is not None:
                bg = scale.color(weight)
                ax.add_patch(Rectangle((x, y), 1, 1, color=bg, linewidth=0))
            else:
                bg = "#ffffff"
            if char != " ":
                ax.text(x + 0.5, y + 0.55, char, ha="center", va="center", family="monospace",
                        fontsize=cell_w * 72 / 0.602 * 0.92, color=text_color(bg))  # fmt: skip
    fig.text(left / fig_w, 1 - 0.12 / fig_h, title or f"head {head + 1}", fontsize=9, va="top")
    bar = (fig_w - 0.75) / fig_w, bottom / fig_h, 0.14 / fig_w, (fig_h - top - bottom) / fig_h
    _colorbar(fig.add_axes(bar), scale)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _colorbar(cax: plt.Axes, scale: WeightScale) -> None:
    if scale.mode == "selection":
        colors, ticks, labels = [DROPPED, SELECTED], [0.25, 0.75], ["dropped", "selected"]
    else:
        colors = [to_hex(CMAP(0.08 + 0.84 * t / 255)) for t in range(256)]
        values = sorted({scale.low, 1.0, scale.high, *_nice_ticks(scale)})
        ticks, labels = [scale.position(v) for v in values], [f"{v:g}" for v in values]
    cax.imshow([[c] for c in range(len(colors))][::-1], cmap=ListedColormap(colors),
               aspect="auto", extent=(0, 1, 0, 1))  # fmt: skip
    cax.set_xticks([])
    cax.yaxis.tick_right()
    cax.set_yticks(ticks, labels, fontsize=7)
