"""The batch every loader yields."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """images: N×C×H×W in channels_last memory, normalized; labels: int64 (N,); keys: sample keys."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
