"""Kill a run with SIGKILL after its first epoch; `--train.resume=auto` must finish with the same step count."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from _runs import REPO, read_jsonl, run_train, train_cmd, train_env

pytestmark = pytest.mark.slow
ARGS = ("--train.epochs=3", "--log.wandb=false")


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_shards, tmp_path):
    reference = tmp_path / "reference"
    run_train(tiny_shards, reference, *ARGS)
    expected_steps = json.loads((reference / "summary.json").read_text())["steps"]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_shards, run_dir, *ARGS), cwd=REPO, env=train_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = run_dir / "checkpoints" / "epoch-0001" / "complete.json"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None, "training exited before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()

    # A damaged checkpoint (complete marker, truncated weights) and a half-written one (no marker) newer than
    # epoch 1: both must be skipped with a warning in favour of epoch 1.
    ckpts = run_dir / "checkpoints"
    for name in ("epoch-0002", "epoch-0003"):
        shutil.rmtree(ckpts / name, ignore_errors=True)
        shutil.copytree(ckpts / "epoch-0001", ckpts / name)
    weights = ckpts / "epoch-0002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    (ckpts / "epoch-0003" / "complete.json").unlink()

    result = run_train(tiny_shards, run_dir, *ARGS, "--train.resume=auto")
    assert "skipping checkpoint" in result.stderr and "epoch-0003" in result.stderr
    assert "skipping damaged checkpoint" in result.stderr and "epoch-0002" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("epoch-0001")
    assert summary["steps"] == expected_steps
    assert summary["epochs"] == 3
    records = read_jsonl(run_dir / "metrics.jsonl")
    # The killed epoch's rows are dropped on resume: each epoch validated once, train steps logged once.
    assert [r["epoch"] for r in records if "val/auroc" in r] == [1, 2, 3]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == sorted(set(train_steps))
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    reference_rows = read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in records] == [r["step"] for r in reference_rows]
    # Exact resume: the DALI reader position and augmentation RNG come back from the checkpoint, so the
    # resumed epochs see the same batches and reach the same losses as the uninterrupted run.
    assert "no loader state" not in result.stdout
    for ours, theirs in zip(records, reference_rows, strict=True):
        for key in ("train/loss", "train/epoch_loss", "val/loss"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (key, ours["step"])
    assert summary["wall_time_s"] > json.loads((reference / "summary.json").read_text())["wall_time_s"] / 3
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch-0002", "epoch-0003"]  # keep_checkpoints=2


def test_resume_never_refuses_to_mix_two_runs(tiny_shards, tmp_path):
    run_dir = tmp_path / "fresh"
    first = run_train(tiny_shards, run_dir, "--train.epochs=1", "--log.wandb=false", "--train.resume=never")
    assert "resumed from" not in first.stdout
    before = (run_dir / "metrics.jsonl").read_text()
    again = subprocess.run(train_cmd(tiny_shards, run_dir, "--train.epochs=1", "--log.wandb=false",
                                     "--train.resume=never"), cwd=REPO, capture_output=True, text=True,
                           env=train_env(tmp_path))
    assert again.returncode == 2
    assert str(run_dir) in again.stderr and "already holds a run" in again.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing of the first run was touched
    # A finished run relaunched with resume=auto trains nothing more and keeps its record.
    rerun = run_train(tiny_shards, run_dir, "--train.epochs=1", "--log.wandb=false")
    assert "resumed from" in rerun.stdout
    assert (run_dir / "metrics.jsonl").read_text() == before
