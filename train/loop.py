"""One training epoch and one evaluation pass. Short, explicit arguments, no hidden globals."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

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
) -> dict[str, float]:
    """Train over this rank's batches; returns the epoch's mean train loss (one host sync at the end)."""
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
        with accelerator.accumulate(model):
            logits = model(batch.images)
            loss = loss_fn(logits.float(), batch.labels)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                set_lr(optimizer, lr_for_step(state.step))
                if grad_clip_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Accumulated on the device: no .item() here, the only host syncs are every `log_every` steps.
        loss_detached = loss.detach()
        epoch_loss += loss_detached
        window_loss += loss_detached
        window_images += batch.labels.shape[0]
        epoch_images += batch.labels.shape[0]
        if not accelerator.sync_gradients:
            continue
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


def evaluate(model: nn.Module, loader, accelerator: Accelerator, prefix: str = "val") -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of one split; the loss is the unweighted NLL of the de-duplicated predictions."""
    keys, probs, labels, _ = predict(model, loader, accelerator, tta=False)
    clipped = np.clip(np.where(labels == 1, probs, 1.0 - probs), 1e-7, 1.0)
    metrics = {f"{prefix}/{k}": v for k, v in binary_metrics(labels, probs).items()}
    metrics[f"{prefix}/loss"] = float(-np.log(clipped).mean()) if len(labels) else float("nan")
    metrics[f"{prefix}/samples"] = len(keys)
    return metrics, labels, probs
