"""Evaluate a saved checkpoint on image-text retrieval (``falcon-rl eval``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from falcon_rl.config import ConfigError, TrainConfig
from falcon_rl.training import TrainingRun
from falcon_rl.training import checkpoint as ckpt

logger = logging.getLogger(__name__)


def evaluate_checkpoint(path: Path, data: str | None = None, image_root: str | None = None, split: str = "test",
                        itm_rerank: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Load the model of a checkpoint file (or a run directory's newest one) and evaluate it on ``split``.

    The dataset defaults to the one the run trained on; ``data`` evaluates the
    same model on another dataset.
    """
    if path.is_dir():
        payload, path = ckpt.load_newest_valid(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    elif path.is_file():
        payload = ckpt.load_checkpoint(path)
    else:
        raise ConfigError(f"invalid value for --checkpoint: {str(path)!r} (no such file or directory)")

    values = dict(payload["config"])
    if data is not None:
        values["data"], values["image_root"] = data, image_root
    if itm_rerank is not None:
        values["itm_rerank"] = itm_rerank
    if device is not None:
        values["device"] = device
    values["progress"] = False
    config = TrainConfig.from_dict(values)

    run = TrainingRun(config, total_steps=1)
    run.framework.load_state_dict(payload["run"]["framework"])
    logger.info("evaluating %s (step %d) on the %s split", path, payload["run"]["counters"]["step"], split)
    return run.evaluate(split)
