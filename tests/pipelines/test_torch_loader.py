"""Torch fallback: same contract as DALI, and the same evaluation batches."""

import shutil

import pytest
import torch
from _shard_edits import garble_header
from _shard_truth import split_labels

from pipelines.dali import DaliLoader
from pipelines.manifest import ShardsError
from pipelines.plan import resolve_split
from pipelines.spec import PreprocessSpec
from pipelines.torch_loader import TorchLoader

SIZE = 32


def _make(cls, shards, split, train=False, **kw):
    spec = PreprocessSpec.from_manifest(shards, image_size=SIZE)
    return cls(resolve_split(shards, split), spec=spec, per_device_batch_size=kw.pop("bs", 4), train=train, **kw)


def test_dali_cpu_and_torch_agree_on_eval_batches(tiny_shards):
    spec = PreprocessSpec.from_manifest(tiny_shards)
    for split in ("val", "test"):
        dali = list(_make(DaliLoader, tiny_shards, split))
        fallback = list(_make(TorchLoader, tiny_shards, split, num_workers=2))
        assert [b.keys for b in dali] == [b.keys for b in fallback]
        assert all(torch.equal(d.labels, t.labels) for d, t in zip(dali, fallback, strict=True))
        same = torch.cat([(d.images - t.images).abs() for d, t in zip(dali, fallback, strict=True)])
        gray_levels = same.mean().item() * spec.std * 255
        # Tolerance 6 gray levels of 255: both decode with libjpeg-turbo, but DALI's antialiased
        # linear resize and PIL's bilinear filter differ in support and rounding, and the resized
        # long side / crop offset may round differently by a pixel. Measured 1-5 on these 96 px images;
        # a wrong pairing (images of different samples) is several times larger, checked below.
        assert gray_levels < 6.0, gray_levels
        a, b = torch.cat([d.images for d in dali]), torch.cat([t.images for t in fallback])
        shuffled = (a - b.roll(1, dims=0)).abs().mean().item() * spec.std * 255
        assert shuffled > 2 * gray_levels


def test_torch_contract_and_labels(tiny_shards):
    truth = split_labels(tiny_shards, "val")
    batches = list(_make(TorchLoader, tiny_shards, "val", num_workers=0))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(truth)
    for b in batches:
        assert b.images.shape[1:] == (1, SIZE, SIZE) and b.images.dtype == torch.float32
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert b.labels.dtype == torch.int64 and b.labels.tolist() == [truth[k] for k in b.keys]


def test_torch_train_reproducible_per_seed_epoch_and_worker_count(tiny_shards):
    one = list(_make(TorchLoader, tiny_shards, "train", train=True, bs=8, seed=5, num_workers=1))
    two = list(_make(TorchLoader, tiny_shards, "train", train=True, bs=8, seed=5, num_workers=2))
    assert len(one) == len(two) == resolve_split(tiny_shards, "train").num_samples // 8
    assert [b.keys for b in one] == [b.keys for b in two]
    keys = [k for b in one for k in b.keys]
    assert len(keys) == len(set(keys))
    loader = _make(TorchLoader, tiny_shards, "train", train=True, bs=8, seed=5, num_workers=1)
    loader.set_epoch(1)
    other = list(loader)
    assert [b.keys for b in other] != [b.keys for b in one]
    # Random augmentation: two epochs never give the same pixels for the same sample.
    first = {k: img for b in one for k, img in zip(b.keys, b.images, strict=True)}
    later = {k: img for b in other for k, img in zip(b.keys, b.images, strict=True)}
    common = sorted(set(first) & set(later))
    assert common and not any(torch.equal(first[k], later[k]) for k in common)


def test_tar_header_that_does_not_parse_is_an_error_not_a_smaller_split(tiny_shards, tmp_path):
    """webdataset ends a tar silently at a bad header: before, one batch of the whole split came back short."""
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    shards = resolve_split(copy, "val")
    tar = shards.tars[0]
    garble_header(tar, 3)  # the first member of the second sample
    loader = _make(TorchLoader, copy, "val", bs=shards.num_samples, num_workers=0)
    with pytest.raises(ShardsError, match=rf"bad shard {tar}: (sample 'val-\d+' where|reading stops after 1 of)"):
        list(loader)
