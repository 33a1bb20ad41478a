"""Two real ranks (gloo on CPU) through torchrun: sharded training, exactly-once validation, rank-0-only files."""

from __future__ import annotations

import json
import socket

import pytest
from _runs import VENV_BIN, read_jsonl, run_train, train_env

from pipelines.manifest import load_manifest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_and_validate_exactly_once(tiny_shards, tmp_path):
    run_dir = tmp_path / "ddp"
    launcher = (str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()))
    run_train(tiny_shards, run_dir, "--log.wandb=true", launcher=launcher,
              env=train_env(tmp_path, ACCELERATE_USE_CPU="1"))
    manifest = load_manifest(tiny_shards)
    summary = json.loads((run_dir / "summary.json").read_text())
    per_device = summary["per_device_batch_size"]
    train_samples = manifest["splits"]["train"]["samples"]
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 2 * per_device
    # Each rank reads its own half of the training split: half the batches of a single process.
    assert summary["batches_per_epoch"] == (train_samples // 2) // per_device
    assert summary["steps"] == 2 * summary["steps_per_epoch"]

    records = read_jsonl(run_dir / "metrics.jsonl")
    val_rows = [r for r in records if "val/auroc" in r]
    assert len(val_rows) == 2  # one writer: rank 1 did not append its own copy
    assert all(r["val/samples"] == manifest["splits"]["val"]["samples"] for r in val_rows)
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == sorted(set(train_steps))
    # Only rank 0 logs to W&B and writes the best model.
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    assert (run_dir / "best" / "model.safetensors").is_file()
    ckpt = run_dir / "checkpoints" / "epoch-0002"
    # Each rank saved its own random states (as safetensors, never a pickle).
    assert sorted(p.name for p in ckpt.glob("rng-*")) == ["rng-rank0-of-2.safetensors", "rng-rank1-of-2.safetensors"]
    assert not list(ckpt.glob("*.pkl"))
