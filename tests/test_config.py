"""Tests of the typed run configuration."""

from __future__ import annotations

import pytest

from falcon_rl.config import ConfigError, TrainConfig


def test_config_defaults_validate():
    config = TrainConfig()
    assert config.scheduler == "ppo"


def test_config_rejects_value_outside_choices():
    with pytest.raises(ConfigError, match=r"invalid value for reward: 'loss' \(allowed: auto, mlm_gain"):
        TrainConfig.from_dict({"reward": "loss"})


def test_config_rejects_unknown_field():
    with pytest.raises(ConfigError, match="unknown configuration field\\(s\\): batchsize"):
        TrainConfig.from_dict({"batchsize": 4})


def test_config_rejects_steps_and_epochs_together():
    with pytest.raises(ConfigError, match="steps and epochs are both set"):
        TrainConfig.from_dict({"steps": 3, "epochs": 1})


def test_config_converts_yaml_strings():
    config = TrainConfig.from_dict({"steps": "12", "lr": "1e-3", "deterministic": "true"})
    assert (config.steps, config.lr, config.deterministic) == (12, 1e-3, True)


def test_config_rejects_fractional_int():
    with pytest.raises(ConfigError, match="invalid value for batch_size: 2.5 \\(expected int\\)"):
        TrainConfig.from_dict({"batch_size": 2.5})


def test_config_total_steps_from_epochs():
    assert TrainConfig(epochs=1.5).total_steps(steps_per_epoch=10) == 15


def test_config_from_yaml_rejects_non_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        TrainConfig.from_yaml(path)


def test_config_auto_reward_follows_framework():
    assert TrainConfig(framework="siglip").reward == "itc_gain"


def test_config_mafa_filter_turns_on_itm_filter():
    assert TrainConfig(scheduler="mafa-filter").fn_filter_threshold() == 0.5


def test_config_rejects_malformed_fn_filter():
    with pytest.raises(ConfigError, match="invalid value for fn_filter: 'itm:high'"):
        TrainConfig(fn_filter="itm:high")
