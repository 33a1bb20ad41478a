"""Chest X-ray folders (Kaggle layout, or DICOM/PNG images named by a labels CSV) or a synthetic set ->
WebDataset shards + DALI indexes + manifest.json.

    python scripts/make_shards.py --src ~/data/chest_xray --out shards/kermany --workers 2
    python scripts/make_shards.py --src ~/data/rsna/stage_2_train_images \
        --labels ~/data/rsna/stage_2_train_labels.csv --preset rsna --out shards/rsna --workers 8
    python scripts/make_shards.py --src ~/data/nih --labels ~/data/nih/Data_Entry_2017_v2020.csv --preset nih14 \
        --out shards/nih14 --workers 8
    python scripts/make_shards.py --src DIR --labels my.csv --path-col file --label-col finding \
        --positive pneumonia --patient-col mrn --out shards/mine
    python scripts/make_shards.py --synthetic 1200 --out shards/synthetic --overwrite --verify

Without `--labels`, `--src` takes the folder that contains `chest_xray/` or `chest_xray/` itself (DICOM files
there are recognised by their preamble, whatever their extension). With `--labels`, `--src` is searched
recursively for the images the CSV names (see `pipelines/make_shards/labels.py`). Exit status: 0 on success,
1 with `--strict` when any input was rejected, 2 for unusable input/output paths or a failed `--verify`.
The stages and the choice of defaults are described in `pipelines/make_shards/__init__.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.make_shards import (  # noqa: E402 - after the path fix so a plain checkout runs too
    DEFAULT_MAX_SIDE,
    DEFAULT_MIN_SHARDS,
    DEFAULT_QUALITY,
    DEFAULT_SHARD_MB,
    format_summary,
    make_shards,
)
from pipelines.make_shards.labels import (  # noqa: E402
    DEFAULT_TEST_FRACTION,
    NIH_OTHER_CHOICES,
    PRESETS,
    LabelSource,
)
from pipelines.make_shards.record import redact_command  # noqa: E402
from pipelines.make_shards.split import LABEL_CONFLICT_CHOICES  # noqa: E402
from pipelines.manifest import ShardsError  # noqa: E402
from pipelines.synthetic import DEFAULT_SYNTHETIC_SIZE  # noqa: E402
from pipelines.verify import verify_shards  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", type=Path, help="Kaggle layout: folder containing chest_xray/, or chest_xray/")
    source.add_argument("--synthetic", type=int, metavar="N", help="generate N procedural chest X-rays instead")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. shards/kermany")
    csv_group = parser.add_argument_group("labels CSV sources (RSNA, NIH ChestX-ray14, your own)")
    csv_group.add_argument("--labels", type=Path, metavar="CSV", help="labels CSV naming the images under --src")
    csv_group.add_argument("--preset", choices=sorted(PRESETS), help="column names and label rule of a public set")
    csv_group.add_argument("--path-col", help="CSV column naming the image (path under --src, name, or stem)")
    csv_group.add_argument("--label-col", help="CSV column holding the label")
    csv_group.add_argument("--positive", metavar="VALUE", help="--label-col value meaning PNEUMONIA (others: NORMAL)")
    csv_group.add_argument("--patient-col", help="CSV column holding the patient id (else a DICOM's PatientID, else "
                           "the file name)")
    csv_group.add_argument("--nih-other", choices=NIH_OTHER_CHOICES, default="exclude",
                           help="nih14: images with findings other than Pneumonia / No Finding are excluded "
                                "(listed in the manifest) or NORMAL")
    csv_group.add_argument("--split-lists", type=Path, metavar="DIR",
                           help="folder with train_val_list.txt and test_list.txt (default: next to the CSV, if there)")
    csv_group.add_argument("--test-fraction", type=float, metavar="F",
                           help="without split lists: share of patients (per class) carved out as test "
                                f"(default {DEFAULT_TEST_FRACTION})")
    parser.add_argument("--patient-salt", metavar="SECRET",
                        help="secret that DICOM/CSV patient ids are hashed with (not recorded); default: a random "
                             "salt recorded in the manifest")
    parser.add_argument("--synthetic-size", type=int, default=DEFAULT_SYNTHETIC_SIZE, metavar="PX",
                        help="approximate side of synthetic images")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, metavar="PX",
                        help="downscale so the longer side is at most PX; 0 keeps full size")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of re-encoded images")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_MB, help="target shard size in MiB")
    parser.add_argument("--min-shards", type=int, default=DEFAULT_MIN_SHARDS,
                        help="at least this many shards per split, so every data-parallel rank gets work")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of train images (by patient, per class) carved out as val")
    carve = parser.add_mutually_exclusive_group()
    carve.add_argument("--carve-val", dest="carve_val", action="store_true", default=None,
                       help="always carve val from train (default: only when the source val has < 100 images)")
    carve.add_argument("--no-carve-val", dest="carve_val", action="store_false", help="keep the source val split")
    parser.add_argument("--seed", type=int, default=0, help="shuffle / split / synthetic seed")
    parser.add_argument("--on-label-conflict", choices=LABEL_CONFLICT_CHOICES, default="drop",
                        help="byte-identical images filed under different classes: keep none of them (drop) or "
                             "the first, train before val before test, then by path (keep-first)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="conversion processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--strict", action="store_true", help="fail (exit 1, write nothing) if any input is rejected")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("--verify", action="store_true", help="run scripts/verify_shards.py on the result")
    return parser.parse_args(argv)


def label_source(args: argparse.Namespace) -> LabelSource | None:
    """The labels-CSV options as one value; None without --labels (an error if any of them is given)."""
    csv_options = {"preset": args.preset, "path_col": args.path_col, "label_col": args.label_col,
                   "patient_col": args.patient_col, "positive": args.positive, "split_lists": args.split_lists,
                   "test_fraction": args.test_fraction}
    if args.labels is None:
        given = [name for name, value in csv_options.items() if value is not None]
        if given:
            raise ShardsError(f"--{given[0].replace('_', '-')} needs --labels CSV (the labels of the images under --src)")
        return None
    return LabelSource(args.labels, nih_other=args.nih_other, **csv_options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = redact_command(["python", "scripts/make_shards.py", *(sys.argv[1:] if argv is None else argv)])
    timings: dict = {}
    try:
        manifest = make_shards(
            args.src, args.out, synthetic=args.synthetic or 0, synthetic_size=args.synthetic_size,
            labels=label_source(args), patient_salt=args.patient_salt,
            max_side=args.max_side, quality=args.quality, shard_mb=args.shard_mb, min_shards=args.min_shards,
            val_fraction=args.val_fraction, carve_val=args.carve_val, seed=args.seed,
            on_label_conflict=args.on_label_conflict, workers=args.workers,
            overwrite=args.overwrite, strict=args.strict, progress=args.progress, command=command,
            timings=timings)
    except ShardsError as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 1 if args.strict and "--strict" in str(exc) else 2
    print(format_summary(manifest, args.out))
    converted = manifest["inputs"]["sharded"] + manifest["inputs"]["rejected"]
    print(f"  took {timings['total']:.1f} s ({converted / max(timings['convert'], 1e-9):.0f} img/s converting with "
          f"{args.workers} worker(s))")
    if args.verify:
        try:
            counts = verify_shards(args.out)
        except ShardsError as exc:
            print(f"make_shards: verify failed: {exc}", file=sys.stderr)
            return 2
        print(f"verified: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
