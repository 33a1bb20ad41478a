"""eval.gradcam: maps at the input's size that point at a synthetic opacity a small trained ResNet detects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval import gradcam as G
from pipelines.spec import PreprocessSpec
from pipelines.synthetic import SyntheticItem, render_synthetic
from pipelines.torch_loader import build_transform
from train.config import ModelConfig
from train.model import build_model

SIZE = 64
SIGMA = 5.0  # opacity radius in input pixels: about a lobe at 64 px
STRENGTH = 0.8  # added at the opacity's centre, in [0, 1] pixel units: a dense consolidation
SPEC = PreprocessSpec(image_size=SIZE, mean=0.35, std=0.15)


def _chests(n: int, seed: int) -> torch.Tensor:
    """(n, 1, SIZE, SIZE) network inputs of synthetic NORMAL chests (pipelines.synthetic, evaluation transform)."""
    transform = build_transform(SPEC, train=False)
    items = [SyntheticItem(seed * 10_000 + i, "train", 0, "p", "none", "") for i in range(n)]
    return torch.stack([transform(Image.fromarray(render_synthetic(item, seed=seed, size=80), mode="L")) for item in items])


def _with_and_without_opacity(chests: torch.Tensor, rng: np.random.Generator):
    """Each chest twice, without (label 0) and with (label 1) a Gaussian opacity; also the opacity masks.

    The opacity is added to the network input, so its mask is known exactly in input pixels. At 64 px the
    last block's map is 2 x 2 (stride 32): "where" means a quadrant, so opacities sit near quadrant centres.
    Pairs make the opacity the only difference the model can learn, which it does in ~20 steps.
    """
    centres = rng.choice([SIZE // 4, 3 * SIZE // 4], size=(len(chests), 2)) + rng.uniform(-4, 4, size=(len(chests), 2))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    masks = torch.from_numpy(np.stack([np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * SIGMA**2)) for r, c in centres])
                             .astype(np.float32)[:, None])
    images = torch.cat([chests, chests + masks * (STRENGTH / SPEC.std)]).contiguous(memory_format=torch.channels_last)
    labels = torch.cat([torch.zeros(len(chests), dtype=torch.long), torch.ones(len(chests), dtype=torch.long)])
    return images, labels, torch.cat([torch.zeros_like(masks), masks])[:, 0]


@pytest.fixture(scope="module")
def opacity_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18"), 1).to(memory_format=torch.channels_last)
    chests = _chests(48, seed=1)
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(20):
        images, labels, _ = _with_and_without_opacity(chests[rng.choice(len(chests), 8, replace=False)], rng)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_gradcam_maps_have_the_input_shape_and_point_at_the_opacity(opacity_model):
    images, labels, masks = _with_and_without_opacity(_chests(16, seed=2), np.random.default_rng(5))
    with torch.no_grad():
        called = opacity_model(images).argmax(dim=1)
    accuracy = float((called == labels).float().mean())
    assert accuracy >= 0.85, f"the model did not learn the opacity (held-out accuracy {accuracy:.2f}): the test below would mean nothing"

    positives = torch.nonzero((labels == 1) & (called == 1)).flatten()
    maps = G.gradcam(opacity_model, images[positives], [1] * len(positives))
    assert maps.shape == (len(positives), SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    inside = masks[positives].numpy() > 0.5  # within ~1.2 sigma of the opacity's centre
    ratios = np.array([m[i].mean() / max(m[~i].mean(), 1e-6) for m, i in zip(maps, inside, strict=True)])
    # Measured: every ratio ~1.9-4, median 2.4; an untrained model or a map of the other class fails this.
    assert np.median(ratios) > 1.5 and (ratios > 1.0).mean() >= 0.8, f"inside/outside ratios {np.round(ratios, 2)}"


def test_overlays_and_grid_are_written_at_the_input_size(opacity_model, tmp_path):
    images = _chests(4, seed=3)
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    G.save_overlays(opacity_model, images, [1, 0, 1, 0], SPEC, paths)
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    # The de-normalised input is the image the overlay is drawn on.
    np.testing.assert_allclose(G.input_pixels(images, SPEC)[0], np.clip(images[0, 0].numpy() * SPEC.std + SPEC.mean, 0, 1))


def test_select_cases_picks_the_most_confident_of_each_kind():
    labels = np.array([1, 1, 0, 0, 1, 0, 1])
    probs = np.array([0.9, 0.6, 0.7, 0.1, 0.2, 0.3, 0.45])
    cases = G.select_cases([f"k{i}" for i in range(7)], labels, probs, threshold=0.5)
    assert cases == {"TP": 0, "FP": 2, "FN": 4, "TN": 3}
    assert G.select_cases(["a", "b"], np.array([1, 1]), np.array([0.9, 0.8]), 0.5) == {"TP": 0}
