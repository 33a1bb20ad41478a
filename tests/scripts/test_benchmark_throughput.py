"""scripts/benchmark_throughput.py end to end at tiny sizes: every mode runs, the JSON holds what the docs promise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _wandb_offline import offline_run_summary
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "benchmark_throughput.py"
TINY = ["--device", "cpu", "--arch", "mobilenet_v3_small", "--image-size", "32", "--num-workers", "1"]


def _run(args: list[str], tmp_path: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_SILENT"] = "true"
    # One intra-op thread: on a shared 2-core box, OpenMP barriers with a descheduled thread stall a step for
    # seconds; the test checks what the report holds, not how fast this machine is.
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def kaggle_dir(tmp_path) -> Path:
    """A tiny Kaggle-layout folder (train/NORMAL, train/PNEUMONIA) for the seed-style ImageFolder baseline."""
    rng = np.random.default_rng(0)
    for label in ("NORMAL", "PNEUMONIA"):
        folder = tmp_path / "kaggle" / "train" / label
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).save(folder / f"img{i}.jpeg")
    return tmp_path / "kaggle"


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_all_modes_report(tiny_shards, kaggle_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["--what", "all", *TINY, "--batch-size", "4", "--steps", "1", "--warmup", "1", "--repeats", "2",
                 "--shards", str(tiny_shards), "--src", str(kaggle_dir), "--json", str(out)], tmp_path)
    report = json.loads(out.read_text())
    results = report["results"]

    assert report["what"] == "all" and report["device"]["type"] == "cpu"
    assert report["host"]["cpu_count"] >= 1 and report["host"]["cpu_model"]
    assert report["versions"]["torch"] and report["versions"]["nvidia.dali"]
    assert "--what all" in report["command"]
    # tiny_shards are synthetic, not made from kaggle_dir: the report must say the ratios compare different images.
    assert any("compare different images" in note for note in report["notes"])

    loaders = [r for r in results if r["mode"] == "loader"]
    models = [r for r in results if r["mode"] == "model"]
    trains = [r for r in results if r["mode"] == "train"]
    assert [r["loader"] for r in loaders] == ["dali", "torch", "imagefolder"]
    # The CPU default grid (a small torchvision model keeps the test fast): fp32 only, both layouts, eager only.
    assert [(r["precision"], r["memory_format"], r["compile"]) for r in models] == [
        ("fp32", "nchw", "eager"), ("fp32", "channels_last", "eager")]
    assert [r["loader"] for r in trains] == ["dali"]
    assert len(results) == 6, "train reuses the matching model row instead of measuring a second reference"

    for r in results:
        assert _positive(r["images_per_sec"]) and _positive(r["peak_host_rss_mb"]), r
        assert r["peak_gpu_mb"] is None
        assert len(r["images_per_sec_repeats"]) == 2 and all(map(_positive, r["images_per_sec_repeats"]))
        assert min(r["images_per_sec_repeats"]) <= r["images_per_sec"] <= max(r["images_per_sec_repeats"])
        assert r["config"] in proc.stdout
    for r in models + trains:
        assert r["images"] == 4 * 1 and math.isfinite(r["final_loss"])
    # Loader windows: --steps batches of 4 after the warm-up.
    assert all(r["images"] == 4 for r in loaders)

    baseline = loaders[2]["images_per_sec"]
    assert loaders[2]["ratio_to_baseline"] == 1.0
    for r in loaders[:2]:
        assert r["ratio_to_baseline"] == pytest.approx(r["images_per_sec"] / baseline, abs=2e-3)
    assert models[0]["ratio_to_baseline"] == 1.0  # fp32 NCHW eager is the seed notebook's setting
    assert models[1]["ratio_to_baseline"] == pytest.approx(
        models[1]["images_per_sec"] / models[0]["images_per_sec"], abs=2e-3)

    train = trains[0]
    assert train["model_images_per_sec"] == models[1]["images_per_sec"]
    assert train["data_stall_frac"] == pytest.approx(1 - train["images_per_sec"] / models[1]["images_per_sec"],
                                                     abs=1e-3)
    assert 0 <= train["host_wait_frac"] < 1


def test_model_bf16_grid_profile_and_wandb_table(tmp_path):
    out, wandb_dir, profile_dir = tmp_path / "model.json", tmp_path / "wb", tmp_path / "profile"
    _run(["--what", "model", *TINY, "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "1",
          "--precisions", "bf16", "--formats", "channels_last", "--wandb", "--wandb-dir", str(wandb_dir),
          "--profile", str(profile_dir), "--json", str(out)], tmp_path)
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert (row["precision"], row["memory_format"], row["compile"]) == ("bf16", "channels_last", "eager")
    assert row["ratio_to_baseline"] is None, "no fp32 NCHW eager row to compare with"
    assert _positive(row["images_per_sec"]) and math.isfinite(row["final_loss"])
    trace = json.loads(Path(row["profile"]).read_text())
    assert Path(row["profile"]).parent == profile_dir
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    # An explicit grid is not the CPU default, so no note claims bf16 was skipped.
    assert not any("bf16 autocast" in note for note in report["notes"])

    summary, run_info = offline_run_summary(wandb_dir)
    assert run_info["job_type"] == "benchmark"
    assert summary[f"model/{row['config']}/images_per_sec"] == row["images_per_sec"]
    (table_file,) = Path(report["wandb_run_dir"]).glob("files/media/table/**/*.table.json")
    table = json.loads(table_file.read_text())
    assert table["data"] == [["model", row["config"], row["images_per_sec"], None, None,
                              row["peak_host_rss_mb"], None]]


def test_bad_arguments_are_clear_errors(tmp_path):
    proc = _run(["--what", "model", "--device", "cpu", "--precisions", "fp16"], tmp_path, check=False)
    assert proc.returncode != 0 and "fp16" in proc.stderr and "fp32, bf16" in proc.stderr
    missing = tmp_path / "no-shards"
    proc = _run(["--what", "train", "--device", "cpu", "--train-shards", str(missing), "--loaders", "dali"],
                tmp_path, check=False)
    assert proc.returncode != 0 and str(missing) in proc.stderr
    proc = _run(["--what", "loader", "--device", "cpu", "--src", str(missing), "--loaders", "imagefolder"],
                tmp_path, check=False)
    assert proc.returncode != 0 and str(missing) in proc.stderr
