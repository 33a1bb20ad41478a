"""Optimizer, learning-rate schedule (a pure function of the step) and the loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only; norms' scales and all biases are 1-D.

    Grouped by parameter shape, not by name: names differ between architectures, shapes do not lie.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    # fused kernels exist on CUDA only; foreach is the fast path on CPU.
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fused)
    # Adam (the seed notebook's optimizer): L2 penalty in the gradient instead of decoupled decay.
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, **fused)


def lr_at(step: int, *, total_steps: int, warmup_steps: int, base_lr: float, schedule: str,
          min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based). Pure, so it is tested without a model."""
    min_lr = base_lr * min_lr_ratio
    if schedule == "constant":
        return base_lr if step >= warmup_steps else base_lr * (step + 1) / warmup_steps
    if schedule == "onecycle":
        # Linear ramp from base/25 to base over warm-up, then cosine to min_lr: torch's OneCycleLR shape.
        start = base_lr / 25.0
        if step < warmup_steps:
            return start + (base_lr - start) * step / max(1, warmup_steps)
    elif step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def class_weights(per_class: dict[str, int], labels: list[str], mode: str) -> torch.Tensor | None:
    """`balanced`: w_c = N / (C * n_c), so each class contributes equally to the loss.

    A weighted loss rather than a balanced sampler: the readers stream shards sequentially (DALI, webdataset),
    and re-sampling would need random access or would repeat minority-class images within an epoch.
    """
    if mode == "none":
        return None
    counts = [int(per_class.get(name, 0)) for name in labels]
    if min(counts) == 0:
        raise ValueError(f"class_weighting=balanced needs every class in the training split, counts: {per_class}")
    total = sum(counts)
    return torch.tensor([total / (len(counts) * c) for c in counts], dtype=torch.float32)


def build_loss(cfg: OptimConfig, weights: torch.Tensor | None) -> nn.Module:
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
