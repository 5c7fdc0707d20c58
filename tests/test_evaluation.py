"""Tests of retrieval metrics, ITM re-ranking, retrieval evaluation and seed statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from falcon_rl.evaluation import (
    EvaluationError,
    chance_rsum,
    itm_rerank,
    mean_confidence_interval,
    paired_comparison,
    retrieval_metrics,
)

# Three images and six captions: image 0 owns captions 0-3, image 1 caption 4, image 2 caption 5.
CAPTION_IMAGE = np.array([0, 0, 0, 0, 1, 2])
SIM = np.array([
    [0.9, 0.1, 0.2, 0.3, 0.5, 0.4],
    [0.8, 0.7, 0.6, 0.5, 0.1, 0.4],
    [0.2, 0.6, 0.1, 0.3, 0.0, 0.5],
])
# People judged that caption 3 (image 0's) also describes image 1.
HUMAN_MATCHES = np.array([[1, 3]])


@pytest.fixture(scope="module")
def hand_metrics() -> dict:
    return retrieval_metrics(SIM, CAPTION_IMAGE, HUMAN_MATCHES)


# Image 0 finds caption 0 first; image 1's caption 4 is ranked 6th; image 2's caption 5 is 2nd.
@pytest.mark.parametrize("key, expected", [("i2t_r1", 100 / 3), ("i2t_r5", 200 / 3), ("i2t_r10", 100.0)])
def test_recall_i2t_hand_built(hand_metrics: dict, key: str, expected: float) -> None:
    assert hand_metrics[key] == pytest.approx(expected)


# Captions 0 and 5 rank their image first. Caption 3 ranks image 0 third, behind image 1 and
# image 2, which ties with it at 0.3.
@pytest.mark.parametrize("key, expected", [("t2i_r1", 100 / 3), ("t2i_r5", 100.0), ("t2i_r10", 100.0)])
def test_recall_t2i_hand_built(hand_metrics: dict, key: str, expected: float) -> None:
    assert hand_metrics[key] == pytest.approx(expected)


def test_rsum_hand_built(hand_metrics: dict) -> None:
    assert hand_metrics["rsum"] == pytest.approx(100 / 3 + 200 / 3 + 100 + 100 / 3 + 100 + 100)


def test_rsum_perfect_ranking() -> None:
    own = (CAPTION_IMAGE[None, :] == np.arange(3)[:, None]).astype(np.float32)
    metrics = retrieval_metrics(own, CAPTION_IMAGE, None)
    assert metrics["rsum"] == pytest.approx(600.0)


def test_recall_torch_input_matches_numpy(hand_metrics: dict) -> None:
    metrics = retrieval_metrics(torch.tensor(SIM, dtype=torch.float32), CAPTION_IMAGE, HUMAN_MATCHES)
    assert metrics["rsum"] == pytest.approx(hand_metrics["rsum"])


def test_ties_all_equal_scores_miss() -> None:
    # Every score is equal, so each correct item ranks after the incorrect ones.
    metrics = retrieval_metrics(np.ones((2, 2)), np.array([0, 1]), None)
    assert metrics["i2t_r1"] == 0.0
    assert metrics["t2i_r1"] == 0.0


def test_ties_pessimistic_single_tie() -> None:
    # Image 0's own caption 0 ties with caption 1 at the top, so it counts as ranked second.
    sim = np.array([[0.5, 0.5], [0.0, 1.0]])
    metrics = retrieval_metrics(sim, np.array([0, 1]), None)
    assert metrics["i2t_r1"] == pytest.approx(50.0)


def test_fn_metrics_none_without_judgments() -> None:
    metrics = retrieval_metrics(SIM, CAPTION_IMAGE, None)
    fn_keys = [key for key in metrics if key.startswith("fn_") or key.endswith("_map_r")]
    assert len(fn_keys) == 9
    assert all(metrics[key] is None for key in fn_keys)


def test_fn_metrics_empty_judgments_equal_standard() -> None:
    metrics = retrieval_metrics(SIM, CAPTION_IMAGE, np.zeros((0, 2), dtype=np.int64))
    assert metrics["fn_rsum"] == pytest.approx(metrics["rsum"])


# With (image 1, caption 3) a match: image 1 finds caption 3 at rank 4, and caption 3 finds
# image 1 first.
@pytest.mark.parametrize("key, expected", [
    ("fn_i2t_r1", 100 / 3),
    ("fn_i2t_r5", 100.0),
    ("fn_i2t_r10", 100.0),
    ("fn_t2i_r1", 50.0),
    ("fn_t2i_r5", 100.0),
    ("fn_t2i_r10", 100.0),
    ("fn_rsum", 100 / 3 + 100 + 100 + 50 + 100 + 100),
])
def test_fn_recall_one_human_match(hand_metrics: dict, key: str, expected: float) -> None:
    assert hand_metrics[key] == pytest.approx(expected)


def test_map_r_i2t_one_human_match(hand_metrics: dict) -> None:
    # Image 0 (R = 4) ranks captions 0, 4, 5, 3: AP = (1/1 + 2/4) / 4. Images 1 (R = 2) and 2
    # (R = 1) have no correct caption within their top R.
    assert hand_metrics["i2t_map_r"] == pytest.approx(100 * (1.5 / 4) / 3)


def test_map_r_t2i_one_human_match(hand_metrics: dict) -> None:
    # Captions 0 and 5 score AP 1. Caption 3 (R = 2) ranks image 1, then image 2 ahead of the
    # tied image 0: AP = (1/1) / 2. Captions 1, 2 and 4 score 0.
    assert hand_metrics["t2i_map_r"] == pytest.approx(100 * 2.5 / 6)


def test_chance_rsum_hand_computed() -> None:
    # 7 captions over images with 3, 2, 2 captions.
    # i2t: R@1 = (3/7 + 2/7 + 2/7) / 3 = 1/3; R@5 = (1 + 2 * (1 - C(5,5)/C(7,5))) / 3 = 61/63;
    # R@10 = 1. t2i: R@1 = 1/3, R@5 = R@10 = 1.
    expected = 100 * (1 / 3 + 61 / 63 + 1 + 1 / 3 + 1 + 1)
    assert chance_rsum(np.array([3, 2, 2]), 3) == pytest.approx(expected)


def test_chance_rsum_reported_by_metrics() -> None:
    metrics = retrieval_metrics(np.zeros((3, 7)), np.array([0, 0, 0, 1, 1, 2, 2]), None)
    assert metrics["chance_rsum"] == pytest.approx(100 * (1 / 3 + 61 / 63 + 1 + 1 / 3 + 1 + 1))


def test_chance_rsum_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    captions_per_image = rng.integers(1, 6, size=20)
    caption_image = np.repeat(np.arange(20), captions_per_image)
    rsums = np.array([
        retrieval_metrics(rng.random((20, len(caption_image))), caption_image, None)["rsum"]
        for _ in range(400)
    ])
    standard_error = rsums.std(ddof=1) / math.sqrt(len(rsums))
    expected = chance_rsum(captions_per_image, 20)
    assert abs(rsums.mean() - expected) < 4 * standard_error


def test_metrics_reject_image_without_captions() -> None:
    with pytest.raises(EvaluationError, match="image 2 has none"):
        retrieval_metrics(np.zeros((3, 2)), np.array([0, 1]), None)


def test_metrics_reject_caption_image_out_of_range() -> None:
    with pytest.raises(EvaluationError, match="caption_image must lie in"):
        retrieval_metrics(np.zeros((2, 2)), np.array([0, 2]), None)


def test_metrics_reject_nan_scores() -> None:
    with pytest.raises(EvaluationError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]), None)


def test_metrics_reject_human_match_out_of_range() -> None:
    with pytest.raises(EvaluationError, match="human_matches"):
        retrieval_metrics(SIM, CAPTION_IMAGE, np.array([[3, 0]]))


def _reversing_match_prob(scores: torch.Tensor):
    # ITM that disagrees with ITC: the lower the ITC score, the higher the match probability.
    def match_prob(queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.sigmoid(scores[queries, items])

    return match_prob


@pytest.fixture(scope="module")
def rerank_case() -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    reranked = itm_rerank(scores, 4, _reversing_match_prob(scores), batch_size=3)
    return scores, reranked


def test_itm_rerank_keeps_top_k_set(rerank_case: tuple[torch.Tensor, torch.Tensor]) -> None:
    scores, reranked = rerank_case
    itc_top = scores.argsort(dim=1, descending=True)[:, :4].sort(dim=1).values
    itm_top = reranked.argsort(dim=1, descending=True)[:, :4].sort(dim=1).values
    assert torch.equal(itc_top, itm_top)


def test_itm_rerank_reverses_within_top_k(rerank_case: tuple[torch.Tensor, torch.Tensor]) -> None:
    scores, reranked = rerank_case
    itc_order = scores.argsort(dim=1, descending=True)[:, :4]
    itm_order = reranked.argsort(dim=1, descending=True)[:, :4]
    assert torch.equal(itm_order, itc_order.flip(dims=[1]))


def test_itm_rerank_keeps_order_below_top_k(rerank_case: tuple[torch.Tensor, torch.Tensor]) -> None:
    scores, reranked = rerank_case
    itc_order = scores.argsort(dim=1, descending=True)[:, 4:]
    itm_order = reranked.argsort(dim=1, descending=True)[:, 4:]
    assert torch.equal(itm_order, itc_order)


def test_confidence_interval_three_values() -> None:
    # t_{0.975, 2} = 4.3027 and the standard error is 1 / sqrt(3).
    mean, half_width = mean_confidence_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)


def test_confidence_interval_single_value_nan() -> None:
    mean, half_width = mean_confidence_interval([5.0])
    assert mean == 5.0
    assert math.isnan(half_width)


def test_confidence_interval_rejects_bad_confidence() -> None:
    with pytest.raises(EvaluationError, match="confidence"):
        mean_confidence_interval([1.0, 2.0], confidence=1.5)


@pytest.fixture(scope="module")
def paired_example() -> dict:
    # Differences 2, 3, 2, 3: mean 2.5, standard deviation sqrt(1/3), standard error 1/sqrt(12).
    return paired_comparison([3.0, 5.0, 4.0, 6.0], [1.0, 2.0, 2.0, 3.0])


def test_paired_comparison_mean_diff(paired_example: dict) -> None:
    assert paired_example["mean_diff"] == pytest.approx(2.5)


def test_paired_comparison_t_statistic(paired_example: dict) -> None:
    assert paired_example["t"] == pytest.approx(2.5 * math.sqrt(12))


def test_paired_comparison_p_value(paired_example: dict) -> None:
    # With 3 degrees of freedom the t CDF has a closed form; here t / sqrt(3) = 5, so
    # p = 1 - (2 / pi) * (5 / 26 + atan(5)).
    expected = 1 - (2 / math.pi) * (5 / 26 + math.atan(5))
    assert paired_example["p_value"] == pytest.approx(expected, rel=1e-6)


def test_paired_comparison_ci_half_width(paired_example: dict) -> None:
    # t_{0.975, 3} = 3.182446.
    assert paired_example["ci_half_width"] == pytest.approx(3.182446 / math.sqrt(12), rel=1e-5)


def test_paired_comparison_no_wilcoxon_below_six(paired_example: dict) -> None:
    assert paired_example["wilcoxon_p_value"] is None


def test_paired_comparison_wilcoxon_six_pairs() -> None:
    # Six positive, distinct differences: the exact two-sided p-value is 2 / 2**6.
    result = paired_comparison([2.0, 4.0, 6.0, 8.0, 10.0, 12.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert result["wilcoxon_p_value"] == pytest.approx(2 / 64)


def test_paired_comparison_rejects_length_mismatch() -> None:
    with pytest.raises(EvaluationError, match="one value per seed"):
        paired_comparison([1.0, 2.0], [1.0])


@pytest.fixture(scope="module")
def albef_setup():
    from falcon_rl.data import ImageTextPairs, load_tokenizer
    from falcon_rl.models import build_framework

    torch.manual_seed(0)
    framework = build_framework("albef", "test")
    tokenizer = load_tokenizer(None)
    size = framework.image_size
    captions = [
        "a dog runs on the grass", "a brown dog in a park", "two children play football",
        "kids kick a ball", "a man climbs a rock", "a climber on a cliff", "a cat sleeps",
    ]
    generator = torch.Generator().manual_seed(0)
    pairs = ImageTextPairs(
        split="test",
        images=torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=generator),
        image_names=[f"image{i}.jpg" for i in range(4)],
        captions=captions,
        caption_keys=[f"key{i}" for i in range(len(captions))],
        image_ids=np.array([0, 0, 1, 1, 2, 2, 3], dtype=np.int64),
        human_matches=np.array([[1, 0]], dtype=np.int64),
    )
    return framework, pairs, tokenizer


def test_evaluate_retrieval_counts(albef_setup) -> None:
    from falcon_rl.evaluation import evaluate_retrieval

    framework, pairs, tokenizer = albef_setup
    metrics = evaluate_retrieval(framework, pairs, tokenizer, "cpu", batch_size=3)
    assert (metrics["num_images"], metrics["num_captions"]) == (4, 7)


def test_evaluate_retrieval_matches_itc_embeddings(albef_setup) -> None:
    from falcon_rl.data import tokenize
    from falcon_rl.evaluation import evaluate_retrieval
    from falcon_rl.models import TextBatch

    framework, pairs, tokenizer = albef_setup
    metrics = evaluate_retrieval(framework, pairs, tokenizer, "cpu", batch_size=3)
    framework.eval()
    with torch.no_grad():
        image_embed = framework.embed_images(framework.preprocess_images(pairs.images))
        input_ids, attention_mask = tokenize(tokenizer, pairs.captions, framework.max_text_length)
        text_embed = framework.embed_texts(TextBatch(input_ids, attention_mask))
    expected = retrieval_metrics(image_embed @ text_embed.T, pairs.image_ids, pairs.human_matches)
    assert metrics["fn_rsum"] == pytest.approx(expected["fn_rsum"])
    assert metrics["rsum"] == pytest.approx(expected["rsum"])


def test_evaluate_retrieval_restores_train_mode(albef_setup) -> None:
    from falcon_rl.evaluation import evaluate_retrieval

    framework, pairs, tokenizer = albef_setup
    framework.train()
    evaluate_retrieval(framework, pairs, tokenizer, "cpu", itm_rerank_k=2)
    assert framework.training


def test_evaluate_retrieval_rerank_top1_keeps_metrics(albef_setup) -> None:
    # Re-ranking a single candidate per query cannot change any ranking.
    from falcon_rl.evaluation import evaluate_retrieval

    framework, pairs, tokenizer = albef_setup
    plain = evaluate_retrieval(framework, pairs, tokenizer, "cpu")
    reranked = evaluate_retrieval(framework, pairs, tokenizer, "cpu", itm_rerank_k=1)
    assert reranked == pytest.approx(plain)


def test_evaluate_retrieval_bf16_runs(albef_setup) -> None:
    from falcon_rl.evaluation import evaluate_retrieval

    framework, pairs, tokenizer = albef_setup
    metrics = evaluate_retrieval(framework, pairs, tokenizer, "cpu", itm_rerank_k=3, precision="bf16")
    assert 0.0 <= metrics["rsum"] <= 600.0


def test_evaluate_retrieval_rejects_precision(albef_setup) -> None:
    from falcon_rl.evaluation import evaluate_retrieval

    framework, pairs, tokenizer = albef_setup
    with pytest.raises(EvaluationError, match="precision must be one of"):
        evaluate_retrieval(framework, pairs, tokenizer, "cpu", precision="int8")
