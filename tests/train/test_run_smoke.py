"""`train/run.py` end to end in one process, launched through `accelerate launch` with the repo's config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _runs import read_jsonl, run_train, train_env
from _wandb_offline import offline_run
from safetensors.torch import load_file

from eval.metrics import auroc
from pipelines.loaders import build_loader
from pipelines.manifest import load_manifest
from pipelines.spec import PreprocessSpec
from train.config import read_config
from train.launch import cpu_bf16_support
from train.model import build_model


@pytest.fixture(scope="module")
def smoke(smoke_training):
    return smoke_training


def test_run_directory_is_complete(smoke, tiny_shards):
    run_dir, result = smoke
    # accelerate_config.yaml asks for bf16: a CPU with native bf16 trains in bf16 and says why; any other
    # CPU warns and trains in fp32.
    native, why = cpu_bf16_support()
    summary = json.loads((run_dir / "summary.json").read_text())
    if native:
        assert summary["mixed_precision"] == "bf16" and "using fp32" not in result.stderr
        assert "mixed precision bf16 (bf16 requested" in result.stdout and why in result.stdout
    else:
        assert summary["mixed_precision"] == "no" and "using fp32" in result.stderr
        assert "mixed precision no (mixed_precision=bf16 requested" in result.stdout
    assert summary["epochs"] == 2 and summary["world_size"] == 1
    assert summary["steps"] == 2 * summary["steps_per_epoch"] > 0
    assert read_config(run_dir / "config.yaml").data.shards == str(tiny_shards)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    for name in ("model.safetensors", "config.yaml", "meta.json"):
        assert (run_dir / "best" / name).is_file()


def test_metrics_jsonl_has_train_val_and_perf_keys(smoke, tiny_shards):
    run_dir, _ = smoke
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in records if "train/loss" in r]
    val_rows = [r for r in records if "val/auroc" in r]
    assert len(val_rows) == 2 and [r["epoch"] for r in val_rows] == [1, 2]
    assert train_rows, "no train/* rows: log_every is not honoured"
    for key in ("train/loss", "train/lr", "perf/images_per_sec", "perf/data_wait_frac", "perf/host_peak_rss_mb"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    expected_val = load_manifest(tiny_shards)["splits"]["val"]["samples"]
    for key in ("val/loss", "val/accuracy", "val/precision", "val/recall", "val/specificity", "val/f1",
                "val/auroc", "val/pr_auc", "val/youden_threshold", "val_shifted/auroc", "val_shifted/loss",
                "val_shifted/sensitivity", "val_shifted/specificity"):
        assert key in val_rows[-1], key
    assert all(r["val/samples"] == expected_val for r in val_rows)  # every val sample counted exactly once
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)


def test_best_model_reproduces_logged_val_auroc(smoke, tiny_shards):
    run_dir, _ = smoke
    meta = json.loads((run_dir / "best" / "meta.json").read_text())
    cfg = read_config(run_dir / "best" / "config.yaml")
    model = build_model(cfg.model, cfg.data.channels)
    model.load_state_dict(load_file(str(run_dir / "best" / "model.safetensors")))
    model.eval()
    spec = PreprocessSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
    # Recomputed in the precision training validated in (bf16 on a CPU with native bf16).
    bf16 = json.loads((run_dir / "summary.json").read_text())["mixed_precision"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    loader = build_loader(tiny_shards, "val", spec=spec, per_device_batch_size=8, train=False, num_workers=1,
                          dtype=dtype)
    labels, probs = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in loader:
            probs.append(torch.softmax(model(batch.images).float(), dim=1)[:, 1])
            labels.append(batch.labels)
    recomputed = auroc(torch.cat(labels).numpy(), torch.cat(probs).numpy())
    logged = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("epoch") == meta["epoch"] and "val/auroc" in r]
    assert recomputed == pytest.approx(logged[-1]["val/auroc"], abs=1e-6)
    assert meta["val_metrics"]["val/auroc"] == pytest.approx(logged[-1]["val/auroc"])


def test_wandb_offline_run_holds_the_metrics(smoke):
    run_dir, _ = smoke
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    (run_file,) = run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb")
    summary, info, history = offline_run(run_file)
    records = read_jsonl(run_dir / "metrics.jsonl")
    val_rows = [r for r in records if "val/auroc" in r]
    assert info["project"] == "cxr-pipeline" and info["name"] == run_dir.name
    # define_metric(summary="max"): the runs table shows the best, not the last, val AUROC.
    assert summary["val/auroc"]["max"] == pytest.approx(max(r["val/auroc"] for r in val_rows))
    assert summary["val/accuracy"] == pytest.approx(val_rows[-1]["val/accuracy"])
    assert summary["summary/best_val_auroc"] == pytest.approx(max(r["val/auroc"] for r in val_rows))
    logged_losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert logged_losses == pytest.approx([r["train/loss"] for r in records if "train/loss" in r])
    # wandb.plot charts are stored as tables: one ROC, PR and confusion-matrix table per epoch.
    for chart in ("val/roc_table", "val/pr_table", "val/confusion_matrix_table"):
        rows = [row for row in history if f"{chart}/_type" in row]
        assert len(rows) == len(val_rows) and all(row[f"{chart}/nrows"] > 0 for row in rows), chart


def test_log_wandb_false_writes_no_wandb_files(tiny_shards, tmp_path):
    run_dir = tmp_path / "nowandb"
    run_train(tiny_shards, run_dir, "--train.epochs=1", "--log.wandb=false")
    assert not (run_dir / "wandb").exists() and not (tmp_path / "wandb").exists()
    assert (run_dir / "best" / "model.safetensors").is_file()


def test_missing_shards_is_a_clear_error(tmp_path):
    import subprocess

    from _runs import REPO, train_cmd

    result = subprocess.run(train_cmd(tmp_path / "nope", tmp_path / "run"), cwd=REPO, capture_output=True,
                            text=True, env=train_env(tmp_path))
    assert result.returncode == 2
    assert str(tmp_path / "nope") in result.stderr and "make_shards.py" in result.stderr


def test_verify_shards_refuses_a_tampered_tar_before_training(tiny_shards, tmp_path):
    import shutil
    import subprocess

    from _runs import REPO, train_cmd

    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    tar = sorted((copy / "train").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size and count: only a re-hash can see it
    tar.write_bytes(bytes(data))
    result = subprocess.run(train_cmd(copy, tmp_path / "run", "--log.wandb=false", "--data.verify_shards=true"),
                            cwd=REPO, capture_output=True, text=True, env=train_env(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert tar.name in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_gradient_accumulation_counts_optimizer_steps(tiny_shards, tmp_path):
    run_dir = tmp_path / "accum"
    run_train(tiny_shards, run_dir, "--train.epochs=1", "--log.wandb=false", "--optim.grad_accum_steps=2")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_batch_size"] == 2 * summary["per_device_batch_size"]
    assert summary["steps"] == summary["steps_per_epoch"] == summary["batches_per_epoch"] // 2 > 0
    lrs = [r["train/lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/lr" in r]
    assert lrs and all(lr > 0 for lr in lrs)
