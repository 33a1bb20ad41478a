"""The torch fallback's versions of the DALI ops torchvision lacks or computes differently.

Each draws from torch's global RNG, which `pipelines.torch_loader` forks per (seed, epoch, rank, worker),
so augmentation stays reproducible there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def equalize(image: Image.Image) -> Image.Image:
    """Histogram equalisation of an 8-bit gray image as DALI's `fn.equalize` (and OpenCV's equalizeHist)
    compute it: lut = round((cdf - cdf_min) * 255 / (pixels - cdf_min)). PIL's ImageOps.equalize uses another
    rounding and differs from DALI by up to 64 levels on some images, so the loaders would disagree."""
    pixels = np.asarray(image, dtype=np.uint8)
    counts = np.bincount(pixels.ravel(), minlength=256)
    cdf = np.cumsum(counts)
    cdf_min = cdf[np.flatnonzero(counts)[0]]
    if pixels.size == cdf_min:  # one grey level: nothing to spread
        return image
    lut = np.clip(np.round((cdf - cdf_min) * 255.0 / (pixels.size - cdf_min)), 0, 255).astype(np.uint8)
    return Image.fromarray(lut[pixels])


class Equalize:
    def __call__(self, image: Image.Image) -> Image.Image:
        return equalize(image)


class RandomGamma:
    """x -> x ** gamma on an 8-bit PIL image, gamma log-uniform in [1/(1+x), 1+x] (DALI: math.pow, rounded)."""

    def __init__(self, amount: float):
        self.bound = math.log1p(amount)

    def __call__(self, image: Image.Image) -> Image.Image:
        gamma = math.exp((torch.rand(()).item() * 2.0 - 1.0) * self.bound)
        lut = np.clip(np.round((np.arange(256) / 255.0) ** gamma * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(lut[np.asarray(image, dtype=np.uint8)])


class RandomNoise:
    """Additive Gaussian noise on a float C×H×W image in [0, 1], std drawn from [0, max_std]; one noise field
    shared by all channels (3-channel inputs are replicated gray, as in DALI, which adds it before `cat`)."""

    def __init__(self, max_std: float):
        self.max_std = max_std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        std = torch.rand(()).item() * self.max_std
        return (image + std * torch.randn(image.shape[-2:])).clamp(0.0, 1.0)
