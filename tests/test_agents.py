"""Tests of the schedulers: heuristics, bandits, SB3 adapters, saving and loading, and the registry."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents import SCHEDULERS, Scheduler, SchedulerError, make_scheduler, parse_options

N_FEATURES = 13
N_ANCHORS = 4
OBSERVATION_SPACE = spaces.Box(-10.0, 10.0, (N_FEATURES,), np.float32)
DISCRETE = spaces.Discrete(11)
BOX = spaces.Box(0.0, 1.0, (1,), np.float32)
SMALL_NET = {"net_arch": [16]}


def _started(name: str, action_space: spaces.Space = DISCRETE, total_steps: int = 100, seed: int = 0,
             observation_space: spaces.Space = OBSERVATION_SPACE, **options: object) -> Scheduler:
    scheduler = make_scheduler(name, observation_space, action_space, options)
    scheduler.on_run_start(total_steps, seed)
    return scheduler


# Heuristics


def test_fixed_discrete_picks_nearest_level() -> None:
    scheduler = _started("fixed", q=0.33)
    assert scheduler.act(np.zeros(N_FEATURES)) == 3


def test_fixed_box_returns_q_array() -> None:
    action = _started("fixed", BOX, q=0.25).act(np.zeros(N_FEATURES))
    assert action.dtype == np.float32
    assert action.tolist() == [0.25]


def test_fixed_default_q_is_half() -> None:
    assert _started("fixed").act(np.zeros(N_FEATURES)) == 5


def test_fixed_rejects_q_outside_unit_interval() -> None:
    with pytest.raises(SchedulerError, match="q"):
        make_scheduler("fixed", OBSERVATION_SPACE, DISCRETE, {"q": 1.5})


def test_hardest_plays_top_level() -> None:
    assert _started("hardest").act(np.zeros(N_FEATURES)) == 10


def test_hardest_box_plays_one() -> None:
    assert _started("hardest", BOX).act(np.zeros(N_FEATURES)).tolist() == [1.0]


def test_random_turns_mining_off() -> None:
    scheduler = _started("random")
    assert scheduler.uses_mining is False
    assert DISCRETE.contains(scheduler.act(np.zeros(N_FEATURES)))


def test_unknown_option_names_allowed_ones() -> None:
    with pytest.raises(SchedulerError, match=r"unknown option 'qq'.*allowed: q"):
        make_scheduler("fixed", OBSERVATION_SPACE, DISCRETE, {"qq": 0.5})


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("hardening", "linear", [0, 1, 2, 3, 4]),
        ("softening", "linear", [4, 3, 2, 1, 0]),
    ],
)
def test_curriculum_linear_levels(name: str, shape: str, expected: list[int]) -> None:
    scheduler = _started(name, spaces.Discrete(5), total_steps=5, shape=shape)
    actions = [scheduler.act(np.zeros(N_FEATURES)) for _ in range(5)]
    assert actions == expected


def test_hardening_cosine_start_middle_end() -> None:
    scheduler = _started("hardening", BOX, total_steps=5, shape="cosine")
    values = [float(scheduler.act(np.zeros(N_FEATURES))[0]) for _ in range(5)]
    assert values[0] == pytest.approx(0.0)
    assert values[1] == pytest.approx((1.0 - math.cos(math.pi * 0.25)) / 2.0)
    assert values[2] == pytest.approx(0.5)
    assert values[4] == pytest.approx(1.0)


def test_curriculum_custom_range_and_after_end() -> None:
    scheduler = _started("softening", BOX, total_steps=3, start=0.8, end=0.2)
    values = [float(scheduler.act(np.zeros(N_FEATURES))[0]) for _ in range(4)]
    assert values == pytest.approx([0.8, 0.5, 0.2, 0.2])


def test_curriculum_rejects_unknown_shape() -> None:
    with pytest.raises(SchedulerError, match="shape"):
        make_scheduler("hardening", OBSERVATION_SPACE, DISCRETE, {"shape": "step"})


def test_curriculum_requires_run_start() -> None:
    scheduler = make_scheduler("hardening", OBSERVATION_SPACE, DISCRETE)
    with pytest.raises(RuntimeError, match="on_run_start"):
        scheduler.act(np.zeros(N_FEATURES))


def test_curriculum_resumes_its_step(tmp_path: Path) -> None:
    scheduler = _started("hardening", spaces.Discrete(5), total_steps=5)
    scheduler.act(np.zeros(N_FEATURES))
    scheduler.act(np.zeros(N_FEATURES))
    scheduler.save(tmp_path)
    resumed = _started("hardening", spaces.Discrete(5), total_steps=5)
    resumed.load(tmp_path)
    assert resumed.act(np.zeros(N_FEATURES)) == 2


# Bandits


def _pull(scheduler: Scheduler, reward: float, observation: np.ndarray | None = None) -> int:
    observation = np.zeros(N_FEATURES) if observation is None else observation
    arm = scheduler.act(observation)
    scheduler.observe(reward, observation, False, False, {})
    return arm


def test_ucb_plays_untried_arms_first() -> None:
    scheduler = _started("ucb", spaces.Discrete(3), normalize=False)
    arms = [_pull(scheduler, reward) for reward in (1.0, 0.0, 0.5)]
    assert arms == [0, 1, 2]


def test_ucb_bonus_matches_hand_computation() -> None:
    scheduler = _started("ucb", spaces.Discrete(3), normalize=False, c=1.0)
    for reward in (1.0, 0.0, 0.5):
        _pull(scheduler, reward)
    # All arms played once: equal bonus sqrt(ln 3), so the best mean (arm 0) wins.
    assert _pull(scheduler, 0.2) == 0
    # t = 4; arm 0: mean 0.6 over 2 plays, arm 1: 0.0 over 1, arm 2: 0.5 over 1.
    expected = [0.6 + math.sqrt(math.log(4) / 2), 0.0 + math.sqrt(math.log(4)), 0.5 + math.sqrt(math.log(4))]
    assert scheduler.scores() == pytest.approx(expected)
    assert scheduler.act(np.zeros(N_FEATURES)) == 2


def test_ucb_normalize_divides_means_by_reward_std() -> None:
    scheduler = _started("ucb", spaces.Discrete(2), c=0.0)
    _pull(scheduler, 0.02)
    _pull(scheduler, 0.04)
    # Population std of (0.02, 0.04) is 0.01, so the means become 2 and 4.
    assert scheduler.scores() == pytest.approx([2.0, 4.0])


def test_ucb_box_actions_are_level_values() -> None:
    scheduler = _started("ucb", BOX, n_levels=5)
    first = _pull(scheduler, 0.0)
    second = scheduler.act(np.zeros(N_FEATURES))
    assert first.tolist() == [0.0]
    assert second.tolist() == [0.25]


def test_exp3_probabilities_two_steps() -> None:
    scheduler = _started("exp3", spaces.Discrete(2), gamma=0.1, discount=1.0, normalize=False)
    assert scheduler.probabilities() == pytest.approx([0.5, 0.5])

    first = _pull(scheduler, 1.0)
    gains = np.zeros(2)
    gains[first] = 1.0 / 0.5
    weights = np.exp(0.1 * gains / 2)
    expected = 0.9 * weights / weights.sum() + 0.05
    assert scheduler.probabilities() == pytest.approx(expected)

    second = _pull(scheduler, 0.5)
    gains[second] += 0.5 / expected[second]
    weights = np.exp(0.1 * gains / 2)
    expected = 0.9 * weights / weights.sum() + 0.05
    assert scheduler.probabilities() == pytest.approx(expected)


def test_exp3_rejects_unscaled_reward_without_normalize() -> None:
    scheduler = _started("exp3", spaces.Discrete(2), normalize=False)
    scheduler.act(np.zeros(N_FEATURES))
    with pytest.raises(SchedulerError, match="normalize"):
        scheduler.observe(3.0, np.zeros(N_FEATURES), False, False, {})


def test_exp3_window_forgets_old_rewards() -> None:
    scheduler = _started("exp3", spaces.Discrete(2), window=2, normalize=False)
    for _ in range(3):
        _pull(scheduler, 1.0)
    assert len(scheduler.history) == 2


def test_exp3_rejects_discount_with_window() -> None:
    with pytest.raises(SchedulerError, match="discount and window"):
        make_scheduler("exp3", OBSERVATION_SPACE, DISCRETE, {"window": 5, "discount": 0.9})


def test_thompson_prefers_clearly_better_arm() -> None:
    scheduler = _started("thompson", spaces.Discrete(3))
    noise = np.random.default_rng(1)
    arms = []
    for _ in range(40):
        arm = scheduler.act(np.zeros(N_FEATURES))
        scheduler.observe([0.0, 0.2, 1.0][arm] + 0.05 * noise.standard_normal(), np.zeros(N_FEATURES),
                          False, False, {})
        arms.append(arm)
    assert scheduler.predict(np.zeros(N_FEATURES)) == 2
    assert arms[-10:].count(2) >= 8


def test_thompson_known_sigma_prefers_better_arm() -> None:
    scheduler = _started("thompson", spaces.Discrete(2), sigma=0.1)
    for _ in range(20):
        arm = scheduler.act(np.zeros(N_FEATURES))
        scheduler.observe([1.0, 0.0][arm], np.zeros(N_FEATURES), False, False, {})
    assert scheduler.predict(np.zeros(N_FEATURES)) == 0


def test_linucb_learns_context_dependent_arm() -> None:
    observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
    scheduler = _started("linucb", spaces.Discrete(3), observation_space=observation_space, alpha=0.5)
    contexts = np.random.default_rng(2).uniform(-1.0, 1.0, size=(60, 2))
    for context in contexts:
        arm = scheduler.act(context)
        # Arm 0 pays -x0, arm 1 nothing, arm 2 pays +x0.
        scheduler.observe((arm - 1) * context[0], context, False, False, {})
    assert scheduler.predict(np.array([0.8, 0.0])) == 2
    assert scheduler.predict(np.array([-0.8, 0.0])) == 0


def test_linucb_rejects_wrong_observation_shape() -> None:
    scheduler = _started("linucb")
    with pytest.raises(SchedulerError, match="shape"):
        scheduler.act(np.zeros(N_FEATURES + 1))


def test_bandit_observe_without_act_raises() -> None:
    with pytest.raises(RuntimeError, match="without a preceding act"):
        _started("ucb").observe(1.0, np.zeros(N_FEATURES), False, False, {})


def test_bandit_skips_non_finite_reward() -> None:
    scheduler = _started("ucb", spaces.Discrete(2))
    _pull(scheduler, float("nan"))
    assert scheduler.counts.tolist() == [0.0, 0.0]


def test_scheduler_rng_leaves_global_rng_alone() -> None:
    np.random.seed(5)
    expected = np.random.random()
    np.random.seed(5)
    scheduler = _started("exp3", spaces.Discrete(4))
    for _ in range(5):
        _pull(scheduler, 0.3)
    assert np.random.random() == expected


# SB3 adapters


def _anchor_steps(n_steps: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Return (observation, reward, next observation) per step for the anchor slots."""
    rng = np.random.default_rng(seed)
    observations = rng.normal(size=(n_steps + 1, N_ANCHORS, N_FEATURES)).astype(np.float32)
    rewards = rng.normal(size=(n_steps, N_ANCHORS)).astype(np.float32)
    return [(observations[t], rewards[t], observations[t + 1]) for t in range(n_steps)]


def _drive(scheduler: Scheduler, steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    actions = []
    for observation, reward, next_observation in steps:
        actions.append(np.array(scheduler.act(observation)))
        scheduler.observe(reward, next_observation, False, False, {})
    return actions


def _parameters(scheduler: Scheduler) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in scheduler.model.policy.parameters()]


def test_ppo_updates_after_n_steps() -> None:
    scheduler = _started("ppo")
    steps = _anchor_steps(8, seed=0)
    _drive(scheduler, steps[:7])
    before = _parameters(scheduler)
    assert scheduler.n_updates == 0
    _drive(scheduler, steps[7:])
    assert scheduler.n_updates == 1
    assert scheduler.model.num_timesteps == 8 * N_ANCHORS
    assert any(not torch.equal(old, new) for old, new in zip(before, _parameters(scheduler)))
    assert "train/value_loss" in scheduler.last_train_stats


def test_ppo_act_returns_one_level_per_anchor() -> None:
    actions = _started("ppo").act(_anchor_steps(1, seed=0)[0][0])
    assert actions.shape == (N_ANCHORS,)
    assert all(DISCRETE.contains(int(action)) for action in actions)


def test_ppo_box_actions_are_clipped() -> None:
    actions = _started("ppo", BOX).act(_anchor_steps(1, seed=0)[0][0])
    assert actions.shape == (N_ANCHORS, 1)
    assert np.all((actions >= 0.0) & (actions <= 1.0))


def test_ppo_leaves_global_rngs_alone() -> None:
    scheduler = _started("ppo")
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()
    _drive(scheduler, _anchor_steps(8, seed=0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_ppo_truncation_bootstraps_reward() -> None:
    scheduler = _started("ppo")
    observation, reward, next_observation = _anchor_steps(1, seed=0)[0]
    scheduler.act(observation)
    with torch.no_grad():
        values = scheduler.model.policy.predict_values(torch.as_tensor(next_observation))[:, 0].numpy()
    scheduler.observe(reward, next_observation, False, True, {})
    stored = scheduler.model.rollout_buffer.rewards[0]
    assert stored == pytest.approx(reward + 0.9 * values, rel=1e-5)


def test_ppo_rejects_changed_anchor_count() -> None:
    scheduler = _started("ppo")
    scheduler.act(np.zeros((N_ANCHORS, N_FEATURES), np.float32))
    scheduler.observe(np.zeros(N_ANCHORS), np.zeros((N_ANCHORS, N_FEATURES)), False, False, {})
    with pytest.raises(SchedulerError, match="anchor slots"):
        scheduler.act(np.zeros((N_ANCHORS + 1, N_FEATURES), np.float32))


def test_ppo_rejects_unknown_option() -> None:
    with pytest.raises(SchedulerError, match=r"unknown option 'n_step'.*n_steps"):
        make_scheduler("ppo", OBSERVATION_SPACE, DISCRETE, {"n_step": 4})


def test_ppo_accepts_activation_name() -> None:
    scheduler = _started("ppo", policy_kwargs={"net_arch": [8], "activation_fn": "Tanh"})
    scheduler.act(np.zeros((N_ANCHORS, N_FEATURES), np.float32))
    assert isinstance(scheduler.model.policy.mlp_extractor.policy_net[1], torch.nn.Tanh)


def _target_parameters(scheduler: Scheduler) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in scheduler.model.q_net_target.parameters()]


def test_dqn_trains_after_learning_starts() -> None:
    scheduler = _started("dqn", learning_starts=8, batch_size=8, policy_kwargs=SMALL_NET)
    _drive(scheduler, _anchor_steps(6, seed=0))
    # Training starts once more than 8 transitions (2 steps of 4 anchors) are stored.
    assert scheduler.n_updates == 4
    assert scheduler.model.num_timesteps == 6 * N_ANCHORS


@pytest.mark.parametrize(("interval", "updated"), [(8, True), (10_000, False)])
def test_dqn_target_update_interval(interval: int, updated: bool) -> None:
    scheduler = _started("dqn", learning_starts=8, batch_size=8, target_update_interval=interval,
                         policy_kwargs=SMALL_NET)
    scheduler.act(np.zeros((N_ANCHORS, N_FEATURES), np.float32))
    initial = _target_parameters(scheduler)
    scheduler.observe(np.zeros(N_ANCHORS), np.zeros((N_ANCHORS, N_FEATURES)), False, False, {})
    _drive(scheduler, _anchor_steps(5, seed=0))
    changed = any(not torch.equal(old, new) for old, new in zip(initial, _target_parameters(scheduler)))
    assert changed is updated


def test_dqn_exploration_rate_decays() -> None:
    scheduler = _started("dqn", total_steps=10, exploration_fraction=0.5, policy_kwargs=SMALL_NET)
    _drive(scheduler, _anchor_steps(5, seed=0))
    assert scheduler.model.exploration_rate == pytest.approx(0.05)


def test_dqn_rejects_box_actions() -> None:
    with pytest.raises(SchedulerError, match="Discrete"):
        make_scheduler("dqn", OBSERVATION_SPACE, BOX)


# Saving and loading

SB3_OPTIONS = {
    "ppo": {"n_steps": 4, "batch_size": 8, "n_epochs": 2, "policy_kwargs": SMALL_NET},
    "a2c": {"n_steps": 4, "policy_kwargs": SMALL_NET},
    "dqn": {"learning_starts": 8, "batch_size": 8, "target_update_interval": 12, "policy_kwargs": SMALL_NET},
}


@pytest.mark.parametrize("name", ["ppo", "a2c", "dqn"])
def test_sb3_resume_continues_identically(name: str, tmp_path: Path) -> None:
    steps = _anchor_steps(10, seed=3)
    original = _started(name, total_steps=10, seed=7, **SB3_OPTIONS[name])
    _drive(original, steps[:3])
    original.save(tmp_path)

    resumed = _started(name, total_steps=10, seed=7, **SB3_OPTIONS[name])
    resumed.load(tmp_path)
    # Different global seeds show that the adapters depend only on their own saved random state.
    torch.manual_seed(1)
    expected = _drive(original, steps[3:])
    torch.manual_seed(2)
    actual = _drive(resumed, steps[3:])

    assert original.n_updates > 1
    assert resumed.n_updates == original.n_updates
    for expected_actions, actual_actions in zip(expected, actual):
        assert np.array_equal(expected_actions, actual_actions)
    for old, new in zip(_parameters(original), _parameters(resumed)):
        assert torch.equal(old, new)


def test_sb3_save_between_act_and_observe(tmp_path: Path) -> None:
    steps = _anchor_steps(5, seed=4)
    original = _started("ppo", total_steps=5, **SB3_OPTIONS["ppo"])
    _drive(original, steps[:1])
    original.act(steps[1][0])
    original.save(tmp_path)
    resumed = _started("ppo", total_steps=5, **SB3_OPTIONS["ppo"])
    resumed.load(tmp_path)
    for scheduler in (original, resumed):
        scheduler.observe(steps[1][1], steps[1][2], False, False, {})
        _drive(scheduler, steps[2:])
    for old, new in zip(_parameters(original), _parameters(resumed)):
        assert torch.equal(old, new)


def test_sb3_save_writes_no_pickle(tmp_path: Path) -> None:
    scheduler = _started("ppo", **SB3_OPTIONS["ppo"])
    _drive(scheduler, _anchor_steps(2, seed=0))
    scheduler.save(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scheduler.json", "state.json", "state.safetensors"]


@pytest.mark.parametrize(("name", "options"), [("ucb", {}), ("linucb", {}), ("exp3", {}), ("thompson", {})])
def test_bandit_resume_continues_identically(name: str, options: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    contexts = rng.uniform(-1.0, 1.0, size=(30, N_FEATURES))
    rewards = rng.normal(size=30)
    original = _started(name, spaces.Discrete(4), seed=3, **options)
    for context, reward in zip(contexts[:15], rewards[:15]):
        _pull(original, reward, context)
    original.save(tmp_path)
    resumed = _started(name, spaces.Discrete(4), seed=3, **options)
    resumed.load(tmp_path)
    expected = [_pull(original, reward, context) for context, reward in zip(contexts[15:], rewards[15:])]
    actual = [_pull(resumed, reward, context) for context, reward in zip(contexts[15:], rewards[15:])]
    assert actual == expected


def test_load_rejects_other_scheduler_class(tmp_path: Path) -> None:
    _started("ucb").save(tmp_path)
    with pytest.raises(SchedulerError, match="UCB1"):
        _started("exp3").load(tmp_path)


def test_load_reports_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SchedulerError, match="not found"):
        _started("ucb").load(tmp_path / "missing")


# Frozen policies


def test_frozen_bandit_plays_best_arm(tmp_path: Path) -> None:
    bandit = _started("ucb", spaces.Discrete(3), normalize=False)
    for reward in (0.0, 1.0, 0.2):
        _pull(bandit, reward)
    bandit.save(tmp_path)
    frozen = _started(f"policy:{tmp_path}", spaces.Discrete(3))
    assert frozen.learns is False
    assert [frozen.act(np.zeros(N_FEATURES)) for _ in range(3)] == [1, 1, 1]


def test_frozen_ppo_is_per_anchor_and_deterministic(tmp_path: Path) -> None:
    trained = _started("ppo", **SB3_OPTIONS["ppo"])
    _drive(trained, _anchor_steps(4, seed=0))
    trained.save(tmp_path)
    frozen = _started(f"policy:{tmp_path}")
    observation = _anchor_steps(1, seed=9)[0][0]
    assert frozen.per_anchor is True
    assert np.array_equal(frozen.act(observation), frozen.act(observation))
    assert np.array_equal(frozen.act(observation), trained.predict(observation))


def test_frozen_policy_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SchedulerError, match="no saved scheduler"):
        make_scheduler(f"policy:{tmp_path / 'none'}", OBSERVATION_SPACE, DISCRETE)


# Registry and plugins

PLUGIN_SOURCE = textwrap.dedent(
    """
    from agents import Scheduler


    class AlwaysEasy(Scheduler):
        def act(self, observation):
            return 0


    class NotAScheduler:
        pass
    """
)


def test_registry_lists_all_builtins() -> None:
    expected = {"ppo", "a2c", "dqn", "random", "hardest", "mafa-filter", "fixed", "hardening", "softening",
                "ucb", "exp3", "thompson", "linucb"}
    assert set(SCHEDULERS) == expected


def test_plugin_module_and_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_agents_plugin.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    scheduler = make_scheduler("my_agents_plugin:AlwaysEasy", OBSERVATION_SPACE, DISCRETE, {"any": 1})
    assert scheduler.act(np.zeros(N_FEATURES)) == 0
    assert scheduler.options == {"any": 1}


def test_plugin_file_and_class(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN_SOURCE)
    scheduler = make_scheduler(f"{plugin}:AlwaysEasy", OBSERVATION_SPACE, DISCRETE)
    assert type(scheduler).__name__ == "AlwaysEasy"
    assert scheduler.spec == f"{plugin.resolve()}:AlwaysEasy"


def test_plugin_file_reloads_as_frozen_policy(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN_SOURCE)
    make_scheduler(f"{plugin}:AlwaysEasy", OBSERVATION_SPACE, DISCRETE).save(tmp_path / "saved")
    frozen = make_scheduler(f"policy:{tmp_path / 'saved'}", OBSERVATION_SPACE, DISCRETE)
    assert type(frozen.policy).__name__ == "AlwaysEasy"


def test_plugin_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_entry_point_plugin.py").write_text(PLUGIN_SOURCE)
    metadata = tmp_path / "my_entry_point_plugin-0.1.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: my-entry-point-plugin\nVersion: 0.1\n")
    (metadata / "entry_points.txt").write_text("[falcon_rl.agents]\nalways_easy = my_entry_point_plugin:AlwaysEasy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scheduler = make_scheduler("always_easy", OBSERVATION_SPACE, DISCRETE)
    assert type(scheduler).__name__ == "AlwaysEasy"


def test_plugin_missing_module() -> None:
    with pytest.raises(SchedulerError, match="module 'no_such_module_xyz' not found"):
        make_scheduler("no_such_module_xyz:Agent", OBSERVATION_SPACE, DISCRETE)


def test_plugin_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SchedulerError, match="file not found"):
        make_scheduler(f"{tmp_path / 'absent.py'}:Agent", OBSERVATION_SPACE, DISCRETE)


def test_plugin_missing_class(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN_SOURCE)
    with pytest.raises(SchedulerError, match="class 'Missing' not found"):
        make_scheduler(f"{plugin}:Missing", OBSERVATION_SPACE, DISCRETE)


def test_plugin_missing_class_lists_schedulers_in_file(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN_SOURCE)
    with pytest.raises(SchedulerError, match=r"Scheduler subclasses there: AlwaysEasy"):
        make_scheduler(f"{plugin}:Missing", OBSERVATION_SPACE, DISCRETE)


def test_plugin_file_with_syntax_error(tmp_path: Path) -> None:
    plugin = tmp_path / "broken.py"
    plugin.write_text("class Broken(:\n")
    with pytest.raises(SchedulerError, match=r"broken.py failed to import: SyntaxError"):
        make_scheduler(f"{plugin}:Broken", OBSERVATION_SPACE, DISCRETE)


def test_plugin_class_of_wrong_type(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN_SOURCE)
    with pytest.raises(SchedulerError, match="not a subclass of agents.Scheduler"):
        make_scheduler(f"{plugin}:NotAScheduler", OBSERVATION_SPACE, DISCRETE)


def test_unknown_name_lists_known_builtins() -> None:
    with pytest.raises(SchedulerError, match=r"unknown scheduler 'pp0'.*a2c, dqn, exp3, fixed"):
        make_scheduler("pp0", OBSERVATION_SPACE, DISCRETE)


def test_parse_options_reads_yaml_values() -> None:
    options = parse_options(["q=0.5", "n_steps=16", "normalize=false", "name=linear", "net=[32, 32]"])
    assert options == {"q": 0.5, "n_steps": 16, "normalize": False, "name": "linear", "net": [32, 32]}


def test_parse_options_exponent_is_float() -> None:
    assert parse_options(["learning_rate=1e-4"]) == {"learning_rate": 1e-4}


def test_parse_options_dotted_key_nests() -> None:
    options = parse_options(["policy_kwargs.net_arch=[8]", "policy_kwargs.activation_fn=Tanh"])
    assert options == {"policy_kwargs": {"net_arch": [8], "activation_fn": "Tanh"}}


def test_parse_options_rejects_missing_equals() -> None:
    with pytest.raises(SchedulerError, match="KEY=VALUE"):
        parse_options(["q"])
