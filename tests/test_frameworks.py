"""Tests of the BLIP-2 and SigLIP frameworks: their losses, the Q-Former masks, one training
step each, and short command-line runs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from experiments.cli import main
from falcon_rl.config import TrainConfig
from falcon_rl.evaluation import evaluate_retrieval, retrieval_metrics
from falcon_rl.models import ModelError, TextBatch, build_framework, list_presets
from falcon_rl.models.blip2 import BLIP2Config
from falcon_rl.models.factory import load_preset
from falcon_rl.models.losses import (
    IGNORE_INDEX,
    causal_lm_labels,
    itc_loss,
    itc_loss_from_logits,
    itg_loss,
    max_query_similarity,
    sigmoid_loss,
)
from falcon_rl.models.pretrained import OFFLINE_MINILM, resolve_name_or_path
from falcon_rl.models.qformer import qformer_attention_mask
from falcon_rl.models.siglip import SigLIPConfig
from falcon_rl.training import TrainingRun

CLS, SEP = 101, 102
FAST = ["--preset", "test", "--batch-size", "16", "--search-space", "128", "--top-k", "8", "--steps", "3",
        "--eval-every", "0", "--no-progress", "--warmup-steps", "0"]


def make_text(batch_size: int, length: int = 10, seed: int = 0) -> TextBatch:
    """Random captions of varying length: [CLS] words [SEP] then padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(batch_size, length, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    for row in range(batch_size):
        words = 2 + row % (length - 3)
        input_ids[row, 0] = CLS
        input_ids[row, 1 : words + 1] = torch.randint(1000, 5000, (words,), generator=generator)
        input_ids[row, words + 1] = SEP
        attention_mask[row, : words + 2] = 1
    return TextBatch(input_ids, attention_mask)


def make_images(batch_size: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)


def softplus(x: float) -> float:
    """-log sigmoid(-x), written out for hand computations."""
    return math.log1p(math.exp(x))


@pytest.fixture(scope="module")
def blip2():
    torch.manual_seed(0)
    return build_framework("blip2", "test")


@pytest.fixture(scope="module")
def siglip():
    torch.manual_seed(0)
    return build_framework("siglip", "test")


# ---- sigmoid loss ------------------------------------------------------------------------


def test_sigmoid_loss_matches_hand_value():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # t = 2, b = -1: logits [[1, 0.2], [-1, 0.6]]; labels +1 on the diagonal, -1 elsewhere.
    loss = sigmoid_loss(image, text, torch.tensor([0, 1]), math.log(2.0), -1.0)
    expected = (softplus(-1.0) + softplus(0.2) + softplus(-1.0) + softplus(-0.6)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_sigmoid_loss_shared_image_is_positive():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # t = 1, b = 0: logits [[1, 0], [1, 0]], and all four pairs are positives.
    loss = sigmoid_loss(image, text, torch.tensor([7, 7]), 0.0, 0.0)
    expected = (2 * softplus(-1.0) + 2 * softplus(0.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_sigmoid_loss_gradient_reaches_scale_and_bias():
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    embed = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    sigmoid_loss(embed, embed, torch.arange(4), scale, bias).backward()
    assert scale.grad is not None
    assert bias.grad is not None


def test_sigmoid_loss_rejects_shape_mismatch():
    with pytest.raises(ModelError):
        sigmoid_loss(torch.zeros(2, 3), torch.zeros(3, 3), torch.arange(2), 0.0, 0.0)


# ---- BLIP-2 ITC and ITG losses -------------------------------------------------------------


def test_max_query_similarity_matches_hand_value():
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
    text = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    # Image 1's queries score 0.6 and -0.6 on caption 0, and -0.8 and 0 on caption 1.
    expected = torch.tensor([[1.0, 0.0], [0.6, 0.0]])
    assert torch.allclose(max_query_similarity(queries, text), expected)


def test_blip2_itc_matches_hand_value():
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
    text = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    # Similarities [[1, 0], [0.6, 0]] at temperature 0.5 give logits [[2, 0], [1.2, 0]].
    logits = max_query_similarity(queries, text) / 0.5
    i2t = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (math.exp(1.2) + 1))) / 2
    t2i = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(1 / 2)) / 2
    loss = itc_loss_from_logits(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_itc_from_logits_agrees_with_itc_loss():
    generator = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(5, 4, generator=generator), dim=-1)
    text = F.normalize(torch.randn(5, 4, generator=generator), dim=-1)
    image_ids = torch.tensor([0, 0, 1, 2, 2])
    expected = itc_loss(image, text, image_ids, 0.1)
    assert itc_loss_from_logits(image @ text.t() / 0.1, image_ids).item() == pytest.approx(expected.item())


def test_causal_lm_labels_shift_and_skip_padding():
    input_ids = torch.tensor([[CLS, 5, 6, SEP, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0]])
    expected = torch.tensor([[5, 6, SEP, IGNORE_INDEX, IGNORE_INDEX]])
    assert torch.equal(causal_lm_labels(input_ids, attention_mask), expected)


def test_itg_loss_matches_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0], [9.0, 9.0]])
    labels = torch.tensor([1, 1, IGNORE_INDEX])
    expected = (-math.log(3 / 4) - math.log(1 / 5)) / 2
    assert itg_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_itg_loss_label_smoothing_matches_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    labels = torch.tensor([1])
    # (1 - e) * (-log p_target) + e * mean over the vocabulary of -log p.
    expected = 0.9 * -math.log(3 / 4) + 0.1 * (-math.log(1 / 4) - math.log(3 / 4)) / 2
    assert itg_loss(logits, labels, label_smoothing=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_itg_loss_without_targets_is_zero():
    logits = torch.zeros(2, 3, requires_grad=True)
    assert itg_loss(logits, torch.full((2,), IGNORE_INDEX)).item() == 0.0


# ---- Q-Former attention masks ---------------------------------------------------------------

QUERIES = 3
TEXT_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_unimodal_mask_queries_never_see_text():
    mask = qformer_attention_mask(QUERIES, TEXT_MASK, "unimodal")
    assert not mask[:, :QUERIES, QUERIES:].any()


def test_unimodal_mask_text_never_sees_queries():
    mask = qformer_attention_mask(QUERIES, TEXT_MASK, "unimodal")
    assert not mask[:, QUERIES:, :QUERIES].any()


def test_unimodal_mask_text_sees_real_text():
    mask = qformer_attention_mask(QUERIES, TEXT_MASK, "unimodal")
    assert torch.equal(mask[:, QUERIES:, QUERIES:], TEXT_MASK.bool()[:, None, :].expand(2, 4, 4))


def test_bidirectional_mask_allows_all_real_keys():
    mask = qformer_attention_mask(QUERIES, TEXT_MASK, "bidirectional")
    real = torch.cat([torch.ones(2, QUERIES, dtype=torch.bool), TEXT_MASK.bool()], dim=1)
    assert torch.equal(mask, real[:, None, :].expand(2, 7, 7))


def test_causal_mask_queries_never_see_text():
    mask = qformer_attention_mask(QUERIES, TEXT_MASK, "causal")
    assert not mask[:, :QUERIES, QUERIES:].any()


def test_causal_mask_text_sees_every_query():
    mask = qformer_attention_mask(QUERIES, TEXT_MASK, "causal")
    assert mask[:, QUERIES:, :QUERIES].all()


def test_causal_mask_text_sees_only_earlier_text():
    mask = qformer_attention_mask(QUERIES, TEXT_MASK, "causal")
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    expected = causal[None] & TEXT_MASK.bool()[:, None, :]
    assert torch.equal(mask[:, QUERIES:, QUERIES:], expected)


def test_mask_rejects_unknown_mode():
    with pytest.raises(ModelError):
        qformer_attention_mask(QUERIES, TEXT_MASK, "full")


def test_qformer_unimodal_queries_ignore_text(blip2):
    qformer = blip2.qformer
    image = torch.randn(2, 5, blip2.image_encoder.width)
    first, second = make_text(2, seed=0), make_text(2, seed=1)
    with torch.no_grad():
        alone = qformer(image, None, None, "unimodal")
        with_first = qformer(image, first.input_ids, first.attention_mask, "unimodal")
        with_second = qformer(image, second.input_ids, second.attention_mask, "unimodal")
    queries = qformer.num_queries
    assert torch.allclose(with_first[:, :queries], alone, atol=1e-5)
    assert torch.allclose(with_second[:, :queries], alone, atol=1e-5)


def test_qformer_unimodal_text_ignores_image(blip2):
    text = make_text(2)
    with torch.no_grad():
        alone = blip2.qformer(None, text.input_ids, text.attention_mask, "unimodal")
        joint = blip2.qformer(torch.randn(2, 5, blip2.image_encoder.width), text.input_ids,
                              text.attention_mask, "unimodal")
    assert torch.allclose(joint[:, blip2.qformer.num_queries:], alone, atol=1e-5)


def test_qformer_causal_text_ignores_later_tokens(blip2):
    image = torch.randn(1, 5, blip2.image_encoder.width)
    text = make_text(1, length=8)
    changed = text.input_ids.clone()
    changed[0, 4] = 4321
    with torch.no_grad():
        before = blip2.qformer(image, text.input_ids, text.attention_mask, "causal")
        after = blip2.qformer(image, changed, text.attention_mask, "causal")
    start = blip2.qformer.num_queries
    assert torch.allclose(before[:, start:start + 4], after[:, start:start + 4], atol=1e-5)


def test_qformer_causal_text_sees_image(blip2):
    text = make_text(1, length=8)
    with torch.no_grad():
        first = blip2.qformer(torch.randn(1, 5, blip2.image_encoder.width), text.input_ids,
                              text.attention_mask, "causal")
        second = blip2.qformer(torch.randn(1, 5, blip2.image_encoder.width), text.input_ids,
                               text.attention_mask, "causal")
    start = blip2.qformer.num_queries
    assert not torch.allclose(first[:, start:], second[:, start:])


# ---- Q-Former initialised from MiniLM --------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_blip2():
    torch.manual_seed(0)
    return build_framework("blip2", "test", qformer_pretrained=OFFLINE_MINILM, qformer_layers=1)


@pytest.fixture(scope="module")
def minilm_tensors() -> dict[str, torch.Tensor]:
    path = Path(resolve_name_or_path(OFFLINE_MINILM)) / "model.safetensors"
    names = ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
             "encoder.layer.0.output.dense.weight")
    with safe_open(str(path), "pt") as checkpoint:
        return {name: checkpoint.get_tensor(name) for name in names}


def test_qformer_word_embeddings_from_minilm(minilm_blip2, minilm_tensors):
    expected = minilm_tensors["embeddings.word_embeddings.weight"]
    assert torch.equal(minilm_blip2.qformer.word_embeddings.weight[: expected.shape[0]], expected)


def test_qformer_self_attention_from_minilm(minilm_blip2, minilm_tensors):
    weight = minilm_blip2.qformer.layers[0].self_attention.query.weight
    assert torch.equal(weight, minilm_tensors["encoder.layer.0.attention.self.query.weight"])


def test_qformer_query_ffn_starts_as_text_ffn(minilm_blip2, minilm_tensors):
    weight = minilm_blip2.qformer.layers[0].query_ffn.output.weight
    assert torch.equal(weight, minilm_tensors["encoder.layer.0.output.dense.weight"])


def test_qformer_adds_decoder_start_row(minilm_blip2, minilm_tensors):
    vocab_size = minilm_tensors["embeddings.word_embeddings.weight"].shape[0]
    assert minilm_blip2.qformer.word_embeddings.num_embeddings == vocab_size + 1


def test_qformer_layers_beyond_checkpoint_raise():
    with pytest.raises(ModelError, match="qformer_layers"):
        build_framework("blip2", "test", qformer_pretrained=OFFLINE_MINILM, qformer_layers=7)


# ---- BLIP-2 end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip2_step():
    torch.manual_seed(0)
    framework = build_framework("blip2", "test")
    images, text = framework.preprocess_images(make_images(6)), make_text(6)
    image_ids = torch.tensor([0, 0, 1, 2, 3, 4])
    output = framework.training_step(images, text, image_ids, mask_seed=3)
    output.loss.backward()
    return framework, images, text, image_ids, output


def test_blip2_step_reports_three_losses(blip2_step):
    output = blip2_step[4]
    assert sorted(output.losses) == ["itc", "itg", "itm"]


def test_blip2_step_losses_are_finite(blip2_step):
    output = blip2_step[4]
    assert all(math.isfinite(value.item()) for value in output.losses.values())


def test_blip2_step_embeddings_are_normalised(blip2_step):
    output = blip2_step[4]
    norms = torch.cat([output.image_embed, output.text_embed]).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_blip2_step_trains_qformer(blip2_step):
    framework = blip2_step[0]
    assert framework.qformer.query_tokens.grad is not None


def test_blip2_step_keeps_image_encoder_frozen(blip2_step):
    framework = blip2_step[0]
    assert all(parameter.grad is None for parameter in framework.image_encoder.parameters())


def test_blip2_image_encoder_stays_in_eval_mode(blip2):
    blip2.train()
    assert not blip2.image_encoder.training


def test_blip2_embed_images_matches_step(blip2_step):
    framework, images, _, _, output = blip2_step
    with torch.no_grad():
        embedded = framework.embed_images(images)
    assert torch.allclose(embedded, output.image_embed, atol=1e-5)


def test_blip2_retrieval_similarity_is_max_over_queries(blip2_step):
    framework, images, text, _, _ = blip2_step
    with torch.no_grad():
        queries = framework.retrieval_image_features(images)
        text_embed = framework.embed_texts(text)
        similarity = framework.retrieval_similarity(queries, text_embed)
    expected = torch.einsum("iqd,td->itq", queries, text_embed).max(dim=-1).values
    assert torch.allclose(similarity, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["itc", "itm", "itg"])
def test_blip2_proxy_loss_repeats(blip2_step, name):
    framework, images, text, image_ids, _ = blip2_step
    first = framework.proxy_loss(name, images, text, image_ids, mask_seed=3)
    second = framework.proxy_loss(name, images, text, image_ids, mask_seed=3)
    assert first.item() == second.item()


def test_blip2_proxy_loss_rejects_mlm(blip2_step):
    framework, images, text, image_ids, _ = blip2_step
    with pytest.raises(ModelError, match="itg"):
        framework.proxy_loss("mlm", images, text, image_ids, mask_seed=0)


def test_blip2_itm_match_prob_is_probability(blip2_step):
    framework, images, text, _, _ = blip2_step
    probabilities = framework.itm_match_prob(images, text)
    assert probabilities.shape == (6,)
    assert bool(((probabilities >= 0) & (probabilities <= 1)).all())


def test_blip2_same_seed_same_init():
    torch.manual_seed(5)
    first = build_framework("blip2", "test").state_dict()
    torch.manual_seed(5)
    second = build_framework("blip2", "test").state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_blip2_zero_weight_skips_loss():
    torch.manual_seed(0)
    framework = build_framework("blip2", "test", itg_weight=0.0)
    output = framework.training_step(make_images(4), make_text(4), torch.arange(4), mask_seed=0)
    assert "itg" not in output.losses


# ---- SigLIP end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def siglip_step():
    torch.manual_seed(0)
    framework = build_framework("siglip", "test")
    images, text = framework.preprocess_images(make_images(6)), make_text(6)
    image_ids = torch.tensor([0, 0, 1, 2, 3, 4])
    output = framework.training_step(images, text, image_ids, mask_seed=0)
    output.loss.backward()
    return framework, images, text, image_ids, output


def test_siglip_step_reports_sigmoid_loss_as_itc(siglip_step):
    assert list(siglip_step[4].losses) == ["itc"]


def test_siglip_step_loss_matches_sigmoid_loss(siglip_step):
    framework, images, text, image_ids, output = siglip_step
    with torch.no_grad():
        expected = sigmoid_loss(framework.embed_images(images), framework.embed_texts(text), image_ids,
                                framework.logit_scale, framework.logit_bias)
    assert output.losses["itc"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_siglip_step_trains_scale_and_bias(siglip_step):
    framework = siglip_step[0]
    assert framework.logit_scale.grad is not None
    assert framework.logit_bias.grad is not None


def test_siglip_initial_scale_and_bias(siglip):
    assert siglip.logit_scale.exp().item() == pytest.approx(10.0)
    assert siglip.logit_bias.item() == pytest.approx(-4.0)


def test_siglip_step_embeddings_are_normalised(siglip_step):
    output = siglip_step[4]
    norms = torch.cat([output.image_embed, output.text_embed]).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_siglip_proxy_loss_equals_step_loss(siglip_step):
    framework, images, text, image_ids, output = siglip_step
    proxy = framework.proxy_loss("itc", images, text, image_ids, mask_seed=0)
    assert proxy.item() == pytest.approx(output.losses["itc"].item(), rel=1e-5)


def test_siglip_has_no_itm(siglip):
    with pytest.raises(ModelError, match="ITM"):
        siglip.itm_match_prob(make_images(2), make_text(2))


def test_siglip_proxy_loss_rejects_itm(siglip_step):
    framework, images, text, image_ids, _ = siglip_step
    with pytest.raises(ModelError, match="itc"):
        framework.proxy_loss("itm", images, text, image_ids, mask_seed=0)


# ---- pooling, evaluation, reward and resume -------------------------------------------------


@pytest.mark.parametrize("name", ["blip2", "siglip"])
def test_mean_pooled_text_ignores_padding(name):
    torch.manual_seed(0)
    framework = build_framework(name, "test", text_pooling="mean").eval()
    text = make_text(3, length=10)
    short = TextBatch(text.input_ids[:1, :6], text.attention_mask[:1, :6])
    with torch.no_grad():
        in_batch = framework.embed_texts(text)[:1]
        alone = framework.embed_texts(short)
    assert torch.allclose(in_batch, alone, atol=1e-5)


def test_blip2_evaluation_ranks_by_max_over_queries(blip2, embedded_splits):
    from falcon_rl.data import load_tokenizer, tokenize

    pairs = embedded_splits["test"]
    tokenizer = load_tokenizer(blip2.tokenizer_path)
    metrics = evaluate_retrieval(blip2, pairs, tokenizer, "cpu")
    blip2.eval()
    with torch.no_grad():
        queries = blip2.retrieval_image_features(blip2.preprocess_images(pairs.images))
        input_ids, attention_mask = tokenize(tokenizer, pairs.captions, blip2.max_text_length)
        text_embed = blip2.embed_texts(TextBatch(input_ids, attention_mask))
    expected = retrieval_metrics(max_query_similarity(queries, text_embed), pairs.image_ids, pairs.human_matches)
    blip2.train()
    assert metrics["rsum"] == pytest.approx(expected["rsum"])


def make_config(framework: str, **changes) -> TrainConfig:
    values = dict(framework=framework, preset="test", batch_size=16, search_space=128, top_k=8, steps=4,
                  eval_every=0, progress=False, scheduler="hardest", warmup_steps=0)
    values.update(changes)
    return TrainConfig(**values)


@pytest.mark.parametrize("framework, proxy", [("blip2", "itg"), ("siglip", "itc")])
def test_run_default_reward_is_proxy_gain(embedded_splits, framework, proxy):
    run = TrainingRun(make_config(framework), embedded_splits)
    run.reset(0)
    losses = run.step(np.ones(8, dtype=np.float32)).info["losses"]
    assert f"{proxy}_after" in losses


@pytest.mark.parametrize("framework", ["blip2", "siglip"])
def test_run_resume_repeats_next_step(embedded_splits, framework):
    hardness = np.ones(8, dtype=np.float32)
    reference = TrainingRun(make_config(framework), embedded_splits)
    reference.reset(0)
    for _ in range(2):
        reference.step(hardness)
    state = copy.deepcopy(reference.state_dict())
    expected = reference.step(hardness).info["losses"]

    restored = TrainingRun(make_config(framework), embedded_splits)
    restored.load_state_dict(state)
    losses = restored.step(hardness).info["losses"]
    assert losses == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("framework", ["blip2", "siglip"])
def test_anchor_vec_env_steps(embedded_splits, framework):
    from envs import AnchorMiningVecEnv

    env = AnchorMiningVecEnv(splits=embedded_splits, framework=framework, preset="test", batch_size=16,
                             search_space=128, top_k=8, steps=4, eval_every=0)
    env.reset()
    env.step_async(np.full(env.num_envs, 5))
    _, rewards, _, _ = env.step_wait()
    assert rewards.shape == (8,)


# ---- factory and presets ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["blip2", "siglip"])
def test_factory_lists_three_presets(name):
    assert list_presets(name) == ["base", "test", "tiny"]


@pytest.mark.parametrize("name, config_class", [("blip2", BLIP2Config), ("siglip", SigLIPConfig)])
@pytest.mark.parametrize("preset", ["base", "test", "tiny"])
def test_preset_is_valid(name, config_class, preset):
    config = config_class.from_dict(load_preset(name, preset), source=f"{name}-{preset}")
    assert config.max_text_length >= 2


@pytest.mark.parametrize("name", ["blip2", "siglip"])
def test_factory_rejects_unknown_setting(name):
    with pytest.raises(ModelError, match="fusion_layers"):
        build_framework(name, "test", fusion_layers=1)


def test_siglip_rejects_unknown_pooling():
    with pytest.raises(ModelError, match="text_pooling"):
        build_framework("siglip", "test", text_pooling="max")


# ---- command line --------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["blip2", "siglip"])
def test_cli_train_writes_metrics(tmp_path, framework):
    output = tmp_path / "run"
    code = main(["train", "--framework", framework, *FAST, "--scheduler-opt", "n_steps=2",
                 "--output", str(output)])
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["steps"] == 3


@pytest.mark.parametrize("option", [["--itm-rerank", "5"], ["--fn-filter", "itm:0.5"]])
def test_cli_siglip_rejects_itm_options(tmp_path, capsys, option):
    code = main(["train", "--framework", "siglip", *FAST, *option, "--output", str(tmp_path / "run")])
    assert code == 2
    assert "no ITM head" in capsys.readouterr().err
