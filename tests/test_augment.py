"""Training image augmentation: flips and shifts, reproducible from the generator."""

from __future__ import annotations

import torch

from falcon_rl.training.augment import flip_shift


def images(batch: int = 8, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_flip_shift_keeps_shape_and_dtype():
    out = flip_shift(images(), torch.Generator().manual_seed(1))
    assert out.shape == (8, 3, 16, 16)
    assert out.dtype == torch.float32


def test_flip_shift_same_generator_same_output():
    first = flip_shift(images(), torch.Generator().manual_seed(3))
    second = flip_shift(images(), torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_flip_shift_zero_shift_only_flips():
    batch = images()
    out = flip_shift(batch, torch.Generator().manual_seed(2), max_shift=0.0)
    for row in range(batch.shape[0]):
        assert torch.equal(out[row], batch[row]) or torch.equal(out[row], batch[row].flip(-1))


def test_flip_shift_changes_some_images():
    batch = images(batch=16)
    out = flip_shift(batch, torch.Generator().manual_seed(4))
    changed = [not torch.equal(out[row], batch[row]) for row in range(16)]
    assert sum(changed) >= 8


def test_flip_shift_shifted_content_comes_from_image():
    batch = torch.arange(16.0).view(1, 1, 4, 4).expand(4, 3, 4, 4).contiguous()
    out = flip_shift(batch, torch.Generator().manual_seed(5), max_shift=0.25)
    assert set(out.unique().tolist()) <= set(range(16))
