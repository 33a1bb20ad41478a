"""Binary classification metrics as pure functions of (labels, probabilities).

Everything here takes NumPy-compatible arrays on the host and returns plain dicts of Python floats/ints, so
training validation (every epoch), `eval.run` and the tests share one implementation. Class 1 (PNEUMONIA)
is the positive class; a sample is predicted positive when `probability >= threshold`, the same rule
scikit-learn's `roc_curve` uses, so a threshold read off the ROC curve reproduces its operating point.

Undefined values (AUROC with one class present, precision with no positive predictions, ...) are NaN,
never a crash; `metric_notes` says why each one is undefined.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

# Keys of `binary_metrics` that are rates in [0, 1] (bootstrapped) vs counts.
RATE_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "auroc", "pr_auc")
COUNT_KEYS = ("tn", "fp", "fn", "tp")


def _as_arrays(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.shape[0]} vs {p.shape[0]}")
    if y.size == 0:
        raise ValueError("no samples: labels and probabilities are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (NORMAL) or 1 (PNEUMONIA); found {sorted(set(np.unique(y).tolist()))}")
    if not np.isfinite(p).all():
        raise ValueError(f"{int((~np.isfinite(p)).sum())} probabilities are NaN or infinite")
    return y.astype(np.int64), p


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def confusion_counts(labels, probs, threshold: float = 0.5) -> dict[str, int]:
    """`{tn, fp, fn, tp}` at `probability >= threshold`."""
    y, p = _as_arrays(labels, probs)
    pred = p >= threshold
    pos = y == 1
    return {
        "tn": int((~pred & ~pos).sum()),
        "fp": int((pred & ~pos).sum()),
        "fn": int((~pred & pos).sum()),
        "tp": int((pred & pos).sum()),
    }


def confusion_matrix(labels, probs, threshold: float = 0.5) -> np.ndarray:
    """2x2 matrix, rows = true class (NORMAL, PNEUMONIA), columns = predicted class (sklearn's layout)."""
    c = confusion_counts(labels, probs, threshold)
    return np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]], dtype=np.int64)


def rates_from_counts(tn: float, fp: float, fn: float, tp: float) -> dict[str, float]:
    """Threshold metrics from confusion counts; NaN where a denominator is zero."""
    return {
        "accuracy": _ratio(tp + tn, tn + fp + fn + tp),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def auroc(labels, probs) -> float:
    """Area under the ROC curve; NaN when only one class is present (see `metric_notes`)."""
    y, p = _as_arrays(labels, probs)
    if y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, p))


def average_precision(labels, probs) -> float:
    """Average precision (step-wise PR-AUC, sklearn's definition); NaN when there is no positive sample."""
    y, p = _as_arrays(labels, probs)
    if y.max() == 0:
        return math.nan
    return float(average_precision_score(y, p))


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict[str, float | int]:
    """accuracy, precision, recall (sensitivity), specificity, f1, auroc, pr_auc and tn/fp/fn/tp.

    Used by training validation every epoch and by `eval.run`. Undefined rates are NaN (a warning names
    the reason once per call site); counts are ints.
    """
    y, p = _as_arrays(labels, probs)
    counts = confusion_counts(y, p, threshold)
    out: dict[str, float | int] = dict(rates_from_counts(**counts))
    out["auroc"] = auroc(y, p)
    out["pr_auc"] = average_precision(y, p)
    out.update(counts)
    notes = metric_notes(y, p, threshold)
    if notes:
        warnings.warn("; ".join(f"{k} is NaN: {v}" for k, v in notes.items()), RuntimeWarning, stacklevel=2)
    return out


def metric_notes(labels, probs, threshold: float = 0.5) -> dict[str, str]:
    """Why each undefined (NaN) metric of `binary_metrics` is undefined; empty when all are defined."""
    y, p = _as_arrays(labels, probs)
    c = confusion_counts(y, p, threshold)
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    notes = {}
    if n_pos == 0 or n_neg == 0:
        only = "PNEUMONIA (1)" if n_neg == 0 else "NORMAL (0)"
        notes["auroc"] = f"only one class present ({n_pos + n_neg} samples, all {only}); AUROC needs both"
    if n_pos == 0:
        notes["pr_auc"] = "no positive (PNEUMONIA) sample; average precision needs at least one"
        notes["recall"] = "no positive (PNEUMONIA) sample; sensitivity = tp / (tp + fn) has a zero denominator"
    if n_neg == 0:
        notes["specificity"] = "no negative (NORMAL) sample; specificity = tn / (tn + fp) has a zero denominator"
    if c["tp"] + c["fp"] == 0:
        notes["precision"] = f"no sample predicted positive at threshold {threshold:g}; precision = tp / (tp + fp) has a zero denominator"
    if 2 * c["tp"] + c["fp"] + c["fn"] == 0:
        notes["f1"] = "no positive sample and no positive prediction; F1 has a zero denominator"
    return notes


def roc_points(labels, probs) -> dict[str, list[float]]:
    """ROC curve `{fpr, tpr, thresholds}`; the first threshold is +inf (nothing predicted positive)."""
    y, p = _as_arrays(labels, probs)
    if y.min() == y.max():
        raise ValueError("ROC curve needs both classes; " + metric_notes(y, p)["auroc"])
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


def pr_points(labels, probs) -> dict[str, list[float]]:
    """Precision-recall curve `{precision, recall, thresholds}` (sklearn's order: recall decreasing)."""
    y, p = _as_arrays(labels, probs)
    if y.max() == 0:
        raise ValueError("PR curve needs at least one positive (PNEUMONIA) sample")
    precision, recall, thr = precision_recall_curve(y, p)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": thr.tolist()}


# --- threshold selection -------------------------------------------------------------------------------


def select_threshold(labels, probs, method: str = "youden", target_sensitivity: float = 0.95) -> dict:
    """Choose a decision threshold on validation predictions, to be applied unchanged to test.

    `youden`: maximise Youden's J = sensitivity + specificity - 1 (ties: the higher threshold, i.e. the
    more specific operating point). `sensitivity`: the highest threshold whose sensitivity reaches
    `target_sensitivity` (the most specific point that still meets the clinical target).
    Returns `{threshold, method, sensitivity, specificity, youden_j}` measured on these predictions.
    """
    y, p = _as_arrays(labels, probs)
    if y.min() == y.max():
        raise ValueError(
            "cannot choose a threshold: the validation predictions hold one class only "
            f"({int(y.sum())} PNEUMONIA, {int((y == 0).sum())} NORMAL); pass a fixed threshold instead"
        )
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    # The first ROC point has threshold +inf (predict nothing positive); it is never a usable threshold.
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
    if method == "youden":
        # argmax returns the first maximum; thresholds decrease along the curve, so ties go to the higher one.
        i = int(np.argmax(tpr - fpr))
        info = {"method": "youden"}
    elif method == "sensitivity":
        if not 0.0 < target_sensitivity <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        reached = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
        i = int(reached[0])  # always exists: the last ROC point has tpr = 1
        info = {"method": "sensitivity", "target_sensitivity": float(target_sensitivity)}
    else:
        raise ValueError(f"unknown threshold method {method!r}; use 'youden' or 'sensitivity'")
    return {
        "threshold": float(thr[i]),
        **info,
        "sensitivity": float(tpr[i]),
        "specificity": float(1.0 - fpr[i]),
        "youden_j": float(tpr[i] - fpr[i]),
    }


# --- bootstrap confidence intervals ---------------------------------------------------------------------


def _weighted_auroc(pos_scores, neg_scores, w_pos, w_neg) -> np.ndarray:
    """Mann-Whitney AUROC for B resamples given per-sample multiplicities (B x n_pos, B x n_neg).

    Equal to roc_auc_score on the resampled arrays, in O(B * n) instead of B sklearn calls.
    """
    order = np.argsort(neg_scores, kind="stable")
    neg_sorted = neg_scores[order]
    cum = np.concatenate([np.zeros((w_neg.shape[0], 1)), np.cumsum(w_neg[:, order], axis=1)], axis=1)
    lo = np.searchsorted(neg_sorted, pos_scores, side="left")
    hi = np.searchsorted(neg_sorted, pos_scores, side="right")
    below = cum[:, lo]
    ties = cum[:, hi] - below
    u = (w_pos * (below + 0.5 * ties)).sum(axis=1)
    return u / (w_pos.sum(axis=1) * w_neg.sum(axis=1))


def _weighted_average_precision(scores, is_pos, weights) -> np.ndarray:
    """sklearn's average precision for B resamples given multiplicities (B x n), vectorised over B."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    w = weights[:, order]
    tp = np.cumsum(w * is_pos[order], axis=1)
    fp = np.cumsum(w * ~is_pos[order], axis=1)
    # Operating points are the last index of each run of tied scores (as in sklearn's _binary_clf_curve).
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp, fp = tp[:, last], fp[:, last]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    recall = tp / tp[:, -1:]
    d_recall = np.diff(np.concatenate([np.zeros((tp.shape[0], 1)), recall], axis=1), axis=1)
    return (d_recall * precision).sum(axis=1)


def bootstrap_ci(
    labels, probs, threshold: float = 0.5, *, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, list[float]]:
    """Stratified percentile-bootstrap CIs for every rate of `binary_metrics`: `{metric: [low, high]}`.

    Stratified: each resample draws n_pos positives and n_neg negatives with replacement, so every resample
    keeps the class balance and AUROC stays defined. Deterministic for a given `seed`. A metric that is
    undefined on the full data gets `[nan, nan]`.
    """
    y, p = _as_arrays(labels, probs)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    pos, neg = p[y == 1], p[y == 0]
    n_pos, n_neg = pos.size, neg.size
    # Multiplicities (how often each sample is drawn) replace index arrays: every metric below is a
    # weighted sum, so B resamples cost a few (B x n) array operations.
    w_pos = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=n_resamples) if n_pos else np.zeros((n_resamples, 0))
    w_neg = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=n_resamples) if n_neg else np.zeros((n_resamples, 0))
    tp = w_pos @ (pos >= threshold)
    fn = w_pos @ (pos < threshold)
    fp = w_neg @ (neg >= threshold)
    tn = w_neg @ (neg < threshold)
    with np.errstate(invalid="ignore", divide="ignore"):
        samples = {
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "precision": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
            "recall": tp / (tp + fn) if n_pos else np.full(n_resamples, np.nan),
            "specificity": tn / (tn + fp) if n_neg else np.full(n_resamples, np.nan),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
        }
    if n_pos and n_neg:
        samples["auroc"] = _weighted_auroc(pos, neg, w_pos, w_neg)
    else:
        samples["auroc"] = np.full(n_resamples, np.nan)
    if n_pos:
        scores = np.concatenate([pos, neg])
        is_pos = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
        samples["pr_auc"] = _weighted_average_precision(scores, is_pos, np.concatenate([w_pos, w_neg], axis=1))
    else:
        samples["pr_auc"] = np.full(n_resamples, np.nan)
    alpha = (1.0 - confidence) / 2.0
    out = {}
    for key in RATE_KEYS:
        vals = samples[key][np.isfinite(samples[key])]
        # A rate undefined in some resamples (e.g. precision when a resample predicts no positive) is
        # summarised over the resamples where it is defined; undefined everywhere -> NaN.
        out[key] = [float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha))] if vals.size else [math.nan, math.nan]
    return out


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> list[float]:
    """Wilson score interval for a binomial proportion (used for per-subtype recall); NaN when n = 0."""
    if n == 0:
        return [math.nan, math.nan]
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    phat = successes / n
    den = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / den
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]
