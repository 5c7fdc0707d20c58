"""The scheduler-in-the-loop trainer: wires a training run, a scheduler, logging and checkpoints.

The loop, top to bottom: the scheduler acts on the anchors' observations,
the run builds the mined batch and takes an optimizer step, the scheduler
observes the reward, then the trainer logs, evaluates and checkpoints.

Fault tolerance: a checkpoint is written every ``checkpoint_every`` steps and
at the end of the budget. After SIGTERM or SIGINT the run finishes the current
step, writes a checkpoint and stops with exit code 143 or 130. A second signal
stops it at once, without a checkpoint. ``Trainer.train(resume=True)`` continues from
the newest readable checkpoint. When too many consecutive steps are skipped
for non-finite values, the run writes a checkpoint of its current state (its
weights are those of the last finite update) and raises ``NonFiniteError``.

For tests, the environment variable ``FALCON_RL_STOP_AFTER_STEP=N`` (or
``N:SIGINT``) makes the trainer send itself SIGTERM (or SIGINT) right after
step N, which stops a run at an exact step through the real signal path.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

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
from falcon_rl.training import NonFiniteError, StepResult, TrainingRun
from falcon_rl.training import checkpoint as ckpt
from falcon_rl.training.hardware import set_deterministic

logger = logging.getLogger(__name__)

EXIT_SIGNALS = {signal.SIGTERM: 143, signal.SIGINT: 130}
STOP_AFTER_STEP_VARIABLE = "FALCON_RL_STOP_AFTER_STEP"
# Command-line spellings of the configuration fields whose option is not "--" plus the field name.
OPTION_NAMES = {"scheduler_options": "--scheduler-opt", "model_options": "--model-opt", "progress": "--no-progress"}


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
        self._stop_after_step = _stop_after_step_hook()

    # -- public entry points ------------------------------------------------

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Train to the step budget (resuming from the newest checkpoint when asked) and evaluate.

        Raises ``Stopped`` after a signal and ``NonFiniteError`` after too many
        skipped steps, each once a checkpoint is written.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if not resume:
            self._check_fresh_directory()
        previous_handlers = self._install_signal_handlers()
        try:
            observation = self._resume() if resume else self._start()
            # Written after a successful resume, so a rejected resume leaves the run directory as it was.
            run_directory.write_config(self.directory, self.config)
            run_directory.write_run_info(self.directory, str(self.run.device), self.argv)
            # metrics.json marks a finished budget; an extended run is unfinished until it ends again.
            (self.directory / "metrics.json").unlink(missing_ok=True)
            # A resumed run logs again from step N + 1, so TensorBoard drops the stopped session's events
            # after its checkpoint at step N. Events up to step N, its evaluation included, stay.
            self.logger = RunLogger(self.directory, self.config,
                                    purge_step=self.run.step_count + 1 if resume else 0)
            try:
                if self._stop_signal is not None:  # the signal arrived during setup
                    self.save_checkpoint()
                    self._stop_if_signalled()
                self._loop(observation)
                return self._finish()
            finally:
                self.logger.close()
        finally:
            self.run.close()
            self._restore_signal_handlers(previous_handlers)

    # -- setup --------------------------------------------------------------

    def _check_fresh_directory(self) -> None:
        if ckpt.list_checkpoints(self.checkpoint_dir):
            raise ConfigError(f"invalid value for output: {str(self.directory)!r} already contains checkpoints of "
                              f"another run; continue it with --resume {self.directory} or choose another --output")

    def _start(self) -> np.ndarray:
        seed = self.config.seed
        self.scheduler.on_run_start(self.run.total_steps, seed)
        # Seed Python's, NumPy's and torch's global generators (torch's on every CUDA device too), so that
        # anything drawing from them repeats. The run seeds torch again when it builds the model.
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        observation = self.run.reset(seed, uses_mining=self.scheduler.uses_mining)
        logger.info("training %s/%s with scheduler %s for %d steps (%d per epoch) on %s, %s",
                    self.config.framework, self.config.preset, self.config.scheduler, self.run.total_steps,
                    self.run.steps_per_epoch, self.run.device, self.run.precision)
        return observation

    def _resume(self) -> np.ndarray:
        payload, path = ckpt.load_newest_valid(self.checkpoint_dir)
        ckpt.check_compatible(payload["config"], self.config.to_dict(), path)
        run_state = ckpt.from_safe(payload["run"])
        if run_state["counters"]["step"] > self.run.total_steps:
            raise ConfigError(f"the step budget ({self.run.total_steps} steps) is below step "
                              f"{run_state['counters']['step']} of checkpoint {path}; give a larger --steps or --epochs")

        # NOTE: the scheduler keeps the step budget it was saved with (load restores it), so when
        # --steps or --epochs extends a run, budget-based schedules (SB3's progress_remaining,
        # hardening and softening curricula) stay at their saved length.
        self.scheduler.on_run_start(self.run.total_steps, self.config.seed)
        self.run.load_state_dict(run_state)
        with tempfile.TemporaryDirectory() as folder:
            ckpt.unpack_directory(payload["scheduler"], Path(folder))
            self.scheduler.load(Path(folder))
        trainer_state = ckpt.from_safe(payload["trainer"])
        self.history = trainer_state["history"]
        self.val_history = trainer_state["val_history"]
        self.wall_seconds = trainer_state["wall_seconds"]
        # Last, because building the run and the scheduler above draws from the global generators.
        ckpt.restore_random_states(payload["random"])
        logger.info("resumed from %s at step %d of %d", path, self.run.step_count, self.run.total_steps)
        return self.run.observation()

    # -- the loop -----------------------------------------------------------

    def _loop(self, observation: np.ndarray) -> None:
        run, scheduler = self.run, self.scheduler
        bar = tqdm(total=run.total_steps, initial=run.step_count, desc="train", unit="step",
                   disable=not self.config.progress, dynamic_ncols=True)
        started = time.monotonic()
        try:
            while run.step_count < run.total_steps:
                action = scheduler.act(self._scheduler_view(observation)) if scheduler.uses_mining else None
                hardness = action_to_hardness(action, self.action_space) if action is not None else None
                try:
                    result = run.step(hardness)
                except NonFiniteError as error:
                    if error.result is not None:
                        self._after_step(error.result, action, bar)
                    self._stop_for_nonfinite(error)
                observation = result.observation
                self._after_step(result, action, bar)

                self.wall_seconds += time.monotonic() - started
                started = time.monotonic()
                self._maybe_evaluate()
                self._maybe_checkpoint(result.terminated)
        finally:
            bar.close()

    def _after_step(self, result: StepResult, action: Any, bar: tqdm) -> None:
        """Hand the step's reward to the scheduler, record the step and fire the test hook."""
        reward = result.anchor_rewards if self.scheduler.per_anchor else result.reward
        self.scheduler.observe(self._finite_reward(reward), self._scheduler_view(result.observation),
                               result.terminated, False, result.info)
        self._record(result.info, result.observation, action)
        bar.update(1)
        bar.set_postfix(self._postfix(result.info), refresh=False)
        if self._stop_after_step is not None and self.run.step_count == self._stop_after_step[0]:
            signal.raise_signal(self._stop_after_step[1])

    def _scheduler_view(self, observation: np.ndarray) -> np.ndarray:
        view = observation if self.scheduler.per_anchor else batch_observation(observation)
        # The run's observations are finite and bounded by construction. This check keeps that
        # promise to the scheduler even if a feature computation regresses.
        if not np.all(np.isfinite(view)):
            logger.warning("replacing %d non-finite observation values before the scheduler sees them",
                           int(np.size(view) - np.count_nonzero(np.isfinite(view))))
            space = self.run.observation_space
            view = np.clip(np.nan_to_num(view, nan=0.0, posinf=space.high, neginf=space.low), space.low, space.high)
        return view

    @staticmethod
    def _finite_reward(reward: float | np.ndarray) -> float | np.ndarray:
        if np.all(np.isfinite(reward)):
            return reward
        logger.warning("replacing a non-finite reward by 0 before the scheduler sees it")
        if isinstance(reward, np.ndarray):
            return np.nan_to_num(reward, nan=0.0, posinf=0.0, neginf=0.0)
        return 0.0

    def _record(self, info: dict[str, Any], observation: np.ndarray, action: Any) -> None:
        entry = {"step": info["step"], "epoch_end": info["epoch_end"], "batch_size": info["batch_size"],
                 "reward": info["reward"], "loss": info["losses"].get("total"),
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

    # -- checkpoints, signals and non-finite stops --------------------------

    def _maybe_checkpoint(self, terminated: bool) -> None:
        step = self.run.step_count
        due = self.config.checkpoint_every and step % self.config.checkpoint_every == 0
        if due or terminated or self._stop_signal is not None:
            self.save_checkpoint()
        self._stop_if_signalled()

    def _stop_if_signalled(self) -> None:
        if self._stop_signal is not None:
            logger.warning("stopped by %s after step %d; resume with: falcon-rl train --resume %s",
                           signal.Signals(self._stop_signal).name, self.run.step_count, self.directory)
            raise Stopped(EXIT_SIGNALS[self._stop_signal])

    def save_checkpoint(self, prune: bool = True) -> Path:
        """Write ``checkpoints/step-N.pt`` atomically and, when ``prune``, delete all but the newest K."""
        with tempfile.TemporaryDirectory() as folder:
            self.scheduler.save(Path(folder))
            scheduler_files = ckpt.pack_directory(Path(folder))
        payload = {
            "format": ckpt.FORMAT_NAME,
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
        if prune:
            ckpt.prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)
        return path

    def _stop_for_nonfinite(self, error: NonFiniteError) -> NoReturn:
        """Checkpoint the run, whose weights are those of the last finite update, and stop.

        Skipped steps change no weights, so the checkpoint contains the model
        of the last update. The older checkpoints are kept (no pruning), in case
        that update is what made later steps diverge.
        """
        last_update = max((entry["step"] for entry in self.history if entry["updated"]), default=0)
        weights = f"the weights after step {last_update}" if last_update else "the initial weights"
        if all(bool(torch.isfinite(p).all()) for p in self.run.framework.parameters()):
            path = self.save_checkpoint(prune=False)
            where = f"wrote checkpoint {path} with {weights}, the last finite update"
        else:
            saved = ckpt.list_checkpoints(self.checkpoint_dir)
            where = (f"the model weights are non-finite, so no checkpoint was written; the newest is {saved[-1][1]}"
                     if saved else "the model weights are non-finite and no checkpoint exists")
        raise NonFiniteError(f"{error}; {where}", error.result) from None

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}

        def handle(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self._stop_signal is not None:
                logger.warning("received %s again: stopping now, without a checkpoint", name)
                self._restore_signal_handlers(previous)
                signal.raise_signal(signum)
                return
            self._stop_signal = signum
            logger.warning("received %s: finishing the current step, then writing a checkpoint", name)

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
        run_directory.write_history(self.directory, self.history, self.val_history)
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


def _stop_after_step_hook() -> tuple[int, int] | None:
    """Parse ``FALCON_RL_STOP_AFTER_STEP`` (``N`` or ``N:SIGINT``), a hook for tests; None when unset."""
    text = os.environ.get(STOP_AFTER_STEP_VARIABLE, "").strip()
    if not text:
        return None
    step, _, name = text.partition(":")
    try:
        signum = signal.Signals[name or "SIGTERM"]
        if signum not in EXIT_SIGNALS:
            raise KeyError(name)
        return int(step), signum
    except (KeyError, ValueError):
        raise ConfigError(f"invalid value for {STOP_AFTER_STEP_VARIABLE}: {text!r} "
                          "(expected STEP, STEP:SIGTERM or STEP:SIGINT)") from None


def resume_config(directory: Path, overrides: dict[str, Any]) -> TrainConfig:
    """Return the saved configuration of ``directory`` with the overrides a resume may change.

    Only the budget (``steps``, ``epochs``), the ``device`` and the progress bar
    may change; any other override raises ``ConfigError`` naming its option.
    """
    allowed = {"steps", "epochs", "device", "progress"}
    rejected = sorted(set(overrides) - allowed)
    if rejected:
        options = ", ".join(OPTION_NAMES.get(name, "--" + name.replace("_", "-")) for name in rejected)
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
