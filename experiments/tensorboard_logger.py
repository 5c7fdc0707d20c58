"""TensorBoard logging of a run, with tags grouped as loss/, reward/, mining/, policy/ and eval/."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from torch.utils.tensorboard import SummaryWriter

from experiments import policy_map
from falcon_rl.config import TrainConfig
from falcon_rl.mining import FEATURE_NAMES

HISTOGRAM_EVERY = 10
HISTOGRAM_FEATURES = ("positive_sim", "i2t_top1", "t2i_top1", "margin", "candidate_entropy")
POLICY_MAPS = 10  # policy maps per run, evenly spaced, the last one at the end


class RunLogger:
    """Write one run's scalars, histograms and HParams to ``directory/tensorboard``.

    :param directory: the run directory.
    :param config: the run configuration, recorded as HParams at the end.
    :param purge_step: the step a resumed run continues from; events at or
        after it from the interrupted session are dropped, so curves have
        neither a gap nor a repeated step.
    """

    def __init__(self, directory: Path, config: TrainConfig, purge_step: int = 0) -> None:
        self.config = config
        self.writer = SummaryWriter(log_dir=str(Path(directory) / "tensorboard"),
                                    purge_step=purge_step if purge_step > 0 else None)
        self._hardness_buffer: list[np.ndarray] = []
        self._fn_hardness: list[np.ndarray] = []
        self._fn_labels: list[np.ndarray] = []
        self.observation_stats = policy_map.ObservationStats(len(FEATURE_NAMES))
        self.action_space = (spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
                             if config.action_space == "continuous" else spaces.Discrete(config.n_levels))
        self.n_anchors = math.ceil(config.batch_size / 2)

    def log_step(self, info: dict[str, Any], observation: np.ndarray, scheduler: Any) -> None:
        step = info["step"]
        for name, value in info["losses"].items():
            self.writer.add_scalar(f"loss/{name}", value, step)
        self.writer.add_scalar("reward/batch", info["reward"], step)
        self.writer.add_scalar("loss/lr", info["lr"], step)
        self.writer.add_scalar("loss/skipped_steps", info["skipped_steps"], step)
        if info["mean_hardness"] is not None:
            self.writer.add_scalar("mining/hardness_mean", info["mean_hardness"], step)
            self._hardness_buffer.append(np.asarray(info["hardness"], dtype=np.float32))
        if info["mined_fn_rate"] is not None:
            self.writer.add_scalar("mining/fn_rate", info["mined_fn_rate"], step)
        if info.get("fn_filtered") is not None:
            self.writer.add_scalar("mining/fn_filtered", info["fn_filtered"], step)
        for kind, count in info["fallbacks"].items():
            self.writer.add_scalar(f"mining/fallback_{kind}", count, step)
        for name, value in getattr(scheduler, "last_train_stats", {}).items():
            self.writer.add_scalar(f"policy/{name.replace('train/', '')}", value, step)
        self.observation_stats.update(observation)
        if info["mean_hardness"] is not None and info.get("fn_labels") is not None:
            labels = np.asarray(info["fn_labels"])
            labelled = labels >= 0
            self._fn_hardness.append(np.asarray(info["hardness"], dtype=np.float32)[labelled])
            self._fn_labels.append(labels[labelled] > 0)
        if step % HISTOGRAM_EVERY == 0:
            self._log_histograms(observation, step)
        total = info.get("total_steps", 0)
        interval = max(1, total // POLICY_MAPS)
        if step % interval == 0 or step == total:
            self._log_pictures(scheduler, step, total)

    def _log_pictures(self, scheduler: Any, step: int, total: int) -> None:
        """Log the policy map (learned and contextual schedulers) and the FN rate against hardness."""
        title = f"{self.config.scheduler}, step {step} of {total}"
        if getattr(scheduler, "contextual", False) and getattr(scheduler, "uses_mining", True):
            observations, x_axis, y_axis = policy_map.policy_grid(self.observation_stats)
            hardness = policy_map.predict_hardness(scheduler, observations, self.action_space, self.n_anchors)
            image = policy_map.render_policy_map(hardness, x_axis, y_axis, title)
            self.writer.add_image("policy/map", image, step, dataformats="HWC")
        if self._fn_hardness:
            hardness = np.concatenate(self._fn_hardness)
            labels = np.concatenate(self._fn_labels)
            if len(hardness):
                image = policy_map.render_fn_rate(hardness, labels, title)
                self.writer.add_image("mining/fn_rate_vs_hardness", image, step, dataformats="HWC")

    def _log_histograms(self, observation: np.ndarray, step: int) -> None:
        if self._hardness_buffer:
            self.writer.add_histogram("mining/hardness", np.concatenate(self._hardness_buffer), step)
            self._hardness_buffer.clear()
        for name in HISTOGRAM_FEATURES:
            if name in FEATURE_NAMES:
                self.writer.add_histogram(f"policy/observation_{name}", observation[:, FEATURE_NAMES.index(name)],
                                          step)

    def log_eval(self, split: str, metrics: dict[str, Any], step: int) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and value is not None and not isinstance(value, bool):
                self.writer.add_scalar(f"eval/{split}_{name}", value, step)
        self.writer.flush()

    def log_hparams(self, metrics: dict[str, Any]) -> None:
        """Record the configuration with the final metrics for TensorBoard's HParams dashboard."""
        hparams = {}
        for name, value in self.config.to_dict().items():
            if isinstance(value, (bool, int, float, str)):
                hparams[name] = value
            elif value is None:
                hparams[name] = "none"
            else:
                hparams[name] = str(value)
        numbers = {f"hparam/{name}": float(value) for name, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        self.writer.add_hparams(hparams, numbers, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
