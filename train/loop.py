"""One training epoch and one evaluation pass. Short, explicit arguments, no hidden globals."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from eval.metrics import binary_metrics
from eval.predict import predict
from train.checkpoint import TrainState
from train.optim import set_lr
from train.tracking import MetricsLogger


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    out = {"perf/host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["perf/gpu_peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, backward: Callable[[torch.Tensor], None],
               clip_grad_norm: Callable, grad_clip_norm: float, sync_gradients: bool = True,
               lr: float | None = None, autocast: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """One training step: forward (under `autocast`), fp32 loss, backward, clip, optimizer step.

    `labels` are class indices (N,) or class probabilities (N × classes, e.g. from `train.mix`): the
    cross-entropy takes both.

    The one definition of a step: `train_one_epoch` calls it with Accelerate's backward and clipping (a
    prepared model already runs its forward under Accelerate's autocast), and
    `scripts/benchmark_throughput.py` with plain torch, so the benchmark times what training runs. Returns
    the detached loss without reading it back (no host sync).
    """
    with autocast():
        logits = model(images)
    loss = loss_fn(logits.float(), labels)
    backward(loss)
    if sync_gradients:
        if lr is not None:
            set_lr(optimizer, lr)
        if grad_clip_norm > 0:
            clip_grad_norm(model.parameters(), grad_clip_norm)
    # Under accelerator.accumulate the prepared optimizer skips these until the accumulation boundary.
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_one_epoch(
    *,
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    accelerator: Accelerator,
    state: TrainState,
    lr_for_step: Callable[[int], float],
    grad_clip_norm: float,
    log_every: int,
    logger: MetricsLogger,
    progress=None,
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ema=None,
) -> dict[str, float]:
    """Train over this rank's batches; returns the epoch's mean train loss (one host sync at the end).

    `mix` (train.mix.BatchMixer) turns a batch into mixed images and soft targets before the step; `ema`
    (train.ema.WeightEMA) folds the weights into its average after every optimizer step.
    """
    model.train()
    accum = accelerator.gradient_accumulation_steps
    # Whole accumulation groups only, so every optimizer step sees the same number of micro-batches.
    micro_batches = (len(loader) // accum) * accum
    device = accelerator.device
    epoch_loss = torch.zeros((), device=device)
    window_loss = torch.zeros((), device=device)
    window_steps, window_images, window_wait = 0, 0, 0.0
    epoch_images = 0
    window_start = time.perf_counter()
    batches = iter(loader)
    for _ in range(micro_batches):
        wait_start = time.perf_counter()
        batch = next(batches)
        window_wait += time.perf_counter() - wait_start
        images, targets = mix(batch.images, batch.labels) if mix is not None else (batch.images, batch.labels)
        with accelerator.accumulate(model):
            loss_detached = train_step(
                model, images, targets, loss_fn=loss_fn, optimizer=optimizer,
                backward=accelerator.backward, clip_grad_norm=accelerator.clip_grad_norm_,
                grad_clip_norm=grad_clip_norm, sync_gradients=accelerator.sync_gradients,
                lr=lr_for_step(state.step))
        # Accumulated on the device: no .item() here, the only host syncs are every `log_every` steps.
        epoch_loss += loss_detached
        window_loss += loss_detached
        window_images += batch.labels.shape[0]
        epoch_images += batch.labels.shape[0]
        if not accelerator.sync_gradients:
            continue
        if ema is not None:
            ema.update()
        state.step += 1
        window_steps += 1
        if progress is not None:
            progress.update(1)
        if state.step % log_every == 0:
            mean_loss = accelerator.reduce(window_loss, reduction="mean").item() / (window_steps * accum)
            elapsed = time.perf_counter() - window_start
            metrics = {
                "train/loss": mean_loss,
                "train/lr": optimizer.param_groups[0]["lr"],
                "perf/images_per_sec": window_images * accelerator.num_processes / elapsed,
                "perf/data_wait_frac": window_wait / elapsed,
                **peak_memory_mb(device),
            }
            logger.log(metrics, step=state.step, epoch=state.epoch + 1)
            if progress is not None:
                progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{metrics['perf/images_per_sec']:.0f}")
            window_loss.zero_()
            window_steps, window_images, window_wait = 0, 0, 0.0
            window_start = time.perf_counter()
    state.images_seen += epoch_images * accelerator.num_processes
    mean = accelerator.reduce(epoch_loss, reduction="mean").item() / max(1, micro_batches)
    return {"train/epoch_loss": mean}


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (unweighted); NaN for no samples."""
    clipped = np.clip(np.where(labels == 1, probs, 1.0 - probs), 1e-7, 1.0)
    return float(-np.log(clipped).mean()) if len(labels) else float("nan")


def evaluate(model: nn.Module, loader, accelerator: Accelerator, prefix: str = "val") -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of one split; the loss is the unweighted NLL of the de-duplicated predictions."""
    keys, probs, labels, _ = predict(model, loader, accelerator, tta=False)
    metrics = {f"{prefix}/{k}": v for k, v in binary_metrics(labels, probs).items()}
    metrics[f"{prefix}/loss"] = nll(labels, probs)
    metrics[f"{prefix}/samples"] = len(keys)
    return metrics, labels, probs
