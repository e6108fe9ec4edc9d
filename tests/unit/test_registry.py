"""The weighting registry (docs/ARCHITECTURE.md, "The weighting registry"): built-in entries
agree with their classes and the config, config validates sections whatever was imported,
and the control arms apply to any weighting without a line of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from pydantic import BaseModel

from tests.conftest import REPO
from weighted_mtp import registry
from weighted_mtp.base.errors import UserError
from weighted_mtp.config import ConfigError, Section, WeightingConfig, load_config
from weighted_mtp.data.collate import IGNORE_INDEX, Batch
from weighted_mtp.train.mtp_loss import head_denominators, valid_rows
from weighted_mtp.train.recipes import RECIPES
from weighted_mtp.train.weighting import (
    WEIGHTINGS,
    Micro,
    MicroWeights,
    Weighting,
    apply_control,
    control_generator,
)


def test_builtin_entries_agree_with_their_classes_the_config_and_the_recipes():
    for name, entry in registry.BUILTIN.items():
        cls = entry.load()
        assert cls.name == name and WEIGHTINGS[name] is cls
        assert cls.Settings is entry.settings_class()
        assert cls.scores_tokens == entry.scores_tokens
        if entry.settings is not None:  # built-in sections are typed fields of the config
            assert WeightingConfig.model_fields[name].annotation is entry.settings_class()
        if entry.helper is not None:
            assert registry.recipe_of(entry.helper.recipe).recipe in RECIPES
            assert entry.helper.key in entry.settings_class().model_fields
    assert set(registry.RECIPES) == set(RECIPES)
    assert {recipe for recipe, _, _ in registry.ALIASES.values()} <= set(RECIPES)
    for spec in (*registry.RECIPES.values(), *registry.ALIASES.values()):
        assert spec.weighting is None or spec.weighting in registry.BUILTIN
    assert registry.helper_for("verifiable") == ("weighting.verifiable.critic_checkpoint", "critic")
    assert registry.helper_for("policy", "verifiable") == registry.helper_for("verifiable")
    assert registry.helper_for("policy", "critic_td") == registry.helper_for("verifiable")
    assert registry.helper_for("rho1") == ("weighting.rho1.reference", "ref_tuning")
    assert registry.helper_for("baseline", "rho1") == ("weighting.rho1.reference", "ref_tuning")
    assert registry.helper_for("policy", "rho1") == ("weighting.rho1.reference", "ref_tuning")
    for recipe in ("baseline", "policy", "critic", "reference", "ref_tuning", "ntp"):
        assert registry.helper_for(recipe) is None


# ---- recipes and aliases ----


def test_every_alias_is_a_recipe_with_a_weighting_and_heads():
    assert list(registry.RECIPES) == ["policy", "critic", "reference", "pretrain"]
    assert dict(registry.ALIASES) == {
        "baseline": ("policy", "uniform", None),
        "verifiable": ("policy", "verifiable", None),
        "rho1": ("policy", "rho1", None),
        "ntp": ("policy", "uniform", 1),
        "ref_tuning": ("reference", "uniform", 1),
    }
    assert not set(registry.ALIASES) & set(registry.RECIPES)
    for name in registry.RECIPES:
        assert registry.recipe_of(name).recipe == name
    recipe, weighting, heads = registry.recipe_of("rho1")
    assert (recipe, weighting, heads) == ("policy", "rho1", None)
    assert registry.weighting_of("verifiable") == "verifiable"
    assert registry.weighting_of("policy", "critic_td") == "verifiable"
    assert registry.weighting_of("policy") == "uniform" and registry.weighting_of("critic") is None
    assert registry.is_value_recipe("critic") and not registry.is_value_recipe("ref_tuning")
    assert not registry.is_value_recipe("nope") and not registry.is_value_recipe(None)
    assert registry.alias_text("ntp") == "policy on head 1 only"
    assert registry.alias_text("ref_tuning") == "reference"
    assert registry.alias_text("rho1") == "policy with weighting rho1"


def test_an_unknown_recipe_is_one_line_naming_the_recipes_and_the_aliases():
    message = (
        "unknown recipe 'nope'; choose from policy, critic, reference, pretrain "
        "(aliases: baseline, verifiable, rho1, ntp, ref_tuning)"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        registry.recipe_of("nope")
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(None, ["train.recipe=nope"])
    assert "\n" not in str(err.value) and "config key 'train.recipe'" in str(err.value)


def test_the_old_weighting_name_and_section_read_as_verifiable(tmp_path):
    assert registry.get("critic_td") is registry.BUILTIN["verifiable"]
    assert WEIGHTINGS["critic_td"] is WEIGHTINGS["verifiable"]
    assert "critic_td" not in registry.names()
    path = tmp_path / "old.yaml"
    path.write_text(
        "train: {recipe: verifiable}\nweighting:\n  critic_td: {clip_min: 0.2, beta: 2.0}\n"
    )
    config = load_config(path)
    assert config.train.recipe == "verifiable"  # kept as written
    assert config.weighting.verifiable.clip_min == 0.2 and config.weighting.verifiable.beta == 2.0
    assert config.weighting.settings("critic_td", None) is config.weighting.verifiable
    named = load_config(None, ["weighting.name=critic_td", "weighting.critic_td.beta=3"])
    assert named.weighting.name == "critic_td" and named.weighting.verifiable.beta == 3.0
    with pytest.raises(ConfigError, match=r"^config key 'weighting': weighting.critic_td is the "
                       r"old name of weighting.verifiable: give one of them$"):  # fmt: skip
        load_config(None, ["weighting.critic_td.beta=3", "weighting.verifiable.beta=2"])
    path.write_text("weighting:\n  critic_td:\n    clip_min: fast\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: config key "
                       r"'weighting.verifiable.clip_min'"):  # fmt: skip
        load_config(path)  # the line of the key as written, under the old name


def test_an_unknown_weighting_name_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="unknown weighting 'nope'; choose from uniform"):
        load_config(None, ["weighting.name=nope"])


def test_config_validates_sections_without_importing_train():
    """``wmtp study`` validates its runs before anything imports ``train``: the registry,
    not an import-time patch, decides which sections exist."""
    code = (
        "import sys\n"
        "from weighted_mtp.config import ConfigError, load_config\n"
        "c = load_config(None, ['weighting.name=rho1', 'weighting.rho1.k_percent=0.5'])\n"
        "assert c.weighting.rho1.k_percent == 0.5\n"
        "try:\n"
        "    load_config(None, ['weighting.bogus.x=1'])\n"
        "except ConfigError as err:\n"
        "    print(err)\n"
        "assert 'weighted_mtp.train' not in sys.modules and 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "unknown weighting section 'bogus'" in out.stdout


# ---- a weighting with no control code gets the control arms ----


class Ramp(Weighting):
    """Dense weights that grow along each response: no control code of its own."""

    name = "test_ramp"

    class Settings(Section):
        scale: float = 1.0

    def weights(self, batch, n_heads: int, micro: Micro) -> MicroWeights:
        mask = batch.labels != IGNORE_INDEX
        w = torch.cumsum(mask.float(), dim=1) * mask * self.settings.scale
        return self.dense_weights(batch, w, n_heads)


class RampFn(Ramp):
    """The same weights as a function of the policy's CE (computed in the forward pass)."""

    name = "test_ramp_fn"

    def weights(self, batch, n_heads: int, micro: Micro) -> MicroWeights:
        dense = super().weights(batch, n_heads, micro)

        def fn(head: int, ce, batch_idx, target_pos):
            return dense.dense[batch_idx, target_pos]

        return MicroWeights(dense.denominators, None, fn)


def ramp_batch(rows: int = 4, length: int = 30) -> Batch:
    tokens = torch.arange(rows * length).reshape(rows, length) % 50 + 3
    labels = tokens.clone()
    labels[:, :6] = IGNORE_INDEX
    for row in range(rows):
        labels[row, length - row * 3 :] = IGNORE_INDEX
    return Batch(tokens, labels, torch.ones_like(tokens))


@pytest.mark.parametrize("control", ["shuffled", "random_matched"])
def test_a_new_dense_weighting_gets_the_control_arms(control):
    batch, micro = ramp_batch(), Micro(2, 1, True)
    mask = batch.labels != IGNORE_INDEX
    plain = Ramp().weigh(batch, 4, micro)
    moved = Ramp(control=control, seed=5).weigh(batch, 4, micro)
    expected = apply_control(plain.dense, mask, control, control_generator(5, 2, 1, 0))
    assert torch.equal(moved.dense, expected) and not torch.equal(moved.dense, plain.dense)
    torch.testing.assert_close(
        moved.denominators, head_denominators(batch.labels, expected, 4, "weight_sum")
    )


def test_a_new_weight_function_gets_the_control_arm_on_every_head():
    batch, micro = ramp_batch(), Micro(0, 0, False)
    plain = RampFn().weigh(batch, 4, micro)
    moved = RampFn(control="shuffled", seed=5).weigh(batch, 4, micro)
    torch.testing.assert_close(moved.denominators, plain.denominators)
    for head in range(4):
        b_idx, t_idx = valid_rows(batch.labels, head + 1)
        ce = torch.zeros(b_idx.shape)
        a, b = plain.weight_fn(head, ce, b_idx, t_idx), moved.weight_fn(head, ce, b_idx, t_idx)
        assert not torch.equal(a, b)
        for row in range(4):  # each row keeps its multiset of weights
            rows = b_idx == row
            torch.testing.assert_close(a[rows].sort().values, b[rows].sort().values)


def test_overriding_weigh_would_bypass_the_controls_and_is_refused():
    with pytest.raises(TypeError, match="implement `weights`"):

        class Bypass(Weighting):
            name = "bypass"

            def weigh(self, batch, n_heads, micro):  # type: ignore[override]
                raise AssertionError


def test_registering_in_process_adds_the_section_and_unregistering_removes_it(monkeypatch):
    monkeypatch.setitem(WEIGHTINGS, Ramp.name, Ramp)
    config = load_config(None, ["weighting.name=test_ramp", "weighting.test_ramp.scale=2"])
    section = config.weighting.settings("test_ramp", Ramp.Settings)
    assert isinstance(section, BaseModel) and section.scale == 2.0
    assert registry.find("test_ramp").label == "test_ramp"
    with pytest.raises(ConfigError, match=r"unknown config key 'weighting.test_ramp.speed'"):
        load_config(None, ["weighting.test_ramp.speed=2"])
    monkeypatch.undo()
    assert registry.get("test_ramp") is None
    with pytest.raises(ConfigError, match="unknown weighting section 'test_ramp'"):
        load_config(None, ["weighting.test_ramp.scale=2"])
