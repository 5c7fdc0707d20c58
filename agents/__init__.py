"""Negative-mining schedulers: SB3 adapters, bandits, heuristics and the plugin registry."""

from agents.base import Scheduler, SchedulerError
from agents.registry import SCHEDULERS, load_scheduler, make_scheduler, parse_options

__all__ = ["SCHEDULERS", "Scheduler", "SchedulerError", "load_scheduler", "make_scheduler", "parse_options"]
