"""Calibration of P(PNEUMONIA): ECE, Brier score, reliability diagram, temperature and Platt scaling.

Pure functions of `(labels, probabilities)` like `eval.metrics`. Calibration here is that of the positive
class: in a bin of samples given probability ~p, a fraction ~p should be PNEUMONIA (the question a reader
of a probability asks), not the top-label confidence of multi-class ECE.

Temperature scaling (Guo et al. 2017) divides the logit by one scalar T fitted on the validation split:
it changes how confident the probabilities are but not their order, so AUROC and the decision rule (the
threshold chosen on raw validation probabilities) are untouched. For two classes softmax(l / T)[1] =
sigmoid((l1 - l0) / T), so the binary logit z = l1 - l0 is all it needs.

Platt scaling (Platt 1999) fits a slope and an intercept, p = sigmoid(a z + b). Training with class-balanced
loss weights and label smoothing shifts z as well as compressing it; one scale factor cannot remove a shift
(measured on a real run: temperature scaling took validation ECE from 0.248 to 0.258). With a > 0 the map is
still monotone, so AUROC and the threshold on raw probabilities stay untouched. Both are written as one map,
`{method, slope, intercept, temperature}` (temperature scaling: slope = 1/T, intercept = 0), applied by
`apply_calibration`. Platt always fits validation at least as well as temperature scaling, having one more
parameter, so `fit_on_validation` chooses between them by cross-validated NLL on the validation predictions.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from eval.metrics import _as_arrays

N_BINS = 15
# The fitted T is searched in [1/50, 50]; outside that a model's probabilities are ~all 0.5 or all 0/1.
LOG_T_BOUNDS = (-math.log(50.0), math.log(50.0))
# Platt's slope in the same range (and > 0, so the map keeps the order); its intercept within +-50: bounds
# that keep the fit finite however separable validation is.
PLATT_SLOPE_BOUNDS = (1.0 / 50.0, 50.0)
PLATT_INTERCEPT_BOUNDS = (-50.0, 50.0)
METHODS = ("temperature", "platt")
# Choosing the method: stratified K-fold cross-validation of the NLL over the validation predictions.
CV_FOLDS = 5
CV_SEED = 0
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


# --- calibration maps -----------------------------------------------------------------------------------


def temperature_map(temperature: float) -> dict:
    """Temperature scaling as a calibration map: slope 1/T, intercept 0."""
    return {"method": "temperature", "slope": 1.0 / float(temperature), "intercept": 0.0,
            "temperature": float(temperature)}


def platt_map(slope: float, intercept: float, temperature: float | None = None) -> dict:
    """Platt scaling as a calibration map; `temperature`: the temperature fit kept beside it, if any."""
    return {"method": "platt", "slope": float(slope), "intercept": float(intercept),
            "temperature": None if temperature is None else float(temperature)}


def apply_calibration_to_logits(logits, cal: dict) -> np.ndarray:
    """sigmoid(slope * z + intercept) from (N, 2) class logits or the binary logit z (N,)."""
    return sigmoid(cal["slope"] * binary_logits(logits) + cal["intercept"])


def apply_calibration(probs, cal: dict) -> np.ndarray:
    """Calibrated P(PNEUMONIA) from raw probabilities (z recovered from them, capped at float32's resolution)."""
    return apply_calibration_to_logits(logits_from_probs(probs), cal)


def describe_calibration(cal: dict) -> str:
    """A short label: "Platt a = 0.512, b = -1.3" or "temperature T = 2.1"."""
    if cal["method"] == "platt":
        return f"Platt a = {cal['slope']:.3g}, b = {cal['intercept']:.3g}"
    return f"temperature T = {cal['temperature']:.3g}"


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


def _fit_inputs(name: str, logits, labels) -> tuple[np.ndarray, np.ndarray]:
    z = binary_logits(logits)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if z.shape != y.shape or y.size == 0:
        raise ValueError(f"{name} needs one logit per label, got {z.shape[0]} logits and {y.shape[0]} labels")
    if not np.isfinite(z).all():
        raise ValueError(f"{name}: logits contain NaN or infinity")
    return z, y


def fit_temperature(logits, labels) -> float:
    """The T > 0 minimising the NLL of sigmoid(z / T) on these (validation) logits.

    `logits`: (N, 2) class logits or the binary logit z (N,). One parameter and a convex-in-practice 1-D
    objective, so a bounded scalar search over log T (scipy's Brent) is exact to ~1e-5 and deterministic.
    """
    from scipy.optimize import minimize_scalar

    z, y = _fit_inputs("fit_temperature", logits, labels)
    result = minimize_scalar(lambda log_t: _nll_of_logits(y, z / math.exp(log_t)), bounds=LOG_T_BOUNDS,
                             method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def fit_platt(logits, labels) -> tuple[float, float]:
    """(slope, intercept) minimising the NLL of sigmoid(slope * z + intercept) on these (validation) logits.

    `logits`: (N, 2) class logits or z (N,). The NLL is convex in (slope, intercept); L-BFGS-B from the
    identity map with the exact gradient (d NLL / d s_i = (sigmoid(s_i) - y_i) / N) is deterministic and
    reaches a gradient of ~1e-10 in about ten iterations (20k samples). Both classes are needed: with one,
    the intercept would run to its bound.
    """
    from scipy.optimize import minimize

    z, y = _fit_inputs("fit_platt", logits, labels)
    if y.min() == y.max():
        raise ValueError(f"fit_platt needs both classes among the labels, got only class {int(y[0])}")

    def nll_and_gradient(params: np.ndarray) -> tuple[float, np.ndarray]:
        s = params[0] * z + params[1]
        residual = sigmoid(s) - y
        return _nll_of_logits(y, s), np.array([np.mean(residual * z), np.mean(residual)])

    result = minimize(nll_and_gradient, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                      bounds=[PLATT_SLOPE_BOUNDS, PLATT_INTERCEPT_BOUNDS],
                      options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 1000})
    return float(result.x[0]), float(result.x[1])


def fit_map(method: str, logits, labels) -> dict:
    """The calibration map of `method` ("temperature" or "platt") fitted on these logits."""
    if method == "temperature":
        return temperature_map(fit_temperature(logits, labels))
    if method == "platt":
        return platt_map(*fit_platt(logits, labels))
    raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(METHODS)}")


def summarize(labels, columns: dict[str, np.ndarray], n_bins: int = N_BINS) -> dict:
    """`{ece: {name: value}, brier: {...}, nll: {...}, samples}` for each named column of probabilities."""
    return {
        "ece": {name: expected_calibration_error(labels, p, n_bins) for name, p in columns.items()},
        "brier": {name: brier_score(labels, p) for name, p in columns.items()},
        "nll": {name: negative_log_likelihood(labels, p) for name, p in columns.items()},
        "samples": int(np.asarray(labels).size),
    }


def calibration_summary(labels, probs, cal: dict, n_bins: int = N_BINS) -> dict:
    """ECE, Brier score and NLL before (raw) and after the map `cal`, on these predictions.

    When `cal` is a Platt map that carries the temperature fit, a `temperature` column sits beside the
    two for comparison.
    """
    columns = {"before": np.asarray(probs, dtype=np.float64), "after": apply_calibration(probs, cal)}
    if cal["method"] != "temperature" and cal.get("temperature") is not None:
        columns["temperature"] = apply_temperature(probs, cal["temperature"])
    return summarize(labels, columns, n_bins)


def cross_validate(labels, logits, folds: int = CV_FOLDS, seed: int = CV_SEED) -> dict[str, np.ndarray]:
    """Out-of-fold calibrated probabilities per method: each sample mapped by a fit on the other folds.

    Stratified folds (both classes in every fold) shuffled with a fixed seed, so the choice is reproducible.
    """
    from sklearn.model_selection import StratifiedKFold

    z = binary_logits(logits)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    out = {method: np.empty(y.size, dtype=np.float64) for method in METHODS}
    for fit_index, held_index in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(z, y):
        for method in METHODS:
            cal = fit_map(method, z[fit_index], y[fit_index])
            out[method][held_index] = apply_calibration_to_logits(z[held_index], cal)
    return out


def _cv_problem(labels, folds: int) -> str:
    counts = np.bincount(np.asarray(labels).reshape(-1).astype(np.int64), minlength=2)
    if counts.min() < folds:
        return (f"{folds}-fold cross-validation needs {folds} samples of each class, validation has "
                f"{counts[0]} NORMAL and {counts[1]} PNEUMONIA; temperature scaling (one parameter) is used")
    return ""


def fit_on_validation(val_labels, val_probs) -> dict:
    """The calibration map chosen and fitted on the validation predictions, with how it was chosen.

    Temperature and Platt scaling are each cross-validated (stratified `CV_FOLDS`-fold, seed `CV_SEED`:
    fitted on K-1 folds, NLL scored on the held-out one); Platt is chosen only when its out-of-fold NLL is
    lower. The chosen method is then refitted on all of validation. Returns the map (`method, slope,
    intercept, temperature`, where `temperature` is always temperature scaling's own fit) plus `fits` (both
    maps), `selection` (out-of-fold NLL per method, or why cross-validation was skipped), `val` (ECE, Brier,
    NLL before and after, in-sample: the map was fitted on these very predictions) and `val_out_of_fold` (the
    same from the out-of-fold probabilities: the honest validation figure).
    """
    labels = np.asarray(val_labels).reshape(-1).astype(np.int64)
    probs = np.asarray(val_probs, dtype=np.float64)
    z = logits_from_probs(probs)
    temperature = fit_temperature(z, labels)
    fits = {"temperature": temperature_map(temperature)}
    selection = {"criterion": f"mean out-of-fold NLL, stratified {CV_FOLDS}-fold cross-validation on val "
                              f"(seed {CV_SEED}); Platt only when lower", "folds": CV_FOLDS, "seed": CV_SEED}
    problem = _cv_problem(labels, CV_FOLDS)
    out_of_fold = None
    if problem:
        selection["skipped"] = problem
        chosen = "temperature"
    else:
        fits["platt"] = platt_map(*fit_platt(z, labels))
        out_of_fold = cross_validate(labels, z)
        selection["nll"] = {m: negative_log_likelihood(labels, p) for m, p in out_of_fold.items()}
        chosen = "platt" if selection["nll"]["platt"] < selection["nll"]["temperature"] else "temperature"
    selection["chosen"] = chosen
    cal = {**fits[chosen], "temperature": temperature}
    result = {**cal, "fits": fits, "selection": selection, "fitted_on": "val", "bins": N_BINS,
              "val": {**calibration_summary(labels, probs, cal), "in_sample": True}}
    if out_of_fold is not None:
        columns = {"before": probs, "after": out_of_fold[chosen]}
        if chosen != "temperature":
            columns["temperature"] = out_of_fold["temperature"]
        result["val_out_of_fold"] = {**summarize(labels, columns), "in_sample": False}
    return result


def plot_reliability_diagram(labels, probs, cal: dict, path, title: str = "") -> None:
    """Fraction PNEUMONIA vs mean predicted probability per bin, raw and calibrated by `cal`, with counts."""
    after = apply_calibration(probs, cal)
    fig = Figure(figsize=(5.2, 6.0), layout="constrained")
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for values, name, style in ((probs, "raw", "o-"), (after, describe_calibration(cal), "s-")):
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
