"""CSV-labelled sources: an NIH-14-style PNG set and an RSNA-style DICOM set into the same shards (labels,
official or patient-disjoint splits, every file accounted for), verified and read by both loaders; column
options and their errors through the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from _dicom import dataset, jpeg_baseline, radiograph, reference_window, to_bytes
from conftest import REPO
from PIL import Image
from test_make_shards import read_samples, write

from pipelines.loaders import build_loader
from pipelines.make_shards import LabelSource, make_shards
from pipelines.make_shards.labels import AMBIGUOUS_REASON, NIH_OTHER_REASON
from pipelines.make_shards.patients import hash_patient
from pipelines.manifest import ShardsError, load_manifest
from pipelines.spec import PreprocessSpec
from pipelines.verify import verify_shards

NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"


def png(seed: int, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    array = (np.linspace(20, 230, 64)[None, :] + rng.normal(0, 8, (64, 64))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, "L").convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def nih_set(root: Path) -> Path:
    """An NIH ChestX-ray14-like folder; returns the CSV. See the test for the counts it implies."""
    rows, train_val, test = [], [], []

    def image(patient: int, number: int, findings: str, lst: list | None, present: bool = True, mode: str = "L"):
        name = f"{patient:08d}_{number:03d}.png"
        rows.append(f"{name},{findings},{number},{patient:08d},45,M,PA")
        if lst is not None:
            lst.append(name)
        if present:
            write(root / f"images_{1 if patient <= 20 else 2:03d}" / "images" / name, png(patient * 10 + number, mode))

    for p in range(1, 13):  # 12 patients x 2 images in train_val: 12 PNEUMONIA, 12 NORMAL
        image(p, 0, "Pneumonia" if p % 2 else "No Finding", train_val, mode="RGBA" if p == 3 else "L")
        image(p, 1, "Pneumonia|Effusion" if p % 2 else "No Finding", train_val)
    image(13, 0, "Effusion", train_val)  # other finding: excluded by default
    image(13, 1, "No Finding", train_val)
    for p in range(30, 34):  # the official test split
        image(p, 0, "Pneumonia" if p < 32 else "No Finding", test)
    image(40, 0, "No Finding", None)  # listed in the CSV, in no split list
    image(99, 0, "No Finding", train_val, present=False)  # listed, no file
    write(root / "images_002" / "images" / "00000098_000.png", png(98))  # a file the CSV does not list
    write(root / "README.txt", b"not an image")
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    csv_path = root / "Data_Entry_2017_v2020.csv"
    csv_path.write_text(NIH_HEADER + "\n".join(rows) + "\n")
    return csv_path


def accounted(manifest: dict, out: Path) -> list[str]:
    """Every input file's place: sharded, rejected, skipped, excluded or removed (each once)."""
    sharded = [s["source"] for split in read_samples(out).values() for s in split]
    places = (sharded + [r["path"] for r in manifest["rejected"] + manifest["skipped"] + manifest["excluded"]]
              + [p for d in manifest["duplicates"] for p in d["removed"]])
    assert len(places) == len(set(places)), "an input is listed twice"
    return places


def read_split_with_both_loaders(out: Path, split: str) -> None:
    spec = PreprocessSpec.from_manifest(out, image_size=32)
    count = load_manifest(out)["splits"][split]["samples"]
    for loader in ("dali", "torch"):
        built = build_loader(out, split, spec=spec, per_device_batch_size=3, train=False, loader=loader, num_workers=1)
        batches = list(built)
        assert sorted(k for b in batches for k in b.keys) == [f"{split}-{i:08d}" for i in range(count)], loader
        assert all(tuple(b.images.shape[1:]) == (1, 32, 32) for b in batches)


def test_nih14_preset_official_lists_other_findings_missing_and_unlisted(tmp_path):
    root = tmp_path / "nih"
    csv_path = nih_set(root)
    out = tmp_path / "out"
    manifest = make_shards(root, out, labels=LabelSource(csv_path, preset="nih14"), val_fraction=0.25, min_shards=2,
                           patient_salt="s3cret", progress=False)
    splits = manifest["splits"]
    assert splits["test"]["per_class"] == {"NORMAL": 2, "PNEUMONIA": 2}
    train_val = {n: splits["train"]["per_class"][n] + splits["val"]["per_class"][n] for n in ("NORMAL", "PNEUMONIA")}
    assert train_val == {"NORMAL": 13, "PNEUMONIA": 12} and splits["val"]["samples"] > 0
    # Excluded, with the reason and the CSV's findings: the other finding, and the image in no split list.
    excluded = {e["path"]: e for e in manifest["excluded"]}
    assert excluded["images_001/images/00000013_000.png"]["reason"] == NIH_OTHER_REASON
    assert excluded["images_001/images/00000013_000.png"]["csv_label"] == "Effusion"
    assert "in none of the split lists" in excluded["images_002/images/00000040_000.png"]["reason"]
    assert manifest["inputs"]["excluded"] == 2 and manifest["label_source"]["excluded"][NIH_OTHER_REASON] == 1
    assert manifest["missing"] == [{"name": "00000099_000.png", "reason": "listed on line 33 of "
                                    "Data_Entry_2017_v2020.csv, no file of that name (or name without extension) "
                                    "under --src"}]
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert skipped["images_002/images/00000098_000.png"].startswith("not listed in Data_Entry_2017_v2020.csv")
    assert skipped["README.txt"].startswith("not listed") and skipped["test_list.txt"] == "the labels CSV or a split list"
    assert manifest["label_source"]["unlisted"] == 2 and manifest["label_source"]["split_lists"] == str(root.resolve())
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(accounted(manifest, out)) == files and manifest["inputs"]["files"] == len(files)
    samples = read_samples(out)
    by_patient = defaultdict(set)
    for split, metas in samples.items():
        for meta in metas:
            number = int(Path(meta["source"]).name[:8])
            assert meta["patient"] == hash_patient(f"{number:08d}", "s3cret")  # never the id in clear
            assert meta["label"] == int("Pneumonia" in meta["source_label"]), meta
            by_patient[meta["patient"]].add(split)
            assert (split == "test") == (30 <= number < 34)
    assert all(len(s) == 1 for s in by_patient.values()), "a patient in two splits"
    assert manifest["patients"]["from"] == {"CSV column 'Patient ID'": 29}
    assert verify_shards(out) == {s: i["samples"] for s, i in splits.items()}
    read_split_with_both_loaders(out, "test")


def test_nih_other_negative_keeps_other_findings_as_normal(tmp_path):
    root = tmp_path / "nih"
    csv_path = nih_set(root)
    manifest = make_shards(root, tmp_path / "out", labels=LabelSource(csv_path, preset="nih14", nih_other="negative"),
                           min_shards=1, progress=False)
    assert manifest["inputs"]["excluded"] == 1 and manifest["inputs"]["sharded"] == 30
    effusion = [m for m in read_samples(tmp_path / "out")["train"] + read_samples(tmp_path / "out")["val"]
                if m["source"].endswith("00000013_000.png")]
    assert [(m["label"], m["source_label"]) for m in effusion] == [(0, "Effusion")]


def rsna_set(root: Path) -> tuple[Path, Path, dict]:
    """RSNA-style: `<patientId>.dcm` under stage_2_train_images/, the CSV beside it; returns (images, CSV,
    {patientId: expected label})."""
    images = root / "stage_2_train_images"
    rows, labels = [], {}
    for i in range(24):
        pid = f"{i:08x}-0000-4000-8000-{i:012x}"
        positive = i % 3 == 0
        if positive:  # one row per box
            rows += [f"{pid},100,200,50,60,1", f"{pid},400,210,40,70,1"]
        elif i == 1:
            rows += [f"{pid},,,,,0", f"{pid},10,20,30,40,1"]  # any row 1 -> 1
            positive = True
        else:
            rows.append(f"{pid},,,,,0")
        labels[pid] = int(positive)
        raw = radiograph(12)
        if i == 2:
            data = jpeg_baseline((raw >> 4).astype(np.uint8), modality="CR", patient=pid)
        else:
            # Two anonymised headers with one constant PatientID: the CSV's patientId must still tell them apart.
            data = to_bytes(dataset(raw, modality="CR", patient="ANONYMOUS" if i in (5, 7) else pid,
                                    WindowCenter=2048, WindowWidth=4096,
                                    photometric="MONOCHROME1" if i == 4 else "MONOCHROME2",
                                    ImagerPixelSpacing=[0.168, 0.168]))
        write(images / f"{pid}.dcm", data)
    write(images / "ffffffff-test-image.dcm", to_bytes(dataset(radiograph(12), patient="x")))  # not in the CSV
    csv_path = root / "stage_2_train_labels.csv"
    csv_path.write_text("patientId,x,y,width,height,Target\n" + "\n".join(rows) + "\n")
    return images, csv_path, labels


def test_rsna_preset_dicoms_any_positive_row_and_patient_disjoint_test_split(tmp_path):
    images, csv_path, labels = rsna_set(tmp_path / "rsna")
    out = tmp_path / "out"
    manifest = make_shards(images, out, labels=LabelSource(csv_path, preset="rsna", test_fraction=0.25),
                           val_fraction=0.2, max_side=0, quality=95, min_shards=1, patient_salt="s", progress=False)
    assert manifest["inputs"]["sharded"] == 24 and not manifest["rejected"] and not manifest["missing"]
    assert manifest["label_source"]["rows"] == 24 + 8 + 1 and manifest["label_source"]["listed_images"] == 24
    assert manifest["label_source"]["test_fraction"] == 0.25 and manifest["label_source"]["split_lists"] is None
    assert [s["path"] for s in manifest["skipped"]] == ["ffffffff-test-image.dcm"]
    assert manifest["patients"]["from"] == {"CSV column 'patientId'": 24} and manifest["patients"]["distinct"] == 24
    samples = read_samples(out)
    assert {split: len(m) for split, m in samples.items() if m}.keys() == {"train", "val", "test"}
    seen = {}
    for split, metas in samples.items():
        for meta in metas:
            pid = Path(meta["source"]).stem
            assert pid not in seen, "a patient in two splits"
            seen[pid] = split
            assert meta["label"] == labels[pid] and meta["patient"] == hash_patient(pid, "s")
            if pid.startswith("00000001"):
                assert meta["source_label"] == "0|1"
            if pid.startswith("00000004"):  # MONOCHROME1, windowed: compare the stored pixels with numpy's
                pixels = np.asarray(Image.open(io.BytesIO(meta["jpg"])), np.float64)
                expected = reference_window(radiograph(12), 2048, 4096, monochrome1=True)
                assert np.abs(pixels - expected).mean() < 2 and np.abs(pixels - (255 - expected)).mean() > 40
                assert meta["dicom"]["pixel_spacing_mm"] == [0.168, 0.168]
            if pid.startswith("00000002"):
                assert meta["dicom"]["transfer_syntax"] == "JPEG Baseline (Process 1)"
    assert len(seen) == 24
    assert verify_shards(out) == {s: i["samples"] for s, i in manifest["splits"].items()}
    read_split_with_both_loaders(out, "train")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/make_shards.py", "--min-shards", "1", "--workers", "1",
                           "--no-progress", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_explicit_columns_through_the_cli_and_the_salt_is_not_recorded(tmp_path):
    src = tmp_path / "src"
    rows = []
    for i in range(12):
        write(src / "scans" / f"scan{i}.png", png(500 + i))
        rows.append(f"scans/scan{i}.png,{'pneumonia' if i % 2 else 'normal'},MRN{i // 2}")
    write(tmp_path / "labels.csv", ("file,finding,mrn\n" + "\n".join(rows) + "\n").encode())
    out = tmp_path / "out"
    result = run_cli("--src", str(src), "--labels", str(tmp_path / "labels.csv"), "--path-col", "file",
                     "--label-col", "finding", "--positive", "pneumonia", "--patient-col", "mrn",
                     "--test-fraction", "0.3", "--patient-salt", "hospital-secret", "--out", str(out), "--verify")
    assert result.returncode == 0, result.stderr
    assert "labels " in result.stdout and "by patient, test fraction 0.3" in result.stdout
    text = (out / "manifest.json").read_text()
    assert "hospital-secret" not in text and "MRN" not in text
    manifest = json.loads(text)
    salt_at = manifest["command"].index("--patient-salt")
    assert manifest["command"][salt_at + 1] == "<secret>"
    assert manifest["args"]["patient_salt"] == "given (not recorded)" and manifest["patients"]["salt"] is None
    metas = [m for split in read_samples(out).values() for m in split]
    assert sorted(m["source"] for m in metas) == sorted(r.split(",")[0] for r in rows)
    assert all(m["label"] == int(m["source_label"] == "pneumonia") for m in metas)
    assert {m["patient"] for m in metas} == {hash_patient(f"MRN{i}", "hospital-secret") for i in range(6)}


@pytest.mark.parametrize("extra, message", [
    (["--label-col", "nope", "--path-col", "file", "--positive", "x"], "has no column 'nope' (columns: file, finding, "
                                                                        "mrn); pass --label-col NAME"),
    (["--path-col", "file", "--label-col", "finding"], "give --positive VALUE"),
    (["--preset", "nih14"], "has no column 'Image Index'"),
    (["--preset", "rsna", "--test-fraction", "0.2", "--split-lists", "LISTS"], "--test-fraction 0.2 given, but the split "
                                                                              "lists in"),
    (["--preset", "rsna", "--split-lists", "SRC"], "split lists in"),
])
def test_label_options_errors_are_one_line_exit_2(tmp_path, extra, message):
    src = tmp_path / "src"
    write(src / "a.png", png(1))
    write(tmp_path / "labels.csv", b"file,finding,mrn\na.png,normal,1\n")
    write(tmp_path / "lists" / "train_val_list.txt", b"a.png\n")
    write(tmp_path / "lists" / "test_list.txt", b"")
    extra = [str(tmp_path / "lists") if a == "LISTS" else str(src) if a == "SRC" else a for a in extra]
    result = run_cli("--src", str(src), "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out"), *extra)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_csv_options_without_labels_and_a_missing_csv_are_errors(tmp_path):
    src = tmp_path / "src"
    write(src / "a.png", png(1))
    result = run_cli("--src", str(src), "--preset", "rsna", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "--preset needs --labels CSV" in result.stderr
    with pytest.raises(ShardsError, match=r"labels CSV .*nowhere.csv does not exist; pass --labels PATH"):
        make_shards(src, tmp_path / "out", labels=LabelSource(tmp_path / "nowhere.csv", preset="rsna"), progress=False)


def test_a_name_matching_two_files_is_excluded_as_ambiguous(tmp_path):
    src = tmp_path / "src"
    for folder in ("a", "b"):
        write(src / folder / "x.png", png(ord(folder)))
    for i in range(4):
        write(src / "c" / f"y{i}.png", png(10 + i))
    write(tmp_path / "l.csv", ("f,t\nx.png,1\n" + "".join(f"y{i}.png,{i % 2}\n" for i in range(4))).encode())
    manifest = make_shards(src, tmp_path / "out", labels=LabelSource(tmp_path / "l.csv", path_col="f", label_col="t",
                                                                     positive="1", test_fraction=0),
                           val_fraction=0, min_shards=1, progress=False)
    assert [(e["path"], e["csv_values"], e["also_named"]) for e in manifest["excluded"]] == [
        ("a/x.png", ["x.png"], ["b/x.png"]), ("b/x.png", ["x.png"], ["a/x.png"])]
    assert manifest["label_source"]["excluded"] == {AMBIGUOUS_REASON: 2}
    assert manifest["inputs"]["sharded"] == 4
