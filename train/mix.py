"""Mixup and CutMix on the training device, between the loader and `train_step`, with soft targets.

Mixup (Zhang et al. 2018) blends two radiographs and their labels; CutMix (Yun et al. 2019) pastes a box of
one into the other, labels weighted by area. Both regularise the decision boundary, which is what a shifted
test set probes: over-confident logits on site-specific texture are penalised. The draws (which batches,
lambda, pairing, box) come from a generator seeded by (seed, epoch, rank), so a run is reproducible and a
resumed epoch mixes as the uninterrupted one did.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 2


class BatchMixer:
    """`mix(images, labels) -> (images, targets)`: targets are class probabilities (N × 2), mixed or one-hot."""

    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float, prob: float, seed: int, epoch: int, rank: int):
        self.mixup_alpha, self.cutmix_alpha, self.prob = mixup_alpha, cutmix_alpha, prob
        self.rng = np.random.default_rng([seed, epoch, rank, 0x6d6978])
        self.generator = torch.Generator().manual_seed(int(self.rng.integers(2**62)))

    def _mode(self) -> str | None:
        modes = [m for m, alpha in (("mixup", self.mixup_alpha), ("cutmix", self.cutmix_alpha)) if alpha > 0]
        if not modes or self.rng.random() >= self.prob:
            return None
        return modes[int(self.rng.integers(len(modes)))]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = F.one_hot(labels, NUM_CLASSES).float()
        mode = self._mode()
        if mode is None:
            return images, targets
        perm = torch.randperm(images.shape[0], generator=self.generator).to(images.device)
        if mode == "mixup":
            lam = float(self.rng.beta(self.mixup_alpha, self.mixup_alpha))
            mixed = images.lerp(images[perm], 1.0 - lam)
        else:
            lam_drawn = float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            height, width = images.shape[-2:]
            cut = math.sqrt(1.0 - lam_drawn)
            box_h, box_w = round(height * cut), round(width * cut)
            cy, cx = int(self.rng.integers(height)), int(self.rng.integers(width))
            y0, y1 = max(0, cy - box_h // 2), min(height, cy + box_h - box_h // 2)
            x0, x1 = max(0, cx - box_w // 2), min(width, cx + box_w - box_w // 2)
            mixed = images.clone()
            mixed[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
            # The label weight is the area actually kept, after the box was clipped at the border.
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        targets = lam * targets + (1.0 - lam) * targets[perm]
        return mixed.contiguous(memory_format=torch.channels_last), targets


def build_mixer(train_cfg, *, epoch: int, rank: int) -> BatchMixer | None:
    """None when mixup and cutmix are both off (the loop then passes integer labels, as before)."""
    if train_cfg.mixup_alpha <= 0 and train_cfg.cutmix_alpha <= 0:
        return None
    return BatchMixer(mixup_alpha=train_cfg.mixup_alpha, cutmix_alpha=train_cfg.cutmix_alpha,
                      prob=train_cfg.mix_prob, seed=train_cfg.seed, epoch=epoch, rank=rank)
