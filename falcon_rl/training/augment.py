"""Random image augmentation of training batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "flip-shift")


def flip_shift(images: torch.Tensor, generator: torch.Generator, max_shift: float = 0.125) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 and shift it by up to ``max_shift``
    of its size in each direction, filling the border by reflection.

    :param images: preprocessed pixels ``[B, C, H, W]``
    :param generator: a CPU generator; the same state gives the same flips and shifts
    :param max_shift: the largest shift as a fraction of the image size
    :return: a new tensor of the same shape, dtype and device
    """
    batch, _, height, width = images.shape
    pad = int(round(max_shift * min(height, width)))
    flips = torch.rand(batch, generator=generator) < 0.5
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator)
    flipped = torch.where(flips.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)
    if pad == 0:
        return flipped
    padded = F.pad(flipped, (pad, pad, pad, pad), mode="reflect")
    rows = [padded[i, :, top:top + height, left:left + width] for i, (top, left) in enumerate(offsets.tolist())]
    return torch.stack(rows)
