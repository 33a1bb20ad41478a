"""eval.metrics against hand-computed cases and scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from eval import metrics as M

# 4 positives, 4 negatives; at threshold 0.5: tp=3 (0.9, 0.8, 0.6), fn=1 (0.3), fp=1 (0.7), tn=3.
LABELS = [1, 1, 1, 1, 0, 0, 0, 0]
PROBS = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1]


def test_hand_computed_case():
    m = M.binary_metrics(LABELS, PROBS, threshold=0.5)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 1, 1, 3)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    # Pairs (pos, neg) ranked correctly: 0.9,0.8 beat all 4 negatives; 0.6 beats 3; 0.3 beats 2 -> 13/16.
    assert m["auroc"] == pytest.approx(13 / 16)
    # Ranked: 0.9 P, 0.8 P, 0.7 N, 0.6 P, 0.4 N, 0.3 P -> AP = (1 + 1 + 3/4 + 4/6) / 4.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)


def test_threshold_rule_is_greater_or_equal():
    assert M.confusion_counts([1, 0], [0.5, 0.5], threshold=0.5) == {"tn": 0, "fp": 1, "fn": 0, "tp": 1}
    assert M.confusion_matrix(LABELS, PROBS).tolist() == [[3, 1], [1, 3]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.clip(rng.random(300) * 0.7 + 0.3 * y, 0, 1).round(2)  # rounding makes ties
    thr = 0.55
    pred = (p >= thr).astype(int)
    m = M.binary_metrics(y, p, threshold=thr)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert M.confusion_matrix(y, p, thr).tolist() == skm.confusion_matrix(y, pred).tolist()
    roc = M.roc_points(y, p)
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(m["auroc"])
    pr = M.pr_points(y, p)
    assert -np.sum(np.diff(pr["recall"]) * np.array(pr["precision"])[:-1]) == pytest.approx(m["pr_auc"])


def test_weighted_bootstrap_kernels_equal_sklearn_on_resampled_arrays():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    p = (rng.random(120) * 0.6 + 0.4 * y).round(1)  # heavy ties
    pos, neg = p[y == 1], p[y == 0]
    w_pos = rng.multinomial(pos.size, np.full(pos.size, 1 / pos.size), size=20)
    w_neg = rng.multinomial(neg.size, np.full(neg.size, 1 / neg.size), size=20)
    auc = M._weighted_auroc(pos, neg, w_pos, w_neg)
    scores = np.concatenate([pos, neg])
    is_pos = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    ap = M._weighted_average_precision(scores, is_pos, np.concatenate([w_pos, w_neg], axis=1))
    for b in range(20):
        yy = np.r_[np.ones(w_pos[b].sum()), np.zeros(w_neg[b].sum())]
        pp = np.r_[np.repeat(pos, w_pos[b]), np.repeat(neg, w_neg[b])]
        assert auc[b] == pytest.approx(skm.roc_auc_score(yy, pp), abs=1e-12)
        assert ap[b] == pytest.approx(skm.average_precision_score(yy, pp), abs=1e-12)


def test_bootstrap_is_seeded_and_brackets_the_point_estimate():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    point = M.binary_metrics(y, p, 0.5)
    a = M.bootstrap_ci(y, p, 0.5, n_resamples=500, seed=11)
    assert a == M.bootstrap_ci(y, p, 0.5, n_resamples=500, seed=11)
    assert a != M.bootstrap_ci(y, p, 0.5, n_resamples=500, seed=12)
    for key in M.RATE_KEYS:
        lo, hi = a[key]
        assert lo <= point[key] <= hi, key
        assert 0 < hi - lo < 0.25, key  # a real interval, not a degenerate or absurd one


def test_bootstrap_is_stratified():
    # 3 positives among 60: an unstratified resample would often draw none and make AUROC undefined.
    y = np.r_[np.ones(3, int), np.zeros(57, int)]
    p = np.linspace(0, 1, 60)[::-1]
    ci = M.bootstrap_ci(y, p, 0.5, n_resamples=300, seed=0)
    assert all(math.isfinite(v) for v in ci["auroc"])


def test_youden_threshold_chosen_on_val_is_what_test_uses():
    rng = np.random.default_rng(5)
    y_val = rng.integers(0, 2, 200)
    p_val = np.clip(rng.normal(0.3 + 0.35 * y_val, 0.15), 0, 1)
    choice = M.select_threshold(y_val, p_val, "youden")
    fpr, tpr, thr = skm.roc_curve(y_val, p_val)
    assert choice["youden_j"] == pytest.approx(np.max(tpr - fpr))
    at_val = M.binary_metrics(y_val, p_val, choice["threshold"])
    assert at_val["recall"] + at_val["specificity"] - 1 == pytest.approx(choice["youden_j"])
    # Applying it to test: the test metrics are exactly those at that fixed threshold.
    y_test = rng.integers(0, 2, 150)
    p_test = np.clip(rng.normal(0.3 + 0.35 * y_test, 0.15), 0, 1)
    pred = p_test >= choice["threshold"]
    assert M.binary_metrics(y_test, p_test, choice["threshold"])["tp"] == int((pred & (y_test == 1)).sum())


def test_target_sensitivity_threshold():
    choice = M.select_threshold(LABELS, PROBS, "sensitivity", target_sensitivity=1.0)
    assert choice["threshold"] == 0.3  # the highest threshold that catches every positive
    assert choice["sensitivity"] == 1.0 and choice["specificity"] == pytest.approx(2 / 4)
    choice = M.select_threshold(LABELS, PROBS, "sensitivity", target_sensitivity=0.5)
    assert choice["threshold"] == 0.8


def test_single_class_does_not_crash_and_says_why():
    with pytest.warns(RuntimeWarning, match="only one class"):
        m = M.binary_metrics([1, 1, 1], [0.2, 0.6, 0.9])
    assert math.isnan(m["auroc"]) and math.isnan(m["specificity"])
    assert m["recall"] == pytest.approx(2 / 3)
    notes = M.metric_notes([0, 0], [0.1, 0.2])
    assert set(notes) >= {"auroc", "pr_auc", "recall", "precision"}
    ci = M.bootstrap_ci([0, 0, 0], [0.1, 0.2, 0.7], n_resamples=50)
    assert all(math.isnan(v) for v in ci["auroc"]) and all(math.isfinite(v) for v in ci["specificity"])
    with pytest.raises(ValueError, match="one class"):
        M.select_threshold([1, 1], [0.3, 0.4])


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="differ in length"):
        M.binary_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 \\(NORMAL\\) or 1"):
        M.binary_metrics([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        M.binary_metrics([0, 1], [0.5, float("nan")])


def test_no_warning_when_everything_is_defined():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.binary_metrics(LABELS, PROBS)


def test_wilson_interval():
    lo, hi = M.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert all(math.isnan(v) for v in M.wilson_interval(0, 0))
