"""DALI loader contract on CPU (device_id=None) and, marked gpu, with the mixed decoder."""

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from _shard_truth import split_labels

from pipelines.dali import DaliLoader
from pipelines.manifest import ShardsError
from pipelines.plan import resolve_split
from pipelines.spec import PreprocessSpec

SIZE = 32


def _loader(shards, split="val", train=False, device="cpu", **kw):
    spec = kw.pop("spec", None) or PreprocessSpec.from_manifest(shards, image_size=SIZE)
    return DaliLoader(resolve_split(shards, split), spec=spec, per_device_batch_size=kw.pop("bs", 3), train=train,
                      device=device, **kw)


def _check_contract(batches, shards, split, device, channels=1):
    truth = split_labels(shards, split)
    spec = PreprocessSpec.from_manifest(shards)
    for batch in batches:
        assert batch.images.shape[1:] == (channels, SIZE, SIZE)
        assert batch.images.dtype == torch.float32 and batch.images.device.type == device
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        assert batch.labels.dtype == torch.int64 and batch.labels.device.type == device
        assert batch.labels.cpu().tolist() == [truth[key] for key in batch.keys]
        pixels = batch.images.float() * spec.std + spec.mean
        # Normalized with the manifest stats: un-normalizing lands back in [0, 1].
        assert pixels.min() >= -1e-3 and pixels.max() <= 1 + 1e-3
    return truth


def test_eval_yields_every_sample_once_with_correct_labels(tiny_shards):
    loader = _loader(tiny_shards, "val")
    batches = list(loader)
    truth = _check_contract(batches, tiny_shards, "val", "cpu")
    keys = [key for batch in batches for key in batch.keys]
    assert sorted(keys) == sorted(truth) and len(keys) == len(truth) == loader.num_samples
    assert len(batches) == len(loader)
    mean = torch.cat([b.images for b in batches]).mean().item()
    # Normalized by train-split stats: the mean is near 0, far from the raw [0, 1] pixel mean.
    assert abs(mean) < 1.0


def test_train_drops_partial_batch_and_augments_randomly(tiny_shards):
    loader = _loader(tiny_shards, "train", train=True, bs=8, seed=3)
    first = list(loader)
    assert len(first) == len(loader) == loader.num_samples // 8
    assert all(len(b.keys) == 8 for b in first)
    keys = [k for b in first for k in b.keys]
    assert len(set(keys)) == len(keys)
    _check_contract(first, tiny_shards, "train", "cpu")
    again = list(_loader(tiny_shards, "train", train=True, bs=8, seed=3))
    assert [b.keys for b in again] == [b.keys for b in first]
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, again, strict=True))
    loader.set_epoch(1)
    next_epoch = list(loader)
    assert [b.keys for b in next_epoch] != [b.keys for b in first]
    assert loader.builds == 1  # one pipeline for every epoch, not one per epoch
    other_seed = list(_loader(tiny_shards, "train", train=True, bs=8, seed=4))
    assert not torch.equal(other_seed[0].images, first[0].images)


def test_eval_is_deterministic(tiny_shards):
    a, b = list(_loader(tiny_shards, "test", seed=1)), list(_loader(tiny_shards, "test", seed=2))
    assert [x.keys for x in a] == [y.keys for y in b]
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b, strict=True))
    # The same pipeline again: the padded last batch closed the reader's epoch, so it starts over exactly.
    loader = _loader(tiny_shards, "test", seed=1)
    for epoch in range(3):
        again = list(loader)
        assert [x.keys for x in again] == [y.keys for y in a], epoch
        assert all(torch.equal(x.images, y.images) for x, y in zip(a, again, strict=True))
    assert loader.builds == 1
    # An abandoned epoch (an exception mid-evaluation) must not shift the next one.
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    assert [x.keys for x in loader] == [y.keys for y in a]


def test_bf16_output_is_what_a_bf16_model_consumes(tiny_shards):
    fp32 = list(_loader(tiny_shards, "val"))
    bf16 = list(_loader(tiny_shards, "val", dtype=torch.bfloat16))
    for a, b in zip(fp32, bf16, strict=True):
        assert b.images.dtype == torch.bfloat16 and b.images.is_contiguous(memory_format=torch.channels_last)
        assert b.keys == a.keys
        # float16 from DALI, bfloat16 on the device: within bf16 rounding (8 bits of mantissa) of fp32.
        assert (b.images.float() - a.images).abs().max() <= 2 ** -7 * a.images.abs().max() + 1e-3


def test_train_state_resumes_the_exact_stream(tiny_shards):
    loader = _loader(tiny_shards, "train", train=True, bs=8, seed=3)
    list(loader)
    state = loader.state()
    assert isinstance(state, bytes) and state
    expected = list(loader) + list(loader)
    fresh = _loader(tiny_shards, "train", train=True, bs=8, seed=3)
    fresh.load_state(state)
    got = list(fresh) + list(fresh)
    assert [b.keys for b in got] == [b.keys for b in expected]
    assert all(torch.equal(a.images, b.images) for a, b in zip(expected, got, strict=True))
    assert _loader(tiny_shards, "val").state() is None


def test_three_channels_replicate_gray(tiny_shards):
    spec = PreprocessSpec.from_manifest(tiny_shards, image_size=SIZE, channels=3)
    batch = next(iter(_loader(tiny_shards, "val", spec=spec)))
    _check_contract([batch], tiny_shards, "val", "cpu", channels=3)
    assert torch.equal(batch.images[:, 0], batch.images[:, 2])


def test_missing_shard_names_path_and_command(tiny_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    victim = sorted((copy / "val").glob("*.tar"))[0]
    victim.unlink()
    with pytest.raises(ShardsError, match=r"(?s)" + victim.name + ".*make_shards.py"):
        resolve_split(copy, "val")
    with pytest.raises(ShardsError, match="make_shards.py"):
        resolve_split(tmp_path / "nowhere", "val")


def test_sample_without_cls_is_an_error_naming_it(tiny_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    tar_path = sorted((copy / "val").glob("*.tar"))[0]
    with tarfile.open(tar_path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    dropped = next(m.name for m, _ in members if m.name.endswith(".cls"))
    with tarfile.open(tar_path, "w") as dst:
        for member, data in members:
            if member.name != dropped:
                dst.addfile(member, io.BytesIO(data))
    wds2idx = Path(sys.executable).parent / "wds2idx"
    subprocess.run([str(wds2idx), str(tar_path), str(tar_path.with_suffix(".idx"))], check=True, capture_output=True)
    key = dropped.split(".")[0]
    with pytest.raises(ShardsError, match=rf"sample {key} in shard .*{tar_path.name} has no \.cls"):
        list(_loader(copy, "val"))


def test_tar_truncated_after_resolving_says_truncated(tiny_shards, tmp_path):
    """A tar cut short under a running job: DALI's "offset outside the archive" is named as truncation."""
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    loader = _loader(copy, "val")
    tar = loader.shards.tars[0]
    with open(tar, "r+b") as handle:
        handle.truncate(2048)
    with pytest.raises(ShardsError, match=rf"truncated tar: shard .*{tar.name} is 2048 bytes, its index places "
                                          rf"sample val-0000000\d beyond"):
        list(loader)


@pytest.mark.gpu
def test_mixed_decoder_on_gpu_same_contract_and_close_to_cpu(tiny_shards):
    gpu = list(_loader(tiny_shards, "val", device="cuda"))
    _check_contract(gpu, tiny_shards, "val", "cuda")
    cpu = list(_loader(tiny_shards, "val"))
    assert [b.keys for b in gpu] == [b.keys for b in cpu]
    spec = PreprocessSpec.from_manifest(tiny_shards)
    diff = torch.cat([(g.images.cpu() - c.images).abs() for g, c in zip(gpu, cpu, strict=True)]).mean()
    assert diff * spec.std * 255 < 3.0  # nvJPEG vs libjpeg-turbo IDCT rounding, GPU vs CPU resize
    bf16 = next(iter(_loader(tiny_shards, "val", device="cuda", dtype=torch.bfloat16)))
    assert bf16.images.dtype == torch.bfloat16 and bf16.images.device.type == "cuda"
    assert bf16.images.is_contiguous(memory_format=torch.channels_last)
    train = list(_loader(tiny_shards, "train", train=True, device="cuda", bs=8))
    assert len(train) == len(_loader(tiny_shards, "train", train=True, bs=8))
    _check_contract(train, tiny_shards, "train", "cuda")
