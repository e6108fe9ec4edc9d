"""The one training loop: every local config, checkpoints, exact resume, heads all trained."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
import yaml

from tests.conftest import REPO
from weighted_mtp.base.errors import UserError
from weighted_mtp.base.io import StorageError
from weighted_mtp.base.layout import StorageLayout
from weighted_mtp.config import Section, load_config
from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.models import load_pretrained
from weighted_mtp.train import checkpoint
from weighted_mtp.train.checkpoint import load_trained
from weighted_mtp.train.loop import Trainer, train
from weighted_mtp.train.recipes import RECIPES
from weighted_mtp.train.tracking import read_metrics
from weighted_mtp.train.weighting import WEIGHTINGS, Micro, MicroWeights, Weighting

LOCAL = sorted((REPO / "configs/local").glob("*.yaml"))
FAST = [
    "train.max_steps=3",
    "log.mlflow=false",
    "data.max_length=1024",
    "checkpoint.every=2",
    "log.val_every=2",
    "data.sampling.val_n_samples=4",
]


def config_for(name: str, *extra: str):
    return load_config(REPO / f"configs/local/{name}.yaml", [*FAST, *extra])


def test_recipe_registry_and_configs_agree():
    local = {load_config(p).train.recipe for p in LOCAL}
    production = {load_config(p).train.recipe for p in (REPO / "configs/production").glob("*.yaml")}
    assert local == production == set(RECIPES)


@pytest.fixture(scope="module")
def trained(tiny_storage):
    """Every local config for 3 steps, in dependency order (rho1 needs ref_tuning)."""
    layout = StorageLayout(tiny_storage)
    finals = {}
    for name in ("baseline", "ntp", "ref_tuning", "rho1", "critic", "verifiable"):
        finals[name] = train(config_for(name, f"run_name={name}-run"), layout)
    return layout, finals


@pytest.mark.parametrize("name", ["baseline", "ntp", "ref_tuning", "rho1", "critic", "verifiable"])
def test_local_config_trains_three_steps(trained, name):
    _, finals = trained
    final = finals[name]
    assert final.name == "final" and (final / "adapter_model.safetensors").is_file()
    run_dir = final.parent
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    manifest = json.loads((run_dir / "manifest_train.json").read_text())
    assert manifest["line_indices"]
    if name == "critic":
        assert {"pair_accuracy", "margin", "value_pos", "value_neg"} <= set(steps[0])
        assert any("val/pair_accuracy" in m for m in metrics)
        assert manifest["mode"] == "length_balanced_pairs"
        info = json.loads((final / "wmtp_checkpoint.json").read_text())
        assert info["value_head"]["head_type"] == "mlp" and info["value_head"]["hidden_size"] == 64
        diagnostics = json.loads((run_dir / "critic_diagnostics.json").read_text())
        assert diagnostics["pairs"] > 0 and 0 <= diagnostics["length_only_accuracy"] <= 1
        assert {"pair_accuracy", "by_length_bin", "by_difficulty"} <= set(diagnostics)
        assert (run_dir / "best" / "wmtp_checkpoint.json").is_file()
        return
    heads = 1 if name in ("ntp", "ref_tuning") else 4
    assert {f"ce/head{k}" for k in range(1, heads + 1)} <= set(steps[0])
    assert any("val/ce" in m for m in metrics)
    assert manifest["mode"] == "correct_of_pairs"
    if name == "verifiable":
        for m in steps:
            assert (
                0.1 <= m["verifiable/weight_mean"] <= 3.0
                and 0 <= m["verifiable/clip_high_frac"] <= 1
            )
    assert (run_dir / "step_00000002").is_dir() and not (run_dir / "step_00000003").exists()
    if name == "rho1":
        fractions = [m["rho1/selected_fraction"] for m in steps]
        assert all(0.55 <= f <= 0.75 for f in fractions), fractions
    snapshots = [json.loads(line) for line in (run_dir / "token_weights.jsonl").open()]
    recipe = config_for(name).train.recipe  # as written: ``policy`` for the policies
    assert {s["step"] for s in snapshots} == {2, 3} and all(
        s["recipe"] == recipe for s in snapshots
    )
    for snap in snapshots:
        assert len(snap["weights"]) == heads
        assert all(len(head) == len(snap["pieces"]) for head in snap["weights"])
        values = [w for head in snap["weights"] for w in head if w is not None]
        assert values and snap["weights"][0][0] is None  # BOS is never a target
        if name == "rho1":
            assert set(values) <= {0.0, 1.0} and 0 < sum(values) < len(values)
        elif name == "verifiable":
            assert all(0.1 - 1e-6 <= w <= 3.0 + 1e-6 for w in values)
        else:
            assert set(values) == {1.0}


def _old_verifiable_config(tmp_path, *overrides: str):
    """``configs/local/verifiable.yaml`` as it was written before 2026-12-07: ``recipe:
    verifiable`` and a ``weighting.critic_td`` section."""
    text = (REPO / "configs/local/verifiable.yaml").read_text()
    text = text.replace("recipe: policy", "recipe: verifiable").replace("  name: verifiable\n", "")
    path = tmp_path / "verifiable.yaml"
    path.write_text(text.replace("  verifiable: {", "  critic_td: {"))
    return load_config(path, [*FAST, *overrides])


@pytest.mark.parametrize(
    ("name", "alias"),
    [("rho1", ["train.recipe=rho1", "weighting.name=null"]),
     ("ntp", ["train.recipe=ntp", "model.n_future_tokens=null"]),
     ("ref_tuning", ["train.recipe=ref_tuning"]),
     ("verifiable", None)],
)  # fmt: skip
def test_an_alias_trains_bit_for_bit_what_its_recipe_and_weighting_train(
    trained, tmp_path, name, alias
):
    """``recipe: rho1`` is ``recipe: policy`` with ``weighting.name: rho1``; ``ntp`` is the
    policy with ``model.n_future_tokens: 1``; ``ref_tuning`` is ``reference``; ``verifiable``
    with the old section ``weighting.critic_td`` is the policy with ``weighting.verifiable``:
    the same weights after 2 steps, bit for bit, and the same losses."""
    layout, _ = trained
    two = ["train.max_steps=2", "lora.dropout=0.1"]
    canonical = config_for(name, *two, f"run_name={name}-canonical")
    assert canonical.train.recipe in ("policy", "reference")
    if alias is None:
        old = _old_verifiable_config(tmp_path, *two, f"run_name={name}-alias")
        assert old.train.recipe == "verifiable" and old.weighting.name is None
    else:
        old = config_for(name, *two, *alias, f"run_name={name}-alias")
        assert old.train.recipe == name
    finals = [train(c, layout) for c in (canonical, old)]
    a, b = (checkpoint.load_tensors(f) for f in finals)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[m["loss"] for m in read_metrics(f.parent / "metrics.jsonl") if "loss" in m]
              for f in finals]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 2
    written = yaml.safe_load((finals[1].parent / "config.yaml").read_text())
    assert written["train"]["recipe"] == old.train.recipe  # the run folder keeps what was written


def test_rho1_precomputed_reference_matches_online(trained):
    layout, finals = trained
    final = train(config_for("rho1", "run_name=rho1-pre", "weighting.rho1.precompute=true"), layout)
    online = [m for m in read_metrics(finals["rho1"].parent / "metrics.jsonl") if "loss" in m]
    pre = [m for m in read_metrics(final.parent / "metrics.jsonl") if "loss" in m]
    assert [m["loss"] for m in pre] == pytest.approx([m["loss"] for m in online], abs=1e-4)
    assert [m["rho1/selected_fraction"] for m in pre] == pytest.approx(
        [m["rho1/selected_fraction"] for m in online], abs=1e-3
    )


def test_verifiable_precomputed_values_and_exact_resume(trained):
    layout, finals = trained
    online = [m for m in read_metrics(finals["verifiable"].parent / "metrics.jsonl") if "loss" in m]
    final = train(
        config_for("verifiable", "run_name=ver-pre", "weighting.verifiable.precompute=true"), layout
    )
    pre = [m for m in read_metrics(final.parent / "metrics.jsonl") if "loss" in m]
    assert [m["loss"] for m in pre] == pytest.approx([m["loss"] for m in online], abs=1e-4)
    cached = list((layout.root / "cache/critic_values").glob("*.safetensors"))
    assert len(cached) == 2  # train and validation sets
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = train(
        config_for("verifiable", "run_name=ver-pre2", "weighting.verifiable.precompute=true"),
        layout,
    )
    assert [m["loss"] for m in read_metrics(again.parent / "metrics.jsonl") if "loss" in m] == [
        m["loss"] for m in pre
    ]
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read from the cache, not recomputed
    # resume from the step-2 checkpoint: the EMA of the advantages must come back exactly
    run = finals["verifiable"].parent
    resumed_dir = run.parent / "ver-resumed"
    shutil.copytree(run, resumed_dir)
    shutil.rmtree(resumed_dir / "final")
    train(config_for("verifiable", "run_name=ver-resumed", "checkpoint.resume=true"), layout)
    a, b = checkpoint.load_tensors(run / "final"), checkpoint.load_tensors(resumed_dir / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = (
        torch.load(d / "final/train_state.pt", weights_only=True)["extra"]["objective"]
        for d in (run, resumed_dir)
    )
    assert state_a == state_b and state_a["weighting"]["ema"]["steps"] == 3


def test_bad_critic_fails_before_training(trained, tmp_path):
    layout, finals = trained
    with pytest.raises(StorageError, match="no finished training checkpoint"):
        Trainer(
            config_for("verifiable", "weighting.verifiable.critic_checkpoint=checkpoints/nothing"),
            layout,
        )
    broken = tmp_path / "critic"
    shutil.copytree(finals["critic"], broken)
    info = json.loads((broken / "wmtp_checkpoint.json").read_text())
    info["value_head"]["hidden_size"] = 2560
    (broken / "wmtp_checkpoint.json").write_text(json.dumps(info))
    with pytest.raises(
        UserError, match="critic checkpoint hidden size 2560 does not match the backbone's 64"
    ):
        Trainer(
            config_for("verifiable", f"weighting.verifiable.critic_checkpoint={broken}"), layout
        )


def test_head_coefficients_can_be_scheduled(tiny_storage):
    final = train(
        config_for(
            "baseline",
            "run_name=coef",
            "train.head_coefficients=[0.4,0.3,0.2,0.1]",
            "train.head_coefficients_end=[0.25,0.25,0.25,0.25]",
        ),
        StorageLayout(tiny_storage),
    )
    steps = [m for m in read_metrics(final.parent / "metrics.jsonl") if "loss" in m]
    assert [m["coef/head1"] for m in steps] == pytest.approx([0.4, 0.325, 0.25])
    assert [m["coef/head4"] for m in steps] == pytest.approx([0.1, 0.175, 0.25])


def test_every_head_block_is_trained_and_reloads(trained):
    layout, finals = trained
    tensors = checkpoint.load_tensors(finals["baseline"])
    for block in ("layers.0", "layers.3", "extra_heads.0", "extra_heads.1", "extra_heads.2"):
        b = tensors[f"{block}.attention.wq.lora_B.default.weight"]
        assert b.abs().sum() > 0, f"{block} adapter did not change"
    merged = load_trained(finals["baseline"], layout)
    config = config_for("baseline")
    trainer = Trainer(config.model_copy(update={"run_name": "reload-check"}), layout)
    checkpoint.load_into(trainer.model, finals["baseline"])
    tokens = torch.randint(0, 1000, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer.model.eval()(tokens)
        got = merged(tokens)
    assert got.shape[2] == 4
    assert torch.allclose(got, expected, atol=1e-5)
    base = load_pretrained(layout.model("micro-mtp").root)
    with torch.no_grad():
        assert not torch.allclose(base(tokens)[:, :, 3], got[:, :, 3], atol=1e-6)


def _run_cli(storage, *args, wait=True, recipe="baseline"):
    cmd = [
        sys.executable,
        "-m",
        "weighted_mtp",
        "train",
        str(REPO / f"configs/local/{recipe}.yaml"),
        "--storage",
        str(storage),
        *FAST[1:],
        *args,
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO
    )


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["baseline", "verifiable", "ntp"])
def test_sigkill_and_resume_is_bitwise_exact(trained, tiny_storage, recipe):
    """Verifiable also checks that the EMA of the critic's advantages comes back exactly; ntp,
    that adapters without gradients (its unused heads) do not stop the resume."""
    common = ["train.max_steps=6", "checkpoint.every=2", "lora.dropout=0.1"]
    full = _run_cli(tiny_storage, *common, "run_name=uninterrupted", recipe=recipe)
    assert full.returncode == 0, full.stderr[-2000:]
    run_dir = tiny_storage / f"checkpoints/{recipe}/killed"
    proc = _run_cli(tiny_storage, *common, "run_name=killed", wait=False, recipe=recipe)
    deadline = time.time() + 300
    while not (run_dir / "step_00000004").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before its 2nd checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final").exists()
    resumed = _run_cli(
        tiny_storage, *common, "run_name=killed", "checkpoint.resume=true", recipe=recipe
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a = checkpoint.load_tensors(tiny_storage / f"checkpoints/{recipe}/uninterrupted/final")
    b = checkpoint.load_tensors(run_dir / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    states = [torch.load(d / "final/train_state.pt", weights_only=True)["extra"]["objective"]
              for d in (run_dir, run_dir.parent / "uninterrupted")]  # fmt: skip
    assert states[0] == states[1]


def test_bad_config_is_one_line(tiny_storage, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  recipe: baseline\n  bacth_size: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "weighted_mtp", "train", str(bad), "--storage", str(tiny_storage)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"wmtp: error: {bad}:3: unknown config key 'train.bacth_size'"


def test_metrics_reach_mlflow_without_secrets(tiny_storage, monkeypatch):
    """The default tracking store: sqlite under the storage root; telemetry off; no token."""
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_log_me")
    layout = StorageLayout(tiny_storage)
    config = config_for("baseline", "run_name=mlflow", "log.mlflow=true", "train.max_steps=2")
    final = train(config, layout)
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tiny_storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("baseline")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.run_name = 'mlflow'"
    )
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "ce/head4")
    assert [m.step for m in history] == [1, 2]
    assert runs[0].data.params["train.recipe"] == "policy"  # as the config wrote it
    dumped = json.dumps(runs[0].data.params) + (final.parent / "metrics.jsonl").read_text()
    assert "hf_do_not_log_me" not in dumped


@pytest.mark.parametrize("control", ["shuffled", "random_matched"])
def test_control_arms_move_the_same_amount_of_weight(trained, control):
    layout, finals = trained
    plain = [m for m in read_metrics(finals["rho1"].parent / "metrics.jsonl") if "loss" in m]
    final = train(
        config_for("rho1", f"run_name=rho1-{control}", f"weighting.control={control}"), layout
    )
    steps = [m for m in read_metrics(final.parent / "metrics.jsonl") if "loss" in m]
    if control == "shuffled":  # each sequence keeps its number of selected tokens
        assert [m["weight_mean/head1"] for m in steps] == pytest.approx(
            [m["weight_mean/head1"] for m in plain], abs=1e-6
        )
    assert all(0.4 <= m["weight_mean/head1"] <= 0.8 for m in steps)
    assert [m["loss"] for m in steps] != pytest.approx([m["loss"] for m in plain], abs=1e-6)


def test_evaluate_a_trained_checkpoint_with_and_without_speculation(trained, tmp_path):
    from weighted_mtp.evaluation.harness import evaluate

    layout, finals = trained
    common = {"max_tasks": 2, "max_new_tokens": 16, "workers": 2}
    plain = evaluate(layout, str(finals["baseline"]), "humaneval", tmp_path / "plain", **common)
    spec = evaluate(layout, str(finals["baseline"]), "humaneval", tmp_path / "spec",
                    speculative=True, **common)  # fmt: skip
    for out in ("plain", "spec"):
        assert {p.name for p in (tmp_path / out).iterdir()} == {
            "samples.jsonl",
            "results.jsonl",
            "summary.json",
        }
    assert (tmp_path / "plain/samples.jsonl").read_text() == (
        tmp_path / "spec/samples.jsonl"
    ).read_text()
    assert plain["settings"]["prompt_mode"] == "alpaca" and plain["settings"]["task_ids"] == [
        "HumanEval/0",
        "HumanEval/1",
    ]
    assert plain["problems"] == 2 and sum(plain["verdicts"].values()) == 2
    assert len(spec["decoding"]["acceptance"]) == 3 and spec["decoding"]["tokens_per_step"] >= 1.0


@pytest.mark.distributed
def test_evaluate_under_torchrun_writes_what_one_process_writes(trained, tmp_path):
    layout, finals = trained
    args = [
        "-m", "weighted_mtp", "evaluate", "--checkpoint", str(finals["baseline"]),
        "--dataset", "humaneval", "--max-tasks", "3", "--num-samples", "3",
        "--temperature", "0.8", "--max-new-tokens", "8", "--storage", str(layout.root),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, launcher, extra in (
        ("one", [sys.executable], ["--mlflow-uri", uri]),
        ("two", torchrun, ["--no-mlflow"]),
    ):
        result = subprocess.run(
            [*launcher, *args, "--out", str(tmp_path / name), *extra],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    for file in ("samples.jsonl", "results.jsonl"):
        assert (tmp_path / "one" / file).read_text() == (tmp_path / "two" / file).read_text()
    one = json.loads((tmp_path / "one/summary.json").read_text())
    two = json.loads((tmp_path / "two/summary.json").read_text())
    assert two["settings"]["ranks"] == 2 and one["pass_at_k"] == two["pass_at_k"]
    assert one["decoding"]["tokens"] == two["decoding"]["tokens"]
    samples = [json.loads(line) for line in (tmp_path / "one/samples.jsonl").open()]
    assert [s["task_id"] for s in samples] == [f"HumanEval/{i}" for i in range(3) for _ in "abc"]

    import mlflow

    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["evaluation"], output_format="list")
    assert run.data.metrics["pass_at_1"] == pytest.approx(one["pass_at_k"]["pass@1"]["mean"])
    assert run.data.params["num_samples"] == "3" and run.data.params["dataset"] == "humaneval"


# ---- the cost of a new idea: one weighting class and one registry entry (or entry point) ----


class EndDecay(Weighting):
    """Weight ``decay ** d`` on a target ``d`` tokens before the last one of its response."""

    name = "end_decay"

    class Settings(Section):
        decay: float = 0.9

    def weights(self, batch, n_heads: int, micro: Micro) -> MicroWeights:
        mask = batch.labels != IGNORE_INDEX
        pos = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask, pos, -1).amax(dim=1, keepdim=True)
        weights = self.settings.decay ** (last - pos).clamp(min=0).float() * mask
        return self.dense_weights(batch, weights, n_heads)


def test_a_new_weighting_trains_from_a_config(tiny_storage, tmp_path, monkeypatch):
    monkeypatch.setitem(WEIGHTINGS, EndDecay.name, EndDecay)  # the one registry entry
    config = yaml.safe_load((REPO / "configs/local/baseline.yaml").read_text())
    config["weighting"] = {"name": "end_decay", "end_decay": {"decay": 0.8}}
    path = tmp_path / "end_decay.yaml"
    path.write_text(yaml.safe_dump(config))
    final = train(load_config(path, [*FAST, "run_name=end-decay"]), StorageLayout(tiny_storage))
    run_dir = final.parent
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(0 < m["weight_mean/head1"] < 0.5 for m in steps)  # most tokens are far from the end
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["weighting"]["end_decay"] == {"decay": 0.8}
    snapshot = json.loads((run_dir / "token_weights.jsonl").open().readline())
    head1 = [w for w in snapshot["weights"][0] if w is not None]
    assert head1[-3:] == pytest.approx([0.64, 0.8, 1.0])  # the last target of the response: 1
    with pytest.raises(Exception, match="decay"):
        load_config(path, ["weighting.end_decay.decay=fast"])


# ---- precomputing frees the frozen helper ----


@pytest.mark.parametrize(
    ("recipe", "loader", "override"),
    [("rho1", "load_trained", "weighting.rho1.precompute=true"),
     ("verifiable", "load_critic", "weighting.verifiable.precompute=true")],
)  # fmt: skip
def test_nothing_holds_the_frozen_helper_after_prepare(
    trained, monkeypatch, recipe, loader, override
):
    layout, _ = trained
    helpers = []
    load = getattr(checkpoint, loader)

    def spy(*args, **kwargs):
        model = load(*args, **kwargs)
        helpers.append(weakref.ref(model))
        return model

    monkeypatch.setattr(checkpoint, loader, spy)
    trainer = Trainer(config_for(recipe, f"run_name={recipe}-freed", override), layout)
    gc.collect()
    assert len(helpers) == 1 and helpers[0]() is None
    metrics = trainer.step([next(trainer.train_stream.iterate(trainer.state))])
    assert torch.isfinite(torch.tensor(metrics["loss"]))


# ---- a weighting from another package: one class, one entry point, one YAML file ----

PLUGIN = '''
import torch

from weighted_mtp.config import Section
from weighted_mtp.data.collate import IGNORE_INDEX
from weighted_mtp.train.weighting import Weighting


class FirstTokens(Weighting):
    """Weight ``boost`` on the first ``n`` targets of each response, 1 elsewhere."""

    name = "first_tokens"
    display_name = "first tokens"

    class Settings(Section):
        n: int = 4
        boost: float = 3.0

    def weights(self, batch, n_heads, micro):
        mask = batch.labels != IGNORE_INDEX
        rank = torch.cumsum(mask.long(), dim=1)
        w = torch.where(rank <= self.settings.n, self.settings.boost, 1.0) * mask
        return self.dense_weights(batch, w, n_heads)
'''


def _plugin_package(root):
    """``wmtp_first`` and its ``.dist-info`` on ``root``: what ``pip install`` leaves."""
    (root / "wmtp_first").mkdir(parents=True)
    (root / "wmtp_first/__init__.py").write_text(PLUGIN)
    info = root / "wmtp_first-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wmtp-first\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[weighted_mtp.weightings]\nfirst_tokens = wmtp_first:FirstTokens\n"
    )


@pytest.mark.slow
def test_a_weighting_from_an_entry_point_trains_with_its_controls(tiny_storage, tmp_path):
    plugin = tmp_path / "site"
    _plugin_package(plugin)
    config = yaml.safe_load((REPO / "configs/local/baseline.yaml").read_text())
    config["weighting"] = {"name": "first_tokens", "first_tokens": {"n": 3, "boost": 4.0}}
    path = tmp_path / "first_tokens.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(plugin), str(REPO / "src"), str(REPO)])}  # fmt: skip

    def wmtp_train(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "weighted_mtp", "train", str(path), *FAST, *overrides,
             "--storage", str(tiny_storage)],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
        )  # fmt: skip

    runs = {}
    for control in ("none", "shuffled"):
        result = wmtp_train(f"run_name=first-{control}", f"weighting.control={control}")
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = tiny_storage / "checkpoints" / config["experiment"] / f"first-{control}"
        runs[control] = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["weighting"]["first_tokens"] == {"n": 3, "boost": 4.0}
    plain, shuffled = runs["none"], runs["shuffled"]
    assert [m["step"] for m in plain] == [m["step"] for m in shuffled] == [1, 2, 3]
    assert all(m["weight_mean/head1"] > 1.0 for m in plain)
    # The control arm, with no line of the plugin's: the same weights, other tokens.
    assert [m["weight_mean/head1"] for m in shuffled] == pytest.approx(
        [m["weight_mean/head1"] for m in plain], abs=1e-6
    )
    assert [m["loss"] for m in shuffled] != pytest.approx([m["loss"] for m in plain], abs=1e-6)
    bad = wmtp_train("run_name=first-bad", "weighting.first_tokens.boots=2")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "wmtp: error: unknown config key 'weighting.first_tokens.boots'"
    ]
