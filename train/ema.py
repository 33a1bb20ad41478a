"""An exponential moving average (EMA) of the model's weights, for validation and the exported best model.

Averaging the weights of the last few hundred steps smooths out the noise of the final optimizer steps and
typically gives better-calibrated, more stable predictions than the raw weights (Polyak averaging; timm's
ModelEmaV2). The EMA is kept in fp32 next to the training model, on the same device, and updated after every
optimizer step with one fused `_foreach_lerp_` (no host sync). Every checkpoint holds it (`ema.safetensors`,
train/checkpoint.py), so a resumed run continues the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """`module` holds the averaged weights: ema <- decay * ema + (1 - decay) * weights, after each step.

    The effective decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates n, so a short run
    (a few hundred steps on CPU) is not dominated by the random initialisation the average starts from.
    Float buffers (BatchNorm running statistics) are averaged too; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self._link(model)

    def _link(self, model: nn.Module) -> None:
        source, target = model.state_dict(keep_vars=True), self.module.state_dict(keep_vars=True)
        floats = [k for k, v in target.items() if v.is_floating_point()]
        self._float_src = [source[k].detach() for k in floats]
        self._float_dst = [target[k].detach() for k in floats]
        others = [k for k in target if k not in set(floats)]
        self._other_src = [source[k].detach() for k in others]
        self._other_dst = [target[k].detach() for k in others]

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the linked model's current weights into the average (call after each optimizer step)."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self._float_dst, self._float_src, weight)
        for dst, src in zip(self._other_dst, self._other_src, strict=True):
            dst.copy_(src)
        self.updates += 1

    @torch.no_grad()
    def restore(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Continue an average saved in a checkpoint (train.checkpoint writes `module`'s weights and `updates`)."""
        self.module.load_state_dict(weights, strict=True)
        self.updates = updates

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average afresh from the linked model's current weights (e.g. just resumed without one)."""
        for dst, src in zip(self._float_dst + self._other_dst, self._float_src + self._other_src, strict=True):
            dst.copy_(src)
        self.updates = 0
