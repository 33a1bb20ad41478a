"""DALI loader: webdataset shards -> decode (GPU `mixed` or CPU) -> crop/resize/augment -> normalized HWC.

`image_ops` is the pure graph (what happens to one batch of JPEG bytes); `wds_pipeline` adds the
reader; `DaliLoader` is the thin iterator that turns pipeline outputs into `Batch`es on the device,
following `pipelines.plan` for rank slices and batch counts.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipelines.batch import Batch
from pipelines.manifest import FIX_HINT, ShardsError
from pipelines.plan import RankedLoader, SplitShards, rank_range
from pipelines.shards import parse_label, read_index, sample_key, split_key
from pipelines.spec import PreprocessSpec

_DALI_FLOAT = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}


def image_ops(jpegs, *, spec: PreprocessSpec, train: bool, device: str, hw_decoder_load: float = 0.65,
              dtype=types.FLOAT):
    """JPEG bytes -> normalized `image_size`² HWC images with `spec.channels` channels.

    `device` is "gpu" (nvJPEG `mixed` decode, every later op on the GPU) or "cpu". Training
    decodes only the random crop window (`decoders.image_random_crop`, ROI decoding), which is
    cheaper than decoding the whole radiograph and cropping afterwards. Training order: crop and resize,
    [equalize], geometry (rotation, or one affine warp with shear/shift/zoom), brightness/contrast, gamma,
    blur, noise, normalize, random erasing; `pipelines.torch_loader.build_transform` follows the same order.
    """
    size = spec.image_size
    decode_device = "mixed" if device == "gpu" else "cpu"
    decode_args = {"hw_decoder_load": hw_decoder_load} if device == "gpu" else {}
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, device=decode_device, output_type=types.GRAY, random_area=list(spec.train_scale),
            random_aspect_ratio=list(spec.train_ratio), num_attempts=10, **decode_args)
        images = fn.resize(images, resize_x=size, resize_y=size, antialias=True, interp_type=types.INTERP_LINEAR)
        if spec.equalize:
            images = fn.equalize(images)
        if spec.affine:
            images = fn.warp_affine(images, matrix=_random_affine(spec), fill_value=0, inverse_map=False,
                                    interp_type=types.INTERP_LINEAR)
        elif spec.train_rotate_deg > 0:
            angle = fn.random.uniform(range=[-spec.train_rotate_deg, spec.train_rotate_deg])
            images = fn.rotate(images, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_LINEAR)
        if spec.train_brightness > 0 or spec.train_contrast > 0:
            images = fn.brightness_contrast(
                images,
                brightness=fn.random.uniform(range=[1 - spec.train_brightness, 1 + spec.train_brightness]),
                contrast=fn.random.uniform(range=[1 - spec.train_contrast, 1 + spec.train_contrast]))
        images = _degrade(images, spec)
        crop_args = {}
        mirror = fn.random.coin_flip() if spec.train_hflip else 0
    else:
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.GRAY, **decode_args)
        images = fn.resize(images, resize_shorter=spec.eval_resize_size, antialias=True,
                           interp_type=types.INTERP_LINEAR)
        crop_args = {"crop": (size, size), "crop_pos_x": 0.5, "crop_pos_y": 0.5}
        if spec.equalize:
            # Equalised after the crop, as in training and in the torch loader: the histogram is the crop's.
            images = fn.equalize(fn.crop(images, **crop_args))
            crop_args = {}
        mirror = 0
    if spec.channels == 3:
        images = fn.cat(images, images, images, axis=2)
    images = fn.crop_mirror_normalize(
        images, dtype=dtype, output_layout="HWC", mirror=mirror,
        mean=[spec.mean * 255.0] * spec.channels, std=[spec.std * 255.0] * spec.channels, **crop_args)
    if train and spec.train_erase_prob > 0:
        images = _random_erase(images, spec.train_erase_prob)
    return images


def _random_affine(spec: PreprocessSpec):
    """Per-sample source->destination matrix: zoom, rotation and shear about the centre, then a shift
    (torchvision's RandomAffine composes the same four)."""
    size = spec.image_size
    centre = [size / 2.0, size / 2.0]
    lo, hi = spec.train_affine_zoom
    # DALI's uniform needs hi > lo; a fixed zoom (lo == hi) is a constant.
    zoom = fn.stack(*[fn.random.uniform(range=[lo, hi])] * 2) if hi > lo else [lo, lo]
    matrix = fn.transforms.scale(scale=zoom, center=centre)
    if spec.train_rotate_deg > 0:
        degrees = spec.train_rotate_deg
        matrix = fn.transforms.rotation(matrix, angle=fn.random.uniform(range=[-degrees, degrees]), center=centre)
    if spec.train_affine_shear_deg > 0:
        shear = spec.train_affine_shear_deg
        matrix = fn.transforms.shear(matrix, angles=fn.random.uniform(range=[-shear, shear], shape=2), center=centre)
    if spec.train_affine_translate > 0:
        shift = spec.train_affine_translate * size
        matrix = fn.transforms.translation(matrix, offset=fn.random.uniform(range=[-shift, shift], shape=2))
    return matrix


def _degrade(images, spec: PreprocessSpec):
    """Training-time gamma, blur and noise on uint8 gray images (each skipped when its key is 0)."""
    if spec.train_gamma > 0:
        bound = math.log1p(spec.train_gamma)
        gamma = dmath.exp(fn.random.uniform(range=[-bound, bound]))
        images = fn.cast(dmath.clamp(dmath.pow(images / 255.0, gamma) * 255.0, 0.0, 255.0), dtype=types.UINT8)
    if spec.train_blur_sigma > 0:
        # A floor of 0.01 px: DALI needs sigma > 0, and below ~0.2 px the kernel is a delta anyway.
        images = fn.gaussian_blur(images, sigma=fn.random.uniform(range=[0.01, max(0.01, spec.train_blur_sigma)]))
    if spec.train_noise_std > 0:
        images = fn.noise.gaussian(images, stddev=fn.random.uniform(range=[0.0, spec.train_noise_std * 255.0]))
    return images


def _random_erase(images, prob: float):
    """With probability `prob`, one rectangle of 2-20% of the area (aspect w/h 0.3-3.3) set to 0 = the mean
    (torchvision's RandomErasing on the normalized image); a zero-sized region leaves the image as it is."""
    area = fn.random.uniform(range=[0.02, 0.2])
    aspect = dmath.exp(fn.random.uniform(range=[math.log(0.3), math.log(3.3)]))
    height = dmath.min(dmath.sqrt(area / aspect), 1.0)
    width = dmath.min(dmath.sqrt(area * aspect), 1.0)
    keep = fn.random.coin_flip(probability=prob)
    anchor = fn.stack(fn.random.uniform(range=[0.0, 1.0]) * (1.0 - height),
                      fn.random.uniform(range=[0.0, 1.0]) * (1.0 - width))
    return fn.erase(images, anchor=anchor, shape=fn.stack(height * keep, width * keep), normalized=True,
                    axis_names="HW", fill_value=0.0)


def _name_bad_sample(message: str, shards: SplitShards) -> str | None:
    """Turn DALI's index-file errors ("... index file at "X.idx" line N ...") into the shard and key they mean."""
    found = re.search(r'index file at "([^"]+)" line (\d+)', message)
    if not found:
        return None
    index, line = Path(found.group(1)), int(found.group(2))
    shard = next((s for s in shards.shards if s.index == index), None)
    try:
        samples = read_index(index)
        size = shard.tar.stat().st_size if shard else None
    except (OSError, ShardsError):
        return None
    # DALI numbers lines differently per message, so a truncation is located from the index and the tar's
    # size rather than from its line number.
    beyond = next((i for i, parts in enumerate(samples) if size is not None and
                   max(offset + length for _, offset, length in parts) > size), None)
    if beyond is not None:
        return (f"truncated tar: shard {shard.tar} is {size} bytes, its index places sample "
                f"{split_key(shards.split, shard.first + beyond)} beyond that")
    try:
        fields = index.read_text().splitlines()[line].split()
    except (OSError, IndexError):
        return None
    exts = {fields[i] for i in range(0, len(fields), 4)}
    key = sample_key(fields[3]) if len(fields) >= 4 else f"#{line}"
    missing = sorted({"jpg", "cls"} - exts) or ["a component"]
    return f"sample {key} in shard {index.with_suffix('.tar')} has no {', '.join('.' + m for m in missing)}"


@pipeline_def
def wds_pipeline(*, tars: Sequence[str], indexes: Sequence[str], spec: PreprocessSpec, train: bool, device: str,
                 shard_id: int, num_shards: int, hw_decoder_load: float, dtype):
    """Reader + `image_ops`; outputs (images HWC, cls bytes, source_info bytes naming tar:offset:member).

    Training: `shuffle_after_epoch` draws one permutation of the whole split per epoch from DALI's fixed
    per-epoch seed, identical on every rank, so the ranks' slices of it are disjoint (a per-rank
    `random_shuffle` buffer would only mix neighbouring samples of the same tars). Evaluation: each rank
    keeps its slice (`stick_to_shard`), and the padded last batch closes the reader's epoch.
    """
    jpegs, cls = fn.readers.webdataset(
        paths=list(tars), index_paths=list(indexes), ext=["jpg", "cls"], shard_id=shard_id, num_shards=num_shards,
        shuffle_after_epoch=train, stick_to_shard=not train, pad_last_batch=not train, name="Reader",
        missing_component_behavior="error")
    # The reader's source_info is "<tar>:<offset>:<member name>", so keys come from the tar itself
    # rather than from an extra `.json` read and parse per sample.
    source = fn.get_property(jpegs, key="source_info")
    images = image_ops(jpegs, spec=spec, train=train, device=device, hw_decoder_load=hw_decoder_load, dtype=dtype)
    return images, cls, source


class DaliLoader(RankedLoader):
    """Iterable of `Batch` over one split, for one rank (see `pipelines.plan` for the epoch rules).

    One pipeline serves every epoch: building one (thread pools, nvJPEG and its hardware decoder, memory
    pools, the first prefetch) is paid once per run, not once per epoch. Training reads a fresh global
    shuffle of the split every epoch (`shuffle_after_epoch`, the same permutation on every rank, so rank
    slices stay disjoint) as one continuous stream; evaluation reads the rank's slice in manifest order and
    ends each epoch exactly at the reader's epoch boundary (`pad_last_batch`, `stick_to_shard`).
    Resume stays exact: `state()` is DALI's own checkpoint of the reader position and every random
    generator (bytes, not a pickle), and `load_state()` makes the next pipeline start from it.
    """

    name = "dali"

    def __init__(self, shards: SplitShards, *, spec: PreprocessSpec, per_device_batch_size: int, train: bool,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu", seed: int = 0,
                 num_threads: int = 2, dtype: torch.dtype = torch.float32, hw_decoder_load: float = 0.65,
                 prefetch_queue_depth: int = 2, reason: str = ""):
        super().__init__(shards, spec=spec, per_device_batch_size=per_device_batch_size, train=train, rank=rank,
                         world_size=world_size, device=device, seed=seed, dtype=dtype, reason=reason)
        self.num_threads, self.hw_decoder_load, self.prefetch_queue_depth = num_threads, hw_decoder_load, prefetch_queue_depth
        self._pipe = None
        self._restore: bytes | None = None
        self.builds = 0  # pipelines built so far (1 per run unless an evaluation epoch was abandoned)
        self.build_seconds = 0.0

    def _build(self):
        on_gpu = self.device.type == "cuda"
        # Seeds differ per rank (different augmentations); DALI wants them < 2**31. The epoch is not part of
        # the seed: one pipeline runs every epoch and its checkpoint carries the generators' state.
        base = int(np.random.default_rng([self.seed, self.rank]).integers(0, 2**31 - 1))
        start = time.perf_counter()
        pipe = wds_pipeline(
            batch_size=self.per_device_batch_size, num_threads=self.num_threads,
            device_id=(self.device.index or 0) if on_gpu else None, seed=base,
            prefetch_queue_depth=self.prefetch_queue_depth, enable_checkpointing=self.train,
            checkpoint=self._restore if self.train else None,
            tars=[str(t) for t in self.shards.tars], indexes=[str(i) for i in self.shards.indexes],
            spec=self.spec, train=self.train, device="gpu" if on_gpu else "cpu", shard_id=self.rank,
            num_shards=self.world_size, hw_decoder_load=self.hw_decoder_load,
            dtype=_DALI_FLOAT[self._out_dtype()])
        try:
            pipe.build()
        except RuntimeError as exc:
            raise self._error(exc) from exc
        self.builds += 1
        self.build_seconds += time.perf_counter() - start
        return pipe

    def state(self) -> bytes | None:
        """DALI's checkpoint of the training pipeline (reader position, RNG states) at the next batch."""
        if not self.train:
            return None
        if self._pipe is None:
            return self._restore
        return self._pipe.checkpoint()

    def load_state(self, state: bytes) -> None:
        """Continue from a `state()` taken by an earlier run (the next pipeline is built from it)."""
        if self.train:
            self._restore, self._pipe = bytes(state), None

    def _error(self, exc: Exception) -> ShardsError:
        named = _name_bad_sample(str(exc), self.shards)
        if named:
            return ShardsError(f"{named}; {FIX_HINT.format(dir=self.shards.shards_dir)}")
        return ShardsError(
            f"DALI could not read split {self.shards.split!r} of {self.shards.shards_dir}: {exc}\n"
            f"(a sample without its .jpg or .cls, a truncated tar or a stale .idx); "
            f"{FIX_HINT.format(dir=self.shards.shards_dir)}")

    def _run(self, pipe) -> Batch:
        try:
            images, cls, source = pipe.run()
        except RuntimeError as exc:
            raise self._error(exc) from exc
        sources = [bytes(source.at(i)).decode() for i in range(len(source))]
        keys = [sample_key(info) for info in sources]
        labels = np.array([parse_label(bytes(cls.at(i)), key=key, tar=info.rsplit(":", 2)[0],
                                       shards_dir=self.shards.shards_dir)
                           for i, (key, info) in enumerate(zip(keys, sources, strict=True))], dtype=np.int64)
        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=self._out_dtype(), device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        # NHWC storage seen as NCHW: the channels_last layout the model wants, with no copy.
        batch_images = out.permute(0, 3, 1, 2)
        if batch_images.dtype != self.dtype:
            batch_images = batch_images.to(self.dtype, memory_format=torch.channels_last)
        batch_labels = torch.from_numpy(labels).to(self.device, non_blocking=True)
        return Batch(batch_images, batch_labels, keys)

    def _out_dtype(self) -> torch.dtype:
        # DALI has no bfloat16: for a bf16 model it emits float16 (half the bytes of float32) and the copy to
        # bfloat16 happens once on the device, so the first convolution gets what it computes in, with no cast.
        if self.dtype in _DALI_FLOAT:
            return self.dtype
        return torch.float16 if self.dtype == torch.bfloat16 else torch.float32

    def __iter__(self) -> Iterator[Batch]:
        sizes = self.batch_sizes()
        if self._pipe is None:
            self._pipe = self._build()
        pipe, last, finished = self._pipe, None, False
        try:
            for real in sizes:
                if real == 0:
                    # Evaluation filler so every rank yields the same number of batches.
                    yield Batch(last.images[-1:], last.labels[-1:], last.keys[-1:])
                    continue
                batch = self._run(pipe)
                if real < len(batch.keys):
                    # pad_last_batch repeats the rank's last sample; keep only the real ones.
                    batch = Batch(batch.images[:real], batch.labels[:real], batch.keys[:real])
                last = batch
                yield batch
            finished = True
        finally:
            if not finished and not self.train:
                # An abandoned evaluation epoch leaves the reader mid-slice; the next epoch starts afresh.
                self._pipe = None

    def rank_samples(self) -> int:
        """Samples this rank holds in the current epoch (for logging)."""
        lo, hi = rank_range(self.num_samples, self.rank, self.world_size)
        return hi - lo

