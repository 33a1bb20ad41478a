"""Using a trained run on new images: inputs, decoding, the evaluation transform, logits, the operating point.

Shared by `scripts/predict.py`, `scripts/export_model.py` and `eval.run`. An image takes exactly the path of
the evaluation loaders' torch fallback: PIL decode -> 8-bit grayscale -> `build_transform(spec, train=False)`
(resize the shorter side, centre crop, normalise with the *training* shards' mean/std from `best/meta.json`).
Two steps come first that shard images had already been through in `make_shards`: EXIF orientation is
applied, and modes other than 8-bit gray are converted by the same rule (`_to_gray`: 16-bit windowed to the
used range, alpha onto black). The one difference left: `make_shards` caps the longer side at `max_side`
(512 px by default) before training ever sees an image, predict resizes the original directly to the
evaluation size (both antialiased).

The run's operating point, `RUN_DIR/calibration.json`: the decision threshold chosen on the validation split
(on raw probabilities) and the calibration map chosen and fitted there (`eval.calibration.fit_on_validation`:
temperature or Platt scaling), with the sha256 of the model they belong to. Written
by `python -m eval.run` when it chooses the threshold on validation (the default), or by predict/export when
it is missing or belongs to another model; read by predict (`calibrated_probability`, `call`) and export
(model metadata).
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from eval import calibration as C
from eval import threshold as T
from pipelines.make_shards.convert import Rejected, open_gray
from pipelines.make_shards.scan import IMAGE_SUFFIXES
from pipelines.manifest import sha256_file
from pipelines.plan import resolve_split
from pipelines.shift import ShiftedBatches
from pipelines.spec import PreprocessSpec
from pipelines.torch_loader import build_transform

OPERATING_POINT_FILE = "calibration.json"
# 2: `calibration` holds the chosen map (method, slope, intercept, temperature); 1 had a temperature only.
OPERATING_POINT_VERSION = 2


class BadImage(ValueError):
    """An input that cannot be predicted; the message is the reason listed in skipped.csv."""


# --- inputs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def collect_inputs(inputs: list[str]) -> tuple[list[str], list[Skipped]]:
    """Files, folders (searched recursively) and globs -> (image paths in the given order, skipped inputs).

    A file named explicitly is always tried (its decoder decides); in folders and glob matches only
    .jpg/.jpeg/.png files are images, anything else is listed as skipped, hidden files are ignored.
    """
    paths: list[str] = []
    skipped: list[Skipped] = []
    suffixes = "/".join(sorted(IMAGE_SUFFIXES))

    def add_found(found: list[Path], origin: str) -> None:
        images = [p for p in found if p.is_file() and not p.name.startswith(".")]
        for path in images:
            if _is_image_name(path):
                paths.append(str(path))
            else:
                skipped.append(Skipped(str(path), f"not a {suffixes} file (found in {origin})"))
        if not any(_is_image_name(p) for p in images):
            skipped.append(Skipped(origin, f"no {suffixes} file in it"))

    for given in inputs:
        path = Path(given)
        if path.is_file():
            paths.append(given)
        elif path.is_dir():
            add_found(sorted(path.rglob("*")), given)
        elif any(ch in given for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(given, recursive=True))
            if matches:
                add_found(matches, given)
            else:
                skipped.append(Skipped(given, "the pattern matches no file"))
        else:
            skipped.append(Skipped(given, "no such file or folder"))
    return paths, skipped


def decode_gray(data: bytes) -> Image.Image:
    """Encoded image (PIL formats or DICOM) -> upright 8-bit grayscale PIL image, decoded exactly as make_shards
    decodes its inputs (EXIF orientation, mode conversion, DICOM windowing); `BadImage` with the reason."""
    try:
        gray, _, _, _ = open_gray(data)
    except Rejected as exc:
        raise BadImage(str(exc)) from None
    return gray


def load_gray(path: str | Path) -> Image.Image:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read the file: {exc.strerror or exc}") from None
    return decode_gray(data)


def shard_inputs(shards_dir: Path, split: str, keys, spec: PreprocessSpec) -> dict[str, torch.Tensor]:
    """`{key: C x H x W network input}` for a few samples of a split, read from its tars (no loader).

    The torch loader's transform on the shard's JPEG: what evaluation saw, up to DALI's resize rounding.
    """
    import webdataset as wds

    wanted = set(keys)
    transform = build_transform(spec, train=False)
    # Rank 0 of a multi-rank eval reads alone: both splitters pass the tar list through unchanged.
    dataset = wds.WebDataset([str(t) for t in resolve_split(shards_dir, split).tars], shardshuffle=False,
                             empty_check=False, nodesplitter=lambda src: src, workersplitter=lambda src: src)
    found = {}
    for sample in dataset:
        if sample["__key__"] in wanted:
            found[sample["__key__"]] = transform(decode_gray(sample["jpg"]))
            if len(found) == len(wanted):
                break
    return found


# --- the forward pass -----------------------------------------------------------------------------------


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """(N, 2) float32 logits on the CPU, fp32 on any device (so CPU and GPU predictions agree to ~1e-6)."""
    model.eval()
    x = images.to(device, torch.float32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return model(x).float().cpu()


def pneumonia_probability(logits: torch.Tensor) -> np.ndarray:
    """P(PNEUMONIA) exactly as `eval.predict.predict` computes it (float32 softmax, then float64)."""
    return torch.softmax(logits.float(), dim=1)[:, 1].numpy().astype(np.float64)


def calibrated_probability(logits: torch.Tensor, cal: dict) -> np.ndarray:
    """sigmoid(slope * (l1 - l0) + intercept) from the exact logits (no float32 saturation, unlike recovering
    them from p); `cal`: a calibration map such as calibration.json's `calibration`."""
    return C.apply_calibration_to_logits(logits.double().numpy(), cal)


# --- the operating point --------------------------------------------------------------------------------


def build_operating_point(*, threshold: float, threshold_info: dict, calibration: dict, model_sha256: str,
                          source: dict) -> dict:
    """The content of calibration.json: decision threshold and calibration map, both chosen on validation.

    `calibration`: `eval.calibration.fit_on_validation`'s result, kept whole (the map, both fits, how the
    method was chosen, the in-sample and out-of-fold validation summaries).
    """
    return {
        "version": OPERATING_POINT_VERSION,
        "threshold": float(threshold),
        "threshold_method": threshold_info.get("method", ""),
        **({"target_sensitivity": threshold_info["target_sensitivity"]} if "target_sensitivity" in threshold_info else {}),
        "calibration": calibration,
        "model_sha256": model_sha256,
        "source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_operating_point(run_dir: Path, point: dict) -> Path:
    path = run_dir / OPERATING_POINT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(point, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def read_operating_point(run_dir: Path) -> tuple[dict | None, str]:
    """(calibration.json, "") when it belongs to the run's current best model, else (None, why not)."""
    path = run_dir / OPERATING_POINT_FILE
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        point = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"{path} cannot be read ({exc})"
    if point.get("version") != OPERATING_POINT_VERSION:
        return None, (f"{path} has format version {point.get('version')!r}, not {OPERATING_POINT_VERSION} "
                      "(written by an older eval.run); it is refitted")
    if point.get("model_sha256") != sha256_file(run_dir / "best" / "model.safetensors"):
        return None, f"{path} belongs to another best model (sha256 differs); it is refitted"
    return point, ""


def fit_operating_point_on_val(run_dir: Path, cfg, spec: PreprocessSpec, model: nn.Module, accelerator) -> dict:
    """Predict the run's validation split, choose the threshold (eval.run's default rule) and fit the calibration
    there; write calibration.json.

    The single-process version of what `eval.run` does on validation, for a run that was never evaluated.
    `model` is moved (in place) to `accelerator.device`.
    """
    from eval.predict import predict
    from pipelines.loaders import build_loader
    from train.launch import input_dtype

    shards = Path(cfg.data.shards)
    loader = build_loader(shards, cfg.data.val_split, spec=spec, per_device_batch_size=cfg.data.per_device_eval_batch_size,
                          train=False, loader=cfg.data.loader, device=accelerator.device, seed=cfg.train.seed,
                          num_workers=cfg.data.num_workers, hw_decoder_load=cfg.data.hw_decoder_load,
                          dtype=input_dtype(accelerator))
    keys, probs, labels, _ = predict(model.to(accelerator.device), loader, accelerator, tta=False)
    # The same rule as eval.run's default: Youden's J on validation, clean and under the shift proxy, pooled.
    shifted_keys, shifted_probs, _, _ = predict(
        model, ShiftedBatches(loader, mean=spec.mean, std=spec.std, seed=cfg.data.shift_seed), accelerator, tta=False)
    assert shifted_keys == keys, "predict() sorts by key, so the two passes line up sample by sample"
    choice = T.choose(T.DEFAULT_RULE, labels, probs, shifted_probs, "youden")
    point = build_operating_point(
        threshold=choice["threshold"], threshold_info=choice, calibration=C.fit_on_validation(labels, probs),
        model_sha256=sha256_file(run_dir / "best" / "model.safetensors"),
        source={"split": choice["chosen_on"], "samples": int(labels.size), "shards": str(shards),
                "manifest_sha256": sha256_file(shards / "manifest.json"), "loader": loader.name,
                "by": "scripts/predict.py or scripts/export_model.py (no eval.run operating point)"})
    write_operating_point(run_dir, point)
    return point


class OperatingPointError(ValueError):
    """No calibration.json for this model and no validation split to fit one on; the message names the fix."""


def ensure_operating_point(run_dir: Path, cfg, spec: PreprocessSpec, model: nn.Module, accelerator) -> tuple[dict, str]:
    """(calibration.json content, where it came from): the saved one if it belongs to this model, else fitted now."""
    point, why = read_operating_point(run_dir)
    if point is not None:
        return point, f"{OPERATING_POINT_FILE} of the run, chosen on {point['source']['split']}"
    try:
        point = fit_operating_point_on_val(run_dir, cfg, spec, model, accelerator)
    except (FileNotFoundError, ValueError) as exc:  # ShardsError is both
        raise OperatingPointError(
            f"{why}, and the run's validation split cannot be used ({exc}); run `python -m eval.run --run {run_dir}` "
            "where its shards are") from exc
    return point, f"chosen now on {cfg.data.val_split} of {cfg.data.shards} ({why}), saved to {run_dir / OPERATING_POINT_FILE}"
