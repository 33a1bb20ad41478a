"""`model_card.md`: what the model is, what it was trained and evaluated on, how well, and what not to use it for.

A pure function of the evaluation report, the run's config and meta and the shard manifest, written by
`eval.run` next to report.md (`RUN_DIR/eval-<split>/model_card.md`). Sections follow Mitchell et al.,
"Model Cards for Model Reporting" (2019), cut to what this pipeline knows.
"""

from __future__ import annotations

from pathlib import Path

from eval.report import metric_table, render_calibration, subtype_table
from pipelines.manifest import LABELS

# (config section, key, title): the recipe values a reader needs to judge or repeat the training.
RECIPE = (
    ("model", "arch", "architecture"), ("model", "pretrained", "initial weights"),
    ("data", "image_size", "input size (px)"), ("data", "channels", "input channels"),
    ("train", "epochs", "epochs"), ("data", "per_device_batch_size", "batch size per device"),
    ("optim", "grad_accum_steps", "gradient accumulation steps"), ("optim", "name", "optimizer"),
    ("optim", "lr", "peak learning rate"), ("optim", "schedule", "schedule"),
    ("optim", "warmup_epochs", "warm-up epochs"), ("optim", "weight_decay", "weight decay"),
    ("optim", "label_smoothing", "label smoothing"), ("optim", "class_weighting", "class weighting"),
    ("data", "train_scale", "random-resized-crop area"), ("data", "train_rotate_deg", "rotation (deg)"),
    ("data", "train_brightness", "brightness jitter"), ("data", "train_contrast", "contrast jitter"),
    ("data", "train_hflip", "horizontal flip"), ("data", "eval_crop_fraction", "eval crop fraction"),
    ("train", "seed", "seed"),
)

INTENDED_USE = (
    "Research, teaching and engineering baseline for binary pneumonia classification of frontal chest "
    "X-rays; a reproducible reference to compare models, data pipelines and training recipes against.")
LIMITATIONS = (
    "**Not a medical device.** It has not been validated clinically and must not be used to diagnose, "
    "triage or exclude pneumonia in any patient.",
    "The Kermany et al. (2018) data are **paediatric** (ages 1-5) anterior-posterior chest X-rays from **one "
    "centre** (Guangzhou Women and Children's Medical Center): adults, other hospitals, scanners, exposure "
    "protocols, lateral views and portable films are outside what it has seen, and performance there is unknown.",
    "Labels are image-level NORMAL/PNEUMONIA from the source's graders; bacterial vs viral is reported only as "
    "per-subtype recall, not predicted. Other findings (effusion, tuberculosis, COVID-19, devices) are not classes.",
    "Precision (PPV) depends on the prevalence of pneumonia in the evaluated split (see Data); it will differ "
    "in a population with another prevalence. AUROC, sensitivity and specificity do not.",
    "Confidence intervals cover sampling of this test set only, not a change of population.",
    "Grad-CAM maps (`gradcam_grid.png`, `predict.py --cam`) come from the last residual block, 1/32 of the input "
    "resolution: they show roughly where the evidence lies, not which finding it is.",
)


def _value(cfg: dict, section: str, key: str) -> str:
    value = cfg.get(section, {}).get(key, "")
    if isinstance(value, (list, tuple)):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if value == "" and key == "pretrained":
        return "none (trained from scratch)"
    return str(value)


def data_lines(manifest: dict, manifest_sha256: str, shards: str) -> list[str]:
    lines = [f"- Shards: `{shards}`, manifest.json sha256 `{manifest_sha256}`",
             f"- Source: {manifest.get('source', 'unknown')}; built with `{' '.join(manifest.get('command', []))}`",
             "", "| Split | Samples | NORMAL | PNEUMONIA | Patients |", "|---|---|---|---|---|"]
    for split, entry in manifest.get("splits", {}).items():
        per_class = entry.get("per_class", {})
        lines.append(f"| {split} | {entry.get('samples', '')} | {per_class.get(LABELS[0], '')} | "
                     f"{per_class.get(LABELS[1], '')} | {entry.get('patients', '')} |")
    if manifest.get("source") == "synthetic":
        lines += ["", "**These shards are procedurally generated (`--synthetic`), not X-rays: the numbers below "
                  "say the pipeline works, nothing about pneumonia.**"]
    return lines


def render_model_card(report: dict, cfg: dict, meta: dict, manifest: dict) -> str:
    """The card's markdown. `cfg`: the resolved config as a dict; `meta`: best/meta.json."""
    prov = report["provenance"]
    spec = meta.get("spec", {})
    t = report["threshold"]
    split = report["split"]
    run_dir = prov.get("run_dir", "RUN_DIR")
    size = spec.get("image_size", _value(cfg, "data", "image_size"))
    lines = [
        f"# Model card: {prov.get('run', '')}",
        "",
        f"Written by `python -m eval.run` on {prov.get('created', '')[:10]}; every number is recomputable from "
        f"`{split}` predictions (predictions.csv) and the run directory `{run_dir}`.",
        "",
        "## Model",
        f"- {_value(cfg, 'model', 'arch')} (torchvision) with a {meta.get('in_channels', spec.get('channels'))}-channel "
        f"stem and a 2-class head ({', '.join(LABELS)}); weights `best/model.safetensors` "
        f"(sha256 `{prov.get('sha256', {}).get('model', '')}`), epoch {meta.get('epoch')}, chosen by validation AUROC "
        f"({meta.get('val_metrics', {}).get('val/auroc', float('nan')):.4f}).",
        f"- Input: 8-bit grayscale X-ray; shorter side resized to {round(size / spec.get('eval_crop_fraction', 1.0))} px, "
        f"centre crop {size} x {size}, normalised with the training shards' mean {spec.get('mean')} and std "
        f"{spec.get('std')}.",
        f"- Output: P(PNEUMONIA) = softmax(logits)[1]. Called PNEUMONIA at P >= **{t['value']:.4g}** "
        f"({t['method']}{', chosen on `' + t['chosen_on'] + '`' if t.get('chosen_on') else ''}).",
        "",
        "## Data",
        *data_lines(manifest, prov.get("sha256", {}).get("manifest", ""), prov.get("shards", "")),
        "",
        f"Trained on `{_value(cfg, 'data', 'train_split')}`; checkpoint, threshold and calibration chosen on "
        f"`{_value(cfg, 'data', 'val_split')}`; reported on `{split}`.",
        "",
        "## Training recipe",
        "",
        "| Setting | Value |",
        "|---|---|",
        *[f"| {title} (`{section}.{key}`) | {_value(cfg, section, key)} |" for section, key, title in RECIPE],
        f"| mixed precision / device (evaluation) | {prov.get('mixed_precision', '')} / {prov.get('device', '')} |",
        "",
        "The full resolved config is `best/config.yaml`.",
        "",
        f"## Performance ({split} split, {report['samples']} images: {report['positives']} PNEUMONIA, "
        f"{report['negatives']} NORMAL)",
        "",
        f"At threshold {t['value']:.4g}; 95% CIs from {report['bootstrap']['resamples']} stratified bootstrap resamples.",
        "",
        *metric_table(report["metrics"]),
    ]
    if report["subtypes"]:
        lines += ["", *subtype_table(report["subtypes"])]
    if "calibration" in report:
        lines += ["", "## Calibration", "", *render_calibration(report)]
    lines += ["", "## Intended use", "", INTENDED_USE, "", "## Limitations", "", *[f"- {item}" for item in LIMITATIONS]]
    command = manifest.get("command", [])
    lines += [
        "", "## How to reproduce", "",
        "```",
        " ".join(command) if command else "python scripts/make_shards.py --src PATH/chest_xray --out SHARDS",
        f"accelerate launch --config_file accelerate_config.yaml train/run.py --config {run_dir}/best/config.yaml "
        "--run.dir=runs/reproduced",
        prov.get("command", f"python -m eval.run --run {run_dir} --split {split}"),
        f"python scripts/predict.py --run {run_dir} --out predictions/ IMAGE_OR_FOLDER...",
        f"python scripts/export_model.py --run {run_dir} --format onnx --out model.onnx",
        "```",
        "",
        "Retraining reproduces the recipe, not the bits: GPU kernels and data order across processes are not "
        "bitwise deterministic; compare with the CIs above.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(path: Path, report: dict, cfg: dict, meta: dict, manifest: dict) -> Path:
    path.write_text(render_model_card(report, cfg, meta, manifest))
    return path
