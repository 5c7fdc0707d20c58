"""Stable-Baselines3 algorithms driven, one anchor slot per environment, by falcon-rl's training loop.

SB3's ``learn()`` collects its own data by stepping an environment. Here
falcon-rl's loop does the stepping, so the adapter does the work of SB3's
``collect_rollouts`` one call at a time. ``act`` runs the policy on the
batch's anchor observations ``[A, F]``, each anchor slot being one
environment of a vectorized environment. ``observe`` adds the transition to
the rollout or replay buffer, and a full rollout (or DQN's training
frequency) triggers the algorithm's own ``train()``. The whole agent (networks, optimizer, partly
filled buffer, counters and random states) is saved as safetensors plus JSON,
so a resumed run continues exactly, without SB3's pickled ``.zip`` files.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.utils import get_device, obs_as_tensor

from agents.actions import validate_action_space
from agents.base import SCHEDULER_SEED_SALT, Scheduler, SchedulerError
from agents.rng import IsolatedRandomState
from agents.sb3_state import buffer_state, load_buffer_state, load_optimizer_state, optimizer_state
from agents.vec_env import AnchorSlotsVecEnv

logger = logging.getLogger(__name__)

# Constructor arguments the adapter sets itself, or that hold classes, which options from YAML cannot.
_ADAPTER_ARGUMENTS = frozenset({
    "self", "policy", "env", "seed", "verbose", "tensorboard_log", "_init_setup_model",
    "rollout_buffer_class", "replay_buffer_class",
})
STATE_FILE = "state.safetensors"
STATE_JSON = "state.json"


@dataclass
class PendingStep:
    """Actions chosen by ``act``, kept until ``observe`` brings their reward."""

    observations: np.ndarray          # float32 [A, F]
    actions: np.ndarray               # as the buffer stores them (unclipped for a Box)
    values: torch.Tensor | None       # [A, 1], on-policy only
    log_probs: torch.Tensor | None    # [A], on-policy only


def _resolve_policy_kwargs(policy_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Replace class names given as strings (``activation_fn: Tanh``) by the torch classes."""
    if policy_kwargs is None:
        return None
    resolved = copy.deepcopy(policy_kwargs)
    for key, module in (("activation_fn", torch.nn), ("optimizer_class", torch.optim)):
        value = resolved.get(key)
        if isinstance(value, str):
            if not isinstance(getattr(module, value, None), type):
                raise SchedulerError(f"invalid policy_kwargs.{key}: {value!r} is not a class in {module.__name__}")
            resolved[key] = getattr(module, value)
    return resolved


class SB3Scheduler(Scheduler):
    """Base adapter that runs an SB3 algorithm per anchor inside falcon-rl's loop.

    The anchor count A is fixed by the first ``act`` (or by ``load``), and
    the SB3 model is built then, on a ``VecEnv`` of A anchor slots that only
    carries the spaces. ``num_timesteps`` advances by A per training step.
    ``n_updates`` counts calls of the algorithm's ``train()``, and
    ``last_train_stats`` contains the values the last one logged (``train/...``).

    SB3 draws from torch's and NumPy's global generators. The adapter swaps
    in private states, seeded from the run seed, around each call into SB3,
    so the agent does not shift the VLP run's random streams.

    :param observation_space: the single-anchor ``Box`` of shape (F,)
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    :param options: keyword arguments of the SB3 algorithm's constructor
        (``n_steps``, ``batch_size``, ``learning_rate``, ``gamma``, ``policy_kwargs``, ``device`` ...);
        ``policy_kwargs`` may name ``activation_fn`` and ``optimizer_class`` as strings
    """

    per_anchor = True
    learns = True
    contextual = True
    algorithm: ClassVar[type[BaseAlgorithm]]

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
            raise SchedulerError(f"{self.name} needs a one-dimensional Box observation space, got {observation_space}")
        validate_action_space(action_space)
        # Resolving once here reports a bad class name now instead of at the first act.
        _resolve_policy_kwargs(self.options.get("policy_kwargs"))
        self.device = get_device(self.options.get("device", "auto"))
        self.model: BaseAlgorithm | None = None
        self.n_anchors: int | None = None
        self.steps = 0
        self.n_updates = 0
        self.last_train_stats: dict[str, float] = {}
        self.random_state = IsolatedRandomState(self._private_seed(), self.device)
        self._pending: PendingStep | None = None

    @classmethod
    def allowed_options(cls) -> list[str]:
        """Return the option names: the algorithm's constructor arguments the adapter does not set."""
        parameters = inspect.signature(cls.algorithm.__init__).parameters
        return sorted(name for name in parameters if name not in _ADAPTER_ARGUMENTS)

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        allowed = self.allowed_options()
        for key in options:
            if key not in allowed:
                raise SchedulerError(f"unknown option {key!r} for scheduler {self.name!r} (allowed: {', '.join(allowed)})")
        return {**self.option_defaults, **options}

    def _private_seed(self) -> int:
        return int(np.random.SeedSequence([self.seed, SCHEDULER_SEED_SALT, 1]).generate_state(1)[0])

    def on_run_start(self, total_steps: int, seed: int) -> None:
        super().on_run_start(total_steps, seed)
        self.random_state = IsolatedRandomState(self._private_seed(), self.device)
        if self.model is not None:
            self.model._total_timesteps = self.total_steps * self.n_anchors

    # Building the model

    def _algorithm_kwargs(self, n_anchors: int) -> dict[str, Any]:
        kwargs = dict(self.options)
        kwargs["policy_kwargs"] = _resolve_policy_kwargs(kwargs.get("policy_kwargs"))
        return kwargs

    def _ensure_model(self, n_anchors: int) -> BaseAlgorithm:
        if self.model is not None:
            if n_anchors != self.n_anchors:
                raise SchedulerError(f"{self.name} got {n_anchors} anchor observations, but the run has "
                                     f"{self.n_anchors} anchor slots (fixed by the first act)")
            return self.model
        env = AnchorSlotsVecEnv(n_anchors, self.observation_space, self.action_space)
        with self.random_state.active():
            # seed=None: SB3 would reseed the global generators; the private state is seeded instead.
            model = self.algorithm("MlpPolicy", env, seed=None, verbose=0, **self._algorithm_kwargs(n_anchors))
        # A logger without output formats keeps the values in memory and writes no files.
        model.set_logger(Logger(folder=None, output_formats=[]))
        model._last_episode_starts = np.ones(n_anchors, dtype=bool)
        model._total_timesteps = (self.total_steps or 0) * n_anchors
        self.model, self.n_anchors = model, n_anchors
        self._after_build(model)
        return model

    def _after_build(self, model: BaseAlgorithm) -> None:
        """Finish algorithm-specific setup of a freshly built model."""

    # The loop: act, then observe

    def _anchor_array(self, value: np.ndarray, name: str) -> np.ndarray:
        array = np.asarray(value, dtype=np.float32)
        n_features = self.observation_space.shape[0]
        if array.ndim != 2 or array.shape[1] != n_features:
            raise SchedulerError(f"{self.name} expects {name} of shape [A, {n_features}], got {array.shape}")
        return array

    def _anchor_flags(self, value: bool | np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.asarray(value, dtype=bool), (self.n_anchors,)).copy()

    def act(self, observation: np.ndarray) -> np.ndarray:
        """Return one action per anchor row of ``observation`` ``[A, F]``: ``[A]`` levels, or ``[A, 1]`` for a Box."""
        if self.total_steps is None:
            raise RuntimeError(f"{self.name} needs on_run_start(total_steps, seed) before act")
        observations = self._anchor_array(observation, "observations")
        model = self._ensure_model(len(observations))
        with self.random_state.active():
            self._pending, env_actions = self._choose_actions(model, observations)
        model._last_obs = observations
        return env_actions

    def predict(self, observation: np.ndarray) -> np.ndarray:
        """Return the policy's deterministic actions for ``[A, F]``, without exploring or learning."""
        observations = self._anchor_array(observation, "observations")
        model = self._ensure_model(len(observations))
        with self.random_state.active():
            actions, _ = model.policy.predict(observations, deterministic=True)
        return actions

    def observe(
        self,
        reward: float | np.ndarray,
        observation: np.ndarray,
        terminated: bool | np.ndarray,
        truncated: bool | np.ndarray,
        info: dict[str, Any],
    ) -> None:
        """Add the step's transition per anchor; train when the algorithm's update is due."""
        if self._pending is None:
            raise RuntimeError(f"{self.name}.observe was called without a preceding act")
        step, self._pending = self._pending, None
        rewards = np.broadcast_to(np.asarray(reward, dtype=np.float32), (self.n_anchors,)).copy()
        next_observations = self._anchor_array(observation, "next observations")
        terminated, truncated = self._anchor_flags(terminated), self._anchor_flags(truncated)

        self.model.num_timesteps += self.n_anchors
        self.steps += 1
        with self.random_state.active():
            self._add_transition(step, rewards, next_observations, terminated, truncated)
            if self._update_due():
                self._update(next_observations, terminated | truncated)
                self._record_train_stats()

    def _choose_actions(self, model: BaseAlgorithm, observations: np.ndarray) -> tuple[PendingStep, np.ndarray]:
        raise NotImplementedError

    def _add_transition(self, step: PendingStep, rewards: np.ndarray, next_observations: np.ndarray,
                        terminated: np.ndarray, truncated: np.ndarray) -> None:
        raise NotImplementedError

    def _update_due(self) -> bool:
        raise NotImplementedError

    def _update(self, next_observations: np.ndarray, dones: np.ndarray) -> None:
        raise NotImplementedError

    def _record_train_stats(self) -> None:
        values = self.model.logger.name_to_value
        self.last_train_stats = {key: float(value) for key, value in values.items()}
        # With no output formats, dump() only clears the recorded values.
        self.model.logger.dump()
        self.n_updates += 1

    # Saving and loading

    def _model_counters(self) -> dict[str, Any]:
        model = self.model
        return {
            "num_timesteps": model.num_timesteps,
            "n_updates": model._n_updates,
            "progress_remaining": model._current_progress_remaining,
            "total_timesteps": model._total_timesteps,
        }

    def _load_model_counters(self, counters: dict[str, Any]) -> None:
        model = self.model
        model.num_timesteps = int(counters["num_timesteps"])
        model._n_updates = int(counters["n_updates"])
        model._current_progress_remaining = float(counters["progress_remaining"])
        model._total_timesteps = int(counters["total_timesteps"])

    def _buffer(self) -> Any:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write the whole agent: networks, optimizer, buffer, counters, pending step and random states."""
        super().save(path)
        if self.model is None:
            self._save_json(path, STATE_JSON, {"built": False})
            return
        model = self.model
        tensors: dict[str, Any] = {f"policy.{key}": value for key, value in model.policy.state_dict().items()}
        optimizer_tensors, optimizer_json = optimizer_state(model.policy.optimizer, "optimizer")
        buffer_tensors, buffer_json = buffer_state(self._buffer(), "buffer")
        tensors.update(optimizer_tensors)
        tensors.update(buffer_tensors)
        tensors.update(self.random_state.state_tensors())

        tensors["last_episode_starts"] = np.asarray(model._last_episode_starts, dtype=bool)
        if model._last_obs is not None:
            tensors["last_obs"] = np.asarray(model._last_obs, dtype=np.float32)
        tensors.update(self._pending_tensors())

        state = {
            "built": True,
            "n_anchors": self.n_anchors,
            "steps": self.steps,
            "n_updates": self.n_updates,
            "last_train_stats": self.last_train_stats,
            "model": self._model_counters(),
            "optimizer": optimizer_json,
            "buffer": buffer_json,
            "rng": self.random_state.state_json(),
            "pending": self._pending is not None,
        }
        self._save_json(path, STATE_JSON, state)
        self._save_tensors(path, STATE_FILE, tensors)

    def _pending_tensors(self) -> dict[str, Any]:
        if self._pending is None:
            return {}
        tensors = {"pending.observations": self._pending.observations, "pending.actions": self._pending.actions}
        if self._pending.values is not None:
            tensors["pending.values"] = self._pending.values
            tensors["pending.log_probs"] = self._pending.log_probs
        return tensors

    def load(self, path: Path) -> None:
        """Restore what ``save`` wrote, building the model for the saved number of anchors."""
        super().load(path)
        state = self._load_json(path, STATE_JSON)
        self.model, self.n_anchors, self._pending = None, None, None
        if not state["built"]:
            return
        model = self._ensure_model(int(state["n_anchors"]))
        tensors = self._load_tensors(path, STATE_FILE)

        policy_state = {key[len("policy."):]: value for key, value in tensors.items() if key.startswith("policy.")}
        try:
            model.policy.load_state_dict(policy_state)
        except RuntimeError as error:
            raise SchedulerError(f"the policy saved in {path} does not fit this scheduler's network "
                                 f"(were policy_kwargs changed?): {error}") from error
        load_optimizer_state(model.policy.optimizer, "optimizer", tensors, state["optimizer"])
        load_buffer_state(self._buffer(), "buffer", tensors, state["buffer"])
        self.random_state = IsolatedRandomState(self._private_seed(), self.device)
        self.random_state.load_state(tensors, state["rng"])

        self._load_model_counters(state["model"])
        model._last_episode_starts = tensors["last_episode_starts"].numpy().copy()
        model._last_obs = tensors["last_obs"].numpy().copy() if "last_obs" in tensors else None
        self.steps = int(state["steps"])
        self.n_updates = int(state["n_updates"])
        self.last_train_stats = dict(state["last_train_stats"])
        if state["pending"]:
            self._pending = self._load_pending(tensors)

    def _load_pending(self, tensors: dict[str, torch.Tensor]) -> PendingStep:
        values, log_probs = tensors.get("pending.values"), tensors.get("pending.log_probs")
        device = self.model.device
        return PendingStep(
            observations=tensors["pending.observations"].numpy().copy(),
            actions=tensors["pending.actions"].numpy().copy(),
            values=None if values is None else values.to(device),
            log_probs=None if log_probs is None else log_probs.to(device),
        )


class OnPolicyScheduler(SB3Scheduler):
    """Adapter for on-policy algorithms (PPO, A2C): fills the rollout buffer, trains when it is full.

    Like SB3's ``collect_rollouts``, a truncated (not terminated) anchor's
    reward is bootstrapped with ``gamma * V(next observation)``, and when the
    buffer is full the last values are computed from the next observations
    before ``compute_returns_and_advantage`` and ``train()``.
    """

    def _buffer(self) -> Any:
        return self.model.rollout_buffer

    def _choose_actions(self, model: BaseAlgorithm, observations: np.ndarray) -> tuple[PendingStep, np.ndarray]:
        model.policy.set_training_mode(False)
        with torch.no_grad():
            actions, values, log_probs = model.policy(obs_as_tensor(observations, model.device))
        actions = actions.cpu().numpy()
        env_actions = actions
        if isinstance(self.action_space, spaces.Box):
            if model.policy.squash_output:
                env_actions = model.policy.unscale_action(actions)
            else:
                # The Gaussian policy is unbounded, so its samples are clipped to the space.
                env_actions = np.clip(actions, self.action_space.low, self.action_space.high)
        return PendingStep(observations, actions, values, log_probs), env_actions

    def _add_transition(self, step: PendingStep, rewards: np.ndarray, next_observations: np.ndarray,
                        terminated: np.ndarray, truncated: np.ndarray) -> None:
        model = self.model
        bootstrap = truncated & ~terminated
        if bootstrap.any():
            with torch.no_grad():
                terminal_values = model.policy.predict_values(obs_as_tensor(next_observations[bootstrap], model.device))
            rewards[bootstrap] += model.gamma * terminal_values[:, 0].cpu().numpy()
        actions = step.actions.reshape(-1, 1) if isinstance(self.action_space, spaces.Discrete) else step.actions
        model.rollout_buffer.add(step.observations, actions, rewards, model._last_episode_starts,
                                 step.values, step.log_probs)
        model._last_obs = next_observations
        model._last_episode_starts = terminated | truncated

    def _update_due(self) -> bool:
        return self.model.rollout_buffer.full

    def _update(self, next_observations: np.ndarray, dones: np.ndarray) -> None:
        model = self.model
        with torch.no_grad():
            last_values = model.policy.predict_values(obs_as_tensor(next_observations, model.device))
        model.rollout_buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
        model._update_current_progress_remaining(model.num_timesteps, model._total_timesteps)
        model.train()
        model.rollout_buffer.reset()


class PPOScheduler(OnPolicyScheduler):
    """PPO (Schulman et al., 2017) acting per anchor, through SB3's ``PPO``.

    Defaults differ from SB3's for short-horizon rewards and frequent updates:
    ``n_steps=8`` (one update per 8 training steps, from 8 x A transitions),
    ``batch_size=64`` (capped at 8 x A), ``n_epochs=4``, ``gamma=0.9`` and ``device="cpu"``.

    :param observation_space: the single-anchor ``Box`` of shape (F,)
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    :param options: keyword arguments of ``stable_baselines3.PPO``
    """

    name = "ppo"
    algorithm = PPO
    option_defaults = {"n_steps": 8, "batch_size": 64, "n_epochs": 4, "gamma": 0.9, "device": "cpu"}

    def _algorithm_kwargs(self, n_anchors: int) -> dict[str, Any]:
        kwargs = super()._algorithm_kwargs(n_anchors)
        rollout_size = kwargs["n_steps"] * n_anchors
        if kwargs["batch_size"] > rollout_size:
            logger.info("ppo batch_size %d exceeds the rollout of %d transitions; using %d",
                        kwargs["batch_size"], rollout_size, rollout_size)
            kwargs["batch_size"] = rollout_size
        return kwargs


class A2CScheduler(OnPolicyScheduler):
    """A2C (Mnih et al., 2016) acting per anchor, through SB3's ``A2C``.

    Defaults differ from SB3's: ``n_steps=8``, ``gamma=0.9`` and ``device="cpu"``.

    :param observation_space: the single-anchor ``Box`` of shape (F,)
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    :param options: keyword arguments of ``stable_baselines3.A2C``
    """

    name = "a2c"
    algorithm = A2C
    option_defaults = {"n_steps": 8, "gamma": 0.9, "device": "cpu"}


class DQNScheduler(SB3Scheduler):
    """DQN (Mnih et al., 2015) acting per anchor, through SB3's ``DQN``; needs a Discrete action space.

    Every training step adds A transitions to the replay buffer and counts as
    one environment step for ``train_freq``, ``learning_starts`` (in
    transitions) and the target network update (every
    ``target_update_interval`` transitions). Exploration is epsilon-greedy
    from SB3's ``exploration_schedule``, drawn from the scheduler's own
    generator; before ``learning_starts`` transitions every action is random.
    Defaults differ from SB3's: ``buffer_size=100_000``, ``learning_starts=256``,
    ``batch_size=64``, ``train_freq=1``, ``target_update_interval=2048``,
    ``exploration_fraction=0.2``, ``gamma=0.9`` and ``device="cpu"``.

    :param observation_space: the single-anchor ``Box`` of shape (F,)
    :param action_space: ``Discrete(n_levels)``
    :param options: keyword arguments of ``stable_baselines3.DQN``
    """

    name = "dqn"
    algorithm = DQN
    option_defaults = {
        "buffer_size": 100_000, "learning_starts": 256, "batch_size": 64, "train_freq": 1,
        "target_update_interval": 2048, "exploration_fraction": 0.2, "gamma": 0.9, "device": "cpu",
    }

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        if not isinstance(action_space, spaces.Discrete):
            raise SchedulerError(f"dqn needs a Discrete action space, got {action_space}; "
                                 "use discrete hardness levels or another scheduler")
        super().__init__(observation_space, action_space, **options)

    def _after_build(self, model: BaseAlgorithm) -> None:
        if model.train_freq.unit.value != "step":
            raise SchedulerError("dqn supports train_freq in steps only, because each step has A anchor slots")
        # SB3 sets the rate only after the first step; start from the schedule's initial value.
        model.exploration_rate = model.exploration_schedule(1.0)

    def _buffer(self) -> Any:
        return self.model.replay_buffer

    def _choose_actions(self, model: BaseAlgorithm, observations: np.ndarray) -> tuple[PendingStep, np.ndarray]:
        # Both draws happen every step, so the generator advances the same way whatever is chosen.
        explore = self.rng.random(self.n_anchors) < model.exploration_rate
        random_actions = self.rng.integers(0, self.action_space.n, size=self.n_anchors)
        if model.num_timesteps < model.learning_starts:
            actions = random_actions
        else:
            greedy, _ = model.policy.predict(observations, deterministic=True)
            actions = np.where(explore, random_actions, greedy)
        actions = actions.astype(np.int64)
        return PendingStep(observations, actions, None, None), actions

    def _add_transition(self, step: PendingStep, rewards: np.ndarray, next_observations: np.ndarray,
                        terminated: np.ndarray, truncated: np.ndarray) -> None:
        model = self.model
        # A truncated anchor keeps bootstrapping from its next state, as SB3's timeout handling does.
        infos = [{"TimeLimit.truncated": bool(cut and not ended)} for cut, ended in zip(truncated, terminated)]
        model.replay_buffer.add(step.observations, next_observations, step.actions.reshape(-1, 1), rewards,
                                terminated | truncated, infos)
        model._last_obs = next_observations
        model._last_episode_starts = terminated | truncated
        model._update_current_progress_remaining(model.num_timesteps, model._total_timesteps)
        # Target network update and exploration rate, as after each step of SB3's collect_rollouts.
        model._on_step()

    def _gradient_steps(self) -> int:
        model = self.model
        if model.gradient_steps >= 0:
            return model.gradient_steps
        # SB3's -1: as many gradient steps as transitions collected since the last update.
        return model.train_freq.frequency * self.n_anchors

    def _update_due(self) -> bool:
        model = self.model
        return (self.steps % model.train_freq.frequency == 0
                and model.num_timesteps > model.learning_starts
                and self._gradient_steps() > 0)

    def _update(self, next_observations: np.ndarray, dones: np.ndarray) -> None:
        self.model.train(gradient_steps=self._gradient_steps(), batch_size=self.model.batch_size)

    def _model_counters(self) -> dict[str, Any]:
        counters = super()._model_counters()
        counters["n_calls"] = self.model._n_calls
        counters["exploration_rate"] = self.model.exploration_rate
        return counters

    def _load_model_counters(self, counters: dict[str, Any]) -> None:
        super()._load_model_counters(counters)
        self.model._n_calls = int(counters["n_calls"])
        self.model.exploration_rate = float(counters["exploration_rate"])
