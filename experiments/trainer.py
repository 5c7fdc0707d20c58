"""The scheduler-in-the-loop trainer: wires a training run, a scheduler, logging and checkpoints.

The loop, top to bottom: the scheduler acts on the anchors' observations,
the run builds the mined batch and takes an optimizer step, the scheduler
observes the reward, then the trainer logs, evaluates and checkpoints.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from tqdm.auto import tqdm

from agents import Scheduler, make_scheduler
from experiments import run_directory
from experiments.tensorboard_logger import RunLogger
from falcon_rl.config import ConfigError, TrainConfig
from falcon_rl.data import ImageTextPairs
from falcon_rl.mining import action_to_hardness, batch_observation
from falcon_rl.training import TrainingRun
from falcon_rl.training import checkpoint as ckpt
from falcon_rl.training.hardware import set_deterministic

logger = logging.getLogger(__name__)

EXIT_SIGNALS = {signal.SIGTERM: 143, signal.SIGINT: 130}
CHECKPOINT_FIELDS_THAT_MUST_MATCH = ("framework", "preset", "model_options", "scheduler", "scheduler_options",
                                     "action_space", "n_levels", "batch_size", "search_space", "top_k", "seed",
                                     "reward", "data")


class Stopped(Exception):
    """Raised when a signal stopped the run after a checkpoint was written."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"stopped by signal, exit code {exit_code}")
        self.exit_code = exit_code


def build_action_space(config: TrainConfig) -> spaces.Space:
    if config.action_space == "continuous":
        return spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
    return spaces.Discrete(config.n_levels)


class Trainer:
    """Run one training job in ``directory`` with the scheduler named in ``config``.

    :param config: the resolved run configuration.
    :param directory: the run directory (created when missing).
    :param splits: preloaded data splits (loaded from ``config.data`` when omitted).
    :param argv: the command line, recorded in ``run_info.json``.
    """

    def __init__(self, config: TrainConfig, directory: Path, splits: dict[str, ImageTextPairs] | None = None,
                 argv: list[str] | None = None) -> None:
        self.config = config
        self.directory = Path(directory)
        self.argv = argv or []
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        set_deterministic(config.deterministic)
        self.run = TrainingRun(config, splits)
        self.action_space = build_action_space(config)
        self.scheduler: Scheduler = make_scheduler(config.scheduler, self.run.observation_space,
                                                   self.action_space, dict(config.scheduler_options))
        self.checkpoint_dir = self.directory / "checkpoints"
        self.history: list[dict[str, Any]] = []
        self.val_history: list[dict[str, Any]] = []
        self.wall_seconds = 0.0
        self._stop_signal: int | None = None

    # -- public entry points ------------------------------------------------

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Train to the step budget (resuming from the newest checkpoint when asked) and evaluate."""
        self.directory.mkdir(parents=True, exist_ok=True)
        run_directory.write_config(self.directory, self.config)
        run_directory.write_run_info(self.directory, str(self.run.device), self.argv)
        observation = self._resume() if resume else self._start()
        self.logger = RunLogger(self.directory, self.config, purge_step=self.run.step_count)
        previous_handlers = self._install_signal_handlers()
        try:
            self._loop(observation)
        finally:
            self._restore_signal_handlers(previous_handlers)
        metrics = self._finish()
        self.logger.close()
        return metrics

    # -- setup --------------------------------------------------------------

    def _start(self) -> np.ndarray:
        seed = self.config.seed
        self.scheduler.on_run_start(self.run.total_steps, seed)
        observation = self.run.reset(seed, uses_mining=self.scheduler.uses_mining)
        logger.info("training %s/%s with scheduler %s for %d steps (%d per epoch) on %s, %s",
                    self.config.framework, self.config.preset, self.config.scheduler, self.run.total_steps,
                    self.run.steps_per_epoch, self.run.device, self.run.precision)
        return observation

    def _resume(self) -> np.ndarray:
        payload, path = ckpt.load_newest_valid(self.checkpoint_dir)
        self._check_compatible(payload, path)
        self.scheduler.on_run_start(self.run.total_steps, self.config.seed)
        self.run.load_state_dict(payload["run"])
        with tempfile.TemporaryDirectory() as folder:
            ckpt.unpack_directory(payload["scheduler"], Path(folder))
            self.scheduler.load(Path(folder))
        trainer_state = payload["trainer"]
        self.history = trainer_state["history"]
        self.val_history = trainer_state["val_history"]
        self.wall_seconds = trainer_state["wall_seconds"]
        ckpt.restore_random_states(payload["random"])
        logger.info("resumed from %s at step %d of %d", path, self.run.step_count, self.run.total_steps)
        return self.run.observation()

    def _check_compatible(self, payload: dict[str, Any], path: Path) -> None:
        saved = payload["config"]
        current = self.config.to_dict()
        differing = [name for name in CHECKPOINT_FIELDS_THAT_MUST_MATCH if saved.get(name) != current.get(name)]
        if differing:
            detail = ", ".join(f"{name} ({saved.get(name)!r} in the checkpoint, {current.get(name)!r} now)"
                               for name in differing)
            raise ckpt.CheckpointError(f"checkpoint {path} comes from another configuration: {detail}")

    # -- the loop -----------------------------------------------------------

    def _loop(self, observation: np.ndarray) -> None:
        run, scheduler = self.run, self.scheduler
        bar = tqdm(total=run.total_steps, initial=run.step_count, desc="train", unit="step",
                   disable=not self.config.progress, dynamic_ncols=True)
        started = time.monotonic()
        while run.step_count < run.total_steps:
            action = scheduler.act(self._scheduler_view(observation)) if scheduler.uses_mining else None
            hardness = action_to_hardness(action, self.action_space) if action is not None else None
            result = run.step(hardness)
            observation = result.observation

            reward = result.anchor_rewards if scheduler.per_anchor else result.reward
            scheduler.observe(reward, self._scheduler_view(observation), result.terminated, False, result.info)
            self._record(result.info, observation, action)
            bar.update(1)
            bar.set_postfix(self._postfix(result.info), refresh=False)

            self.wall_seconds += time.monotonic() - started
            started = time.monotonic()
            self._maybe_evaluate()
            self._maybe_checkpoint(result.terminated)
        bar.close()

    def _scheduler_view(self, observation: np.ndarray) -> np.ndarray:
        return observation if self.scheduler.per_anchor else batch_observation(observation)

    def _record(self, info: dict[str, Any], observation: np.ndarray, action: Any) -> None:
        entry = {"step": info["step"], "reward": info["reward"], "loss": info["losses"].get("total"),
                 "mean_hardness": info["mean_hardness"], "mined_fn_rate": info["mined_fn_rate"],
                 "updated": info["updated"]}
        self.history.append(entry)
        self.logger.log_step(info, observation, self.scheduler)

    @staticmethod
    def _postfix(info: dict[str, Any]) -> dict[str, str]:
        postfix = {"loss": f"{info['losses'].get('total', float('nan')):.3f}", "reward": f"{info['reward']:+.4f}"}
        if info["mean_hardness"] is not None:
            postfix["q"] = f"{info['mean_hardness']:.2f}"
        return postfix

    def _maybe_evaluate(self) -> None:
        step = self.run.step_count
        if self.config.eval_every and step % self.config.eval_every == 0 and step < self.run.total_steps:
            metrics = self.run.evaluate("val")
            self.val_history.append({"step": step, **metrics})
            self.logger.log_eval("val", metrics, step)
            logger.info("step %d: validation RSUM %.2f", step, metrics["rsum"])

    # -- checkpoints and signals --------------------------------------------

    def _maybe_checkpoint(self, terminated: bool) -> None:
        step = self.run.step_count
        due = self.config.checkpoint_every and step % self.config.checkpoint_every == 0
        if due or terminated or self._stop_signal is not None:
            self.save_checkpoint()
        if self._stop_signal is not None and not terminated:
            code = EXIT_SIGNALS[self._stop_signal]
            logger.warning("stopped by %s after step %d; resume with: falcon-rl train --resume %s",
                           signal.Signals(self._stop_signal).name, step, self.directory)
            raise Stopped(code)

    def save_checkpoint(self) -> Path:
        with tempfile.TemporaryDirectory() as folder:
            self.scheduler.save(Path(folder))
            scheduler_files = ckpt.pack_directory(Path(folder))
        payload = {
            "format": "falcon-rl-checkpoint",
            "version": ckpt.FORMAT_VERSION,
            "config": self.config.to_dict(),
            "run": ckpt.to_safe(self.run.state_dict()),
            "scheduler": scheduler_files,
            "scheduler_name": self.config.scheduler,
            "trainer": ckpt.to_safe({"history": self.history, "val_history": self.val_history,
                                     "wall_seconds": self.wall_seconds}),
            "random": ckpt.random_states(),
        }
        path = self.checkpoint_dir / f"step-{self.run.step_count}.pt"
        ckpt.save_atomic(payload, path)
        ckpt.prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)
        return path

    def _install_signal_handlers(self) -> dict[int, Any]:
        def handle(signum: int, frame: FrameType | None) -> None:
            if self._stop_signal is not None:
                return
            self._stop_signal = signum
            logger.warning("received %s: finishing the current step, then writing a checkpoint",
                           signal.Signals(signum).name)

        previous = {}
        for signum in EXIT_SIGNALS:
            try:
                previous[signum] = signal.signal(signum, handle)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    # -- the end ------------------------------------------------------------

    def _finish(self) -> dict[str, Any]:
        started = time.monotonic()
        val = self.run.evaluate("val")
        test = self.run.evaluate("test")
        self.wall_seconds += time.monotonic() - started
        step = self.run.step_count
        self.logger.log_eval("val", val, step)
        self.logger.log_eval("test", test, step)

        hardness = [h["mean_hardness"] for h in self.history if h["mean_hardness"] is not None]
        fn_rates = [h["mined_fn_rate"] for h in self.history if h["mined_fn_rate"] is not None]
        metrics: dict[str, Any] = {"status": "finished", **test}
        metrics["num_test_images"] = metrics.pop("num_images")
        metrics["num_test_captions"] = metrics.pop("num_captions")
        metrics.update({f"val_{name}": value for name, value in val.items()})
        metrics.update({
            "framework": self.config.framework,
            "scheduler": self.config.scheduler,
            "seed": self.config.seed,
            "steps": step,
            "skipped_steps": self.run.skipped_steps,
            "wall_seconds": round(self.wall_seconds, 2),
            "mined_fn_rate": float(np.mean(fn_rates)) if fn_rates else None,
            "mean_hardness": float(np.mean(hardness)) if hardness else None,
        })
        metrics = {key: _json_number(value) for key, value in metrics.items()}
        run_directory.write_metrics(self.directory, metrics)
        self.logger.log_hparams(metrics)
        self._save_final_policy()
        return metrics

    def _save_final_policy(self) -> None:
        """Save the scheduler's final state under ``policy/``, loadable with ``--scheduler policy:PATH``."""
        target = self.directory / "policy"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        self.scheduler.save(target)


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def resume_config(directory: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration of ``directory`` with the overrides a resume may change."""
    allowed = {"steps", "epochs", "device"}
    rejected = sorted(set(overrides) - allowed)
    if rejected:
        options = ", ".join("--" + name.replace("_", "-") for name in rejected)
        raise ConfigError(f"{options} cannot be combined with --resume (only --steps, --epochs and --device "
                          "may change when resuming)")
    if not (directory / "config.yaml").is_file():
        raise ConfigError(f"invalid value for --resume: {str(directory)!r} is not a run directory "
                          "(no config.yaml)")
    values = run_directory.read_config(directory).to_dict()
    if "steps" in overrides or "epochs" in overrides:
        values["steps"], values["epochs"] = None, None
    values.update(overrides)
    values["output"] = str(directory)
    return TrainConfig.from_dict(values)
