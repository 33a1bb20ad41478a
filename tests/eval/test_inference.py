"""eval.inference's operating point (calibration.json) and what predict and export read from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval import calibration as C
from eval import export as X
from eval import inference as I
from pipelines.manifest import sha256_file
from pipelines.spec import PreprocessSpec


def _platt_fit():
    """A validation fit that chooses Platt: right spread, logits shifted by +1.5."""
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, 3000)
    labels = (rng.random(z.size) < C.sigmoid(z)).astype(np.int64)
    fit = C.fit_on_validation(labels, C.sigmoid(z + 1.5).astype(np.float32).astype(np.float64))
    assert fit["method"] == "platt"
    return fit


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "model.safetensors").write_bytes(b"weights")
    return tmp_path


def _point(run_dir, calibration):
    return I.build_operating_point(threshold=0.37, threshold_info={"method": "youden", "youden_j": 0.5},
                                   calibration=calibration,
                                   model_sha256=sha256_file(run_dir / "best" / "model.safetensors"),
                                   source={"split": "val", "samples": 3000})


def test_calibration_json_round_trips_the_chosen_map(run_dir):
    fit = _platt_fit()
    I.write_operating_point(run_dir, _point(run_dir, fit))
    point, why = I.read_operating_point(run_dir)
    assert why == "" and point["version"] == I.OPERATING_POINT_VERSION and point["threshold"] == 0.37
    cal = point["calibration"]
    assert (cal["method"], cal["slope"], cal["intercept"], cal["temperature"]) == \
        (fit["method"], fit["slope"], fit["intercept"], fit["temperature"])
    assert cal["selection"]["nll"] == fit["selection"]["nll"] and cal["val_out_of_fold"]["in_sample"] is False
    # predict's calibrated_probability: the read map on the exact logits.
    logits = torch.tensor([[0.0, -3.0], [1.0, 1.5], [0.2, 4.0]])
    z = (logits[:, 1].double() - logits[:, 0].double()).numpy()
    np.testing.assert_allclose(I.calibrated_probability(logits, cal), C.sigmoid(fit["slope"] * z + fit["intercept"]),
                               rtol=1e-12)


def test_an_older_or_foreign_calibration_json_is_not_used(run_dir):
    sha = sha256_file(run_dir / "best" / "model.safetensors")
    (run_dir / I.OPERATING_POINT_FILE).write_text(json.dumps(
        {"version": 1, "threshold": 0.5, "temperature": 2.0, "model_sha256": sha, "source": {"split": "val"}}))
    point, why = I.read_operating_point(run_dir)
    assert point is None and "format version 1" in why and "refitted" in why
    I.write_operating_point(run_dir, {**_point(run_dir, _platt_fit()), "model_sha256": "0" * 64})
    point, why = I.read_operating_point(run_dir)
    assert point is None and "another best model" in why


@pytest.mark.parametrize("method", ["platt", "temperature"])
def test_export_metadata_carries_the_map_and_its_formula(run_dir, method):
    fit = _platt_fit()
    cal = fit if method == "platt" else {**fit, **fit["fits"]["temperature"]}
    metadata = X.export_metadata(run_dir=run_dir, arch="resnet50", spec=PreprocessSpec(), point=_point(run_dir, cal),
                                 model_sha256="ab" * 32)
    assert metadata["calibration_method"] == method
    slope, intercept = float(metadata["slope"]), float(metadata["intercept"])
    assert (slope, intercept) == (cal["slope"], cal["intercept"])
    assert float(metadata["temperature"]) == fit["temperature"]  # temperature scaling's fit, for older readers
    assert "sigmoid(slope * (logits[:, 1] - logits[:, 0]) + intercept)" in metadata["calibration"]
    assert f"{method} scaling, chosen by cross-validated NLL" in metadata["calibration"]
    assert "raw probability" in metadata["decision"]
    if method == "temperature":
        assert slope == pytest.approx(1 / float(metadata["temperature"])) and intercept == 0.0
