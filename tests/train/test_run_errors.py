"""User errors of train/run.py: one line naming the file or key and the fix, exit 2, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from _runs import REPO, read_jsonl, run_train, train_cmd, train_env

pytestmark = pytest.mark.slow
ARGS = ("--train.epochs=1", "--log.wandb=false")


def launch(shards: Path, run_dir: Path, *overrides: str, env: dict | None = None,
           entry: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = train_cmd(shards, run_dir, *overrides)
    if entry:
        cmd = [*entry, *cmd[2:]]  # the same arguments through another entry script
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env or train_env(run_dir.parent))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    return line


def test_run_dir_that_is_a_file(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a folder")
    line = one_error_line(launch(tiny_shards, run_dir, *ARGS))
    assert f"run.dir {run_dir}" in line and "--run.dir" in line


def test_manifest_with_null_stats(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "stats": None}))
    line = one_error_line(launch(shards, tmp_path / "run", *ARGS))
    assert str(shards / "manifest.json") in line and "'stats'" in line and "make_shards.py" in line


@pytest.mark.parametrize("full", ["checkpoints", ".best-tmp"])
def test_full_disk_while_saving_names_the_path(tiny_shards, tmp_path, full):
    run_dir = tmp_path / "run"
    env = train_env(tmp_path, FULL_DISK=str(run_dir / full))
    line = one_error_line(launch(tiny_shards, run_dir, *ARGS, env=env,
                                 entry=(sys.executable, "tests/train/_full_disk.py")))
    assert "no space left on device" in line and str(run_dir / full) in line
    # The partial folder is gone (its space is what the next attempt needs) and nothing looks complete.
    if full == "checkpoints":
        assert not list((run_dir / "checkpoints").iterdir())  # neither .tmp-epoch-0001 nor epoch-0001
        assert (run_dir / "best" / "model.safetensors").is_file()  # exported before the checkpoint filled the disk
    else:
        assert not (run_dir / ".best-tmp").exists() and not (run_dir / "best").exists()


def _corrupt_every_jpeg(shards: Path, split: str) -> None:
    """Zero the bytes of every JPEG of `split` in place (sizes and .idx offsets unchanged)."""
    for tar_path in sorted((shards / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            spans = [(m.offset_data, m.size) for m in tar if m.name.endswith(".jpg")]
        with open(tar_path, "r+b") as handle:
            for offset, size in spans:
                handle.seek(offset)
                handle.write(b"\0" * size)


def test_launch_that_failed_before_its_first_epoch_does_not_block_a_fresh_start(tiny_shards, tmp_path):
    bad = tmp_path / "bad-shards"
    shutil.copytree(tiny_shards, bad)
    _corrupt_every_jpeg(bad, "train")
    run_dir = tmp_path / "run"
    failed = launch(bad, run_dir, "--train.epochs=1", "--log.wandb=true")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    failed_id = (run_dir / "wandb_run_id.txt").read_text()  # the failed launch got as far as W&B and metrics
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "config.yaml").exists()

    run_train(tiny_shards, run_dir, "--train.epochs=1", "--log.wandb=true", "--train.resume=never")
    assert (run_dir / "wandb_run_id.txt").read_text() != failed_id  # a new W&B run, not the failed one's
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val/auroc" in r] == [1]
