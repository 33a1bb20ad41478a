"""Torch fallback loader: `webdataset` shards -> PIL decode in DataLoader workers -> torchvision v2.

Implements the same `PreprocessSpec` and the same `pipelines.plan` as the DALI loader: identical
rank slices, batch counts and (in evaluation) identical batches in identical order.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from pipelines.augment import Equalize, RandomGamma, RandomNoise
from pipelines.batch import Batch
from pipelines.manifest import FIX_HINT, ShardsError
from pipelines.plan import RankedLoader, SplitShards, rank_range, tar_order
from pipelines.shards import parse_label, split_key
from pipelines.spec import PreprocessSpec


def build_transform(spec: PreprocessSpec, *, train: bool) -> v2.Compose:
    """torchvision v2 version of `pipelines.dali.image_ops` for a PIL grayscale image (same ops, same order)."""
    size = spec.image_size
    if train:
        ops = [v2.RandomResizedCrop(size, scale=spec.train_scale, ratio=spec.train_ratio, antialias=True)]
        if spec.equalize:
            ops.append(Equalize())
        if spec.affine:
            shear = spec.train_affine_shear_deg
            ops.append(v2.RandomAffine(
                spec.train_rotate_deg, translate=(spec.train_affine_translate,) * 2 if spec.train_affine_translate else None,
                scale=tuple(spec.train_affine_zoom), shear=(-shear, shear, -shear, shear) if shear else None,
                interpolation=v2.InterpolationMode.BILINEAR, fill=0))
        elif spec.train_rotate_deg > 0:
            ops.append(v2.RandomRotation(spec.train_rotate_deg, interpolation=v2.InterpolationMode.BILINEAR, fill=0))
        if spec.train_brightness > 0 or spec.train_contrast > 0:
            ops.append(v2.ColorJitter(brightness=spec.train_brightness or None, contrast=spec.train_contrast or None))
        if spec.train_gamma > 0:
            ops.append(RandomGamma(spec.train_gamma))
        if spec.train_blur_sigma > 0:
            sigma = max(0.01, spec.train_blur_sigma)
            ops.append(v2.GaussianBlur(2 * math.ceil(3 * sigma) + 1, sigma=(0.01, sigma)))
        if spec.train_hflip:
            ops.append(v2.RandomHorizontalFlip())
    else:
        ops = [v2.Resize(spec.eval_resize_size, antialias=True), v2.CenterCrop(size)]
        if spec.equalize:
            ops.append(Equalize())
    if spec.channels == 3:
        ops.append(v2.Grayscale(num_output_channels=3))
    ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
    if train and spec.train_noise_std > 0:
        ops.append(RandomNoise(spec.train_noise_std))
    ops.append(v2.Normalize([spec.mean] * spec.channels, [spec.std] * spec.channels))
    if train and spec.train_erase_prob > 0:
        # Fill 0 on the normalized image = the training mean, as DALI's erase after normalisation.
        ops.append(v2.RandomErasing(spec.train_erase_prob, scale=(0.02, 0.2), ratio=(0.3, 3.3), value=0))
    return v2.Compose(ops)


def _shuffled(samples, bufsize: int, rng: random.Random):
    """Buffer shuffle of the still-encoded samples (cheap: nothing is decoded yet)."""
    buffer = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= bufsize:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class _RankStream(IterableDataset):
    """One epoch of one rank's batches; DataLoader worker w builds batches w, w + W, w + 2W, ...

    Every worker reads the rank's tars (reading is cheap next to decoding) and decodes only its own
    batches, so the batch sequence does not depend on the number of workers and the DataLoader's
    round-robin over workers returns it in order.
    """

    def __init__(self, shards: SplitShards, *, spec: PreprocessSpec, train: bool, per_device_batch_size: int,
                 rank: int, world_size: int, seed: int, epoch: int, num_real_batches: int, shuffle_buffer: int):
        self.shards, self.spec, self.train = shards, spec, train
        self.batch_size, self.rank, self.world_size = per_device_batch_size, rank, world_size
        self.seed, self.epoch, self.num_real_batches, self.shuffle_buffer = seed, epoch, num_real_batches, shuffle_buffer

    def _rank_urls(self) -> tuple[list[str], dict[str, int], int, int]:
        order = tar_order(len(self.shards.tars), train=self.train, seed=self.seed, epoch=self.epoch)
        lo, hi = rank_range(self.shards.num_samples, self.rank, self.world_size)
        urls, starts, position = [], {}, 0
        for i in order:
            count = self.shards.samples[i]
            if position < hi and position + count > lo:
                url = str(self.shards.tars[i])
                urls.append(url)
                starts[url] = position
            position += count
        return urls, starts, lo, hi

    def _rank_samples(self):
        urls, starts, lo, hi = self._rank_urls()
        dataset = wds.WebDataset(
            urls, shardshuffle=False, empty_check=False,
            # The plan already picked this rank's tars (in the seeded epoch order) and every worker
            # needs all of them, so both splitters pass the list through unchanged.
            nodesplitter=lambda src: src, workersplitter=lambda src: src)
        shard_of = {str(shard.tar): shard for shard in self.shards.shards}
        seen: dict[str, int] = {}
        for sample in dataset:
            url, key = sample["__url__"], sample["__key__"]
            position = starts[url] + seen.get(url, 0)
            seen[url] = seen.get(url, 0) + 1
            # webdataset, like tarfile, ends a tar silently at a header that does not parse: a key out of the
            # manifest's order (or a short count below) is how that shows, and it must not shrink an evaluation.
            expected = split_key(self.shards.split, shard_of[url].first + seen[url] - 1)
            if key != expected:
                raise ShardsError(f"bad shard {url}: sample {key!r} where the manifest's order says {expected!r} "
                                  f"(a tar header that does not parse, or a tar that disagrees with its index); "
                                  f"{FIX_HINT.format(dir=self.shards.shards_dir)}")
            if position < lo:
                continue
            if position >= hi:
                # Later tars in the list may still hold samples of this rank only if they start before hi.
                continue
            for ext in ("jpg", "cls"):
                if ext not in sample:
                    raise ShardsError(f"sample {key} in shard {url} has no .{ext}; "
                                      f"{FIX_HINT.format(dir=self.shards.shards_dir)}")
            yield sample
        for url in urls:
            if seen.get(url, 0) != shard_of[url].samples:
                raise ShardsError(f"bad shard {url}: reading stops after {seen.get(url, 0)} of the manifest's "
                                  f"{shard_of[url].samples} samples (a tar header that does not parse); "
                                  f"{FIX_HINT.format(dir=self.shards.shards_dir)}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self._rank_samples()
        if self.train:
            stream = _shuffled(stream, self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{self.rank}"))
        transform = build_transform(self.spec, train=self.train)
        rng_state = torch.Generator().manual_seed(
            int(np.random.default_rng([self.seed, self.epoch, self.rank, worker]).integers(2**62))).get_state()
        pending: list[dict] = []
        batch_index = 0
        for position, sample in enumerate(stream):
            batch_index = position // self.batch_size
            if batch_index >= self.num_real_batches:
                break
            if batch_index % num_workers != worker:
                continue
            pending.append(sample)
            if len(pending) == self.batch_size:
                batch, rng_state = self._collate(pending, transform, rng_state)
                pending = []
                yield batch
        if pending:
            batch, rng_state = self._collate(pending, transform, rng_state)
            yield batch

    def _collate(self, samples: list[dict], transform, rng_state: torch.Tensor):
        images, labels, keys = [], [], []
        # Augmentation draws from torch's global RNG; a private state per (seed, epoch, rank, worker)
        # makes batches reproducible and leaves the training process's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(rng_state)
            for sample in samples:
                url, key = sample["__url__"], sample["__key__"]
                label = parse_label(sample["cls"], key=key, tar=url, shards_dir=self.shards.shards_dir)
                try:
                    with Image.open(io.BytesIO(sample["jpg"])) as image:
                        gray = image.convert("L")
                except (OSError, ValueError) as exc:
                    raise ShardsError(f"sample {key} in shard {url} cannot be read ({exc}); "
                                      f"{FIX_HINT.format(dir=self.shards.shards_dir)}") from exc
                images.append(transform(gray))
                labels.append(label)
                keys.append(key)
            rng_state = torch.get_rng_state()
        return (torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys), rng_state


class TorchLoader(RankedLoader):
    """Iterable of `Batch` with the same contract as `pipelines.dali.DaliLoader`."""

    name = "torch"

    def __init__(self, shards: SplitShards, *, spec: PreprocessSpec, per_device_batch_size: int, train: bool,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu", seed: int = 0,
                 num_workers: int = 2, dtype: torch.dtype = torch.float32, shuffle_buffer: int = 1000,
                 reason: str = ""):
        super().__init__(shards, spec=spec, per_device_batch_size=per_device_batch_size, train=train, rank=rank,
                         world_size=world_size, device=device, seed=seed, dtype=dtype, reason=reason)
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer

    def __iter__(self) -> Iterator[Batch]:
        sizes = self.batch_sizes()
        num_real = sum(1 for size in sizes if size > 0)
        stream = _RankStream(self.shards, spec=self.spec, train=self.train,
                             per_device_batch_size=self.per_device_batch_size, rank=self.rank,
                             world_size=self.world_size, seed=self.seed, epoch=self.epoch,
                             num_real_batches=num_real, shuffle_buffer=self.shuffle_buffer)
        workers = min(self.num_workers, num_real)
        loader = DataLoader(stream, batch_size=None, num_workers=workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        yielded = 0
        last = None
        for images, labels, keys in loader:
            last = Batch(images.to(self.device, self.dtype, non_blocking=True, memory_format=torch.channels_last),
                         labels.to(self.device, non_blocking=True), keys)
            yielded += 1
            yield last
        if yielded != num_real:
            raise ShardsError(f"split {self.shards.split!r} of {self.shards.shards_dir} gave {yielded} batches on "
                              f"rank {self.rank}, the manifest promises {num_real}: shards and manifest disagree; "
                              f"{FIX_HINT.format(dir=self.shards.shards_dir)}")
        for _ in range(len(sizes) - num_real):
            # Evaluation filler so every rank yields the same number of batches.
            yield Batch(last.images[-1:], last.labels[-1:], last.keys[-1:])
