"""Per-caption cache of the frozen lower layers of a BERT-style text encoder.

When the embeddings and the lowest layers of the text tower are frozen, their output for a
caption never changes, so it is computed once and kept. A training step then runs only the
trainable top layers on the captions it has seen before. In the ``tiny`` ALBEF preset
(MiniLM with 5 of 6 layers frozen) this removes about a fifth of a training step.

Masked captions (MLM) differ at every step and are not kept, except for the last batch: the
reward proxy evaluates the same masked batch again right after the update.

Frozen layers always run without dropout here, as in evaluation. The cache is emptied when
the model loads a state dict or changes device.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

logger = logging.getLogger(__name__)

# Captions kept at most. MiniLM's output of a 15-token caption takes about 23 kB.
DEFAULT_MAX_ROWS = 100_000


class FrozenPrefixCache:
    """Run a BERT-style encoder whose embeddings and lowest ``frozen_layers`` layers are
    frozen, caching the frozen part's output per caption.

    This is a plain object, not a module: it has no parameters and adds nothing to the
    state dict of the framework that owns ``encoder``.

    :param encoder: a ``BertModel``-like module with ``embeddings``, ``encoder.layer`` and
        ``config``
    :param frozen_layers: how many of the lowest layers are frozen (at least 1)
    :param max_rows: captions kept at most; the least recently used go first
    """

    def __init__(self, encoder: nn.Module, frozen_layers: int, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.encoder = encoder
        self.frozen_layers = frozen_layers
        self.max_rows = max_rows
        self._rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._last_batch: tuple[bytes, torch.Tensor] | None = None
        self._device: torch.device | None = None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def supports(encoder: nn.Module) -> bool:
        """Return whether ``encoder`` has BERT's module layout, which this cache needs."""
        stack = getattr(encoder, "encoder", None)
        return hasattr(encoder, "embeddings") and isinstance(getattr(stack, "layer", None), nn.ModuleList)

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Forget every cached caption."""
        self._rows.clear()
        self._last_batch = None

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, remember: bool = True) -> torch.Tensor:
        """Return the encoder's last hidden state ``[B, L, H]``.

        :param input_ids: right-padded token ids ``[B, L]``
        :param attention_mask: 1 on tokens, 0 on padding ``[B, L]``
        :param remember: keep each caption's frozen output for later calls; False keeps only
            this batch's, until the next call with False (for masked captions)
        """
        self._check_device(input_ids.device)
        if remember and _is_right_padded(attention_mask):
            hidden = self._cached_rows(input_ids, attention_mask)
        else:
            hidden = self._cached_batch(input_ids, attention_mask)
        return self._top_layers(hidden, attention_mask)

    def fill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int = 256) -> None:
        """Cache the captions of ``input_ids``, ``chunk_size`` at a time in order of length.

        A run calls this on its training captions at start and again after a resume, so
        both compute every caption within the same batch and get the same bits.
        """
        self._check_device(input_ids.device)
        if input_ids.shape[0] > self.max_rows:
            # NOTE: past the limit captions are cached as steps meet them, so a resumed run
            # may compute some in other batches than the first run did, and differ in the last bits.
            logger.info("%d captions exceed the text cache's %d rows; caching them as steps use them",
                        input_ids.shape[0], self.max_rows)
            return
        if not _is_right_padded(attention_mask):
            return
        order = torch.argsort(attention_mask.sum(dim=1), stable=True)
        for start in range(0, input_ids.shape[0], chunk_size):
            chunk = order[start:start + chunk_size]
            width = max(int(attention_mask[chunk].sum(dim=1).max()), 1)
            self._cached_rows(input_ids[chunk, :width], attention_mask[chunk, :width])

    # ---- internals ---------------------------------------------------------------------

    def _check_device(self, device: torch.device) -> None:
        if device != self._device:
            self.clear()
            self._device = device

    def _cached_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(dim=1).tolist()
        ids_cpu = input_ids.cpu()
        keys = [ids_cpu[row, :length].numpy().tobytes() for row, length in enumerate(lengths)]
        missing = [row for row, key in enumerate(keys) if key not in self._rows]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            index = torch.tensor(missing, device=input_ids.device)
            width = max(lengths[row] for row in missing)
            computed = self._frozen_layers(input_ids[index, :width], attention_mask[index, :width])
            for position, row in enumerate(missing):
                self._rows[keys[row]] = computed[position, :lengths[row]]
        hidden = self._rows[keys[0]].new_zeros(len(keys), input_ids.shape[1], self._rows[keys[0]].shape[-1])
        for row, key in enumerate(keys):
            cached = self._rows[key]
            self._rows.move_to_end(key)
            hidden[row, :cached.shape[0]] = cached
        while len(self._rows) > self.max_rows:
            self._rows.popitem(last=False)
        return hidden

    def _cached_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        key = input_ids.cpu().numpy().tobytes() + attention_mask.cpu().numpy().tobytes()
        if self._last_batch is not None and self._last_batch[0] == key:
            self.hits += input_ids.shape[0]
            return self._last_batch[1]
        self.misses += input_ids.shape[0]
        hidden = self._frozen_layers(input_ids, attention_mask)
        self._last_batch = (key, hidden)
        return hidden

    def _frozen_layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        layers = self.encoder.encoder.layer[: self.frozen_layers]
        modes = [(module, module.training) for module in (self.encoder.embeddings, *layers)]
        try:
            with torch.no_grad():
                for module, _ in modes:
                    module.eval()
                hidden = self.encoder.embeddings(input_ids=input_ids)
                mask = self._mask(hidden, attention_mask)
                for layer in layers:
                    hidden = layer(hidden, mask)
        finally:
            for module, training in modes:
                module.train(training)
        return hidden.float()

    def _top_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = self._mask(hidden, attention_mask)
        for layer in self.encoder.encoder.layer[self.frozen_layers:]:
            hidden = layer(hidden, mask)
        return hidden

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return create_bidirectional_mask(
            config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
        )


def _is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Return whether every row of ``attention_mask`` is ones followed by zeros."""
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def frozen_prefix_cache(owner: nn.Module, encoder: nn.Module, frozen_layers: int) -> FrozenPrefixCache | None:
    """Return a cache for ``encoder`` when its lowest layers are frozen, else None.

    The cache empties itself whenever ``owner`` loads a state dict.
    """
    if frozen_layers < 1 or not FrozenPrefixCache.supports(encoder):
        return None
    cache = FrozenPrefixCache(encoder, frozen_layers)
    owner.register_load_state_dict_post_hook(lambda module, incompatible_keys: cache.clear())
    return cache
