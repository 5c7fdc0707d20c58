"""A ``VecEnv`` that only carries spaces, for building SB3 models that falcon-rl's loop drives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn


class AnchorSlotsVecEnv(VecEnv):
    """The A anchor slots of a batch as the sub-environments of a vectorized environment.

    SB3 algorithms need an environment to read the spaces and the number of
    environments from. falcon-rl's training loop produces the observations
    and rewards itself, so stepping or resetting this environment raises.

    :param n_anchors: number of anchor slots A, fixed for the run
    :param observation_space: the single-anchor observation ``Box``
    :param action_space: the single-anchor action space
    """

    def __init__(self, n_anchors: int, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        super().__init__(n_anchors, observation_space, action_space)

    def _not_driven_here(self, method: str) -> RuntimeError:
        return RuntimeError(f"AnchorSlotsVecEnv.{method} is not available: falcon-rl's training loop "
                            "collects the data and hands it to the scheduler through act and observe")

    def reset(self) -> VecEnvObs:
        raise self._not_driven_here("reset")

    def step_async(self, actions: np.ndarray) -> None:
        raise self._not_driven_here("step_async")

    def step_wait(self) -> VecEnvStepReturn:
        raise self._not_driven_here("step_wait")

    def close(self) -> None:
        pass

    def _indices(self, indices: VecEnvIndices) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, int):
            return [indices]
        return indices

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        if attr_name == "render_mode":
            return [None for _ in self._indices(indices)]
        raise AttributeError(f"anchor slots have no attribute {attr_name!r}")

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(f"anchor slots have no attribute {attr_name!r} to set")

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        raise self._not_driven_here(f"env_method({method_name!r})")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._indices(indices)]
