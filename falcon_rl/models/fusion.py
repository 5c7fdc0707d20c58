"""Bidirectional text-image fusion encoder (ALBEF's multimodal encoder).

The layers are written here instead of using ``BertModel`` with cross-attention because
transformers 5 only adds cross-attention to BERT configured as a decoder, which also
makes its self-attention causal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class FusionLayer(nn.Module):
    """One fusion layer: self-attention over text tokens, cross-attention to image tokens,
    then a feed-forward block.

    The self-attention uses only the padding mask, never a causal mask, so every text token
    attends to every other one.

    :param width: text token width
    :param image_width: image token width (keys and values of the cross-attention)
    :param num_heads: attention heads; must divide ``width``
    :param ffn_dim: hidden size of the feed-forward block
    :param dropout: dropout probability in attention and feed-forward outputs
    :param pre_norm: True for pre-LayerNorm residual blocks, False for post-LayerNorm
        (BERT's layout)
    """

    def __init__(
        self,
        width: int,
        image_width: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        pre_norm: bool,
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(
            width, num_heads, dropout=dropout, batch_first=True, kdim=image_width, vdim=image_width
        )
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, width)
        )
        self.norms = nn.ModuleList([nn.LayerNorm(width, eps=1e-12) for _ in range(3)])
        self.dropout = nn.Dropout(dropout)

    def _residual(
        self, index: int, x: torch.Tensor, block: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(block(self.norms[index](x)))
        return self.norms[index](x + self.dropout(block(x)))

    def forward(
        self, text: torch.Tensor, padding_mask: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """Fuse ``text`` ``[B, L, width]`` with ``image`` ``[B, N, image_width]``.

        :param padding_mask: bool ``[B, L]``, True at padding positions
        """

        def self_attend(x: torch.Tensor) -> torch.Tensor:
            return self.self_attn(x, x, x, key_padding_mask=padding_mask, need_weights=False)[0]

        def cross_attend(x: torch.Tensor) -> torch.Tensor:
            return self.cross_attn(x, image, image, need_weights=False)[0]

        text = self._residual(0, text, self_attend)
        text = self._residual(1, text, cross_attend)
        return self._residual(2, text, self.ffn)


class FusionEncoder(nn.Module):
    """A stack of :class:`FusionLayer` that turns text tokens into image-conditioned tokens.

    :param width: text token width (the text encoder's hidden size)
    :param image_width: image token width
    :param num_layers: number of fusion layers (ALBEF uses 6)
    :param num_heads: attention heads; must divide ``width``
    :param ffn_dim: feed-forward hidden size; 0 means ``4 * width``
    :param dropout: dropout probability
    :param pre_norm: pre-LayerNorm blocks with a final LayerNorm when True, BERT's
        post-LayerNorm blocks when False
    """

    def __init__(
        self,
        width: int,
        image_width: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int = 0,
        dropout: float = 0.0,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        ffn_dim = ffn_dim or 4 * width
        self.layers = nn.ModuleList(
            FusionLayer(width, image_width, num_heads, ffn_dim, dropout, pre_norm)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(width, eps=1e-12) if pre_norm else nn.Identity()

    def forward(
        self, text: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """Return fused text tokens ``[B, L, width]``.

        :param text: text encoder output ``[B, L, width]``
        :param attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding
        :param image: image tokens ``[B, N, image_width]``
        """
        padding_mask = attention_mask == 0
        for layer in self.layers:
            text = layer(text, padding_mask, image)
        return self.final_norm(text)
