"""Augmentation of aligned face crops for training, reproducible item by item whatever the loader does."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FaceAugment", "finish_on_device"]


class FaceAugment:
    """Light augmentation of an aligned face crop, as a :class:`mtanet.data.FrameDataset` ``transform``.

    On the uint8 ``(3, H, W)`` crop: a random square crop of ``crop_scale``..1 of the area at a random position
    (a small zoom and translation; faces are aligned, so no rotation or aspect change), a horizontal flip with
    probability ``flip`` (valence-arousal, the expression and the eight AUs of ABAW 2020 are left-right symmetric),
    resized to ``image_size`` (antialiased), then contrast and brightness factors in ``[1 - c, 1 + c]`` and
    ``[1 - b, 1 + b]``. Returns float ``(3, image_size, image_size)`` on the 0-255 scale, which the dataset then
    scales to [0, 1] without resizing again.

    Randomness comes from ``self.rng``, which the trainer reseeds for every item from (seed, epoch, batch, slot)
    (see :class:`mtanet.data.loading.KeyedBatches`):
    the augmentation of a frame then does not depend on the number of loader workers or ranks, nor on where a run
    was interrupted and resumed.
    """

    def __init__(self, image_size: int, flip: float = 0.5, crop_scale: float = 0.8, brightness: float = 0.2,
                 contrast: float = 0.2):
        self.image_size = image_size
        self.flip = flip
        self.crop_scale = crop_scale
        self.brightness = brightness
        self.contrast = contrast
        self.rng = np.random.default_rng(0)

    def reseed(self, key: Sequence[int]) -> None:
        self.rng = np.random.default_rng(list(key))

    def draw(self, height: int, width: int) -> tuple[int, int, int, bool, float, float]:
        """One item's random choices ``(side, top, left, flip, contrast, brightness)`` from ``self.rng``."""
        r = self.rng
        # every draw is made every time, so one item's draws never shift another's
        side = max(1, int(round(math.sqrt(r.uniform(self.crop_scale, 1.0)) * min(height, width))))
        top, left = int(r.integers(0, height - side + 1)), int(r.integers(0, width - side + 1))
        flip = bool(r.random() < self.flip)
        contrast = float(r.uniform(1.0 - self.contrast, 1.0 + self.contrast))
        brightness = float(r.uniform(1.0 - self.brightness, 1.0 + self.brightness))
        return side, top, left, flip, contrast, brightness

    def geometry(self, image, side: int, top: int, left: int, flip: bool):
        """The crop, flip and resize of a uint8 ``(3, H, W)`` image: uint8 ``(3, image_size, image_size)``."""
        x = image[:, top: top + side, left: left + side]
        if flip:
            x = x.flip(-1)
        if side != self.image_size:
            # resized while still uint8 and channels-last: torch's fast antialiased kernel, twice the float path's
            # speed on CPU (this runs once per training image, on the step's critical path)
            x = F.interpolate(x[None].contiguous(memory_format=torch.channels_last),
                              size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        return x

    @staticmethod
    def photometric(x, mean, contrast, brightness):
        """Contrast about the image mean, then brightness, on float 0-255 (one image, or a batch with (B,1,1,1) factors)."""
        return ((x - mean) * contrast + mean).mul_(brightness).clamp_(0.0, 255.0)

    def __call__(self, image):
        side, top, left, flip, contrast, brightness = self.draw(image.shape[1], image.shape[2])
        x = self.geometry(image, side, top, left, flip).float()
        return self.photometric(x, x.mean(), contrast, brightness)

    def batch(self, images: Sequence, keys: Sequence[Sequence[int]]):
        """``images`` augmented as a float ``(B, 3, S, S)`` batch in [0, 1], item ``i`` reseeded from ``keys[i]``.

        :meth:`mtanet.data.FrameDataset.batch` calls it when given keys. Equal, bit for bit, to stacking
        ``FrameDataset`` items that use this transform (tested): the crops run per image, the float arithmetic once
        for the batch. Each mean is taken on the image's own crop, as in the
        single-image path, so that the order of the sum, and with it the rounding, is the same.
        """
        crops, means, contrasts, brightnesses = [], [], [], []
        for image, key in zip(images, keys):
            self.reseed(key)
            side, top, left, flip, contrast, brightness = self.draw(image.shape[1], image.shape[2])
            crop = self.geometry(image, side, top, left, flip)
            crops.append(crop)
            means.append(crop.float().mean())
            contrasts.append(contrast)
            brightnesses.append(brightness)
        shape = (len(crops), 1, 1, 1)
        x = torch.stack(crops).float()
        mean = torch.stack(means).view(shape)
        factors = torch.tensor([contrasts, brightnesses], dtype=torch.float32).view(2, *shape)
        return self.photometric(x, mean, factors[0], factors[1]).div_(255.0)

    def batch_uint8(self, images: Sequence, keys: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of :meth:`batch` a loader worker does when the float arithmetic runs on the GPU: the crops as a
        uint8 ``(B, 3, S, S)`` batch (a quarter of the float batch's bytes) and each item's ``(contrast,
        brightness)`` as a float32 ``(B, 2)``; :func:`finish_on_device` then gives :meth:`batch`'s result, up to
        float rounding (the mean of each crop is one batched reduction there)."""
        crops, factors = [], []
        for image, key in zip(images, keys):
            self.reseed(key)
            side, top, left, flip, contrast, brightness = self.draw(image.shape[1], image.shape[2])
            crops.append(self.geometry(image, side, top, left, flip))
            factors.append((contrast, brightness))
        return torch.stack(crops), torch.tensor(factors, dtype=torch.float32).view(len(crops), 2)


def finish_on_device(images: torch.Tensor, factors: torch.Tensor | None, image_size: int) -> torch.Tensor:
    """Float ``(B, 3, image_size, image_size)`` model input in [0, 1] from a uint8 batch, where ``images`` is (on the
    GPU in training): with ``factors`` (from :meth:`FaceAugment.batch_uint8`) the contrast about each image's mean and
    the brightness of :meth:`FaceAugment.batch`; without, the plain scaling of :meth:`mtanet.data.FrameDataset.batch`
    (resized, antialiased, when the images are not ``image_size`` already)."""
    x = images.float()
    if factors is not None:
        shape = (x.shape[0], 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = FaceAugment.photometric(x, mean, factors[:, 0].reshape(shape), factors[:, 1].reshape(shape))
    x = x.div_(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x
