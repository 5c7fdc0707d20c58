"""Validation of scheduler option values, with errors that name the option and the allowed values."""

from __future__ import annotations

from agents.base import SchedulerError


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_unit_interval(name: str, value: object) -> float:
    """Return ``value`` as a float, raising ``SchedulerError`` unless it lies in [0, 1]."""
    if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise SchedulerError(f"invalid value for {name}: {value!r} (must be a number in [0, 1])")
    return float(value)


def validate_fraction(name: str, value: object) -> float:
    """Return ``value`` as a float, raising ``SchedulerError`` unless it lies in (0, 1]."""
    if not _is_number(value) or not 0.0 < float(value) <= 1.0:
        raise SchedulerError(f"invalid value for {name}: {value!r} (must be a number in (0, 1])")
    return float(value)


def validate_non_negative(name: str, value: object) -> float:
    """Return ``value`` as a float, raising ``SchedulerError`` unless it is a number >= 0."""
    if not _is_number(value) or not float(value) >= 0.0:
        raise SchedulerError(f"invalid value for {name}: {value!r} (must be a number >= 0)")
    return float(value)


def validate_positive(name: str, value: object) -> float:
    """Return ``value`` as a float, raising ``SchedulerError`` unless it is a number > 0."""
    if not _is_number(value) or not float(value) > 0.0:
        raise SchedulerError(f"invalid value for {name}: {value!r} (must be a number > 0)")
    return float(value)


def validate_positive_int(name: str, value: object) -> int:
    """Return ``value``, raising ``SchedulerError`` unless it is an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SchedulerError(f"invalid value for {name}: {value!r} (must be an integer >= 1)")
    return value


def validate_bool(name: str, value: object) -> bool:
    """Return ``value``, raising ``SchedulerError`` unless it is True or False."""
    if not isinstance(value, bool):
        raise SchedulerError(f"invalid value for {name}: {value!r} (allowed: true, false)")
    return value
