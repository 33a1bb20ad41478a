"""The preprocessing settings (declared once) and the spec both loaders (DALI and the torch fallback) implement."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class PreprocessConfig:
    """Image size, channels, augmentation and eval policy: declared once, here.

    The training config's `data` section is this class plus the data settings (`train.config.DataConfig`
    inherits it), so `--data.train_scale=...` reaches `image_ops` without a copy by hand.
    Training: random resized crop (`train_scale` = fraction of the image area, `train_ratio` =
    width/height), rotation by up to `train_rotate_deg`, brightness and contrast factors drawn
    from [1 - x, 1 + x], horizontal flip off by default because chest anatomy is not mirror
    symmetric (the heart sits on the left). Evaluation: resize the shorter side to
    `round(image_size / eval_crop_fraction)` and take the centred `image_size` square.

    The robustness options (off by default; issue 11, a shifted test set) imitate how acquisition differs
    between sites: an affine warp (shear, shift, zoom; with the rotation, one resampling), a gamma curve,
    Gaussian blur and noise, and random erasing (an occluding marker or cable). Histogram equalisation
    (`equalize`) is not an augmentation but a normalisation of the intensity distribution, applied after the
    crop in training *and* evaluation, so the model never sees a site's raw exposure curve.
    """

    image_size: int = 224  # side of the square network input, pixels
    channels: Literal[1, 3] = 1  # 1: grayscale stem (X-rays are gray); 3: gray replicated, for ImageNet weights
    train_scale: tuple[float, float] = (0.5, 1.0)  # random-resized-crop area fraction (lo, hi)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect ratio range (w/h)
    train_rotate_deg: float = 7.0  # random rotation up to +/- this many degrees; 0 disables
    train_brightness: float = 0.2  # brightness factor drawn from [1 - x, 1 + x]; 0 disables
    train_contrast: float = 0.2  # contrast factor drawn from [1 - x, 1 + x]; 0 disables
    train_hflip: bool = False  # chest anatomy is not mirror-symmetric (heart on the left)
    train_affine_shear_deg: float = 0.0  # random shear along x and y up to +/- this many degrees; 0 disables
    train_affine_translate: float = 0.0  # random shift along x and y up to this fraction of the side; 0 disables
    train_affine_zoom: tuple[float, float] = (1.0, 1.0)  # random zoom factor range (lo, hi), > 1 zooms in; (1, 1) disables
    train_gamma: float = 0.0  # gamma exponent drawn log-uniformly from [1/(1+x), 1+x]; 0 disables
    train_blur_sigma: float = 0.0  # Gaussian blur sigma drawn from [0, x] pixels (at image_size); 0 disables
    train_noise_std: float = 0.0  # additive Gaussian noise, std drawn from [0, x] of full scale; 0 disables
    train_erase_prob: float = 0.0  # probability of erasing one rectangle (0.02-0.2 of the area, aspect 0.3-3.3) to the mean
    equalize: bool = False  # histogram equalisation after the crop, in training AND evaluation (DALI's equalize)
    eval_crop_fraction: float = 1.0  # eval: resize shorter side to image_size / fraction, then centre crop

    def __post_init__(self) -> None:
        problem = preprocess_problem(self)
        if problem:
            raise ValueError(problem)


def preprocess_problem(cfg: PreprocessConfig) -> str | None:
    """The first invalid preprocessing value, as a sentence naming the field; None when all are valid."""
    if cfg.image_size < 8:
        return f"image_size must be >= 8, got {cfg.image_size}"
    if cfg.channels not in (1, 3):
        return f"channels must be 1 or 3, got {cfg.channels}"
    lo, hi = cfg.train_scale
    if not 0.0 < lo <= hi <= 1.0:
        return f"train_scale must satisfy 0 < lo <= hi <= 1, got {tuple(cfg.train_scale)}"
    lo, hi = cfg.train_ratio
    if not 0.0 < lo <= hi:
        return f"train_ratio must satisfy 0 < lo <= hi, got {tuple(cfg.train_ratio)}"
    if not 0.0 <= cfg.train_brightness < 1.0 or not 0.0 <= cfg.train_contrast < 1.0:
        return "train_brightness/train_contrast must be in [0, 1)"
    if cfg.train_rotate_deg < 0:
        return f"train_rotate_deg must be >= 0, got {cfg.train_rotate_deg}"
    if not 0.0 <= cfg.train_affine_shear_deg < 45.0:
        return f"train_affine_shear_deg must be in [0, 45), got {cfg.train_affine_shear_deg}"
    if not 0.0 <= cfg.train_affine_translate < 0.5:
        return f"train_affine_translate must be in [0, 0.5), got {cfg.train_affine_translate}"
    lo, hi = cfg.train_affine_zoom
    if not 0.0 < lo <= hi:
        return f"train_affine_zoom must satisfy 0 < lo <= hi, got {tuple(cfg.train_affine_zoom)}"
    if not 0.0 <= cfg.train_gamma <= 2.0:
        return f"train_gamma must be in [0, 2] (gamma from [1/(1+x), 1+x]), got {cfg.train_gamma}"
    if not 0.0 <= cfg.train_blur_sigma <= 10.0:
        return f"train_blur_sigma must be in [0, 10] pixels, got {cfg.train_blur_sigma}"
    if not 0.0 <= cfg.train_noise_std <= 0.5:
        return f"train_noise_std must be in [0, 0.5] of full scale, got {cfg.train_noise_std}"
    if not 0.0 <= cfg.train_erase_prob <= 1.0:
        return f"train_erase_prob must be in [0, 1], got {cfg.train_erase_prob}"
    if not 0.0 < cfg.eval_crop_fraction <= 1.0:
        return f"eval_crop_fraction must be in (0, 1], got {cfg.eval_crop_fraction}"
    return None


@dataclass(frozen=True)
class PreprocessSpec(PreprocessConfig):
    """What both loaders (DALI and the torch fallback) implement: the preprocessing config plus the
    single-channel `mean`/`std` of the training shards in [0, 1] (manifest `stats`)."""

    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.std:
            raise ValueError(f"PreprocessSpec.std must be > 0, got {self.std}")

    @classmethod
    def from_config(cls, cfg: PreprocessConfig, manifest_or_dir: dict[str, Any] | str | Path) -> PreprocessSpec:
        """The preprocessing fields of `cfg` (any PreprocessConfig, e.g. the training config's `data`) with
        the manifest's stats; no field is named here, so a new setting needs no copy."""
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PreprocessConfig)}
        return cls.from_manifest(manifest_or_dir, **values)

    @property
    def affine(self) -> bool:
        """Whether training warps each image with a random shear/shift/zoom (rotation then joins that warp)."""
        return self.train_affine_shear_deg > 0 or self.train_affine_translate > 0 or \
            tuple(self.train_affine_zoom) != (1.0, 1.0)

    @property
    def eval_resize_size(self) -> int:
        """Shorter-side length before the centre crop in evaluation."""
        return round(self.image_size / self.eval_crop_fraction)

    @classmethod
    def from_manifest(cls, manifest_or_dir: dict[str, Any] | str | Path, **overrides: Any) -> PreprocessSpec:
        """Spec with `mean`/`std` from the manifest's `stats`; keyword overrides win (e.g. `image_size=64`)."""
        if isinstance(manifest_or_dir, dict):
            manifest = manifest_or_dir
            where = "manifest dict"
        else:
            from pipelines.manifest import load_manifest

            manifest = load_manifest(manifest_or_dir)
            where = str(Path(manifest_or_dir) / "manifest.json")
        stats = manifest.get("stats") or {}
        if "mean" not in stats or "std" not in stats:
            raise ValueError(
                f"{where} has no stats.mean/stats.std; rebuild the shards with `python scripts/make_shards.py ...`"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown PreprocessSpec field(s) {unknown}; valid: {sorted(names)}")
        values: dict[str, Any] = {"mean": float(stats["mean"]), "std": float(stats["std"])}
        values.update(overrides)
        return cls(**values)
