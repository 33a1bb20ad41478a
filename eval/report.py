"""Evaluation report: metrics with CIs, per-subtype recall, plots, predictions and provenance.

`build_report` is a pure function of the predictions (plus the threshold and how it was chosen), so
`report.json` can be recomputed from `predictions.csv` alone; `write_report` writes the folder
`RUN_DIR/eval-<split>/`: report.json, report.md, predictions.csv, confusion_matrix.png, roc_curve.png,
pr_curve.png, and reliability_diagram.png when the report holds a calibration (`eval.calibration`). Plots use matplotlib's object API (`Figure`), never pyplot, so no global backend is
touched and nothing needs a display.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from eval import calibration as C
from eval import metrics as M
from eval.threshold import transfer_markdown
from pipelines.manifest import LABELS
from pipelines.shards import resolve_split

REPORT_VERSION = 1
PREDICTION_FIELDS = ("key", "label", "probability", "prediction", "source", "subtype")
METRIC_TITLES = {
    "accuracy": "Accuracy",
    "precision": "Precision (PPV)",
    "recall": "Recall (sensitivity)",
    "specificity": "Specificity",
    "f1": "F1",
    "auroc": "AUROC",
    "pr_auc": "Average precision (PR-AUC)",
}


# --- inputs ---------------------------------------------------------------------------------------------


def load_sample_metadata(shards_dir: str | Path, split: str, manifest: dict | None = None) -> dict[str, dict]:
    """`{key: {source, subtype, ...}}` from the `.json` member of every sample of `split`'s shards.

    Reads through `pipelines.shards` (the loaders' checks of the split, only the small json members
    decoded), so a shard that disagrees with the manifest is a `ShardsError` naming it.
    """
    return resolve_split(shards_dir, split, manifest=manifest).metadata()


# --- the report -----------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: undefined metrics are written as null (with the reason under `undefined`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, np.generic):
        return _finite_or_none(value.item())
    return value


def metrics_with_ci(labels, probs, threshold: float, *, n_resamples: int, seed: int) -> dict:
    """`{metrics: {name: {value, ci95}}, confusion: {tn, fp, fn, tp}, undefined: {name: reason}}`."""
    point = M.binary_metrics(labels, probs, threshold)
    ci = M.bootstrap_ci(labels, probs, threshold, n_resamples=n_resamples, seed=seed)
    return {
        "metrics": {k: {"value": point[k], "ci95": ci[k]} for k in M.RATE_KEYS},
        "confusion": {k: point[k] for k in M.COUNT_KEYS},
        "undefined": M.metric_notes(labels, probs, threshold),
    }


def subtype_recall(keys, labels, probs, threshold: float, metadata: dict[str, dict]) -> dict[str, dict]:
    """Recall of PNEUMONIA per subtype (bacteria / virus, from the shard metadata) with a Wilson 95% CI."""
    out: dict[str, dict] = {}
    for key, label, prob in zip(keys, labels, probs, strict=True):
        if int(label) != 1:
            continue
        subtype = metadata[key].get("subtype") or "unknown"
        entry = out.setdefault(subtype, {"positives": 0, "detected": 0})
        entry["positives"] += 1
        entry["detected"] += int(prob >= threshold)
    for entry in out.values():
        entry["recall"] = entry["detected"] / entry["positives"]
        entry["ci95"] = M.wilson_interval(entry["detected"], entry["positives"])
    return dict(sorted(out.items()))


def build_report(
    keys,
    labels,
    probs,
    *,
    split: str,
    threshold: float,
    threshold_info: dict,
    metadata: dict[str, dict],
    n_resamples: int = 1000,
    seed: int = 0,
    tta_probs=None,
    tta_description: str = "",
    provenance: dict | None = None,
    calibration: dict | None = None,
) -> dict:
    """Everything `report.json` holds, computed from predictions only (NaN kept; see `write_report`).

    `calibration`: `eval.calibration.fit_on_validation`'s result (the map chosen and fitted on validation); the
    report adds ECE, Brier and NLL before/after it on this split (on validation itself the fit's own, in-sample
    summary is kept). The threshold stays on raw probabilities.
    """
    keys = list(keys)
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    missing = [k for k in keys if k not in metadata]
    if missing:
        raise ValueError(f"{len(missing)} predicted keys have no shard metadata (first: {missing[0]!r}); "
                         "were the predictions made on other shards than --shards?")
    report = {
        "version": REPORT_VERSION,
        "split": split,
        "samples": len(keys),
        "positives": int(labels.sum()),
        "negatives": int((labels == 0).sum()),
        "threshold": {"value": float(threshold), **threshold_info},
        **metrics_with_ci(labels, probs, threshold, n_resamples=n_resamples, seed=seed),
        "subtypes": subtype_recall(keys, labels, probs, threshold, metadata),
        "bootstrap": {"method": "stratified percentile", "resamples": n_resamples, "seed": seed, "confidence": 0.95},
    }
    if tta_probs is not None:
        tta_probs = np.asarray(tta_probs, dtype=np.float64)
        report["tta"] = {
            "description": tta_description,
            **metrics_with_ci(labels, tta_probs, threshold, n_resamples=n_resamples, seed=seed),
            "subtypes": subtype_recall(keys, labels, tta_probs, threshold, metadata),
        }
    if calibration is not None:
        summary = calibration[split] if split in calibration else C.calibration_summary(labels, probs, calibration)
        report["calibration"] = {**calibration, split: summary}
    report["provenance"] = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(provenance or {})}
    return report


# --- predictions.csv ------------------------------------------------------------------------------------


def write_predictions_csv(path, keys, labels, probs, threshold: float, metadata: dict[str, dict], tta_probs=None,
                          calibrated_probs=None) -> None:
    fields = list(PREDICTION_FIELDS) + (["probability_tta"] if tta_probs is not None else []) \
        + (["calibrated_probability"] if calibrated_probs is not None else [])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for i, key in enumerate(keys):
            meta = metadata[key]
            # repr() of a float round-trips exactly, so metrics recomputed from this file are identical.
            row = [key, int(labels[i]), repr(float(probs[i])), int(probs[i] >= threshold),
                   meta.get("source", ""), meta.get("subtype", "")]
            if tta_probs is not None:
                row.append(repr(float(tta_probs[i])))
            if calibrated_probs is not None:
                row.append(repr(float(calibrated_probs[i])))
            writer.writerow(row)


def read_predictions_csv(path: str | Path) -> dict[str, Any]:
    """`{keys, labels, probs, metadata[, tta_probs][, calibrated_probs]}` as written by `write_predictions_csv`."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not set(PREDICTION_FIELDS) <= set(rows[0]):
        raise ValueError(f"{path} lacks columns {sorted(set(PREDICTION_FIELDS) - set(rows[0]))}")
    out = {
        "keys": [r["key"] for r in rows],
        "labels": np.array([int(r["label"]) for r in rows], dtype=np.int64),
        "probs": np.array([float(r["probability"]) for r in rows], dtype=np.float64),
        "metadata": {r["key"]: {"source": r["source"], "subtype": r["subtype"]} for r in rows},
    }
    if rows and "probability_tta" in rows[0]:
        out["tta_probs"] = np.array([float(r["probability_tta"]) for r in rows], dtype=np.float64)
    if rows and "calibrated_probability" in rows[0]:
        out["calibrated_probs"] = np.array([float(r["calibrated_probability"]) for r in rows], dtype=np.float64)
    return out


# --- plots ----------------------------------------------------------------------------------------------


def format_ci(entry: dict) -> str:
    value, (lo, hi) = entry["value"], entry["ci95"]
    if value is None or not math.isfinite(value):
        return "undefined"
    if lo is None or not math.isfinite(lo):
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def plot_confusion_matrix(report: dict, path: str | Path) -> None:
    c = report["confusion"]
    matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig = Figure(figsize=(4.6, 4.0), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, label="samples")
    for (i, j), count in np.ndenumerate(matrix):
        row_total = max(matrix[i].sum(), 1)
        ax.text(j, i, f"{count}\n{count / row_total:.1%}", ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    ax.set_xticks([0, 1], LABELS)
    ax.set_yticks([0, 1], LABELS)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"{report['split']}: threshold {report['threshold']['value']:.3g} ({report['threshold']['method']})")
    fig.savefig(path, dpi=120)


def plot_roc(labels, probs, report: dict, path: str | Path) -> None:
    fig = Figure(figsize=(4.8, 4.6), layout="constrained")
    ax = fig.subplots()
    if report["undefined"].get("auroc"):
        ax.text(0.5, 0.5, "ROC undefined:\n" + report["undefined"]["auroc"], ha="center", va="center", wrap=True)
    else:
        roc = M.roc_points(labels, probs)
        ax.plot(roc["fpr"], roc["tpr"], lw=2, label=f"AUROC = {format_ci(report['metrics']['auroc'])}")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUROC = 0.5)")
        spec, sens = report["metrics"]["specificity"]["value"], report["metrics"]["recall"]["value"]
        ax.plot([1 - spec], [sens], "o", color="black",
                label=f"threshold {report['threshold']['value']:.3g}: sens {sens:.3f}, spec {spec:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(f"ROC curve, {report['split']} split (n = {report['samples']})")
    fig.savefig(path, dpi=120)


def plot_pr(labels, probs, report: dict, path: str | Path) -> None:
    fig = Figure(figsize=(4.8, 4.6), layout="constrained")
    ax = fig.subplots()
    if report["undefined"].get("pr_auc"):
        ax.text(0.5, 0.5, "PR curve undefined:\n" + report["undefined"]["pr_auc"], ha="center", va="center", wrap=True)
    else:
        pr = M.pr_points(labels, probs)
        ax.step(pr["recall"], pr["precision"], where="post", lw=2, label=f"AP = {format_ci(report['metrics']['pr_auc'])}")
        prevalence = report["positives"] / report["samples"]
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"prevalence (AP of chance) = {prevalence:.3f}")
        rec, prec = report["metrics"]["recall"]["value"], report["metrics"]["precision"]["value"]
        if math.isfinite(prec):
            ax.plot([rec], [prec], "o", color="black", label=f"threshold {report['threshold']['value']:.3g}")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Recall (sensitivity)")
    ax.set_ylabel("Precision (positive predictive value)")
    ax.set_title(f"Precision-recall curve, {report['split']} split")
    fig.savefig(path, dpi=120)


# --- report.md ------------------------------------------------------------------------------------------


def metric_table(metrics: dict, header: str = "Value [95% CI]") -> list[str]:
    return ["| Metric | " + header + " |", "|---|---|",
            *[f"| {METRIC_TITLES[k]} | {format_ci(metrics[k])} |" for k in M.RATE_KEYS]]


def subtype_table(subtypes: dict) -> list[str]:
    lines = ["| PNEUMONIA subtype | Positives | Detected | Recall [95% Wilson CI] |", "|---|---|---|---|"]
    for name, s in subtypes.items():
        lines.append(f"| {name} | {s['positives']} | {s['detected']} | {format_ci({'value': s['recall'], 'ci95': s['ci95']})} |")
    return lines


def render_markdown(report: dict) -> str:
    t = report["threshold"]
    on = {"val": "the validation split", "val-shifted": "the validation split under the shift proxy",
          "val+val-shifted": "the validation split, clean and under the shift proxy, pooled"}.get(
        t.get("chosen_on", "val"), t.get("chosen_on", ""))
    how = {
        "youden": f"Youden's J maximised on {on}",
        "sensitivity": f"highest threshold reaching sensitivity {t.get('target_sensitivity')} on {on}",
        "fixed": "fixed by the user",
    }.get(t["method"], t["method"])
    lines = [
        f"# Evaluation: {report['provenance'].get('run', '')} ({report['split']} split)",
        "",
        f"{report['samples']} samples: {report['positives']} PNEUMONIA, {report['negatives']} NORMAL. "
        f"Decision threshold **{t['value']:.4g}** ({how}); a probability at or above it is called PNEUMONIA.",
        "",
        *metric_table(report["metrics"]),
    ]
    c = report["confusion"]
    lines += [
        "",
        f"95% CIs: {report['bootstrap']['method']} bootstrap, {report['bootstrap']['resamples']} resamples, "
        f"seed {report['bootstrap']['seed']}.",
        "",
        "| Confusion matrix | Predicted NORMAL | Predicted PNEUMONIA |",
        "|---|---|---|",
        f"| True NORMAL | {c['tn']} (TN) | {c['fp']} (FP) |",
        f"| True PNEUMONIA | {c['fn']} (FN) | {c['tp']} (TP) |",
    ]
    if report["subtypes"]:
        lines += ["", *subtype_table(report["subtypes"])]
    if "tta" in report:
        lines += ["", f"Test-time augmentation ({report['tta']['description']}; same threshold), reported separately: "
                  "the headline numbers above do not use it.", "",
                  *metric_table(report["tta"]["metrics"], "With TTA [95% CI]")]
    if "calibration" in report:
        lines += ["", *render_calibration(report)]
    if report["undefined"]:
        lines += ["", "Undefined metrics:"] + [f"- {k}: {v}" for k, v in report["undefined"].items()]
    if "validation" in t:
        v = t["validation"]
        lines += ["", f"At this threshold on the validation split ({v['samples']} samples): sensitivity "
                  f"{v['recall']:.3f}, specificity {v['specificity']:.3f}"
                  + (f"; under the shift proxy: sensitivity {t['validation_shifted']['recall']:.3f}, specificity "
                     f"{t['validation_shifted']['specificity']:.3f}." if "validation_shifted" in t else ".")]
    if "transfer" in t:
        lines += ["", *transfer_markdown(t["transfer"], t.get("chosen_on", ""))]
    hashes = report["provenance"].get("sha256", {})
    if hashes:
        lines += ["", "Provenance (sha256):"] + [f"- {k}: `{v}`" for k, v in hashes.items()]
    return "\n".join(lines) + "\n"


def render_calibration(report: dict) -> list[str]:
    """Markdown lines: how the calibration was chosen, and ECE, Brier and NLL of raw vs calibrated probabilities."""
    cal = report["calibration"]
    formula = ("sigmoid(a (l1 - l0) + b)" if cal["method"] == "platt" else "softmax(logits / T)")
    lines = [f"Calibration: **{C.describe_calibration(cal)}** fitted on the validation split (NLL), applied as "
             f"{formula}; the decision threshold stays on the raw probability. "
             f"ECE over {cal['bins']} equal-width bins of P(PNEUMONIA)."]
    selection = cal.get("selection", {})
    if "nll" in selection:
        nll = selection["nll"]
        lines += ["", f"Chosen by {selection['criterion']}: temperature {nll['temperature']:.4f}, "
                  f"Platt {nll['platt']:.4f}. The in-sample validation rows use the predictions the map was fitted on; "
                  "the out-of-fold rows (each sample calibrated by a fit on the other folds) are the honest "
                  "validation figures."]
    elif "skipped" in selection:
        lines += ["", f"No cross-validated choice: {selection['skipped']}."]
    lines += ["", "| Split | Probabilities | ECE | Brier | NLL |", "|---|---|---|---|---|"]
    names = {"before": "raw", "after": C.describe_calibration(cal)}
    if cal.get("temperature") is not None:
        names["temperature"] = f"temperature T = {cal['temperature']:.3g}"
    per_fold = {"before": "raw", "after": f"{cal['method']}, fitted per fold", "temperature": "temperature, fitted per fold"}
    rows = [(f"val, in-sample (n = {cal['val']['samples']})", cal["val"], names)]
    if "val_out_of_fold" in cal:
        rows.append((f"val, out-of-fold (n = {cal['val_out_of_fold']['samples']})", cal["val_out_of_fold"], per_fold))
    if report["split"] != "val":
        rows.append((f"{report['split']} (n = {cal[report['split']]['samples']})", cal[report["split"]], names))
    for title, s, columns in rows:
        for which, name in columns.items():
            if which in s["ece"]:
                lines.append(f"| {title} | {name} | {s['ece'][which]:.4f} | {s['brier'][which]:.4f} "
                             f"| {s['nll'][which]:.4f} |")
    return lines


# --- writing --------------------------------------------------------------------------------------------


def write_report(out_dir: str | Path, report: dict, keys, labels, probs, metadata: dict[str, dict], tta_probs=None) -> dict[str, Path]:
    """Write the evaluation folder; returns `{name: path}` of every file written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    paths = {name: out_dir / name for name in (
        "report.json", "report.md", "predictions.csv", "confusion_matrix.png", "roc_curve.png", "pr_curve.png")}
    cal = report.get("calibration")
    calibrated = C.apply_calibration(probs, cal) if cal is not None else None
    write_predictions_csv(paths["predictions.csv"], keys, labels, probs, report["threshold"]["value"], metadata, tta_probs,
                          calibrated)
    paths["report.json"].write_text(json.dumps(_finite_or_none(report), indent=2, allow_nan=False) + "\n")
    paths["report.md"].write_text(render_markdown(report))
    plot_confusion_matrix(report, paths["confusion_matrix.png"])
    plot_roc(labels, probs, report, paths["roc_curve.png"])
    plot_pr(labels, probs, report, paths["pr_curve.png"])
    if cal is not None:
        paths["reliability_diagram.png"] = out_dir / "reliability_diagram.png"
        C.plot_reliability_diagram(labels, probs, cal, paths["reliability_diagram.png"],
                                   f"Reliability, {report['split']} split (calibration fitted on val)")
    return paths
