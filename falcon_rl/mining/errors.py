"""Errors that the mining layer raises for invalid input."""


class MiningError(ValueError):
    """An argument or state passed to the mining layer is invalid.

    The message names the value and the allowed values.
    """
