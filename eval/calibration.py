"""Calibration of P(PNEUMONIA): ECE, Brier score, reliability diagram and temperature scaling.

Pure functions of `(labels, probabilities)` like `eval.metrics`. Calibration here is that of the positive
class: in a bin of samples given probability ~p, a fraction ~p should be PNEUMONIA (the question a reader
of a probability asks), not the top-label confidence of multi-class ECE.

Temperature scaling (Guo et al. 2017) divides the logit by one scalar T fitted on the validation split:
it changes how confident the probabilities are but not their order, so AUROC and the decision rule (the
threshold chosen on raw validation probabilities) are untouched. For two classes softmax(l / T)[1] =
sigmoid((l1 - l0) / T), so the binary logit z = l1 - l0 is all it needs.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from eval.metrics import _as_arrays

N_BINS = 15
# The fitted T is searched in [1/50, 50]; outside that a model's probabilities are ~all 0.5 or all 0/1.
LOG_T_BOUNDS = (-math.log(50.0), math.log(50.0))
# P(PNEUMONIA) reaches the evaluation as a float32 softmax output, whose largest value below 1 is
# 1 - 2**-24: logits recovered from probabilities are exact up to |z| ~ 16.6 and capped there (a sample
# the model calls with p >= 1 - 6e-8 counts as z = 16.6). The smallest positive float32 (denormal) bounds
# the other side at z ~ -103; no real logit of a trained classifier reaches either bound often.
_P_HIGH = 1.0 - 2.0**-24
_P_LOW = float(np.finfo(np.float32).smallest_subnormal)


def logits_from_probs(probs) -> np.ndarray:
    """The binary logit z = log(p / (1 - p)) of P(PNEUMONIA), capped at float32's resolution (see above)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _P_LOW, _P_HIGH)
    return np.log(p) - np.log1p(-p)


def binary_logits(logits) -> np.ndarray:
    """z = l1 - l0 from (N, 2) class logits; a 1-D array is taken to be z already."""
    z = np.asarray(logits, dtype=np.float64)
    return z[:, 1] - z[:, 0] if z.ndim == 2 else z.reshape(-1)


def sigmoid(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    # exp of a negative number only: no overflow warning for large |z|.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """Calibrated P(PNEUMONIA) = sigmoid(z / T), z recovered from the (raw) probabilities."""
    return sigmoid(logits_from_probs(probs) / temperature)


def negative_log_likelihood(labels, probs) -> float:
    """Mean binary cross-entropy in nats; probabilities clipped away from 0 and 1 so a wrong 0/1 is finite."""
    y, p = _as_arrays(labels, probs)
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _nll_of_logits(y: np.ndarray, z: np.ndarray) -> float:
    # log(1 + exp(-s)) with s = z for positives and -z for negatives: the exact, overflow-free BCE.
    s = np.where(y == 1, z, -z)
    return float(np.mean(np.logaddexp(0.0, -s)))


def brier_score(labels, probs) -> float:
    """Mean squared error of P(PNEUMONIA) against the 0/1 label (0 is perfect, 0.25 is a constant 0.5)."""
    y, p = _as_arrays(labels, probs)
    return float(np.mean((p - y) ** 2))


def reliability_bins(labels, probs, n_bins: int = N_BINS) -> dict[str, list]:
    """Equal-width bins of [0, 1]: `{lower, upper, count, mean_probability, fraction_positive}` per bin.

    A probability of exactly 1 falls in the last bin; empty bins have NaN mean and fraction.
    """
    y, p = _as_arrays(labels, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(index, weights=p, minlength=n_bins) / count
        frac = np.bincount(index, weights=y, minlength=n_bins) / count
    return {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": count.tolist(),
            "mean_probability": mean_p.tolist(), "fraction_positive": frac.tolist()}


def expected_calibration_error(labels, probs, n_bins: int = N_BINS) -> float:
    """ECE: sum over equal-width bins of (bin share of samples) x |mean probability - fraction positive|."""
    bins = reliability_bins(labels, probs, n_bins)
    count = np.asarray(bins["count"], dtype=np.float64)
    gap = np.abs(np.asarray(bins["mean_probability"]) - np.asarray(bins["fraction_positive"]))
    used = count > 0
    return float(np.sum(count[used] * gap[used]) / count.sum())


def fit_temperature(logits, labels) -> float:
    """The T > 0 minimising the NLL of sigmoid(z / T) on these (validation) logits.

    `logits`: (N, 2) class logits or the binary logit z (N,). One parameter and a convex-in-practice 1-D
    objective, so a bounded scalar search over log T (scipy's Brent) is exact to ~1e-5 and deterministic.
    """
    from scipy.optimize import minimize_scalar

    z = binary_logits(logits)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if z.shape != y.shape or y.size == 0:
        raise ValueError(f"fit_temperature needs one logit per label, got {z.shape[0]} logits and {y.shape[0]} labels")
    if not np.isfinite(z).all():
        raise ValueError("fit_temperature: logits contain NaN or infinity")
    result = minimize_scalar(lambda log_t: _nll_of_logits(y, z / math.exp(log_t)), bounds=LOG_T_BOUNDS,
                             method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def calibration_summary(labels, probs, temperature: float, n_bins: int = N_BINS) -> dict:
    """ECE, Brier score and NLL before (raw) and after temperature scaling, on these predictions."""
    after = apply_temperature(probs, temperature)
    return {
        "ece": {"before": expected_calibration_error(labels, probs, n_bins),
                "after": expected_calibration_error(labels, after, n_bins)},
        "brier": {"before": brier_score(labels, probs), "after": brier_score(labels, after)},
        "nll": {"before": negative_log_likelihood(labels, probs), "after": negative_log_likelihood(labels, after)},
        "samples": int(np.asarray(labels).size),
    }


def fit_on_validation(val_labels, val_probs) -> dict:
    """`{temperature, fitted_on: "val", val: calibration_summary}`; T from the validation predictions only."""
    temperature = fit_temperature(logits_from_probs(val_probs), val_labels)
    return {"temperature": temperature, "method": "temperature scaling (NLL on the validation split)",
            "bins": N_BINS, "val": calibration_summary(val_labels, val_probs, temperature)}


def plot_reliability_diagram(labels, probs, temperature: float, path, title: str = "") -> None:
    """Fraction PNEUMONIA vs mean predicted probability per bin, raw and temperature-scaled, with counts."""
    after = apply_temperature(probs, temperature)
    fig = Figure(figsize=(5.2, 6.0), layout="constrained")
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for values, name, style in ((probs, "raw", "o-"), (after, f"temperature T = {temperature:.3g}", "s-")):
        bins = reliability_bins(labels, values)
        centres = np.asarray(bins["mean_probability"])
        ece = expected_calibration_error(labels, values)
        ax.plot(centres, bins["fraction_positive"], style, ms=4, label=f"{name}: ECE {ece:.3f}")
        hist.hist(values, bins=N_BINS, range=(0, 1), histtype="step", lw=1.5, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Fraction PNEUMONIA in bin")
    ax.set_title(title or f"Reliability diagram ({N_BINS} equal-width bins)")
    ax.legend(loc="upper left", fontsize=8)
    hist.set_xlabel("Predicted P(PNEUMONIA)")
    hist.set_ylabel("samples")
    fig.savefig(path, dpi=120)
