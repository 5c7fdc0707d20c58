"""Per-batch multi-armed bandits whose arms are hardness levels.

The arms are the levels of a ``Discrete`` action space, or ``n_levels``
evenly spaced hardness values when the action space is a ``Box``. Each step
a bandit picks one arm for the whole batch and then observes the batch
reward. Rewards may be on any scale: UCB1 and LinUCB divide their mean
estimates by the running reward standard deviation, EXP3 squashes
standardized rewards into [0, 1], and Thompson sampling estimates the
reward variance.
"""

from __future__ import annotations

import collections
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces

from agents.actions import hardness_levels, level_action
from agents.base import Scheduler, SchedulerError
from agents.options import validate_bool, validate_fraction, validate_non_negative, validate_positive
from agents.options import validate_positive_int
from agents.reward_scaling import RunningMeanStd

logger = logging.getLogger(__name__)


class Bandit(Scheduler):
    """Base class of the hardness-level bandits.

    Subclasses implement ``select_arm`` (with exploration), ``best_arm``
    (without), ``update_arm`` and the two state-tensor methods.

    :param observation_space: the per-batch observation ``Box``
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    :param n_levels: number of evenly spaced hardness arms when the action space is a ``Box``
    """

    option_defaults = {"n_levels": 11}
    # State tensors whose length grows with the history, exempt from the shape check on load.
    variable_length_tensors: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        self.levels = hardness_levels(action_space, validate_positive_int("n_levels", self.options["n_levels"]))
        self.n_arms = len(self.levels)
        self.reward_stats = RunningMeanStd()
        self.skipped_rewards = 0
        self._last_arm: int | None = None

    def select_arm(self, observation: np.ndarray) -> int:
        """Return the arm to play now, exploring."""
        raise NotImplementedError

    def best_arm(self, observation: np.ndarray) -> int:
        """Return the arm with the best estimated reward, without exploring."""
        raise NotImplementedError

    def update_arm(self, arm: int, reward: float) -> None:
        """Add ``reward`` (on its original scale) to the statistics of ``arm``."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Return the arm statistics as arrays."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the arm statistics from ``state_tensors``."""
        raise NotImplementedError

    def act(self, observation: np.ndarray) -> int | np.ndarray:
        arm = self.select_arm(observation)
        self._last_arm = arm
        return level_action(self.action_space, self.levels, arm)

    def predict(self, observation: np.ndarray) -> int | np.ndarray:
        return level_action(self.action_space, self.levels, self.best_arm(observation))

    def observe(
        self,
        reward: float | np.ndarray,
        observation: np.ndarray,
        terminated: bool | np.ndarray,
        truncated: bool | np.ndarray,
        info: dict[str, Any],
    ) -> None:
        """Credit the batch reward to the arm played by the last ``act``; an array reward is averaged."""
        if self._last_arm is None:
            raise RuntimeError(f"{type(self).__name__}.observe was called without a preceding act")
        value = float(np.mean(reward))
        arm, self._last_arm = self._last_arm, None
        if not math.isfinite(value):
            self.skipped_rewards += 1
            logger.warning("%s skipped non-finite reward %r (%d skipped so far)",
                           type(self).__name__, value, self.skipped_rewards)
            return
        self.reward_stats.update(value)
        self.update_arm(arm, value)

    def save(self, path: Path) -> None:
        super().save(path)
        state = {
            "reward_stats": self.reward_stats.state_dict(),
            "skipped_rewards": self.skipped_rewards,
            "last_arm": self._last_arm,
        }
        self._save_json(path, "state.json", state)
        self._save_tensors(path, "state.safetensors", self.state_tensors())

    def load(self, path: Path) -> None:
        super().load(path)
        state = self._load_json(path, "state.json")
        self.reward_stats.load_state_dict(state["reward_stats"])
        self.skipped_rewards = int(state["skipped_rewards"])
        self._last_arm = state["last_arm"]
        tensors = self._load_tensors(path, "state.safetensors")
        for key, expected in self.state_tensors().items():
            shape_differs = key in tensors and tuple(tensors[key].shape) != np.shape(expected)
            if key not in tensors or (shape_differs and key not in self.variable_length_tensors):
                raise SchedulerError(f"saved bandit state in {path} does not match this scheduler's "
                                     f"arms and features (tensor {key!r})")
        self.load_state_tensors(tensors)


def _first_untried(counts: np.ndarray) -> int | None:
    untried = np.flatnonzero(counts == 0)
    return int(untried[0]) if untried.size else None


def _greedy(means: np.ndarray, counts: np.ndarray) -> int:
    """Return the arm with the highest mean among tried arms, or arm 0 when none was tried."""
    if not np.any(counts > 0):
        return 0
    return int(np.argmax(np.where(counts > 0, means, -np.inf)))


class UCB1(Bandit):
    """UCB1 (Auer, Cesa-Bianchi, Fischer, 2002) over hardness levels.

    Every arm is played once, lowest level first. After that the arm with
    the highest ``mean / s + c * sqrt(ln t / n)`` is played. Here t counts all
    plays, n the arm's plays, and s is the running reward standard deviation
    (1 when ``normalize`` is false). Ties go to the lowest level.

    :param observation_space: the per-batch observation ``Box`` (unused)
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    :param c: exploration coefficient; sqrt(2) is UCB1's value for rewards in [0, 1]
    :param normalize: divide the means by the running reward standard deviation
    :param n_levels: number of hardness arms when the action space is a ``Box``
    """

    name = "ucb"
    option_defaults = {"c": math.sqrt(2.0), "normalize": True, "n_levels": 11}

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        self.c = validate_non_negative("c", self.options["c"])
        self.normalize = validate_bool("normalize", self.options["normalize"])
        self.counts = np.zeros(self.n_arms, dtype=np.float64)
        self.sums = np.zeros(self.n_arms, dtype=np.float64)

    def scores(self) -> np.ndarray:
        """Return each arm's upper confidence bound (all arms must have been played)."""
        scale = self.reward_stats.std if self.normalize else 1.0
        total = self.counts.sum()
        return self.sums / self.counts / scale + self.c * np.sqrt(math.log(total) / self.counts)

    def select_arm(self, observation: np.ndarray) -> int:
        untried = _first_untried(self.counts)
        if untried is not None:
            return untried
        return int(np.argmax(self.scores()))

    def best_arm(self, observation: np.ndarray) -> int:
        means = self.sums / np.maximum(self.counts, 1.0)
        return _greedy(means, self.counts)

    def update_arm(self, arm: int, reward: float) -> None:
        self.counts[arm] += 1.0
        self.sums[arm] += reward

    def state_tensors(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts, "sums": self.sums}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.counts = tensors["counts"].numpy().astype(np.float64)
        self.sums = tensors["sums"].numpy().astype(np.float64)


class EXP3(Bandit):
    """EXP3 (Auer, Cesa-Bianchi, Freund, Schapire, 2002) with forgetting, over hardness levels.

    Arm a is played with probability
    ``p_a = (1 - gamma) * softmax(gamma * G / K)_a + gamma / K`` for K arms,
    where G_a sums the importance-weighted rewards ``x / p_a`` of arm a. The
    best hardness drifts as the model trains, so old rewards fade: G is
    multiplied by ``discount`` each step, or only the last ``window`` steps
    count. EXP3 needs rewards x in [0, 1]. With ``normalize`` a reward is
    standardized by the running mean and standard deviation, then squashed by
    the logistic function. Without it, a reward outside [0, 1] raises.

    :param observation_space: the per-batch observation ``Box`` (unused)
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    :param gamma: exploration rate in (0, 1], the share of uniform play
    :param discount: factor in (0, 1] applied to G every step (1 keeps all history)
    :param window: count only the last ``window`` steps instead of discounting (None: off)
    :param normalize: map rewards of any scale into [0, 1]
    :param n_levels: number of hardness arms when the action space is a ``Box``
    """

    name = "exp3"
    option_defaults = {"gamma": 0.1, "discount": 0.99, "window": None, "normalize": True, "n_levels": 11}
    variable_length_tensors = frozenset({"history_arms", "history_estimates"})

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        self.gamma = validate_fraction("gamma", self.options["gamma"])
        self.discount = validate_fraction("discount", self.options["discount"])
        self.window = self.options["window"]
        if self.window is not None:
            validate_positive_int("window", self.window)
            if "discount" in options:
                raise SchedulerError("exp3 options discount and window are both set; give only one of them")
            self.discount = 1.0
        self.normalize = validate_bool("normalize", self.options["normalize"])
        self.gains = np.zeros(self.n_arms, dtype=np.float64)
        self.history: collections.deque[tuple[int, float]] = collections.deque(maxlen=self.window)
        self._last_probability = 1.0

    def probabilities(self) -> np.ndarray:
        """Return the probability of playing each arm at the next step."""
        logits = self.gamma * self.gains / self.n_arms
        weights = np.exp(logits - logits.max())
        return (1.0 - self.gamma) * weights / weights.sum() + self.gamma / self.n_arms

    def select_arm(self, observation: np.ndarray) -> int:
        probabilities = self.probabilities()
        arm = int(self.rng.choice(self.n_arms, p=probabilities))
        self._last_probability = float(probabilities[arm])
        return arm

    def best_arm(self, observation: np.ndarray) -> int:
        return int(np.argmax(self.probabilities()))

    def unit_reward(self, reward: float) -> float:
        """Return ``reward`` mapped into [0, 1] (the reward statistics already include it)."""
        if self.normalize:
            return 1.0 / (1.0 + math.exp(-self.reward_stats.standardize(reward)))
        if not 0.0 <= reward <= 1.0:
            raise SchedulerError(f"exp3 got reward {reward!r} outside [0, 1] with normalize=false; "
                                 "set normalize=true for rewards on another scale")
        return reward

    def update_arm(self, arm: int, reward: float) -> None:
        estimate = self.unit_reward(reward) / self._last_probability
        if self.window is None:
            self.gains *= self.discount
            self.gains[arm] += estimate
            return
        self.history.append((arm, estimate))
        arms = np.array([item[0] for item in self.history], dtype=np.int64)
        estimates = np.array([item[1] for item in self.history], dtype=np.float64)
        self.gains = np.bincount(arms, weights=estimates, minlength=self.n_arms).astype(np.float64)

    def state_tensors(self) -> dict[str, np.ndarray]:
        return {
            "gains": self.gains,
            "history_arms": np.array([item[0] for item in self.history], dtype=np.int64),
            "history_estimates": np.array([item[1] for item in self.history], dtype=np.float64),
            "last_probability": np.array([self._last_probability], dtype=np.float64),
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.gains = tensors["gains"].numpy().astype(np.float64)
        arms = tensors["history_arms"].tolist()
        estimates = tensors["history_estimates"].tolist()
        self.history = collections.deque(zip(arms, estimates), maxlen=self.window)
        self._last_probability = float(tensors["last_probability"][0])


class ThompsonSampling(Bandit):
    """Gaussian Thompson sampling over hardness levels.

    Each arm's reward is modelled as Gaussian with unknown mean. Every arm is
    played once first. After that, each arm's mean is drawn from its
    flat-prior posterior N(m_a, s^2 / n_a), where m_a is the sample mean of
    its n_a plays, and the arm with the highest draw is played. The reward standard deviation s is ``sigma``
    when given, otherwise the pooled within-arm estimate (the spread of all
    rewards while no arm has two plays).

    :param observation_space: the per-batch observation ``Box`` (unused)
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    :param sigma: known reward standard deviation, or None to estimate it
    :param n_levels: number of hardness arms when the action space is a ``Box``
    """

    name = "thompson"
    option_defaults = {"sigma": None, "n_levels": 11}

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        self.sigma = self.options["sigma"]
        if self.sigma is not None:
            self.sigma = validate_positive("sigma", self.sigma)
        self.counts = np.zeros(self.n_arms, dtype=np.float64)
        self.means = np.zeros(self.n_arms, dtype=np.float64)
        self.m2 = np.zeros(self.n_arms, dtype=np.float64)

    def reward_variance(self) -> float:
        """Return the reward variance used for the posteriors."""
        if self.sigma is not None:
            return self.sigma**2
        # NOTE: a plug-in variance understates the uncertainty of the first few plays;
        # a Student-t posterior (unknown variance, conjugate prior) would be exact.
        degrees_of_freedom = self.counts.sum() - np.count_nonzero(self.counts)
        if degrees_of_freedom > 0:
            return float(self.m2.sum() / degrees_of_freedom)
        return self.reward_stats.std**2 if self.reward_stats.m2 > 0.0 else 0.0

    def select_arm(self, observation: np.ndarray) -> int:
        untried = _first_untried(self.counts)
        if untried is not None:
            return untried
        scale = np.sqrt(self.reward_variance() / self.counts)
        draws = self.means + scale * self.rng.standard_normal(self.n_arms)
        return int(np.argmax(draws))

    def best_arm(self, observation: np.ndarray) -> int:
        return _greedy(self.means, self.counts)

    def update_arm(self, arm: int, reward: float) -> None:
        self.counts[arm] += 1.0
        delta = reward - self.means[arm]
        self.means[arm] += delta / self.counts[arm]
        self.m2[arm] += delta * (reward - self.means[arm])

    def state_tensors(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts, "means": self.means, "m2": self.m2}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.counts = tensors["counts"].numpy().astype(np.float64)
        self.means = tensors["means"].numpy().astype(np.float64)
        self.m2 = tensors["m2"].numpy().astype(np.float64)


class LinUCB(Bandit):
    """LinUCB with disjoint linear models (Li, Chu, Langford, Schapire, 2010) over hardness levels.

    The context x is the per-batch observation with a constant 1 appended.
    Each arm a keeps a ridge regression of the reward on x,
    ``A_a = lambda * I + sum x x^T`` and ``b_a = sum r x``, and the arm with
    the highest ``theta_a . x / s + alpha * sqrt(x^T A_a^-1 x)`` is played,
    with ``theta_a = A_a^-1 b_a`` and s the running reward standard deviation
    (1 when ``normalize`` is false). Ties go to the lowest level.

    :param observation_space: the per-batch observation ``Box`` of shape (F,)
    :param action_space: ``Discrete(n_levels)`` or ``Box(0, 1, (1,))``
    :param alpha: width of the confidence bound
    :param lambda: ridge regularisation (> 0)
    :param normalize: divide the predicted rewards by the running reward standard deviation
    :param n_levels: number of hardness arms when the action space is a ``Box``
    """

    contextual = True
    name = "linucb"
    option_defaults = {"alpha": 1.0, "lambda": 1.0, "normalize": True, "n_levels": 11}

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, **options: Any) -> None:
        super().__init__(observation_space, action_space, **options)
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
            raise SchedulerError(f"linucb needs a one-dimensional Box observation space, got {observation_space}")
        self.alpha = validate_non_negative("alpha", self.options["alpha"])
        self.ridge = validate_positive("lambda", self.options["lambda"])
        self.normalize = validate_bool("normalize", self.options["normalize"])
        self.n_features = int(observation_space.shape[0]) + 1
        self.design = np.tile(self.ridge * np.eye(self.n_features), (self.n_arms, 1, 1))
        self.targets = np.zeros((self.n_arms, self.n_features), dtype=np.float64)
        self._last_context = np.zeros(self.n_features, dtype=np.float64)

    def context(self, observation: np.ndarray) -> np.ndarray:
        """Return the observation as a float64 vector with a constant 1 appended."""
        observation = np.asarray(observation, dtype=np.float64)
        if observation.shape != self.observation_space.shape:
            raise SchedulerError(f"linucb expected an observation of shape {self.observation_space.shape}, "
                                 f"got {observation.shape}")
        return np.append(observation, 1.0)

    def predicted_rewards(self, context: np.ndarray) -> np.ndarray:
        """Return theta_a . x for every arm, on the reward's own scale."""
        theta = np.linalg.solve(self.design, self.targets[..., None])[..., 0]
        return theta @ context

    def scores(self, context: np.ndarray) -> np.ndarray:
        """Return each arm's upper confidence bound for ``context``."""
        scale = self.reward_stats.std if self.normalize else 1.0
        contexts = np.broadcast_to(context, (self.n_arms, self.n_features))[..., None]
        width = np.sqrt(np.einsum("ad,ad->a", contexts[..., 0], np.linalg.solve(self.design, contexts)[..., 0]))
        return self.predicted_rewards(context) / scale + self.alpha * width

    def select_arm(self, observation: np.ndarray) -> int:
        self._last_context = self.context(observation)
        return int(np.argmax(self.scores(self._last_context)))

    def best_arm(self, observation: np.ndarray) -> int:
        return int(np.argmax(self.predicted_rewards(self.context(observation))))

    def update_arm(self, arm: int, reward: float) -> None:
        context = self._last_context
        self.design[arm] += np.outer(context, context)
        self.targets[arm] += reward * context

    def state_tensors(self) -> dict[str, np.ndarray]:
        return {"design": self.design, "targets": self.targets, "last_context": self._last_context}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.design = tensors["design"].numpy().astype(np.float64)
        self.targets = tensors["targets"].numpy().astype(np.float64)
        self._last_context = tensors["last_context"].numpy().astype(np.float64)
