"""Image encoders that turn normalised pixels into a sequence of image tokens.

Every encoder returns ``[B, 1 + N, width]``: a CLS-like summary token first (used for
ITC), then N patch or grid tokens (used, with the summary, by the fusion cross-attention).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from falcon_rl.models.base import ModelError
from falcon_rl.models.pretrained import load_pretrained

IMAGE_ENCODERS = ("tiny", "vit")


def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm instead of BatchNorm: no running statistics, so train and eval mode agree
    # and a proxy loss recomputed in eval mode matches the training forward pass.
    return nn.GroupNorm(min(8, channels), channels)


class TinyConvEncoder(nn.Module):
    """Small CNN for fast CPU experiments.

    Each stage halves the resolution with a stride-2 3x3 convolution and refines with a
    stride-1 3x3 convolution, both followed by GroupNorm and GELU. Stage widths double up
    to ``width``. The grid cells become tokens with learned position embeddings, and the
    summary token is a projection of their mean.

    :param image_size: input height and width in pixels; must be divisible by
        ``2 ** num_stages``
    :param width: channels of the last stage and token width
    :param num_stages: number of stride-2 stages
    """

    def __init__(self, image_size: int, width: int, num_stages: int = 4) -> None:
        super().__init__()
        if num_stages < 1 or image_size % (2**num_stages) != 0:
            raise ModelError(
                f"tiny image encoder needs image_size divisible by 2**image_layers, "
                f"got image_size={image_size} and image_layers={num_stages}"
            )
        stages: list[nn.Module] = []
        in_channels = 3
        for stage in range(num_stages):
            out_channels = max(width // 2 ** (num_stages - 1 - stage), 8)
            stages += [
                nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
                _group_norm(out_channels),
                nn.GELU(),
                nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False),
                _group_norm(out_channels),
                nn.GELU(),
            ]
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.width = in_channels
        grid = image_size // 2**num_stages
        self.position = nn.Parameter(torch.zeros(1, grid * grid, self.width))
        nn.init.normal_(self.position, std=0.02)
        self.summary = nn.Linear(self.width, self.width)
        self.norm = nn.LayerNorm(self.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return image tokens ``[B, 1 + (S / 2**num_stages)**2, width]``."""
        grid = self.stages(pixels).flatten(2).transpose(1, 2)
        grid = grid + self.position
        summary = self.summary(grid.mean(dim=1, keepdim=True))
        return self.norm(torch.cat([summary, grid], dim=1))


class ViTEncoder(nn.Module):
    """Vision Transformer from transformers, randomly initialised or loaded with weights.

    :param image_size: input height and width in pixels
    :param pretrained: local folder or Hugging Face hub name to load; None for random init
    :param hidden_size: token width (random init only)
    :param num_layers: transformer layers (random init only)
    :param num_heads: attention heads (random init only)
    :param patch_size: patch height and width in pixels (random init only)
    :param dropout: hidden and attention dropout probability
    """

    def __init__(
        self,
        image_size: int,
        pretrained: str | None,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        patch_size: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if pretrained is None:
            config = ViTConfig(
                image_size=image_size,
                patch_size=patch_size,
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=4 * hidden_size,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
            )
            self.vit = ViTModel(config, add_pooling_layer=False)
        else:
            self.vit = load_pretrained(
                ViTModel,
                pretrained,
                "image_pretrained",
                add_pooling_layer=False,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
            )
        self.width = int(self.vit.config.hidden_size)
        # Position embeddings are interpolated when the run's resolution differs from the
        # checkpoint's, as ALBEF does when fine-tuning at a higher resolution.
        self.interpolate = image_size != int(self.vit.config.image_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return image tokens ``[B, 1 + num_patches, width]`` ([CLS] first)."""
        output = self.vit(pixel_values=pixels, interpolate_pos_encoding=self.interpolate)
        return output.last_hidden_state


def build_image_encoder(
    kind: str,
    image_size: int,
    pretrained: str | None,
    width: int,
    num_layers: int,
    num_heads: int,
    patch_size: int,
    dropout: float,
) -> TinyConvEncoder | ViTEncoder:
    """Build the image encoder named ``kind`` (``"tiny"`` or ``"vit"``)."""
    if kind == "tiny":
        if pretrained is not None:
            raise ModelError(
                f"image_pretrained={pretrained!r} is only supported with image_encoder='vit'"
            )
        return TinyConvEncoder(image_size, width, num_layers)
    if kind == "vit":
        return ViTEncoder(image_size, pretrained, width, num_layers, num_heads, patch_size, dropout)
    raise ModelError(f"image_encoder={kind!r} is unknown; allowed values: {', '.join(IMAGE_ENCODERS)}")
