"""Export a trained run as a self-contained ONNX or TorchScript model with the normalisation baked in.

The exported graph takes float32 images in [0, 1] (8-bit gray / 255), N x C x H x W at the run's image size,
any N, and returns (N, 2) logits (NORMAL, PNEUMONIA). Resizing and cropping stay outside the graph (they
depend on the source image's size); the metadata says how (see `export_metadata`). The training shards'
mean/std, which differ per dataset, live inside it, so a consumer cannot get them wrong.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.manifest import LABELS
from pipelines.spec import PreprocessSpec

INPUT_NAME, OUTPUT_NAME = "images", "logits"
FORMATS = ("onnx", "torchscript")
# A fixed opset so exports from different torch versions read the same. 18 is the opset torch's ONNX function
# library (torchlib) is written in, so no version conversion pass runs (torch 2.14's default, 20, adds one);
# onnxruntime >= 1.14 runs it.
ONNX_OPSET = 18


class NormalizedClassifier(nn.Module):
    """images in [0, 1] -> (images - mean) / std -> the classifier's logits."""

    def __init__(self, model: nn.Module, spec: PreprocessSpec):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.full((1, spec.channels, 1, 1), float(spec.mean)))
        self.register_buffer("std", torch.full((1, spec.channels, 1, 1), float(spec.std)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def export_metadata(*, run_dir: Path, arch: str, spec: PreprocessSpec, point: dict, model_sha256: str) -> dict[str, str]:
    """String key/values for ONNX `metadata_props` and TorchScript's extra file: how to feed and read the model."""
    size = spec.image_size
    cal = point["calibration"]
    method, split = cal["method"], point["source"]["split"]
    how = "chosen by cross-validated NLL and fitted" if "nll" in cal.get("selection", {}) else "fitted"
    return {
        "input": f"{INPUT_NAME}: float32 N x {spec.channels} x {size} x {size}, pixel values in [0, 1] (8-bit gray / 255)",
        "preprocessing": (f"8-bit grayscale (EXIF orientation applied); resize the shorter side to {spec.eval_resize_size} "
                          f"px (antialiased bilinear); centre crop {size} x {size}; divide by 255. Normalisation "
                          "(x - mean) / std is inside the graph."),
        "output": f"{OUTPUT_NAME}: float32 N x 2 for labels in order; P(PNEUMONIA) = softmax(logits)[:, 1]",
        "decision": "PNEUMONIA when softmax(logits)[:, 1] >= threshold (the raw probability, not the calibrated one)",
        "calibration": (f"calibrated P(PNEUMONIA) = sigmoid(slope * (logits[:, 1] - logits[:, 0]) + intercept): "
                        f"{method} scaling, {how} on the {split} split. `temperature` is temperature scaling's own "
                        "fit, softmax(logits / temperature)[:, 1], kept for readers of older exports"
                        + ("" if method == "temperature" else " (its cross-validated NLL was the higher one)")),
        "labels": json.dumps(list(LABELS)),
        "image_size": str(size),
        "channels": str(spec.channels),
        "eval_resize_size": str(spec.eval_resize_size),
        "mean": repr(float(spec.mean)),
        "std": repr(float(spec.std)),
        "threshold": repr(float(point["threshold"])),
        "threshold_method": f"{point.get('threshold_method', '')} on the {split} split",
        "calibration_method": method,
        "slope": repr(float(cal["slope"])),
        "intercept": repr(float(cal["intercept"])),
        "temperature": repr(float(cal["temperature"])),
        "arch": arch,
        "run": run_dir.name,
        "model_sha256": model_sha256,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "intended_use": "research baseline; not a medical device (see the run's model_card.md)",
    }


def _example(spec: PreprocessSpec, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, spec.channels, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))


def export_onnx(module: NormalizedClassifier, spec: PreprocessSpec, path: Path, metadata: dict[str, str]) -> Path:
    """torch.export-based ONNX (the exporter torch recommends; needs onnxscript) with a dynamic batch axis."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(module.eval(), (_example(spec),), dynamo=True, opset_version=ONNX_OPSET,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes={INPUT_NAME: {0: batch}}, verbose=False)
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def export_torchscript(module: NormalizedClassifier, spec: PreprocessSpec, path: Path, metadata: dict[str, str]) -> Path:
    """A traced module (ResNets have no data-dependent control flow, so a trace is the whole model).

    torch.jit is deprecated upstream in favour of torch.export; kept because libtorch (C++) deployments still
    load TorchScript. The metadata travels as the archive's extra file `metadata.json`.
    """
    traced = torch.jit.trace(module.eval(), _example(spec))
    torch.jit.save(traced, str(path), _extra_files={"metadata.json": json.dumps(metadata, indent=2)})
    return path


def read_metadata(path: Path, fmt: str) -> dict[str, str]:
    if fmt == "onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    files = {"metadata.json": ""}
    torch.jit.load(str(path), _extra_files=files)
    return json.loads(files["metadata.json"])


def exported_logits(path: Path, fmt: str, images: torch.Tensor) -> np.ndarray:
    """Run the exported file (onnxruntime on the CPU, or TorchScript) on [0, 1] images."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy().astype(np.float32)})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(images).numpy()


@torch.no_grad()
def parity(path: Path, fmt: str, module: NormalizedClassifier, spec: PreprocessSpec, batch_sizes=(1, 3)) -> float:
    """Max |logit difference| between the file and the torch module over random batches of several sizes."""
    worst = 0.0
    for n in batch_sizes:
        images = _example(spec, n)
        expected = module.eval()(images).numpy()
        worst = max(worst, float(np.abs(exported_logits(path, fmt, images) - expected).max()))
    return worst
