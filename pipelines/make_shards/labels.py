"""Stage 1 for CSV-labelled sets: `--src DIR --labels CSV` -> the input images, their labels, patients, splits.

`DIR` is searched recursively. A CSV value in the path column names a file by its path relative to `DIR`,
its name, or its name without the extension (RSNA's `patientId` names `<patientId>.dcm`). Presets:
- `rsna` (RSNA Pneumonia Detection Challenge, `stage_2_train_labels.csv`): `patientId`, `Target`; one row per
  box, so a patient has several rows: label 1 when any row says 1.
- `nih14` (NIH ChestX-ray14, `Data_Entry_2017*.csv`): `Image Index`, `Finding Labels` (`|`-separated), `Patient
  ID`: `Pneumonia` among the findings -> 1, exactly `No Finding` -> 0, other findings excluded
  (`nih_other="exclude"`, each listed in `excluded`) or NORMAL (`"negative"`).
Other sets: `path_col`, `label_col`, `positive` (the label value meaning PNEUMONIA; any other non-empty
value is NORMAL; several rows for one image: positive when any is), `patient_col` optional.

Official splits: `train_val_list.txt` (or `train_list.txt`), optional `val_list.txt`, and `test_list.txt`
(NIH's names), one image name a line, next to the CSV or in `split_lists`. Without them every image starts
in train and `split` carves test (`--test-fraction`) and val by patient.

Every file under `DIR` ends in exactly one place: an entry, `skipped` (hidden, not a regular file, not
listed in the CSV: `unlisted`), or `excluded` (listed, but the label rule or the split lists leave it out,
or its CSV value names several files). A CSV value that names no file is `missing` (not an input file).
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipelines.make_shards.scan import FROM_FILE_NAME, IMAGE_SUFFIXES, Entry, Scan, display, special_kind
from pipelines.manifest import ShardsError

NIH_OTHER_CHOICES = ("exclude", "negative")
# List file -> split. NIH ships train_val_list.txt and test_list.txt; val is then carved from it by patient.
SPLIT_LISTS = {"train_val_list.txt": "train", "train_list.txt": "train", "val_list.txt": "val",
               "test_list.txt": "test"}
# Test share of a set without official split lists (RSNA): the same share as the val carve-out.
DEFAULT_TEST_FRACTION = 0.1
AMBIGUOUS_REASON = ("ambiguous: its CSV value names several files under --src (csv_values, also_named); give "
                    "paths relative to --src in the CSV")
NIH_OTHER_REASON = "other findings, neither Pneumonia nor No Finding (--nih-other=negative keeps them as NORMAL)"


@dataclass(frozen=True)
class Preset:
    path_col: str
    label_col: str
    patient_col: str | None
    positive: str | None  # None: the NIH findings rule


PRESETS = {
    "rsna": Preset("patientId", "Target", "patientId", "1"),
    "nih14": Preset("Image Index", "Finding Labels", "Patient ID", None),
}


@dataclass(frozen=True)
class LabelSource:
    """How to read a labels CSV (`--labels` and the options after it); explicit columns override a preset's."""

    csv: Path
    preset: str | None = None
    path_col: str | None = None
    label_col: str | None = None
    patient_col: str | None = None
    positive: str | None = None
    nih_other: str = "exclude"
    split_lists: Path | None = None
    test_fraction: float | None = None  # None: DEFAULT_TEST_FRACTION without split lists; an error with them

    def resolved(self) -> Preset:
        """The columns and rule in force; a one-line `ShardsError` naming the flag for a missing one."""
        if self.preset is not None and self.preset not in PRESETS:
            raise ShardsError(f"unknown --preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
        if self.nih_other not in NIH_OTHER_CHOICES:
            raise ShardsError(f"invalid --nih-other {self.nih_other!r}; expected one of {', '.join(NIH_OTHER_CHOICES)}")
        base = PRESETS.get(self.preset, Preset("", "", None, None))
        columns = Preset(self.path_col or base.path_col, self.label_col or base.label_col,
                         self.patient_col or base.patient_col, self.positive or base.positive)
        if not columns.path_col or not columns.label_col:
            raise ShardsError(f"labels CSV {self.csv}: give --preset {'|'.join(PRESETS)} or --path-col and --label-col "
                              f"(and --positive)")
        if columns.positive is None and self.preset != "nih14":
            raise ShardsError(f"labels CSV {self.csv}: give --positive VALUE, the --label-col value that means "
                              f"PNEUMONIA")
        return columns


def _label(cells: list[str], columns: Preset, nih_other: str) -> tuple[int | None, str]:
    """(label, "") or (None, why the image is excluded) from the label cells of all its rows."""
    values = [c.strip() for c in cells]
    if not any(values):
        return None, f"empty {columns.label_col!r} in the CSV"
    if columns.positive is not None:
        return int(any(v == columns.positive for v in values)), ""
    findings = {f.strip().lower() for v in values for f in v.split("|") if f.strip()}
    if "pneumonia" in findings:
        return 1, ""
    if findings == {"no finding"} or nih_other == "negative":
        return 0, ""
    return None, NIH_OTHER_REASON


def _read_rows(path: Path, columns: Preset) -> tuple[dict[str, list[dict]], int]:
    """{path value: its rows} in CSV order, and the number of rows."""
    if not path.is_file():
        raise ShardsError(f"labels CSV {path} does not exist; pass --labels PATH (e.g. stage_2_train_labels.csv or "
                          f"Data_Entry_2017.csv)")
    rows: dict[str, list[dict]] = defaultdict(list)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            for flag, name in (("--path-col", columns.path_col), ("--label-col", columns.label_col),
                               ("--patient-col", columns.patient_col)):
                if name is not None and name not in header:
                    raise ShardsError(f"labels CSV {path} has no column {name!r} (columns: {', '.join(header)}); "
                                      f"pass {flag} NAME")
            count = 0
            for row in reader:
                count += 1
                key = (row.get(columns.path_col) or "").strip()
                if key:
                    rows[key].append({"line": reader.line_num, "label": row.get(columns.label_col) or "",
                                      "patient": (row.get(columns.patient_col) or "").strip()
                                      if columns.patient_col else ""})
    except ShardsError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ShardsError(f"cannot read labels CSV {path}: {exc}; pass a UTF-8 CSV with a header row") from None
    if not rows:
        raise ShardsError(f"labels CSV {path} lists no image in column {columns.path_col!r}")
    return rows, count


def _read_split_lists(labels: LabelSource) -> tuple[dict[str, str], Path | None]:
    """{image name: split or "conflict"} from the official lists, and their folder (None without lists)."""
    folder = labels.split_lists if labels.split_lists is not None else labels.csv.parent
    found = {name: folder / name for name in SPLIT_LISTS if (folder / name).is_file()}
    has_train = any(SPLIT_LISTS[name] == "train" for name in found)
    if not found and labels.split_lists is None:
        return {}, None
    if not (has_train and "test_list.txt" in found):
        raise ShardsError(f"split lists in {folder}: found {sorted(found) or 'none'}, need test_list.txt and "
                          f"train_val_list.txt (or train_list.txt); fix --split-lists or remove the partial set")
    split_of: dict[str, str] = {}
    for name, path in found.items():
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            image = line.strip()
            if image:
                previous = split_of.get(image)
                split_of[image] = SPLIT_LISTS[name] if previous in (None, SPLIT_LISTS[name]) else "conflict"
    return split_of, folder


def _walk(root: Path, own_files: set[Path]) -> tuple[dict[str, Path], list[dict]]:
    """{printable relative path: path} of the candidate files under `root` (linked folders followed, each
    real folder once), and the skipped ones (hidden, not a regular file, the CSV and split lists themselves)."""
    files, skipped = {}, []
    seen = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree (or a second link to one folder): its files are counted once
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(names):
            path = Path(folder, name)
            rel = display(path.relative_to(root).as_posix())
            kind = special_kind(path)
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                skipped.append({"path": rel, "reason": "hidden file"})
            elif kind:
                skipped.append({"path": rel, "reason": f"not a regular file ({kind}); not opened"})
            elif path.resolve() in own_files:
                skipped.append({"path": rel, "reason": "the labels CSV or a split list"})
            else:
                files[rel] = path
    return files, skipped


def _name_index(files) -> dict[str, list[str]]:
    """Relative path, file name, and (for image-like names) the name without extension -> files."""
    index: dict[str, set[str]] = defaultdict(set)
    for rel in files:
        pure = PurePosixPath(rel)
        index[rel].add(rel)
        index[pure.name].add(rel)
        if pure.suffix.lower() in IMAGE_SUFFIXES:
            index[pure.stem].add(rel)
    return {key: sorted(paths) for key, paths in index.items()}


def scan_labelled(src: Path, labels: LabelSource) -> Scan:
    """The images under `src` that `labels` lists, each with its label, patient and split (see module doc)."""
    root = Path(src)
    if not root.is_dir():
        raise ShardsError(f"source {src} is not a folder; --src takes the folder holding the images the labels CSV "
                          f"names (searched recursively)")
    columns = labels.resolved()
    split_of, lists_folder = _read_split_lists(labels)
    if lists_folder is not None and labels.test_fraction is not None:
        raise ShardsError(f"--test-fraction {labels.test_fraction} given, but the split lists in {lists_folder} "
                          f"define the test split; drop --test-fraction (or pass --split-lists elsewhere)")
    rows, row_count = _read_rows(Path(labels.csv), columns)
    test_fraction = 0.0 if lists_folder else (DEFAULT_TEST_FRACTION if labels.test_fraction is None
                                              else labels.test_fraction)
    own = {Path(labels.csv).resolve()} | ({(lists_folder / n).resolve() for n in SPLIT_LISTS} if lists_folder else set())
    files, skipped = _walk(root, own)
    index = _name_index(files)
    named_by: dict[str, list[str]] = defaultdict(list)
    missing = []
    for key in rows:
        matches = index.get(key, [])
        if not matches:
            missing.append({"name": key, "reason": f"listed on line {rows[key][0]['line']} of {Path(labels.csv).name}, "
                                                   f"no file of that name (or name without extension) under --src"})
        for rel in matches:
            named_by[rel].append(key)
    entries, excluded, unlisted = [], [], 0
    for rel in files:
        keys = named_by.get(rel)
        if not keys:
            skipped.append({"path": rel, "reason": f"not listed in {Path(labels.csv).name} "
                                                   f"(column {columns.path_col!r})"})
            unlisted += 1
            continue
        others = sorted({m for k in keys for m in index[k]} - {rel})
        if len(keys) > 1 or others:
            excluded.append({"path": rel, "reason": AMBIGUOUS_REASON, "csv_values": keys, "also_named": others})
            continue
        key, file_rows = keys[0], rows[keys[0]]
        label, why = _label([r["label"] for r in file_rows], columns, labels.nih_other)
        cell = "|".join(dict.fromkeys(r["label"].strip() for r in file_rows))
        split = split_of.get(key, split_of.get(PurePosixPath(rel).name)) if lists_folder else "train"
        if label is None or split in (None, "conflict"):
            reason = why or (f"in none of the split lists in {lists_folder}" if split is None
                             else f"in two split lists in {lists_folder}")
            excluded.append({"path": rel, "reason": reason, "csv_label": cell})
            continue
        patient = next((r["patient"] for r in file_rows if r["patient"]), "")
        entries.append(Entry(rel, split, label, patient or PurePosixPath(rel).stem, "none",
                             split if lists_folder else "none",
                             abs_path=str(files[rel]), source_label=cell,
                             patient_from=f"CSV column {columns.patient_col!r}" if patient else FROM_FILE_NAME))
    if not entries:
        raise ShardsError(f"none of the {len(rows)} images listed in {labels.csv} is usable under {src} "
                          f"({len(missing)} not found, {len(excluded)} excluded); --src takes the folder holding "
                          f"the images (searched recursively)")
    record = {"csv": display(Path(labels.csv).resolve()), "preset": labels.preset, "path_col": columns.path_col,
              "label_col": columns.label_col, "patient_col": columns.patient_col, "positive": columns.positive,
              "nih_other": labels.nih_other if columns.positive is None else None, "rows": row_count,
              "listed_images": len(rows), "split_lists": display(lists_folder.resolve()) if lists_folder else None,
              "test_fraction": test_fraction,
              "unlisted": unlisted, "missing": len(missing),
              "excluded": dict(sorted(Counter(e["reason"] for e in excluded).items()))}
    return Scan(display(root.resolve()), entries, skipped, excluded, missing, record, test_fraction)
