"""eval.calibration: ECE, Brier, reliability bins and temperature scaling on known cases."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from eval import calibration as C


def _calibrated_sample(n=4000, seed=0):
    """Labels drawn from sigmoid(z): z are true logits, so sigmoid(z) is perfectly calibrated."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < C.sigmoid(z)).astype(np.int64)
    return z, labels


def test_ece_and_brier_by_hand():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.1, 0.1, 0.9, 0.6])
    # Bins of width 1/15: {0.1, 0.1} hold 0 positives (gap 0.1), {0.9}: 1 positive (gap 0.1), {0.6}: gap 0.4.
    assert C.expected_calibration_error(labels, probs) == pytest.approx((2 * 0.1 + 0.1 + 0.4) / 4)
    assert C.brier_score(labels, probs) == pytest.approx((0.01 + 0.01 + 0.01 + 0.16) / 4)
    bins = C.reliability_bins(labels, probs)
    assert sum(bins["count"]) == 4 and len(bins["count"]) == 15
    assert C.reliability_bins([1], [1.0])["count"][-1] == 1  # p = 1 falls in the last bin, not past it
    assert C.expected_calibration_error(labels, labels.astype(float)) == 0.0


def test_temperature_scaling_undoes_overconfidence_on_validation():
    z, labels = _calibrated_sample()
    overconfident = 10.0 * z  # a model whose logits are 10x too large
    temperature = C.fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(10.0, rel=0.1)
    raw, scaled = C.sigmoid(overconfident), C.sigmoid(overconfident / temperature)
    assert C.negative_log_likelihood(labels, scaled) < 0.6 * C.negative_log_likelihood(labels, raw)
    assert C.expected_calibration_error(labels, scaled) < 0.03 < C.expected_calibration_error(labels, raw)
    # (N, 2) class logits give the same fit as the binary logit l1 - l0.
    two_class = np.stack([np.zeros_like(z), overconfident], axis=1)
    assert C.fit_temperature(two_class, labels) == pytest.approx(temperature, rel=1e-6)
    # An already calibrated model keeps T ~ 1.
    assert C.fit_temperature(z, labels) == pytest.approx(1.0, abs=0.1)


def test_fit_on_validation_uses_probabilities_and_keeps_the_order():
    z, labels = _calibrated_sample(seed=1)
    probs = C.sigmoid(3.0 * z).astype(np.float32).astype(np.float64)  # what eval.predict hands over
    fit = C.fit_on_validation(labels, probs)
    assert fit["temperature"] == pytest.approx(3.0, rel=0.1)
    assert fit["val"]["nll"]["after"] < fit["val"]["nll"]["before"]
    assert fit["val"]["ece"]["after"] < fit["val"]["ece"]["before"]
    after = C.apply_temperature(probs, fit["temperature"])
    # A monotone map: ranking (AUROC) and the threshold rule on raw probabilities are untouched.
    assert (np.diff(after[np.argsort(probs)]) >= 0).all()
    np.testing.assert_allclose(C.apply_temperature(probs, 1.0), probs, atol=1e-6)


def test_logits_from_float32_probabilities_are_capped_not_infinite():
    z = C.logits_from_probs(np.array([0.0, 1.0, 0.5, 0.25]))
    assert np.isfinite(z).all() and z[2] == 0.0 and z[3] == pytest.approx(np.log(1 / 3))
    assert 16 < z[1] < 17  # float32's last value below 1 is 1 - 2**-24


def test_reliability_diagram_is_a_png(tmp_path):
    z, labels = _calibrated_sample(n=300)
    C.plot_reliability_diagram(labels, C.sigmoid(4 * z), 4.0, tmp_path / "r.png")
    with Image.open(tmp_path / "r.png") as image:
        image.verify()
        assert image.format == "PNG"
