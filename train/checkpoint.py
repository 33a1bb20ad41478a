"""Resumable checkpoints (accelerator.save_state, atomic) and the best-model export (safetensors).

Layout under the run directory:
    checkpoints/epoch-0003/   accelerator.save_state + complete.json (written last, then the folder is renamed)
    best/                     model.safetensors, config.yaml, meta.json
A checkpoint folder without complete.json, or one whose files fail to load, is skipped with a warning in
favour of the previous one: a run killed during a save never resumes from half-written state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from train.config import Config, save_config

log = logging.getLogger(__name__)

COMPLETE = "complete.json"


@dataclass
class TrainState:
    """Loop counters saved with every checkpoint (registered with `accelerator.register_for_checkpointing`)."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    wall_time_s: float = 0.0  # train + validation time of completed epochs, summed over every launch
    best_auroc: float = float("-inf")  # val AUROC of the best epoch
    best_score: float = float("-inf")  # what train.select_by compares: val AUROC, or minus val NLL
    best_epoch: int = -1
    epochs_since_best: int = 0
    train_time_s: float = 0.0
    images_seen: int = 0  # global, all ranks

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, values: dict) -> None:
        for key, value in values.items():
            setattr(self, key, value)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _epoch_dirs(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("epoch-*") if p.is_dir()), reverse=True)


def loader_state_name(rank: int, world_size: int) -> str:
    """Per-rank file of the training loader's state; the world size is in the name because DALI's reader
    position is a position in this rank's slice of `world_size` slices."""
    return f"loader-rank{rank}-of-{world_size}.state"


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, keep: int,
                    loader_state: bytes | None = None) -> Path:
    """Every rank calls this (save_state writes per-rank RNG state, each rank its loader state); rank 0
    renames and prunes."""
    root = checkpoint_root(run_dir)
    final = root / f"epoch-{state.epoch:04d}"
    tmp = root / f".tmp-epoch-{state.epoch:04d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if loader_state is not None:
        (tmp / loader_state_name(accelerator.process_index, accelerator.num_processes)).write_bytes(loader_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE).write_text(json.dumps({"epoch": state.epoch, "step": state.step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _epoch_dirs(run_dir)[max(1, keep):]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_candidates(run_dir: Path, resume: str) -> list[Path]:
    if resume == "never":
        return []
    if resume == "auto":
        return _epoch_dirs(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={resume}: no such checkpoint directory (use auto, never or a "
                                f"path like {checkpoint_root(run_dir)}/epoch-0003)")
    return [path]


def _all_ranks_ok(accelerator: Accelerator, ok: bool) -> bool:
    """True only if `ok` on every rank: a rank whose random_states_N.pkl is damaged must not resume alone."""
    flag = torch.tensor([1 if ok else 0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def try_resume(accelerator: Accelerator, run_dir: Path, resume: str) -> Path | None:
    """Load the newest checkpoint every rank can load; returns its path, or None when training starts fresh."""
    candidates = resume_candidates(run_dir, resume)
    partly_loaded = None
    for ckpt in candidates:
        if not (ckpt / COMPLETE).is_file():
            log.warning("skipping checkpoint %s: it has no %s (a save was interrupted)", ckpt, COMPLETE)
            continue
        error = None
        try:
            accelerator.load_state(str(ckpt))
        except Exception as exc:  # noqa: BLE001 - any unreadable file means this checkpoint is damaged
            error = exc
        if _all_ranks_ok(accelerator, error is None):
            return ckpt
        # load_state restores the model before the optimizer, so a failure can leave this checkpoint's
        # weights loaded; only an older complete checkpoint (loaded in full) may follow.
        partly_loaded = ckpt
        if resume not in ("auto", "never"):
            raise RuntimeError(f"cannot resume from {ckpt}: {error or 'another rank failed to load it'}")
        log.warning("skipping damaged checkpoint %s (%s); trying the previous one",
                    ckpt, f"{type(error).__name__}: {error}" if error else "another rank failed to load it")
    if resume not in ("auto", "never"):
        raise RuntimeError(f"cannot resume from {resume}: it is not a complete checkpoint (no {COMPLETE})")
    if partly_loaded is not None:
        raise RuntimeError(
            f"no loadable checkpoint in {checkpoint_root(run_dir)} (newest damaged: {partly_loaded}); delete the "
            "damaged checkpoints to resume from an older one, or start over in a new --run.dir")
    return None


def read_loader_state(accelerator: Accelerator, ckpt: Path) -> bytes | None:
    """This rank's saved loader state in `ckpt`, or None (with a warning: the data order then differs from
    the uninterrupted run's) when the checkpoint has none for this rank and world size."""
    path = ckpt / loader_state_name(accelerator.process_index, accelerator.num_processes)
    if path.is_file():
        return path.read_bytes()
    if any(ckpt.glob("loader-rank*.state")):
        log.warning("%s holds loader states of another world size; this run's data order starts afresh", ckpt)
    return None


def export_best(model: torch.nn.Module, cfg: Config, meta: dict, run_dir: Path) -> Path:
    """Write best/ atomically: a reader never sees weights from one epoch with meta from another."""
    best, tmp, old = run_dir / "best", run_dir / ".best-tmp", run_dir / ".best-old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # channels_last weights are not contiguous in the NCHW sense, which safetensors requires.
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"arch": cfg.model.arch})
    save_config(cfg, tmp / "config.yaml")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    return best
