"""Vision-language pretraining frameworks: the shared interface, ALBEF, losses and factory."""

from falcon_rl.models.base import ModelError, StepOutput, TextBatch, VLPFramework
from falcon_rl.models.factory import build_framework, list_presets

__all__ = [
    "ModelError",
    "StepOutput",
    "TextBatch",
    "VLPFramework",
    "build_framework",
    "list_presets",
]
