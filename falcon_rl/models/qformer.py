"""BLIP-2's Querying Transformer (Q-Former; Li et al., ICML 2023, arXiv 2301.12597).

A BERT-style encoder over one joint sequence: learned query tokens first, caption tokens
after them. Queries and text share the self-attention layers, and the attention mask
(:func:`qformer_attention_mask`) selects which positions attend to which. Only the queries cross-attend to
the frozen image encoder's features, and queries and text have separate feed-forward
blocks. The layers are written here so that the three attention masks are explicit and a
BERT-style checkpoint loads into them by parameter name.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from falcon_rl.models.base import ModelError
from falcon_rl.models.heads import init_bert_style

logger = logging.getLogger(__name__)

ATTENTION_MODES = ("unimodal", "bidirectional", "causal")
"""Self-attention masks of the three BLIP-2 objectives: ITC, ITM and ITG."""


def qformer_attention_mask(
    num_queries: int, text_attention_mask: torch.Tensor, mode: str
) -> torch.Tensor:
    """Build the self-attention mask of a ``[queries; text]`` sequence.

    * ``"unimodal"`` (ITC): queries attend only to queries, text only to text.
    * ``"bidirectional"`` (ITM): every position attends to every query and text token.
    * ``"causal"`` (ITG): queries attend only to queries; text token i attends to every
      query and to text tokens 0..i.

    Padding text tokens are never attended to. Every row keeps at least one allowed key as
    long as each caption has one real token (its [CLS]).

    :param num_queries: number of query tokens Q at the start of the sequence (may be 0)
    :param text_attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding (L may be 0)
    :param mode: ``"unimodal"``, ``"bidirectional"`` or ``"causal"``
    :return: bool ``[B, Q + L, Q + L]``, True where the row position may attend to the
        column position
    """
    if mode not in ATTENTION_MODES:
        raise ModelError(f"attention mode {mode!r} is unknown; allowed values: {', '.join(ATTENTION_MODES)}")
    batch_size, text_length = text_attention_mask.shape
    device = text_attention_mask.device
    length = num_queries + text_length
    position = torch.arange(length, device=device)
    is_query = position < num_queries

    if mode == "bidirectional":
        allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    elif mode == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]
    else:
        # Every query position precedes every text position, so "column <= row" lets text
        # see all queries and its own prefix.
        allowed = torch.where(is_query[:, None], is_query[None, :], position[None, :] <= position[:, None])

    query_keys = torch.ones(batch_size, num_queries, dtype=torch.bool, device=device)
    real_keys = torch.cat([query_keys, text_attention_mask.bool()], dim=1)
    return allowed[None] & real_keys[:, None, :]


class QFormerAttention(nn.Module):
    """Multi-head attention with BERT's post-LayerNorm residual block.

    :param width: token width
    :param num_heads: attention heads; must divide ``width``
    :param context_width: width of the keys' and values' source (``width`` for
        self-attention, the image feature width for cross-attention)
    :param dropout: dropout probability of the attention weights and the output
    """

    def __init__(self, width: int, num_heads: int, context_width: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(context_width, width)
        self.value = nn.Linear(context_width, width)
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, length, width = x.shape
        return x.view(batch_size, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend from ``hidden`` ``[B, N, width]`` to ``context`` ``[B, M, context_width]``.

        :param mask: bool ``[B, N, M]``, True where attention is allowed; None allows all
        """
        if hidden.shape[1] == 0:
            return hidden
        attention_mask = mask[:, None] if mask is not None else None
        attended = F.scaled_dot_product_attention(
            self._heads(self.query(hidden)), self._heads(self.key(context)),
            self._heads(self.value(context)), attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).reshape(hidden.shape)
        output = F.dropout(self.dense(attended), self.dropout, self.training)
        return self.norm(hidden + output)


class QFormerFeedForward(nn.Module):
    """BERT's feed-forward block: dense, GELU, dense, then a post-LayerNorm residual.

    :param width: token width
    :param ffn_dim: hidden size
    :param dropout: dropout probability of the output
    """

    def __init__(self, width: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.intermediate = nn.Linear(width, ffn_dim)
        self.output = nn.Linear(ffn_dim, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return ``hidden`` ``[..., width]`` after the block."""
        return self.norm(hidden + self.dropout(self.output(F.gelu(self.intermediate(hidden)))))


class QFormerLayer(nn.Module):
    """One Q-Former layer: shared self-attention, cross-attention for the queries only (in
    layers that have it), then separate feed-forward blocks for queries and text.

    :param width: token width
    :param num_heads: attention heads
    :param ffn_dim: feed-forward hidden size
    :param image_width: width of the image features
    :param has_cross_attention: whether the queries cross-attend to the image here
    :param dropout: dropout probability
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        ffn_dim: int,
        image_width: int,
        has_cross_attention: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.self_attention = QFormerAttention(width, num_heads, width, dropout)
        self.cross_attention = (
            QFormerAttention(width, num_heads, image_width, dropout) if has_cross_attention else None
        )
        self.text_ffn = QFormerFeedForward(width, ffn_dim, dropout)
        self.query_ffn = QFormerFeedForward(width, ffn_dim, dropout)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        num_queries: int,
        image: torch.Tensor | None,
    ) -> torch.Tensor:
        """Return the layer's output ``[B, Q + L, width]``.

        :param hidden: ``[B, Q + L, width]``, queries first
        :param mask: bool ``[B, Q + L, Q + L]`` from :func:`qformer_attention_mask`
        :param num_queries: Q
        :param image: image features ``[B, P, image_width]``; None only when Q is 0
        """
        hidden = self.self_attention(hidden, hidden, mask)
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        if self.cross_attention is not None and num_queries > 0:
            queries = self.cross_attention(queries, image)
        return torch.cat([self.query_ffn(queries), self.text_ffn(text)], dim=1)


class QFormer(nn.Module):
    """The Q-Former: query tokens, text embeddings and a stack of :class:`QFormerLayer`.

    Query tokens get no position embedding. Text tokens get word, position and BERT's
    token-type-0 embeddings. The embedding LayerNorm is applied to queries and text alike,
    as in BLIP-2.

    :param num_queries: number of learned query tokens (BLIP-2 uses 32)
    :param width: token width
    :param num_layers: layers
    :param num_heads: attention heads; must divide ``width``
    :param ffn_dim: feed-forward hidden size
    :param image_width: width of the image features
    :param cross_attention_every: layers 0, n, 2n, ... cross-attend to the image (BLIP-2
        uses 2)
    :param vocab_size: rows of the word embedding
    :param max_positions: rows of the position embedding, the longest caption in tokens
    :param dropout: dropout probability
    """

    def __init__(
        self,
        num_queries: int,
        width: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        image_width: int,
        cross_attention_every: int,
        vocab_size: int,
        max_positions: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if width % num_heads != 0:
            raise ModelError(
                f"qformer_heads={num_heads} does not divide the Q-Former width {width}; "
                f"allowed values: divisors of {width}"
            )

        self.num_queries = num_queries
        self.width = width
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, width))
        self.word_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type = nn.Parameter(torch.zeros(width))
        self.embedding_norm = nn.LayerNorm(width, eps=1e-12)
        self.embedding_dropout = nn.Dropout(dropout)

        self.layers = nn.ModuleList(
            QFormerLayer(width, num_heads, ffn_dim, image_width, index % cross_attention_every == 0, dropout)
            for index in range(num_layers)
        )

        self.apply(init_bert_style)
        # NOTE: BERT's N(0, 0.02) init leaves the image's share of a query state near 1% (two
        # small matrices in series), so a short run barely learns to read the image.
        # Xavier-uniform weights are about 4 times larger at the tiny preset's widths.
        for layer in self.layers:
            if layer.cross_attention is not None:
                attention = layer.cross_attention
                for linear in (attention.query, attention.key, attention.value, attention.dense):
                    nn.init.xavier_uniform_(linear.weight)
        nn.init.normal_(self.query_tokens, std=0.02)
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)

    def _embed(
        self, image: torch.Tensor | None, input_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        parts, num_queries = [], 0
        if image is not None:
            num_queries = self.num_queries
            parts.append(self.query_tokens.expand(image.shape[0], -1, -1))
        if input_ids is not None:
            if input_ids.shape[1] > self.position_embeddings.num_embeddings:
                raise ModelError(
                    f"captions of {input_ids.shape[1]} tokens exceed the Q-Former's "
                    f"{self.position_embeddings.num_embeddings} positions; raise max_text_length"
                )
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type
            parts.append(text)
        hidden = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.embedding_dropout(self.embedding_norm(hidden)), num_queries

    def forward(
        self,
        image: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        mode: str,
    ) -> torch.Tensor:
        """Encode queries (when ``image`` is given) followed by text (when ``input_ids`` is).

        :param image: image features ``[B, P, image_width]``; None runs text alone
        :param input_ids: int64 ``[B, L]``; None runs the queries alone
        :param attention_mask: ``[B, L]``, 1 for real tokens; required with ``input_ids``
        :param mode: ``"unimodal"``, ``"bidirectional"`` or ``"causal"``, see
            :func:`qformer_attention_mask`
        :return: ``[B, Q + L, width]``, queries first (Q is 0 without ``image``)
        """
        if image is None and input_ids is None:
            raise ModelError("QFormer.forward needs image features, input_ids or both")
        hidden, num_queries = self._embed(image, input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[0], hidden.shape[1] - num_queries,
                                        dtype=torch.long, device=hidden.device)
        mask = qformer_attention_mask(num_queries, attention_mask, mode)
        for layer in self.layers:
            hidden = layer(hidden, mask, num_queries, image)
        return hidden


def load_bert_weights(qformer: QFormer, bert: PreTrainedModel) -> None:
    """Initialise the Q-Former's text path from the lowest layers of a BERT-style encoder.

    The copy covers the word, position and token-type-0 embeddings, the embedding LayerNorm,
    and each layer's self-attention and feed-forward block. The query feed-forward block
    starts as a copy of the text one, as in BLIP-2. Query tokens, cross-attention and the
    embedding rows beyond the checkpoint's vocabulary keep their random initialisation.

    :param qformer: a Q-Former whose width, heads, feed-forward size and layer count fit
        in the checkpoint
    :param bert: a loaded ``BertModel`` (or one with the same parameter names, such as
        MiniLM)
    """
    state = bert.state_dict()
    config = bert.config
    expected = ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight")
    missing = [name for name in expected if name not in state]
    if missing:
        raise ModelError(
            f"qformer_pretrained={config.name_or_path!r} is not a BERT-style encoder: its weights "
            f"lack {', '.join(missing)}; use a BERT or MiniLM checkpoint"
        )
    checkpoint_layers = int(config.num_hidden_layers)
    if len(qformer.layers) > checkpoint_layers:
        raise ModelError(
            f"qformer_layers={len(qformer.layers)} exceeds the {checkpoint_layers} layers of "
            f"qformer_pretrained; allowed values: 1 to {checkpoint_layers}"
        )
    with torch.no_grad():
        vocab_size = state["embeddings.word_embeddings.weight"].shape[0]
        qformer.word_embeddings.weight[:vocab_size] = state["embeddings.word_embeddings.weight"]
        positions = qformer.position_embeddings.num_embeddings
        qformer.position_embeddings.weight.copy_(state["embeddings.position_embeddings.weight"][:positions])
        qformer.token_type.copy_(state["embeddings.token_type_embeddings.weight"][0])
        _copy_norm(qformer.embedding_norm, state, "embeddings.LayerNorm")
        for index, layer in enumerate(qformer.layers):
            _copy_layer(layer, state, f"encoder.layer.{index}")
    logger.info("initialised %d Q-Former layers from %s", len(qformer.layers), config.name_or_path or "a BERT checkpoint")


def _copy_linear(linear: nn.Linear, state: dict[str, torch.Tensor], prefix: str) -> None:
    linear.weight.copy_(state[f"{prefix}.weight"])
    linear.bias.copy_(state[f"{prefix}.bias"])


def _copy_norm(norm: nn.LayerNorm, state: dict[str, torch.Tensor], prefix: str) -> None:
    norm.weight.copy_(state[f"{prefix}.weight"])
    norm.bias.copy_(state[f"{prefix}.bias"])


def _copy_layer(layer: QFormerLayer, state: dict[str, torch.Tensor], prefix: str) -> None:
    attention = layer.self_attention
    for name in ("query", "key", "value"):
        _copy_linear(getattr(attention, name), state, f"{prefix}.attention.self.{name}")
    _copy_linear(attention.dense, state, f"{prefix}.attention.output.dense")
    _copy_norm(attention.norm, state, f"{prefix}.attention.output.LayerNorm")
    for ffn in (layer.text_ffn, layer.query_ffn):
        _copy_linear(ffn.intermediate, state, f"{prefix}.intermediate.dense")
        _copy_linear(ffn.output, state, f"{prefix}.output.dense")
        _copy_norm(ffn.norm, state, f"{prefix}.output.LayerNorm")
