"""A deterministic acquisition-shift proxy: "<split>-shifted" is a split under other scanners' habits.

Why: the carved validation split comes from the same hospitals, machines and processing as training, so it
over-states how a model holds up elsewhere (issue 11: val AUROC 0.994, official test 0.969 with specificity
0.80 at the val-chosen threshold). The test split must never steer training, so this proxy perturbs the
*validation* images the way acquisition differs between sites, and `val_shifted/*` tracks the gap.

Every sample gets its own parameters, drawn from a hash of (sample key, seed): the same image is perturbed
the same way in every run, on every rank, by either loader, whatever the batch it lands in. The ranges
(all per sample, uniform unless noted; fractions are of the image side, so they mean the same at any size):

    geometry     rotation +/-5 deg, zoom 0.92-1.10, border crop 0-6% per side (collimation, framing),
                 resized back; uncovered corners are black, as outside a collimated field
    resolution   detector/downsampling loss: down by a factor 1-2.5 (antialiased) and back up (bilinear)
    blur         Gaussian, sigma 0-0.5% of the side (0-1.1 px at 224 px)
    noise        additive Gaussian, std 0-0.03 of full scale (quantum and electronic noise), before the curve
    curve        the site's processing LUT: gamma 0.65-1.55 (log-uniform), contrast 0.75-1.3 about mid-grey,
                 exposure offset +/-0.08; clipped to [0, 1]

It runs on the normalized batch a loader yields (un-normalize with the spec's mean/std, perturb, normalize
again), so the DALI and torch loaders share one implementation. The normalized batch keeps its dtype and
channels_last layout; 3-channel (replicated gray) images get the same perturbation in every channel.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.batch import Batch

SHIFTED_SUFFIX = "-shifted"

RANGES = {
    "rotate_deg": (-5.0, 5.0),
    "zoom": (0.92, 1.10),
    "border": (0.0, 0.06),  # per side: top, bottom, left, right
    "resolution": (1.0, 2.5),
    "blur_sigma": (0.0, 0.005),
    "noise_std": (0.0, 0.03),
    "gamma": (0.65, 1.55),  # log-uniform
    "contrast": (0.75, 1.3),
    "exposure": (-0.08, 0.08),
}


@dataclass(frozen=True)
class ShiftParams:
    """One sample's perturbation (see the module docstring for units)."""

    rotate_deg: float
    zoom: float
    border: tuple[float, float, float, float]  # top, bottom, left, right
    resolution: float
    blur_sigma: float
    noise_std: float
    gamma: float
    contrast: float
    exposure: float
    noise_seed: int


def shift_params(key: str, seed: int) -> ShiftParams:
    """The parameters of sample `key` under `seed`: a pure function of the two (blake2b, not Python's salted hash)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=16).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))

    def draw(name: str, n: int | None = None):
        lo, hi = RANGES[name]
        return rng.uniform(lo, hi, n)

    lo, hi = RANGES["gamma"]
    return ShiftParams(
        rotate_deg=float(draw("rotate_deg")), zoom=float(draw("zoom")),
        border=tuple(float(v) for v in draw("border", 4)), resolution=float(draw("resolution")),
        blur_sigma=float(draw("blur_sigma")), noise_std=float(draw("noise_std")),
        gamma=float(math.exp(rng.uniform(math.log(lo), math.log(hi)))), contrast=float(draw("contrast")),
        exposure=float(draw("exposure")), noise_seed=int(rng.integers(2**62)))


def _geometry(image: torch.Tensor, p: ShiftParams) -> torch.Tensor:
    """Rotation and zoom about the centre, then the border crop, as one resampling (grid coords in [-1, 1])."""
    top, bottom, left, right = p.border
    angle = math.radians(p.rotate_deg)
    cos, sin = math.cos(angle) / p.zoom, math.sin(angle) / p.zoom
    # Output pixel -> rotated/zoomed position -> the cropped window [-1 + 2 left, 1 - 2 right] x (top, bottom).
    sx, cx = 1.0 - left - right, left - right
    sy, cy = 1.0 - top - bottom, top - bottom
    theta = torch.tensor([[sx * cos, -sx * sin, cx], [sy * sin, sy * cos, cy]], dtype=image.dtype,
                         device=image.device)
    grid = F.affine_grid(theta[None], list(image[None].shape), align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def _resolution(image: torch.Tensor, factor: float) -> torch.Tensor:
    height, width = image.shape[-2:]
    low = (max(4, round(height / factor)), max(4, round(width / factor)))
    if low == (height, width):
        return image
    small = F.interpolate(image[None], size=low, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0]


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.2:  # below a fifth of a pixel the kernel is a delta to float precision
        return image
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    x = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x[0]


def shift_image(image: torch.Tensor, p: ShiftParams) -> torch.Tensor:
    """One C×H×W image with values in [0, 1] (float32) -> the same image as another site would have made it."""
    side = min(image.shape[-2:])
    x = _geometry(image, p)
    x = _resolution(x, p.resolution)
    x = _blur(x, p.blur_sigma * side)
    # Noise drawn on the CPU from the sample's own seed: identical on every device and in every batch.
    noise = torch.randn(image.shape[-2:], generator=torch.Generator().manual_seed(p.noise_seed))
    x = x + p.noise_std * noise.to(x.device, x.dtype)
    x = x.clamp(0.0, 1.0) ** p.gamma
    return ((x - 0.5) * p.contrast + 0.5 + p.exposure).clamp(0.0, 1.0)


def shift_images(images: torch.Tensor, keys: list[str], *, mean: float, std: float, seed: int) -> torch.Tensor:
    """A normalized N×C×H×W batch (a loader's `Batch.images`) under the shift proxy, in its dtype and layout."""
    if images.shape[0] != len(keys):
        raise ValueError(f"{images.shape[0]} images but {len(keys)} keys")
    pixels = images.float() * std + mean
    shifted = torch.stack([shift_image(pixels[i], shift_params(key, seed)) for i, key in enumerate(keys)])
    return ((shifted - mean) / std).to(images.dtype).contiguous(memory_format=torch.channels_last)


def describe(seed: int) -> dict:
    """What a report records about the proxy: the seed and the parameter ranges."""
    return {"seed": seed, "ranges": {k: list(v) for k, v in RANGES.items()}, "module": __name__}


def base_split(split: str, available: Iterable[str]) -> tuple[str, bool]:
    """("val", True) for "val-shifted" when "val" is a split and "val-shifted" is not; else (split, False)."""
    available = set(available)
    if split not in available and split.endswith(SHIFTED_SUFFIX) and split[: -len(SHIFTED_SUFFIX)] in available:
        return split[: -len(SHIFTED_SUFFIX)], True
    return split, False


class ShiftedBatches:
    """The batches of `batches` (a loader, or batches kept from one) under the shift proxy.

    Other attributes (`name`, `reason`, `num_samples`, ...) are the wrapped loader's.
    """

    def __init__(self, batches, *, mean: float, std: float, seed: int):
        self.batches, self.mean, self.std, self.seed = batches, mean, std, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            yield Batch(shift_images(batch.images, batch.keys, mean=self.mean, std=self.std, seed=self.seed),
                        batch.labels, batch.keys)

    def __getattr__(self, name: str):
        if name == "batches":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.batches, name)

