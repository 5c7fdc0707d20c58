"""TensorBoard logging of a run, with tags grouped as loss/, reward/, mining/, policy/ and eval/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from falcon_rl.config import TrainConfig
from falcon_rl.mining import FEATURE_NAMES

HISTOGRAM_EVERY = 10
HISTOGRAM_FEATURES = ("positive_sim", "i2t_top1", "t2i_top1", "margin", "entropy")


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
        self._fn_buffer: list[tuple[float, float]] = []

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
        for kind, count in info["fallbacks"].items():
            self.writer.add_scalar(f"mining/fallback_{kind}", count, step)
        for name, value in getattr(scheduler, "last_train_stats", {}).items():
            self.writer.add_scalar(f"policy/{name.replace('train/', '')}", value, step)
        if step % HISTOGRAM_EVERY == 0:
            self._log_histograms(observation, step)

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
