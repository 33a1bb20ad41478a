"""scripts/export_model.py: ONNX (onnxruntime, CPU) and TorchScript give the PyTorch logits on shard images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _runs import REPO, train_env

from eval import export as X
from eval.inference import shard_inputs
from eval.run import load_trained, preprocess_spec

pytestmark = pytest.mark.slow


def export(run_dir: Path, fmt: str, out: Path, tmp: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "scripts/export_model.py", "--run", str(run_dir), "--format", fmt,
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600, env=train_env(tmp))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def reference(smoke_run, tiny_shards):
    """The test split as [0, 1] images, and the PyTorch model's logits on them (normalised, fp32, CPU)."""
    cfg, meta, model = load_trained(smoke_run)
    spec = preprocess_spec(meta, cfg, {})
    inputs = shard_inputs(tiny_shards, "test", _test_keys(tiny_shards), spec)
    normalised = torch.stack(list(inputs.values()))
    with torch.no_grad():
        logits = model.eval()(normalised.contiguous(memory_format=torch.channels_last)).numpy()
    return normalised * spec.std + spec.mean, logits, spec


def _test_keys(shards: Path) -> list[str]:
    from eval.report import load_sample_metadata

    return sorted(load_sample_metadata(shards, "test"))


@pytest.mark.parametrize("fmt", X.FORMATS)
def test_exported_model_gives_the_pytorch_logits_at_any_batch_size(smoke_run, reference, fmt, tmp_path):
    images, expected, spec = reference
    out = tmp_path / f"model.{fmt}"
    result = export(smoke_run, fmt, out, tmp_path)
    assert "max |logit difference|" in result.stdout
    # Normalisation is inside: the file takes [0, 1] pixels. Batch sizes 1 and all (dynamic batch axis).
    diff = max(np.abs(X.exported_logits(out, fmt, images[:1]) - expected[:1]).max(),
               np.abs(X.exported_logits(out, fmt, images) - expected).max())
    assert diff <= 1e-4, f"{fmt} logits differ from PyTorch by {diff:.2e}"

    metadata = X.read_metadata(out, fmt)
    point = json.loads((smoke_run / "calibration.json").read_text())
    assert float(metadata["mean"]) == spec.mean and float(metadata["std"]) == spec.std
    assert int(metadata["image_size"]) == spec.image_size and int(metadata["channels"]) == spec.channels
    assert json.loads(metadata["labels"]) == ["NORMAL", "PNEUMONIA"]
    assert float(metadata["threshold"]) == point["threshold"]
    cal = point["calibration"]
    assert metadata["calibration_method"] == cal["method"] and float(metadata["temperature"]) == cal["temperature"]
    assert (float(metadata["slope"]), float(metadata["intercept"])) == (cal["slope"], cal["intercept"])
    if fmt == "onnx":
        import onnx

        (model_input,) = onnx.load(str(out)).graph.input
        dims = model_input.type.tensor_type.shape.dim
        assert model_input.name == X.INPUT_NAME and dims[0].dim_param and not dims[0].dim_value  # symbolic batch
        assert [d.dim_value for d in dims[1:]] == [spec.channels, spec.image_size, spec.image_size]

