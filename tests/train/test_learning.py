"""Proof that the loop learns: a small-resolution run reaches val AUROC >= 0.9 on synthetic data, bounded steps.

Not a timing test: the bound is on optimizer steps (10 epochs x 14 steps = 140), the default loader (DALI on
CPU here) feeds it, and the first epoch must still be far from the target, so the task is not trivial.
"""

from __future__ import annotations

import json

import pytest
from _runs import read_jsonl, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def learn_shards(tmp_path_factory):
    from pipelines.make_shards import make_shards

    out = tmp_path_factory.mktemp("learn") / "shards"
    make_shards(None, out, synthetic=600, synthetic_size=160, min_shards=2, seed=1, workers=2, progress=False)
    return out


def test_small_resnet_learns_synthetic_pneumonia(learn_shards, tmp_path):
    run_dir = tmp_path / "learn"
    run_train(learn_shards, run_dir, "--model.arch=resnet18", "--data.image_size=64",
              "--data.per_device_batch_size=32", "--data.per_device_eval_batch_size=64", "--train.epochs=10",
              "--optim.lr=2e-3", "--train.seed=1", "--log.wandb=false", "--train.keep_checkpoints=1")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 140
    val = [r["val/auroc"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val/auroc" in r]
    assert val[0] < 0.85, f"epoch 1 already at {val[0]:.3f}: the synthetic task is trivial"
    assert summary["best_val_auroc"] >= 0.9, f"val AUROC by epoch: {[round(v, 3) for v in val]}"
