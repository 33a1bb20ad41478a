"""`build_loader`: the one entry point training and evaluation use to get batches of a split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, get_args

import torch

from pipelines.plan import resolve_split
from pipelines.spec import PreprocessSpec

log = logging.getLogger(__name__)

LoaderName = Literal["auto", "dali", "torch"]
LOADERS: tuple[str, ...] = get_args(LoaderName)


def _import_dali():
    """Return (DaliLoader class or None, why)."""
    try:
        from pipelines.dali import DaliLoader
    except ImportError as exc:
        return None, f"nvidia-dali cannot be imported ({exc})"
    import nvidia.dali

    return DaliLoader, f"nvidia-dali {nvidia.dali.__version__} imported"


def build_loader(shards_dir: str | Path, split: str, *, spec: PreprocessSpec, per_device_batch_size: int, train: bool,
                 loader: str = "auto", rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", seed: int = 0, num_workers: int = 2,
                 dtype: torch.dtype = torch.float32, hw_decoder_load: float = 0.65, verify_shards: bool = False):
    """Loader over `shards_dir/<split>` for one rank; see docs/architecture.md for the contract.

    `loader`: "dali", "torch", or "auto" (DALI when it imports, else the torch fallback). The
    choice and its reason are logged and kept in `.name`/`.reason`. `num_workers` is DALI's CPU
    thread count or the DataLoader's worker processes. `verify_shards`: re-hash the split's tars and
    indexes against the manifest first (reads every byte; counts and sizes are checked regardless).
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    if per_device_batch_size < 1:
        raise ValueError(f"per_device_batch_size must be >= 1, got {per_device_batch_size}")
    device = torch.device(device)
    # Counts, sizes and indexes are always checked against the manifest (cheap); `verify_shards` also
    # re-hashes every byte of the split.
    shards = resolve_split(shards_dir, split, verify=verify_shards)
    dali_cls, why = (None, "") if loader == "torch" else _import_dali()
    if loader == "dali" and dali_cls is None:
        raise RuntimeError(f"loader 'dali' requested but {why}; install nvidia-dali-cuda120 or use loader 'torch'")
    decode_on = "GPU (mixed nvJPEG decode)" if device.type == "cuda" else "CPU"
    if dali_cls is not None:
        reason = f"{'requested' if loader == 'dali' else 'auto'}: {why}; decoding on {decode_on}"
        result = dali_cls(shards, spec=spec, per_device_batch_size=per_device_batch_size, train=train, rank=rank,
                          world_size=world_size, device=device, seed=seed, num_threads=max(1, num_workers),
                          dtype=dtype, hw_decoder_load=hw_decoder_load, reason=reason)
    else:
        from pipelines.torch_loader import TorchLoader

        reason = "requested in config" if loader == "torch" else f"auto: {why}"
        reason += f"; PIL decoding in {num_workers} DataLoader worker(s)"
        result = TorchLoader(shards, spec=spec, per_device_batch_size=per_device_batch_size, train=train, rank=rank,
                             world_size=world_size, device=device, seed=seed, num_workers=num_workers, dtype=dtype,
                             reason=reason)
    log.info("loader %s for %s/%s (rank %d/%d, %d batches/epoch): %s", result.name, shards_dir, split, rank,
             world_size, len(result), reason)
    return result
