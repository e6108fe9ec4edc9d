"""The weighting registry (docs/ARCHITECTURE.md, "The weighting registry"): built-in entries
agree with their classes and the config, config validates sections whatever was imported,
and the control arms apply to any weighting without a line of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from pydantic import BaseModel

from tests.conftest import REPO
from weighted_mtp import registry
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
            assert entry.helper.recipe in RECIPES
            assert entry.helper.key in entry.settings_class().model_fields
    assert set(registry.RECIPE_WEIGHTINGS) == set(RECIPES)
    assert {w for w in registry.RECIPE_WEIGHTINGS.values() if w} <= set(registry.BUILTIN)
    assert registry.helper_for("verifiable") == ("weighting.critic_td.critic_checkpoint", "critic")
    assert registry.helper_for("rho1") == ("weighting.rho1.reference", "ref_tuning")
    assert registry.helper_for("baseline", "rho1") == ("weighting.rho1.reference", "ref_tuning")
    assert registry.helper_for("baseline") is None and registry.helper_for("critic") is None


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
