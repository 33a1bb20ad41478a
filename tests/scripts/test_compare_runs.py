"""scripts/compare_runs.py on run directories that follow the train/run.py contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from train.config import load_config, save_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "compare_runs.py"


def write_run(run_dir: Path, overrides: list[str], aurocs: list[float], *, images_per_sec: float, evaluated: bool) -> Path:
    """A run directory as train/run.py leaves it: config.yaml, metrics.jsonl, summary.json [, eval-test/]."""
    run_dir.mkdir(parents=True)
    save_config(load_config(None, [*overrides, f"--run.dir={run_dir}"]), run_dir / "config.yaml")
    rows, step = [], 0
    for epoch, auc in enumerate(aurocs):
        for _ in range(3):
            step += 1
            rows.append({"step": step, "epoch": epoch, "train/loss": 1.0 / step, "train/lr": 1e-3})
        rows.append({"step": step, "epoch": epoch, "val/auroc": auc, "val/loss": 0.5, "perf/images_per_sec": images_per_sec})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best_epoch = max(range(len(aurocs)), key=aurocs.__getitem__)
    summary = {"best_val_auroc": aurocs[best_epoch], "best_epoch": best_epoch, "wall_time_s": 12.5,
               "images_per_sec": images_per_sec, "steps": step}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if evaluated:
        (run_dir / "eval-test").mkdir()
        metrics = {"accuracy": {"value": 0.875, "ci95": [0.8, 0.93]}, "auroc": {"value": 0.9123, "ci95": [0.85, 0.96]}}
        (run_dir / "eval-test" / "report.json").write_text(json.dumps({"metrics": metrics}))
    return run_dir


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_two_runs_list_differing_keys_results_and_write_png(tmp_path):
    a = write_run(tmp_path / "base", ["--optim.lr=0.001"], [0.7, 0.81, 0.78], images_per_sec=250.0, evaluated=True)
    b = write_run(tmp_path / "fast", ["--optim.lr=0.0003", "--data.image_size=128"], [0.6, 0.65, 0.9],
                  images_per_sec=410.0, evaluated=False)
    png, md = tmp_path / "cmp.png", tmp_path / "cmp.md"
    result = run_script(a, b, "--out", png, "--markdown", md)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out == md.read_text() + f"\ncurves: {png}\n"
    diff_rows = {line.split("|")[1].strip(" `"): line for line in out.splitlines() if line.startswith("| `")}
    assert set(diff_rows) == {"optim.lr", "data.image_size", "run.dir"}
    assert "0.001" in diff_rows["optim.lr"] and "0.0003" in diff_rows["optim.lr"]
    results = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith(("| base", "| fast"))}
    assert "0.8100 (1)" in results["base"] and "0.912 [0.850, 0.960]" in results["base"] and "250.0" in results["base"]
    assert "0.9000 (2)" in results["fast"] and "not evaluated" in results["fast"] and "410.0" in results["fast"]
    with Image.open(png) as image:
        assert image.size[0] > 500 and image.size[1] > 200


def test_incomplete_run_dir_names_what_is_missing(tmp_path):
    good = write_run(tmp_path / "good", [], [0.7], images_per_sec=1.0, evaluated=False)
    broken = write_run(tmp_path / "broken", [], [0.7], images_per_sec=1.0, evaluated=False)
    (broken / "summary.json").unlink()
    (broken / "metrics.jsonl").unlink()
    result = run_script(good, broken, "--out", tmp_path / "x.png")
    assert result.returncode == 2
    assert "broken is incomplete: missing metrics.jsonl, summary.json" in result.stderr
    assert not (tmp_path / "x.png").exists()

    (broken / "metrics.jsonl").write_text("")
    (broken / "summary.json").write_text(json.dumps({"best_val_auroc": 0.7}))
    result = run_script(good, broken, "--out", tmp_path / "x.png")
    assert result.returncode == 2 and "missing keys best_epoch, wall_time_s, images_per_sec" in result.stderr

    result = run_script(good, tmp_path / "nope")
    assert result.returncode == 2 and "nope does not exist" in result.stderr


@pytest.mark.parametrize(("name", "text"), [
    ("summary.json", '{"best_val_auroc": 0.7,'),  # cut off mid-write
    ("summary.json", "[0.7]"),
    ("config.yaml", "optim: {lr: [0.001\n"),
    ("config.yaml", "- not a mapping\n"),
])
def test_unreadable_summary_or_config_is_one_line(tmp_path, name, text):
    good = write_run(tmp_path / "good", [], [0.7], images_per_sec=1.0, evaluated=False)
    bad = write_run(tmp_path / "bad", [], [0.7], images_per_sec=1.0, evaluated=False)
    (bad / name).write_text(text)
    result = run_script(good, bad, "--out", tmp_path / "x.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert str(bad / name) in line
    assert not (tmp_path / "x.png").exists()


def test_arguments_are_checked():
    result = run_script()
    assert result.returncode == 2 and "either run directories or --wandb" in result.stderr
    result = run_script("runs/x", "--group", "g")
    assert result.returncode == 2 and "need --wandb" in result.stderr


def test_identical_configs_say_so(tmp_path):
    a = write_run(tmp_path / "a", [], [0.5, 0.6], images_per_sec=1.0, evaluated=False)
    b = tmp_path / "b"
    b.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        (b / name).write_bytes((a / name).read_bytes())
    result = run_script(a, b, "--out", tmp_path / "c.png")
    assert result.returncode == 0, result.stderr
    assert "All runs have the same config." in result.stdout


class _FakeRun:
    def __init__(self, name, job_type, config, summary, history=()):
        self.name, self.id, self.job_type, self.config, self.summary = name, f"id-{name}", job_type, config, summary
        self._history = list(history)

    def scan_history(self, keys):
        return [{k: row[k] for k in keys} for row in self._history if all(k in row for k in keys)]


def test_wandb_source_pairs_training_and_eval_runs(monkeypatch, tmp_path):
    """The --wandb path against a stand-in for wandb.Api (no network here): filters, pairing, tables."""
    import importlib.util

    import wandb

    spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
    compare_runs = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "compare_runs", compare_runs)  # dataclasses resolve their module by name
    spec.loader.exec_module(compare_runs)
    history = [{"_step": 1, "train/loss": 0.9}, {"_step": 2, "epoch": 1, "val/auroc": 0.8, "train/loss": 0.7},
               {"_step": 4, "epoch": 2, "val/auroc": 0.75}]
    runs = [
        _FakeRun("a", "train", {"optim": {"lr": 1e-3}, "_wandb": {"x": 1}}, {"_runtime": 30.0, "perf/images_per_sec": 99.0}, history),
        _FakeRun("b", "train", {"optim": {"lr": 3e-4}}, {"_runtime": 40.0}, history[1:]),
        _FakeRun("a-eval-test", "eval", {"optim": {"lr": 1e-3}, "eval": {"split": "test", "source_run": "a"}},
                 {"test/accuracy": 0.9, "test/accuracy_ci_low": 0.85, "test/accuracy_ci_high": 0.95, "test/auroc": 0.97}),
    ]
    seen = {}

    class FakeApi:
        def runs(self, path, filters):
            seen.update(path=path, filters=filters)
            return runs

    monkeypatch.setattr(wandb, "Api", FakeApi)
    records = compare_runs.load_wandb_runs("me/cxr", "sweep1", "r50")
    assert seen == {"path": "me/cxr", "filters": {"$and": [{"group": "sweep1"}, {"tags": {"$in": ["r50"]}}]}}
    assert [r.name for r in records] == ["a", "b"]
    assert records[0].summary["best_val_auroc"] == 0.8 and records[0].summary["best_epoch"] == 1
    assert records[0].train_loss == [(1, 0.9), (2, 0.7)] and "_wandb.x" not in records[0].config
    tables = compare_runs.markdown_tables(records)
    assert "| `optim.lr` | 0.001 | 0.0003 |" in tables
    assert "| a | 0.8000 (1) | 0.900 [0.850, 0.950] | 0.970 | 99.0 | 30.0 |" in tables
    assert "| b | 0.8000 (1) | not evaluated | not evaluated | — | 40.0 |" in tables
    compare_runs.plot_curves(records, tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 0
