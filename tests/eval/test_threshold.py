"""eval.threshold: which validation predictions choose the threshold, and the patient-held-out transfer table."""

from __future__ import annotations

import numpy as np
import pytest

from eval import metrics as M
from eval import threshold as T


def shifted_world(n_patients: int = 200, seed: int = 0):
    """Two images per patient; under the shift every score moves up by 0.25 (NORMAL images look sicker)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), 2)
    y = np.repeat(rng.random(n_patients) < 0.7, 2).astype(int)
    clean = np.clip(np.where(y == 1, rng.normal(0.7, 0.12, y.size), rng.normal(0.25, 0.12, y.size)), 0, 1)
    shifted = np.clip(clean + 0.25, 0, 1)
    return y, clean, shifted, groups


def test_each_rule_chooses_on_its_own_predictions():
    y, clean, shifted, _ = shifted_world()
    assert T.choose("val", y, clean, shifted)["threshold"] == M.select_threshold(y, clean)["threshold"]
    assert T.choose("val-shifted", y, clean, shifted)["threshold"] == M.select_threshold(y, shifted)["threshold"]
    pooled = T.choose("val+val-shifted", y, clean, shifted)
    assert pooled["threshold"] == M.select_threshold(np.r_[y, y], np.r_[clean, shifted])["threshold"]
    assert pooled["chosen_on"] == "val+val-shifted"
    # The pooled threshold sits between the two single-condition ones.
    assert T.choose("val", y, clean)["threshold"] < pooled["threshold"] < T.choose("val-shifted", y, clean, shifted)["threshold"]
    target = T.choose("val+val-shifted", y, clean, shifted, "sensitivity", 0.99)
    assert target["method"] == "sensitivity" and target["sensitivity"] >= 0.99


def test_rules_that_need_shifted_predictions_say_so():
    y, clean, _, _ = shifted_world()
    with pytest.raises(ValueError, match="val-shifted predictions"):
        T.choose("val+val-shifted", y, clean, None)
    with pytest.raises(ValueError, match="unknown threshold rule"):
        T.choose("test", y, clean, clean)


def test_transfer_table_scores_each_rule_on_held_out_patients():
    y, clean, shifted, groups = shifted_world()
    table = T.transfer_table(y, clean, shifted, groups, repeats=10, seed=1)
    assert table["fits"] == 20 and table["patients"] == 200 and table["samples"] == 400
    rules = table["rules"]
    assert set(rules) == set(T.RULES)
    # The clean-val threshold keeps clean specificity but loses it under the shift; pooling recovers most of it.
    assert rules["val"]["clean"]["specificity"] > 0.9
    assert rules["val"]["shifted"]["specificity"] < 0.6
    assert rules["val+val-shifted"]["shifted"]["specificity"] > rules["val"]["shifted"]["specificity"] + 0.2
    assert rules["val-shifted"]["clean"]["sensitivity"] < rules["val"]["clean"]["sensitivity"]
    # Deterministic for a seed; another seed draws other halvings.
    assert T.transfer_table(y, clean, shifted, groups, repeats=10, seed=1) == table
    assert T.transfer_table(y, clean, shifted, groups, repeats=10, seed=2) != table


def test_transfer_table_never_splits_a_patient(monkeypatch):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 2)
    y = np.repeat(np.arange(40) % 3 > 0, 2).astype(int)
    clean = rng.permutation(np.linspace(0.01, 0.99, 80))  # distinct scores identify the samples a fit saw
    fitted_sets = []
    real_choose = T.choose

    def spy(on, labels, c, s, *args):
        fitted_sets.append(np.flatnonzero(np.isin(clean, c)))
        return real_choose(on, labels, c, s, *args)

    monkeypatch.setattr(T, "choose", spy)
    T.transfer_table(y, clean, clean + 0.1, groups, repeats=3)
    assert len(fitted_sets) == 3 * 2 * len(T.RULES)
    for fitted in fitted_sets:
        assert 0 < fitted.size < 80
        # Both images of every patient in the fitting half, none of the other half's.
        assert set(fitted) == set(np.flatnonzero(np.isin(groups, groups[fitted])))


def test_transfer_table_checks_its_inputs():
    y, clean, shifted, groups = shifted_world(n_patients=10)
    with pytest.raises(ValueError, match="one label"):
        T.transfer_table(y, clean, shifted[:-1], groups)
    with pytest.raises(ValueError, match="2 patients"):
        T.transfer_table(y, clean, shifted, np.zeros_like(groups))


def test_markdown_marks_the_rule_in_use():
    y, clean, shifted, groups = shifted_world(n_patients=50)
    lines = T.transfer_markdown(T.transfer_table(y, clean, shifted, groups, repeats=2), "val+val-shifted")
    assert sum("(used)" in line for line in lines) == 1
    assert any(line.startswith("| val+val-shifted (used) |") for line in lines)
