"""The synthetic generator: deterministic, patient-aware, realistic sizes, learnable but not trivially."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipelines.synthetic import encode_synthetic, plan_synthetic, render_synthetic


def test_plan_is_deterministic_and_split_by_patient():
    items = plan_synthetic(1000, seed=3)
    assert items == plan_synthetic(1000, seed=3)
    assert items != plan_synthetic(1000, seed=4)
    split_of_patient = {}
    for item in items:
        assert split_of_patient.setdefault(item.patient, item.split) == item.split, "patient in two splits"
    images_per_patient = np.bincount(np.unique([i.patient for i in items], return_inverse=True)[1])
    assert images_per_patient.max() >= 2 and images_per_patient.min() == 1
    normal_fraction = np.mean([i.label == 0 for i in items])
    assert 0.2 < normal_fraction < 0.33, normal_fraction  # Kermany's train split is ~26 % NORMAL
    fractions = {s: np.mean([i.split == s for i in items]) for s in ("train", "val", "test")}
    assert 0.72 < fractions["train"] < 0.88 and 0.05 < fractions["val"] < 0.15 and 0.05 < fractions["test"] < 0.15
    for split in ("train", "val", "test"):
        assert {i.label for i in items if i.split == split} == {0, 1}
    assert {i.subtype for i in items if i.label == 1} == {"bacteria", "virus"}
    assert {i.subtype for i in items if i.label == 0} == {"none"}


def test_render_is_deterministic_and_realistic_size():
    item = plan_synthetic(60, seed=0)[5]
    first = render_synthetic(item, seed=0, size=1000)
    assert first.dtype == np.uint8 and first.ndim == 2
    assert 800 <= first.shape[0] <= 1000 and 950 <= first.shape[1] <= 1250
    assert np.array_equal(first, render_synthetic(item, seed=0, size=1000))
    assert not np.array_equal(first, render_synthetic(item, seed=1, size=1000))
    assert first.std() > 20, "an X-ray-like image has structure, not a flat field"
    jpeg = encode_synthetic(item, seed=0, size=200)
    with Image.open(__import__("io").BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.mode == "L"


def test_learnable_but_not_by_brightness_alone():
    """A linear probe on 32 px thumbnails must find the signal; mean brightness alone must not."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    items = plan_synthetic(600, seed=1)
    features = np.stack([
        np.asarray(Image.fromarray(render_synthetic(i, seed=1, size=128)).resize((32, 32)), np.float32).ravel() / 255
        for i in items])
    labels = np.array([i.label for i in items])
    train = np.array([i.split == "train" for i in items])
    probe = LogisticRegression(C=1.0, max_iter=2000).fit(features[train], labels[train])
    auroc = roc_auc_score(labels[~train], probe.predict_proba(features[~train])[:, 1])
    assert auroc >= 0.75, f"synthetic PNEUMONIA signal too weak for a linear probe (AUROC {auroc:.3f})"
    brightness_auroc = roc_auc_score(labels, features.mean(axis=1))
    assert 0.3 < brightness_auroc < 0.7, f"label leaks through global brightness (AUROC {brightness_auroc:.3f})"
