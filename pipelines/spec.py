"""One preprocessing spec that both loaders (DALI and the torch fallback) implement."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PreprocessSpec:
    """Image size, normalization and augmentation shared by every loader.

    `mean`/`std` are single-channel statistics of the training shards in [0, 1] (manifest `stats`);
    with `channels=3` the gray image is replicated so ImageNet-shaped stems accept it.
    Training: random resized crop (`train_scale` = fraction of the image area, `train_ratio` =
    width/height), rotation by up to `train_rotate_deg`, brightness and contrast factors drawn
    from [1 - x, 1 + x], horizontal flip off by default because chest anatomy is not mirror
    symmetric (the heart sits on the left). Evaluation: resize the shorter side to
    `round(image_size / eval_crop_fraction)` and take the centred `image_size` square.
    """

    image_size: int = 224
    channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    train_scale: tuple[float, float] = (0.5, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    train_rotate_deg: float = 7.0
    train_brightness: float = 0.2
    train_contrast: float = 0.2
    train_hflip: bool = False
    eval_crop_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"PreprocessSpec.image_size must be >= 8, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"PreprocessSpec.channels must be 1 or 3, got {self.channels}")
        if not 0.0 < self.std:
            raise ValueError(f"PreprocessSpec.std must be > 0, got {self.std}")
        lo, hi = self.train_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"PreprocessSpec.train_scale must satisfy 0 < lo <= hi <= 1, got {self.train_scale}")
        lo, hi = self.train_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"PreprocessSpec.train_ratio must satisfy 0 < lo <= hi, got {self.train_ratio}")
        if not 0.0 <= self.train_brightness < 1.0 or not 0.0 <= self.train_contrast < 1.0:
            raise ValueError("PreprocessSpec.train_brightness/train_contrast must be in [0, 1)")
        if not 0.0 < self.eval_crop_fraction <= 1.0:
            raise ValueError(f"PreprocessSpec.eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}")

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
