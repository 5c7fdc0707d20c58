"""Tests of falcon_rl.models: losses, negative sampling, masking, encoders, ALBEF, factory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from falcon_rl.models import ModelError, TextBatch, build_framework, list_presets
from falcon_rl.models.fusion import FusionEncoder
from falcon_rl.models.image_encoders import TinyConvEncoder, build_image_encoder
from falcon_rl.models.losses import (
    IGNORE_INDEX,
    SpecialTokenIds,
    itc_loss,
    itm_loss,
    mask_tokens,
    mlm_loss,
    sample_itm_negatives,
)
from falcon_rl.models.pretrained import OFFLINE_MINILM, resolve_name_or_path
from falcon_rl.models.text_encoders import build_text_encoder, freeze_lower_layers

SPECIAL = SpecialTokenIds(pad=0, cls=101, sep=102, mask=103)
VOCAB_SIZE = 30522


def make_text(batch_size: int, length: int = 12, seed: int = 0) -> TextBatch:
    """Random captions of varying length: [CLS] words [SEP] then padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(batch_size, length, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    for row in range(batch_size):
        words = 3 + row % (length - 4)
        input_ids[row, 0] = SPECIAL.cls
        input_ids[row, 1 : words + 1] = torch.randint(1000, 5000, (words,), generator=generator)
        input_ids[row, words + 1] = SPECIAL.sep
        attention_mask[row, : words + 2] = 1
    return TextBatch(input_ids, attention_mask)


def make_images(batch_size: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run this module's tiny models on one thread: at these sizes, thread start-up and
    contention for shared cores cost more than the parallel work saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_model():
    """A `test`-preset ALBEF shared by tests that do not change its weights."""
    torch.manual_seed(0)
    return build_framework("albef", "test")


@pytest.fixture(scope="module")
def minilm_checkpoint() -> dict[str, torch.Tensor]:
    path = Path(resolve_name_or_path(OFFLINE_MINILM)) / "model.safetensors"
    names = ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight")
    with safe_open(str(path), "pt") as checkpoint:
        return {name: checkpoint.get_tensor(name) for name in names}


# ---- ITC -------------------------------------------------------------------------------


def test_itc_loss_shared_image_positive_matches_hand_value():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    image_ids = torch.tensor([0, 0, 1])
    e = math.e
    # Similarities [[1,0,0],[1,0,0],[0,1,1]]; pairs 0 and 1 share an image, so rows 0 and 1
    # have the target [0.5, 0.5, 0] in both directions and row 2 has [0, 0, 1].
    image_to_text = (2 * (math.log(e + 2) - 0.5) + math.log(1 + 2 * e) - 1) / 3
    text_to_image = (math.log(2 * e + 1) - 1 + 2 * math.log(2 + e) - 1) / 3
    expected = torch.tensor((image_to_text + text_to_image) / 2)

    loss = itc_loss(image, text, image_ids, temperature=1.0)

    torch.testing.assert_close(loss, expected)


def test_itc_loss_temperature_scales_logits():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = torch.tensor(math.log(1 + math.exp(-10.0)))

    loss = itc_loss(image, text, torch.tensor([0, 1]), temperature=torch.tensor(0.1))

    torch.testing.assert_close(loss, expected)


def test_itc_loss_bfloat16_inputs_give_float32():
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).bfloat16()
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).bfloat16()

    loss = itc_loss(image, text, torch.arange(4), temperature=0.07)

    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


def test_itc_loss_shape_mismatch_raises():
    with pytest.raises(ModelError, match="itc_loss"):
        itc_loss(torch.randn(3, 2), torch.randn(2, 2), torch.arange(3), 0.07)


# ---- ITM and MLM losses ------------------------------------------------------------------


def test_itm_loss_matches_hand_value():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    expected = torch.tensor((math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2)

    torch.testing.assert_close(itm_loss(logits, labels), expected)


def test_itm_loss_empty_batch_is_zero():
    logits = torch.zeros(0, 2, requires_grad=True)

    loss = itm_loss(logits, torch.zeros(0, dtype=torch.long))

    assert loss.item() == 0.0
    assert loss.requires_grad


def test_mlm_loss_skips_ignored_labels():
    logits = torch.tensor([[0.0, 0.0, 2.0], [5.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([2, IGNORE_INDEX, 0])
    row0 = math.log(2 + math.exp(2.0)) - 2.0
    row2 = math.log(2 + math.e) - 1.0
    expected = torch.tensor((row0 + row2) / 2)

    torch.testing.assert_close(mlm_loss(logits, labels), expected)


def test_mlm_loss_without_targets_is_zero():
    logits = torch.randn(2, 3, 5)
    labels = torch.full((2, 3), IGNORE_INDEX)

    assert mlm_loss(logits, labels).item() == 0.0


# ---- ITM hard negatives -------------------------------------------------------------------


def test_itm_negatives_batch_of_two_picks_other_pair():
    sim = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])

    negatives = sample_itm_negatives(sim, sim.t(), torch.tensor([3, 7]), torch.Generator().manual_seed(0))

    assert negatives.text_for_image.tolist() == [1, 0]
    assert negatives.image_for_text.tolist() == [1, 0]
    assert bool(negatives.image_has_negative.all())
    assert bool(negatives.text_has_negative.all())


def test_itm_negatives_all_same_image_has_none():
    sim = torch.randn(4, 4)

    negatives = sample_itm_negatives(sim, sim.t(), torch.zeros(4, dtype=torch.long))

    assert not bool(negatives.image_has_negative.any())
    assert not bool(negatives.text_has_negative.any())
    assert negatives.text_for_image.tolist() == [-1, -1, -1, -1]
    assert negatives.image_for_text.tolist() == [-1, -1, -1, -1]


def test_itm_negatives_never_share_image():
    image_ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        sim = torch.randn(8, 8) * 5
        negatives = sample_itm_negatives(sim, sim.t(), image_ids, generator)
        assert not bool((image_ids[negatives.text_for_image] == image_ids).any())
        assert not bool((image_ids[negatives.image_for_text] == image_ids).any())


def test_itm_negatives_prefer_similar_pairs():
    # Image 0 is far more similar to caption 2 than to caption 1.
    sim = torch.tensor([[0.0, -20.0, 20.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)

    picks = [sample_itm_negatives(sim, sim.t(), torch.arange(3), generator).text_for_image[0].item()
             for _ in range(20)]

    assert picks == [2] * 20


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_itm_negatives_half_precision_inputs(dtype):
    # 1e4 / 0.07 overflows float16 to inf, and a NaN row stands for a diverged model.
    sim = (torch.randn(6, 6) * 1e4 / 0.07).to(dtype)
    sim[1] = float("nan")
    image_ids = torch.tensor([0, 0, 1, 2, 3, 4])

    negatives = sample_itm_negatives(sim, sim.t(), image_ids, torch.Generator().manual_seed(1))

    assert bool(negatives.image_has_negative.all())
    assert bool(negatives.text_has_negative.all())
    assert not bool((image_ids[negatives.text_for_image] == image_ids).any())
    assert not bool((image_ids[negatives.image_for_text] == image_ids).any())


def test_itm_negatives_same_seed_same_draw():
    sim = torch.randn(10, 10)
    image_ids = torch.arange(10) // 2

    first = sample_itm_negatives(sim, sim.t(), image_ids, torch.Generator().manual_seed(4))
    second = sample_itm_negatives(sim, sim.t(), image_ids, torch.Generator().manual_seed(4))

    assert torch.equal(first.text_for_image, second.text_for_image)
    assert torch.equal(first.image_for_text, second.image_for_text)


# ---- MLM masking ----------------------------------------------------------------------------


def test_mask_tokens_never_masks_special_or_padding():
    text = make_text(16, length=20)
    special = torch.isin(text.input_ids, SPECIAL.as_tensor(torch.device("cpu")))
    protected = special | (text.attention_mask == 0)

    masked_ids, labels = mask_tokens(
        text.input_ids, text.attention_mask, SPECIAL, VOCAB_SIZE, 0.9, torch.Generator().manual_seed(0)
    )

    assert bool((labels[protected] == IGNORE_INDEX).all())
    assert torch.equal(masked_ids[protected], text.input_ids[protected])


def test_mask_tokens_zero_probability_masks_one_per_row():
    text = make_text(8)

    _, labels = mask_tokens(
        text.input_ids, text.attention_mask, SPECIAL, VOCAB_SIZE, 0.0, torch.Generator().manual_seed(0)
    )

    assert (labels != IGNORE_INDEX).sum(dim=1).tolist() == [1] * 8


def test_mask_tokens_labels_hold_original_ids():
    text = make_text(8)

    _, labels = mask_tokens(
        text.input_ids, text.attention_mask, SPECIAL, VOCAB_SIZE, 0.5, torch.Generator().manual_seed(0)
    )
    targets = labels != IGNORE_INDEX

    assert torch.equal(labels[targets], text.input_ids[targets])


def test_mask_tokens_row_of_specials_gets_no_target():
    input_ids = torch.tensor([[SPECIAL.cls, SPECIAL.sep, SPECIAL.pad]])
    attention_mask = torch.tensor([[1, 1, 0]])

    masked_ids, labels = mask_tokens(input_ids, attention_mask, SPECIAL, VOCAB_SIZE, 1.0)

    assert bool((labels == IGNORE_INDEX).all())
    assert torch.equal(masked_ids, input_ids)


def test_mask_tokens_80_10_10_split():
    input_ids = torch.full((200, 50), 2000)
    attention_mask = torch.ones_like(input_ids)

    masked_ids, _ = mask_tokens(
        input_ids, attention_mask, SPECIAL, VOCAB_SIZE, 1.0, torch.Generator().manual_seed(0)
    )
    share_mask = (masked_ids == SPECIAL.mask).float().mean().item()
    share_kept = (masked_ids == 2000).float().mean().item()

    assert share_mask == pytest.approx(0.8, abs=0.02)
    assert share_kept == pytest.approx(0.1, abs=0.02)


def test_mask_tokens_same_seed_same_mask():
    text = make_text(8)
    args = (text.input_ids, text.attention_mask, SPECIAL, VOCAB_SIZE, 0.3)

    first = mask_tokens(*args, torch.Generator().manual_seed(9))
    second = mask_tokens(*args, torch.Generator().manual_seed(9))

    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


def test_mask_tokens_invalid_probability_raises():
    text = make_text(2)
    with pytest.raises(ModelError, match="probability"):
        mask_tokens(text.input_ids, text.attention_mask, SPECIAL, VOCAB_SIZE, 1.5)


# ---- fusion encoder -------------------------------------------------------------------------


@pytest.mark.parametrize("pre_norm", [False, True])
def test_fusion_later_token_changes_earlier_output(pre_norm):
    torch.manual_seed(0)
    fusion = FusionEncoder(width=16, image_width=8, num_layers=2, num_heads=2, pre_norm=pre_norm).eval()
    text = torch.randn(1, 5, 16)
    image = torch.randn(1, 3, 8)
    attention_mask = torch.ones(1, 5, dtype=torch.long)
    changed = text.clone()
    changed[0, 4] = torch.randn(16)

    before = fusion(text, attention_mask, image)
    after = fusion(changed, attention_mask, image)

    assert not torch.allclose(before[0, 0], after[0, 0])


def test_fusion_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    fusion = FusionEncoder(width=16, image_width=8, num_layers=2, num_heads=2).eval()
    text = torch.randn(1, 5, 16)
    image = torch.randn(1, 3, 8)
    attention_mask = torch.tensor([[1, 1, 1, 0, 0]])
    changed = text.clone()
    changed[0, 3:] = torch.randn(2, 16)

    before = fusion(text, attention_mask, image)
    after = fusion(changed, attention_mask, image)

    torch.testing.assert_close(before[0, :3], after[0, :3])


def test_fusion_output_depends_on_image():
    torch.manual_seed(0)
    fusion = FusionEncoder(width=16, image_width=8, num_layers=1, num_heads=2).eval()
    text = torch.randn(2, 4, 16)
    attention_mask = torch.ones(2, 4, dtype=torch.long)

    first = fusion(text, attention_mask, torch.randn(2, 3, 8))
    second = fusion(text, attention_mask, torch.randn(2, 3, 8))

    assert not torch.allclose(first, second)


# ---- image and text encoders ------------------------------------------------------------


def test_tiny_image_encoder_token_shape():
    encoder = TinyConvEncoder(image_size=32, width=64, num_stages=3)

    tokens = encoder(torch.randn(2, 3, 32, 32))

    assert tokens.shape == (2, 1 + 4 * 4, 64)


def test_tiny_image_encoder_indivisible_size_raises():
    with pytest.raises(ModelError, match="image_size"):
        TinyConvEncoder(image_size=30, width=64, num_stages=3)


def test_vit_random_init_token_shape():
    encoder = build_image_encoder("vit", 32, None, width=32, num_layers=1, num_heads=2,
                                  patch_size=8, dropout=0.0)

    tokens = encoder(torch.randn(2, 3, 32, 32))

    assert tokens.shape == (2, 1 + 16, 32)


def test_vit_missing_folder_raises():
    with pytest.raises(ModelError, match="image_pretrained"):
        build_image_encoder("vit", 32, "/nonexistent/vit", width=32, num_layers=1, num_heads=2,
                            patch_size=8, dropout=0.0)


def test_unknown_image_encoder_raises():
    with pytest.raises(ModelError, match="allowed values: tiny, vit"):
        build_image_encoder("resnet", 32, None, 32, 1, 2, 8, 0.0)


def test_minilm_from_pretrained_matches_checkpoint(minilm_checkpoint):
    encoder = build_text_encoder(OFFLINE_MINILM, hidden_size=1, num_layers=1, num_heads=1, dropout=0.0)
    state = encoder.state_dict()

    assert encoder.config.hidden_size == 384
    assert encoder.config.num_hidden_layers == 6
    for name, tensor in minilm_checkpoint.items():
        assert torch.equal(state[name], tensor), name


def test_minilm_from_pretrained_output_shape():
    encoder = build_text_encoder(OFFLINE_MINILM, hidden_size=1, num_layers=1, num_heads=1, dropout=0.0)
    text = make_text(3)

    hidden = encoder(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state

    assert hidden.shape == (3, 12, 384)


def test_freeze_lower_layers_keeps_top_trainable():
    encoder = build_text_encoder(None, hidden_size=32, num_layers=3, num_heads=2, dropout=0.0)

    freeze_lower_layers(encoder, 2)

    assert not encoder.get_input_embeddings().weight.requires_grad
    assert not any(p.requires_grad for p in encoder.encoder.layer[1].parameters())
    assert all(p.requires_grad for p in encoder.encoder.layer[2].parameters())


def test_freeze_lower_layers_out_of_range_raises():
    encoder = build_text_encoder(None, hidden_size=32, num_layers=2, num_heads=2, dropout=0.0)
    with pytest.raises(ModelError, match="0 to 2"):
        freeze_lower_layers(encoder, 3)


# ---- factory --------------------------------------------------------------------------------


def test_list_presets_albef():
    assert list_presets("albef") == ["base", "test", "tiny"]


def test_build_framework_unknown_name_raises():
    with pytest.raises(ModelError, match="allowed values: albef"):
        build_framework("clip", "test")


def test_build_framework_unknown_preset_raises():
    with pytest.raises(ModelError, match="allowed values: base, test, tiny"):
        build_framework("albef", "huge")


def test_build_framework_unknown_override_raises():
    with pytest.raises(ModelError, match="fusion_depth.*allowed settings: image_encoder"):
        build_framework("albef", "test", fusion_depth=3)


def test_build_framework_invalid_value_raises():
    with pytest.raises(ModelError, match="fusion_norm='middle'.*allowed values: post, pre"):
        build_framework("albef", "test", fusion_norm="middle")


def test_build_framework_indivisible_fusion_heads_raises():
    with pytest.raises(ModelError, match="fusion_heads=3"):
        build_framework("albef", "test", fusion_heads=3)


def test_build_framework_base_missing_weights_folder_raises():
    with pytest.raises(ModelError, match="image_pretrained='/nonexistent/vit'"):
        build_framework("albef", "base", image_pretrained="/nonexistent/vit",
                        text_pretrained=OFFLINE_MINILM)


def test_build_framework_test_preset_attributes(test_model):
    assert test_model.name == "albef"
    assert test_model.image_size == 32
    assert test_model.max_text_length == 16
    assert test_model.embed_dim == 32
    assert Path(test_model.tokenizer_path).is_dir()


def test_build_framework_tiny_preset_loads_minilm(minilm_checkpoint):
    framework = build_framework("albef", "tiny")
    state = framework.text_encoder.state_dict()

    assert framework.image_size == 64
    assert framework.max_text_length == 32
    for name, tensor in minilm_checkpoint.items():
        assert torch.equal(state[name], tensor), name


# ---- ALBEF --------------------------------------------------------------------------------


def test_albef_mlm_decoder_tied_to_word_embeddings(test_model):
    decoder = test_model.mlm_head.decoder.weight
    assert decoder is test_model.text_encoder.get_input_embeddings().weight


def test_albef_preprocess_images_normalises_and_resizes(test_model):
    images = torch.full((2, 3, 48, 48), 255, dtype=torch.uint8)

    pixels = test_model.preprocess_images(images)
    expected_red = (1.0 - 0.485) / 0.229

    assert pixels.shape == (2, 3, 32, 32)
    assert pixels.dtype == torch.float32
    assert pixels[0, 0, 5, 5].item() == pytest.approx(expected_red, rel=1e-5)


def test_albef_preprocess_images_float_input_raises(test_model):
    with pytest.raises(ModelError, match="uint8"):
        test_model.preprocess_images(torch.zeros(1, 3, 32, 32))


def test_albef_training_step_finite_loss_and_grads():
    torch.manual_seed(0)
    framework = build_framework("albef", "test")
    image_ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5])

    output = framework.training_step(make_images(8), make_text(8), image_ids, mask_seed=1)
    output.loss.backward()
    grads = [p.grad for p in framework.parameters() if p.grad is not None]

    assert set(output.losses) == {"itc", "itm", "mlm"}
    assert torch.isfinite(output.loss)
    assert output.loss.item() < 20.0
    assert len(grads) > 0
    assert all(bool(torch.isfinite(grad).all()) for grad in grads)
    assert framework.temperature.grad is not None


def test_albef_training_step_embeddings_normalised(test_model):
    output = test_model.training_step(make_images(4), make_text(4), torch.arange(4), mask_seed=0)

    assert output.image_embed.shape == (4, 32)
    assert not output.image_embed.requires_grad
    torch.testing.assert_close(output.text_embed.norm(dim=1), torch.ones(4))


def test_albef_step_text_embed_is_unmasked(test_model):
    text = make_text(4)

    output = test_model.training_step(make_images(4), text, torch.arange(4), mask_seed=0)

    torch.testing.assert_close(output.text_embed, test_model.embed_texts(text).detach())


def test_albef_embed_texts_ignores_extra_padding(test_model):
    text = make_text(3, length=12)
    padded = TextBatch(
        torch.nn.functional.pad(text.input_ids, (0, 8)),
        torch.nn.functional.pad(text.attention_mask, (0, 8)),
    )

    torch.testing.assert_close(test_model.embed_texts(padded), test_model.embed_texts(text))


def test_albef_zero_weight_skips_loss_term():
    framework = build_framework("albef", "test", itm_weight=0.0)

    output = framework.training_step(make_images(4), make_text(4), torch.arange(4), mask_seed=0)

    assert set(output.losses) == {"itc", "mlm"}


def test_albef_all_same_image_batch_trains():
    framework = build_framework("albef", "test")

    output = framework.training_step(
        make_images(4), make_text(4), torch.zeros(4, dtype=torch.long), mask_seed=0
    )
    output.loss.backward()

    assert torch.isfinite(output.loss)


def test_albef_batch_of_two_trains():
    framework = build_framework("albef", "test")

    output = framework.training_step(make_images(2), make_text(2), torch.arange(2), mask_seed=0)

    assert torch.isfinite(output.loss)


def test_albef_temperature_clamped():
    framework = build_framework("albef", "test")
    with torch.no_grad():
        framework.temperature.fill_(5.0)

    framework.training_step(make_images(2), make_text(2), torch.arange(2), mask_seed=0)

    assert framework.temperature.item() == pytest.approx(0.5)


def test_albef_proxy_mlm_reproducible_across_update():
    torch.manual_seed(0)
    framework = build_framework("albef", "test")
    optimizer = torch.optim.AdamW(framework.parameters(), lr=1e-3)
    images, text, image_ids = make_images(8), make_text(8), torch.arange(8) // 2

    before = framework.proxy_loss("mlm", images, text, image_ids, mask_seed=5)
    before_again = framework.proxy_loss("mlm", images, text, image_ids, mask_seed=5)
    framework.training_step(images, text, image_ids, mask_seed=5).loss.backward()
    optimizer.step()
    after = framework.proxy_loss("mlm", images, text, image_ids, mask_seed=5)
    after_again = framework.proxy_loss("mlm", images, text, image_ids, mask_seed=5)

    assert torch.equal(before, before_again)
    assert torch.equal(after, after_again)
    assert after.item() < before.item()


def test_albef_proxy_mask_seed_changes_mlm(test_model):
    images, text, image_ids = make_images(8), make_text(8), torch.arange(8)

    first = test_model.proxy_loss("mlm", images, text, image_ids, mask_seed=1)
    second = test_model.proxy_loss("mlm", images, text, image_ids, mask_seed=2)

    assert first.item() != second.item()


@pytest.mark.parametrize("name", ["itc", "itm"])
def test_albef_proxy_loss_reproducible(test_model, name):
    images, text, image_ids = make_images(8), make_text(8), torch.arange(8) // 2

    first = test_model.proxy_loss(name, images, text, image_ids, mask_seed=3)
    second = test_model.proxy_loss(name, images, text, image_ids, mask_seed=3)

    assert torch.equal(first, second)
    assert not first.requires_grad


def test_albef_proxy_loss_unknown_name_raises(test_model):
    with pytest.raises(ModelError, match="allowed values: mlm, itc, itm"):
        test_model.proxy_loss("itg", make_images(2), make_text(2), torch.arange(2), mask_seed=0)


def test_albef_proxy_loss_restores_training_mode():
    framework = build_framework("albef", "test")
    framework.train()

    framework.proxy_loss("itc", make_images(2), make_text(2), torch.arange(2), mask_seed=0)

    assert framework.training
    assert framework.fusion.training


def test_albef_itm_match_prob_range(test_model):
    probabilities = test_model.itm_match_prob(make_images(3), make_text(3))

    assert probabilities.shape == (3,)
    assert probabilities.dtype == torch.float32
    assert bool(((probabilities >= 0) & (probabilities <= 1)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_albef_step_under_cpu_autocast(dtype):
    torch.manual_seed(0)
    framework = build_framework("albef", "test")
    image_ids = torch.tensor([0, 0, 1, 2])

    with torch.autocast("cpu", dtype=dtype):
        output = framework.training_step(make_images(4), make_text(4), image_ids, mask_seed=0)
    output.loss.backward()
    grads = [p.grad for p in framework.parameters() if p.grad is not None]

    assert output.loss.dtype == torch.float32
    assert torch.isfinite(output.loss)
    assert all(bool(torch.isfinite(grad).all()) for grad in grads)
    assert output.image_embed.dtype == torch.float32


def test_albef_text_frozen_layers_freezes_decoder():
    framework = build_framework("albef", "test", text_frozen_layers=1)

    assert not framework.mlm_head.decoder.weight.requires_grad
    assert framework.mlm_head.bias.requires_grad
