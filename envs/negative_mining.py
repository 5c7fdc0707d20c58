"""``falcon_rl/NegativeMining-v0``: one hardness decision per mini-batch of a live VLP training run."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from falcon_rl.config import TrainConfig
from falcon_rl.data import ImageTextPairs
from falcon_rl.mining import action_to_hardness, batch_observation
from falcon_rl.training import TrainingRun


def make_config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    """Merge keyword overrides into ``config`` (default: the CPU ``tiny`` setting, no progress bars)."""
    values = config.to_dict() if config is not None else {"progress": False}
    values.update(overrides)
    return TrainConfig.from_dict(values)


def make_action_space(config: TrainConfig) -> spaces.Space:
    if config.action_space == "continuous":
        return spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
    return spaces.Discrete(config.n_levels)


class NegativeMiningEnv(gym.Env):
    """Choose how hard the negatives of each mini-batch are, inside a live VLP training run.

    ## Description

    Each step is one optimizer step of an ALBEF-style model on a mini-batch
    built by hard-negative mining: half of the batch are anchors (the next
    unplaced pairs of the epoch), the other half the negatives mined for them
    from an embedding bank with FAISS. The action sets the hardness q of all
    anchors' negatives: q = 1 takes each anchor's most similar remaining
    candidate (GRIT-VLP's grouping), q = 0 the least similar of its top K.

    ## Action Space

    | setting | space | meaning |
    |---|---|---|
    | `action_space="discrete"` (default) | `Discrete(n_levels)` | q = a / (n_levels - 1) |
    | `action_space="continuous"` | `Box(0, 1, (1,), float32)` | q = a |

    ## Observation Space

    `Box(OBS_LOW, OBS_HIGH, (F,), float32)`: the mean over the batch's anchors
    of the per-anchor features listed in `falcon_rl.mining.FEATURE_NAMES`
    (similarity to the own positive, top-1, mean and spread of candidate
    similarities in both directions, positive-to-hardest margin, softmax
    entropy, rank of the positive, valid-candidate share, training progress,
    recent loss and its change). Each feature's range is in
    `falcon_rl.mining.OBS_LOW` and `OBS_HIGH`; observations are always finite.

    ## Rewards

    The reward proxy of the batch (`reward="mlm_gain"` by default): the MLM
    loss on the batch before the update minus after it, with the same mask.
    `itc_gain` and `itm_gain` use the ITC or ITM loss instead.

    ## Starting State

    `reset(seed)` builds a fresh model (initialised from `seed`), optimizer,
    embedding bank (one encoding pass over the training set) and data order.

    ## Episode End

    An episode is one whole training run: it terminates when the step budget
    (`steps`, or `epochs` converted to steps) is spent. Epoch boundaries do
    not end episodes; `info["epoch_end"]` marks them.

    ## Arguments

    `gymnasium.make("falcon_rl/NegativeMining-v0", **fields)` accepts any
    `falcon_rl.config.TrainConfig` field (`steps`, `preset`, `data`,
    `batch_size`, `reward`, `action_space`, ...) or `config=TrainConfig(...)`,
    and `splits=` to share loaded data between environments. With no
    arguments it trains the `tiny` preset on the embedded Flickr8k subset.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: TrainConfig | None = None, splits: dict[str, ImageTextPairs] | None = None,
                 **overrides: Any) -> None:
        self.config = make_config(config, overrides)
        self.run = TrainingRun(self.config, splits)
        self.action_space = make_action_space(self.config)
        self.observation_space = self.run.observation_space
        self._started = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        run_seed = self.config.seed if seed is None and not self._started else \
            seed if seed is not None else int(self.np_random.integers(2**31 - 1))
        anchors = self.run.reset(run_seed)
        self._started = True
        return batch_observation(anchors), {"seed": run_seed, "total_steps": self.run.total_steps}

    def close(self) -> None:
        self.run.close()
        super().close()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self._started:
            raise gym.error.ResetNeeded("call reset() before step()")
        hardness = float(np.asarray(action_to_hardness(action, self.action_space)).reshape(-1)[0])
        result = self.run.step(np.full(self.run.n_anchors, hardness, dtype=np.float32))
        info = {key: value for key, value in result.info.items() if key != "fn_labels"}
        return batch_observation(result.observation), float(result.reward), result.terminated, False, info
