"""The acquisition-shift proxy (pipelines/shift.py): deterministic per (key, seed), whatever the batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipelines.batch import Batch
from pipelines.dali import DaliLoader
from pipelines.plan import resolve_split
from pipelines.shift import RANGES, ShiftedBatches, base_split, shift_images, shift_params
from pipelines.spec import PreprocessSpec
from pipelines.torch_loader import TorchLoader

MEAN, STD = 0.48, 0.24


def _batch(n: int = 6, size: int = 40, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, size).view(1, 1, size, 1)
    pixels = (0.2 + 0.6 * yy + 0.1 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)
    images = ((pixels - MEAN) / STD).contiguous(memory_format=torch.channels_last)
    return images, [f"val-{i:08d}" for i in range(n)]


def test_same_keys_same_pixels_whatever_the_batch():
    images, keys = _batch()
    whole = shift_images(images, keys, mean=MEAN, std=STD, seed=0)
    again = shift_images(images, keys, mean=MEAN, std=STD, seed=0)
    torch.testing.assert_close(whole, again, rtol=0, atol=0)
    # Another batching and order (another rank, batch size or loader) gives each key the same pixels.
    order = [4, 1, 5, 0, 3, 2]
    parts = [shift_images(images[order[:2]], [keys[i] for i in order[:2]], mean=MEAN, std=STD, seed=0),
             shift_images(images[order[2:]], [keys[i] for i in order[2:]], mean=MEAN, std=STD, seed=0)]
    torch.testing.assert_close(torch.cat(parts), whole[order], rtol=0, atol=1e-6)


def test_seed_and_key_change_the_perturbation():
    images, keys = _batch()
    zero = shift_images(images, keys, mean=MEAN, std=STD, seed=0)
    one = shift_images(images, keys, mean=MEAN, std=STD, seed=1)
    assert (zero - one).abs().mean(dim=(1, 2, 3)).min() > 0.01
    # The same image under two keys: two sites.
    same = images[:1].expand(2, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    a, b = shift_images(same, ["val-a", "val-b"], mean=MEAN, std=STD, seed=0)
    assert (a - b).abs().mean() > 0.01
    assert shift_params("val-a", 0) == shift_params("val-a", 0) != shift_params("val-a", 1)


def test_parameters_stay_in_their_documented_ranges():
    draws = [shift_params(f"val-{i:08d}", 7) for i in range(300)]
    for name, (lo, hi) in RANGES.items():
        values = np.array([getattr(p, name) for p in draws], dtype=float).ravel()
        assert lo <= values.min() and values.max() <= hi, name
        assert values.max() - values.min() > 0.5 * (hi - lo), f"{name} does not span its range"


def test_shift_keeps_dtype_layout_and_the_image():
    images, keys = _batch()
    for dtype in (torch.float32, torch.bfloat16):
        out = shift_images(images.to(dtype), keys, mean=MEAN, std=STD, seed=0)
        assert out.dtype == dtype and out.shape == images.shape
        assert out.is_contiguous(memory_format=torch.channels_last)
    out = shift_images(images, keys, mean=MEAN, std=STD, seed=0)
    pixels = out * STD + MEAN
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # Still the same radiograph: the shifted image correlates with its source far more than with another one.
    flat, src = out.flatten(1), images.flatten(1)
    own = torch.stack([torch.corrcoef(torch.stack([flat[i], src[i]]))[0, 1] for i in range(len(keys))])
    assert own.min() > 0.5 and (out - images).abs().mean() > 0.05


def test_three_channels_get_one_perturbation():
    images, keys = _batch()
    out = shift_images(images.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last), keys,
                       mean=MEAN, std=STD, seed=0)
    torch.testing.assert_close(out[:, 0], out[:, 2])
    torch.testing.assert_close(out[:, :1], shift_images(images, keys, mean=MEAN, std=STD, seed=0))


def test_base_split_names():
    splits = {"train", "val", "test"}
    assert base_split("val-shifted", splits) == ("val", True)
    assert base_split("val", splits) == ("val", False)
    assert base_split("nope-shifted", splits) == ("nope-shifted", False)  # the caller's missing-split error
    assert base_split("val-shifted", splits | {"val-shifted"}) == ("val-shifted", False)  # a real split wins


def test_shifted_batches_wraps_a_loader(tiny_shards):
    spec = PreprocessSpec.from_manifest(tiny_shards, image_size=32)
    shards = resolve_split(tiny_shards, "val")
    dali = DaliLoader(shards, spec=spec, per_device_batch_size=4, train=False)
    shifted = ShiftedBatches(dali, mean=spec.mean, std=spec.std, seed=0)
    assert len(shifted) == len(dali) and shifted.name == "dali" and shifted.num_samples == dali.num_samples
    batches = list(shifted)
    assert all(isinstance(b, Batch) for b in batches)
    # Both loaders, each sample under the same perturbation: as close as the loaders' clean outputs are
    # (tests/pipelines/test_torch_loader.py: < 6 grey levels on average), far from other samples.
    fallback = ShiftedBatches(TorchLoader(shards, spec=spec, per_device_batch_size=4, train=False, num_workers=0),
                              mean=spec.mean, std=spec.std, seed=0)
    a = torch.cat([b.images for b in batches])
    b = torch.cat([b.images for b in fallback])
    assert [k for x in batches for k in x.keys] == [k for x in fallback for k in x.keys]
    gray_levels = (a - b).abs().mean().item() * spec.std * 255
    assert gray_levels < 6.0, gray_levels
    assert (a - b.roll(1, dims=0)).abs().mean().item() * spec.std * 255 > 2 * gray_levels


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(shift_params("k", 0))])
def test_every_parameter_changes_the_output(field):
    images, keys = _batch(n=1)
    base = shift_params(keys[0], 0)
    from pipelines import shift

    neutral = dict(rotate_deg=0.0, zoom=1.0, border=(0.0, 0.0, 0.0, 0.0), resolution=1.0, blur_sigma=0.0,
                   noise_std=0.0, gamma=1.0, contrast=1.0, exposure=0.0, noise_seed=base.noise_seed)
    strong = dict(rotate_deg=5.0, zoom=1.1, border=(0.06, 0.0, 0.06, 0.0), resolution=2.5, blur_sigma=0.02,
                  noise_std=0.03, gamma=1.5, contrast=1.3, exposure=0.08, noise_seed=base.noise_seed + 1)
    pixels = images[0].float() * STD + MEAN
    plain = shift.shift_image(pixels, shift.ShiftParams(**neutral))
    torch.testing.assert_close(plain, pixels, atol=1e-5, rtol=0)  # neutral parameters: the identity
    changed = shift.shift_image(pixels, shift.ShiftParams(**{**neutral, field: strong[field]}))
    if field == "noise_seed":  # without noise the seed has nothing to act on
        assert torch.equal(changed, plain)
    else:
        assert (changed - plain).abs().mean() > 1e-3, field
