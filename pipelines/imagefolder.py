"""Seed-style baseline for benchmarks only: torchvision ImageFolder over the original Kaggle folders.

What the seed notebook does: PIL decode to RGB, Resize to a square, ToTensor, Normalize with
ImageNet statistics, in a DataLoader. Kept to measure the speed-up of the shard loaders against.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader
from torchvision import datasets, transforms

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def find_class_root(src: str | Path, split: str = "train") -> Path:
    """The folder holding NORMAL/ and PNEUMONIA/: `src`, `src/<split>` or `src/chest_xray/<split>`."""
    src = Path(src)
    for candidate in (src, src / split, src / "chest_xray" / split):
        if (candidate / "NORMAL").is_dir() and (candidate / "PNEUMONIA").is_dir():
            return candidate
    raise FileNotFoundError(f"no NORMAL/ and PNEUMONIA/ folders under {src} (looked in ., {split}/, "
                            f"chest_xray/{split}/); pass the Kaggle folder, e.g. ../shared/data/kermany-originals-sample")


def build_imagefolder_loader(src: str | Path, *, image_size: int = 224, batch_size: int = 64, num_workers: int = 2,
                             split: str = "train") -> DataLoader:
    transform = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = datasets.ImageFolder(str(find_class_root(src, split)), transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
