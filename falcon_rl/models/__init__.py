"""Vision-language pretraining frameworks: the shared interface, ALBEF, losses and factory."""

from falcon_rl.models.albef import ALBEF
from falcon_rl.models.base import ModelError, StepOutput, TextBatch, VLPFramework
from falcon_rl.models.config import ALBEFConfig
from falcon_rl.models.factory import build_framework, list_presets

__all__ = [
    "ALBEF",
    "ALBEFConfig",
    "ModelError",
    "StepOutput",
    "TextBatch",
    "VLPFramework",
    "build_framework",
    "list_presets",
]
