"""Wall time per training step of the ``tiny`` preset with mining off, q = 1 mining and per-anchor PPO.

One process contains three :class:`falcon_rl.training.TrainingRun` objects of
the same configuration (``preset="tiny"``, embedded Flickr8k subset, random
initial bank), one per mode:

- ``random``: mining off, ``run.reset(seed, uses_mining=False)``, then ``run.step(None)``.
- ``hardest``: mining on, q = 1 for every anchor.
- ``ppo``: mining on, per-anchor PPO from ``agents.make_scheduler("ppo", ...)``
  on ``Discrete(11)`` hardness levels, driven with ``act`` and ``observe`` as
  ``experiments.trainer.Trainer`` drives it (its update every 8 steps
  included).

Each run is reset once and warmed up with ``--warmup`` steps, then the modes
take turns in blocks of ``--steps`` steps for ``--rounds`` rounds, in
rotating order. Reported ratios are of medians over the timed steps:

- ``policy_overhead_ratio``: the scheduler's own cost, paired within the
  ppo steps: (step + scheduler cost) / step. Here the step excludes the time
  inside ``act`` and ``observe``. The scheduler cost is their mean time on
  steps without a PPO update, plus the update's time divided by the rollout
  length (8 steps). The update is timed on a separate PPO scheduler fed
  random observations, because few timed steps contain one.
  ``policy_overhead_ratio_between_runs`` is ppo step / hardest step (medians),
  which also contains the step-to-step noise of the machine.
- ``mining_overhead_ratio``: hardest step / random step (medians), the cost
  of mining. ``mining_overhead_ratio_from_mining_time`` estimates the same
  from the time inside the batch builder, which the noise affects less.
- ``reward_proxy_ratio``: step / (step - time inside ``framework.proxy_loss``),
  the cost of the reward proxy's extra forward pass, over all timed steps.

The time inside ``proxy_loss``, inside the batch builder (``propose`` and
``select``) and inside the scheduler (``act`` and ``observe``) is measured
per step by wrapping those methods with timers.

Run from the repository root: ``python -m benchmarks.step_overhead --quick --output step.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium.spaces import Discrete

from agents import make_scheduler
from benchmarks.timing import format_table, hardware, median, peak_memory_mb, set_threads, write_json
from falcon_rl.config import TrainConfig
from falcon_rl.mining import action_to_hardness
from falcon_rl.training import TrainingRun

logger = logging.getLogger("benchmarks.step_overhead")

MODES = ("random", "hardest", "ppo")
SEED = 0
N_LEVELS = 11


class Timers:
    """Seconds spent inside wrapped methods since the last :meth:`reset`, by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    def wrap(self, owner: object, name: str, label: str) -> None:
        """Replace ``owner.name`` by a wrapper that adds its time to ``label``."""
        method = getattr(owner, name)

        def timed_method(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed_method)


class ModeDriver:
    """One training run stepped in one mode, with its per-step timings.

    :param mode: ``"random"``, ``"hardest"`` or ``"ppo"``.
    :param config: the run configuration.
    :param splits: the preloaded data splits; None loads them from ``config.data``.
    """

    def __init__(self, mode: str, config: TrainConfig, splits: dict | None) -> None:
        self.mode = mode
        self.run = TrainingRun(config, splits)
        self.timers = Timers()
        self.action_space = Discrete(N_LEVELS)
        self.scheduler = None
        self.observed = 0
        self.rollout_steps = 0
        if mode == "ppo":
            self.scheduler = make_scheduler("ppo", self.run.observation_space, self.action_space, {})
            self.scheduler.on_run_start(self.run.total_steps, SEED)
            # PPO updates once per rollout of n_steps observed steps.
            self.rollout_steps = int(self.scheduler.options.get(
                "n_steps", type(self.scheduler).option_defaults["n_steps"]))
            self.timers.wrap(self.scheduler, "act", "scheduler")
            self.timers.wrap(self.scheduler, "observe", "scheduler")
        self.observation = self.run.reset(SEED, uses_mining=mode != "random")
        # reset() builds a new framework and builder, so they are wrapped after it.
        self.timers.wrap(self.run.framework, "proxy_loss", "proxy")
        self.timers.wrap(self.run.builder, "propose", "mining")
        self.timers.wrap(self.run.builder, "select", "mining")
        self.timers.wrap(self.run.builder, "random_batch", "mining")
        self.samples: list[dict[str, float]] = []

    def step(self) -> dict[str, float]:
        """Take one training step (with the scheduler's act and observe for ppo); return its timings."""
        self.timers.reset()
        start = time.perf_counter()
        if self.mode == "random":
            result = self.run.step(None)
        elif self.mode == "hardest":
            result = self.run.step(np.ones(len(self.observation), dtype=np.float32))
        else:
            action = self.scheduler.act(self.observation)
            result = self.run.step(action_to_hardness(action, self.action_space))
            self.scheduler.observe(result.anchor_rewards, result.observation, result.terminated, False,
                                   result.info)
            self.observed += 1
        seconds = time.perf_counter() - start
        self.observation = result.observation
        update = float(self.rollout_steps > 0 and self.observed % self.rollout_steps == 0)
        return {"step": seconds, "ppo_update": update,
                **{label: self.timers.seconds.get(label, 0.0) for label in ("proxy", "mining", "scheduler")}}


def time_ppo_update(run: TrainingRun, rollouts: int = 2) -> float:
    """Return the median seconds of PPO's update, timed on a separate scheduler fed random observations.

    The update runs inside the ``observe`` call that completes a rollout, so
    that call's time minus a plain ``observe`` is the update's cost.
    """
    space = Discrete(N_LEVELS)
    scheduler = make_scheduler("ppo", run.observation_space, space, {})
    scheduler.on_run_start(run.total_steps, SEED)
    rollout = int(scheduler.options.get("n_steps", type(scheduler).option_defaults["n_steps"]))
    rng = np.random.default_rng(SEED)
    low, high = run.observation_space.low, run.observation_space.high

    def observation() -> np.ndarray:
        return rng.uniform(low, high, (run.n_anchors, low.size)).astype(np.float32)

    current = observation()
    plain, updates = [], []
    for step in range(1, rollouts * rollout + 1):
        scheduler.act(current)
        current = observation()
        rewards = rng.normal(0.0, 0.01, run.n_anchors).astype(np.float32)
        start = time.perf_counter()
        scheduler.observe(rewards, current, False, False, {})
        (updates if step % rollout == 0 else plain).append(time.perf_counter() - start)
    return median(updates) - median(plain)


def run_blocks(drivers: dict[str, ModeDriver], rounds: int, steps: int,
               progress: Callable[[str], None]) -> None:
    """Alternate the modes in blocks of ``steps`` steps for ``rounds`` rounds, rotating the order."""
    names = list(drivers)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(steps):
                drivers[name].samples.append(drivers[name].step())
            progress(f"round {round_index + 1}/{rounds}: {name} done")


def mode_row(mode: str, samples: list[dict[str, float]]) -> dict[str, Any]:
    """Summarise one mode's timed steps by medians and means."""
    step = [sample["step"] for sample in samples]
    return {
        "mode": mode,
        "steps_timed": len(samples),
        "step_seconds_median": median(step),
        "step_seconds_mean": float(np.mean(step)),
        "mining_seconds_median": median([sample["mining"] for sample in samples]),
        "mining_seconds_mean": float(np.mean([sample["mining"] for sample in samples])),
        "proxy_seconds_median": median([sample["proxy"] for sample in samples]),
        "scheduler_seconds_median": median([sample["scheduler"] for sample in samples]),
        "scheduler_seconds_mean": float(np.mean([sample["scheduler"] for sample in samples])),
        "samples": [{key: round(value, 6) for key, value in sample.items()} for sample in samples],
    }


def summary(rows: dict[str, dict[str, Any]], ppo_update_seconds: float, rollout_steps: int) -> dict[str, Any]:
    """Compute the overhead ratios from the per-mode rows and the separately timed PPO update."""
    every_step = [sample for row in rows.values() for sample in row["samples"]]
    hardest = rows["hardest"]["step_seconds_median"]
    random = rows["random"]["step_seconds_median"]

    # The scheduler's cost per step, paired within the ppo steps: act and
    # observe of steps without an update, plus the update spread over its rollout.
    ppo_steps = rows["ppo"]["samples"]
    plain = [sample for sample in ppo_steps if not sample["ppo_update"]] or ppo_steps
    scheduler_per_step = float(np.mean([sample["scheduler"] for sample in plain]))
    scheduler_per_step += ppo_update_seconds / rollout_steps
    step_without_scheduler = float(np.mean([sample["step"] - sample["scheduler"] for sample in ppo_steps]))
    return {
        "policy_overhead_ratio": (step_without_scheduler + scheduler_per_step) / step_without_scheduler,
        "policy_overhead_ratio_between_runs": rows["ppo"]["step_seconds_median"] / hardest,
        "scheduler_seconds_per_step": scheduler_per_step,
        "ppo_update_seconds": ppo_update_seconds,
        "ppo_rollout_steps": rollout_steps,
        "mining_overhead_ratio": hardest / random,
        # The same from the time measured inside the batch builder (mined
        # batches against random ones), which step-to-step noise affects less.
        "mining_overhead_ratio_from_mining_time": (
            random + rows["hardest"]["mining_seconds_mean"] - rows["random"]["mining_seconds_mean"]) / random,
        "reward_proxy_ratio": median([s["step"] / (s["step"] - s["proxy"]) for s in every_step]),
    }


COLUMNS = [
    ("mode", "mode", ""),
    ("steps_timed", "steps timed", "d"),
    ("step_seconds_median", "step s (median)", ".3f"),
    ("step_seconds_mean", "step s (mean)", ".3f"),
    ("mining_seconds_mean", "batch building s (mean)", ".4f"),
    ("proxy_seconds_median", "reward proxy s", ".3f"),
    ("scheduler_seconds_mean", "scheduler s (mean)", ".4f"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 step per mode (about 3 minutes on a "
                        "loaded 2-core machine, where a step takes about 15 s)")
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.add_argument("--rounds", type=int, help="rounds of alternation (default 2 with --quick, else 5)")
    parser.add_argument("--steps", type=int, help="timed steps per mode and round (default 1 with --quick, else 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before the first round")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="pairs per batch")
    parser.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (default: their own)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.steps = args.steps or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_threads(args.threads)
    config = TrainConfig(preset="tiny", progress=False, batch_size=args.batch_size, steps=100_000, eval_every=0,
                         bank_init="random", seed=SEED, num_threads=args.threads or None)
    started = time.perf_counter()
    splits = None
    drivers = {}
    for mode in MODES:
        # The first run loads the embedded data set; the others share it.
        drivers[mode] = ModeDriver(mode, config, splits)
        splits = drivers[mode].run.splits
    for driver in drivers.values():
        for _ in range(args.warmup):
            driver.step()
    run_blocks(drivers, args.rounds, args.steps, logger.info)
    ppo_update_seconds = time_ppo_update(drivers["ppo"].run)

    rows = {mode: mode_row(mode, driver.samples) for mode, driver in drivers.items()}
    record = {
        "setting": {"preset": "tiny", "batch_size": config.batch_size, "search_space": config.search_space,
                    "top_k": config.top_k, "search_backend": config.search_backend, "bank_init": "random",
                    "train_pairs": len(splits["train"]), "rounds": args.rounds, "steps_per_block": args.steps,
                    "warmup_steps": args.warmup, "quick": args.quick},
        **summary(rows, ppo_update_seconds, drivers["ppo"].rollout_steps),
        "wall_seconds": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(),
        "peak_memory_source": "resource.getrusage(RUSAGE_SELF).ru_maxrss, whole process",
        "hardware": hardware(),
        "rows": list(rows.values()),
    }
    print(format_table(record["rows"], COLUMNS))
    print({key: record[key] for key in ("policy_overhead_ratio", "policy_overhead_ratio_between_runs",
                                        "mining_overhead_ratio", "mining_overhead_ratio_from_mining_time",
                                        "reward_proxy_ratio")})
    write_json(args.output, record)
    return record


if __name__ == "__main__":
    main()
