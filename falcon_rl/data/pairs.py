"""Image-caption pairs of one split, decoded and ready for training or evaluation."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch


class DataError(ValueError):
    """A dataset path, file or option that cannot be used, with the reason in the message."""


@dataclass
class ImageTextPairs:
    """The image-caption pairs of one split.

    Each image has one or more captions, and each caption is one pair. Pairs that share an
    image are positives of each other.

    :param split: ``"train"``, ``"val"`` or ``"test"``.
    :param images: uint8 tensor ``[n_images, 3, S, S]``, RGB, decoded and resized once.
    :param image_names: file name or path of each image, ``[n_images]``,
        e.g. ``"1000268201_693b08cb0e.jpg"``.
    :param captions: caption text of each pair, ``[n_pairs]``.
    :param caption_keys: identifier of each caption, ``[n_pairs]``,
        e.g. ``"1000268201_693b08cb0e.jpg#0"``.
    :param image_ids: int64 array ``[n_pairs]``, the index into ``images`` of each pair's image.
    :param human_matches: int64 array ``[m, 2]`` of (image index, pair index) rows. People
        judged that the pair's caption describes the image, although the caption belongs to
        another image. ``None`` when the dataset has no human judgments.
    :param report: counts of skipped and converted inputs by kind (see ``falcon_rl.data.report``).
    """

    split: str
    images: torch.Tensor
    image_names: list[str]
    captions: list[str]
    caption_keys: list[str]
    image_ids: np.ndarray
    human_matches: np.ndarray | None
    report: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._validate_images()
        self._validate_pairs()
        self._validate_human_matches()

    def __len__(self) -> int:
        return self.n_pairs

    @property
    def n_pairs(self) -> int:
        """Number of image-caption pairs, one per caption."""
        return len(self.captions)

    @property
    def n_images(self) -> int:
        """Number of distinct images."""
        return int(self.images.shape[0])

    def _validate_images(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise DataError(
                f"{self.split}: images must be a uint8 tensor [n, 3, S, S], "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.image_names) != self.images.shape[0]:
            raise DataError(
                f"{self.split}: {len(self.image_names)} image names for {self.images.shape[0]} images"
            )

    def _validate_pairs(self) -> None:
        n_pairs = len(self.captions)
        if len(self.caption_keys) != n_pairs or self.image_ids.shape != (n_pairs,):
            raise DataError(
                f"{self.split}: captions ({n_pairs}), caption_keys ({len(self.caption_keys)}) "
                f"and image_ids {self.image_ids.shape} must have the same length"
            )
        if self.image_ids.dtype != np.int64:
            raise DataError(f"{self.split}: image_ids must be int64, got {self.image_ids.dtype}")
        if n_pairs and (self.image_ids.min() < 0 or self.image_ids.max() >= self.n_images):
            raise DataError(
                f"{self.split}: image_ids must lie in [0, {self.n_images}), "
                f"got [{self.image_ids.min()}, {self.image_ids.max()}]"
            )

    def _validate_human_matches(self) -> None:
        matches = self.human_matches
        if matches is None:
            return
        if matches.dtype != np.int64 or matches.ndim != 2 or matches.shape[1] != 2:
            raise DataError(
                f"{self.split}: human_matches must be int64 [m, 2], "
                f"got {matches.dtype} {matches.shape}"
            )
        if len(matches) and (
            matches[:, 0].min() < 0
            or matches[:, 0].max() >= self.n_images
            or matches[:, 1].min() < 0
            or matches[:, 1].max() >= self.n_pairs
        ):
            raise DataError(f"{self.split}: human_matches index an image or pair out of range")
