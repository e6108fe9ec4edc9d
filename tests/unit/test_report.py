"""The HTML report: run folders read back, curves, the pass@k table, token-weight heat maps,
and a page that needs no network."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from weighted_mtp import registry
from weighted_mtp.report import build_report
from weighted_mtp.report.heatmap import WeightScale, scale_for, token_spans
from weighted_mtp.report.runs import load_run, metric_name, read_series, read_token_weights

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPT = ["", "Below", " is", " a", " task", ".", "\n", "###", " Response", ":", "\n"]
CODE = [
    "def", " f", "(", "a", ",", " b", "):", "\n", "    ", "if", " a", " <", " b", " and", " b",
    " >", " 0", ":", "\n", "        ", "return", " a", " &", " b", "\n", "    ", "return",
    ' "', "<", "none", ">", '"', "\n",
]  # fmt: skip
SUMMARY = {
    "dataset": "humaneval",
    "problems": 164,
    "samples": 1640,
    "verdicts": {"passed": 681, "failed": 902, "timeout": 57},
    "pass_at_k": {
        "pass@1": {"mean": 0.4152, "stderr": 0.0321},
        "pass@5": {"mean": 0.5823, "stderr": 0.0347},
        "pass@10": {"mean": 0.6341, "stderr": 0.0363},
    },
    "settings": {
        "checkpoint": "final", "prompt_mode": "alpaca", "num_samples": 10, "temperature": 0.8,
        "top_p": 0.95, "max_new_tokens": 512, "seed": 0, "speculative": True,
        "max_tasks": None, "task_ids": "all",
    },
    "decoding": {
        "tokens": 81234, "steps": 33120, "proposed": [33000, 26000, 17000],
        "accepted": [26730, 17160, 8330], "tokens_per_step": 2.4527,
        "acceptance": [0.81, 0.66, 0.49], "seconds": 812.3, "tokens_per_s": 100.0,
    },
}  # fmt: skip


def fixture_weights(recipe: str, n: int, rng: random.Random) -> list[float]:
    if recipe == "rho1":
        return [float(rng.random() < 0.6) for _ in range(n)]
    if recipe == "verifiable":
        return [round(min(3.0, max(0.1, math.exp(rng.gauss(0, 0.8)))), 5) for _ in range(n)]
    return [1.0] * n


def token_weight_records(recipe: str, step: int, examples: int = 2, heads: int = 4) -> list[dict]:
    """Records in the ``token_weights.jsonl`` format: the prompt has no target for any head,
    head k+1 has none on the first k completion tokens."""
    rng = random.Random(step)
    pieces = PROMPT + CODE
    records = []
    for example in range(examples):
        weights = []
        for k in range(heads):
            values = fixture_weights(recipe, len(CODE), rng)
            weights.append([None] * (len(PROMPT) + k) + values[k:])
        records.append({"step": step, "split": "val", "example": example, "problem_id":
                        f"cc/{example}", "pieces": pieces, "weights": weights})  # fmt: skip
    return records


def metric_records(recipe: str, steps: int, heads: int = 4, old_names: bool = False) -> list[dict]:
    """``old_names``: the Verifiable Critic's statistics as runs before 2026-12-07 logged them
    (``td/*``)."""
    rng = random.Random(recipe)
    td = "td" if old_names else "verifiable"
    lines = []
    for step in range(1, steps + 1):
        ce = 10.4 - 0.05 * step + rng.uniform(-0.01, 0.01)
        if recipe == "critic":
            train = {"loss": 0.69 - 0.01 * step, "pair_accuracy": min(1.0, 0.5 + 0.05 * step),
                     "margin": 0.01 * step, "value_pos": 0.02 * step, "value_neg": -0.01 * step,
                     "spikiness": 3.0, "position_corr": 0.1, "token_var": 1e-6}  # fmt: skip
        else:
            mean = {"baseline": 1.0, "rho1": 0.6, "verifiable": 1.3}[recipe]
            train = {"loss": ce + 0.02, "ce": ce, "lr": 1e-4, "grad_norm": 0.3,
                     "tokens_per_s": 400.0}  # fmt: skip
            for k in range(1, heads + 1):
                train |= {f"ce/head{k}": ce + 0.01 * k, f"wce/head{k}": ce + 0.02 * k,
                          f"weight_mean/head{k}": mean}  # fmt: skip
            if recipe == "verifiable":
                train |= {f"{td}/weight_mean": mean, f"{td}/weight_std": 0.9,
                          f"{td}/clip_low_frac": 0.01, f"{td}/clip_high_frac": 0.15,
                          f"{td}/adv_mean": 1e-3, f"{td}/adv_std": 1e-3,
                          f"{td}/weight_entropy_norm": 0.94}  # fmt: skip
            if recipe == "rho1":
                train["rho1/selected_fraction"] = 0.6
        lines.append({"step": step, "time": 1.0e9 + step, **train})
        if step % 4 == 0:
            lines.append({"step": step, "time": 1.0e9 + step,
                          **{f"val/{k}": v for k, v in train.items() if k != "lr"}})  # fmt: skip
    return lines


def write_run(
    root: Path,
    recipe: str,
    steps: int = 8,
    *,
    evals: bool = True,
    weights: bool = True,
    old_names: bool = False,
) -> Path:
    """A run folder like ``wmtp train`` leaves, plus an evaluation of ``final``: the experiment
    ``recipe`` (a recipe's alias) trained with the config of ``configs/*/<recipe>.yaml``
    (``train.recipe: policy`` and ``weighting.name``), or with ``old_names`` as runs before
    2026-12-07 wrote it (``train.recipe: <alias>``, ``weighting.critic_td``, ``td/*``)."""
    run = root / recipe / "20261126-000000"
    (run / "final").mkdir(parents=True)
    trains, name = registry.recipe_of(recipe).recipe, registry.weighting_of(recipe)
    section = "critic_td" if old_names else "verifiable"
    weighting = {section: {"clip_min": 0.1, "clip_max": 3.0}, "rho1": {"k_percent": 0.6}}
    if not old_names and name not in (None, "uniform"):
        weighting["name"] = name
    config = {"experiment": recipe, "run_name": f"{recipe}-fixture",
              "model": {"path": "micro-mtp"},
              "train": {"recipe": recipe if old_names else trains, "max_steps": steps},
              "weighting": weighting}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in metric_records(recipe, steps, old_names=old_names))
    )
    info = {"recipe": recipe, "base_model": "micro-mtp", "n_heads": 4, "step": steps,
            "experiment": recipe, "run": run.name}  # fmt: skip
    (run / "final" / "wmtp_checkpoint.json").write_text(json.dumps(info))
    if recipe == "critic":
        diagnostics = {"pairs": 4, "pair_accuracy": 0.75, "length_only_accuracy": 0.25,
                       "by_length_bin": {"0-100": {"pairs": 4, "accuracy": 0.75}}}  # fmt: skip
        (run / "critic_diagnostics.json").write_text(json.dumps(diagnostics))
    elif weights:
        records = token_weight_records(recipe, 4) + token_weight_records(recipe, steps)
        (run / "token_weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if evals and recipe != "critic":
        folder = run / "final" / "eval" / "humaneval"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(SUMMARY))
    return run


def write_runs(root: Path) -> list[Path]:
    return [write_run(root, r) for r in ("baseline", "verifiable", "rho1", "critic")]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("runs")
    index = build_report(write_runs(root), root / "report")
    return index, index.read_text(encoding="utf-8")


def test_runs_are_read_back(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path, "verifiable"))
    assert (run.experiment, run.recipe, run.run_name, run.base_model, run.steps) == (
        "verifiable",
        "policy",
        "verifiable-fixture",
        "micro-mtp",
        8,
    )
    assert [s for s, _ in run.train["verifiable/weight_mean"]] == list(range(1, 9))
    assert [s for s, _ in run.val["ce"]] == [4, 8]
    assert "val/ce" not in run.train
    assert [e.checkpoint for e in run.evals] == ["final"]
    assert {ex.step for ex in run.token_weights} == {8}
    assert len(run.token_weights[0].weights) == 4


def test_runs_written_before_the_rename_read_as_verifiable(tmp_path: Path) -> None:
    """``train.recipe: verifiable``, ``weighting.critic_td`` and ``td/*`` metrics: the same
    weighting, statistics, scale and label as a run written now."""
    old = load_run(write_run(tmp_path / "old", "verifiable", old_names=True))
    new = load_run(write_run(tmp_path / "new", "verifiable"))
    assert old.recipe == "verifiable" and new.recipe == "policy"
    assert old.train == new.train and old.val == new.val
    assert not any(k.startswith("td/") for k in (*old.train, *old.val))
    assert registry.run_weighting(old.recipe, old.config) is registry.BUILTIN["verifiable"]
    assert registry.run_weighting(new.recipe, new.config) is registry.BUILTIN["verifiable"]
    assert registry.BUILTIN["verifiable"].label == "Verifiable Critic"
    assert scale_for(old) == scale_for(new) == WeightScale("continuous", 0.1, 3.0, True)
    assert metric_name("td/weight_mean") == "verifiable/weight_mean"
    assert metric_name("placement/adv_abs/hit") == "placement/adv_abs/hit"
    page = build_report([old.path, new.path], tmp_path / "report").read_text(encoding="utf-8")
    assert page.count("Verifiable Critic") >= 2 and 'id="fig-weights"' in page
    for alias in ("baseline", "ntp", "ref_tuning", "critic"):  # old recipe names still sort
        assert registry.is_value_recipe(alias) == (alias == "critic")


def test_reading_tolerates_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0, "note": "x", "nan": NaN}\nnot json\n{"step": 2, "lo')
    train, val = read_series(path)
    assert train == {"loss": [(1, 2.0)]} and val == {}
    assert read_token_weights(tmp_path / "missing.jsonl") == []
    bare = load_run(tmp_path / "nothing-here")
    assert bare.train == {} and bare.evals == [] and bare.token_weights == []


def test_token_step_can_be_chosen(tmp_path: Path) -> None:
    run = write_run(tmp_path, "rho1")
    assert {ex.step for ex in read_token_weights(run / "token_weights.jsonl", step=4)} == {4}


def test_weight_scales() -> None:
    scale = WeightScale("continuous", 0.1, 3.0)
    assert scale.position(1.0) == 0.5
    assert scale.position(0.1) == 0.0 and scale.position(3.0) == 1.0 and scale.position(9) == 1.0
    assert scale.position(0.5) < 0.5 < scale.position(2.0)
    assert scale.color(1.0) != scale.color(3.0) != scale.color(0.1)


def test_scale_follows_the_recipe(tmp_path: Path) -> None:
    assert scale_for(load_run(write_run(tmp_path / "a", "rho1"))).mode == "selection"
    verifiable = scale_for(load_run(write_run(tmp_path / "b", "verifiable")))
    assert (verifiable.mode, verifiable.low, verifiable.high) == ("continuous", 0.1, 3.0)


def test_token_spans_escape_code_and_carry_exact_weights(tmp_path: Path) -> None:
    example = load_run(write_run(tmp_path, "verifiable")).token_weights[0]
    spans = token_spans(example, 0, WeightScale("continuous", 0.1, 3.0), len(PROMPT))
    assert "&lt;" in spans and "&gt;" in spans and "&amp;" in spans and "&quot;" in spans
    assert "<none>" not in spans and " & " not in spans
    text = re.sub(r"<[^>]+>", "", spans)
    assert text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace(
        "&amp;", "&"
    ) == "".join(CODE)
    weight = example.weights[0][len(PROMPT)]
    assert f"weight {weight:.4f}" in spans


def test_page_lists_runs_and_curves(report: tuple[Path, str]) -> None:
    _, page = report
    for label in ("baseline/baseline-fixture", "verifiable/verifiable-fixture",
                  "rho1/rho1-fixture", "critic/critic-fixture"):  # fmt: skip
        assert label in page
    assert "micro-mtp" in page and "Generated " in page
    for figure in ("loss", "ce_heads", "weights", "critic", "optimisation"):
        assert f'id="fig-{figure}"' in page
    assert page.count('src="data:image/png;base64,') == 5
    assert "Critic diagnostics" in page and "length_only_accuracy" in page


def test_page_has_the_pass_at_k_table(report: tuple[Path, str]) -> None:
    _, page = report
    table = page[page.index("<table class='eval'>") :]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 4  # header + baseline, verifiable, rho1
    for text in (
        "pass@1",
        "pass@5",
        "pass@10",
        "41.5%",
        "± 3.2",
        "58.2%",
        "63.4%",
        ">164<",
        ">10<",
        ">0.8<",
        "alpaca",
        "2.453",
        "h2 0.81 · h3 0.66 · h4 0.49",
        "humaneval",
    ):
        assert text in table, text  # fmt: skip


def test_page_has_heat_maps_with_legends(report: tuple[Path, str]) -> None:
    _, page = report
    section = page[page.index('<section id="token-weights">') :]
    assert section.count('class="tw"') == 6  # 2 examples x 3 policy runs
    assert 'class="cbar"' in section and "linear-gradient" in section
    assert "selected (weight 1)" in section and 'class="t w drop"' in section
    assert re.search(r'<span class="t w" style="background:#[0-9a-f]{6};color:#\w+" '
                     r'title="token \d+ [^"]*weight \d\.\d{4}">', section)  # fmt: skip
    assert ">&lt;</span>" in section and "> &amp;</span>" in section and ">none</span>" in section
    for head in range(1, 5):
        assert f'data-head="{head}"' in section
    assert "function showHead" in page


def test_figures_are_valid_pngs(report: tuple[Path, str]) -> None:
    index, _ = report
    names = sorted(p.name for p in (index.parent / "figures").glob("*.png"))
    assert names == ["ce_heads.png", "critic.png", "loss.png", "optimisation.png",
                     "token_weights.png", "weights.png"]  # fmt: skip
    for path in (index.parent / "figures").glob("*.png"):
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as image:
            image.verify()


def test_page_needs_no_network(report: tuple[Path, str]) -> None:
    _, page = report
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", page)
    assert "@import" not in page and "url(" not in page
    assert not re.search(r"<(link|iframe|object|embed)\b", page)
    assert not re.search(r"<script[^>]*\bsrc=", page)


def test_single_run_without_eval_or_weights(tmp_path: Path) -> None:
    run = write_run(tmp_path, "baseline", steps=3, evals=False, weights=False)
    page = build_report([run], tmp_path / "out").read_text(encoding="utf-8")
    assert "baseline/baseline-fixture" in page and "Config differences" not in page
    assert "Nothing to show: no &lt;checkpoint&gt;/eval" in page
    assert "Nothing to show: no token_weights.jsonl" in page
    assert not (tmp_path / "out" / "figures" / "token_weights.png").exists()


def test_empty_run_folder_still_gives_a_page(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    page = build_report([tmp_path / "run"], tmp_path / "out").read_text(encoding="utf-8")
    assert "Nothing to show: no metrics.jsonl" in page


def test_placement_table_shows_rates_controls_and_intervals(tmp_path: Path) -> None:
    """``val/placement/*`` of the last validation become one table per run (docs/METHOD.md §6,
    "Where the weight goes"); runs without them get no section."""
    import torch

    from weighted_mtp.train.placement import Solution, placement_metrics

    flags = [torch.arange(10) == i for i in (2, 5, 7)]
    solutions = [Solution({"adv_abs": f.float(), "adv_min": -f.float()}, 1 + 2 * f.float(), f)
                 for f in flags]  # fmt: skip
    metrics = placement_metrics(solutions, resamples=100)
    run = write_run(tmp_path, "verifiable", steps=4, evals=False, weights=False)
    with open(run / "metrics.jsonl", "a") as handle:
        early = {"val/placement/n": 3.0, "val/placement/adv_abs/hit": 0.5}
        handle.write(json.dumps({"step": 2, "time": 1e9, **early}) + "\n")
        placed = {f"val/placement/{k}": v for k, v in metrics.items()}
        handle.write(json.dumps({"step": 4, "time": 1e9, **placed}) + "\n")
    other = write_run(tmp_path, "baseline", steps=4, evals=False, weights=False)
    page = build_report([run, other], tmp_path / "out").read_text(encoding="utf-8")
    section = page[page.index("Where the weight goes") : page.index('id="evaluation"')]
    assert "step 4: 3 incorrect solutions, 10.0% of their response tokens in the span" in section
    assert "adv_abs hit rate" in section and "adv_min hit rate" in section
    assert "1.000 <span class='se'>[1.000, 1.000]</span>" in section  # adv_abs hits every time
    assert "0.000 <span class='se'>[0.000, 0.000]</span>" in section  # adv_min never does
    assert "0.100 <span class='se'>[0.100, 0.100]</span>" in section  # the shuffled control
    assert "weight mass inside" in section and "mean weight in / out" in section
    assert f"{metrics['weight/ratio']:.3f}" == "3.000" and "3.000" in section
    assert "<th>position-only</th>" in section and "<th>real − position-only</th>" in section
    # Every span at its own place: the position-only predictor never hits, adv_abs beats it.
    assert metrics["adv_abs/hit_length"] == 0.0 and metrics["adv_abs/gain_length_lo"] == 1.0
    assert "No ranking below the position-only predictor; above it: <code>adv_abs</code>." in (
        section
    )
    assert section.count("<h3>") == 1  # the baseline run has no placement metrics
    alone = build_report([other], tmp_path / "out2").read_text(encoding="utf-8")
    assert "Where the weight goes" not in alone


def placement_rows(page: str) -> dict[str, list[str]]:
    """The "Where the weight goes" table: ranking -> its cells, brackets dropped."""
    section = page[page.index("Where the weight goes") : page.index('id="evaluation"')]
    rows = re.findall(r"<tr><td class='key'>(\w+) hit rate</td>(.*?)</tr>", section)
    return {r: re.findall(r"<td class='num'>([-–0-9.]+)", cells) for r, cells in rows}


def test_placement_says_which_rankings_fall_below_the_position_only_predictor(
    tmp_path: Path,
) -> None:
    """Every span at the same place: the position-only predictor always hits it, a ranking that
    never does is below it, one that always does ties it (docs/METHOD.md §6)."""
    import torch

    from weighted_mtp.train.placement import Solution, placement_metrics

    flags = [torch.arange(10) == 5 for _ in range(3)]
    solutions = [Solution({"early": (f.float() - 1).abs() * torch.arange(f.numel()).flip(0),
                           "exact": f.float(), "late": torch.arange(f.numel()).float()}, None, f)
                 for f in flags]  # fmt: skip
    metrics = placement_metrics(solutions, resamples=100)
    assert metrics["exact/hit_length"] == 1.0 and metrics["early/hit"] == 0.0
    run = write_run(tmp_path, "verifiable", steps=4, evals=False, weights=False)
    with open(run / "metrics.jsonl", "a") as handle:
        placed = {f"val/placement/{k}": v for k, v in metrics.items()}
        handle.write(json.dumps({"step": 4, "time": 1e9, **placed}) + "\n")
    page = build_report([run], tmp_path / "out").read_text(encoding="utf-8")
    rows = placement_rows(page)
    # real, position-only, shuffled, real - position-only, real - shuffled
    assert rows["exact"][:4] == ["1.000", "1.000", f"{metrics['exact/hit_shuffled']:.3f}", "0.000"]
    assert rows["early"][3] == "-1.000" and rows["late"][3] == "-1.000"
    assert ("Below the position-only predictor: <code>early</code>, <code>late</code>.</p>"
            in page)  # fmt: skip

    # Without logged paired differences: computed from the hit rates, the verdict by its sign.
    metrics = {k: v for k, v in metrics.items() if "/gain_" not in k and not k.startswith("late")}
    metrics["early/hit"] = 0.9
    run = write_run(tmp_path / "older", "verifiable", steps=4, evals=False, weights=False)
    with open(run / "metrics.jsonl", "a") as handle:
        placed = {f"val/placement/{k}": v for k, v in metrics.items()}
        handle.write(json.dumps({"step": 4, "time": 1e9, **placed}) + "\n")
    page = build_report([run], tmp_path / "out2").read_text(encoding="utf-8")
    rows = placement_rows(page)
    assert rows["early"][3:] == ["-0.100", f"{0.9 - metrics['early/hit_shuffled']:.3f}"]
    assert rows["exact"][3] == "0.000"
    assert ("Below the position-only predictor by the point estimate (no paired interval "
            "logged): <code>early</code>.</p>"
            in page)  # fmt: skip
