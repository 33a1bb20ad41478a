"""Log an evaluation report as its own W&B run (`job_type="eval"`) next to the training run.

The eval run joins the training run's project, entity and group, and records the training run's name
and W&B id in its config (`eval.source_run`, `eval.source_wandb_id`), so `scripts/compare_runs.py
--wandb` and the W&B UI can pair them. Offline unless `WANDB_API_KEY` or `WANDB_MODE` say otherwise;
upload later with `wandb sync RUN_DIR/wandb/offline-run-*`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from eval.metrics import COUNT_KEYS, RATE_KEYS, pr_points, roc_points
from pipelines.manifest import LABELS


def offline_unless_configured() -> dict[str, str]:
    """`wandb.init` kwargs: offline unless credentials or WANDB_MODE say otherwise (never needs the network)."""
    return {} if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else {"mode": "offline"}


def _curve_chart(x: list[float], y: list[float], *, x_name: str, y_name: str, title: str, x_title: str, y_title: str):
    """A W&B line chart with the vega spec `wandb.plot.roc_curve`/`pr_curve` use.

    Built from our own (sklearn) points: identical to report.json's curves, and free of the pandas
    dependency that `wandb.plot.roc_curve`/`pr_curve` import.
    """
    import wandb

    if len(x) > wandb.Table.MAX_ROWS:
        # Evenly spaced points, both ends kept: the curve shape survives, the table stays under W&B's cap.
        keep = np.unique(np.linspace(0, len(x) - 1, wandb.Table.MAX_ROWS).round().astype(int))
        x, y = [x[i] for i in keep], [y[i] for i in keep]
    table = wandb.Table(columns=["class", x_name, y_name], data=[["PNEUMONIA", a, b] for a, b in zip(x, y, strict=True)])
    return wandb.plot_table(
        vega_spec_name="wandb/area-under-curve/v0", data_table=table,
        fields={"x": x_name, "y": y_name, "class": "class"},
        string_fields={"title": title, "x-axis-title": x_title, "y-axis-title": y_title},
    )


def roc_chart(labels, probs, title: str = "ROC curve"):
    roc = roc_points(labels, probs)
    fpr = [0.0 if not np.isfinite(t) else f for f, t in zip(roc["fpr"], roc["thresholds"], strict=True)]
    return _curve_chart(fpr, roc["tpr"], x_name="fpr", y_name="tpr", title=title,
                        x_title="False positive rate", y_title="True positive rate")


def pr_chart(labels, probs, title: str = "Precision-recall curve"):
    pr = pr_points(labels, probs)
    return _curve_chart(pr["recall"], pr["precision"], x_name="recall", y_name="precision", title=title,
                        x_title="Recall", y_title="Precision")


def summary_metrics(report: dict, split: str) -> dict[str, float | int]:
    """Flat W&B summary keys: `<split>/<metric>`, `<split>/<metric>_ci_low|_ci_high`, counts, threshold."""
    out: dict[str, float | int] = {f"{split}/threshold": report["threshold"]["value"], f"{split}/samples": report["samples"]}
    for key in RATE_KEYS:
        entry = report["metrics"][key]
        if entry["value"] is None or not math.isfinite(entry["value"]):
            continue  # undefined metrics stay absent; report.json says why
        out[f"{split}/{key}"] = entry["value"]
        if entry["ci95"][0] is not None and math.isfinite(entry["ci95"][0]):
            out[f"{split}/{key}_ci_low"], out[f"{split}/{key}_ci_high"] = entry["ci95"]
    for key in COUNT_KEYS:
        out[f"{split}/{key}"] = report["confusion"][key]
    for name, entry in report["subtypes"].items():
        out[f"{split}/recall_{name}"] = entry["recall"]
    if "tta" in report:
        for key in RATE_KEYS:
            value = report["tta"]["metrics"][key]["value"]
            if value is not None and math.isfinite(value):
                out[f"{split}_tta/{key}"] = value
    return out


def log_eval_run(
    *,
    log_cfg,
    run_dir: Path,
    split: str,
    report: dict,
    keys: list[str],
    labels: np.ndarray,
    probs: np.ndarray,
    metadata: dict[str, dict],
    images: dict[str, Path],
    config: dict,
) -> Path:
    """Create, fill and finish the eval run; returns the local W&B run folder."""
    import wandb

    source_id_file = run_dir / "wandb_run_id.txt"
    source_name = log_cfg.name or run_dir.name
    kwargs = {
        "project": log_cfg.project,
        "entity": log_cfg.entity or None,
        "group": log_cfg.group or None,
        "tags": [*log_cfg.tags, "eval"],
        "job_type": "eval",
        "name": f"{source_name}-eval-{split}",
        "config": {**config, "eval": {**config.get("eval", {}), "split": split, "source_run": source_name,
                                      "source_wandb_id": source_id_file.read_text().strip() if source_id_file.is_file() else None}},
    }
    if not os.environ.get("WANDB_DIR"):
        kwargs["dir"] = str(run_dir)
    run = wandb.init(**kwargs, **offline_unless_configured())
    try:
        run.summary.update(summary_metrics(report, split))
        preds = (probs >= report["threshold"]["value"]).astype(int)
        charts = {f"{split}/{name.removesuffix('.png')}_png": wandb.Image(str(path)) for name, path in images.items()}
        if len(np.unique(labels)) == 2:
            charts[f"{split}/roc"] = roc_chart(labels, probs, f"ROC curve ({split})")
            charts[f"{split}/pr"] = pr_chart(labels, probs, f"Precision-recall curve ({split})")
        charts[f"{split}/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=labels.tolist(), preds=preds.tolist(), class_names=list(LABELS))
        table = wandb.Table(columns=["key", "label", "probability", "prediction", "source", "subtype"])
        for key, label, prob, pred in zip(keys, labels.tolist(), probs.tolist(), preds.tolist(), strict=True):
            table.add_data(key, list(LABELS)[label], prob, list(LABELS)[pred], metadata[key].get("source", ""),
                           metadata[key].get("subtype", ""))
        charts[f"{split}/predictions"] = table
        run.log(charts)
        return Path(run.dir).parent
    finally:
        run.finish()
