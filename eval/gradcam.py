"""Grad-CAM heat maps: where in the image the evidence for the called class lies.

Uses the maintained `grad-cam` package (pytorch-grad-cam) rather than our own hooks: checked on this
project's 1-channel, channels-last ResNets (target `layer4[-1]`, the last residual block) it returns one
map per image at the network input's size, and it owns the fiddly parts (hook removal, per-image
min-max scaling, upsampling). A forward and backward pass per batch: ~0.2 s for four 64 px ResNet50 inputs
on two CPU cores, so the report's four-case grid costs nothing next to evaluation.

Each map explains the class the model *called* at the run's threshold (PNEUMONIA for TP/FP, NORMAL for
TN/FN), the usual "why did it say that"; maps are min-max scaled per image, so they show where, not how much.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from pipelines.manifest import LABELS
from pipelines.spec import PreprocessSpec

CASES = ("TP", "FP", "FN", "TN")
CASE_TITLES = {"TP": "true positive", "FP": "false positive", "FN": "false negative", "TN": "true negative"}


def target_layer(model: nn.Module) -> nn.Module:
    """The last residual block for ResNet-family models, else the last convolution."""
    if hasattr(model, "layer4"):
        return model.layer4[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no convolution to take a Grad-CAM of")
    return convs[-1]


def gradcam(model: nn.Module, images: torch.Tensor, classes) -> np.ndarray:
    """(N, H, W) maps in [0, 1] for `classes` (one class index per image), H x W = the input's size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    device = next(model.parameters()).device
    x = images.to(device, torch.float32).contiguous(memory_format=torch.channels_last)
    with torch.enable_grad(), GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    # The backward pass filled .grad of every weight; free it so a long-lived model does not keep it.
    model.zero_grad(set_to_none=True)
    return np.asarray(maps, dtype=np.float32)


def input_pixels(images: torch.Tensor, spec: PreprocessSpec) -> np.ndarray:
    """(N, H, W) gray network inputs back in [0, 1] (normalisation undone), for display."""
    gray = images[:, 0].detach().float().cpu().numpy() * spec.std + spec.mean
    return np.clip(gray, 0.0, 1.0)


def overlay(gray: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8: the jet-coloured map blended half and half with the gray image."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=0.5)


def save_overlays(model: nn.Module, images: torch.Tensor, classes, spec: PreprocessSpec, paths: list[Path]) -> None:
    """One PNG per image, at the network input's size (H x W x RGB)."""
    maps = gradcam(model, images, classes)
    for gray, cam, path in zip(input_pixels(images, spec), maps, paths, strict=True):
        Image.fromarray(overlay(gray, cam)).save(path)


# --- the report's grid ----------------------------------------------------------------------------------


def select_cases(keys, labels, probs, threshold: float) -> dict[str, int]:
    """Index of the most confident TP, FP, FN and TN (highest P for called positives, lowest for negatives).

    A case with no sample at this threshold is absent.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    called = probs >= threshold
    out = {}
    for case, label, positive in (("TP", 1, True), ("FP", 0, True), ("FN", 1, False), ("TN", 0, False)):
        idx = np.flatnonzero((labels == label) & (called == positive))
        if idx.size:
            out[case] = int(idx[np.argmax(probs[idx])] if positive else idx[np.argmin(probs[idx])])
    return out


def plot_gradcam_grid(panels: dict[str, dict], path, title: str = "") -> None:
    """2 x 2 grid (TP, FP / FN, TN); a panel is `{gray, cam, key, probability, target}` or absent."""
    fig = Figure(figsize=(7.0, 7.6), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, case in zip(axes.ravel(), CASES, strict=True):
        ax.set_axis_off()
        panel = panels.get(case)
        if panel is None:
            ax.text(0.5, 0.5, f"no {CASE_TITLES[case]}\nat this threshold", ha="center", va="center")
            ax.set_title(f"{case}: none")
            continue
        ax.imshow(overlay(panel["gray"], panel["cam"]), interpolation="nearest")
        # At 32 px a ResNet's last block is 1 x 1: the map is constant and says nothing about where.
        flat = " (uniform map)" if np.ptp(panel["cam"]) < 1e-6 else ""
        ax.set_title(f"{case} ({CASE_TITLES[case]}): P = {panel['probability']:.3f}\n{panel['key']}, "
                     f"map for {LABELS[panel['target']]}{flat}", fontsize=9)
    fig.suptitle(title or "Grad-CAM of the most confident cases (layer4[-1])")
    fig.savefig(path, dpi=120)


def write_gradcam_grid(model: nn.Module, shards_dir: Path, split: str, keys, labels, probs, threshold: float,
                       spec: PreprocessSpec, path: Path) -> Path:
    """`gradcam_grid.png` of the report: the most confident TP, FP, FN and TN of the split."""
    from eval.inference import shard_inputs

    cases = select_cases(keys, labels, probs, threshold)
    panels = {}
    if cases:
        inputs = shard_inputs(shards_dir, split, [keys[i] for i in cases.values()], spec)
        batch = torch.stack([inputs[keys[i]] for i in cases.values()])
        targets = [int(probs[i] >= threshold) for i in cases.values()]
        maps = gradcam(model, batch, targets)
        grays = input_pixels(batch, spec)
        for n, (case, i) in enumerate(cases.items()):
            panels[case] = {"gray": grays[n], "cam": maps[n], "key": keys[i], "probability": float(probs[i]),
                            "target": targets[n]}
    plot_gradcam_grid(panels, path, title=f"Grad-CAM ({split} split, threshold {threshold:.3g}): most confident cases")
    return path
