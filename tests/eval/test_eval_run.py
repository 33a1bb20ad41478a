"""`python -m eval.run` end to end on a smoke-trained run, one and two ranks, W&B offline."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from _runs import REPO, run_train
from _runs import train_env as offline_env
from _wandb_offline import offline_run_summary
from PIL import Image

from eval import calibration as C
from eval import metrics as M
from eval import report as R
from pipelines.make_shards import make_shards
from pipelines.manifest import sha256_file

pytestmark = pytest.mark.slow
TORCHRUN = Path(sys.executable).parent / "torchrun"


def run_eval(run_dir: Path, *args: str, tmp: Path, ranks: int = 1, **env_extra: str) -> subprocess.CompletedProcess:
    env = offline_env(tmp, **env_extra)
    if ranks == 1:
        cmd = [sys.executable, "-m", "eval.run", "--run", str(run_dir), *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [str(TORCHRUN), "--nproc_per_node", str(ranks), "-m", "eval.run", "--run-dir", str(run_dir), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_eval_run_writes_a_report_that_predictions_reproduce(smoke_run, tmp_path):
    result = run_eval(smoke_run, "--split", "test", "--tta", "--wandb", "true", "--bootstrap", "300", tmp=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = smoke_run / "eval-test"
    for name in ("report.json", "report.md", "predictions.csv", "val_predictions.csv", "val_shifted_predictions.csv",
                 "confusion_matrix.png",
                 "roc_curve.png", "pr_curve.png", "reliability_diagram.png", "gradcam_grid.png", "model_card.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((Path(report["provenance"]["shards"]) / "manifest.json").read_text())
    assert report["samples"] == manifest["splits"]["test"]["samples"]  # every test image, once

    # The threshold is the one Youden's J picks on the saved validation predictions, clean and shifted
    # pooled (the default rule), applied to test; the transfer table compares the rules on held-out patients.
    val = R.read_predictions_csv(out / "val_predictions.csv")
    val_shifted = R.read_predictions_csv(out / "val_shifted_predictions.csv")
    assert len(val["keys"]) == manifest["splits"]["val"]["samples"] and val_shifted["keys"] == val["keys"]
    assert not np.allclose(val["probs"], val_shifted["probs"])
    assert report["threshold"]["method"] == "youden" and report["threshold"]["chosen_on"] == "val+val-shifted"
    assert report["threshold"]["value"] == M.select_threshold(np.r_[val["labels"], val_shifted["labels"]],
                                                              np.r_[val["probs"], val_shifted["probs"]])["threshold"]
    assert set(report["threshold"]["transfer"]["rules"]) == {"val", "val-shifted", "val+val-shifted"}
    assert "| val+val-shifted (used) |" in (out / "report.md").read_text()

    test = R.read_predictions_csv(out / "predictions.csv")
    again = R.build_report(test["keys"], test["labels"], test["probs"], split="test",
                           threshold=report["threshold"]["value"], threshold_info={}, metadata=test["metadata"],
                           n_resamples=report["bootstrap"]["resamples"], seed=report["bootstrap"]["seed"],
                           tta_probs=test["tta_probs"])
    for section in ("metrics", "confusion", "subtypes"):
        assert json.loads(json.dumps(R._finite_or_none(again[section]))) == report[section], section
    assert json.loads(json.dumps(R._finite_or_none(again["tta"]["metrics"]))) == report["tta"]["metrics"]
    assert set(report["subtypes"]) <= {"bacteria", "virus"} and report["subtypes"]
    assert report["provenance"]["sha256"]["model"] == sha256_file(smoke_run / "best" / "model.safetensors")
    assert report["provenance"]["sha256"]["manifest"] == sha256_file(Path(report["provenance"]["shards"]) / "manifest.json")
    # The model's own shards: no evaluated sample (test, nor val for the threshold) was a training sample.
    data = report["provenance"]["data"]
    assert data["same_shards"] and data["valid"] and data["in_training_split"] == {"test": 0, "val": 0}
    assert "WARNING" not in (out / "report.md").read_text()

    # Calibration chosen and fitted on the saved validation predictions only, and saved as the run's operating point.
    refit = C.fit_on_validation(val["labels"], val["probs"])
    assert report["calibration"]["method"] == refit["method"]
    for key in ("slope", "intercept", "temperature"):
        assert report["calibration"][key] == pytest.approx(refit[key]), key
    np.testing.assert_allclose(test["calibrated_probs"], C.apply_calibration(test["probs"], report["calibration"]))
    point = json.loads((smoke_run / "calibration.json").read_text())
    assert point["threshold"] == report["threshold"]["value"]
    assert {k: point["calibration"][k] for k in ("method", "slope", "intercept", "temperature")} == \
        {k: report["calibration"][k] for k in ("method", "slope", "intercept", "temperature")}
    assert point["model_sha256"] == report["provenance"]["sha256"]["model"] and point["source"]["split"] == "val+val-shifted"
    assert f"{report['calibration']['test']['ece']['before']:.4f}" in (out / "model_card.md").read_text()

    for name in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png", "reliability_diagram.png", "gradcam_grid.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.size[0] > 300 and image.size[1] > 300
    assert "| AUROC |" in (out / "report.md").read_text()

    summary, run_info = offline_run_summary(tmp_path)
    assert run_info["job_type"] == "eval" and run_info["project"] == "cxr-pipeline"
    assert summary["test/threshold"] == report["threshold"]["value"]
    assert summary["test/tp"] == report["confusion"]["tp"] and summary["test/samples"] == report["samples"]
    for key in ("accuracy", "recall", "specificity", "f1", "pr_auc"):
        if report["metrics"][key]["value"] is not None:
            assert summary[f"test/{key}"] == pytest.approx(report["metrics"][key]["value"]), key
    logged = {k.rsplit("/", 1)[0] for k in summary}  # media and tables are summarised as <key>/<field>
    assert {"test/roc_curve_png", "test/pr_curve_png", "test/confusion_matrix_png", "test/gradcam_grid_png",
            "test/reliability_diagram_png", "test/predictions",
            "test/roc_table", "test/pr_table", "test/confusion_matrix_table"} <= logged


def test_two_ranks_give_the_same_report_as_one(smoke_run, tmp_path):
    args = ["--split", "test", "--wandb", "false", "--bootstrap", "200", "--loader", "torch", "--num-workers", "0"]
    one = run_eval(smoke_run, *args, "--out", str(tmp_path / "one"), tmp=tmp_path)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = run_eval(smoke_run, *args, "--out", str(tmp_path / "two"), tmp=tmp_path, ranks=2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert b["provenance"]["world_size"] == 2 and a["provenance"]["world_size"] == 1
    # Per-sample outputs may differ in the last float bits (other batch compositions); the metrics may not.
    assert a["threshold"]["value"] == pytest.approx(b["threshold"]["value"], abs=1e-6)
    assert a["threshold"]["validation"] == b["threshold"]["validation"]
    for section in ("samples", "metrics", "confusion", "subtypes"):
        assert a[section] == b[section], section
    pa = R.read_predictions_csv(tmp_path / "one" / "predictions.csv")
    pb = R.read_predictions_csv(tmp_path / "two" / "predictions.csv")
    assert pa["keys"] == pb["keys"] and len(set(pb["keys"])) == len(pb["keys"])
    np.testing.assert_allclose(pa["probs"], pb["probs"], rtol=0, atol=1e-6)


def _operating_point_bytes(run_dir: Path) -> bytes | None:
    path = run_dir / "calibration.json"
    return path.read_bytes() if path.is_file() else None


def test_fixed_threshold_on_val_split(smoke_run, tmp_path):
    before = _operating_point_bytes(smoke_run)
    # In the precision training validated in (bf16 where the CPU has native bf16), as `accelerate launch` sets it.
    trained_in = json.loads((smoke_run / "summary.json").read_text())["mixed_precision"]
    result = run_eval(smoke_run, "--split", "val", "--threshold", "0.5", "--wandb", "false", "--bootstrap", "50",
                      "--out", str(tmp_path / "val"), tmp=tmp_path, ACCELERATE_MIXED_PRECISION=trained_in)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "val" / "report.json").read_text())
    assert report["threshold"] == {"value": 0.5, "method": "fixed"}
    preds = R.read_predictions_csv(tmp_path / "val" / "predictions.csv")
    assert report["confusion"]["tp"] == int(((preds["probs"] >= 0.5) & (preds["labels"] == 1)).sum())
    # The best model reproduces the validation AUROC training logged for its epoch.
    meta = json.loads((smoke_run / "best" / "meta.json").read_text())
    assert report["metrics"]["auroc"]["value"] == pytest.approx(meta["val_metrics"]["val/auroc"], abs=1e-6)
    # A fixed threshold is not chosen on validation: the run's operating point is left as it was.
    assert _operating_point_bytes(smoke_run) == before
    assert report["calibration"]["temperature"] > 0 and "calibrated_probs" in preds


def test_val_shifted_split_reproduces_what_training_logged(smoke_run, tmp_path):
    trained_in = json.loads((smoke_run / "summary.json").read_text())["mixed_precision"]
    result = run_eval(smoke_run, "--split", "val-shifted", "--threshold-on", "val", "--wandb", "false",
                      "--bootstrap", "50", tmp=tmp_path, ACCELERATE_MIXED_PRECISION=trained_in)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = smoke_run / "eval-val-shifted"
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "val-shifted" and report["provenance"]["shift"]["seed"] == 0
    logged = json.loads((smoke_run / "best" / "meta.json").read_text())["val_metrics"]
    # The threshold comes from the clean val split (Youden's J), as training chose it for that epoch ...
    assert report["threshold"]["chosen_on"] == "val"
    assert report["threshold"]["value"] == pytest.approx(logged["val/youden_threshold"], abs=1e-6)
    # ... and the shifted images are the ones training validated on: same AUROC and operating point.
    assert report["metrics"]["auroc"]["value"] == pytest.approx(logged["val_shifted/auroc"], abs=1e-6)
    assert report["metrics"]["recall"]["value"] == pytest.approx(logged["val_shifted/sensitivity"], abs=1e-6)
    assert report["metrics"]["specificity"]["value"] == pytest.approx(logged["val_shifted/specificity"], abs=1e-6)
    clean = R.read_predictions_csv(out / "val_predictions.csv")
    shifted = R.read_predictions_csv(out / "predictions.csv")
    assert clean["keys"] == shifted["keys"] and not np.allclose(clean["probs"], shifted["probs"])


def test_missing_best_model_is_a_clear_error(tmp_path, tiny_shards):
    run_dir = tmp_path / "untrained"
    (run_dir / "best").mkdir(parents=True)
    (run_dir / "best" / "config.yaml").write_text("{}\n")
    result = run_eval(run_dir, "--shards", str(tiny_shards), tmp=tmp_path)
    assert result.returncode == 2
    assert "lacks model.safetensors, meta.json" in result.stderr and "train/run.py" in result.stderr


def test_compare_runs_on_two_smoke_runs(smoke_run, tiny_shards, tmp_path):
    if not (smoke_run / "eval-test" / "report.json").is_file():
        result = run_eval(smoke_run, "--wandb", "false", "--bootstrap", "50", tmp=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    other = tmp_path / "lr3e-4"
    run_train(tiny_shards, other, "--train.epochs=1", "--optim.lr=3e-4", "--log.wandb=false")
    png = tmp_path / "compare.png"
    result = subprocess.run([sys.executable, "scripts/compare_runs.py", str(smoke_run), str(other), "--out", str(png)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    diff = {line.split("|")[1].strip(" `") for line in result.stdout.splitlines() if line.startswith("| `")}
    assert {"optim.lr", "train.epochs", "run.dir"} <= diff and "model.arch" not in diff
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| smoke |", "| lr3e-4 |"))]
    assert len(rows) == 2 and "not evaluated" in rows[1] and "not evaluated" not in rows[0]
    with Image.open(png) as image:
        image.load()


def test_val_threshold_needs_both_classes_in_val():
    from argparse import Namespace

    from eval.run import EvalError, choose_threshold

    one_class = (["val-0", "val-1"], np.array([0.2, 0.7]), np.array([1, 1]), None)
    with pytest.raises(EvalError, match="one class only.*--threshold 0.5"):
        choose_threshold(Namespace(threshold="val", threshold_on="val", target_sensitivity=None), one_class,
                         one_class, ["p0", "p1"])
    both = (["val-0", "val-1", "val-2"], np.array([0.2, 0.7, 0.9]), np.array([0, 1, 1]), None)
    shifted = (both[0], np.array([0.75, 0.8, 0.95]), both[2], None)
    value, info = choose_threshold(Namespace(threshold="val", threshold_on="val", target_sensitivity=1.0), both,
                                   shifted, ["p0", "p1", "p2"])
    assert value == 0.7 and info["method"] == "sensitivity" and info["validation"]["recall"] == 1.0
    # Pooled with the shifted predictions, the most specific threshold reaching sensitivity 1 is still 0.7
    # (it clears the clean NORMAL at 0.2 but not the shifted one at 0.75), and both conditions are reported.
    value, info = choose_threshold(Namespace(threshold="val", threshold_on="val+val-shifted", target_sensitivity=1.0),
                                   both, shifted, ["p0", "p1", "p2"])
    assert value == 0.7 and info["chosen_on"] == "val+val-shifted"
    assert info["validation"]["specificity"] == 1.0 and info["validation_shifted"]["specificity"] == 0.0
    assert set(info["transfer"]["rules"]) <= {"val", "val-shifted", "val+val-shifted"}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    return line


def stored_jpegs(shards: Path, split: str) -> dict[str, tuple[bytes, dict]]:
    """key -> (stored JPEG bytes, sample json), straight from the tars (no project reader)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    samples: dict[str, dict] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / shard["tar"]) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {key: (parts["jpg"], json.loads(parts["json"])) for key, parts in samples.items()}


def rebuild_with_another_seed(shards: Path, tmp: Path) -> Path:
    """The same images re-sharded with another seed: train and val pooled and val carved anew by patient."""
    src = tmp / "src" / "chest_xray"
    for split, target in (("train", "train"), ("val", "train"), ("test", "test")):
        for jpeg, meta in stored_jpegs(shards, split).values():
            path = src / target / meta["label_name"] / Path(meta["source"]).name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg)
    out = tmp / "rebuilt"
    make_shards(src, out, seed=7, carve_val=True, min_shards=2, progress=False)
    return out


def test_other_shards_are_refused_then_counted_by_content(smoke_run, tiny_shards, tmp_path):
    meta = json.loads((smoke_run / "best" / "meta.json").read_text())
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert meta["data"]["manifest_sha256"] == summary["manifest_sha256"] == sha256_file(tiny_shards / "manifest.json")
    for split in ("train", "val"):
        keys = "\n".join(sorted(stored_jpegs(tiny_shards, split))).encode()
        assert meta["data"]["splits"][split]["keys_sha256"] == summary[f"{split}_keys_sha256"] == hashlib.sha256(keys).hexdigest()
    rebuilt = rebuild_with_another_seed(tiny_shards, tmp_path)
    trained = {hashlib.sha256(jpeg).hexdigest() for jpeg, _ in stored_jpegs(tiny_shards, "train").values()}
    rebuilt_val = stored_jpegs(rebuilt, "val")
    leaked = sum(hashlib.sha256(jpeg).hexdigest() in trained for jpeg, _ in rebuilt_val.values())
    assert leaked > 0, "the rebuild should carve some training images into val"
    assert not set(rebuilt_val) & set(stored_jpegs(tiny_shards, "train"))  # comparing keys would find none

    args = ("--shards", str(rebuilt), "--split", "val", "--threshold", "0.5", "--wandb", "false", "--bootstrap", "20")
    refused = run_eval(smoke_run, *args, "--out", str(tmp_path / "refused"), tmp=tmp_path)
    line = one_error_line(refused)
    assert str(rebuilt / "manifest.json") in line and "--allow-other-shards" in line
    assert not (tmp_path / "refused").exists()

    allowed = run_eval(smoke_run, *args, "--allow-other-shards", "--out", str(tmp_path / "other"), tmp=tmp_path)
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    data = json.loads((tmp_path / "other" / "report.json").read_text())["provenance"]["data"]
    assert not data["same_shards"] and data["allow_other_shards"]
    assert data["in_training_split"] == {"val": leaked} and not data["valid"]
    markdown = (tmp_path / "other" / "report.md").read_text()
    assert markdown.startswith("> **WARNING") and f"{leaked} val sample(s)" in markdown.splitlines()[0]
    assert "NOT A VALID EVALUATION" in allowed.stdout and "NOT A VALID EVALUATION" in allowed.stderr


def test_damaged_best_model_is_a_clear_error(smoke_run, tiny_shards, tmp_path):
    run_dir = tmp_path / "copied"
    shutil.copytree(smoke_run / "best", run_dir / "best")
    weights = run_dir / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = one_error_line(run_eval(run_dir, "--shards", str(tiny_shards), "--wandb", "false", tmp=tmp_path))
    assert str(weights) in line and "damaged" in line


def test_manifest_with_null_stats(smoke_run, tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "stats": None}))
    args = ("--shards", str(shards), "--allow-other-shards", "--threshold", "0.5", "--wandb", "false",
            "--bootstrap", "20")
    # Evaluation normalises with the training shards' stats, kept in best/meta.json: these shards' are not needed.
    ok = run_eval(smoke_run, *args, "--out", str(tmp_path / "ok"), tmp=tmp_path)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    data = json.loads((tmp_path / "ok" / "report.json").read_text())["provenance"]["data"]
    assert data["valid"] and not data["same_shards"]
    # A best/ without that spec has nowhere to take the normalisation from.
    old = tmp_path / "old"
    shutil.copytree(smoke_run / "best", old / "best")
    meta = json.loads((old / "best" / "meta.json").read_text())
    (old / "best" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "spec"}))
    line = one_error_line(run_eval(old, *args, tmp=tmp_path))
    assert str(shards / "manifest.json") in line and "'stats'" in line
