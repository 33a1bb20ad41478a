"""Metric logging: `<run.dir>/metrics.jsonl` always, W&B through Accelerate's tracker when enabled.

W&B runs offline unless credentials or WANDB_MODE say otherwise, so a laptop, CI and an air-gapped
cluster all get a complete local record (`wandb sync <run.dir>/wandb/offline-run-*` uploads it later).
Only the main process writes; other ranks' calls are no-ops.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from eval.wandb_logging import offline_unless_configured, pr_chart, roc_chart
from pipelines.manifest import LABELS
from train.config import LogConfig


def wandb_init_kwargs(cfg: LogConfig, run_dir: Path, *, resuming: bool) -> dict:
    kwargs: dict[str, Any] = {"dir": str(run_dir), "name": cfg.name or run_dir.name, "tags": list(cfg.tags)}
    if cfg.entity:
        kwargs["entity"] = cfg.entity
    if cfg.group:
        kwargs["group"] = cfg.group
    kwargs.update(offline_unless_configured())
    # A resumed training run continues the same W&B run instead of starting a second one. A fresh start does
    # not continue the W&B run of an earlier launch that failed before its first checkpoint: that run's steps
    # would collide with this one's.
    id_file = run_dir / "wandb_run_id.txt"
    if resuming and id_file.is_file():
        kwargs.update(id=id_file.read_text().strip(), resume="allow")
    return kwargs


def truncate_jsonl(path: Path, last_step: int | None) -> None:
    """Keep the rows of a killed run up to the checkpoint it resumes from, so no step is logged twice; a
    fresh start (`last_step` None) keeps none of what a launch that failed before its first checkpoint wrote."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if last_step is not None and line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing metric reads as null
    return value


class MetricsLogger:
    def __init__(self, accelerator: Accelerator, cfg: LogConfig, run_dir: Path, config_dict: dict, *,
                 resumed_step: int | None):
        """`resumed_step`: the step of the checkpoint this launch resumes from; None for a fresh start."""
        self.accelerator = accelerator
        self.cfg = cfg
        self.run_dir = run_dir
        self.wandb_run = None
        if not accelerator.is_main_process:
            return
        truncate_jsonl(run_dir / "metrics.jsonl", resumed_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: survives a kill
        if cfg.wandb:
            accelerator.init_trackers(cfg.project, config=config_dict,
                                      init_kwargs={"wandb": wandb_init_kwargs(cfg, run_dir,
                                                                              resuming=resumed_step is not None)})
            self.wandb_run = accelerator.get_tracker("wandb", unwrap=True)
            (run_dir / "wandb_run_id.txt").write_text(self.wandb_run.id)
            # The runs table shows the best, not the last, validation AUROC.
            self.wandb_run.define_metric("val/auroc", summary="max")
            self.wandb_run.define_metric("val/loss", summary="min")

    def log(self, metrics: dict[str, Any], *, step: int, epoch: int | float) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, "epoch": epoch, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_curves(self, labels: np.ndarray, probs: np.ndarray, *, step: int, prefix: str = "val") -> None:
        """ROC, PR and confusion-matrix charts (W&B only; the numbers themselves are in metrics.jsonl)."""
        if not self.accelerator.is_main_process or self.wandb_run is None or len(np.unique(labels)) < 2:
            return
        import wandb

        preds = (probs >= 0.5).astype(int)
        self.wandb_run.log({
            f"{prefix}/roc": roc_chart(labels, probs, f"ROC curve ({prefix})"),
            f"{prefix}/pr": pr_chart(labels, probs, f"Precision-recall curve ({prefix})"),
            f"{prefix}/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=labels.tolist(), preds=preds.tolist(), class_names=list(LABELS)),
        }, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        values = {k: _jsonable(v) for k, v in values.items()}
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(values, indent=2, sort_keys=True))
        os.replace(tmp, self.run_dir / "summary.json")
        if self.wandb_run is not None:
            self.wandb_run.summary.update({f"summary/{k}": v for k, v in values.items()})

    def close(self) -> None:
        if self.accelerator.is_main_process:
            self.jsonl.close()
        # Every rank: finishes the W&B run on the main process and tears down the process group everywhere.
        self.accelerator.end_training()
