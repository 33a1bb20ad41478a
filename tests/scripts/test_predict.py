"""scripts/predict.py end to end on the smoke run: eval parity, Grad-CAM files, bad inputs, the operating point."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from _runs import REPO, train_env
from PIL import Image

from eval import calibration as C
from eval import inference as I
from eval import report as R
from pipelines.manifest import sha256_file
from pipelines.plan import resolve_split

pytestmark = pytest.mark.slow


def run_script(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=train_env(tmp))


def predict(run_dir: Path, out: Path, *inputs, extra=(), tmp: Path) -> subprocess.CompletedProcess:
    return run_script("scripts/predict.py", "--run", str(run_dir), "--out", str(out), "--cpu", *extra,
                      *map(str, inputs), tmp=tmp)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def shard_jpegs(shards: Path, split: str, folder: Path) -> dict[str, Path]:
    """Write a split's JPEGs, byte for byte, as <key>.jpeg files: images that are also in the shards."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for sample in wds.WebDataset([str(t) for t in resolve_split(shards, split).tars], shardshuffle=False,
                                 empty_check=False):
        out[sample["__key__"]] = folder / f"{sample['__key__']}.jpeg"
        out[sample["__key__"]].write_bytes(sample["jpg"])
    return out


def copy_run(run_dir: Path, to: Path) -> Path:
    """best/ only: a run that was never evaluated (no calibration.json)."""
    shutil.copytree(run_dir / "best", to / "best")
    return to


def test_predict_matches_eval_and_writes_cams(smoke_run, tiny_shards, tmp_path):
    evaluated = run_script("-m", "eval.run", "--run", str(smoke_run), "--split", "test", "--loader", "torch",
                           "--num-workers", "0", "--wandb", "false", "--bootstrap", "20", "--out", str(tmp_path / "eval"),
                           tmp=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    files = shard_jpegs(tiny_shards, "test", tmp_path / "images")
    # Another batch size than eval's (8): batch composition must not matter beyond float noise.
    result = predict(smoke_run, tmp_path / "out", tmp_path / "images", extra=("--cam", "--batch-size", "3"), tmp=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = {Path(r["path"]).stem: r for r in read_csv(tmp_path / "out" / "predictions.csv")}
    expected = R.read_predictions_csv(tmp_path / "eval" / "predictions.csv")
    assert sorted(rows) == sorted(expected["keys"]) == sorted(files)
    ours = np.array([float(rows[k]["probability"]) for k in expected["keys"]])
    diff = np.abs(ours - expected["probs"]).max()
    assert diff <= 1e-5, f"predict.py and eval.run differ by {diff:.2e}"

    # The call uses the threshold eval.run chose on validation; calibrated: that run's calibration map.
    point = json.loads((smoke_run / "calibration.json").read_text())
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert point["threshold"] == report["threshold"]["value"]
    for key, prob in zip(expected["keys"], ours, strict=True):
        assert rows[key]["call"] == ("PNEUMONIA" if prob >= point["threshold"] else "NORMAL")
        assert float(rows[key]["threshold"]) == point["threshold"]
    calibrated = np.array([float(rows[k]["calibrated_probability"]) for k in expected["keys"]])
    np.testing.assert_allclose(calibrated, C.apply_calibration(ours, point["calibration"]), atol=1e-6)
    np.testing.assert_allclose(calibrated, expected["calibrated_probs"], atol=1e-5)
    assert f"{len(files)} predicted" in result.stdout and expected["keys"][0] in result.stdout
    assert C.describe_calibration(point["calibration"]) in result.stdout

    size = json.loads((smoke_run / "best" / "meta.json").read_text())["spec"]["image_size"]
    for row in rows.values():
        with Image.open(tmp_path / "out" / row["cam"]) as cam:
            assert cam.size == (size, size) and cam.mode == "RGB"


def test_bad_inputs_are_listed_and_never_stop_the_batch(smoke_run, tiny_shards, tmp_path):
    good = next(iter(shard_jpegs(tiny_shards, "val", tmp_path / "val").values()))
    folder = tmp_path / "inputs"
    folder.mkdir()
    gray = np.asarray(Image.open(good))
    Image.fromarray(gray.astype(np.uint16) * 200).save(folder / "sixteen_bit.png")  # I;16: windowed, not clipped
    Image.fromarray(gray).convert("RGBA").save(folder / "rgba.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.jpeg").write_bytes(good.read_bytes()[:200])
    (folder / "readme.txt").write_text("a stray file in the folder")
    result = predict(smoke_run, tmp_path / "out", good, folder, tmp_path / "missing.jpeg", str(tmp_path / "none" / "*.png"),
                     extra=("--threshold", "0.5"), tmp=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    predicted = [Path(r["path"]).name for r in read_csv(tmp_path / "out" / "predictions.csv")]
    assert sorted(predicted) == sorted([good.name, "rgba.png", "sixteen_bit.png"])
    reasons = {Path(r["path"]).name: r["reason"] for r in read_csv(tmp_path / "out" / "skipped.csv")}
    assert set(reasons) == {"notes.png", "empty.jpg", "cut.jpeg", "readme.txt", "missing.jpeg", "*.png"}
    assert "not a decodable image" in reasons["notes.png"] and "zero-byte" in reasons["empty.jpg"]
    assert "truncated" in reasons["cut.jpeg"] and "no such file" in reasons["missing.jpeg"]
    assert "matches no file" in reasons["*.png"] and "not a" in reasons["readme.txt"]
    assert "6 skipped" in result.stdout and "cut.jpeg" in result.stdout

    nothing = predict(smoke_run, tmp_path / "none-out", folder / "notes.png", tmp_path / "missing.jpeg",
                      extra=("--threshold", "0.5"), tmp=tmp_path)
    assert nothing.returncode == 1 and "no image could be predicted" in nothing.stderr
    assert len(read_csv(tmp_path / "none-out" / "skipped.csv")) == 2


def test_operating_point_is_refitted_for_another_model_and_needed_without_validation(smoke_run, tiny_shards, tmp_path):
    image = next(iter(shard_jpegs(tiny_shards, "val", tmp_path / "val").values()))
    run = copy_run(smoke_run, tmp_path / "copy")
    stale = {"version": I.OPERATING_POINT_VERSION, "threshold": 0.0, "model_sha256": "0" * 64, "source": {"split": "val"},
             "calibration": C.temperature_map(9.0)}
    (run / "calibration.json").write_text(json.dumps(stale))
    result = predict(run, tmp_path / "out", image, tmp=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "belongs to another best model" in result.stdout
    point = json.loads((run / "calibration.json").read_text())
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert point["model_sha256"] == sha256_file(run / "best" / "model.safetensors")
    assert point["source"]["split"] == "val+val-shifted"  # eval.run's default rule
    assert point["calibration"]["val"]["samples"] == manifest["splits"]["val"]["samples"]
    assert 0.0 < point["threshold"] < 1.0 and point["calibration"]["temperature"] != 9.0
    assert float(read_csv(tmp_path / "out" / "predictions.csv")[0]["threshold"]) == point["threshold"]

    # Without calibration.json and without the shards: a --threshold is needed, and nothing is calibrated.
    lost = copy_run(smoke_run, tmp_path / "lost")
    config = yaml.safe_load((lost / "best" / "config.yaml").read_text())
    config["data"]["shards"] = str(tmp_path / "moved-away")
    (lost / "best" / "config.yaml").write_text(yaml.safe_dump(config))
    refused = predict(lost, tmp_path / "refused", image, tmp=tmp_path)
    assert refused.returncode == 2 and "calibration.json" in refused.stderr and "--threshold" in refused.stderr
    allowed = predict(lost, tmp_path / "allowed", image, extra=("--threshold", "0.3"), tmp=tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    row = read_csv(tmp_path / "allowed" / "predictions.csv")[0]
    assert row["calibrated_probability"] == "" and float(row["threshold"]) == 0.3
    assert row["call"] == ("PNEUMONIA" if float(row["probability"]) >= 0.3 else "NORMAL")
