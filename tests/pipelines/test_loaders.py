"""build_loader: choice and reason, errors, and the 2-rank contract under torchrun."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _shard_truth import split_labels

from pipelines.loaders import build_loader
from pipelines.manifest import ShardsError, load_manifest
from pipelines.shards import read_index
from pipelines.spec import PreprocessSpec

REPO = Path(__file__).resolve().parents[2]


def test_auto_picks_dali_and_says_why(tiny_shards):
    spec = PreprocessSpec.from_manifest(tiny_shards, image_size=32)
    auto = build_loader(tiny_shards, "val", spec=spec, per_device_batch_size=4, train=False)
    assert auto.name == "dali" and "nvidia-dali" in auto.reason and "CPU" in auto.reason
    forced = build_loader(tiny_shards, "val", spec=spec, per_device_batch_size=4, train=False, loader="torch")
    assert forced.name == "torch" and "requested" in forced.reason
    assert auto.num_samples == forced.num_samples == len(split_labels(tiny_shards, "val"))
    assert len(auto) == len(forced)


def test_bad_arguments_and_missing_data(tiny_shards, tmp_path):
    spec = PreprocessSpec()
    with pytest.raises(ShardsError, match=rf"(?s){tmp_path / 'none'}.*make_shards.py"):
        build_loader(tmp_path / "none", "train", spec=spec, per_device_batch_size=4, train=True)
    with pytest.raises(ShardsError, match="no split 'holdout'"):
        build_loader(tiny_shards, "holdout", spec=spec, per_device_batch_size=4, train=False)
    with pytest.raises(ValueError, match="loader must be"):
        build_loader(tiny_shards, "val", spec=spec, per_device_batch_size=4, train=False, loader="ffcv")


@pytest.mark.parametrize("loader", ["dali", "torch"])
@pytest.mark.parametrize("bad", [b"7", b"x"])
def test_label_outside_the_classes_names_shard_and_key(tiny_shards, tmp_path, loader, bad):
    """Before: "7" became label 7 (an IndexError in the loss, naming nothing) and "x" a bare ValueError."""
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    shard = load_manifest(copy)["splits"]["val"]["shards"][0]
    ext, offset, size = read_index(copy / shard["index"])[1][0]  # the second sample's .cls
    assert (ext, size) == ("cls", 1)
    with open(copy / shard["tar"], "r+b") as handle:
        handle.seek(offset)
        handle.write(bad)
    spec = PreprocessSpec.from_manifest(copy, image_size=32)
    built = build_loader(copy, "val", spec=spec, per_device_batch_size=2, train=False, loader=loader, num_workers=1)
    with pytest.raises(ShardsError, match=rf"sample val-00000001 in shard \S*{shard['tar']} has \.cls "
                                          rf"'{bad.decode()}', expected 0 \(NORMAL\) or 1 \(PNEUMONIA\)"):
        list(built)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_two_ranks_disjoint_train_equal_batches_exactly_once_eval(tiny_shards, tmp_path, loader):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                           str(REPO / "tests/pipelines/_two_rank_worker.py"), str(tiny_shards), loader, str(tmp_path)],
                          env=env, cwd=REPO, timeout=240, capture_output=True, text=True)
    assert done.returncode == 0, f"two-rank worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["name"] for r in ranks} == {loader}
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"] == ranks[0]["train_len"] > 0
    assert not set(ranks[0]["train_keys"]) & set(ranks[1]["train_keys"])
    assert ranks[0]["eval_len"] == ranks[1]["eval_len"]
    truth = split_labels(tiny_shards, "test")
    # Exactly once after the gather, on every rank, with the right labels; test has 7 samples
    # (3 + 4 over 2 ranks, batches of 3), so rank 0 ends on a filler duplicate and rank 1 on a partial batch.
    assert len(truth) % 2 == 1
    for r in ranks:
        assert r["gathered_keys"] == sorted(truth)
        assert r["gathered_labels"] == [truth[k] for k in sorted(truth)]
    assert set(ranks[0]["eval_keys"]) | set(ranks[1]["eval_keys"]) == set(truth)


def test_benchmark_script_writes_results(tiny_shards, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "scripts/benchmark_throughput.py"), "--what", "loader",
                    "--loaders", "dali,torch", "--shards", str(tiny_shards), "--split", "val", "--image-size", "32",
                    "--batch-size", "2", "--num-workers", "1", "--device", "cpu", "--json", str(out)],
                   check=True, cwd=REPO, timeout=120, capture_output=True)
    report = json.loads(out.read_text())
    assert [r["loader"] for r in report["results"]] == ["dali", "torch"]
    # val has 8 samples, batches of 2, one warm-up batch: 6 timed images.
    assert all(r["images"] == 6 and r["images_per_sec"] > 0 for r in report["results"])
    assert report["versions"]["nvidia.dali"] and "--what loader" in report["command"]
