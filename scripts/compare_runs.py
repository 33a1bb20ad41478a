"""Compare training runs: the config keys that differ, key results, and val AUROC / train loss curves.

    python scripts/compare_runs.py runs/baseline runs/lr3e-4 [--split test] [--out compare_runs.png]
    python scripts/compare_runs.py --wandb ENTITY/PROJECT [--group G] [--tag T] [--out compare_runs.png]

Local run directories always work offline: each needs `config.yaml`, `metrics.jsonl` and `summary.json`
(written by `train/run.py`), and `eval-<split>/report.json` when it was evaluated (`python -m eval.run`).
`--wandb` reads the same information through the W&B API (needs the network and `wandb login`).
Prints two markdown tables (also written with `--markdown PATH`) and writes a PNG overlaying the curves.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train.config import flatten  # noqa: E402  (needs the repo on sys.path when run as a script)

REQUIRED_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
REQUIRED_SUMMARY = ("best_val_auroc", "best_epoch", "wall_time_s", "images_per_sec")
MISSING = "—"


class RunDirError(ValueError):
    """A run directory that lacks what a comparison needs; the message names the missing pieces."""


@dataclass
class RunRecord:
    name: str
    config: dict[str, Any]  # flat, dotted keys
    summary: dict[str, Any]
    val_auroc: list[tuple[float, float]] = field(default_factory=list)  # (epoch, value)
    train_loss: list[tuple[float, float]] = field(default_factory=list)  # (step, value)
    test: dict[str, Any] | None = None  # report.json "metrics" section when evaluated


# --- loading --------------------------------------------------------------------------------------------


def _curves(rows: list[dict]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    val = [(r["epoch"], r["val/auroc"]) for r in rows if r.get("val/auroc") is not None and "epoch" in r]
    loss = [(r["step"], r["train/loss"]) for r in rows if r.get("train/loss") is not None and "step" in r]
    return val, loss


def _read_mapping(path: Path, parse, fix: str) -> dict:
    """A JSON/YAML file that must hold a mapping; any other content is a RunDirError naming the file and `fix`."""
    try:
        value = parse(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunDirError(f"{path} is unreadable ({why}); {fix}") from exc
    if not isinstance(value, dict):
        raise RunDirError(f"{path} holds {type(value).__name__}, not a mapping; {fix}")
    return value


def load_local_run(run_dir: str | Path, split: str = "test") -> RunRecord:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    missing = [name for name in REQUIRED_FILES if not (run_dir / name).is_file()]
    if missing:
        hint = " (summary.json is written when training finishes: did it crash or is it still running?)" \
            if "summary.json" in missing else ""
        raise RunDirError(f"run directory {run_dir} is incomplete: missing {', '.join(missing)}{hint}")
    config = _read_mapping(run_dir / "config.yaml", yaml.safe_load,
                           f"it is the resolved config train/run.py writes; restore it from {run_dir / 'best' / 'config.yaml'}")
    summary = _read_mapping(run_dir / "summary.json", json.loads,
                            "train/run.py writes it when training finishes; relaunch the run's training command "
                            "(it resumes, trains nothing more and rewrites it)")
    absent = [k for k in REQUIRED_SUMMARY if k not in summary]
    if absent:
        raise RunDirError(f"{run_dir / 'summary.json'} is incomplete: missing keys {', '.join(absent)}")
    rows = []
    for number, line in enumerate((run_dir / "metrics.jsonl").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{run_dir / 'metrics.jsonl'} line {number} is not JSON ({exc.msg})") from exc
    val, loss = _curves(rows)
    if not val:
        raise RunDirError(f"{run_dir / 'metrics.jsonl'} has no val/auroc entries: no epoch finished validation")
    test = None
    report_path = run_dir / f"eval-{split}" / "report.json"
    if report_path.is_file():
        test = json.loads(report_path.read_text())["metrics"]
    return RunRecord(run_dir.name, flatten(config), summary, val, loss, test)


def load_wandb_runs(path: str, group: str | None, tag: str | None, split: str = "test") -> list[RunRecord]:
    """Training runs of ENTITY/PROJECT (filtered by group/tag), joined with their `job_type=eval` runs."""
    import wandb

    filters: list[dict] = []
    if group:
        filters.append({"group": group})
    if tag:
        filters.append({"tags": {"$in": [tag]}})
    runs = list(wandb.Api().runs(path, filters={"$and": filters} if filters else {}))
    evals = {}
    for run in runs:
        if run.job_type == "eval" and run.config.get("eval", {}).get("split") == split:
            evals[run.config["eval"].get("source_run")] = run
    records = []
    for run in runs:
        if run.job_type == "eval":
            continue
        val = [(r["epoch"], r["val/auroc"]) for r in run.scan_history(keys=["epoch", "val/auroc"])]
        loss = [(r["_step"], r["train/loss"]) for r in run.scan_history(keys=["_step", "train/loss"])]
        if not val:
            raise RunDirError(f"W&B run {path}/{run.id} ({run.name}) has no val/auroc history")
        best_epoch, best = max(val, key=lambda ev: ev[1])
        summary = {
            "best_val_auroc": best,
            "best_epoch": best_epoch,
            # train/run.py's end-of-run summary (summary/*) is the same quantity as a local summary.json;
            # the last logged window and the W&B runtime are only fallbacks for runs that did not finish.
            "wall_time_s": run.summary.get("summary/wall_time_s", run.summary.get("_runtime")),
            "images_per_sec": run.summary.get("summary/images_per_sec", run.summary.get("perf/images_per_sec")),
        }
        test = None
        eval_run = evals.get(run.name)
        if eval_run is not None:
            s = eval_run.summary
            test = {m: {"value": s.get(f"{split}/{m}"), "ci95": [s.get(f"{split}/{m}_ci_low"), s.get(f"{split}/{m}_ci_high")]}
                    for m in ("accuracy", "auroc")}
        config = {k: v for k, v in flatten(dict(run.config)).items() if not k.startswith("_")}
        records.append(RunRecord(run.name, config, summary, val, loss, test))
    if not records:
        raise RunDirError(f"no training runs in W&B project {path} (group={group}, tag={tag})")
    return records


# --- tables and plot ------------------------------------------------------------------------------------


def differing_keys(records: list[RunRecord]) -> list[str]:
    keys = sorted(set().union(*(r.config for r in records)))
    return [k for k in keys if len({json.dumps(r.config.get(k, MISSING), sort_keys=True) for r in records}) > 1]


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return format(value, fmt)


def _with_ci(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return MISSING
    lo, hi = entry.get("ci95") or (None, None)
    if lo is None or hi is None:
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_tables(records: list[RunRecord], split: str = "test") -> str:
    names = [r.name for r in records]
    lines = ["## Config differences", ""]
    diff = differing_keys(records)
    if diff:
        lines += ["| key | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for key in diff:
            cells = [str(r.config.get(key, MISSING)) for r in records]
            lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    else:
        lines.append("All runs have the same config.")
    lines += [
        "",
        "## Results",
        "",
        f"| run | best val AUROC (epoch) | {split} accuracy [95% CI] | {split} AUROC [95% CI] | images/s | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        s = r.summary
        best = f"{_num(s.get('best_val_auroc'), '.4f')} ({s.get('best_epoch', MISSING)})"
        test = r.test or {}
        acc = _with_ci(test.get("accuracy")) if r.test else "not evaluated"
        auc = _with_ci(test.get("auroc")) if r.test else "not evaluated"
        lines.append(f"| {r.name} | {best} | {acc} | {auc} | {_num(s.get('images_per_sec'), '.1f')} | "
                     f"{_num(s.get('wall_time_s'), '.1f')} |")
    return "\n".join(lines) + "\n"


def plot_curves(records: list[RunRecord], path: str | Path) -> None:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_auc, ax_loss = fig.subplots(1, 2)
    for r in records:
        if r.val_auroc:
            epochs, values = zip(*r.val_auroc, strict=True)
            ax_auc.plot(epochs, values, marker="o", label=r.name)
        if r.train_loss:
            steps, values = zip(*r.train_loss, strict=True)
            ax_loss.plot(steps, values, label=r.name)
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation AUROC")
    ax_auc.set_title("Validation AUROC")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Training loss")
    for ax in (ax_auc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


# --- entry point ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="local run directories (train/run.py --run.dir)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs through the W&B API instead")
    parser.add_argument("--group", help="with --wandb: only runs of this group")
    parser.add_argument("--tag", help="with --wandb: only runs with this tag")
    parser.add_argument("--split", default="test", help="evaluated split to report (eval-<split>/report.json)")
    parser.add_argument("--out", default="compare_runs.png", help="PNG of val AUROC and train loss curves")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.wandb):
        parser.error("give either run directories or --wandb ENTITY/PROJECT (not both, not neither)")
    if (args.group or args.tag) and not args.wandb:
        parser.error("--group and --tag filter W&B runs; they need --wandb ENTITY/PROJECT")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.wandb:
            records = load_wandb_runs(args.wandb, args.group, args.tag, args.split)
        else:
            records = [load_local_run(path, args.split) for path in args.runs]
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len({r.name for r in records}) < len(records):
        for r, path in zip(records, args.runs or [r.name for r in records], strict=True):
            r.name = str(path)
    tables = markdown_tables(records, args.split)
    print(tables, end="")
    if args.markdown:
        Path(args.markdown).write_text(tables)
    plot_curves(records, args.out)
    print(f"\ncurves: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
