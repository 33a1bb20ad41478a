"""make_shards: round trips, patient split, duplicates, determinism, atomic output, source errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import ORIGINALS_SAMPLE, REPO, TRAIN_224, require_dir
from PIL import Image

import pipelines.make_shards as ms
from pipelines.make_shards import make_shards
from pipelines.make_shards.convert import hash_task
from pipelines.make_shards.scan import scan_source
from pipelines.make_shards.split import remove_duplicates
from pipelines.manifest import ShardsError, load_manifest
from pipelines.verify import verify_shards


def xray_jpeg(seed: int, size=(72, 60), mode="L", quality=92) -> bytes:
    rng = np.random.default_rng(seed)
    array = (rng.random((size[1], size[0])) * 200 + 20).astype(np.uint8)
    image = Image.fromarray(array, "L").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def kaggle_layout(root: Path, *, patients_per_class=12, images_per_patient=2, val_images=2) -> Path:
    """A small chest_xray/ tree with Kermany-style names (several images per patient)."""
    seed = 0
    for p in range(patients_per_class):
        for i in range(images_per_patient):
            seed += 1
            write(root / "chest_xray/train/NORMAL" / f"IM-{p:04d}-{i + 1:04d}.jpeg", xray_jpeg(seed))
            seed += 1
            kind = "bacteria" if p % 2 else "virus"
            write(root / "chest_xray/train/PNEUMONIA" / f"person{p}_{kind}_{i}.jpeg", xray_jpeg(seed))
    for i in range(val_images):
        write(root / "chest_xray/val/NORMAL" / f"NORMAL2-IM-{900 + i:04d}-0001.jpeg", xray_jpeg(1000 + i))
        write(root / "chest_xray/val/PNEUMONIA" / f"person{900 + i}_virus_1.jpeg", xray_jpeg(2000 + i))
    return root


def read_samples(out: Path) -> dict[str, list[dict]]:
    import webdataset as wds

    manifest = load_manifest(out)
    samples = {}
    for split, info in manifest["splits"].items():
        samples[split] = []
        for shard in info["shards"]:
            for sample in wds.WebDataset(str(out / shard["tar"]), shardshuffle=False, empty_check=False):
                meta = json.loads(sample["json"])
                meta["cls"] = int(sample["cls"])
                meta["__key__"] = sample["__key__"]
                meta["jpg"] = sample["jpg"]
                samples[split].append(meta)
    return samples


def input_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def assert_accounted(out: Path, root: Path) -> dict:
    """Every input file is in exactly one place: a shard, rejected, skipped or removed as a duplicate."""
    manifest = load_manifest(out)
    sharded = [s["source"] for split in read_samples(out).values() for s in split]
    places = (sharded + [r["path"] for r in manifest["rejected"]] + [r["path"] for r in manifest["skipped"]]
              + [p for d in manifest["duplicates"] for p in d["removed"]]
              + [f["path"] for c in manifest["label_conflicts"] for f in c["files"] if f["path"] != c["kept"]])
    assert len(places) == len(set(places)), "an input is listed twice"
    assert set(places) == input_files(root)
    return manifest


def test_tiny_shards_fixture_round_trip(tiny_shards):
    manifest = load_manifest(tiny_shards)
    assert manifest["version"] == 1 and manifest["labels"] == ["NORMAL", "PNEUMONIA"]
    assert sum(info["samples"] for info in manifest["splits"].values()) == 96
    for info in manifest["splits"].values():
        assert len(info["shards"]) >= 2
        assert info["per_class"]["NORMAL"] > 0 and info["per_class"]["PNEUMONIA"] > 0
        assert sum(info["per_class"].values()) == info["samples"] == sum(s["samples"] for s in info["shards"])
        for shard in info["shards"]:
            assert (tiny_shards / shard["tar"]).is_file() and (tiny_shards / shard["index"]).is_file()
    assert 0.0 < manifest["stats"]["mean"] < 1.0 and 0.0 < manifest["stats"]["std"] < 0.5
    # webdataset and DALI (through the .idx files) read every sample; keys, labels and metadata agree.
    assert verify_shards(tiny_shards) == {s: i["samples"] for s, i in manifest["splits"].items()}
    samples = read_samples(tiny_shards)
    for split, metas in samples.items():
        assert [m["__key__"] for m in metas] == [f"{split}-{i:08d}" for i in range(len(metas))]
        for meta in metas:
            assert meta["cls"] == meta["label"] and meta["label_name"] == ("NORMAL", "PNEUMONIA")[meta["label"]]
            assert f"/{meta['label_name']}/" in meta["source"] and f"/{split}/" in meta["source"]
            with Image.open(io.BytesIO(meta["jpg"])) as image:
                assert image.mode == "L" and image.size == (meta["stored_width"], meta["stored_height"])
    # The stored mean/std is what the stored train pixels really have (within JPEG rounding).
    pixels = np.concatenate([np.asarray(Image.open(io.BytesIO(m["jpg"])), np.float64).ravel() / 255
                             for m in samples["train"]])
    assert abs(pixels.mean() - manifest["stats"]["mean"]) < 0.005
    assert abs(pixels.std() - manifest["stats"]["std"]) < 0.005
    patients = {split: {m["patient"] for m in metas} for split, metas in samples.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])


def test_originals_sample_round_trip(tmp_path):
    src = require_dir(ORIGINALS_SAMPLE)
    out = tmp_path / "orig"
    manifest = make_shards(src, out, min_shards=2, workers=2, progress=False)
    assert_accounted(out, src)
    assert verify_shards(out)
    counts = defaultdict(int)
    for path in (src / "chest_xray").rglob("*.jpeg"):
        counts[path.parent.name] += 1
    per_class = defaultdict(int)
    for info in manifest["splits"].values():
        for name, count in info["per_class"].items():
            per_class[name] += count
    removed = [p for d in manifest["duplicates"] for p in d["removed"]] + [r["path"] for r in manifest["rejected"]]
    for name in ("NORMAL", "PNEUMONIA"):
        assert per_class[name] == counts[name] - sum(f"/{name}/" in p for p in removed)
    samples = read_samples(out)
    for metas in samples.values():
        for meta in metas:
            assert max(meta["stored_width"], meta["stored_height"]) <= ms.DEFAULT_MAX_SIDE
            assert meta["width"] >= meta["stored_width"]
            original = Image.open(src / meta["source"])
            assert (original.width, original.height, original.mode) == (meta["width"], meta["height"], meta["mode"])
    # Kaggle's val split is absent here, so val is carved from train by patient.
    assert manifest["splits"]["val"]["samples"] > 0
    assert not ({m["patient"] for m in samples["train"]} & {m["patient"] for m in samples["val"]})


def test_passthrough_keeps_bytes_and_full_size_keeps_pixels(tmp_path):
    src = kaggle_layout(tmp_path / "src", patients_per_class=3, images_per_patient=1, val_images=0)
    rgb = write(src / "chest_xray/train/NORMAL/IM-0500-0001.jpeg", xray_jpeg(77, mode="RGB"))
    manifest = make_shards(src, tmp_path / "out", max_side=0, min_shards=1, val_fraction=0, progress=False)
    assert manifest["inputs"]["passthrough"] == manifest["inputs"]["sharded"] - 1
    for metas in read_samples(tmp_path / "out").values():
        for meta in metas:
            original = (src / meta["source"]).read_bytes()
            if meta["source"].endswith("IM-0500-0001.jpeg"):
                assert meta["mode"] == "RGB" and meta["jpg"] != original
                assert Image.open(io.BytesIO(meta["jpg"])).mode == "L"
            else:
                assert meta["jpg"] == original, "grayscale JPEG needing no resize must pass through byte for byte"
    assert rgb.exists()


def test_patient_split_without_overlap_and_tiny_val_merged(tmp_path):
    src = kaggle_layout(tmp_path / "src", patients_per_class=20, images_per_patient=3, val_images=2)
    out = tmp_path / "out"
    manifest = make_shards(src, out, min_shards=2, val_fraction=0.2, progress=False)
    assert_accounted(out, src)
    samples = read_samples(out)
    by_patient = defaultdict(set)
    for split, metas in samples.items():
        for meta in metas:
            by_patient[meta["patient"]].add(split)
    assert all(len(splits) == 1 for splits in by_patient.values()), "a patient is in two splits"
    assert by_patient["person3"] and by_patient["IM-0003"]  # Kermany names parse to patient ids
    assert sum(m["patient"] == "person3" for m in samples[next(iter(by_patient["person3"]))]) == 3
    val = manifest["splits"]["val"]
    assert val["per_class"]["NORMAL"] >= 0.2 * 62 / 2 - 3 and val["per_class"]["PNEUMONIA"] >= 0.2 * 62 / 2 - 3
    assert {m["source_split"] for m in samples["train"] + samples["val"]} == {"train", "val"}
    assert manifest["splits"]["train"]["patients"] + val["patients"] == 44


def test_keep_source_val_when_asked(tmp_path):
    src = kaggle_layout(tmp_path / "src", patients_per_class=4, images_per_patient=1, val_images=2)
    manifest = make_shards(src, tmp_path / "out", min_shards=1, carve_val=False, progress=False)
    assert manifest["splits"]["val"]["samples"] == 4
    assert {m["source_split"] for m in read_samples(tmp_path / "out")["val"]} == {"val"}


def test_cross_split_duplicates_removed_from_later_split(tmp_path):
    src = kaggle_layout(tmp_path / "src", patients_per_class=4, images_per_patient=1, val_images=0)
    original = src / "chest_xray/train/NORMAL/IM-0001-0001.jpeg"
    write(src / "chest_xray/test/NORMAL/IM-0777-0001.jpeg", original.read_bytes())
    write(src / "chest_xray/test/PNEUMONIA/person777_virus_1.jpeg", xray_jpeg(4242))
    write(src / "chest_xray/train/NORMAL/IM-0001-0009.jpeg", original.read_bytes())  # within-split copy
    out = tmp_path / "out"
    manifest = make_shards(src, out, min_shards=1, val_fraction=0, progress=False)
    assert_accounted(out, src)
    [group] = manifest["duplicates"]
    assert group["kept"] == "chest_xray/train/NORMAL/IM-0001-0001.jpeg"
    assert sorted(group["removed"]) == ["chest_xray/test/NORMAL/IM-0777-0001.jpeg",
                                        "chest_xray/train/NORMAL/IM-0001-0009.jpeg"]
    assert group["cross_split"] and group["sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
    assert manifest["splits"]["test"]["per_class"] == {"NORMAL": 0, "PNEUMONIA": 1}
    assert manifest["inputs"]["duplicates_removed"] == 2


@pytest.mark.parametrize("policy", ["drop", "keep-first"])
def test_identical_images_with_different_labels_are_label_conflicts(tmp_path, policy):
    """Before: the NORMAL copy won silently (path order) and the PNEUMONIA one was listed as a mere duplicate."""
    src = kaggle_layout(tmp_path / "src", patients_per_class=4, images_per_patient=1, val_images=0)
    normal = src / "chest_xray/train/NORMAL/IM-0002-0001.jpeg"
    sick = write(src / "chest_xray/train/PNEUMONIA/person77_virus_1.jpeg", normal.read_bytes())
    same_label = write(src / "chest_xray/test/NORMAL/IM-0099-0001.jpeg", normal.read_bytes())
    write(src / "chest_xray/test/PNEUMONIA/person99_virus_1.jpeg", xray_jpeg(999))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "scripts/make_shards.py", "--src", str(src), "--out", str(out), "--min-shards", "1",
         "--val-fraction", "0", "--workers", "1", "--no-progress", "--on-label-conflict", policy],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    manifest = assert_accounted(out, src)
    [conflict] = manifest["label_conflicts"]
    rel = {p: p.relative_to(src).as_posix() for p in (normal, sick, same_label)}
    assert conflict["sha256"] == hashlib.sha256(normal.read_bytes()).hexdigest()
    assert {(f["path"], f["label"]) for f in conflict["files"]} == {
        (rel[normal], "NORMAL"), (rel[sick], "PNEUMONIA"), (rel[same_label], "NORMAL")}
    assert not manifest["duplicates"], "a conflicting group is not a duplicate group"
    sharded = {m["source"] for split in read_samples(out).values() for m in split}
    if policy == "drop":
        assert conflict["kept"] is None and not sharded & set(rel.values())
        assert manifest["inputs"]["label_conflicts_removed"] == 3
    else:
        assert conflict["kept"] == rel[normal] and sharded & set(rel.values()) == {rel[normal]}
        assert manifest["inputs"]["label_conflicts_removed"] == 2
    assert "label conflicts removed" in result.stdout and f"{rel[sick]} (PNEUMONIA)" in result.stdout
    assert manifest["args"]["on_label_conflict"] == policy


def test_duplicates_found_in_kermany_train_224():
    """Hash-only scan of the real 5,216-image train split: it has byte-identical duplicates."""
    src = require_dir(TRAIN_224)
    _, entries, _ = scan_source(src)
    assert len(entries) == 5216
    hashes = [hash_task(entry)[0] for entry in entries]
    kept, duplicates, conflicts = remove_duplicates(entries, hashes)
    assert duplicates, "the Kermany train split is known to contain byte-identical duplicates"
    assert not conflicts, "no duplicate of the Kermany train split is filed under both classes"
    assert len(kept) + sum(len(d["removed"]) for d in duplicates) == len(entries)
    for group in duplicates[:20]:
        kept_bytes = (src / group["kept"]).read_bytes()
        for path in group["removed"]:
            assert (src / path).read_bytes() == kept_bytes


def test_deterministic_regardless_of_workers(tmp_path):
    options = dict(synthetic=64, synthetic_size=80, min_shards=2, seed=5, progress=False)
    first = make_shards(None, tmp_path / "a", workers=1, **options)
    second = make_shards(None, tmp_path / "b", workers=2, **options)
    other_seed = make_shards(None, tmp_path / "c", workers=1, **{**options, "seed": 6})

    def digests(manifest):
        return [(s["tar"], s["sha256"], s["index_sha256"]) for i in manifest["splits"].values() for s in i["shards"]]

    assert digests(first) == digests(second)
    assert digests(first) != digests(other_seed)
    assert first["stats"] == second["stats"]


def test_shuffle_mixes_classes_across_shards(tiny_shards):
    labels = [m["cls"] for m in read_samples(tiny_shards)["train"]]
    # Sorted input would put every NORMAL first; a seeded shuffle interleaves them.
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)


def test_overwrite_refused_then_allowed(tmp_path):
    out = tmp_path / "out"
    make_shards(None, out, synthetic=60, synthetic_size=48, min_shards=1, progress=False)
    with pytest.raises(ShardsError, match="--overwrite"):
        make_shards(None, out, synthetic=60, synthetic_size=48, min_shards=1, progress=False)
    manifest = make_shards(None, out, synthetic=60, synthetic_size=48, min_shards=1, seed=1, overwrite=True,
                           progress=False)
    assert load_manifest(out)["args"]["seed"] == 1 == manifest["args"]["seed"]
    assert not list(tmp_path.glob("out.*")), "temporary or old folders left behind"
    stranger = tmp_path / "not-shards"
    write(stranger / "precious.txt", b"keep me")
    with pytest.raises(ShardsError, match="not a shards folder"):
        make_shards(None, stranger, synthetic=60, synthetic_size=48, overwrite=True, progress=False)
    assert (stranger / "precious.txt").read_bytes() == b"keep me"


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_of_the_source_is_refused_and_deletes_nothing(tmp_path):
    """Before: --out equal to --src, with a stray manifest.json there, deleted every source image (exit 0)."""
    src = kaggle_layout(tmp_path / "src", patients_per_class=2, images_per_patient=1, val_images=0)
    write(src / "manifest.json", b'{"written by": "another tool"}')
    before = snapshot(tmp_path)
    result = subprocess.run(
        [sys.executable, "scripts/make_shards.py", "--src", str(src), "--out", str(src), "--overwrite",
         "--min-shards", "1", "--workers", "1", "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"output {src} is the source" in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case, match", [
    ("parent of src", "contains it"),
    ("existing folder in src", "existing folder inside the source"),
    ("regular file", "is not a folder"),
    ("link to shards", "is not a folder"),
    ("shards folder + a stranger", r"it holds 'notes\.txt'"),
    ("shards folder + a stranger folder", r"it holds 'train/extra/'"),
    ("foreign manifest", "no manifest.json of this tool's format"),
])
def test_overwrite_deletes_only_what_make_shards_wrote(tmp_path, tiny_shards, case, match):
    src = kaggle_layout(tmp_path / "data" / "src", patients_per_class=2, images_per_patient=1, val_images=0)
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    out = {"parent of src": tmp_path / "data", "existing folder in src": src / "chest_xray" / "train",
           "regular file": write(tmp_path / "file.bin", b"data"), "link to shards": tmp_path / "link"}.get(case, shards)
    if case == "link to shards":
        out.symlink_to(shards)
    elif case == "shards folder + a stranger":
        write(shards / "notes.txt", b"my notes")
    elif case == "shards folder + a stranger folder":
        write(shards / "train" / "extra" / "x.bin", b"x")
    elif case == "foreign manifest":
        write(shards / "manifest.json", b'{"version": 1}')
    before = snapshot(tmp_path)
    with pytest.raises(ShardsError, match=match) as error:
        make_shards(src, out, min_shards=1, overwrite=True, progress=False)
    assert "\n" not in str(error.value)
    assert snapshot(tmp_path) == before and out.exists()


def test_fresh_output_inside_the_source_is_allowed_once(tmp_path):
    src = kaggle_layout(tmp_path / "src", patients_per_class=2, images_per_patient=1, val_images=0)
    out = src / "shards"
    make_shards(src, out, min_shards=1, val_fraction=0, progress=False)
    assert load_manifest(out)["inputs"]["sharded"] == 4
    with pytest.raises(ShardsError, match="existing folder inside the source"):
        make_shards(src, out, min_shards=1, overwrite=True, progress=False)


def test_killed_run_leaves_temporary_folders_that_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); import pipelines.make_shards as ms; "
        "ms.write.write_split = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
        "ms.make_shards(None, sys.argv[2], synthetic=60, synthetic_size=48, min_shards=1, progress=False)"),
        str(REPO), str(out)], capture_output=True, timeout=120)
    assert killed.returncode == -9
    [stale] = tmp_path.glob("out.tmp-*")
    assert any(stale.glob("_spool-*.bin"))
    # Look-alikes that are not stale or not ours stay: a live run's folder and a stranger's.
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as sleeper:
        try:
            live = tmp_path / f"out.tmp-{sleeper.pid}"
            write(live / ".make_shards-tmp", b"")
            stranger = write(tmp_path / f"out.tmp-{stale.name.rsplit('-', 1)[1]}0" / "thesis.tex", b"mine")
            make_shards(None, out, synthetic=60, synthetic_size=48, min_shards=1, progress=False)
            assert not stale.exists()
            assert live.is_dir() and stranger.read_bytes() == b"mine"
        finally:
            sleeper.kill()
    assert verify_shards(out, dali=False) and not (out / ".make_shards-tmp").exists()


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_shards(None, out, synthetic=60, synthetic_size=48, min_shards=1, progress=False)
    before = load_manifest(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ms.write, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_shards(None, out, synthetic=60, synthetic_size=48, min_shards=1, seed=3, overwrite=True, progress=False)
    assert load_manifest(out) == before, "a failed --overwrite run must leave the previous output intact"
    with pytest.raises(KeyboardInterrupt):
        make_shards(None, tmp_path / "fresh", synthetic=60, synthetic_size=48, progress=False)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary folder left behind"


@pytest.mark.parametrize("layout, message", [
    ({}, "does not exist"),
    ({"chest_xray/": b""}, "no train/val/test folder"),
    ({"chest_xray/train/NORMAL/IM-0001-0001.jpeg": None}, "has no PNEUMONIA folder"),
    ({"chest_xray/train/NORMAL/": b"", "chest_xray/train/pneumonia/": b""}, "no images"),
])
def test_missing_or_empty_source_is_a_clear_error(tmp_path, layout, message):
    src = tmp_path / "src"
    for rel, data in layout.items():
        if rel.endswith("/"):
            (src / rel).mkdir(parents=True, exist_ok=True)
        else:
            write(src / rel, data if data is not None else xray_jpeg(1))
    with pytest.raises(ShardsError, match=message) as error:
        make_shards(src, tmp_path / "out", progress=False)
    assert str(src) in str(error.value) and "chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_accepts_chest_xray_folder_itself_case_insensitive_classes(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        write(src / "chest_xray/train/normal" / f"IM-{i:04d}-0001.JPG", xray_jpeg(i))
        write(src / "chest_xray/train/Pneumonia" / f"person{i}_virus_1.JPEG", xray_jpeg(10 + i))
        write(src / "chest_xray/test/NORMAL" / f"IM-{50 + i:04d}-0001.jpeg", xray_jpeg(20 + i))
        write(src / "chest_xray/test/PNEUMONIA" / f"person{50 + i}_bacteria_1.jpg", xray_jpeg(30 + i))
    a = make_shards(src, tmp_path / "a", min_shards=1, progress=False)
    b = make_shards(src / "chest_xray", tmp_path / "b", min_shards=1, progress=False)
    assert a["splits"] == b["splits"]
    assert a["splits"]["test"]["samples"] == 6 and a["splits"]["train"]["samples"] + a["splits"]["val"]["samples"] == 6


def test_fifo_and_socket_in_the_source_are_skipped_never_opened(tmp_path, monkeypatch):
    """Before: the hash stage opened the FIFO and blocked forever."""
    src = kaggle_layout(tmp_path / "src", patients_per_class=2, images_per_patient=1, val_images=0)
    normal = src / "chest_xray/train/NORMAL"
    os.mkfifo(normal / "IM-0500-0001.jpeg")
    os.mkfifo(src / "chest_xray" / "pipe")  # outside the class folders too
    monkeypatch.chdir(normal)  # a relative bind: socket paths are limited to ~100 characters
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("IM-0501-0001.jpeg")
        out = tmp_path / "out"
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts/make_shards.py"), "--src", str(src), "--out", str(out),
             "--min-shards", "1", "--val-fraction", "0", "--workers", "1", "--no-progress"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    skipped = {r["path"]: r["reason"] for r in load_manifest(out)["skipped"]}
    assert "FIFO" in skipped["chest_xray/train/NORMAL/IM-0500-0001.jpeg"]
    assert "socket" in skipped["chest_xray/train/NORMAL/IM-0501-0001.jpeg"]
    assert "chest_xray/pipe" in skipped
    assert load_manifest(out)["inputs"]["sharded"] == 4


def test_class_and_split_folders_differing_only_in_case_are_merged(tmp_path):
    """Before: `normal/` next to `NORMAL/` was skipped as "not a class folder"."""
    src = kaggle_layout(tmp_path / "src", patients_per_class=2, images_per_patient=1, val_images=0)
    write(src / "chest_xray/train/normal/IM-0600-0001.jpeg", xray_jpeg(600))
    write(src / "chest_xray/Train/Pneumonia/person600_virus_1.jpeg", xray_jpeg(601))
    out = tmp_path / "out"
    manifest = make_shards(src, out, min_shards=1, val_fraction=0, progress=False)
    assert_accounted(out, src)
    assert not manifest["skipped"]
    assert manifest["splits"]["train"]["per_class"] == {"NORMAL": 3, "PNEUMONIA": 3}
    labels = {m["source"]: m["label_name"] for m in read_samples(out)["train"]}
    assert labels["chest_xray/train/normal/IM-0600-0001.jpeg"] == "NORMAL"
    assert labels["chest_xray/Train/Pneumonia/person600_virus_1.jpeg"] == "PNEUMONIA"


def test_cli_synthetic_with_verify(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "scripts/make_shards.py", "--synthetic", "60", "--synthetic-size", "48", "--out", str(out),
         "--min-shards", "2", "--workers", "1", "--no-progress", "--verify"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout and "train" in result.stdout
    manifest = load_manifest(out)
    assert manifest["command"][:4] == ["python", "scripts/make_shards.py", "--synthetic", "60"]
    again = subprocess.run([sys.executable, "scripts/make_shards.py", "--synthetic", "60", "--out", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
