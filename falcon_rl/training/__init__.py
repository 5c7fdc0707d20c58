"""The live training run that schedulers step through, with its checkpoints."""

from falcon_rl.training.run import NonFiniteError, StepResult, TrainingRun

__all__ = ["NonFiniteError", "StepResult", "TrainingRun"]
