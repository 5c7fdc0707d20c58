"""Shared pytest configuration."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")
    # The test models are tiny: one thread avoids thread start-up and contention costs that
    # outweigh the parallel speed-up, and keeps timings steady on a shared machine.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def embedded_splits():
    """The embedded Flickr8k subset at the ``test`` preset's image size, loaded once per session."""
    from falcon_rl.data import load_splits

    return load_splits(None, image_size=32, progress=False)


@pytest.fixture
def test_config():
    """A run configuration small enough for a test: the ``test`` preset, batch 16, 6 steps."""
    from falcon_rl.config import TrainConfig

    return TrainConfig(preset="test", batch_size=16, search_space=128, top_k=8, steps=6, eval_every=0,
                       progress=False, scheduler="hardest", warmup_steps=0)
