"""Tests of the live training run that schedulers step through."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest

from falcon_rl.config import ConfigError
from falcon_rl.mining import OBS_HIGH, OBS_LOW
from falcon_rl.training import NonFiniteError, TrainingRun


def make_run(config, splits, **changes):
    return TrainingRun(dataclasses.replace(config, **changes), splits)


def test_run_reset_returns_bounded_anchor_observations(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits)
    observation = run.reset(0)
    assert observation.shape == (8, OBS_LOW.shape[0])
    assert observation.dtype == np.float32
    assert np.all((observation >= OBS_LOW) & (observation <= OBS_HIGH))


def test_run_reset_is_deterministic_for_a_seed(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits)
    first = run.reset(3)
    second = run.reset(3)
    np.testing.assert_array_equal(first, second)


def test_run_step_reward_is_mlm_before_minus_after(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits, lr=1e-3)
    run.reset(0)
    result = run.step(np.ones(8, dtype=np.float32))
    losses = result.info["losses"]
    assert result.reward == pytest.approx(losses["mlm"] - losses["mlm_after"], abs=1e-6)


def test_run_step_lowering_mlm_gives_positive_reward(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits, lr=1e-3, reward="mlm_gain")
    run.reset(0)
    result = run.step(np.ones(8, dtype=np.float32))
    losses = result.info["losses"]
    assert losses["mlm_after"] < losses["mlm"]
    assert result.reward > 0


def test_run_terminates_at_step_budget(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits, steps=3)
    run.reset(0)
    done = [run.step(np.full(8, 0.5, dtype=np.float32)).terminated for _ in range(3)]
    assert done == [False, False, True]


def test_run_random_batches_have_no_hardness(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits)
    run.reset(0, uses_mining=False)
    info = run.step(None).info
    assert info["mean_hardness"] is None


def test_run_rejects_dataset_smaller_than_batch(test_config, embedded_splits):
    with pytest.raises(ConfigError, match="fewer than one batch"):
        make_run(test_config, embedded_splits, batch_size=10_000)


def test_run_clips_search_space_to_dataset(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits, search_space=10**7)
    assert run.search_space == len(embedded_splits["train"])


def test_run_odd_batch_size_steps(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits, batch_size=7)
    run.reset(0)
    result = run.step(np.ones(4, dtype=np.float32))
    assert result.info["batch_size"] == 7


def test_run_huge_lr_stops_with_nonfinite_error(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits, lr=1e12, max_nonfinite_steps=2, steps=40, grad_clip=0.0)
    run.reset(0)
    with pytest.raises(NonFiniteError, match="non-finite"):
        for _ in range(40):
            run.step(np.ones(8, dtype=np.float32))
    assert run.skipped_steps >= 2


def test_run_state_dict_round_trip_continues_identically(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits)
    run.reset(0)
    run.step(np.ones(8, dtype=np.float32))
    state = copy.deepcopy(run.state_dict())
    expected = run.step(np.full(8, 0.3, dtype=np.float32))

    restored = make_run(test_config, embedded_splits)
    restored.load_state_dict(state)
    actual = restored.step(np.full(8, 0.3, dtype=np.float32))
    assert actual.reward == pytest.approx(expected.reward, abs=1e-6)
    np.testing.assert_allclose(actual.observation, expected.observation, atol=1e-6)


def test_run_evaluate_reports_chance_level(test_config, embedded_splits):
    run = make_run(test_config, embedded_splits)
    run.reset(0)
    metrics = run.evaluate("test")
    assert math.isfinite(metrics["chance_rsum"]) and metrics["chance_rsum"] > 0


def test_background_search_matches_inline_search(test_config, embedded_splits):
    results = {}
    for background in (True, False):
        run = make_run(test_config, embedded_splits, background_search=background, steps=5)
        run.reset(0)
        steps = [run.step(np.full(8, q, dtype=np.float32)) for q in (1.0, 0.0, 0.5, 1.0, 0.2)]
        results[background] = steps
        run.close()
    for with_thread, inline in zip(results[True], results[False]):
        np.testing.assert_array_equal(with_thread.observation, inline.observation)
        assert with_thread.reward == inline.reward
