"""``AnchorMiningVecEnv``: the anchor slots of one mini-batch as the sub-environments of an SB3 ``VecEnv``."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from envs.negative_mining import make_action_space, make_config
from falcon_rl.config import TrainConfig
from falcon_rl.data import ImageTextPairs
from falcon_rl.mining import action_to_hardness
from falcon_rl.training import TrainingRun


class AnchorMiningVecEnv(VecEnv):
    """Per-anchor negative mining: a policy with one shared network acts for every anchor of a batch.

    ## Description

    Sub-environment ``i`` is anchor slot ``i`` of the current mini-batch
    (``num_envs = ceil(batch_size / 2)``). All slots step together: the
    hardness chosen for each anchor picks its negative, the batch trains the
    model once, and every slot receives the batch's reward. A short last
    batch of an epoch repeats its anchors to fill the slots; the extra
    actions are ignored.

    ## Action Space

    Per slot, as in ``NegativeMining-v0``: ``Discrete(n_levels)`` or
    ``Box(0, 1, (1,))``.

    ## Observation Space

    Per slot, the anchor's own features (``falcon_rl.mining.FEATURE_NAMES``),
    ``Box(OBS_LOW, OBS_HIGH, (F,), float32)``.

    ## Rewards

    The batch's reward proxy (``mlm_gain`` by default), the same for all slots.

    ## Starting State

    A fresh model, optimizer, bank and data order from the seed given to
    ``seed()`` (default: the config's seed).

    ## Episode End

    All slots end together when the run's step budget is spent; the
    environment then resets itself, as SB3 vectorised environments do, and
    ``infos[i]["terminal_observation"]`` holds the last observation.

    ## Arguments

    Any ``TrainConfig`` field as a keyword, or ``config=``; ``splits=`` shares
    loaded data.
    """

    def __init__(self, config: TrainConfig | None = None, splits: dict[str, ImageTextPairs] | None = None,
                 **overrides: Any) -> None:
        self.config = make_config(config, overrides)
        self.run = TrainingRun(self.config, splits)
        self.render_mode = None
        super().__init__(self.run.n_anchors, self.run.observation_space, make_action_space(self.config))
        self._seed = self.config.seed
        self._episodes = 0
        self._actions: np.ndarray | None = None
        self._observation: np.ndarray | None = None

    def reset(self) -> VecEnvObs:
        seed = self._seed + self._episodes
        self._observation = self.run.reset(seed)
        self._episodes += 1
        return self._observation

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._observation is None or self._actions is None:
            raise RuntimeError("call reset() and step_async() before step_wait()")
        hardness = np.asarray(action_to_hardness(self._actions, self.action_space), dtype=np.float32).reshape(-1)
        result = self.run.step(hardness)
        info = {key: value for key, value in result.info.items() if key not in ("fn_labels", "hardness")}
        infos = [dict(info) for _ in range(self.num_envs)]
        dones = np.full(self.num_envs, result.terminated)
        observation = result.observation
        if result.terminated:
            for slot_info, terminal in zip(infos, observation):
                slot_info["terminal_observation"] = terminal
            observation = self.reset()
        self._observation = observation
        return observation, result.anchor_rewards.copy(), dones, infos

    def close(self) -> None:
        self.run.close()

    def seed(self, seed: int | None = None) -> Sequence[None | int]:
        if seed is not None:
            self._seed, self._episodes = seed, 0
        return [self._seed] * self.num_envs

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: VecEnvIndices = None, **kwargs: Any) -> list[Any]:
        return [getattr(self, method_name)(*args, **kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False] * len(self._indices(indices))

    def _indices(self, indices: VecEnvIndices) -> Iterable[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, int):
            return [indices]
        return indices
