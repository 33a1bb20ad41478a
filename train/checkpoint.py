"""Resumable checkpoints without pickle (safetensors + JSON, atomic) and the best-model export (safetensors).

Layout under the run directory:
    checkpoints/epoch-0003/   model.safetensors               weights (rank 0)
                              optimizer.safetensors           optimizer tensors; param groups and scalars as JSON
                                                              in its metadata (rank 0)
                              train_state.json                loop counters (TrainState), GradScaler state (rank 0)
                              ema.safetensors                 averaged weights, update count in metadata
                                                              (train.ema_decay > 0 only; rank 0)
                              rng-rank{r}-of-{R}.safetensors  python/numpy/torch(/cuda) RNG states (each rank)
                              loader-rank{r}-of-{R}.state     DALI's own checkpoint bytes (each rank, DALI only)
                              complete.json                   written last: epoch, step, world size, every file
                                                              with its size; then the folder is renamed into place
    best/                     model.safetensors, config.yaml, meta.json, train_samples.json

Nothing read from a checkpoint is unpickled. A checkpoint folder is input like any other (copied between
machines, shared, restored from backups), and `accelerator.load_state` unpickles its custom-state file with
weights_only=False: a planted `__reduce__` ran code on resume. Files the layout does not name are ignored.
A checkpoint without complete.json, with a listed file missing or of another size, or with a file that does
not parse or does not fit the model, is skipped with a warning in favour of the previous one.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator
from safetensors import safe_open

from train.config import Config, save_config

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"
LAYOUT_VERSION = 2  # 1: accelerator.save_state (pickled RNG and custom state), no longer read


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message names the path and the fix."""


class DamagedCheckpoint(ValueError):
    """A checkpoint folder whose files are missing, truncated or do not fit this run (skipped on resume=auto)."""


@dataclass
class TrainState:
    """Loop counters saved with every checkpoint (as JSON), and the shards they count over."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    wall_time_s: float = 0.0  # train + validation time of completed epochs, summed over every launch
    best_auroc: float = float("-inf")  # val AUROC of the best epoch
    best_score: float = float("-inf")  # what train.select_by compares: val AUROC, or minus val NLL
    best_epoch: int = -1
    epochs_since_best: int = 0
    train_time_s: float = 0.0
    images_seen: int = 0  # global, all ranks
    manifest_sha256: str = ""  # of the shards this run trains on: a resumed run must not switch data silently


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run continues from, and this rank's loader state in it (None: none saved)."""

    path: Path
    loader_state: bytes | None


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def epoch_dirs(run_dir: Path) -> list[Path]:
    """Renamed-into-place checkpoint folders, newest first (in-progress `.tmp-*` folders are not listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("epoch-*") if p.is_dir()), reverse=True)


def loader_state_name(rank: int, world_size: int) -> str:
    """Per-rank file of the training loader's state; the world size is in the name because DALI's reader
    position is a position in this rank's slice of `world_size` slices."""
    return f"loader-rank{rank}-of-{world_size}.state"


def rng_state_name(rank: int, world_size: int) -> str:
    return f"rng-rank{rank}-of-{world_size}.safetensors"


# --- writing --------------------------------------------------------------------------------------------


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write of `path` into a CheckpointError naming it: an OSError from write() (a full disk)
    carries no file name, and the user needs to know which disk filled."""
    try:
        yield
    except OSError as exc:
        why = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CheckpointError(f"cannot write {path}: {why}; free space there (or choose another --run.dir) and "
                              "relaunch the same command: training resumes from the last complete checkpoint") from exc


def write_bytes(path: Path, data: bytes) -> None:
    with writing(path), open(path, "wb") as handle:
        handle.write(data)


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # channels_last weights are not contiguous in the NCHW sense, which safetensors requires.
    return safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def _model_bytes(model: torch.nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    return _tensor_bytes(model.state_dict(), metadata)


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    """Optimizer state as safetensors: per-parameter tensors as `<index>.<name>`, the rest as JSON metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return _tensor_bytes(tensors, {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)})


def _rng_bytes(device: torch.device) -> bytes:
    """This process's random generators as tensors (python's and numpy's Mersenne Twister words as int64)."""
    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(words, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64))}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    return _tensor_bytes(tensors, {"python": json.dumps([version, gauss_next]),
                                   "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached_gaussian)])})


def _state_bytes(state: TrainState, accelerator: Accelerator) -> bytes:
    counters = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(state).items()}
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    return json.dumps({"layout": LAYOUT_VERSION, "train_state": counters, "grad_scaler": scaler}, indent=2).encode()


def _all_ranks_ok(accelerator: Accelerator, ok: bool) -> bool:
    """True only if `ok` on every rank: no rank may resume from, or publish, what another rank could not."""
    flag = torch.tensor([1 if ok else 0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState, keep: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, loader_state: bytes | None = None, ema=None) -> Path:
    """Every rank calls this (each writes its RNG and loader state); rank 0 writes the rest, renames and prunes.

    A failed write (a full disk) on any rank removes the partial folder and raises CheckpointError on every
    rank, so no rank waits for a rename that will not come and no half-written checkpoint is left to resume.
    """
    root = checkpoint_root(run_dir)
    final = root / f"epoch-{state.epoch:04d}"
    tmp = root / f".tmp-epoch-{state.epoch:04d}"
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    error = None
    try:
        write_bytes(tmp / rng_state_name(rank, world_size), _rng_bytes(accelerator.device))
        if loader_state is not None:
            write_bytes(tmp / loader_state_name(rank, world_size), loader_state)
        if accelerator.is_main_process:
            # Without keep_torch_compile=False a compiled model saves `_orig_mod.*` keys.
            write_bytes(tmp / MODEL_FILE, _model_bytes(accelerator.unwrap_model(model, keep_torch_compile=False)))
            write_bytes(tmp / OPTIMIZER_FILE, _optimizer_bytes(optimizer))
            write_bytes(tmp / STATE_FILE, _state_bytes(state, accelerator))
            if ema is not None:
                write_bytes(tmp / EMA_FILE, _model_bytes(ema.module, {"updates": str(ema.updates)}))
    except CheckpointError as exc:
        error = exc
    if _all_ranks_ok(accelerator, error is None) and accelerator.is_main_process:
        try:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            write_bytes(tmp / COMPLETE, json.dumps({"layout": LAYOUT_VERSION, "epoch": state.epoch, "step": state.step,
                                                    "world_size": world_size, "files": files}, indent=2).encode())
        except CheckpointError as exc:
            error = exc
    if not _all_ranks_ok(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # gives back the space a full disk needs for the next try
        raise error or CheckpointError(f"saving checkpoint {final} failed on another rank (see its error)")
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in epoch_dirs(run_dir)[max(1, keep):]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --- reading --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    """Everything a checkpoint holds for this rank, parsed and checked, nothing applied yet."""

    model: dict[str, torch.Tensor]
    optimizer: dict
    counters: dict
    grad_scaler: dict | None
    rng: tuple[dict[str, torch.Tensor], dict[str, str]] | None
    loader_state: bytes | None
    ema: tuple[dict[str, torch.Tensor], int] | None = None  # averaged weights and update count


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise DamagedCheckpoint(f"{path.name} is not a readable safetensors file ({exc})") from exc


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(f"{path.name} is not readable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise DamagedCheckpoint(f"{path.name} holds {type(value).__name__}, not an object")
    return value


def _check_listing(ckpt: Path) -> dict:
    """complete.json, and every file it lists present with the size it was written with (a truncated or
    half-copied file is damage, whatever its format)."""
    complete = _read_json(ckpt / COMPLETE)
    if complete.get("layout") != LAYOUT_VERSION or not isinstance(complete.get("files"), dict):
        raise DamagedCheckpoint(f"it is not in checkpoint layout {LAYOUT_VERSION} (an older version wrote it with "
                                "accelerator.save_state, whose pickled state resume no longer loads)")
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        if name not in complete["files"]:
            raise DamagedCheckpoint(f"{COMPLETE} does not list {name}")
    for name, size in complete["files"].items():
        path = ckpt / name
        if not path.is_file() or path.stat().st_size != size:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise DamagedCheckpoint(f"{name} is {found}, {COMPLETE} says {size} bytes")
    return complete


def _check_model(tensors: dict[str, torch.Tensor], model: torch.nn.Module, name: str = MODEL_FILE) -> None:
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    found = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise DamagedCheckpoint(f"{name} does not fit this model (e.g. {differ[:3]}: another model.arch or "
                                "data.channels?)")


def _read_ema(ckpt: Path, complete: dict, ema_module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int] | None:
    """The averaged weights and their update count; None (with a warning) for a checkpoint saved without an EMA."""
    if EMA_FILE not in complete["files"]:
        log.warning("%s holds no %s (saved with train.ema_decay=0): the average restarts from the resumed weights",
                    ckpt, EMA_FILE)
        return None
    tensors, metadata = _read_tensors(ckpt / EMA_FILE)
    _check_model(tensors, ema_module, EMA_FILE)
    if not str(metadata.get("updates", "")).isdigit():
        raise DamagedCheckpoint(f"{EMA_FILE} has no update count in its metadata")
    return tensors, int(metadata["updates"])


def _parse_optimizer(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict back from `_optimizer_bytes`, checked against this optimizer's parameters."""
    try:
        groups = json.loads(metadata["param_groups"])
        scalars = json.loads(metadata["scalars"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(f"{OPTIMIZER_FILE} lacks readable param_groups/scalars metadata ({exc})") from exc
    current = optimizer.state_dict()["param_groups"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != [len(g["params"]) for g in current]:
        raise DamagedCheckpoint(f"{OPTIMIZER_FILE} holds other parameter groups than this model's optimizer")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params):
            raise DamagedCheckpoint(f"{OPTIMIZER_FILE} has state {key!r} for no parameter of this model")
        # Adam's moments have their parameter's shape; its step counter is a scalar.
        if value.ndim and value.shape != params[int(index)].shape:
            raise DamagedCheckpoint(f"{OPTIMIZER_FILE} state {key!r} has shape {tuple(value.shape)}, its parameter "
                                    f"{tuple(params[int(index)].shape)}")
        state.setdefault(int(index), {})[name] = value
    for index, values in scalars.items():
        state.setdefault(int(index), {}).update(values)
    for group, now in zip(groups, current, strict=True):
        # JSON has no tuples; the optimizer keeps e.g. `betas` as one.
        group.update({k: tuple(v) for k, v in group.items() if isinstance(now.get(k), tuple) and isinstance(v, list)})
    return {"state": state, "param_groups": groups}


def _parse_counters(values: dict) -> tuple[dict, dict | None]:
    counters = values.get("train_state")
    names = {f.name for f in fields(TrainState)}
    if isinstance(counters, dict) and "best_score" not in counters and "best_auroc" in counters:
        # Written before train.select_by existed: the best epoch was the one with the highest val AUROC.
        counters = {**counters, "best_score": counters["best_auroc"]}
    if not isinstance(counters, dict) or set(counters) != names:
        raise DamagedCheckpoint(f"{STATE_FILE} does not hold the training counters {sorted(names)}")
    unbounded = ("best_auroc", "best_score")  # -inf until an epoch has a defined score; JSON holds it as null
    for name, value in counters.items():
        expected = str if name == "manifest_sha256" else int | float
        if not (value is None and name in unbounded) and (isinstance(value, bool) or not isinstance(value, expected)):
            raise DamagedCheckpoint(f"{STATE_FILE}: train_state.{name} is {value!r}, not a {expected}")
    counters = {**counters, **{k: float("-inf") for k in unbounded if counters[k] is None}}
    return counters, values.get("grad_scaler")


def _check_rng(tensors: dict[str, torch.Tensor], metadata: dict[str, str], device: torch.device) -> None:
    expected = {"torch": torch.get_rng_state().shape, "python": (625,), "numpy": (624,)}
    if device.type == "cuda":
        expected["cuda"] = torch.cuda.get_rng_state(device).shape
    shapes = {k: tuple(tensors[k].shape) for k in expected if k in tensors}
    if shapes != {k: tuple(v) for k, v in expected.items()} or not {"python", "numpy"} <= set(metadata):
        raise DamagedCheckpoint(f"random states {shapes} do not have the shapes {dict(expected)}")


def read_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                    world_size: int, device: torch.device, ema_module: torch.nn.Module | None = None) -> _Loaded:
    """Parse and check everything this rank needs from `ckpt`; raises DamagedCheckpoint, changes nothing."""
    complete = _check_listing(ckpt)
    model_tensors, _ = _read_tensors(ckpt / MODEL_FILE)
    _check_model(model_tensors, model)
    opt_tensors, opt_metadata = _read_tensors(ckpt / OPTIMIZER_FILE)
    counters, grad_scaler = _parse_counters(_read_json(ckpt / STATE_FILE))
    same_world = complete.get("world_size") == world_size
    rng = None
    if same_world:
        if rng_state_name(rank, world_size) not in complete["files"]:
            raise DamagedCheckpoint(f"{COMPLETE} does not list {rng_state_name(rank, world_size)}")
        rng = _read_tensors(ckpt / rng_state_name(rank, world_size))
        _check_rng(*rng, device)
    loader_name = loader_state_name(rank, world_size)
    loader_state = (ckpt / loader_name).read_bytes() if loader_name in complete["files"] else None
    if not same_world:
        log.warning("%s was written by %s rank(s), this run has %d: random states and data order start afresh",
                    ckpt, complete.get("world_size"), world_size)
    ema = _read_ema(ckpt, complete, ema_module) if ema_module is not None else None
    return _Loaded(model_tensors, _parse_optimizer(opt_tensors, opt_metadata, optimizer), counters, grad_scaler, rng,
                   loader_state, ema)


def _apply(loaded: _Loaded, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           state: TrainState, ema=None) -> None:
    accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(loaded.model, strict=True)
    if ema is not None and loaded.ema is not None:
        ema.restore(*loaded.ema)
    elif ema is not None:
        ema.restart()
    optimizer.load_state_dict(loaded.optimizer)
    for name, value in loaded.counters.items():
        setattr(state, name, value)
    if accelerator.scaler is not None and loaded.grad_scaler is not None:
        accelerator.scaler.load_state_dict(loaded.grad_scaler)
    # accelerator.step (micro-batches) is not restored: every epoch is whole accumulation groups, so it is a
    # multiple of grad_accum_steps at every checkpoint and the sync points come out the same.
    if loaded.rng is not None:
        tensors, metadata = loaded.rng
        version, gauss_next = json.loads(metadata["python"])
        random.setstate((version, tuple(tensors["python"].tolist()), gauss_next))
        name, pos, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
        np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
        torch.set_rng_state(tensors["torch"])
        if "cuda" in tensors:
            torch.cuda.set_rng_state(tensors["cuda"], accelerator.device)


def resume_candidates(run_dir: Path, resume: str) -> list[Path]:
    if resume == "never":
        return []
    if resume == "auto":
        return epoch_dirs(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint directory (use auto, never or a "
                              f"path like {checkpoint_root(run_dir)}/epoch-0003)")
    return [path]


def try_resume(accelerator: Accelerator, run_dir: Path, resume: str, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, state: TrainState, ema=None) -> Resumed | None:
    """Load the newest checkpoint every rank can read in full into model, optimizer, RNGs and `state`; None
    when training starts fresh. Every file is parsed and checked before anything is applied, so a damaged
    checkpoint leaves nothing half-loaded and an older one can follow."""
    explicit = resume not in ("auto", "never")
    damaged = None
    for ckpt in resume_candidates(run_dir, resume):
        if not (ckpt / COMPLETE).is_file():
            if explicit:
                raise CheckpointError(f"train.resume={resume}: {ckpt} is not a complete checkpoint (no {COMPLETE}); "
                                      f"use --train.resume=auto or one of {checkpoint_root(run_dir)}/epoch-*")
            log.warning("skipping checkpoint %s: it has no %s (a save was interrupted)", ckpt, COMPLETE)
            continue
        loaded, error = None, None
        try:
            loaded = read_checkpoint(ckpt, accelerator.unwrap_model(model, keep_torch_compile=False), optimizer,
                                     accelerator.process_index, accelerator.num_processes, accelerator.device,
                                     ema.module if ema is not None else None)
        except DamagedCheckpoint as exc:
            error = exc
        if _all_ranks_ok(accelerator, error is None):
            _apply(loaded, accelerator, model, optimizer, state, ema)
            return Resumed(ckpt, loaded.loader_state)
        why = str(error) if error else "another rank could not read its part"
        if explicit:
            raise CheckpointError(f"train.resume={resume}: cannot resume from {ckpt}: {why}; use "
                                  "--train.resume=auto to fall back to an older checkpoint")
        log.warning("skipping damaged checkpoint %s (%s); trying the previous one", ckpt, why)
        damaged = damaged or (ckpt, why)
    if damaged is not None:
        # Starting over would drop the run's metric history; that must be a decision, not a fallback.
        raise CheckpointError(
            f"no loadable checkpoint in {checkpoint_root(run_dir)} (newest damaged: {damaged[0]}: {damaged[1]}); "
            "delete the damaged checkpoints to start this run over, or train in a new --run.dir")
    return None


def export_best(model: torch.nn.Module, cfg: Config, run_dir: Path, json_files: dict[str, object]) -> Path:
    """Write best/ atomically (weights, config and `json_files`, e.g. meta.json): a reader never sees weights
    from one epoch with meta from another."""
    best, tmp, old = run_dir / "best", run_dir / ".best-tmp", run_dir / ".best-old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_bytes(tmp / "model.safetensors", _model_bytes(model, {"arch": cfg.model.arch}))
        for name, value in json_files.items():
            write_bytes(tmp / name, json.dumps(value, indent=2, sort_keys=True).encode())
        with writing(tmp / "config.yaml"):
            save_config(cfg, tmp / "config.yaml")
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous best/ stays as it was
        raise
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    return best
