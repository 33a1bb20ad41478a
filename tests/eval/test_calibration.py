"""eval.calibration: ECE, Brier, reliability bins, temperature and Platt scaling and the choice between them."""

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
    assert fit["fits"]["temperature"]["slope"] == pytest.approx(1 / fit["temperature"])
    assert fit["val"]["nll"]["after"] < fit["val"]["nll"]["before"]
    assert fit["val"]["ece"]["after"] < fit["val"]["ece"]["before"]
    after = C.apply_calibration(probs, fit)
    # A monotone map: ranking (AUROC) and the threshold rule on raw probabilities are untouched.
    assert (np.diff(after[np.argsort(probs)]) >= 0).all()
    np.testing.assert_allclose(C.apply_temperature(probs, 1.0), probs, atol=1e-6)
    assert C.fit_on_validation(labels, probs) == fit  # deterministic, folds included


def _biased_sample(n, offset, scale=1.0, seed=0):
    """Labels from sigmoid(z) and the float32 probabilities of a model whose logit is scale * z + offset."""
    z, labels = _calibrated_sample(n, seed)
    return labels, C.sigmoid(scale * z + offset).astype(np.float32).astype(np.float64)


def test_platt_recovers_a_known_slope_and_intercept():
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 2.0, 20_000)
    labels = (rng.random(z.size) < C.sigmoid(0.6 * z - 0.8)).astype(np.int64)
    slope, intercept = C.fit_platt(z, labels)
    assert slope == pytest.approx(0.6, abs=0.03) and intercept == pytest.approx(-0.8, abs=0.05)
    # The NLL minimum: no nearby (a, b) fits better. (N, 2) logits give the same fit as l1 - l0.
    best = C._nll_of_logits(labels, slope * z + intercept)
    for da, db in ((1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)):
        assert C._nll_of_logits(labels, (slope + da) * z + intercept + db) > best
    two_class = np.stack([np.full_like(z, 2.0), z + 2.0], axis=1)
    assert C.fit_platt(two_class, labels) == pytest.approx((slope, intercept), abs=1e-6)


def test_platt_removes_a_bias_that_temperature_cannot():
    labels, probs = _biased_sample(6000, offset=1.5)  # right spread, shifted by +1.5 (class weights do that)
    fit = C.fit_on_validation(labels, probs)
    assert fit["method"] == "platt" and fit["selection"]["chosen"] == "platt"
    assert fit["slope"] == pytest.approx(1.0, abs=0.1) and fit["intercept"] == pytest.approx(-1.5, abs=0.1)
    nll = fit["selection"]["nll"]
    assert nll["platt"] < nll["temperature"] - 0.02
    for summary in (fit["val"], fit["val_out_of_fold"]):
        ece = summary["ece"]
        assert ece["after"] < 0.03 and ece["temperature"] > 0.1 and ece["before"] > 0.15
    assert fit["val"]["in_sample"] and not fit["val_out_of_fold"]["in_sample"]
    # The out-of-fold NLL is the one the choice used, and no better than in-sample.
    assert fit["val_out_of_fold"]["nll"]["after"] == nll["platt"] >= fit["val"]["nll"]["after"]
    np.testing.assert_allclose(C.apply_calibration(probs, fit),
                               C.sigmoid(fit["slope"] * C.logits_from_probs(probs) + fit["intercept"]))


def test_cross_validation_can_prefer_temperature_when_the_truth_is_a_pure_scale():
    chosen = []
    for seed in range(8):
        labels, probs = _biased_sample(2000, offset=0.0, scale=3.0, seed=seed)
        fit = C.fit_on_validation(labels, probs)
        nll = fit["selection"]["nll"]
        assert fit["method"] == min(nll, key=nll.get)  # the lower cross-validated NLL wins
        assert abs(nll["platt"] - nll["temperature"]) < 2e-3  # the extra parameter buys nothing here
        chosen.append(fit["method"])
        z = C.logits_from_probs(probs)
        platt, temperature = fit["fits"]["platt"], fit["fits"]["temperature"]
        assert C._nll_of_logits(labels, platt["slope"] * z + platt["intercept"]) \
            <= C._nll_of_logits(labels, z / temperature["temperature"]) + 1e-12
        if fit["method"] == "temperature":
            assert (fit["slope"], fit["intercept"]) == (1 / fit["temperature"], 0.0)
            assert "temperature" not in fit["val"]["ece"]  # no separate comparison column: it is the chosen one
    # In-sample, Platt (a superset of temperature scaling) always fits at least as well, so a choice made on
    # the fitting data would never pick temperature; held out, the unneeded intercept is noise, a coin flip.
    assert "temperature" in chosen, chosen


def test_too_few_samples_per_class_for_cross_validation_falls_back_to_temperature():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    probs = np.linspace(0.2, 0.9, 10)
    fit = C.fit_on_validation(labels, probs)
    assert fit["method"] == "temperature" and "3 NORMAL" in fit["selection"]["skipped"]
    assert "val_out_of_fold" not in fit and "platt" not in fit["fits"]


def test_apply_calibration_with_the_temperature_map_is_temperature_scaling():
    z, _ = _calibrated_sample(n=500)
    probs = C.sigmoid(2.5 * z)
    np.testing.assert_allclose(C.apply_calibration(probs, C.temperature_map(2.5)), C.apply_temperature(probs, 2.5),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(C.apply_calibration_to_logits(2.5 * z, C.temperature_map(2.5)), C.sigmoid(z), rtol=1e-12)
    platt = C.platt_map(0.5, -1.0)
    logits = np.stack([np.zeros_like(z), z], axis=1)
    np.testing.assert_allclose(C.apply_calibration_to_logits(logits, platt), 1 / (1 + np.exp(-(0.5 * z - 1.0))))
    assert C.describe_calibration(platt) == "Platt a = 0.5, b = -1"
    assert C.describe_calibration(C.temperature_map(2.5)) == "temperature T = 2.5"


@pytest.mark.parametrize(("logits", "labels", "match"), [
    (np.array([0.1, np.nan, 2.0]), np.array([0, 1, 1]), "NaN or infinity"),
    (np.array([0.1, 1.0, 2.0]), np.array([1, 1, 1]), "both classes"),
    (np.array([0.1, 1.0]), np.array([0, 1, 1]), "one logit per label"),
])
def test_fit_platt_refuses_inputs_it_cannot_fit(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        C.fit_platt(logits, labels)


def test_logits_from_float32_probabilities_are_capped_not_infinite():
    z = C.logits_from_probs(np.array([0.0, 1.0, 0.5, 0.25]))
    assert np.isfinite(z).all() and z[2] == 0.0 and z[3] == pytest.approx(np.log(1 / 3))
    assert 16 < z[1] < 17  # float32's last value below 1 is 1 - 2**-24


def test_reliability_diagram_is_a_png(tmp_path):
    z, labels = _calibrated_sample(n=300)
    C.plot_reliability_diagram(labels, C.sigmoid(4 * z), C.platt_map(0.25, 0.1), tmp_path / "r.png")
    with Image.open(tmp_path / "r.png") as image:
        image.verify()
        assert image.format == "PNG"
