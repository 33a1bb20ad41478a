"""eval.report: the report folder from predictions, round trip through predictions.csv."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from eval import calibration as C
from eval import metrics as M
from eval import report as R


def _predictions(n=90, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1).astype(np.float32).astype(np.float64)
    keys = [f"test-{i:08d}" for i in range(n)]
    metadata = {k: {"source": f"test/{'PNEUMONIA' if y else 'NORMAL'}/img{i}.jpeg",
                    "subtype": ("virus" if i % 3 == 0 else "bacteria") if y else "none"}
                for i, (k, y) in enumerate(zip(keys, labels, strict=True))}
    return keys, labels, probs, metadata


def test_report_folder_round_trips_through_predictions_csv(tmp_path):
    keys, labels, probs, metadata = _predictions()
    val_keys, val_labels, val_probs, _ = _predictions(seed=1)
    calibration = C.fit_on_validation(val_labels, val_probs)
    report = R.build_report(keys, labels, probs, split="test", threshold=0.45,
                            threshold_info={"method": "fixed"}, metadata=metadata, n_resamples=200, seed=3,
                            tta_probs=probs ** 1.1, provenance={"run": "unit"}, calibration=calibration)
    paths = R.write_report(tmp_path, report, keys, labels, probs, metadata, tta_probs=probs ** 1.1)
    assert {p.name for p in tmp_path.iterdir()} == set(paths)
    saved = json.loads(paths["report.json"].read_text())

    back = R.read_predictions_csv(paths["predictions.csv"])
    assert back["keys"] == keys and back["labels"].tolist() == labels.tolist()
    assert np.array_equal(back["probs"], probs)  # exact, not approximate
    # Calibrated probabilities: the map chosen on validation applied to these; the test split's ECE/Brier from them.
    for key in ("method", "slope", "intercept", "temperature", "selection"):
        assert saved["calibration"][key] == calibration[key], key
    assert saved["calibration"]["temperature"] != 1.0 and "nll" in saved["calibration"]["selection"]
    np.testing.assert_array_equal(back["calibrated_probs"], C.apply_calibration(probs, calibration))
    assert saved["calibration"]["test"]["ece"]["before"] == C.expected_calibration_error(labels, probs)
    assert saved["calibration"]["test"]["ece"]["after"] == C.expected_calibration_error(labels, back["calibrated_probs"])
    assert saved["calibration"]["val"]["brier"]["before"] == C.brier_score(val_labels, val_probs)
    assert saved["calibration"]["val"]["in_sample"] and not saved["calibration"]["val_out_of_fold"]["in_sample"]
    again = R.build_report(back["keys"], back["labels"], back["probs"], split="test", threshold=saved["threshold"]["value"],
                           threshold_info={"method": "fixed"}, metadata=back["metadata"],
                           n_resamples=saved["bootstrap"]["resamples"], seed=saved["bootstrap"]["seed"],
                           tta_probs=back["tta_probs"])
    for section in ("metrics", "confusion", "subtypes", "tta"):
        assert json.loads(json.dumps(again[section])) == saved[section], section

    # Independent check of the headline numbers against scikit-learn.
    pred = (probs >= 0.45).astype(int)
    assert saved["metrics"]["auroc"]["value"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert saved["metrics"]["f1"]["value"] == pytest.approx(skm.f1_score(labels, pred))
    assert [[saved["confusion"]["tn"], saved["confusion"]["fp"]], [saved["confusion"]["fn"], saved["confusion"]["tp"]]] \
        == skm.confusion_matrix(labels, pred).tolist()
    virus = (labels == 1) & (np.arange(len(keys)) % 3 == 0)
    assert saved["subtypes"]["virus"]["positives"] == int(virus.sum())
    assert saved["subtypes"]["virus"]["recall"] == pytest.approx(pred[virus].mean())
    assert "none" not in saved["subtypes"]  # NORMAL images are not a pneumonia subtype

    for name in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png", "reliability_diagram.png"):
        with Image.open(paths[name]) as image:
            image.verify()
            assert image.format == "PNG"
    md = paths["report.md"].read_text()
    assert C.describe_calibration(calibration) in md and "out-of-fold" in md
    assert f"{calibration['selection']['nll']['platt']:.4f}" in md
    assert f"{saved['calibration']['test']['ece']['after']:.4f}" in md
    assert f"{saved['metrics']['auroc']['value']:.3f} [{saved['metrics']['auroc']['ci95'][0]:.3f}" in md


def test_single_class_split_writes_null_with_reason(tmp_path):
    keys = [f"test-{i:08d}" for i in range(6)]
    metadata = {k: {"source": k, "subtype": "bacteria"} for k in keys}
    labels, probs = np.ones(6, int), np.linspace(0.1, 0.9, 6)
    with pytest.warns(RuntimeWarning, match="only one class"):
        report = R.build_report(keys, labels, probs, split="test", threshold=0.5, threshold_info={"method": "fixed"},
                                metadata=metadata, n_resamples=50)
        paths = R.write_report(tmp_path, report, keys, labels, probs, metadata)
    saved = json.loads(paths["report.json"].read_text())  # strict JSON: no NaN tokens
    assert saved["metrics"]["auroc"] == {"value": None, "ci95": [None, None]}
    assert "only one class" in saved["undefined"]["auroc"]
    assert saved["metrics"]["recall"]["value"] == pytest.approx(0.5)
    assert "undefined" in paths["report.md"].read_text()
    with Image.open(paths["roc_curve.png"]) as image:
        image.verify()


def test_predictions_without_metadata_are_an_error():
    keys, labels, probs, metadata = _predictions(10)
    del metadata[keys[4]]
    with pytest.raises(ValueError, match="no shard metadata"):
        R.build_report(keys, labels, probs, split="test", threshold=0.5, threshold_info={"method": "fixed"},
                       metadata=metadata, n_resamples=10)


def test_subtype_recall_uses_the_threshold():
    keys = ["a", "b", "c", "d"]
    meta = {"a": {"subtype": "bacteria"}, "b": {"subtype": "bacteria"}, "c": {"subtype": "virus"}, "d": {"subtype": "none"}}
    out = R.subtype_recall(keys, [1, 1, 1, 0], [0.9, 0.2, 0.6, 0.99], 0.5, meta)
    assert out["bacteria"]["recall"] == 0.5 and out["virus"]["recall"] == 1.0 and set(out) == {"bacteria", "virus"}
    assert out["virus"]["ci95"] == M.wilson_interval(1, 1)
