"""The robustness augmentations of both loaders (pipelines/dali.py `image_ops`, pipelines/torch_loader.py
`build_transform`): each changes pixels as its key says, and none acts at evaluation (equalize, which is not
an augmentation, acts at both and identically in both loaders).

The inputs are square JPEGs already at the network size, and the baseline disables every other augmentation
(full-image crop), so "augmented minus baseline" isolates the one op under test.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from PIL import Image

from pipelines.dali import image_ops
from pipelines.spec import PreprocessSpec
from pipelines.torch_loader import build_transform

SIZE, COUNT, MEAN, STD = 48, 8, 0.45, 0.25
BASE = PreprocessSpec(image_size=SIZE, train_scale=(1.0, 1.0), train_ratio=(1.0, 1.0), train_rotate_deg=0.0,
                      train_brightness=0.0, train_contrast=0.0, mean=MEAN, std=STD)
FILL = (0.0 - MEAN) / STD  # normalized value of black (warp fill)


def _images() -> list[Image.Image]:
    """Smooth radiograph-like gray images: a vertical gradient, two dark 'lungs', fine texture."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for i in range(COUNT):
        lungs = np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2)) + \
            np.exp(-(((xx - 0.7) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
        texture = 0.08 * np.sin(xx * (20 + i) * np.pi) * np.sin(yy * 17 * np.pi)
        gray = 0.25 + 0.5 * yy - 0.3 * lungs + texture + 0.02 * rng.standard_normal((SIZE, SIZE))
        out.append(Image.fromarray(np.clip(gray * 255, 0, 255).astype(np.uint8), mode="L"))
    return out


IMAGES = _images()


def _jpegs() -> list[np.ndarray]:
    encoded = []
    for image in IMAGES:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=98)
        encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    return encoded


JPEGS = _jpegs()
DECODED = [Image.open(io.BytesIO(j.tobytes())).convert("L") for j in JPEGS]  # what both loaders decode


def dali_batch(spec: PreprocessSpec, train: bool, seed: int = 3) -> np.ndarray:
    """`image_ops` on the CPU: N×H×W×C normalized."""

    @pipeline_def(batch_size=COUNT, num_threads=1, device_id=None, seed=seed)
    def pipe():
        return image_ops(fn.external_source(source=lambda: JPEGS, batch=True), spec=spec, train=train,
                         device="cpu")

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.stack([np.array(out.at(i)) for i in range(COUNT)])


def torch_batch(spec: PreprocessSpec, train: bool, seed: int = 3) -> np.ndarray:
    """`build_transform` on the decoded images: N×H×W×C normalized (the DALI layout, for comparison)."""
    transform = build_transform(spec, train=train)
    torch.manual_seed(seed)
    return np.stack([transform(image).permute(1, 2, 0).numpy() for image in DECODED])


LOADERS = {"dali": dali_batch, "torch": torch_batch}


def _with(**changes) -> PreprocessSpec:
    return dataclasses.replace(BASE, **changes)


def _pixels(normalized: np.ndarray) -> np.ndarray:
    return normalized * STD + MEAN


@pytest.fixture(params=sorted(LOADERS))
def run(request):
    return LOADERS[request.param]


def test_baseline_train_is_the_eval_image(run):
    # The isolation every test below relies on: with augmentation off, training reproduces evaluation.
    np.testing.assert_allclose(run(BASE, train=True), run(BASE, train=False), atol=1.5 / 255 / STD)


def test_gamma_is_a_power_curve_within_range(run):
    amount = 0.5
    base, out = _pixels(run(BASE, train=True)), _pixels(run(_with(train_gamma=amount), train=True))
    gammas = []
    for b, o in zip(base, out, strict=True):
        inside = (b > 0.15) & (b < 0.85) & (o > 0.02)
        gamma = np.median(np.log(o[inside]) / np.log(b[inside]))
        # One exponent explains every pixel (to 8-bit rounding): a curve, not noise or a warp.
        np.testing.assert_allclose(o[inside], b[inside] ** gamma, atol=3 / 255)
        gammas.append(gamma)
    assert all(1 / (1 + amount) - 0.02 <= g <= 1 + amount + 0.02 for g in gammas), gammas
    assert np.ptp(gammas) > 0.1, "every image got the same gamma: not drawn per sample"


def _roughness(images: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(images, axis=2)).mean(axis=(1, 2, 3))


def test_blur_smooths_every_image(run):
    base, out = run(BASE, train=True), run(_with(train_blur_sigma=2.0), train=True)
    ratio = _roughness(out) / _roughness(base)
    assert (ratio <= 1.01).all() and ratio.min() < 0.6, ratio
    assert np.abs(out.mean(axis=(1, 2, 3)) - base.mean(axis=(1, 2, 3))).max() < 0.05  # blur keeps the mean


def test_noise_is_zero_mean_and_bounded(run):
    max_std = 0.06
    base, out = _pixels(run(BASE, train=True)), _pixels(run(_with(train_noise_std=max_std), train=True))
    residual = out - base
    stds = residual.std(axis=(1, 2, 3))
    assert stds.max() <= max_std * 1.1 + 1 / 255 and stds.max() > max_std / 4, stds
    assert np.abs(residual.mean(axis=(1, 2, 3))).max() < 0.01
    # Spatially white: neighbouring residuals are nearly uncorrelated (a blur or warp would correlate them).
    noisy = stds.argmax()
    r = residual[noisy, ..., 0]
    assert abs(np.corrcoef(r[:, :-1].ravel(), r[:, 1:].ravel())[0, 1]) < 0.2


def test_erasing_sets_one_rectangle_to_the_mean(run):
    base, out = run(BASE, train=True), run(_with(train_erase_prob=1.0), train=True)
    for b, o in zip(base, out, strict=True):
        changed = np.abs(o - b)[..., 0] > 1e-6
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        assert rows.size and cols.size, "probability 1 but nothing erased"
        box = o[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert np.abs(box).max() < 1e-6, "the erased box is not the mean (0 after normalisation)"
        area = box.shape[0] * box.shape[1] / SIZE**2
        assert 0.015 <= area <= 0.21, area
    nothing = run(_with(train_erase_prob=0.0), train=True)
    np.testing.assert_array_equal(nothing, base)


def test_zoom_out_leaves_a_black_border(run):
    base, out = run(BASE, train=True), run(_with(train_affine_zoom=(0.6, 0.6)), train=True)
    ring = np.ones((SIZE, SIZE), bool)
    ring[6:-6, 6:-6] = False
    assert np.abs(out[:, ring] - FILL).max() < 0.05, "zoom 0.6: the outer 6 px are outside the source image"
    assert np.abs(base[:, ring] - FILL).min() > 0.2
    # The content shrinks about the centre: the centre pixel stays, the image is not just blanked.
    np.testing.assert_allclose(out[:, SIZE // 2, SIZE // 2], base[:, SIZE // 2, SIZE // 2], atol=0.25)


def test_shear_and_shift_move_content_per_sample(run):
    base = run(BASE, train=True)
    out = run(_with(train_affine_shear_deg=15.0, train_affine_translate=0.15), train=True)
    moved = np.abs(out - base).mean(axis=(1, 2, 3))
    assert moved.min() > 0.05 and np.ptp(moved) > 0.01, moved
    # A warp moves pixels; it does not change the grey levels the image is made of (up to the black fill).
    inside = out > FILL + 0.1
    assert abs(np.median(out[inside]) - np.median(base)) < 0.5


ALL_TRAIN = dict(train_affine_shear_deg=10.0, train_affine_translate=0.1, train_affine_zoom=(0.8, 1.2),
                 train_gamma=0.5, train_blur_sigma=1.5, train_noise_std=0.05, train_erase_prob=1.0,
                 train_rotate_deg=10.0, train_brightness=0.3, train_contrast=0.3, train_scale=(0.3, 1.0))


def test_augmentations_are_off_at_evaluation(run):
    np.testing.assert_array_equal(run(_with(**ALL_TRAIN), train=False), run(BASE, train=False))
    assert np.abs(run(_with(**ALL_TRAIN), train=True) - run(BASE, train=True)).mean() > 0.1


def test_equalize_flattens_the_histogram_at_train_and_eval(run):
    for train in (False, True):
        out = _pixels(run(_with(equalize=True), train=train))
        for image in out:
            values = np.sort(image.ravel())
            uniform = np.linspace(0, 1, values.size)
            assert np.abs(values - uniform).max() < 0.08, "not an equalised histogram"
    before = _pixels(run(BASE, train=False))
    assert np.abs(np.sort(before[0].ravel()) - np.linspace(0, 1, SIZE * SIZE)).max() > 0.15


def test_equalize_is_the_same_in_both_loaders():
    spec = _with(equalize=True)
    dali, fallback = dali_batch(spec, train=False), torch_batch(spec, train=False)
    # Same decoder (libjpeg-turbo), no resize at this size, DALI's formula in both: at most one grey level.
    assert np.abs(dali - fallback).max() <= 1.01 / 255 / STD
