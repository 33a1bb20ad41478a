"""Stage 6, manifest: the run's plain results -> `manifest.json` contents, and the summary the CLI prints."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from pipelines.make_shards.scan import Entry, Scan
from pipelines.make_shards.split import patient_overlap
from pipelines.manifest import LABELS, MANIFEST_VERSION


def build_command(src, out, options: dict) -> list[str]:
    """The CLI call that rebuilds this dataset (recorded in the manifest)."""
    command = ["python", "scripts/make_shards.py"]
    command += ["--synthetic", str(options["synthetic"])] if options["synthetic"] else ["--src", str(src)]
    command += ["--out", str(out)]
    for name, value in options.items():
        if name in ("synthetic", "progress", "command", "workers", "patient_salt") or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            command += [flag] if value else []
        else:
            command += [flag, str(value)]
    return command


def redact_command(argv: list[str]) -> list[str]:
    """`argv` with the value of `--patient-salt` (a secret: it would undo the hashing) replaced."""
    redacted, hide = [], False
    for arg in argv:
        if hide:
            redacted.append("<secret>")
        elif arg.startswith("--patient-salt="):
            redacted.append("--patient-salt=<secret>")
        else:
            redacted.append(arg)
        hide = arg == "--patient-salt"
    return redacted


def split_record(members: list[Entry], shards: list[dict]) -> dict:
    return {
        "samples": len(members),
        "per_class": {name: sum(e.label == i for e in members) for i, name in enumerate(LABELS)},
        "per_subtype": dict(sorted(Counter(e.subtype for e in members).items())),
        "patients": len({e.patient for e in members}),
        "shards": shards,
    }


def pixel_stats(histograms: dict[str, np.ndarray]) -> dict | None:
    """Pixel mean/std in [0, 1] of the train split (of all splits when there is no train image)."""
    stats_split = "train" if histograms.get("train", np.zeros(1)).sum() else None
    histogram = histograms["train"] if stats_split else sum(histograms.values(), np.zeros(256, np.int64))
    count = histogram.sum()
    if not count:
        return None
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean = float((histogram * levels).sum() / count)
    var = float((histogram * levels**2).sum() / count) - mean**2
    return {"mean": round(mean, 6), "std": round(math.sqrt(max(var, 0.0)), 6), "pixels": int(count),
            "split": stats_split or "all"}


def build_manifest(*, command: list[str], options: dict, inputs: Scan, members: dict[str, list[Entry]],
                   shards: dict[str, list[dict]], histograms: dict[str, np.ndarray], passthrough: int,
                   rejected: list[dict], duplicates: list[dict], label_conflicts: list[dict],
                   warnings: list[dict], patients: dict | None) -> dict:
    """The manifest; raises `AssertionError` if an input is not accounted for exactly once.

    The input files are the scan's entries, skipped and excluded; `missing` (a labels CSV's rows naming no
    file) are listed apart. `warnings` are sharded inputs with a note; `patients` says where patient ids
    came from and how they were hashed (`patients.pseudonymize`)."""
    split_info = {split: split_record(members[split], shards[split]) for split in members}
    rejected = sorted(rejected, key=lambda r: r["path"])
    skipped, excluded = inputs.skipped, sorted(inputs.excluded, key=lambda r: r["path"])
    num_inputs = len(inputs.entries) + len(skipped) + len(excluded)
    removed = sum(len(d["removed"]) for d in duplicates)
    conflicting = sum(len(c["files"]) - (c["kept"] is not None) for c in label_conflicts)
    sharded = sum(info["samples"] for info in split_info.values())
    if sharded + len(rejected) + len(skipped) + len(excluded) + removed + conflicting != num_inputs:
        raise AssertionError(f"accounting bug: {sharded} sharded + {len(rejected)} rejected + {len(skipped)} "
                             f"skipped + {len(excluded)} excluded + {removed} duplicates + {conflicting} label "
                             f"conflicts != {num_inputs} inputs")
    return {
        "version": MANIFEST_VERSION,
        "labels": list(LABELS),
        "command": command,
        "args": dict(options),
        "source": inputs.source,
        "label_source": inputs.label_source,
        "splits": split_info,
        "stats": pixel_stats(histograms),
        "inputs": {"files": num_inputs, "sharded": sharded, "rejected": len(rejected), "skipped": len(skipped),
                   "excluded": len(excluded), "duplicates_removed": removed, "label_conflicts_removed": conflicting,
                   "passthrough": passthrough, "missing": len(inputs.missing), "warnings": len(warnings)},
        "patients": patients,
        "patient_overlap": patient_overlap([e for split in members.values() for e in split]),
        "rejected": rejected,
        "skipped": skipped,
        "excluded": excluded,
        "missing": inputs.missing,
        "warnings": sorted(warnings, key=lambda w: w["path"]),
        "duplicates": duplicates,
        "label_conflicts": label_conflicts,
    }


def format_summary(manifest: dict, out: Path | str) -> str:
    """Human summary printed by the CLI."""
    lines = [f"shards: {out}  (source: {manifest['source']})"]
    for split, info in manifest["splits"].items():
        classes = ", ".join(f"{name} {count}" for name, count in info["per_class"].items())
        lines.append(f"  {split:5s} {info['samples']:6d} samples ({classes}); {info['patients']} patients; "
                     f"{len(info['shards'])} shards, {sum(s['bytes'] for s in info['shards']) / 2**20:.1f} MiB")
    counts = manifest["inputs"]
    lines.append(f"  inputs {counts['files']}: sharded {counts['sharded']} ({counts['passthrough']} passed through), "
                 f"rejected {counts['rejected']}, skipped {counts['skipped']}, excluded {counts['excluded']}, "
                 f"duplicates removed {counts['duplicates_removed']}, label conflicts removed "
                 f"{counts['label_conflicts_removed']}")
    source = manifest["label_source"]
    if source:
        lines.append(f"  labels {source['csv']}: {source['rows']} rows, {source['listed_images']} images listed, "
                     f"{source['missing']} missing (no such file), {source['unlisted']} files not listed; split: "
                     + (f"official lists in {source['split_lists']}" if source["split_lists"] else
                        f"by patient, test fraction {source['test_fraction']}"))
        for reason, count in source["excluded"].items():
            lines.append(f"    excluded {count}: {reason}")
    for kind in ("rejected", "warnings"):
        for record in manifest[kind][:10]:
            lines.append(f"    {kind[:-1] if kind == 'warnings' else kind} {record['path']}: "
                         f"{record.get('reason') or record.get('warning')}")
        if len(manifest[kind]) > 10:
            lines.append(f"    ... {len(manifest[kind]) - 10} more {kind} in manifest.json")
    if manifest["patients"] and manifest["patients"]["hashed"]:
        lines.append(f"  patient ids: {manifest['patients']['hashed']} hashed ({manifest['patients']['rule']}), "
                     f"{manifest['patients']['distinct']} distinct, salt {manifest['patients']['salt_from']}")
    for conflict in manifest["label_conflicts"][:10]:
        files = ", ".join(f"{f['path']} ({f['label']})" for f in conflict["files"])
        lines.append(f"    label conflict, identical bytes: {files}; "
                     f"{'kept ' + conflict['kept'] if conflict['kept'] else 'none kept'}")
    if len(manifest["label_conflicts"]) > 10:
        lines.append(f"    ... {len(manifest['label_conflicts']) - 10} more label conflicts in manifest.json")
    if manifest["patient_overlap"]:
        lines.append(f"  note: patient ids shared between official splits: {manifest['patient_overlap']}")
    if manifest["stats"]:
        lines.append(f"  pixel mean {manifest['stats']['mean']:.4f} std {manifest['stats']['std']:.4f} "
                     f"({manifest['stats']['split']})")
    return "\n".join(lines)
