"""Tests of the Gymnasium environment and the per-anchor SB3 VecEnv."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import AnchorMiningVecEnv

SMALL = {"preset": "test", "batch_size": 16, "search_space": 128, "top_k": 8, "steps": 4, "eval_every": 0}


@pytest.fixture(scope="module")
def small_env(embedded_splits):
    env = gym.make(envs.ENV_ID, splits=embedded_splits, **SMALL)
    yield env
    env.close()


def test_registered_env_passes_check_env(small_env):
    check_env(small_env.unwrapped, skip_render_check=True)


def test_env_spec_is_deterministic(small_env):
    assert small_env.spec.nondeterministic is False


def test_env_default_action_space_has_eleven_levels(small_env):
    assert small_env.action_space == gym.spaces.Discrete(11)


def test_env_continuous_action_space(embedded_splits):
    env = envs.NegativeMiningEnv(splits=embedded_splits, action_space="continuous", **SMALL)
    assert env.action_space == gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)


def test_env_episode_ends_at_step_budget(small_env):
    small_env.reset(seed=1)
    terminated = [small_env.step(10)[2] for _ in range(4)]
    assert terminated == [False, False, False, True]


def test_env_info_carries_losses_hardness_fn_rate_epoch_end(small_env):
    small_env.reset(seed=1)
    info = small_env.step(5)[4]
    assert {"losses", "mean_hardness", "mined_fn_rate", "epoch_end"} <= set(info)
    assert info["mean_hardness"] == pytest.approx(0.5)


def test_default_env_builds_tiny_preset_on_embedded_data():
    env = envs.NegativeMiningEnv()
    assert (env.config.preset, env.config.data) == ("tiny", None)
    assert len(env.run.splits["train"]) == 5000


def test_vec_env_has_one_slot_per_anchor(embedded_splits):
    vec_env = AnchorMiningVecEnv(splits=embedded_splits, **SMALL)
    assert vec_env.num_envs == 8


def test_vec_env_resets_after_last_step(embedded_splits):
    vec_env = AnchorMiningVecEnv(splits=embedded_splits, **{**SMALL, "steps": 2})
    vec_env.reset()
    vec_env.step(np.full(8, 10))
    _, rewards, dones, infos = vec_env.step(np.full(8, 10))
    assert dones.all() and "terminal_observation" in infos[0]


def test_sb3_ppo_learns_on_vec_env(embedded_splits):
    from stable_baselines3 import PPO

    vec_env = AnchorMiningVecEnv(splits=embedded_splits, **{**SMALL, "steps": 30})
    model = PPO("MlpPolicy", vec_env, n_steps=4, batch_size=16, n_epochs=1, seed=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=4 * vec_env.num_envs)
    changed = any(not np.allclose(a, b.detach()) for a, b in zip(before, model.policy.parameters()))
    assert changed
