"""Train a chest X-ray classifier on WebDataset shards under Hugging Face Accelerate.

    accelerate launch --config_file accelerate_config.yaml train/run.py \
        --config train/configs/default.yaml --data.shards=shards/kermany --run.dir=runs/r50

The same command runs on a laptop CPU (fp32), one GPU (bf16 from accelerate_config.yaml), eight GPUs
(`--multi_gpu --num_processes 8`) or several nodes; `torchrun` and plain `python train/run.py` work too.
Resume after a crash or kill with the same command (`--train.resume=auto` is the default).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from eval.provenance import TRAIN_SAMPLES, TrainingData, record_training_data
from pipelines.loaders import build_loader
from pipelines.manifest import FIX_HINT, LABELS, MANIFEST_NAME, ShardsError, load_manifest, sha256_file
from pipelines.spec import PreprocessSpec
from train.checkpoint import (
    CheckpointError,
    Resumed,
    TrainState,
    epoch_dirs,
    export_best,
    save_checkpoint,
    try_resume,
)
from train.cli import run_cli
from train.config import Config, ConfigError, DataConfig, config_to_dict, load_config, print_help, save_config
from train.ema import WeightEMA
from train.launch import build_accelerator, configure_cuda_backends, input_dtype, launch_precision
from train.loop import train_one_epoch
from train.mix import build_mixer
from train.model import build_model
from train.optim import build_loss, build_optimizer, class_weights, lr_at
from train.tracking import MetricsLogger
from train.validate import selection_score, validate


@dataclass(frozen=True)
class Derived:
    """Values that follow from the config and the runtime; the config itself is never mutated."""

    world_size: int
    per_device_batch_size: int
    global_batch_size: int  # images per optimizer step, all ranks, including accumulation
    batches_per_epoch: int  # per rank
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int
    mixed_precision: str
    precision_reason: str  # why this precision (launch request, device, CPU bf16 support)
    device: str
    loader: str
    loader_reason: str


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    """`--config RECIPE.yaml` plus `--section.key=value` overrides; `--help` lists every key."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", help="recipe YAML, e.g. train/configs/default.yaml")
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        print(__doc__)
        print("Options: --config RECIPE.yaml, then any --section.key=value below (defaults < recipe < overrides).\n")
        print_help("train/run.py")
        sys.exit(0)
    return args.config, overrides


def build_training_accelerator(cfg: Config) -> Accelerator:
    return build_accelerator(
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
        log_with="wandb" if cfg.log.wandb else None,
        project_dir=cfg.run.dir,
    )


def configure_cpu_threads(cfg: Config, accelerator: Accelerator) -> None:
    """On CPU, set torch's thread count: `train.cpu_threads` if set, else OMP_NUM_THREADS if set, else the cores
    the data workers leave free. The key wins over the variable because `accelerate launch` exports
    OMP_NUM_THREADS=1 to its workers when the user has not set it.

    Oversubscribed OpenMP threads wait on each other whenever one loses its core, so the default leaves the
    data workers their cores: ResNet50 at 64 px on 2 cores with a DALI worker alongside was measured ~4x
    slower with 2 torch threads than with 1. Where the model dominates and the loader is light, sharing
    pays: at 128 px the same pair trained at ~26 img/s with 2 threads against 16 with 1 (cpu.yaml sets 2).
    """
    if accelerator.device.type != "cpu":
        return
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
        return
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) // local_ranks
    torch.set_num_threads(max(1, cores - cfg.data.num_workers))


def holds_a_run(run_dir: Path) -> bool:
    """A checkpoint or an exported best model: what a launch that failed before its first epoch never leaves
    (its config.yaml, metrics.jsonl and W&B id are replaced by the next fresh start)."""
    return bool(epoch_dirs(run_dir)) or (run_dir / "best").exists()


def prepare_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir {run_dir} is a file, not a folder: choose another --run.dir or move the file away")
    if cfg.train.resume == "never" and holds_a_run(run_dir):
        # Starting over on top of another run would mix two runs' metrics, checkpoints and W&B history.
        raise ConfigError(f"run.dir {run_dir} already holds a run and train.resume=never: choose a new --run.dir, "
                          "delete that folder, or resume it with --train.resume=auto")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return run_dir


def build_spec(data: DataConfig, manifest: dict) -> PreprocessSpec:
    try:
        return PreprocessSpec.from_config(data, manifest)
    except ValueError as exc:  # `stats: null` (or no mean/std): normalisation has nothing to come from
        path = Path(data.shards) / "manifest.json"
        raise ShardsError(f"{path}: key 'stats' is {manifest.get('stats')!r}, not the training split's pixel "
                          f"mean/std; rebuild the shards: {FIX_HINT.format(dir=data.shards)}") from exc


def build_loaders(cfg: Config, spec: PreprocessSpec, accelerator: Accelerator):
    # Sharded by *global* rank; DALI iterators are never passed to accelerator.prepare.
    common = dict(spec=spec, loader=cfg.data.loader, rank=accelerator.process_index,
                  world_size=accelerator.num_processes, device=accelerator.device, seed=cfg.train.seed,
                  num_workers=cfg.data.num_workers, hw_decoder_load=cfg.data.hw_decoder_load,
                  dtype=input_dtype(accelerator), verify_shards=cfg.data.verify_shards)
    train_loader = build_loader(cfg.data.shards, cfg.data.train_split, train=True,
                                per_device_batch_size=cfg.data.per_device_batch_size, **common)
    val_loader = build_loader(cfg.data.shards, cfg.data.val_split, train=False,
                              per_device_batch_size=cfg.data.per_device_eval_batch_size, **common)
    return train_loader, val_loader


def derive(cfg: Config, accelerator: Accelerator, train_loader) -> Derived:
    accum = cfg.optim.grad_accum_steps
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.per_device_batch_size={cfg.data.per_device_batch_size} x optim.grad_accum_steps={accum} x "
            f"{accelerator.num_processes} ranks is larger than the training split ({train_loader.num_samples} "
            "samples): lower the batch size")
    total_steps = steps_per_epoch * cfg.train.epochs
    return Derived(
        world_size=accelerator.num_processes,
        per_device_batch_size=cfg.data.per_device_batch_size,
        global_batch_size=cfg.data.per_device_batch_size * accum * accelerator.num_processes,
        batches_per_epoch=len(train_loader),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=min(total_steps, round(cfg.optim.warmup_epochs * steps_per_epoch)),
        mixed_precision=accelerator.mixed_precision,
        precision_reason=launch_precision().reason,
        device=str(accelerator.device),
        loader=train_loader.name,
        loader_reason=train_loader.reason,
    )


def build_training(cfg: Config, accelerator: Accelerator, manifest: dict):
    model = build_model(cfg.model, cfg.data.channels)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.to(accelerator.device), cfg.optim)
    if cfg.model.compile:
        model = torch.compile(model)
    weights = class_weights(manifest["splits"][cfg.data.train_split]["per_class"], manifest["labels"],
                            cfg.optim.class_weighting)
    loss_fn = build_loss(cfg.optim, weights).to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, loss_fn


def record_data(cfg: Config, accelerator: Accelerator, manifest: dict) -> TrainingData | None:
    """The manifest hash and the train/val keys and contents the best model is exported with (main process
    only: it reads every JPEG of both splits once), so evaluation can tell when the shards changed."""
    if not accelerator.is_main_process:
        return None
    return record_training_data(cfg.data.shards, manifest, cfg.data.train_split, cfg.data.val_split)


def best_meta(cfg: Config, spec: PreprocessSpec, state: TrainState, metrics: dict, data: TrainingData) -> dict:
    return {
        "epoch": state.epoch, "step": state.step, "arch": cfg.model.arch, "in_channels": cfg.data.channels,
        "spec": asdict(spec), "labels": list(LABELS), "shards": str(cfg.data.shards),
        "manifest": data.meta["manifest"], "data": data.meta,
        "val_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }


def resume(cfg: Config, accelerator: Accelerator, run_dir: Path, model, optimizer, state: TrainState,
           ema: WeightEMA | None = None) -> Resumed | None:
    """`try_resume`, refusing a checkpoint trained on other shards than `data.shards` holds now (the model's
    record of its training data would be wrong, and evaluation's training-overlap check with it)."""
    manifest_sha256 = state.manifest_sha256
    resumed = try_resume(accelerator, run_dir, cfg.train.resume, model, optimizer, state, ema)
    if resumed is not None and state.manifest_sha256 != manifest_sha256:
        raise CheckpointError(
            f"{resumed.path} was trained on shards whose manifest sha256 is {state.manifest_sha256[:12]}, but "
            f"{Path(cfg.data.shards) / MANIFEST_NAME} is now {manifest_sha256[:12]}: resume with the shards the run "
            "started on, or train on these in a new --run.dir")
    return resumed


def loader_builds(train_loader, val_loader) -> dict:
    """Pipelines built and the seconds that took (DALI); one each per launch, not one per epoch."""
    return {f"{name}_loader_{what}": getattr(loader, attr) for name, loader in (("train", train_loader),
            ("val", val_loader)) for what, attr in (("builds", "builds"), ("build_s", "build_seconds"))
            if hasattr(loader, attr)}


def fit(cfg, accelerator, model, optimizer, loss_fn, train_loader, val_loader, spec, derived, state, logger,
        data: TrainingData | None, ema: WeightEMA | None = None) -> None:
    run_dir = Path(cfg.run.dir)
    lr_for_step = partial(lr_at, total_steps=derived.total_steps, warmup_steps=derived.warmup_steps,
                          base_lr=cfg.optim.lr, schedule=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio)
    progress = None
    if cfg.log.progress_bar and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=derived.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    patience = cfg.train.early_stopping_patience
    for epoch in range(state.epoch, cfg.train.epochs):
        # Checked before the epoch, so relaunching an early-stopped run does not train one more epoch.
        if patience and state.epochs_since_best >= patience:
            accelerator.print(f"early stopping: val {cfg.train.select_by} has not improved for {patience} epochs")
            break
        train_loader.set_epoch(epoch)
        epoch_start = time.perf_counter()
        train_metrics = train_one_epoch(
            model=model, loader=train_loader, optimizer=optimizer, loss_fn=loss_fn, accelerator=accelerator,
            state=state, lr_for_step=lr_for_step, grad_clip_norm=cfg.optim.grad_clip_norm,
            log_every=cfg.log.log_every, logger=logger, progress=progress, ema=ema,
            mix=build_mixer(cfg.train, epoch=epoch, rank=accelerator.process_index))
        train_time = time.perf_counter() - epoch_start
        # With an EMA, validation, model selection and best/ all use the averaged weights.
        val_metrics, labels, probs = validate(
            ema.module if ema is not None else model, val_loader, accelerator, mean=spec.mean, std=spec.std,
            shift_seed=cfg.data.shift_seed if cfg.train.val_shifted else None)
        state.epoch = epoch + 1
        state.train_time_s += train_time
        score = selection_score(val_metrics, cfg.train.select_by)
        if score > state.best_score or state.best_epoch < 0:
            state.best_score, state.best_epoch, state.epochs_since_best = score, state.epoch, 0
            auroc = val_metrics["val/auroc"]
            state.best_auroc = auroc if np.isfinite(auroc) else float("-inf")
            if accelerator.is_main_process:
                # Without keep_torch_compile=False a compiled model exports `_orig_mod.*` keys.
                best = ema.module if ema is not None else accelerator.unwrap_model(model, keep_torch_compile=False)
                meta = {**best_meta(cfg, spec, state, val_metrics, data),
                        "weights": f"ema (decay {ema.decay})" if ema is not None else "raw"}
                export_best(best, cfg, run_dir, {"meta.json": meta, TRAIN_SAMPLES: data.train_samples})
        else:
            state.epochs_since_best += 1
        logger.log({**train_metrics, **val_metrics, "val/best_auroc": state.best_auroc,
                    "perf/epoch_train_time_s": train_time,
                    "perf/epoch_images_per_sec": derived.batches_per_epoch * derived.per_device_batch_size
                    * derived.world_size / train_time}, step=state.step, epoch=state.epoch)
        logger.log_curves(labels, probs, step=state.step)
        state.wall_time_s += time.perf_counter() - epoch_start
        save_checkpoint(accelerator, run_dir, state, cfg.train.keep_checkpoints, model, optimizer, train_loader.state(),
                        ema=ema)
    if progress is not None:
        progress.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path, overrides = parse_args(argv)
    cfg = load_config(config_path, overrides)
    accelerator = build_training_accelerator(cfg)
    set_seed(cfg.train.seed)
    configure_cpu_threads(cfg, accelerator)
    if accelerator.device.type == "cuda":
        configure_cuda_backends()
    run_dir = prepare_run_dir(cfg, accelerator)
    manifest = load_manifest(cfg.data.shards)
    spec = build_spec(cfg.data, manifest)
    train_loader, val_loader = build_loaders(cfg, spec, accelerator)
    derived = derive(cfg, accelerator, train_loader)
    data = record_data(cfg, accelerator, manifest)
    accelerator.print(f"loader: {derived.loader} ({derived.loader_reason}); device {derived.device}, "
                      f"{derived.world_size} process(es), {torch.get_num_threads()} torch thread(s), "
                      f"mixed precision {derived.mixed_precision} ({derived.precision_reason}), "
                      f"global batch {derived.global_batch_size}, {derived.steps_per_epoch} steps/epoch")
    model, optimizer, loss_fn = build_training(cfg, accelerator, manifest)
    state = TrainState(manifest_sha256=sha256_file(Path(cfg.data.shards) / MANIFEST_NAME))
    ema = None
    if cfg.train.ema_decay > 0:
        ema = WeightEMA(accelerator.unwrap_model(model, keep_torch_compile=False), cfg.train.ema_decay)
    resumed = resume(cfg, accelerator, run_dir, model, optimizer, state, ema)
    if resumed is not None:
        if resumed.loader_state is not None:
            train_loader.load_state(resumed.loader_state)
        accelerator.print(f"resumed from {resumed.path} at epoch {state.epoch}, step {state.step}"
                          f"{'' if resumed.loader_state is not None else ' (no loader state: data order starts afresh)'}")
    logger = MetricsLogger(accelerator, cfg.log, run_dir, {**config_to_dict(cfg), "derived": asdict(derived)},
                           resumed_step=state.step if resumed else None)
    try:
        fit(cfg, accelerator, model, optimizer, loss_fn, train_loader, val_loader, spec, derived, state, logger,
            data, ema)
        logger.summary({
            "best_val_auroc": state.best_auroc, "best_epoch": state.best_epoch, "epochs": state.epoch,
            "steps": state.step, "wall_time_s": state.wall_time_s,
            "train_time_s": state.train_time_s,
            "images_per_sec": state.images_seen / state.train_time_s if state.train_time_s else None,
            "resumed_from": str(resumed.path) if resumed else None, **asdict(derived),
            **loader_builds(train_loader, val_loader), **(data.summary() if data else {}),
        })
    finally:
        logger.close()
    accelerator.print(f"done: best val AUROC {state.best_auroc:.4f} at epoch {state.best_epoch}; "
                      f"run directory {run_dir}")
    return 0


def cli() -> None:
    run_cli(main, ConfigError, ShardsError, CheckpointError)


if __name__ == "__main__":
    cli()
