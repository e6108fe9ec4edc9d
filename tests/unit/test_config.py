"""The typed config: differences-only YAML, typed overrides, errors that name the key."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from weighted_mtp import registry
from weighted_mtp.config import Config, ConfigError, config_diff, load_config

# Training configs; configs/study holds study specs (tests/unit/test_study.py loads them).
CONFIGS = sorted(p for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name != "study")


def test_defaults_without_a_file():
    config = load_config()
    assert config == Config()
    assert config.optim.betas == (0.9, 0.95) and config.train.normalization == "weight_sum"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads_and_holds_only_differences(path):
    config = load_config(path)
    # The file trains what the alias of its name stands for (``ntp.yaml``: the policy on head 1).
    named = registry.recipe_of(path.stem)
    recipe = registry.recipe_of(config.train.recipe)
    assert recipe.recipe == named.recipe and recipe.recipe in registry.RECIPES
    assert config.train.recipe in registry.RECIPES  # the configs use the recipes' own names
    name = registry.weighting_of(config.train.recipe, config.weighting.name)
    assert name == registry.weighting_of(path.stem)
    if named.n_heads is not None:
        assert (recipe.n_heads or config.model.n_future_tokens) == named.n_heads
    assert config.experiment == path.stem
    # Writing back only the differences must reproduce the same config.
    assert Config.model_validate(config_diff(config)) == config


def test_every_config_folder_covers_the_same_recipes():
    folders = {
        name: {p.stem for p in (REPO / "configs" / name).glob("*.yaml")}
        for name in ("local", "production", "quickstart")
    }
    local = folders["local"]
    assert all(found == local for found in folders.values()), folders
    assert {"baseline", "rho1", "ref_tuning", "ntp", "verifiable", "critic"} <= local
    # every recipe is trained by a config of each folder
    for name in folders:
        trained = {
            registry.recipe_of(load_config(REPO / "configs" / name / f"{stem}.yaml").train.recipe)
            .recipe for stem in local
        }  # fmt: skip
        assert trained == set(registry.RECIPES), name


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {batch_size: 4}\n")
    config = load_config(
        path,
        [
            "optim.lr=3e-5",
            "train.max_steps=7",
            "lora.targets=[wq,w2]",
            "data.small=true",
            "model.path=micro-mtp",
        ],
    )
    assert config.optim.lr == 3e-5 and isinstance(config.optim.lr, float)
    assert config.train.max_steps == 7 and config.train.batch_size == 4
    assert config.lora.targets == ["wq", "w2"] and config.data.small is True


def test_unknown_key_names_path_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("experiment: x\noptim:\n  lr: 1.0e-4\n  betaz: [0.9, 0.99]\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: unknown config key 'optim.betaz'$"):
        load_config(path)


def test_wrong_type_names_path_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: config key 'train.batch_size': .*'many'"):
        load_config(path)


def test_bad_override_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.bogus'"):
        load_config(None, ["train.bogus=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["train.batch_size"])
    with pytest.raises(ConfigError, match="config key 'lora.targets.0'"):
        load_config(None, ["lora.targets=[q_proj]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: [1,\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:\d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cross_field_check():
    with pytest.raises(ConfigError, match="clip_min 5.0 > clip_max 3.0"):
        load_config(None, ["weighting.verifiable.clip_min=5"])


def test_every_weighting_knob_is_its_own_section():
    config = load_config(None, ["weighting.verifiable.ema_rule=upstream",
                                "weighting.verifiable.ema_warmup=4",
                                "weighting.verifiable.initial_value=0.0",
                                "weighting.rho1.precompute=true"])  # fmt: skip
    td = config.weighting.verifiable
    assert (td.ema_rule, td.ema_warmup, td.initial_value) == ("upstream", 4, 0.0)
    assert config.weighting.rho1.precompute and not td.precompute
    # A section nobody registered, or a knob of the old flat layout, is one clear line.
    with pytest.raises(ConfigError, match="unknown weighting section 'clip_min'"):
        load_config(None, ["weighting.clip_min=0.2"])
    with pytest.raises(ConfigError, match="config key 'weighting.verifiable.ema_rule'"):
        load_config(None, ["weighting.verifiable.ema_rule=fast"])


def test_a_run_written_under_the_old_names_is_the_run_the_new_config_plans():
    """A run folder's ``config.yaml`` keeps what was written; the study's "same run?" check
    resolves the aliases of both sides, so a run trained as ``recipe: verifiable`` with a
    ``weighting.critic_td`` section is the run ``configs/*/verifiable.yaml`` now plans."""
    import copy

    from weighted_mtp.config import config_differences, config_to_dict

    for stem, old_recipe in (("verifiable", "verifiable"), ("rho1", "rho1"), ("ntp", "ntp"),
                             ("ref_tuning", "ref_tuning"), ("baseline", "baseline")):  # fmt: skip
        planned = config_to_dict(load_config(REPO / "configs/local" / f"{stem}.yaml"))
        before = copy.deepcopy(planned)  # what the same run wrote before 2026-12-07
        before["train"]["recipe"] = old_recipe
        before["weighting"]["name"] = None
        before["weighting"]["critic_td"] = before["weighting"].pop("verifiable")
        if stem == "ntp":
            before["model"]["n_future_tokens"] = None  # the alias fixes head 1
        assert config_differences(planned, before) == [], stem
        assert planned["train"]["recipe"] != old_recipe and before["weighting"]["critic_td"]
    baseline = config_to_dict(load_config(REPO / "configs/local/baseline.yaml"))
    as_rho1 = config_to_dict(
        load_config(REPO / "configs/local/baseline.yaml", ["train.recipe=rho1"])
    )
    assert config_differences(baseline, as_rho1) == ["weighting.name"]
    with_name = config_to_dict(
        load_config(REPO / "configs/local/baseline.yaml", ["weighting.name=rho1"])
    )
    assert config_differences(as_rho1, with_name) == []
