"""Throughput of make_shards (images/s) for 1 and 2 workers, re-encoding at the default max side and passing through.

    python scripts/benchmark_make_shards.py --src ../shared/data/kermany-originals-sample --json bench/make_shards.json
    python scripts/benchmark_make_shards.py --synthetic 200 --workers 1 2 --repeats 1   # when no real data is present
    python scripts/benchmark_make_shards.py --dicom 300 --dicom-size 2048 --workers 2 --repeats 1 \
        --scratch /tmp --json bench/make_shards-dicom.json

Each cell runs a whole `make_shards` call into a scratch folder, after an untimed warm-up (imports, page
cache), and reports the best of `--repeats` runs twice: end to end (scan, hash, convert, write tars, index,
manifest, worker start-up) and for the convert stage alone (decode, validate, resize, encode: the part that
scales with workers and with dataset size; the end-to-end figure on 240 images is dominated by fixed costs). "pass-through" is `--max-side 0`: grayscale JPEGs are copied byte for byte, the rest
re-encoded at full size. Issue target: >= 250 img/s with 2 workers at the default max side, >= 1.7x from 1 to 2.

`--dicom N` first writes N synthetic 16-bit MONOCHROME1 DX files (`pipelines.synthetic.encode_synthetic_dicom`,
uncompressed, about `--dicom-size` px, ~8 MiB each at 2048 px) and an RSNA-style labels CSV under
`--scratch` (untimed), then times `make_shards --labels ... --preset rsna` on them: DICOM parse, Modality
LUT, window, MONOCHROME1 inversion, 8-bit mapping, resize and JPEG encode. Only the re-encode mode is run
(a DICOM is never passed through).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.make_shards import DEFAULT_MAX_SIDE, LabelSource, make_shards  # noqa: E402 - after the path fix
from pipelines.synthetic import SyntheticItem, encode_synthetic_dicom  # noqa: E402

MODES = {"re-encode": DEFAULT_MAX_SIDE, "pass-through": 0}


def write_dicom_set(folder: Path, count: int, size: int) -> LabelSource:
    """`count` synthetic DICOMs as `<folder>/images/<id>.dcm` and an RSNA-style CSV naming them."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(count):
        image_id, label = f"dicom-{index:06d}", int(index % 4 != 0)  # Kermany-like: a quarter NORMAL
        item = SyntheticItem(index, "train", label, f"patient-{index // 2}", "bacteria" if label else "none", image_id)
        (folder / "images" / f"{image_id}.dcm").write_bytes(encode_synthetic_dicom(item, size=size))
        rows.append(f"{image_id},{label}")
    (folder / "labels.csv").write_text("patientId,Target\n" + "\n".join(rows) + "\n")
    return LabelSource(folder / "labels.csv", preset="rsna")


def time_run(src: Path | None, synthetic: int, synthetic_size: int, max_side: int, workers: int,
             scratch: Path, labels: LabelSource | None = None) -> tuple[float, dict]:
    out = scratch / f"bench-{max_side}-{workers}"
    timings: dict = {}
    manifest = make_shards(src, out, synthetic=synthetic, synthetic_size=synthetic_size, labels=labels,
                           max_side=max_side, workers=workers, overwrite=True, progress=False, timings=timings)
    shutil.rmtree(out)
    return timings, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", type=Path, help="Kaggle-layout folder, e.g. ../shared/data/kermany-originals-sample")
    source.add_argument("--synthetic", type=int, metavar="N", help="benchmark on N synthetic images instead")
    source.add_argument("--dicom", type=int, metavar="N", help="benchmark on N synthetic 16-bit DICOM files instead")
    parser.add_argument("--synthetic-size", type=int, default=1000, metavar="PX")
    parser.add_argument("--dicom-size", type=int, default=2048, metavar="PX")
    parser.add_argument("--scratch", type=Path, default=None, help="where to write the scratch files (default: $TMPDIR)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cell; the best is kept")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.src is not None:
        if not args.src.is_dir():
            print(f"benchmark: {args.src} does not exist; pass --src with the Kaggle layout or use --synthetic N",
                  file=sys.stderr)
            return 2
        for path in args.src.rglob("*"):
            if path.is_file():
                path.read_bytes()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-make-shards-", dir=args.scratch) as scratch:
        src, labels, modes = args.src, None, MODES
        if args.dicom:
            src, modes = Path(scratch) / "dicom" / "images", {"re-encode": DEFAULT_MAX_SIDE}
            labels = write_dicom_set(Path(scratch) / "dicom", args.dicom, args.dicom_size)
            for path in src.iterdir():  # into the page cache, as --src is above
                path.read_bytes()
        # Untimed warm-up: the first call pays one-off imports (webdataset pulls in torch, ~2 s).
        make_shards(None, Path(scratch) / "warm-up", synthetic=60, synthetic_size=64, min_shards=1, progress=False)
        for mode, max_side in modes.items():
            for workers in args.workers:
                runs = [time_run(src, args.synthetic or 0, args.synthetic_size, max_side, workers, Path(scratch),
                                 labels) for _ in range(args.repeats)]
                manifest = runs[0][1]
                total = min(t["total"] for t, _ in runs)
                convert = min(t["convert"] for t, _ in runs)
                inputs = manifest["inputs"]["sharded"] + manifest["inputs"]["rejected"]
                results.append({"mode": mode, "max_side": max_side, "workers": workers, "images": inputs,
                                "rejected": manifest["inputs"]["rejected"],
                                "passthrough": manifest["inputs"]["passthrough"], "seconds": round(total, 3),
                                "images_per_sec": round(inputs / total, 1), "convert_seconds": round(convert, 3),
                                "convert_images_per_sec": round(inputs / convert, 1)})
    print(f"{'mode':13s} {'max side':>8s} {'workers':>7s} {'images':>6s} {'passed':>6s} {'total s':>8s} "
          f"{'img/s':>7s} {'convert s':>9s} {'conv img/s':>10s} {'speed-up':>8s}")
    for row in results:
        base = next(r for r in results if r["mode"] == row["mode"] and r["workers"] == min(args.workers))
        row["speedup_vs_min_workers"] = round(row["images_per_sec"] / base["images_per_sec"], 2)
        row["convert_speedup_vs_min_workers"] = round(row["convert_images_per_sec"] / base["convert_images_per_sec"], 2)
        print(f"{row['mode']:13s} {row['max_side']:8d} {row['workers']:7d} {row['images']:6d} {row['passthrough']:6d} "
              f"{row['seconds']:8.2f} {row['images_per_sec']:7.1f} {row['convert_seconds']:9.2f} "
              f"{row['convert_images_per_sec']:10.1f} {row['convert_speedup_vs_min_workers']:7.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"source": str(args.src) if args.src else
                  f"synthetic 16-bit DICOM {args.dicom} @ {args.dicom_size}px" if args.dicom else
                  f"synthetic {args.synthetic} @ {args.synthetic_size}px",
                  "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                  "results": results}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
