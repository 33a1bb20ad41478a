"""Robust-training options: mixup/cutmix with soft targets, the weight EMA, model selection by val loss, and
the per-epoch val_shifted/* metrics (train/mix.py, train/ema.py, train/validate.py, train/run.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _runs import read_jsonl, run_train
from safetensors.torch import load_file

from eval.metrics import binary_metrics, select_threshold
from train.ema import WeightEMA
from train.loop import train_step
from train.mix import BatchMixer, build_mixer
from train.validate import KeptBatches, selection_score, shifted_metrics, transferred_threshold


def _batch(n: int = 16, size: int = 24):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 2, (n,), generator=g)


def _mixer(**kw) -> BatchMixer:
    args = dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, seed=0, epoch=0, rank=0)
    return BatchMixer(**{**args, **kw})


def test_mixup_blends_pairs_and_their_labels():
    images, labels = _batch()
    mixed, targets = _mixer(mixup_alpha=0.4)(images, labels)
    assert targets.shape == (16, 2) and torch.allclose(targets.sum(1), torch.ones(16))
    assert mixed.is_contiguous(memory_format=torch.channels_last)
    # Each mixed image is lam * x_i + (1 - lam) * x_j for some j; lam is readable from the soft target of a
    # pair with different labels (targets[i, y_i] = lam + (1 - lam) [y_j == y_i]).
    found = 0
    for i in range(16):
        candidates = [(lam, j) for j in range(16) for lam in (float(targets[i, labels[i]]),)
                      if labels[j] != labels[i] and torch.allclose(mixed[i], lam * images[i] + (1 - lam) * images[j],
                                                                    atol=1e-5)]
        found += bool(candidates)
    assert found > 0, "no mixed image is a blend of two inputs with the weights of its soft target"
    assert not torch.allclose(mixed, images)


def test_cutmix_pastes_a_box_weighted_by_area():
    images, labels = _batch()
    mixed, targets = _mixer(cutmix_alpha=1.0)(images, labels)
    changed = (mixed != images).any(dim=0)[0]  # the box is the same for the whole batch
    rows, cols = np.flatnonzero(changed.any(1).numpy()), np.flatnonzero(changed.any(0).numpy())
    area = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) / 24**2
    assert changed[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all(), "changed pixels are not one box"
    expected = (1 - area) * torch.nn.functional.one_hot(labels, 2).float()
    # A sample's own share of its soft target is the area outside the box.
    assert torch.all(targets >= expected - 1e-6)
    assert float(targets.sum()) == pytest.approx(16.0)


def test_mixing_is_reproducible_per_epoch_and_off_when_disabled():
    images, labels = _batch()
    a = _mixer(mixup_alpha=0.4, cutmix_alpha=1.0)(images, labels)
    b = _mixer(mixup_alpha=0.4, cutmix_alpha=1.0)(images, labels)
    c = _mixer(mixup_alpha=0.4, cutmix_alpha=1.0, epoch=1)(images, labels)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    unmixed, onehot = _mixer(mixup_alpha=0.4, prob=0.0)(images, labels)
    assert unmixed is images and torch.equal(onehot.argmax(1), labels)
    off = SimpleNamespace(mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, seed=0)
    assert build_mixer(off, epoch=0, rank=0) is None


def test_loss_accepts_soft_targets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24 * 24, 2))
    images, labels = _batch()
    losses = []
    for targets in (labels, torch.nn.functional.one_hot(labels, 2).float()):
        clone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24 * 24, 2))
        clone.load_state_dict(model.state_dict())
        optimizer = torch.optim.SGD(clone.parameters(), lr=0.1)
        losses.append(train_step(clone, images, targets, loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                                 optimizer=optimizer, backward=torch.Tensor.backward,
                                 clip_grad_norm=torch.nn.utils.clip_grad_norm_, grad_clip_norm=1.0))
    # One-hot probabilities and class indices are the same target: the same loss.
    assert float(losses[0]) == pytest.approx(float(losses[1]), rel=1e-6)


def test_ema_follows_the_weights_with_its_decay():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    ema = WeightEMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(2, 1, 8, 8))  # training-mode forward: BN running stats and num_batches_tracked move
    decay = ema.current_decay()
    assert decay == pytest.approx(1 / 10)  # the warm-up: (1 + 0) / (10 + 0)
    ema.update()
    raw = model.state_dict()
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, decay * before[key] + (1 - decay) * raw[key])
        else:
            assert torch.equal(value, raw[key]), key
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = WeightEMA(model, decay=0.9)
    restored.restore(ema.module.state_dict(), ema.updates)
    assert restored.updates == 1 and torch.equal(restored.module[0].weight, ema.module[0].weight)
    restored.restart()  # resumed without a saved average: it starts again from the weights
    assert restored.updates == 0 and torch.equal(restored.module[0].weight, model[0].weight)


def test_selection_and_shifted_metrics():
    assert selection_score({"val/auroc": 0.9, "val/loss": 0.3}, "auroc") == 0.9
    assert selection_score({"val/auroc": 0.9, "val/loss": 0.3}, "loss") == -0.3
    assert selection_score({"val/auroc": float("nan"), "val/loss": 0.3}, "auroc") == float("-inf")
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.1, 0.4, 0.35, 0.3, 0.8, 0.9, 0.7])
    threshold = transferred_threshold(labels, probs)
    assert threshold == select_threshold(labels, probs)["threshold"]
    assert np.isnan(transferred_threshold(np.ones(3, int), np.array([0.2, 0.5, 0.9])))
    shifted_probs = np.array([0.5, 0.2, 0.45, 0.3, 0.6, 0.95, 0.4])
    out = shifted_metrics(labels, shifted_probs, threshold)
    at = binary_metrics(labels, shifted_probs, threshold)
    assert out["val_shifted/sensitivity"] == at["recall"] and out["val_shifted/specificity"] == at["specificity"]
    assert "val_shifted/sensitivity" not in shifted_metrics(labels, shifted_probs, float("nan"))


def test_kept_batches_replay_what_the_loader_gave():
    class Once(list):
        name = "dali"

        def __iter__(self):
            assert not getattr(self, "used", False), "the loader was read twice"
            self.used = True
            return super().__iter__()

    items = [object(), object()]
    kept = KeptBatches(Once(items))
    assert list(kept) == items and len(kept) == 2 and kept.name == "dali"
    assert list(kept) == kept.kept == items  # the second pass replays, not re-reads


@pytest.fixture(scope="module")
def robust_run(tiny_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("robust") / "ema"
    run_train(tiny_shards, run_dir, "--train.epochs=3", "--train.ema_decay=0.9", "--train.select_by=loss",
              "--train.mixup_alpha=0.4", "--train.cutmix_alpha=1.0", "--train.keep_checkpoints=3",
              "--data.train_gamma=0.3", "--data.train_erase_prob=0.5")
    return run_dir


def test_best_is_the_ema_of_the_lowest_val_loss_epoch(robust_run):
    meta = json.loads((robust_run / "best" / "meta.json").read_text())
    val_rows = [r for r in read_jsonl(robust_run / "metrics.jsonl") if "val/loss" in r]
    assert meta["epoch"] == min(val_rows, key=lambda r: r["val/loss"])["epoch"]  # select_by=loss
    assert meta["weights"] == "ema (decay 0.9)"
    ckpt = robust_run / "checkpoints" / f"epoch-{meta['epoch']:04d}"
    ema = load_file(str(ckpt / "ema.safetensors"))
    raw = load_file(str(ckpt / "model.safetensors"))
    best = load_file(str(robust_run / "best" / "model.safetensors"))
    assert set(best) == set(ema) == set(raw)
    for key, value in best.items():
        torch.testing.assert_close(value, ema[key].contiguous(), rtol=0, atol=0)
    differs = [k for k, v in best.items() if v.is_floating_point() and not torch.equal(v, raw[k])]
    assert len(differs) > len(best) // 2, "best/ holds the raw weights, not their average"


def test_val_shifted_metrics_every_epoch(robust_run):
    val_rows = [r for r in read_jsonl(robust_run / "metrics.jsonl") if "val/auroc" in r]
    assert [r["epoch"] for r in val_rows] == [1, 2, 3]
    for row in val_rows:
        assert row["val_shifted/samples"] == row["val/samples"]
        for key in ("val_shifted/auroc", "val_shifted/loss", "val_shifted/sensitivity", "val_shifted/specificity",
                    "val/youden_threshold"):
            assert row[key] is not None and np.isfinite(row[key]), key


def test_val_shifted_off(tiny_shards, tmp_path):
    run_dir = tmp_path / "plain"
    run_train(tiny_shards, run_dir, "--train.epochs=1", "--train.val_shifted=false")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert any("val/auroc" in r for r in rows) and not any(k.startswith("val_shifted/") for r in rows for k in r)


def test_ema_average_continues_after_resume(tiny_shards, tmp_path):
    from safetensors import safe_open

    run_dir = tmp_path / "ema-resume"
    run_train(tiny_shards, run_dir, "--train.epochs=1", "--train.ema_decay=0.9")
    run_train(tiny_shards, run_dir, "--train.epochs=2", "--train.ema_decay=0.9")
    steps = json.loads((run_dir / "summary.json").read_text())["steps_per_epoch"]
    for epoch in (1, 2):
        with safe_open(str(run_dir / "checkpoints" / f"epoch-{epoch:04d}" / "ema.safetensors"), "pt") as handle:
            # The resumed launch restored the count (and the average) instead of starting over at 0.
            assert int(handle.metadata()["updates"]) == epoch * steps > 0


def test_counters_from_before_select_by_still_resume():
    from train.checkpoint import TrainState, _parse_counters

    old = {k: v for k, v in vars(TrainState(best_auroc=0.93, best_epoch=3, manifest_sha256="ab")).items()
           if k != "best_score"}
    counters, _ = _parse_counters({"train_state": old})
    assert counters["best_score"] == 0.93  # those runs selected by val AUROC
    counters, _ = _parse_counters({"train_state": {**old, "best_auroc": None, "best_score": None}})
    assert counters["best_score"] == counters["best_auroc"] == float("-inf")
