"""Build a framework by name from a preset in ``configs/<name>-<preset>.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from falcon_rl.models.albef import ALBEF
from falcon_rl.models.base import ModelError, VLPFramework
from falcon_rl.models.blip2 import BLIP2, BLIP2Config
from falcon_rl.models.config import ALBEFConfig
from falcon_rl.models.siglip import SigLIP, SigLIPConfig

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Framework name -> (config dataclass with from_dict, framework class).
FRAMEWORKS: dict[str, tuple[type[Any], type[VLPFramework]]] = {
    "albef": (ALBEFConfig, ALBEF),
    "blip2": (BLIP2Config, BLIP2),
    "siglip": (SigLIPConfig, SigLIP),
}


def list_presets(name: str) -> list[str]:
    """Return the preset names available for framework ``name``, sorted."""
    return sorted(path.stem[len(name) + 1 :] for path in CONFIG_DIR.glob(f"{name}-*.json"))


def load_preset(name: str, preset: str) -> dict[str, Any]:
    """Return the settings of ``configs/<name>-<preset>.json`` as a dict."""
    if name not in FRAMEWORKS:
        raise ModelError(
            f"framework {name!r} is unknown; allowed values: {', '.join(sorted(FRAMEWORKS))}"
        )
    presets = list_presets(name)
    if preset not in presets:
        raise ModelError(
            f"preset {preset!r} is unknown for framework {name!r}; "
            f"allowed values: {', '.join(presets)}"
        )
    path = CONFIG_DIR / f"{name}-{preset}.json"
    with path.open(encoding="utf-8") as file:
        return json.load(file)


def build_framework(name: str, preset: str, **overrides: Any) -> VLPFramework:
    """Build framework ``name`` from its preset, with keyword overrides of single settings.

    Example: ``build_framework("albef", "tiny", text_pretrained=None, fusion_layers=1)``.

    :param name: framework name: ``"albef"``, ``"blip2"`` or ``"siglip"``
    :param preset: preset name, for example ``"test"``, ``"tiny"`` or ``"base"``
    :param overrides: settings that replace the preset's values
    :return: the framework, on the CPU, in training mode
    :raises ModelError: for an unknown name, preset or setting, an invalid value, or
        pretrained weights that cannot be loaded
    """
    values = load_preset(name, preset)
    values.update(overrides)
    config_class, framework_class = FRAMEWORKS[name]
    config = config_class.from_dict(values, source=f"preset {name}-{preset} with overrides")
    framework = framework_class(config)
    logger.info(
        "built %s-%s with %.1fM parameters (%.1fM trainable)",
        name,
        preset,
        sum(p.numel() for p in framework.parameters()) / 1e6,
        sum(p.numel() for p in framework.parameters() if p.requires_grad) / 1e6,
    )
    return framework
