"""Stage 3, dedupe and split: one copy of each byte-identical image, test (for a labels CSV without official
split lists) and val carved from train by patient, and the seeded order in which each split is written."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np

from pipelines.make_shards.scan import Entry
from pipelines.manifest import LABELS, SPLITS

# A source val split smaller than this is not a usable validation set (Kaggle's has 16 images).
MIN_SOURCE_VAL = 100
LABEL_CONFLICT_CHOICES = ("drop", "keep-first")
# Separate random streams per carved split, so adding a test carve-out leaves the val draw's seed alone.
_CARVE_STREAMS = {"val": 0xCA4E, "test": 0x7E57}


def remove_duplicates(entries: list[Entry], hashes: list[str], *, on_label_conflict: str = "drop"
                      ) -> tuple[list[Entry], list[dict], list[dict]]:
    """Keep one copy of each byte-identical group: the earliest split (train, val, test), then path.

    Returns (kept entries, duplicates, label_conflicts). A group whose copies carry different labels is a
    label conflict, not a duplicate: nothing says which label is right, so `on_label_conflict="drop"` keeps
    no copy, and "keep-first" keeps the copy the duplicate rule would keep (with its label).
    """
    groups: dict[str, list[Entry]] = defaultdict(list)
    for entry, digest in zip(entries, hashes, strict=True):
        groups[digest].append(entry)
    removed_paths = set()
    duplicates, conflicts = [], []
    for digest, group in sorted(groups.items()):
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda e: (SPLITS.index(e.split), e.path))
        kept, removed = group[0], group[1:]
        if len({e.label for e in group}) > 1:
            if on_label_conflict != "keep-first":
                kept, removed = None, group
            conflicts.append({"sha256": digest, "kept": kept.path if kept else None,
                              "files": [{"path": e.path, "label": LABELS[e.label], "split": e.split} for e in group]})
        else:
            duplicates.append({"sha256": digest, "kept": kept.path, "removed": [e.path for e in removed],
                               "splits": sorted({e.split for e in group}, key=SPLITS.index),
                               "cross_split": len({e.split for e in group}) > 1})
        removed_paths.update(e.path for e in removed)
    duplicates.sort(key=lambda d: d["kept"])
    conflicts.sort(key=lambda c: c["files"][0]["path"])
    return [e for e in entries if e.path not in removed_paths], duplicates, conflicts


def carve_by_patient(entries: list[Entry], fraction: float, seed: int, *, to_split: str = "val") -> list[Entry]:
    """Move whole train patients to `to_split` until each class has `fraction` of its train images there."""
    rng = np.random.default_rng([seed, _CARVE_STREAMS[to_split]])
    images_of: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        if entry.split == "train":
            images_of[entry.patient].append(entry)
    moved = set()
    for label in range(len(LABELS)):
        # A patient belongs to the class most of its images have (Kermany patients have one class).
        patients = sorted(p for p, imgs in images_of.items()
                          if Counter(e.label for e in imgs).most_common(1)[0][0] == label)
        wanted = fraction * sum(len(images_of[p]) for p in patients)
        taken = 0
        for i in rng.permutation(len(patients)):
            if taken >= wanted:
                break
            moved.add(patients[i])
            taken += len(images_of[patients[i]])
    return [replace(e, split=to_split) if e.split == "train" and e.patient in moved else e for e in entries]


def assign_splits(entries: list[Entry], *, carve_val: bool | None, val_fraction: float, seed: int,
                  test_fraction: float = 0.0) -> list[Entry]:
    """Official splits, or (see `make_shards`'s `carve_val`) the source val merged into train and carved anew;
    `test_fraction` first carves a test split from train by patient (sources without an official one)."""
    if test_fraction > 0:
        entries = carve_by_patient(entries, test_fraction, seed, to_split="test")
    source_val = sum(e.split == "val" for e in entries)
    if not (carve_val or (carve_val is None and source_val < MIN_SOURCE_VAL and val_fraction > 0)):
        return entries
    # The tiny source val split joins train first, so every image can land in the carved val.
    entries = [replace(e, split="train") if e.split == "val" else e for e in entries]
    return carve_by_patient(entries, val_fraction, seed)


def shuffled(entries: list[Entry], seed: int) -> list[Entry]:
    """Each split's entries in a seeded order (so shards mix classes), splits in `SPLITS` order."""
    ordered = []
    for split_number, split in enumerate(SPLITS):
        members = sorted((e for e in entries if e.split == split), key=lambda e: e.path)
        order = np.random.default_rng([seed, split_number]).permutation(len(members))
        ordered += [members[i] for i in order]
    return ordered


def patient_overlap(entries: list[Entry]) -> dict[str, int]:
    patients = defaultdict(set)
    for entry in entries:
        patients[entry.split].add(entry.patient)
    overlap = {}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            common = patients[a] & patients[b]
            if common:
                overlap[f"{a}/{b}"] = len(common)
    return overlap
