"""Experiment tracking end to end: two short trainings and one `wmtp score` log to one sqlite
store; MLflow's own server, started on that store, gives back through its REST API the
experiments, the runs' metrics and the link from the evaluation to its training run; and
`wmtp report` takes MLflow run ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from importlib import util

import pytest

from tests.conftest import REPO
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.cli import main
from weighted_mtp.config import load_config
from weighted_mtp.evaluation.harness import EVAL_EXPERIMENT, humaneval_from_package
from weighted_mtp.train.loop import train
from weighted_mtp.train.tracking import (
    RUN_RECORD,
    TAG_REPORT,
    TAG_RUN_DIR,
    TAG_TRAINING_RUN,
    free_port,
    git_commit,
    read_run_record,
    server_command,
    ui_missing,
    wait_for_server,
)

pytestmark = pytest.mark.slow

FAST = [
    "train.max_steps=2",
    "data.max_length=1024",
    "log.val_every=2",
    "data.sampling.val_n_samples=4",
    "log.token_weights=0",
]


def _post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _get(base: str, path: str, **query: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.skipif(
    ui_missing() is not None or util.find_spec("flask") is None,
    reason="MLflow's server needs the full mlflow package (the ui extra: flask); "
    "install it with pip install -e '.[ui]'",
)
def test_runs_and_evaluation_link_read_back_through_mlflow_server(tiny_storage, tmp_path):
    layout = StorageLayout(tiny_storage)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    finals = {}
    for experiment in ("baseline", "ntp"):
        config = load_config(
            REPO / f"configs/local/{experiment}.yaml",
            [*FAST, "run_name=tracked", f"log.mlflow_tracking_uri={uri}"],
        )
        finals[experiment] = train(config, layout)
    records = {e: read_run_record(f.parent) for e, f in finals.items()}
    assert all(r is not None and r["kind"] == "train" for r in records.values())

    # One `wmtp score` of samples kept where `wmtp evaluate` keeps its own: the link to the
    # training run is found from the folder.
    problems = dict(list(humaneval_from_package().items())[:3])
    rows = [{"task_id": t, "completion": r["output"]} for t, r in problems.items()]
    rows[2]["completion"] = "    return None\n"
    eval_dir = finals["baseline"] / "eval" / "humaneval"
    eval_dir.mkdir(parents=True)
    samples = eval_dir / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
    }
    scored = subprocess.run(
        [sys.executable, "-m", "weighted_mtp", "score", "--samples", str(samples),
         "--dataset", "humaneval", "--storage", str(tiny_storage), "--mlflow-uri", uri],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    summary = json.loads(scored.stdout.strip().splitlines()[-1])
    assert summary["pass_at_k"]["pass@1"]["mean"] == pytest.approx(2 / 3)

    # `wmtp report` by run id: the ntp run's id, and the baseline run through its id.
    out = tmp_path / "report"
    ids = [records["ntp"]["run_id"], records["baseline"]["run_id"]]
    assert main(["report", *ids, "--mlflow-uri", uri, "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "ntp/tracked" in page and "baseline/tracked" in page

    port = free_port("127.0.0.1", 5000)
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        server_command(uri, "127.0.0.1", port, tmp_path / "mlartifacts"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert wait_for_server(base, server, 180), "mlflow server did not answer /health"
        experiments = _post(base, "/api/2.0/mlflow/experiments/search", {"max_results": 100})
        ids_by_name = {e["name"]: e["experiment_id"] for e in experiments["experiments"]}
        assert {"baseline", "ntp", EVAL_EXPERIMENT} <= set(ids_by_name)

        runs = {}
        for name in ("baseline", "ntp", EVAL_EXPERIMENT):
            found = _post(
                base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [ids_by_name[name]]}
            )["runs"]
            assert len(found) == 1, name
            run = found[0]
            runs[name] = {
                "id": run["info"]["run_id"],
                "name": run["info"]["run_name"],
                "status": run["info"]["status"],
                "tags": {t["key"]: t["value"] for t in run["data"].get("tags", [])},
                "params": {p["key"]: p["value"] for p in run["data"].get("params", [])},
                "metrics": {m["key"]: m["value"] for m in run["data"].get("metrics", [])},
            }
        for experiment in ("baseline", "ntp"):
            run = runs[experiment]
            assert run["id"] == records[experiment]["run_id"]
            assert run["name"] == "tracked" and run["status"] == "FINISHED"
            assert run["params"]["train.recipe"] == "policy"  # as configs/local wrote it
            assert run["tags"]["wmtp.recipe"] == "policy"
            assert run["tags"][TAG_RUN_DIR] == str(finals[experiment].parent.resolve())
            assert run["tags"][TAG_REPORT] == str((out / "index.html").resolve())
            commit = git_commit()
            assert run["tags"].get("mlflow.source.git.commit") == (commit and commit[0])
            history = _get(
                base, "/api/2.0/mlflow/metrics/get-history", run_id=run["id"], metric_key="loss"
            )["metrics"]
            logged = [
                json.loads(line)
                for line in (finals[experiment].parent / "metrics.jsonl").read_text().splitlines()
            ]
            expected = [(m["step"], m["loss"]) for m in logged if "loss" in m]
            assert [m["step"] for m in history] == [s for s, _ in expected] == [1, 2]
            assert [m["value"] for m in history] == pytest.approx([v for _, v in expected])

        evaluation = runs[EVAL_EXPERIMENT]
        assert evaluation["tags"][TAG_TRAINING_RUN] == runs["baseline"]["id"]
        assert evaluation["tags"][TAG_RUN_DIR] == runs["baseline"]["tags"][TAG_RUN_DIR]
        assert evaluation["tags"]["wmtp.kind"] == "score"
        assert evaluation["name"] == "score-humaneval-baseline/tracked/final"
        assert evaluation["metrics"]["pass_at_1"] == pytest.approx(2 / 3)
        assert evaluation["params"]["dataset"] == "humaneval"
        # A score writes no record; the folder keeps only the training run's.
        assert not (eval_dir / RUN_RECORD).exists()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
