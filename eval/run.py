"""Evaluate a trained run on a split: metrics with 95% CIs, plots, predictions, W&B eval run.

    python -m eval.run --run runs/demo --split test

    python -m eval.run --run RUN_DIR [--split test|val-shifted] [--shards DIR] [--threshold val|0.5|FLOAT]
        [--threshold-on val|val-shifted|val+val-shifted] [--target-sensitivity 0.95] [--tta] [--batch-size N] [--loader auto|dali|torch] [--wandb true|false]
        [--allow-other-shards]

Multi-GPU / multi-process (each sample is predicted on one rank and counted exactly once):

    accelerate launch --config_file accelerate_config.yaml --multi_gpu --num_processes 8 -m eval.run --run RUN_DIR
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m eval.run --run-dir RUN_DIR

(`--run-dir` is `--run` under torchrun, which would read `--run` as an abbreviation of its `--run-path`.)

Loads `RUN_DIR/best/model.safetensors` with `best/config.yaml` and the preprocessing of `best/meta.json`,
and writes `RUN_DIR/eval-<split>/`: report.json, report.md, model_card.md, predictions.csv (raw and calibrated
probabilities), confusion_matrix.png, roc_curve.png, pr_curve.png, reliability_diagram.png, gradcam_grid.png
(and val_predictions.csv / val_shifted_predictions.csv for a split other than those).
`--threshold val` (the default) chooses the threshold on the validation split's predictions of the same
model (Youden's J, or the most specific threshold reaching `--target-sensitivity`) and applies it
unchanged to the requested split; the test set is never used to pick it. Which validation predictions:
`--threshold-on val+val-shifted` (the default) pools the clean split with the same images under the shift
proxy, so the threshold holds up at other sites too; `val` alone is the classic choice, which shift moves
(eval/threshold.py). Every report carries the transfer table that compares the three rules on held-out
validation patients, clean and shifted. The calibration (temperature or Platt scaling, chosen by
cross-validated NLL) is fitted on clean validation too (always); with `--threshold val` both are saved as the
run's operating point, `RUN_DIR/calibration.json`, which `scripts/predict.py` and `scripts/export_model.py` use.
`--split val-shifted` (any `<split>-shifted`) evaluates that split under the acquisition-shift proxy of
pipelines/shift.py with the run's `data.shift_seed`, as training's `val_shifted/*` does; the calibration
still comes from the clean validation split (the Grad-CAM grid shows the unshifted images). Training's
`val_shifted/*` metrics use the clean-val threshold: `--threshold-on val` reproduces them.
Shards whose manifest is not the one the model was trained on (sha256 in `best/meta.json`) are refused
unless `--allow-other-shards`; every report counts its samples that were in the model's training split
(`provenance.data.in_training_split`, matched by content: see eval/provenance.py) and report.md opens with a
warning when that is not 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from eval import metrics as M
from eval import report as R
from eval import threshold as T
from eval.calibration import fit_on_validation
from eval.gradcam import write_gradcam_grid
from eval.inference import build_operating_point, write_operating_point
from eval.model_card import write_model_card
from eval.predict import TTA_DESCRIPTION, predict
from eval.provenance import check_training_overlap, flag_report, other_shards_problem
from pipelines.loaders import LOADERS, build_loader
from pipelines.manifest import ShardsError, load_manifest, sha256_file
from pipelines.shift import SHIFTED_SUFFIX, ShiftedBatches, base_split, describe
from pipelines.spec import PreprocessSpec
from train.cli import run_cli
from train.config import Config, ConfigError, config_to_dict, read_config
from train.launch import build_accelerator, input_dtype
from train.model import build_model

BEST_FILES = ("model.safetensors", "config.yaml", "meta.json")
DAMAGED_BEST_FIX = "copy the run's best/ folder again from where it came from, or retrain the run"


class EvalError(ValueError):
    """A run directory or argument that cannot be evaluated; the message names the path and the fix."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # `--run-dir` is the spelling for torchrun, whose own `--run-path` option claims the abbreviation `--run`.
    parser.add_argument("--run", "--run-dir", dest="run", required=True, type=Path,
                        help="training run directory (train/run.py --run.dir)")
    parser.add_argument("--split", default="test", help="split of the shards to evaluate (default: test)")
    parser.add_argument("--shards", type=Path, help="shards folder (default: the run's data.shards)")
    parser.add_argument("--threshold", default="val",
                        help="'val': choose on the validation split and apply unchanged; or a fixed number, e.g. 0.5")
    parser.add_argument("--threshold-on", choices=T.RULES, default=T.DEFAULT_RULE,
                        help="with --threshold val: the validation predictions that choose it: clean, under the "
                             "shift proxy, or both pooled (default: %(default)s; see eval/threshold.py)")
    parser.add_argument("--target-sensitivity", type=float,
                        help="with --threshold val: the most specific threshold reaching this sensitivity "
                             "on validation, instead of Youden's J")
    parser.add_argument("--tta", action="store_true", help="also report test-time augmentation (separately)")
    parser.add_argument("--batch-size", type=int, help="per-device batch size (default: data.per_device_eval_batch_size)")
    parser.add_argument("--loader", choices=LOADERS, help="default: the run's data.loader")
    parser.add_argument("--num-workers", type=int, help="default: the run's data.num_workers")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--wandb", choices=("true", "false"), help="log a W&B eval run (default: the run's log.wandb)")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/eval-<split>)")
    parser.add_argument("--allow-other-shards", action="store_true",
                        help="evaluate shards other than the model's training shards (manifest sha256 differs); "
                             "the report counts evaluated samples that were in the training split")
    args = parser.parse_args(argv)
    if args.threshold != "val":
        try:
            value = float(args.threshold)
        except ValueError:
            parser.error(f"--threshold must be 'val' or a number in [0, 1], got {args.threshold!r}")
        if not 0.0 <= value <= 1.0:
            parser.error(f"--threshold must be in [0, 1], got {value}")
        if args.target_sensitivity is not None:
            parser.error("--target-sensitivity chooses a threshold on validation; it needs --threshold val")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


# --- building blocks ------------------------------------------------------------------------------------


def load_trained(run_dir: Path) -> tuple[Config, dict, nn.Module]:
    """The best model of a run, its config and meta; a clear error when the run has not exported one."""
    best = run_dir / "best"
    missing = [name for name in BEST_FILES if not (best / name).is_file()]
    if missing:
        raise EvalError(
            f"{best} lacks {', '.join(missing)}: no best model was exported. Train first: `accelerate launch "
            f"train/run.py --config train/configs/<recipe>.yaml --run.dir={run_dir}` (best/ is written after the "
            "first validated epoch)")
    cfg = read_config(best / "config.yaml")
    try:
        meta = json.loads((best / "meta.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"{best / 'meta.json'} is damaged ({exc}); {DAMAGED_BEST_FIX}") from exc
    # Weights come from the run; a pretrained path in the config would only matter (and must exist) for init.
    model = build_model(dataclasses.replace(cfg.model, pretrained="", compile=False), cfg.data.channels)
    try:
        state = load_file(str(best / "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise EvalError(f"{best / 'model.safetensors'} is damaged ({exc}); {DAMAGED_BEST_FIX}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EvalError(f"{best / 'model.safetensors'} does not match model.arch={cfg.model.arch} "
                        f"with {cfg.data.channels} input channel(s): {exc}") from exc
    return cfg, meta, model


def preprocess_spec(meta: dict, cfg: Config, manifest: dict, shards: Path | None = None) -> PreprocessSpec:
    """The exact spec training validated with (normalisation from the *training* shards), from meta.json."""
    if "spec" in meta:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()}
        return PreprocessSpec(**values)
    try:
        return PreprocessSpec.from_config(cfg.data, manifest)
    except ValueError as exc:  # a manifest with `stats: null` (or without mean/std)
        where = shards / "manifest.json" if shards else "the shards' manifest.json"
        raise EvalError(f"{where}: key 'stats' is {manifest.get('stats')!r}, not the training split's pixel mean/std, "
                        "and best/meta.json has no 'spec' to take them from; evaluate on the shards the model was "
                        "trained on, or rebuild these with scripts/make_shards.py") from exc


def choose_threshold(args, val_predictions, shifted_predictions, groups) -> tuple[float, dict]:
    """The decision threshold and how it was chosen; with `--threshold val` also the transfer table.

    `val_predictions` / `shifted_predictions`: (keys, probs, labels, _) of the clean and shifted validation
    split in the same key order; `groups`: the patient of each validation sample.
    """
    if args.threshold != "val":
        return float(args.threshold), {"method": "fixed"}
    _, val_probs, val_labels, _ = val_predictions
    shifted_probs = shifted_predictions[1]
    method = "youden" if args.target_sensitivity is None else "sensitivity"
    target = args.target_sensitivity or 0.95
    try:
        choice = T.choose(args.threshold_on, val_labels, val_probs, shifted_probs, method, target)
    except ValueError as exc:
        raise EvalError(f"--threshold val: {exc} (e.g. --threshold 0.5)") from exc
    info = {k: v for k, v in choice.items() if k not in ("threshold", "sensitivity", "specificity")}
    for name, probs in (("validation", val_probs), ("validation_shifted", shifted_probs)):
        at = M.binary_metrics(val_labels, probs, choice["threshold"])
        info[name] = {"samples": int(len(val_labels)), "recall": at["recall"], "specificity": at["specificity"],
                      "accuracy": at["accuracy"]}
    if len(set(groups)) >= 2:
        info["transfer"] = T.transfer_table(val_labels, val_probs, shifted_probs, groups, method=method,
                                            target_sensitivity=target)
    return choice["threshold"], info


def provenance(args, run_dir: Path, shards: Path, cfg: Config, meta: dict, loader, accelerator) -> dict:
    return {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "shards": str(shards),
        "checkpoint_epoch": meta.get("epoch"),
        "arch": cfg.model.arch,
        "loader": loader.name,
        "loader_reason": loader.reason,
        "world_size": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "command": " ".join(["python -m eval.run", *sys.argv[1:]]),
        "sha256": {
            "model": sha256_file(run_dir / "best" / "model.safetensors"),
            "config": sha256_file(run_dir / "best" / "config.yaml"),
            "manifest": sha256_file(shards / "manifest.json"),
        },
    }


# --- entry point ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = args.run
    if not run_dir.is_dir():
        raise EvalError(f"run directory {run_dir} does not exist; pass the --run.dir of a finished training run")
    cfg, meta, model = load_trained(run_dir)
    shards = args.shards or Path(cfg.data.shards)
    manifest = load_manifest(shards)
    problem = other_shards_problem(meta, shards, run_dir, args.allow_other_shards)
    if problem:
        raise EvalError(problem)
    split, shifted = base_split(args.split, manifest["splits"])
    # Validation is always predicted: the calibration (and, with --threshold val, the threshold) is fitted there.
    for needed in {split, cfg.data.val_split}:
        if needed not in manifest["splits"]:
            raise EvalError(f"split {needed!r} is not in {shards / 'manifest.json'} "
                            f"(it has {', '.join(sorted(manifest['splits']))})")
    accelerator = build_accelerator()
    model = model.to(accelerator.device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = preprocess_spec(meta, cfg, manifest, shards)

    def loader_for(split: str):
        # Sharded by global rank; the loader pads so every rank has batches, gather_predictions de-duplicates.
        return build_loader(
            shards, split, spec=spec, per_device_batch_size=args.batch_size or cfg.data.per_device_eval_batch_size,
            train=False, loader=args.loader or cfg.data.loader, rank=accelerator.process_index,
            world_size=accelerator.num_processes, device=accelerator.device, seed=cfg.train.seed,
            num_workers=args.num_workers if args.num_workers is not None else cfg.data.num_workers,
            hw_decoder_load=cfg.data.hw_decoder_load, dtype=input_dtype(accelerator))

    loader = loader_for(split)
    if shifted:
        loader = ShiftedBatches(loader, mean=spec.mean, std=spec.std, seed=cfg.data.shift_seed)
    keys, probs, labels, tta_probs = predict(model, loader, accelerator, args.tta)
    val_shifted = cfg.data.val_split + SHIFTED_SUFFIX
    val_predictions = (keys, probs, labels, None) if args.split == cfg.data.val_split else \
        predict(model, loader_for(cfg.data.val_split), accelerator, tta=False)
    # The threshold rules and their transfer table need validation under the shift proxy too (one more pass).
    shifted_predictions = None
    if args.threshold == "val":
        shifted_predictions = (keys, probs, labels, None) if args.split == val_shifted else predict(
            model, ShiftedBatches(loader_for(cfg.data.val_split), mean=spec.mean, std=spec.std, seed=cfg.data.shift_seed),
            accelerator, tta=False)
    if not accelerator.is_main_process:
        # The gather above was the last collective: no barrier here, so an error on rank 0 (e.g. a one-class
        # validation split) ends the job instead of leaving the other ranks waiting for it.
        return 0

    val_metadata = R.load_sample_metadata(shards, cfg.data.val_split, manifest)
    # predict() returns samples sorted by key, so the two passes line up sample by sample.
    assert shifted_predictions is None or shifted_predictions[0] == val_predictions[0], "predict() sorts by key"
    groups = [val_metadata.get(k, {}).get("patient") or k for k in val_predictions[0]]
    threshold, threshold_info = choose_threshold(args, val_predictions, shifted_predictions, groups)
    calibration = fit_on_validation(val_labels=val_predictions[2], val_probs=val_predictions[1])
    data_check = check_training_overlap(meta, run_dir / "best", shards, manifest,
                                        [split, cfg.data.val_split], args.allow_other_shards)
    metadata = val_metadata if split == cfg.data.val_split else R.load_sample_metadata(shards, split, manifest)
    origin = provenance(args, run_dir, shards, cfg, meta, loader, accelerator)
    if shifted:
        origin["shift"] = describe(cfg.data.shift_seed)
    report = R.build_report(
        keys, labels, probs, split=args.split, threshold=threshold, threshold_info=threshold_info,
        metadata=metadata, n_resamples=args.bootstrap, seed=args.seed, tta_probs=tta_probs,
        tta_description=TTA_DESCRIPTION,
        provenance={**origin, "data": data_check},
        calibration=calibration)
    out_dir = args.out or run_dir / f"eval-{args.split}"
    paths = R.write_report(out_dir, report, keys, labels, probs, metadata, tta_probs=tta_probs)
    flag_report(paths["report.md"], data_check)
    paths["gradcam_grid.png"] = write_gradcam_grid(model, shards, split, keys, labels, probs, threshold, spec,
                                                   out_dir / "gradcam_grid.png")
    paths["model_card.md"] = write_model_card(out_dir / "model_card.md", report, config_to_dict(cfg), meta, manifest)
    if args.threshold == "val" and shards.resolve() == Path(cfg.data.shards).resolve():
        # Only the run's own validation split defines its operating point; other --shards stay a report.
        write_operating_point(run_dir, build_operating_point(
            threshold=threshold, threshold_info=threshold_info, calibration=calibration,
            model_sha256=report["provenance"]["sha256"]["model"],
            source={"split": threshold_info["chosen_on"], "samples": threshold_info["validation"]["samples"], "shards": str(shards),
                    "manifest_sha256": report["provenance"]["sha256"]["manifest"], "loader": loader.name,
                    "by": report["provenance"]["command"]}))
    if args.split != cfg.data.val_split:
        val_keys, val_probs, val_labels, _ = val_predictions
        R.write_predictions_csv(out_dir / "val_predictions.csv", val_keys, val_labels, val_probs, threshold,
                                val_metadata)
    if shifted_predictions is not None and args.split != val_shifted:
        shifted_keys, shifted_probs, shifted_labels, _ = shifted_predictions
        R.write_predictions_csv(out_dir / "val_shifted_predictions.csv", shifted_keys, shifted_labels, shifted_probs,
                                threshold, val_metadata)
    use_wandb = cfg.log.wandb if args.wandb is None else args.wandb == "true"
    if use_wandb:
        from eval.wandb_logging import log_eval_run

        config = {**config_to_dict(cfg), "eval": {"run_dir": str(run_dir), "shards": str(shards), "tta": args.tta,
                                                   "threshold": args.threshold, "bootstrap": args.bootstrap}}
        wandb_dir = log_eval_run(log_cfg=cfg.log, run_dir=run_dir, split=args.split, report=report, keys=keys,
                                 labels=labels, probs=probs, metadata=metadata, config=config,
                                 images={k: v for k, v in paths.items() if k.endswith(".png")})
        print(f"W&B eval run: {wandb_dir}")
    print(paths["report.md"].read_text())
    print(f"evaluation written to {out_dir}")
    if data_check["warning"]:
        print(f"warning: {data_check['warning']}", file=sys.stderr)
    return 0


def cli() -> None:
    run_cli(main, EvalError, ConfigError, ShardsError)


if __name__ == "__main__":
    cli()
