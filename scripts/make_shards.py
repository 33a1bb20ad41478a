"""Kaggle chest-X-ray folders (or a synthetic set) -> WebDataset shards + DALI indexes + manifest.json.

    python scripts/make_shards.py --src ~/data/chest_xray --out shards/kermany --workers 2
    python scripts/make_shards.py --synthetic 1200 --out shards/synthetic --overwrite
    python scripts/make_shards.py --synthetic 1200 --out shards/synthetic --overwrite --verify

`--src` takes the folder that contains `chest_xray/` or `chest_xray/` itself. Exit status: 0 on success,
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = ["python", "scripts/make_shards.py", *(sys.argv[1:] if argv is None else argv)]
    timings: dict = {}
    try:
        manifest = make_shards(
            args.src, args.out, synthetic=args.synthetic or 0, synthetic_size=args.synthetic_size,
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
