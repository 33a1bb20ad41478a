"""Which samples each rank reads in an epoch, and how many batches that makes.

Both loaders follow this plan so DALI and the torch fallback yield the same batches in evaluation
(same keys in the same order) and every rank agrees on the batch count:
- the split's tars are concatenated in manifest order (training: the torch loader draws a tar
  permutation from seed + epoch, DALI a permutation of all samples per epoch; both identical on every
  rank, so rank slices are disjoint and each epoch gives every rank a different slice);
- rank r of R reads the contiguous sample range [floor(r*N/R), floor((r+1)*N/R)), which is how
  DALI's readers partition with `shard_id`/`num_shards`, so rank slices are disjoint;
- training yields floor(floor(N/R) / B) full batches on every rank (the smallest rank slice bounds
  it), so no rank waits in an all-reduce that another rank never reaches;
- evaluation yields ceil(ceil(N/R) / B) batches on every rank: all of the rank's samples, the last
  batch partial, and a rank with one sample fewer ends on a 1-sample filler batch (a duplicate of
  its last sample, removed by `pipelines.gather.gather_predictions`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

# The plan reads a split through the one shard-reading API; loaders import both names from here.
from pipelines.shards import SplitShards, resolve_split  # noqa: F401 - resolve_split is re-exported


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the global sample positions rank `rank` reads (DALI's shard partition)."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def tar_order(num_tars: int, *, train: bool, seed: int, epoch: int) -> list[int]:
    """Tar visiting order: a seeded per-epoch permutation in training, manifest order in evaluation."""
    if not train:
        return list(range(num_tars))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_tars)]


def batches_per_epoch(num_samples: int, per_device_batch_size: int, world_size: int, *, train: bool) -> int:
    """Batches every rank yields per epoch (the same number on all ranks)."""
    if train:
        count = (num_samples // world_size) // per_device_batch_size
        if count == 0:
            raise ValueError(
                f"{num_samples} training samples over {world_size} rank(s) do not fill one batch of "
                f"{per_device_batch_size}; lower per_device_batch_size or use more data"
            )
        return count
    if num_samples < world_size:
        raise ValueError(f"{num_samples} evaluation samples cannot be spread over {world_size} ranks")
    max_rank_samples = math.ceil(num_samples / world_size)
    return math.ceil(max_rank_samples / per_device_batch_size)


def real_batch_sizes(num_samples: int, per_device_batch_size: int, rank: int, world_size: int, *,
                     train: bool) -> list[int]:
    """Size of each batch this rank yields; 0 marks an evaluation filler batch (see module doc)."""
    count = batches_per_epoch(num_samples, per_device_batch_size, world_size, train=train)
    if train:
        return [per_device_batch_size] * count
    lo, hi = rank_range(num_samples, rank, world_size)
    return [max(0, min(per_device_batch_size, hi - lo - b * per_device_batch_size)) for b in range(count)]


class RankedLoader:
    """What both loaders share: one split read by one rank, the epoch counter, the batch count of the plan."""

    name = ""

    def __init__(self, shards: SplitShards, *, spec, per_device_batch_size: int, train: bool, rank: int,
                 world_size: int, device: torch.device | str, seed: int, dtype: torch.dtype, reason: str):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards, self.spec, self.train = shards, spec, train
        self.per_device_batch_size, self.rank, self.world_size = per_device_batch_size, rank, world_size
        self.device, self.seed, self.dtype = torch.device(device), seed, dtype
        self.reason = reason
        self.num_samples = shards.num_samples
        self.epoch = 0
        self._len = batches_per_epoch(self.num_samples, per_device_batch_size, world_size, train=train)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state(self) -> bytes | None:
        """Loader state a checkpoint must keep for an exact resume; None when (seed, epoch) determine it."""
        return None

    def load_state(self, state: bytes) -> None:
        """Restore a `state()`; loaders without state have nothing to restore."""

    def batch_sizes(self) -> list[int]:
        """Real samples in each of this epoch's batches on this rank (0: an evaluation filler batch)."""
        return real_batch_sizes(self.num_samples, self.per_device_batch_size, self.rank, self.world_size,
                                train=self.train)
