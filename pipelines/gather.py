"""Exactly-once evaluation across ranks: gather (key, probability, label) and drop duplicates by key."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def gather_predictions(keys: Sequence[str], probs, labels) -> tuple[list[str], np.ndarray, np.ndarray]:
    """All ranks' predictions, de-duplicated by key and sorted by key (a no-op gather without a process group).

    Loaders pad evaluation so every rank yields the same number of batches; the padded samples
    reappear here under the same key and are kept once. A key seen twice with different labels
    means two different samples share a key, which would corrupt every metric, so it is an error.
    Call once after the evaluation loop (one collective, not one per batch).
    """
    probs = np.asarray(probs.detach().float().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    keys = [str(key) for key in keys]
    if not len(keys) == len(probs) == len(labels):
        raise ValueError(f"keys, probs and labels differ in length: {len(keys)}, {len(probs)}, {len(labels)}")
    parts = [(keys, probs, labels)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (keys, probs, labels))
    merged: dict[str, tuple[np.ndarray, int]] = {}
    for part_keys, part_probs, part_labels in parts:
        for key, prob, label in zip(part_keys, part_probs, part_labels, strict=True):
            if key in merged and merged[key][1] != int(label):
                raise ValueError(f"sample key {key!r} appears with labels {merged[key][1]} and {int(label)}")
            merged.setdefault(key, (prob, int(label)))
    order = sorted(merged)
    out_probs = np.stack([merged[key][0] for key in order]) if order else probs[:0]
    out_labels = np.array([merged[key][1] for key in order], dtype=np.int64)
    return order, out_probs, out_labels
