"""The error raised for evaluation inputs that cannot be used."""


class EvaluationError(ValueError):
    """An evaluation input (score matrix, index array, option) that cannot be used."""
