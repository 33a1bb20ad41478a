"""Predict P(PNEUMONIA) for new chest X-ray images with a trained run, optionally with Grad-CAM overlays.

    python scripts/predict.py --run runs/demo --out predictions/ xray.jpeg scans/ 'more/**/*.png' [--cam]

    python scripts/predict.py --run RUN_DIR --out OUT_DIR INPUT... [--threshold FLOAT] [--cam]
        [--batch-size 32] [--cpu]

INPUT: image files (JPEG/PNG, any mode: converted to 8-bit gray as make_shards does), folders (searched
recursively for .jpg/.jpeg/.png) or quoted globs. Each image goes through the evaluation preprocessing of
the run (`best/meta.json`'s spec: resize, centre crop, the training shards' mean/std) via the torch loader's
own transform, so an image that is also in the shards gets the probability `eval.run` gives it.

Writes OUT_DIR/predictions.csv (path as given, probability, calibrated_probability, call, threshold[, cam])
and OUT_DIR/skipped.csv (path, reason) for inputs that are missing, unreadable or not images; they never
stop the batch. With `--cam`, OUT_DIR/cam/NNNN-<name>.png: a Grad-CAM overlay per image at the network
input's size, for the class called. Exit status 0 when at least one image was predicted, 1 when none was.

`call` is PNEUMONIA when probability >= the run's threshold: `--threshold` if given, else the one in
RUN_DIR/calibration.json (chosen on validation by `python -m eval.run`), else one chosen now on the run's
validation split (Youden's J) and saved there. `calibrated_probability` is sigmoid(slope * (l1 - l0) +
intercept), the calibration map chosen and fitted on validation (same file: Platt scaling, or temperature
scaling with slope 1/T and intercept 0); it is left empty when no validation split can be read.
Runs in fp32 on the GPU when there is one (`--cpu` to stay on the CPU).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch

from eval import calibration as C
from eval import inference as I
from eval.run import EvalError, load_trained, preprocess_spec
from pipelines.manifest import LABELS, ShardsError, load_manifest
from pipelines.torch_loader import build_transform
from train.cli import run_cli
from train.config import ConfigError
from train.launch import build_accelerator


class PredictError(ValueError):
    """Nothing can be predicted as asked; the message names the file and the fix."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="training run directory (holds best/)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for predictions.csv, skipped.csv, cam/")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or quoted globs")
    parser.add_argument("--threshold", type=float, help="call PNEUMONIA at probability >= this (default: the run's)")
    parser.add_argument("--cam", action="store_true", help="write a Grad-CAM overlay per image into OUT/cam/")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    args = parser.parse_args(argv)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def operating_point(args, cfg, spec, model, accelerator) -> tuple[float, dict | None, str]:
    """(threshold, calibration map or None, where they come from)."""
    try:
        point, source = I.ensure_operating_point(args.run, cfg, spec, model, accelerator)
    except I.OperatingPointError as exc:
        if args.threshold is None:
            raise PredictError(f"{exc}, or pass --threshold") from exc
        print(f"warning: no calibration ({exc}); calibrated_probability is left empty", file=sys.stderr)
        return args.threshold, None, "--threshold"
    if args.threshold is not None:
        return args.threshold, point["calibration"], "--threshold"
    return point["threshold"], point["calibration"], source


def predict_batch(model, cfg, spec, accelerator, batch: list[tuple[int, str, torch.Tensor]], threshold: float,
                  calibration: dict | None, cam_dir: Path | None) -> list[dict]:
    images = torch.stack([x for _, _, x in batch])
    logits = I.predict_logits(model, images, accelerator.device, cfg.model.channels_last)
    probs = I.pneumonia_probability(logits)
    calibrated = I.calibrated_probability(logits, calibration) if calibration is not None else [None] * len(batch)
    calls = [int(p >= threshold) for p in probs]
    rows = [{"path": path, "probability": repr(float(p)), "calibrated_probability": "" if c is None else repr(float(c)),
             "call": LABELS[call], "threshold": repr(float(threshold))}
            for (_, path, _), p, c, call in zip(batch, probs, calibrated, calls, strict=True)]
    if cam_dir is not None:
        from eval.gradcam import save_overlays

        cam_paths = [cam_dir / f"{index:04d}-{Path(path).stem}.png" for index, path, _ in batch]
        save_overlays(model, images, calls, spec, cam_paths)
        for row, cam_path in zip(rows, cam_paths, strict=True):
            row["cam"] = str(cam_path.relative_to(cam_dir.parent))
    return rows


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict], skipped: list[I.Skipped], threshold: float, calibration: dict | None,
                source: str) -> None:
    width = max([len("path"), *(len(r["path"]) for r in rows)])
    print(f"{'path':<{width}}  P(PNEUMONIA)  calibrated  call")
    for r in rows:
        calibrated = f"{float(r['calibrated_probability']):10.4f}" if r["calibrated_probability"] else f"{'-':>10}"
        print(f"{r['path']:<{width}}  {float(r['probability']):12.4f}  {calibrated}  {r['call']}")
    how = f"calibration {C.describe_calibration(calibration)}" if calibration is not None else "no calibration"
    print(f"{len(rows)} predicted; threshold {threshold:.4g} ({source}); {how}")
    if skipped:
        print(f"{len(skipped)} skipped:")
        for s in skipped:
            print(f"  {s.path}: {s.reason}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run.is_dir():
        raise PredictError(f"run directory {args.run} does not exist; pass the --run.dir of a trained run")
    if args.cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"  # build_accelerator's own switch
    cfg, meta, model = load_trained(args.run)
    spec = preprocess_spec(meta, cfg, {} if "spec" in meta else load_manifest(cfg.data.shards))
    accelerator = build_accelerator()
    model = model.to(accelerator.device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    threshold, calibration, source = operating_point(args, cfg, spec, model, accelerator)

    paths, skipped = I.collect_inputs(args.inputs)
    args.out.mkdir(parents=True, exist_ok=True)
    cam_dir = args.out / "cam" if args.cam else None
    if cam_dir is not None:
        cam_dir.mkdir(exist_ok=True)
    transform = build_transform(spec, train=False)
    rows: list[dict] = []
    batch: list[tuple[int, str, torch.Tensor]] = []
    for index, path in enumerate(paths):
        try:
            batch.append((index, path, transform(I.load_gray(path))))
        except I.BadImage as exc:
            skipped.append(I.Skipped(path, str(exc)))
        if len(batch) == args.batch_size or (batch and index == len(paths) - 1):
            rows += predict_batch(model, cfg, spec, accelerator, batch, threshold, calibration, cam_dir)
            batch = []

    fields = ["path", "probability", "calibrated_probability", "call", "threshold"] + (["cam"] if args.cam else [])
    write_csv(args.out / "predictions.csv", rows, fields)
    write_csv(args.out / "skipped.csv", [{"path": s.path, "reason": s.reason} for s in skipped], ["path", "reason"])
    print_table(rows, skipped, threshold, calibration, source)
    print(f"written to {args.out / 'predictions.csv'} and {args.out / 'skipped.csv'}")
    if not rows:
        print(f"error: no image could be predicted ({len(skipped)} input(s) skipped, see {args.out / 'skipped.csv'})",
              file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    run_cli(main, PredictError, EvalError, ConfigError, ShardsError)


if __name__ == "__main__":
    cli()
