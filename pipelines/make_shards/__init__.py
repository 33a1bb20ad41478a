"""Chest X-ray folders (or a synthetic set) -> verified WebDataset shards + DALI indexes + manifest.

Library behind `python scripts/make_shards.py --src PATH/chest_xray --out shards/kermany` (see that script
for the options). `make_shards` chains one small module per stage, each returning plain data:

1. `scan`: `chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png,dcm,dicom}` (case-insensitive;
   folders differing only in case are merged); hidden and non-image files, FIFOs, sockets and devices (never
   opened) and unknown folders go to `skipped`. Or `labels.scan_labelled` (`--labels CSV`): the images a
   labels CSV names anywhere under `--src` (RSNA, NIH ChestX-ray14 or explicit columns), with official split
   lists when there are some; listed images a rule leaves out go to `excluded`, unlisted files to `skipped`,
   rows naming no file to `missing`;
2. `convert.hash_inputs`: hash every image (sha256) and read DICOM PatientIDs; unreadable and zero-byte
   files go to `rejected`; then `patients.pseudonymize`: ids from DICOM headers and CSVs become salted hashes;
3. `split`: byte-identical copies are kept once (train before val before test, then by path) and the rest
   listed in `duplicates`; copies with different labels are `label_conflicts` (none kept by default);
   official splits are kept; a labels CSV without split lists gets a test split carved **by patient**; when
   the source val split is missing or tiny (Kaggle's has 16 images) it is merged into train and a val split
   is carved from train by patient, per class; each split is put in a seeded shuffled order;
4. `convert.convert_all`, in parallel: decode and validate (DICOM by its preamble, whatever the name: see
   `dicom` for the display conventions), 8-bit single channel, longer side <= `max_side` (JPEG draft/DCT
   scaling first), EXIF orientation applied, JPEG `quality`; grayscale JPEGs that need no resize and carry
   no orientation tag are passed through byte for byte. Failures go to `rejected`;
5. `write`: `<split>/<split>-NNNNNN.tar` with `webdataset.TarWriter` (fixed mtime, so reruns are
   byte-identical; for DICOM/CSV patient ids also the same `--patient-salt`) and a DALI `.idx` next to each
   (DALI's own `wds2idx` code);
6. `record`: `manifest.json` with counts, hashes and the train pixel mean/std; `output` publishes
   atomically (everything is written to `<out>.tmp-<pid>` and renamed at the end) and decides what
   `--overwrite` may replace: only a folder of this tool's own files, never the source.

Why `max_side` defaults to 512: training reads 224 px random-resized crops; a crop covering 35 % of the
image area at 224 px needs about 224 / sqrt(0.35) ~ 380 px of source, so 512 px keeps the pixels every
crop scale actually uses (and a 2x margin for 224 px eval resizing), while JPEG decode cost grows with
area: a 512 px image decodes ~4x faster than a 1,000 px one and ~16-30x faster than Kermany's 2,000-
2,900 px originals, and shrinks the dataset ~10x. Use `--max-side 0` to keep full resolution.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from pipelines.make_shards import convert, output, patients, record, split, write
from pipelines.make_shards.convert import DEFAULT_MAX_SIDE, DEFAULT_QUALITY
from pipelines.make_shards.labels import LabelSource, scan_labelled
from pipelines.make_shards.record import format_summary
from pipelines.make_shards.scan import scan_inputs
from pipelines.make_shards.write import DEFAULT_MIN_SHARDS, DEFAULT_SHARD_MB
from pipelines.manifest import MANIFEST_NAME, ShardsError
from pipelines.synthetic import DEFAULT_SYNTHETIC_SIZE

__all__ = ["DEFAULT_MAX_SIDE", "DEFAULT_MIN_SHARDS", "DEFAULT_QUALITY", "DEFAULT_SHARD_MB", "LabelSource",
           "format_summary", "make_shards"]


class _Laps:
    """Wall seconds per stage, filled into the caller's `timings` dict."""

    def __init__(self, into: dict):
        self.into, self.started = into, time.perf_counter()
        self.clock = self.started

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.into[stage] = round(now - self.clock, 4)
        self.clock = now

    def total(self) -> None:
        self.into["total"] = round(time.perf_counter() - self.started, 4)


def _check_options(src, synthetic: int, labels: LabelSource | None, max_side: int, quality: int, shard_mb: float,
                   min_shards: int, val_fraction: float, on_label_conflict: str) -> None:
    if (src is None) == (not synthetic):
        raise ShardsError("give exactly one of --src PATH (Kaggle chest_xray layout, or images + --labels CSV) or "
                          "--synthetic N")
    if labels is not None and synthetic:
        raise ShardsError("--labels goes with --src DIR (the images it names), not --synthetic")
    test_fraction = labels.test_fraction if labels is not None and labels.test_fraction is not None else 0
    if max_side < 0 or not 1 <= quality <= 100 or shard_mb <= 0 or min_shards < 1 or not 0 <= val_fraction < 1 \
            or not 0 <= test_fraction < 1:
        raise ShardsError(f"invalid options: max_side={max_side} (>= 0), quality={quality} (1-100), "
                          f"shard_mb={shard_mb} (> 0), min_shards={min_shards} (>= 1), val_fraction={val_fraction} "
                          f"([0, 1)), test_fraction={test_fraction} ([0, 1))")
    if on_label_conflict not in split.LABEL_CONFLICT_CHOICES:
        raise ShardsError(f"invalid option: on_label_conflict={on_label_conflict!r}, expected one of "
                          f"{', '.join(split.LABEL_CONFLICT_CHOICES)}")


def _options(labels: LabelSource | None, patient_salt: str | None, **options) -> dict:
    """The options the manifest records (`args`); a given patient salt is a secret and is not recorded."""
    source = {name: str(value) if isinstance(value, Path) else value
              for name, value in (asdict(labels) if labels is not None else {}).items()}
    source["labels"] = source.pop("csv", None)
    return {**options, **source, "patient_salt": "given (not recorded)" if patient_salt is not None else None}


def make_shards(src: Path | None, out: Path, *, synthetic: int = 0, synthetic_size: int = DEFAULT_SYNTHETIC_SIZE,
                labels: LabelSource | None = None, patient_salt: str | None = None,
                max_side: int = DEFAULT_MAX_SIDE, quality: int = DEFAULT_QUALITY, shard_mb: float = DEFAULT_SHARD_MB,
                min_shards: int = DEFAULT_MIN_SHARDS, val_fraction: float = 0.1, carve_val: bool | None = None,
                seed: int = 0, on_label_conflict: str = "drop", workers: int = 1, overwrite: bool = False,
                strict: bool = False, progress: bool = True, command: list[str] | None = None,
                timings: dict | None = None) -> dict:
    """Convert `src` (Kaggle layout, or with `labels` the images a labels CSV names) or `synthetic` generated
    images into shards under `out`; return the manifest.

    `carve_val`: None carves val from train by patient when the source val split is missing or has fewer
    than 100 images; True always does; False never does. `on_label_conflict`: byte-identical images with
    different labels are listed in `label_conflicts` and none of them is kept ("drop"), or the copy the
    duplicate rule keeps is ("keep-first"). `patient_salt`: the secret that patient ids from DICOM headers
    and label CSVs are hashed with (see `patients`); None draws one and records it. Raises `ShardsError` for
    unusable input or output paths (see `output` for what `overwrite` may replace), and with `strict` when
    any input was rejected (nothing is written then). `timings`, when given, is filled with wall seconds
    per stage (`scan`, `hash`, `convert`, `write`, `total`); they are kept out of the manifest so reruns
    stay byte-identical.
    """
    laps = _Laps({} if timings is None else timings)
    out = Path(out)
    options = _options(labels, patient_salt, synthetic=synthetic, synthetic_size=synthetic_size if synthetic else None,
                       max_side=max_side, quality=quality, shard_mb=shard_mb, min_shards=min_shards,
                       val_fraction=val_fraction, carve_val=carve_val, seed=seed, on_label_conflict=on_label_conflict,
                       workers=workers, overwrite=overwrite, strict=strict)
    _check_options(src, synthetic, labels, max_side, quality, shard_mb, min_shards, val_fraction, on_label_conflict)
    output.check_out(out, src, overwrite)
    inputs = scan_labelled(Path(src), labels) if labels else scan_inputs(src, synthetic=synthetic, seed=seed)
    tmp = output.prepare_out(out)
    laps.lap("scan")
    pool = None
    try:
        pool = convert.start_pool(workers)
        entries, rejected, duplicates, conflicts, patient_ids = inputs.entries, [], [], [], None
        if not synthetic:
            hashed = convert.hash_inputs(entries, pool, workers, progress)
            rejected = hashed.rejected
            entries, patient_ids = patients.pseudonymize(hashed.readable, hashed.header_patients, patient_salt)
            entries, duplicates, conflicts = split.remove_duplicates(entries, hashed.hashes,
                                                                     on_label_conflict=on_label_conflict)
            entries = split.assign_splits(entries, carve_val=carve_val, val_fraction=val_fraction, seed=seed,
                                          test_fraction=inputs.test_fraction)
        laps.lap("hash")
        converted = convert.convert_all(split.shuffled(entries, seed), tmp, max_side=max_side, quality=quality,
                                        seed=seed, synthetic_size=synthetic_size, pool=pool, workers=workers,
                                        progress=progress)
        rejected += converted.rejected
        laps.lap("convert")
        if strict and rejected:
            listing = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:10])
            raise ShardsError(f"--strict: {len(rejected)} input(s) rejected, nothing written to {out}: {listing}"
                              f"{' ...' if len(rejected) > 10 else ''}")
        shards = {s: write.write_split(tmp, s, accepted, converted.spools[s], shard_mb, min_shards)
                  for s, accepted in converted.accepted.items()}
        manifest = record.build_manifest(
            command=command if command is not None else record.build_command(src, out, options), options=options,
            inputs=inputs, members={s: [e for e, _, _, _ in accepted] for s, accepted in converted.accepted.items()},
            shards=shards, histograms=converted.histograms, passthrough=converted.passthrough, rejected=rejected,
            duplicates=duplicates, label_conflicts=conflicts, warnings=converted.warnings, patients=patient_ids)
        for spool in converted.spools.values():
            spool.unlink()
        # The manifest goes last: a folder with a manifest.json is a complete one.
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        output.publish(tmp, out, overwrite)
        laps.lap("write")
        laps.total()
    finally:
        if pool is not None:
            pool.terminate()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest
