"""Per-epoch validation: the clean val split, and the same batches under the acquisition-shift proxy.

`val_shifted/*` (pipelines/shift.py) re-uses the batches the clean pass already decoded and holds them until
the shifted pass is done (the val split's images in memory, on the training device, for the length of one
validation), so the proxy costs one more forward pass and no decoding. Its sensitivity and specificity are
taken at the threshold Youden's J picks on that epoch's *clean* val predictions, as `eval.run` transfers a
val-chosen threshold to another split: the gap to clean val is what a deployment would see.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from accelerate import Accelerator
from torch import nn

from eval.metrics import auroc, binary_metrics, select_threshold
from eval.predict import predict
from pipelines.batch import Batch
from pipelines.shift import ShiftedBatches
from train.loop import evaluate, nll


class KeptBatches:
    """A loader that keeps the batches of its first pass and replays them on the next one (no decoding).

    Other attributes (`shards`, `name`, ...) are the loader's, so a prediction pass can check the keys it got
    against the split's either way.
    """

    def __init__(self, loader):
        self.loader = loader
        self.kept: list[Batch] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        if self.kept is not None:
            yield from self.kept
            return
        kept = []
        for batch in self.loader:
            kept.append(batch)
            yield batch
        self.kept = kept

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def transferred_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """Youden's J threshold of clean val predictions; NaN when val holds one class (nothing to choose)."""
    if len(labels) == 0 or labels.min() == labels.max():
        return float("nan")
    return select_threshold(labels, probs, "youden")["threshold"]


def shifted_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float, prefix: str = "val_shifted") -> dict:
    """AUROC, NLL and the operating point at a threshold chosen elsewhere (clean val)."""
    out = {f"{prefix}/auroc": auroc(labels, probs), f"{prefix}/loss": nll(labels, probs),
           f"{prefix}/samples": len(labels)}
    if np.isfinite(threshold):
        at = binary_metrics(labels, probs, threshold)
        out.update({f"{prefix}/sensitivity": at["recall"], f"{prefix}/specificity": at["specificity"],
                    f"{prefix}/accuracy": at["accuracy"]})
    return out


def validate(model: nn.Module, val_loader, accelerator: Accelerator, *, shift_seed: int | None, mean: float,
             std: float) -> tuple[dict, np.ndarray, np.ndarray]:
    """Clean val metrics (`val/*`) plus, unless `shift_seed` is None, `val_shifted/*` from the same batches."""
    kept = KeptBatches(val_loader) if shift_seed is not None else val_loader
    metrics, labels, probs = evaluate(model, kept, accelerator)
    if shift_seed is None:
        return metrics, labels, probs
    threshold = transferred_threshold(labels, probs)
    _, shifted_probs, shifted_labels, _ = predict(
        model, ShiftedBatches(kept, mean=mean, std=std, seed=shift_seed), accelerator, tta=False)
    metrics["val/youden_threshold"] = threshold
    metrics.update(shifted_metrics(shifted_labels, shifted_probs, threshold))
    return metrics, labels, probs


def selection_score(metrics: dict, select_by: str) -> float:
    """Higher is better: val AUROC (`auroc`) or minus the val NLL (`loss`); -inf when undefined (one class)."""
    value = metrics["val/auroc"] if select_by == "auroc" else -metrics["val/loss"]
    return float(value) if np.isfinite(value) else float("-inf")
