"""Prediction heads on the fused text tokens."""

from __future__ import annotations

import torch
from torch import nn


class MLMHead(nn.Module):
    """BERT's masked-language-modelling head: dense, GELU, LayerNorm, then a vocabulary
    decoder whose weight is the text encoder's word-embedding matrix.

    :param width: token width
    :param word_embeddings: the text encoder's input embeddings ``[V, width]``, shared
        with the decoder
    """

    def __init__(self, width: int, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12)
        )
        vocab_size = word_embeddings.weight.shape[0]
        self.decoder = nn.Linear(width, vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return vocabulary logits ``[..., V]`` for tokens ``[..., width]``."""
        return self.decoder(self.transform(hidden)) + self.bias


def init_bert_style(module: nn.Module) -> None:
    """Initialise Linear and LayerNorm modules as BERT does (normal std 0.02, zero bias)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
