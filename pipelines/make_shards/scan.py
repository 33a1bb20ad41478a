"""Stage 1, scan: the Kaggle folder layout (or the synthetic plan) -> the list of input images and what was skipped."""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.manifest import LABELS, SPLITS, ShardsError
from pipelines.synthetic import plan_synthetic

# A DICOM is recognised by its preamble whatever its name; these are the names looked at.
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom"}
FROM_FILE_NAME = "file name"
LAYOUT = ("expected the Kaggle layout chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg "
          "(pass the folder that contains chest_xray/ or chest_xray/ itself)")


@dataclass(frozen=True)
class Entry:
    """One input image and where it is going."""

    path: str  # relative to the input root (posix); also the identity in the manifest
    split: str
    label: int
    patient: str
    subtype: str
    source_split: str
    abs_path: str = ""  # empty for synthetic inputs
    synthetic_index: int = -1
    patient_from: str = FROM_FILE_NAME  # or "CSV column 'X'" / "DICOM PatientID": those are hashed (`patients`)
    source_label: str = ""  # a labels CSV's cell(s) the label came from, kept in the sample json


@dataclass(frozen=True)
class Scan:
    """What the scan found: `source` is what the manifest records (the resolved root, or "synthetic").

    A labels-CSV source also has `excluded` (files listed but left out by a label or split rule),
    `missing` (listed, no such file: not an input file), `label_source` (how the CSV was read) and
    `test_fraction` (the share of train patients `split` moves to test: a source without official splits)."""

    source: str
    entries: list[Entry]
    skipped: list[dict]
    excluded: list[dict] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)
    label_source: dict | None = None
    test_fraction: float = 0.0


_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),  # person123_bacteria_456
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE),  # IM-0115-0001, NORMAL2-IM-0012-0001
)


def patient_and_subtype(file_name: str) -> tuple[str, str]:
    """Kermany file names carry the patient id and the pneumonia subtype; fall back to the file stem."""
    stem = file_name.rsplit(".", 1)[0]
    patient = stem
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            patient = match.group(1)
            break
    lowered = stem.lower()
    subtype = "bacteria" if "bacteria" in lowered else "virus" if "virus" in lowered else "none"
    return patient, subtype


def display(path: Path | str) -> str:
    # Odd (non-UTF-8) names survive as surrogate escapes; make them printable and JSON-safe.
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def find_root(src: Path) -> Path:
    src = Path(src)
    if not src.exists():
        raise ShardsError(f"source {src} does not exist; {LAYOUT}")
    if not src.is_dir():
        raise ShardsError(f"source {src} is not a folder; {LAYOUT}")
    nested = [p for p in src.iterdir() if p.is_dir() and p.name.lower() == "chest_xray"]
    has_splits = any(p.is_dir() and p.name.lower() in SPLITS for p in src.iterdir())
    if nested and not has_splits:
        return nested[0]
    return src


def special_kind(path: Path) -> str | None:
    """"FIFO", "socket" or "device" for a path that is none of file, folder or dangling link: never to be
    opened (reading a FIFO blocks until a writer comes, forever)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # a dangling link: reading it fails and rejects it
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return None


def _folders_by_name(folder: Path, names, key) -> tuple[dict[str, list[Path]], list[Path]]:
    """Subfolders of `folder` whose `key(name)` is in `names` (several per name when they differ only in
    case: `NORMAL/` and `normal/` are merged), and every other entry."""
    matched: dict[str, list[Path]] = {}
    others = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and key(child.name) in names:
            matched.setdefault(key(child.name), []).append(child)
        else:
            others.append(child)
    return matched, others


def scan_source(src: Path) -> tuple[Path, list[Entry], list[dict]]:
    """Find every image of the Kaggle layout under `src`; return (root, images, skipped)."""
    root = find_root(src)
    # Paths in the manifest start at chest_xray/ whichever of the two accepted folders was given.
    base = root.parent if root.name.lower() == "chest_xray" else root
    entries: list[Entry] = []
    skipped: list[dict] = []

    def rel(path: Path) -> str:
        return display(path.relative_to(base).as_posix())

    def skip_tree(path: Path, reason: str) -> None:
        files = [p for p in sorted(path.rglob("*")) if p.is_symlink() or not p.is_dir()] \
            if path.is_dir() and not path.is_symlink() else [path]
        for file in files:
            skipped.append({"path": rel(file), "reason": reason})

    def skip_others(others: list[Path], reason: str) -> None:
        for child in others:
            skip_tree(child, "hidden file or folder" if child.name.startswith(".") else reason)

    split_dirs, others = _folders_by_name(root, SPLITS, str.lower)
    skip_others(others, f"not inside a {{train,val,test}}/{{NORMAL,PNEUMONIA}} folder of {display(root)}")
    if not split_dirs:
        raise ShardsError(f"no train/val/test folder in {display(root)}; {LAYOUT}")
    for split, folders in split_dirs.items():
        class_dirs: dict[str, list[Path]] = {}
        for split_dir in folders:
            found, others = _folders_by_name(split_dir, LABELS, str.upper)
            skip_others(others, f"not a class folder (expected {'/'.join(LABELS)})")
            for name, dirs in found.items():
                class_dirs.setdefault(name, []).extend(dirs)
        missing = [name for name in LABELS if name not in class_dirs]
        if missing:
            raise ShardsError(f"split folder {display(folders[0])} has no {' or '.join(missing)} folder; {LAYOUT}")
        for label_name, dirs in class_dirs.items():
            for class_dir in dirs:
                for path in sorted(class_dir.rglob("*")):
                    if path.is_dir() and not path.is_symlink():
                        continue
                    kind = special_kind(path)
                    if any(part.startswith(".") for part in path.relative_to(class_dir).parts):
                        skipped.append({"path": rel(path), "reason": "hidden file"})
                    elif kind:
                        skipped.append({"path": rel(path), "reason": f"not a regular file ({kind}); not opened"})
                    elif path.suffix.lower() not in IMAGE_SUFFIXES:
                        skipped.append({"path": rel(path),
                                        "reason": f"not an image extension ({'/'.join(sorted(IMAGE_SUFFIXES))})"})
                    else:
                        patient, subtype = patient_and_subtype(path.name)
                        entries.append(Entry(rel(path), split, LABELS.index(label_name), display(patient), subtype,
                                             split, abs_path=str(path)))
    if not entries:
        raise ShardsError(f"no images ({'/'.join(sorted(IMAGE_SUFFIXES))}) found under {display(root)}; {LAYOUT}")
    return root, entries, skipped


def scan_inputs(src: Path | None, *, synthetic: int, seed: int) -> Scan:
    """The inputs of a run: the images under `src`, or `synthetic` generated ones."""
    if synthetic:
        try:
            items = plan_synthetic(synthetic, seed=seed)
        except ValueError as exc:
            raise ShardsError(str(exc)) from None
        entries = [Entry(i.path, i.split, i.label, i.patient, i.subtype, i.split, synthetic_index=i.index)
                   for i in items]
        return Scan("synthetic", entries, [])
    root, entries, skipped = scan_source(Path(src))
    return Scan(display(root.resolve()), entries, skipped)
