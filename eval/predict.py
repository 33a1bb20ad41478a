"""Predictions of a model over one split: P(PNEUMONIA) per sample, each sample exactly once on every rank.

Shared by evaluation (`eval.run`, with optional test-time augmentation) and training validation
(`train.loop.evaluate`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from pipelines.gather import gather_predictions

# Centre zooms only: flips are not label-preserving for chest X-rays (the heart sits on the left), and
# training never saw them.
TTA_ZOOMS = (1.0, 0.9, 0.8)
TTA_DESCRIPTION = "mean probability over centre crops of 100%, 90% and 80% of the image, resized back"


def tta_views(images: torch.Tensor) -> list[torch.Tensor]:
    size = images.shape[-1]
    views = []
    for zoom in TTA_ZOOMS:
        if zoom == 1.0:
            views.append(images)
            continue
        crop = max(1, round(size * zoom))
        start = (size - crop) // 2
        patch = images[..., start:start + crop, start:start + crop]
        views.append(F.interpolate(patch, size=images.shape[-2:], mode="bilinear", align_corners=False,
                                   antialias=False).contiguous(memory_format=torch.channels_last))
    return views


@torch.no_grad()
def predict(model: nn.Module, loader, accelerator: Accelerator, tta: bool):
    """(keys, probs, labels, tta_probs | None) over the whole split, each sample once, sorted by key, on every rank."""
    model.eval()
    keys: list[str] = []
    probs, labels, tta_probs = [], [], []
    for batch in loader:
        with accelerator.autocast():
            logits = model(batch.images)
        probs.append(torch.softmax(logits.float(), dim=1)[:, 1])
        labels.append(batch.labels)
        keys.extend(batch.keys)
        if tta:
            with accelerator.autocast():
                views = [torch.softmax(model(v).float(), dim=1)[:, 1] for v in tta_views(batch.images)]
            tta_probs.append(torch.stack(views).mean(dim=0))
    # One device->host copy per split instead of one per batch.
    probs_np = torch.cat(probs).cpu().numpy() if probs else np.zeros(0, np.float32)
    labels_np = torch.cat(labels).cpu().numpy() if labels else np.zeros(0, np.int64)
    out_keys, out_probs, out_labels = gather_predictions(keys, probs_np, labels_np)
    shards = getattr(loader, "shards", None)
    if shards is not None:
        # Every sample of the split predicted exactly once, or the run fails naming the shard it missed.
        shards.check_keys(out_keys)
    out_tta = None
    if tta:
        tta_np = torch.cat(tta_probs).cpu().numpy() if tta_probs else np.zeros(0, np.float32)
        tta_keys, out_tta, _ = gather_predictions(keys, tta_np, labels_np)
        assert list(tta_keys) == list(out_keys), "gather_predictions must sort by key deterministically"
        out_tta = np.asarray(out_tta, dtype=np.float64)
    return list(out_keys), np.asarray(out_probs, np.float64), np.asarray(out_labels, np.int64), out_tta
