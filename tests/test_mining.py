"""Tests of the mining layer: bank, search, batch builder, observations, false negatives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

from falcon_rl.mining import (
    FEATURE_NAMES,
    OBS_HIGH,
    OBS_LOW,
    SIMILARITY_FEATURE_NAMES,
    BatchBuilder,
    CandidateSearch,
    EmbeddingBank,
    FalseNegativeOracle,
    MiningError,
    action_to_hardness,
    batch_observation,
    caption_normal_form,
    choose_negatives,
    choose_negatives_reference,
    encode_sentences,
    hardness_to_rank,
    levels,
    make_observation,
)
from falcon_rl.mining.approximate import ApproximateIndex
from falcon_rl.mining.certified import certified_top_k, rescoring_thresholds, rounding_margins
from falcon_rl.mining.positives import same_group_entries
from falcon_rl.mining.prefetch import BackgroundSearch
from falcon_rl.mining.search import cross_modal_keys, cross_modal_queries

DIM = 16


def make_image_ids(n_pairs: int, captions_per_image: int = 5) -> np.ndarray:
    return np.arange(n_pairs, dtype=np.int64) // captions_per_image


def assert_select_matches_reference(fast_builder: BatchBuilder, reference_builder: BatchBuilder,
                                    bank: EmbeddingBank, seed: int) -> None:
    """Build one epoch with ``select`` and ``select_reference`` on random hardness and exclusions."""
    rng = np.random.default_rng(seed)
    while not fast_builder.epoch_finished:
        proposal = fast_builder.propose(bank)
        hardness = rng.uniform(size=proposal.anchors.size)
        excluded = rng.uniform(size=proposal.candidates.shape) < 0.5
        fast = fast_builder.select(proposal, hardness, excluded)
        reference = reference_builder.select_reference(reference_builder.propose(bank), hardness, excluded)
        np.testing.assert_array_equal(fast.pair_indices, reference.pair_indices)
        np.testing.assert_array_equal(fast.negative_ranks, reference.negative_ranks)
        assert fast.fallbacks == reference.fallbacks


def make_bank(n_pairs: int, seed: int = 0, noise: float = 0.5) -> EmbeddingBank:
    """Bank with normalised embeddings; text is a noisy copy of the image."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n_pairs, DIM, generator=generator), dim=1)
    text = torch.nn.functional.normalize(image + noise * torch.randn(n_pairs, DIM, generator=generator), dim=1)
    bank = EmbeddingBank(n_pairs, DIM)
    bank.fill(image, text)
    return bank


def similarity(bank: EmbeddingBank, anchor: int, others: np.ndarray) -> np.ndarray:
    """Brute-force s(a, c) = (<img_a, txt_c> + <txt_a, img_c>) / 2 in float64."""
    image = bank.image.double().numpy()
    text = bank.text.double().numpy()
    return (text[others] @ image[anchor] + image[others] @ text[anchor]) / 2.0


def run_epoch(builder: BatchBuilder, bank: EmbeddingBank, hardness_seed: int = 0) -> list:
    rng = np.random.default_rng(hardness_seed)
    batches = []
    while True:
        proposal = builder.propose(bank)
        batch = builder.select(proposal, rng.uniform(0.0, 1.0, proposal.anchors.size))
        batches.append((proposal, batch))
        if batch.epoch_end:
            return batches


# ---- hardness ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "m", "expected"),
    [(1.0, 5, 0), (0.5, 5, 2), (0.0, 5, 4), (1.0, 4, 0), (0.5, 4, 2), (0.0, 4, 3), (0.3, 1, 0), (0.5, 0, -1)],
)
def test_hardness_to_rank_rule(q: float, m: int, expected: int) -> None:
    assert int(hardness_to_rank(q, m)) == expected


def test_hardness_to_rank_rejects_out_of_range() -> None:
    with pytest.raises(MiningError):
        hardness_to_rank(1.5, 4)


def test_levels_even_spacing() -> None:
    np.testing.assert_allclose(levels(5), [0.0, 0.25, 0.5, 0.75, 1.0])


def test_action_to_hardness_discrete_per_anchor() -> None:
    np.testing.assert_allclose(action_to_hardness(np.array([0, 5, 10]), spaces.Discrete(11)), [0.0, 0.5, 1.0])


def test_action_to_hardness_box_clips() -> None:
    actions = np.array([[-0.2], [0.4], [1.3]], dtype=np.float32)
    np.testing.assert_allclose(action_to_hardness(actions, spaces.Box(0, 1, (1,))), [0.0, 0.4, 1.0], rtol=1e-6)


def test_action_to_hardness_rejects_invalid_discrete() -> None:
    with pytest.raises(MiningError):
        action_to_hardness(11, spaces.Discrete(11))


# ---- bank ---------------------------------------------------------------------


def test_bank_update_writes_rows() -> None:
    bank = EmbeddingBank(10, DIM, dtype=torch.float16)
    image = torch.ones(2, DIM)
    bank.update(np.array([3, 7]), image, -image)
    assert bank.image[[3, 7]].eq(1).all()
    assert bank.text[7].eq(-1).all()
    assert int(bank.filled.sum()) == 2


def test_bank_update_rejects_bad_shape() -> None:
    bank = EmbeddingBank(10, DIM)
    with pytest.raises(MiningError):
        bank.update([1, 2], torch.ones(3, DIM), torch.ones(3, DIM))


def test_bank_fill_rejects_overflow() -> None:
    bank = EmbeddingBank(10, DIM)
    with pytest.raises(MiningError):
        bank.fill(torch.ones(4, DIM), torch.ones(4, DIM), start=8)


def test_bank_state_dict_round_trip() -> None:
    bank = make_bank(20)
    restored = EmbeddingBank(20, DIM)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.image, bank.image)
    assert torch.equal(restored.text, bank.text)


def test_bank_update_replaces_nonfinite_with_zero() -> None:
    bank = EmbeddingBank(4, DIM)
    image = torch.full((1, DIM), float("nan"))
    text = torch.full((1, DIM), float("inf"))
    bank.update([2], image, text)
    assert bank.embeddings[2].eq(0).all()


def test_bank_update_float16_overflow_becomes_zero() -> None:
    bank = EmbeddingBank(4, DIM, dtype=torch.float16)
    bank.update([1], torch.full((1, DIM), 1e6), torch.ones(1, DIM))
    assert bank.image[1].eq(0).all()


def test_bank_update_advances_row_version() -> None:
    bank = make_bank(10)
    before = bank.row_version.copy()
    bank.update([4], torch.ones(1, DIM), torch.ones(1, DIM))
    assert bank.row_version[4] > before[4]
    assert np.array_equal(np.delete(bank.row_version, 4), np.delete(before, 4))


def test_bank_keys_float32_from_float16() -> None:
    bank = EmbeddingBank(6, DIM, dtype=torch.float16)
    bank.fill(torch.ones(6, DIM), -torch.ones(6, DIM))
    keys = bank.keys([0, 5])
    assert keys.dtype == torch.float32
    assert keys.shape == (2, 2 * DIM)
    assert keys[:, DIM:].eq(-1).all()


# ---- search -------------------------------------------------------------------


def test_same_group_entries_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    query_groups = rng.integers(0, 6, 9)
    key_groups = rng.integers(-1, 6, 40)
    rows, columns = same_group_entries(query_groups, key_groups)
    expected = set(zip(*np.nonzero(query_groups[:, None] == key_groups[None, :])))
    assert set(zip(rows.tolist(), columns.tolist())) == {(int(r), int(c)) for r, c in expected}
    assert rows.size == len(expected)


def test_search_concatenation_gives_twice_similarity() -> None:
    bank = make_bank(30)
    queries = cross_modal_queries(bank.image[:3], bank.text[:3])
    keys = cross_modal_keys(bank.image[10:], bank.text[10:])
    expected = similarity(bank, 1, np.arange(10, 30))
    np.testing.assert_allclose((keys @ queries[1]).numpy() / 2, expected, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_search_matches_brute_force(backend: str) -> None:
    bank = make_bank(200)
    groups = make_image_ids(200)
    queries = cross_modal_queries(bank.image[:4], bank.text[:4])
    keys = cross_modal_keys(bank.image, bank.text)
    positions, sims = CandidateSearch(backend, block_size=37).search(queries, groups[:4], keys, groups, 10)
    for row in range(4):
        others = np.flatnonzero(groups != groups[row])
        brute = others[np.argsort(-similarity(bank, row, others), kind="stable")[:10]]
        np.testing.assert_array_equal(positions[row], brute)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_search_pads_when_few_keys() -> None:
    bank = make_bank(20)
    groups = make_image_ids(20)
    queries = cross_modal_queries(bank.image[:1], bank.text[:1])
    keys = cross_modal_keys(bank.image[:8], bank.text[:8])
    positions, sims = CandidateSearch("faiss").search(queries, groups[:1], keys, groups[:8], 6)
    assert list(positions[0, 3:]) == [-1, -1, -1]
    assert np.all(np.isneginf(sims[0, 3:]))


@pytest.mark.parametrize(("backend", "precision"), [("faiss", "auto"), ("torch", "float32"), ("torch", "bfloat16")])
def test_search_pool_cache_follows_pool_and_rewrites(backend: str, precision: str) -> None:
    n_pairs = 300
    bank = make_bank(n_pairs)
    groups = make_image_ids(n_pairs)
    search = CandidateSearch(backend, precision=precision)
    queries = cross_modal_queries(*bank.vectors(np.arange(5)))
    rng = np.random.default_rng(0)
    for step in range(4):
        pool = np.sort(rng.choice(np.arange(5, n_pairs), 120, replace=False))
        if step == 2:
            # Rewrite a pooled row: the cache must pick up the new embedding.
            bank.update(pool[:1], *bank.vectors(np.array([0])))
            queries = cross_modal_queries(*bank.vectors(np.arange(5)))
        found = search.search_pool(queries, groups[:5], pool, groups, bank, 7)
        for row in range(5):
            others = pool[groups[pool] != groups[row]]
            brute = others[np.argsort(-similarity(bank, row, others), kind="stable")[:7]]
            np.testing.assert_array_equal(found.pairs[row], brute)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall(kind: str) -> None:
    n_pairs = 2000
    bank = make_bank(n_pairs, noise=1.0)
    groups = make_image_ids(n_pairs)
    exact = CandidateSearch("torch")
    approximate = CandidateSearch("faiss", index=kind, index_options={"nprobe": 16} if kind == "ivf" else None)
    queries = cross_modal_queries(*bank.vectors(np.arange(20)))
    hits = total = 0
    for start in (20, 120, 220):
        pool = np.arange(start, start + 1600)
        truth = exact.search_pool(queries, groups[:20], pool, groups, bank, 10).pairs
        found = approximate.search_pool(queries, groups[:20], pool, groups, bank, 10).pairs
        hits += sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist()))
        total += truth.size
    assert hits / total >= 0.7


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_builder_approximate_places_each_pair_once(kind: str) -> None:
    n_pairs = 400
    bank = make_bank(n_pairs)
    builder = BatchBuilder(make_image_ids(n_pairs), 16, 120, 6, seed=1, index=kind)
    placed = np.concatenate([batch.pair_indices for _, batch in run_epoch(builder, bank)])
    assert np.array_equal(np.sort(placed), np.arange(n_pairs))


def test_candidate_search_rejects_unknown_index() -> None:
    with pytest.raises(MiningError):
        CandidateSearch("faiss", index="pq")


def test_candidate_search_rejects_torch_with_approximate_index() -> None:
    with pytest.raises(MiningError):
        CandidateSearch("torch", index="hnsw")


def test_approximate_index_rejects_bad_nprobe() -> None:
    with pytest.raises(MiningError):
        ApproximateIndex("ivf", nprobe=0)


# ---- batch builder: epoch coverage --------------------------------------------


@pytest.mark.parametrize("batch_size", [2, 7, 16, 33])
def test_builder_places_each_pair_once_per_epoch(batch_size: int) -> None:
    n_pairs = 103
    bank = make_bank(n_pairs)
    builder = BatchBuilder(make_image_ids(n_pairs), batch_size, search_space=40, top_k=8, seed=1)
    for epoch in range(2):
        batches = run_epoch(builder, bank, hardness_seed=epoch)
        placed = np.concatenate([batch.pair_indices for _, batch in batches])
        assert np.array_equal(np.sort(placed), np.arange(n_pairs)), f"epoch {epoch}"
        assert all(batch.epoch == epoch for _, batch in batches)
        assert all(batch.pair_indices.size <= batch_size for _, batch in batches)


def test_builder_random_batches_cover_epoch() -> None:
    builder = BatchBuilder(make_image_ids(50), 8, search_space=16, top_k=4, seed=0)
    batches = []
    while not builder.epoch_finished:
        batches.append(builder.random_batch())
    placed = np.concatenate([batch.pair_indices for batch in batches])
    assert np.array_equal(placed, np.random.default_rng([0, 0]).permutation(50))
    assert batches[-1].pair_indices.size == 50 % 8
    assert batches[-1].epoch_end


def test_builder_odd_batch_last_anchor_without_negative() -> None:
    bank = make_bank(60)
    builder = BatchBuilder(make_image_ids(60), 5, search_space=30, top_k=6, seed=0)
    proposal = builder.propose(bank)
    batch = builder.select(proposal, 1.0)
    assert batch.anchors.size == 3
    assert batch.negatives[2] == -1
    assert batch.pair_indices.size == 5


def test_builder_epoch_orders_differ() -> None:
    builder = BatchBuilder(make_image_ids(40), 40, search_space=40, top_k=4, seed=3)
    first = builder.random_batch().pair_indices
    second = builder.random_batch().pair_indices
    assert builder.epoch == 1
    assert not np.array_equal(first, second)


# ---- batch builder: candidates and choice -------------------------------------


def test_builder_never_chooses_positives() -> None:
    n_pairs = 120
    image_ids = make_image_ids(n_pairs, captions_per_image=6)
    builder = BatchBuilder(image_ids, 16, search_space=32, top_k=10, seed=2)
    for proposal, batch in run_epoch(builder, make_bank(n_pairs, noise=0.1)):
        valid = proposal.candidates >= 0
        candidate_groups = image_ids[np.clip(proposal.candidates, 0, None)]
        assert not np.any(valid & (candidate_groups == image_ids[proposal.anchors][:, None]))
        assert not np.any(np.isin(proposal.candidates, proposal.anchors))
        has_negative = batch.negatives >= 0
        assert not np.any(image_ids[batch.negatives[has_negative]] == image_ids[batch.anchors[has_negative]])


def test_builder_candidates_are_top_k_of_search_space() -> None:
    n_pairs = 100
    image_ids = make_image_ids(n_pairs)
    bank = make_bank(n_pairs)
    builder = BatchBuilder(image_ids, 8, search_space=40, top_k=5, seed=4)
    proposal = builder.propose(bank)
    space = np.random.default_rng([4, 0]).permutation(n_pairs)[:40]
    for row, anchor in enumerate(proposal.anchors):
        pool = space[~np.isin(space, proposal.anchors) & (image_ids[space] != image_ids[anchor])]
        brute = pool[np.argsort(-similarity(bank, anchor, pool), kind="stable")[:5]]
        np.testing.assert_array_equal(proposal.candidates[row], brute)


def test_builder_hardest_picks_most_similar_free() -> None:
    n_pairs = 100
    image_ids = make_image_ids(n_pairs)
    bank = make_bank(n_pairs, noise=0.8)
    builder = BatchBuilder(image_ids, 16, search_space=48, top_k=10, seed=5)
    space = np.random.default_rng([5, 0]).permutation(n_pairs)[:48]
    batch = builder.select(builder.propose(bank), 1.0)
    taken: list[int] = []
    for anchor, negative in zip(batch.anchors, batch.negatives):
        free = space[~np.isin(space, np.concatenate([batch.anchors, taken])) & (image_ids[space] != image_ids[anchor])]
        assert negative == free[np.argmax(similarity(bank, anchor, free))]
        taken.append(negative)


@pytest.mark.parametrize(("q", "expected_rank"), [(1.0, 0), (0.5, 4), (0.0, 8)])
def test_builder_rank_rule_single_anchor(q: float, expected_rank: int) -> None:
    bank = make_bank(60)
    builder = BatchBuilder(make_image_ids(60), 2, search_space=30, top_k=9, seed=0)
    proposal = builder.propose(bank)
    batch = builder.select(proposal, q)
    assert batch.negative_ranks[0] == expected_rank
    assert batch.negatives[0] == proposal.candidates[0, expected_rank]
    assert batch.negative_sims[0] == proposal.candidate_sims[0, expected_rank]


def test_builder_excluded_candidates_skipped() -> None:
    bank = make_bank(60)
    builder = BatchBuilder(make_image_ids(60), 2, search_space=30, top_k=6, seed=0)
    proposal = builder.propose(bank)
    excluded = np.zeros((1, 6), dtype=bool)
    excluded[0, :2] = True
    batch = builder.select(proposal, 1.0, excluded)
    assert batch.negatives[0] == proposal.candidates[0, 2]


def test_builder_tiny_search_space_counts_fallbacks() -> None:
    n_pairs = 80
    builder = BatchBuilder(make_image_ids(n_pairs), 4, search_space=3, top_k=8, seed=0)
    proposal = builder.propose(make_bank(n_pairs))
    assert proposal.fallbacks["beyond_search_space"] > 0
    assert proposal.fallbacks["random"] > 0
    assert np.all(proposal.candidates >= 0)


def test_builder_counts_exhausted_anchors() -> None:
    n_pairs = 80
    builder = BatchBuilder(make_image_ids(n_pairs), 16, search_space=40, top_k=1, seed=0)
    bank = EmbeddingBank(n_pairs, DIM)
    bank.fill(torch.ones(n_pairs, DIM), torch.ones(n_pairs, DIM))
    batch = builder.select(builder.propose(bank), 1.0)
    assert batch.fallbacks["exhausted"] > 0
    assert np.all(batch.negatives >= 0)


def test_builder_rejects_stale_proposal() -> None:
    bank = make_bank(40)
    builder = BatchBuilder(make_image_ids(40), 4, search_space=20, top_k=4, seed=0)
    proposal = builder.propose(bank)
    builder.select(proposal, 1.0)
    with pytest.raises(MiningError):
        builder.select(proposal, 1.0)


def test_builder_rejects_hardness_out_of_range() -> None:
    bank = make_bank(40)
    builder = BatchBuilder(make_image_ids(40), 4, search_space=20, top_k=4, seed=0)
    with pytest.raises(MiningError):
        builder.select(builder.propose(bank), np.array([0.5, 1.2]))


def test_builder_backends_agree() -> None:
    n_pairs = 150
    bank = make_bank(n_pairs)
    image_ids = make_image_ids(n_pairs)
    faiss_batches = run_epoch(BatchBuilder(image_ids, 12, 48, 8, seed=6, backend="faiss"), bank)
    torch_batches = run_epoch(BatchBuilder(image_ids, 12, 48, 8, seed=6, backend="torch", block_size=16), bank)
    assert len(faiss_batches) == len(torch_batches)
    for (faiss_proposal, faiss_batch), (torch_proposal, torch_batch) in zip(faiss_batches, torch_batches):
        np.testing.assert_array_equal(faiss_proposal.candidates, torch_proposal.candidates)
        np.testing.assert_array_equal(faiss_batch.pair_indices, torch_batch.pair_indices)


# ---- bfloat16 search ------------------------------------------------------------


def make_clustered_bank(n_pairs: int, dim: int, noise: float, seed: int = 0) -> EmbeddingBank:
    """Bank of three tight clusters, so that similarities within a cluster lie within bfloat16 rounding."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(3, dim, generator=generator), dim=1)
    cluster = torch.arange(n_pairs) % 3
    image = torch.nn.functional.normalize(centres[cluster] + noise * torch.randn(n_pairs, dim, generator=generator))
    text = torch.nn.functional.normalize(centres[(cluster + 1) % 3] + noise * torch.randn(n_pairs, dim,
                                                                                        generator=generator))
    bank = EmbeddingBank(n_pairs, dim)
    bank.fill(image, text)
    return bank


def run_precisions(bank: EmbeddingBank, batch_size: int, search_space: int, top_k: int,
                   excluded_rate: float = 0.0) -> tuple[list, list, BatchBuilder]:
    """Run one epoch with float32 and bfloat16 search on the same hardness and exclusions."""
    image_ids = make_image_ids(bank.n_pairs)
    runs = []
    for precision in ("float32", "bfloat16"):
        builder = BatchBuilder(image_ids, batch_size, search_space, top_k, seed=7, backend="torch",
                               precision=precision)
        rng = np.random.default_rng(8)
        records = []
        while not builder.epoch_finished:
            proposal = builder.propose(bank)
            hardness = rng.uniform(size=proposal.anchors.size)
            excluded = rng.uniform(size=proposal.candidates.shape) < excluded_rate
            records.append((proposal, builder.select(proposal, hardness, excluded)))
        runs.append(records)
    return runs[0], runs[1], builder


def assert_same_batches(expected: list, actual: list) -> None:
    assert len(expected) == len(actual)
    for step, ((want_proposal, want), (got_proposal, got)) in enumerate(zip(expected, actual)):
        assert np.array_equal(want_proposal.candidates, got_proposal.candidates), f"batch {step}: candidates"
        assert np.array_equal(want.pair_indices, got.pair_indices), f"batch {step}: pair_indices"
        assert np.array_equal(want.negative_ranks, got.negative_ranks), f"batch {step}: negative_ranks"
        np.testing.assert_allclose(got_proposal.candidate_sims, want_proposal.candidate_sims, atol=1e-5)


@pytest.mark.parametrize("dim", [16, 128])
def test_builder_bfloat16_equals_float32_random(dim: int) -> None:
    generator = torch.Generator().manual_seed(dim)
    bank = EmbeddingBank(600, dim)
    bank.fill(torch.nn.functional.normalize(torch.randn(600, dim, generator=generator), dim=1),
              torch.nn.functional.normalize(torch.randn(600, dim, generator=generator), dim=1))
    float32_run, bfloat16_run, builder = run_precisions(bank, 32, search_space=256, top_k=8)
    assert_same_batches(float32_run, bfloat16_run)
    assert builder.search_counts["bfloat16_anchors"] == sum(p.anchors.size for p, _ in bfloat16_run)
    assert builder.search_counts["second_pass_anchors"] > 0


def test_builder_bfloat16_near_ties_fall_back_to_float32() -> None:
    # Within a cluster, similarities differ by about 1e-3: less than the
    # bfloat16 rounding bound, far more than float32 rounding.
    bank = make_clustered_bank(450, 32, noise=0.01)
    float32_run, bfloat16_run, builder = run_precisions(bank, 30, search_space=150, top_k=6)
    assert_same_batches(float32_run, bfloat16_run)
    assert builder.search_counts["full_row_anchors"] > 0


def test_builder_bfloat16_exclusions_equal_float32() -> None:
    bank = make_clustered_bank(300, 16, noise=0.2, seed=1)
    float32_run, bfloat16_run, builder = run_precisions(bank, 40, search_space=100, top_k=4, excluded_rate=0.6)
    assert_same_batches(float32_run, bfloat16_run)
    assert sum(batch.fallbacks["exhausted"] for _, batch in bfloat16_run) > 0
    assert builder.search_counts["exact_reserve_anchors"] > 0


def test_builder_bfloat16_select_equals_reference() -> None:
    n_pairs = 200
    bank = make_bank(n_pairs, seed=4)
    fast = BatchBuilder(make_image_ids(n_pairs), 24, 80, 6, seed=4, backend="torch", precision="bfloat16")
    reference = BatchBuilder(make_image_ids(n_pairs), 24, 80, 6, seed=4, backend="torch", precision="bfloat16")
    assert_select_matches_reference(fast, reference, bank, seed=4)


def certified_inputs(n_keys: int, n_anchors: int, dim: int, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(n_anchors, 2 * dim, generator=generator), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(n_keys, 2 * dim, generator=generator), dim=1)
    rounded = (keys.bfloat16() @ queries.bfloat16().T).float()
    norms = (float(keys.norm(dim=1).max()), float((keys.bfloat16().float() - keys).norm(dim=1).max()))
    return queries.numpy(), keys.numpy(), rounded, norms


def test_certified_top_k_equals_float32_top_k() -> None:
    queries, keys, rounded, norms = certified_inputs(2000, 24, 64, seed=0)
    masked = np.random.default_rng(0).uniform(size=rounded.shape) < 0.1
    rounded.numpy()[masked] = -np.inf
    found = certified_top_k(rounded, queries, keys, np.arange(2000), 10, norms, lambda rows: None)
    exact = (keys.astype(np.float64) @ queries.astype(np.float64).T)
    exact[masked] = -np.inf
    np.testing.assert_array_equal(found.slots, np.argsort(-exact, axis=0)[:10].T)
    np.testing.assert_allclose(found.scores, -np.sort(-exact, axis=0)[:10].T, atol=1e-5)
    assert found.full_row_anchors == 0


def dense_band_inputs(n_anchors: int, dim: int, n_dense: int, n_keys: int, seed: int) -> tuple:
    """Keys whose float64 scores against each anchor's query are 0.3 + 1e-4 j for that anchor's band."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(n_anchors, dim, generator=generator, dtype=torch.float64))
    blocks = []
    for row in range(n_anchors):
        noise = torch.randn(n_dense, dim, generator=generator, dtype=torch.float64)
        noise = torch.nn.functional.normalize(noise - (noise @ queries[row])[:, None] * queries[row], dim=1)
        scores = 0.3 + 1e-4 * torch.randperm(n_dense, generator=generator).double()
        blocks.append(scores[:, None] * queries[row] + torch.sqrt(1 - scores[:, None] ** 2) * noise)
    filler = torch.randn(n_keys - n_anchors * n_dense, dim, generator=generator, dtype=torch.float64)
    keys = torch.cat([*blocks, 0.2 * torch.nn.functional.normalize(filler)])
    # Shuffled, so that each band spreads over many blocks of the bound L.
    keys = keys[torch.randperm(n_keys, generator=generator)].float()
    return queries.float().numpy(), keys.numpy()


def test_certified_top_k_adversarial_rounding_equals_float64() -> None:
    # The bfloat16 scores are replaced by scores off by 0.8 E, the most the
    # bound allows, in the direction that reverses the order at the top:
    # the 10 best move down and the next 20 move up.
    queries, keys = dense_band_inputs(n_anchors=3, dim=128, n_dense=60, n_keys=1200, seed=3)
    norms = (float(np.linalg.norm(keys, axis=1).max()), 0.004)
    exact = keys.astype(np.float64) @ queries.astype(np.float64).T
    ranks = np.argsort(np.argsort(-exact, axis=0), axis=0)
    shift = np.where(ranks < 10, -0.8, np.where(ranks < 30, 0.8, 0.0)) * rounding_margins(queries, *norms)
    rounded = torch.from_numpy((exact + shift).astype(np.float32))
    found = certified_top_k(rounded, queries, keys, np.arange(1200), 10, norms, lambda rows: None,
                            max_rescored=1200)
    assert not np.array_equal(np.sort(np.argsort(-rounded.numpy(), axis=0)[:10].T), np.sort(found.slots))
    np.testing.assert_array_equal(found.slots, np.argsort(-exact, axis=0)[:10].T)
    assert found.second_pass_anchors == 3


def test_certified_top_k_counts_full_rows() -> None:
    queries, keys, rounded, norms = certified_inputs(500, 4, 16, seed=1)
    exact = torch.from_numpy(queries @ keys.T)
    found = certified_top_k(rounded, queries, keys, np.arange(500), 5, norms, lambda rows: exact[rows],
                            max_rescored=0)
    assert found.full_row_anchors == 4
    np.testing.assert_array_equal(found.slots, np.argsort(-exact.numpy(), axis=1, kind="stable")[:, :5])


def test_rounding_margins_bound_bfloat16_error() -> None:
    queries, keys, rounded, norms = certified_inputs(3000, 32, 128, seed=2)
    exact = keys.astype(np.float64) @ queries.astype(np.float64).T
    margins = rounding_margins(queries, *norms)
    slope = 2 * 2.0 ** -8 / (1 - 2 * 2.0 ** -8)
    error = np.abs(rounded.numpy() - exact) - slope * np.abs(rounded.numpy())
    assert np.all(error <= margins[None, :])


def test_rescoring_thresholds_round_down() -> None:
    thresholds = np.array([0.3, -0.2, 0.1 + 1e-9, 0.0])
    margins = np.full(4, 0.01)
    tau = rescoring_thresholds(thresholds, margins)
    slope = 2 * 2.0 ** -8 / (1 - 2 * 2.0 ** -8)
    target = thresholds - margins
    exact = np.where(target >= 0, target / (1 + slope), target / (1 - slope))
    assert tau.dtype == np.float32
    assert np.all(tau.astype(np.float64) <= exact)


@pytest.mark.parametrize(("backend", "precision"), [("faiss", "bfloat16"), ("torch", "float16")])
def test_candidate_search_rejects_invalid_precision(backend: str, precision: str) -> None:
    with pytest.raises(MiningError):
        CandidateSearch(backend, precision=precision)


# ---- fast selection equals the reference --------------------------------------


def fallback_smallest_free(slot: int, taken: np.ndarray) -> int:
    """Deterministic stand-in: odd slots get none, even slots the smallest pair >= 100 not taken."""
    if slot % 2:
        return -1
    return int(next(value for value in range(100, 200) if value not in set(taken.tolist())))


@pytest.mark.parametrize("seed", range(20))
def test_choose_negatives_equals_reference_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_anchors, k, n_values = 24, 6, 14
    candidates = np.stack([rng.choice(n_values, k, replace=False) for _ in range(n_anchors)])
    pads = rng.integers(0, k + 1, n_anchors)
    candidates[np.arange(k)[None, :] >= k - pads[:, None] // 2] = -1
    eligible = (candidates >= 0) & (rng.uniform(size=candidates.shape) > 0.2)
    hardness = rng.choice([0.0, 0.25, 0.5, 1.0, rng.uniform()], n_anchors)
    n_negatives = int(rng.integers(n_anchors // 2, n_anchors + 1))

    fast = choose_negatives(candidates, eligible, hardness, n_negatives, fallback_smallest_free)
    reference = choose_negatives_reference(candidates, eligible, hardness, n_negatives, fallback_smallest_free)
    np.testing.assert_array_equal(fast.negatives, reference.negatives)
    np.testing.assert_array_equal(fast.ranks, reference.ranks)
    np.testing.assert_array_equal(fast.columns, reference.columns)
    assert fast.exhausted == reference.exhausted
    assert reference.exhausted > 0


@pytest.mark.parametrize("seed", range(5))
def test_choose_negatives_equals_reference_hardest_overlapping(seed: int) -> None:
    # All anchors at q = 1 over few values: many anchors share candidates.
    rng = np.random.default_rng(seed)
    candidates = np.stack([rng.choice(20, 8, replace=False) for _ in range(40)])
    eligible = rng.uniform(size=candidates.shape) > 0.1
    hardness = np.ones(40)
    fast = choose_negatives(candidates, eligible, hardness, 40, fallback_smallest_free)
    reference = choose_negatives_reference(candidates, eligible, hardness, 40, fallback_smallest_free)
    np.testing.assert_array_equal(fast.negatives, reference.negatives)
    np.testing.assert_array_equal(fast.columns, reference.columns)
    assert fast.exhausted == reference.exhausted


@pytest.mark.parametrize("seed", range(3))
def test_builder_select_equals_reference(seed: int) -> None:
    n_pairs = 120
    bank = make_bank(n_pairs, seed=seed)
    fast_builder = BatchBuilder(make_image_ids(n_pairs, 3), 30, search_space=34, top_k=12, seed=seed)
    reference_builder = BatchBuilder(make_image_ids(n_pairs, 3), 30, search_space=34, top_k=12, seed=seed)
    assert_select_matches_reference(fast_builder, reference_builder, bank, seed=seed)


# ---- observation --------------------------------------------------------------


def test_observation_names_match_bounds() -> None:
    assert len(FEATURE_NAMES) == OBS_LOW.size == OBS_HIGH.size
    assert FEATURE_NAMES[: len(SIMILARITY_FEATURE_NAMES)] == SIMILARITY_FEATURE_NAMES


def test_observation_finite_for_nonfinite_embeddings() -> None:
    n_pairs = 60
    bank = make_bank(n_pairs)
    image, text = bank.vectors(np.arange(n_pairs))
    image[::3] = float("nan")
    text[1::4] = float("inf")
    text[2::5] = -1e30
    bank.update(np.arange(n_pairs), image, text)
    builder = BatchBuilder(make_image_ids(n_pairs), 8, search_space=24, top_k=6, seed=0)
    proposal = builder.propose(bank)
    observation = make_observation(proposal.features, float("nan"), np.array([float("inf"), float("-inf")]))
    assert observation.dtype == np.float32
    assert observation.shape == (4, len(FEATURE_NAMES))
    assert np.all(np.isfinite(observation))
    assert np.all((observation >= OBS_LOW) & (observation <= OBS_HIGH))


def test_observation_within_bounds_random_features() -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(scale=5.0, size=(7, len(SIMILARITY_FEATURE_NAMES)))
    raw[0, 0] = np.nan
    observation = make_observation(raw, 2.0, np.array([-3.0, 40.0]))
    assert np.all((observation >= OBS_LOW) & (observation <= OBS_HIGH))


def test_observation_features_values() -> None:
    bank = make_bank(60)
    builder = BatchBuilder(make_image_ids(60), 2, search_space=30, top_k=5, seed=0)
    proposal = builder.propose(bank)
    features = dict(zip(SIMILARITY_FEATURE_NAMES, proposal.features[0]))
    assert features["i2t_top1"] == pytest.approx(proposal.i2t_sims[0].max(), abs=1e-6)
    expected_margin = (proposal.positive_sims[0] - proposal.candidate_sims[0, 0]) / 2
    assert features["margin"] == pytest.approx(expected_margin, abs=1e-6)
    assert features["valid_fraction"] == 1.0
    assert 0.0 < features["candidate_entropy"] <= 1.0


def test_observation_run_features_squashed() -> None:
    observation = make_observation(np.zeros(len(SIMILARITY_FEATURE_NAMES)), 0.25, np.array([1.0, 0.5]))
    np.testing.assert_allclose(observation[-3:], [0.25, 0.5, math.tanh(0.5)], rtol=1e-6)


def test_batch_observation_mean() -> None:
    rows = np.stack([np.full(len(FEATURE_NAMES), 0.2), np.full(len(FEATURE_NAMES), 0.6)]).astype(np.float32)
    np.testing.assert_allclose(batch_observation(rows), np.full(len(FEATURE_NAMES), 0.4), rtol=1e-6)


# ---- checkpointing ------------------------------------------------------------


def test_builder_state_dict_resumes_identically() -> None:
    n_pairs = 90
    bank = make_bank(n_pairs)
    image_ids = make_image_ids(n_pairs)
    builder = BatchBuilder(image_ids, 10, search_space=4, top_k=6, seed=9)
    for _ in range(4):
        builder.select(builder.propose(bank), 0.7)
    resumed = BatchBuilder(image_ids, 10, search_space=4, top_k=6, seed=9)
    resumed.load_state_dict(builder.state_dict())
    for _ in range(12):
        original = builder.select(builder.propose(bank), 0.3)
        copy = resumed.select(resumed.propose(bank), 0.3)
        np.testing.assert_array_equal(original.pair_indices, copy.pair_indices)
        assert (original.epoch, original.batch_index) == (copy.epoch, copy.batch_index)


def test_builder_state_dict_rejects_other_batch_size() -> None:
    state = BatchBuilder(make_image_ids(20), 4, 8, 2, seed=0).state_dict()
    with pytest.raises(MiningError):
        BatchBuilder(make_image_ids(20), 6, 8, 2, seed=0).load_state_dict(state)


# ---- false negatives ----------------------------------------------------------


@dataclass
class TinyPairs:
    captions: list[str]
    image_ids: np.ndarray
    human_matches: np.ndarray | None


def make_tiny_pairs() -> TinyPairs:
    captions = [
        "A dog runs on grass.",        # 0, image 0
        "a dog  runs on grass",        # 1, image 0
        "A black cat sleeps.",         # 2, image 1
        "A DOG runs on grass!",        # 3, image 2: same normal form as pair 0
        "Two men play chess.",         # 4, image 3
        "Children swim in a pool.",    # 5, image 4
        "Kids are swimming in a pool.",  # 6, image 5
    ]
    image_ids = np.array([0, 0, 1, 2, 3, 4, 5])
    human_matches = np.array([[3, 2]])  # image 3 also matches pair 2's caption
    return TinyPairs(captions, image_ids, human_matches)


def test_caption_normal_form_basic() -> None:
    assert caption_normal_form("  A Dog, runs!  ") == "a dog runs"


def test_oracle_labels_each_kind() -> None:
    pairs = make_tiny_pairs()
    embeddings = np.eye(7, dtype=np.float32)
    embeddings[6] = embeddings[5]
    oracle = FalseNegativeOracle(pairs, sentence_threshold=0.9, sentence_embeddings=embeddings)
    anchors = np.array([0, 0, 4, 5, 2, 0])
    negatives = np.array([1, 3, 2, 6, 5, -1])
    np.testing.assert_array_equal(oracle.label(anchors, negatives), [1, 2, 3, 4, 0, 0])


def test_oracle_rate_ignores_missing_negatives() -> None:
    oracle = FalseNegativeOracle(make_tiny_pairs())
    assert oracle.rate(np.array([0, 2, 4]), np.array([1, 5, -1])) == 0.5


def test_oracle_requires_embeddings_with_threshold() -> None:
    with pytest.raises(MiningError):
        FalseNegativeOracle(make_tiny_pairs(), sentence_threshold=0.8)


def test_encode_sentences_cache(tmp_path: Path) -> None:
    captions = make_tiny_pairs().captions
    embeddings = encode_sentences(captions, tmp_path)
    cached = encode_sentences(captions, tmp_path)
    assert embeddings.shape == (7, 384)
    assert len(list(tmp_path.glob("sentence_embeddings_*.npy"))) == 1
    np.testing.assert_array_equal(cached, embeddings)
    assert embeddings[5] @ embeddings[6] > embeddings[5] @ embeddings[4]


# ---- background search ----------------------------------------------------------


def run_steps(background: bool, backend: str, n_steps: int = 7,
              precision: str = "auto") -> list[tuple[np.ndarray, ...]]:
    """Steps of the trainer protocol with random bank updates; return each step's proposal and batch."""
    n_pairs = 40
    bank = make_bank(n_pairs, seed=3)
    builder = BatchBuilder(make_image_ids(n_pairs), 16, search_space=24, top_k=5, seed=2, backend=backend,
                           precision="float32" if backend == "faiss" else precision)
    rng = np.random.default_rng(4)
    generator = torch.Generator().manual_seed(5)
    records = []
    proposal = builder.propose(bank)
    with BackgroundSearch(builder) as search:
        for _ in range(n_steps):
            batch = builder.select(proposal, rng.uniform(0.0, 1.0, proposal.anchors.size))
            records.append((proposal.candidates, proposal.features, batch.pair_indices, batch.negatives))
            if background:
                search.submit(bank)
            else:
                next_proposal = builder.propose(bank)

            # The training step's new embeddings of the batch's pairs.
            shape = (batch.pair_indices.size, DIM)
            image = torch.nn.functional.normalize(torch.randn(shape, generator=generator), dim=1)
            text = torch.nn.functional.normalize(torch.randn(shape, generator=generator), dim=1)
            if background:
                next_proposal = search.result()
            bank.update(batch.pair_indices, image, text)
            proposal = next_proposal
    return records


@pytest.mark.parametrize(("backend", "precision"), [("faiss", "auto"), ("torch", "float32"), ("torch", "bfloat16")])
def test_background_search_equals_inline(backend: str, precision: str) -> None:
    inline = run_steps(background=False, backend=backend, precision=precision)
    background = run_steps(background=True, backend=backend, precision=precision)
    assert len(inline) == len(background)
    for step, (expected, actual) in enumerate(zip(inline, background)):
        for name, want, got in zip(("candidates", "features", "pair_indices", "negatives"), expected, actual):
            assert np.array_equal(want, got), f"step {step}: {name} differs"


def test_background_search_crosses_epoch_boundary() -> None:
    records = run_steps(background=True, backend="faiss")
    placed = np.concatenate([record[2] for record in records[:3]])
    assert np.array_equal(np.sort(placed), np.arange(40))


def test_background_search_rejects_double_submit() -> None:
    bank = make_bank(40)
    builder = BatchBuilder(make_image_ids(40), 8, search_space=20, top_k=4, seed=0)
    with BackgroundSearch(builder) as search:
        search.submit(bank)
        with pytest.raises(MiningError):
            search.submit(bank)
        search.result()


def test_background_search_result_requires_submit() -> None:
    builder = BatchBuilder(make_image_ids(40), 8, search_space=20, top_k=4, seed=0)
    with BackgroundSearch(builder) as search, pytest.raises(MiningError):
        search.result()


def test_background_search_reraises_worker_error() -> None:
    builder = BatchBuilder(make_image_ids(40), 8, search_space=20, top_k=4, seed=0)
    with BackgroundSearch(builder) as search:
        search.submit(make_bank(30))
        with pytest.raises(MiningError):
            search.result()
