"""A checkpoint folder is untrusted input: resume never unpickles what it finds there, and damage is skipped."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import pytest
import torch
from _runs import REPO, read_jsonl, run_train, train_cmd, train_env

pytestmark = pytest.mark.slow
ARGS = ("--train.epochs=2", "--log.wandb=false")


class _Payload:
    """Unpickling this creates `marker`: what a malicious or tampered checkpoint file would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def payload_bytes(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(str(marker)), buffer)  # the format torch.load (and accelerate's load_state) reads
    return buffer.getvalue()


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    """A finished 2-epoch run with checkpoints epoch-0001 and epoch-0002; tests resume copies of it."""
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    run_train(tiny_shards, run_dir, *ARGS)
    return run_dir


def copy_run(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


def resume(tiny_shards, run_dir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(tiny_shards, run_dir, *ARGS, *extra), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=train_env(run_dir.parent))


def test_resume_never_unpickles_what_it_finds_in_a_checkpoint(trained, tiny_shards, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    marker = tmp_path / "payload-ran"
    evil = payload_bytes(marker)
    ckpts = run_dir / "checkpoints"
    # Newest checkpoint: every file (weights, counters, RNG, loader state, marker) replaced by the payload.
    for path in (ckpts / "epoch-0002").iterdir():
        path.write_bytes(evil)
    # Older checkpoint: intact, plus the pickles accelerate's load_state opens with weights_only=False (its
    # custom and RNG state) and the .bin/.pt/.pkl files a user might drop next to them.
    older = ckpts / "epoch-0001"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "pytorch_model.bin", "optimizer.pt", "extra.pkl"):
        if name.endswith(".pkl") or not (older / name).exists():
            (older / name).write_bytes(evil)

    result = resume(tiny_shards, run_dir)
    assert not marker.exists(), "resume executed code planted in a checkpoint"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping damaged checkpoint" in result.stderr and "epoch-0002" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("epoch-0001") and summary["epochs"] == 2
    # What training writes holds no pickle for a later resume to open.
    assert {p.suffix for p in (ckpts / "epoch-0002").iterdir()} <= {".safetensors", ".json", ".state"}


def test_truncated_rng_state_makes_a_checkpoint_damaged(trained, tiny_shards, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "epoch-0002"
    rng_files = [p for p in newest.iterdir() if p.name.startswith(("rng-", "random_states_"))]
    assert rng_files, sorted(p.name for p in newest.iterdir())
    for path in rng_files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    result = resume(tiny_shards, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping damaged checkpoint" in result.stderr and "epoch-0002" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("epoch-0001")
    # Epoch 2 retrained from epoch 1's weights, optimizer and RNG states gives the original epoch 2.
    reference = read_jsonl(trained / "metrics.jsonl")
    again = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in again] == [r["step"] for r in reference]
    for ours, theirs in zip(again, reference, strict=True):
        for key in ("train/loss", "train/epoch_loss", "val/loss"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (key, ours["step"])


def test_resume_from_a_path_without_a_loadable_checkpoint_is_one_line(trained, tiny_shards, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    damaged = run_dir / "checkpoints" / "epoch-0002"
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    missing = run_dir / "checkpoints" / "epoch-0009"
    for path in (damaged, missing):
        result = resume(tiny_shards, run_dir, f"--train.resume={path}")
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert str(path) in line and "train.resume" in line


def test_resume_on_rebuilt_shards_is_refused(trained, tiny_shards, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["per_class"] = dict(reversed(manifest["splits"]["train"]["per_class"].items()))
    (shards / "manifest.json").write_text(json.dumps(manifest))  # same data, another manifest: another hash
    result = subprocess.run(train_cmd(shards, run_dir, "--train.epochs=3", "--log.wandb=false"), cwd=REPO,
                            capture_output=True, text=True, timeout=600, env=train_env(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert str(shards / "manifest.json") in line and "--run.dir" in line
    assert not (run_dir / "checkpoints" / "epoch-0003").exists()
