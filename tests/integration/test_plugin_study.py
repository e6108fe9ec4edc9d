"""A weighting from another package, end to end: one class (an entry point of the group
``weighted_mtp.weightings``) and one YAML file, no edit inside ``weighted_mtp``; it trains as an
arm of a study beside its shuffled control and the baseline, is evaluated and compared there,
and ``wmtp report`` names it (docs/METHOD.md §6)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, make_tiny_storage
from tests.integration.test_training import _plugin_package


@pytest.mark.slow
def test_a_plugin_weighting_is_a_study_arm_with_its_control_and_in_the_report(
    tmp_path, small_tokenizer
):
    storage = make_tiny_storage(tmp_path / "storage", small_tokenizer, evaluation=True)
    site = tmp_path / "site"
    _plugin_package(site)
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(REPO / "configs/local/baseline.yaml", configs / "baseline.yaml")
    # The plugin's one YAML file: the baseline recipe with the new weighting and its settings.
    mine = yaml.safe_load((REPO / "configs/local/baseline.yaml").read_text())
    mine["experiment"] = "first_tokens"
    mine["weighting"] = {"name": "first_tokens", "first_tokens": {"n": 3, "boost": 4.0}}
    (configs / "first_tokens.yaml").write_text(yaml.safe_dump(mine))
    spec = {
        "name": "plug", "configs": str(configs), "seeds": [0], "budget": {"steps": 3},
        "evaluation": {"dataset": "codecontests", "max_tasks": 2, "max_new_tokens": 8},
        "arms": {"baseline": {"recipe": "baseline"}, "first": {"recipe": "first_tokens"},
                 "first_shuffled": {"recipe": "first_tokens", "control": "shuffled"}},
        "overrides": ["data.max_length=1024", "log.val_every=100", "data.sampling.val_n_samples=0"],
    }  # fmt: skip
    spec_path = tmp_path / "plug.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO / "src"), str(REPO)])}  # fmt: skip

    def wmtp(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "weighted_mtp", *args, "--storage",
                               str(storage)], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=900)  # fmt: skip

    result = wmtp("study", str(spec_path), "--no-mlflow")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads((storage / "reports/study/plug/study.json").read_text())
    assert set(summary["arms"]) == {"baseline", "first", "first_shuffled"}
    contrasts = {(c["arm"], c["baseline"]) for c in summary["comparisons"]}
    # The default contrasts: every arm against the baseline, the weighting against its control.
    assert contrasts == {("first", "baseline"), ("first_shuffled", "baseline"),
                         ("first", "first_shuffled")}  # fmt: skip
    page = (storage / "reports/study/plug/index.html").read_text()
    assert "first_shuffled" in page
    runs = {arm: storage / "checkpoints/first_tokens" / f"study-plug-{arm}-seed0"
            for arm in ("first", "first_shuffled")}  # fmt: skip
    for arm, run in runs.items():
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["weighting"]["name"] == "first_tokens"
        assert saved["weighting"]["first_tokens"] == {"n": 3, "boost": 4.0}
        assert saved["weighting"]["control"] == ("shuffled" if "shuffled" in arm else "none")
        assert (run / "final/eval/codecontests/results.jsonl").is_file()
    report = wmtp("report", *map(str, runs.values()), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "report/index.html").read_text()
    assert "first tokens" in html  # the plugin's display name, read from the registry
