"""eval.model_card: the card carries the report's numbers, the data counts, the recipe and the limits."""

from __future__ import annotations

import numpy as np

from eval import calibration as C
from eval import model_card as MC
from eval import report as R
from train.config import Config, config_to_dict


def _inputs(source="chest_xray"):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    probs = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    keys = [f"test-{i:08d}" for i in range(80)]
    metadata = {k: {"source": k, "subtype": ("virus" if i % 2 else "bacteria") if y else "none"}
                for i, (k, y) in enumerate(zip(keys, labels, strict=True))}
    report = R.build_report(keys, labels, probs, split="test", threshold=0.5,
                            threshold_info={"method": "youden", "chosen_on": "val"}, metadata=metadata,
                            n_resamples=100, calibration=C.fit_on_validation(labels, probs ** 0.5),
                            provenance={"run": "r50", "run_dir": "runs/r50", "shards": "shards/kermany",
                                        "command": "python -m eval.run --run runs/r50",
                                        "sha256": {"model": "ab" * 32, "manifest": "cd" * 32}})
    manifest = {"source": source, "command": ["python", "scripts/make_shards.py", "--src", "data"],
                "splits": {"train": {"samples": 4000, "per_class": {"NORMAL": 1000, "PNEUMONIA": 3000}, "patients": 1500},
                           "test": {"samples": 80, "per_class": {"NORMAL": 40, "PNEUMONIA": 40}, "patients": 70}}}
    meta = {"epoch": 7, "in_channels": 1, "val_metrics": {"val/auroc": 0.97},
            "spec": {"image_size": 224, "eval_crop_fraction": 0.875, "mean": 0.48, "std": 0.23}}
    return report, config_to_dict(Config()), meta, manifest


def test_model_card_carries_the_report_numbers_data_and_limits(tmp_path):
    report, cfg, meta, manifest = _inputs()
    card = MC.write_model_card(tmp_path / "model_card.md", report, cfg, meta, manifest).read_text()
    assert R.format_ci(report["metrics"]["auroc"]) in card and R.format_ci(report["metrics"]["recall"]) in card
    cal = report["calibration"]
    assert C.describe_calibration(cal) in card
    assert f"{cal['test']['ece']['before']:.4f}" in card and f"{cal['test']['ece']['after']:.4f}" in card
    assert "cd" * 32 in card and "| train | 4000 | 1000 | 3000 | 1500 |" in card
    assert "| virus |" in card and "| bacteria |" in card
    assert "shorter side resized to 256 px, centre crop 224 x 224" in card  # round(224 / 0.875)
    assert "| peak learning rate (`optim.lr`) | 0.001 |" in card
    assert "Not a medical device" in card and "paediatric" in card and "one centre" in card
    assert "python scripts/make_shards.py --src data" in card and "python -m eval.run --run runs/r50" in card
    assert "procedurally generated" not in card


def test_model_card_of_synthetic_data_says_so():
    report, cfg, meta, manifest = _inputs(source="synthetic")
    assert "procedurally generated" in MC.render_model_card(report, cfg, meta, manifest)
