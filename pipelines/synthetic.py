"""Procedural chest-X-ray-like images for demos and tests: `python scripts/make_shards.py --synthetic 1200 --out shards/synthetic`.

Each image is a frontal "radiograph" at a realistic size (about `size` px, default 1000, aspect and
size jittered per image): dark background, a soft torso, two dark lung fields, a bright mediastinum and
heart shadow, curved ribs and clavicles, vessel-like low-frequency texture, exposure/gamma variation
and quantum-like noise. PNEUMONIA images add opacities inside the lungs: a bacterial subtype gets one
or two focal, textured consolidations; a viral subtype gets many faint bilateral patches. Opacity
contrast is drawn from a wide range, so some cases are subtle, and NORMAL images carry benign
nuisances (bright artefacts outside the lungs, denser vessel markings) so that brightness alone does
not give the label away.

Difficulty target (what the tuning aims at): a ResNet trained from scratch on 64-224 px crops of
~1,000 images reaches val AUROC >= 0.9 within a few hundred steps, but is not at 1.0 after one step;
roughly 10-15 % of PNEUMONIA cases have opacities faint enough to stay hard.

Patients: 1-3 images each (same label), ids `synthetic-PNNNNN`; about 26 % NORMAL by default, as in
Kermany's training split. Splits 80/10/10 **by patient**, stratified by class. Everything is a pure
function of `(seed, index)`, so a rerun gives identical pixels whatever the worker count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_SYNTHETIC_SIZE = 1000
DEFAULT_NORMAL_FRACTION = 0.26
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
MIN_PATIENTS_PER_CLASS = 3


@dataclass(frozen=True)
class SyntheticItem:
    index: int
    split: str
    label: int
    patient: str
    subtype: str
    path: str


def plan_synthetic(num_images: int, *, seed: int = 0,
                   normal_fraction: float = DEFAULT_NORMAL_FRACTION) -> list[SyntheticItem]:
    """Decide labels, patients and splits for `num_images` synthetic images (deterministic by seed)."""
    if not 0.0 < normal_fraction < 1.0:
        raise ValueError(f"normal_fraction must be in (0, 1), got {normal_fraction}")
    rng = np.random.default_rng([seed, 0x5EED])
    patients = []  # (patient id, label, subtype, number of images)
    remaining = num_images
    while remaining > 0:
        count = min(remaining, int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.10])))
        label = 0 if rng.random() < normal_fraction else 1
        subtype = "none" if label == 0 else ("bacteria" if rng.random() < 0.65 else "virus")
        patients.append((f"synthetic-P{len(patients):05d}", label, subtype, count))
        remaining -= count
    split_of = {}
    for label in (0, 1):
        ids = [p[0] for p in patients if p[1] == label]
        if len(ids) < MIN_PATIENTS_PER_CLASS:
            raise ValueError(f"--synthetic {num_images} gives only {len(ids)} patients of class {label}; every "
                             f"split needs both classes: use --synthetic 60 or more")
        order = rng.permutation(len(ids))
        n_val = max(1, round(SPLIT_FRACTIONS["val"] * len(ids)))
        n_test = max(1, round(SPLIT_FRACTIONS["test"] * len(ids)))
        for rank, i in enumerate(order):
            split_of[ids[i]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    items = []
    for patient, label, subtype, count in patients:
        for _ in range(count):
            split = split_of[patient]
            name = ("NORMAL", "PNEUMONIA")[label]
            suffix = "" if subtype == "none" else f"_{subtype}"
            path = f"synthetic/{split}/{name}/{patient}{suffix}_{len(items):06d}.jpeg"
            items.append(SyntheticItem(len(items), split, label, patient, subtype, path))
    return items


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    from PIL import Image

    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    return field / (np.abs(field).max() + 1e-6)


def render_synthetic(item: SyntheticItem, *, seed: int = 0, size: int = DEFAULT_SYNTHETIC_SIZE) -> np.ndarray:
    """Render one image as an 8-bit grayscale array (height, width)."""
    from PIL import Image

    rng = np.random.default_rng([seed, item.index, 1])
    height = max(32, int(size * rng.uniform(0.82, 1.0)))
    width = max(32, int(size * rng.uniform(0.95, 1.25)))
    # Anatomy is smooth, so draw it on a quarter-resolution grid and upsample; only noise needs full res.
    h, w = max(16, height // 4), max(16, width // 4)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y /= h
    x /= w
    cx = 0.5 + rng.normal(0, 0.02)
    img = np.full((h, w), 0.08, np.float32)
    torso = np.exp(-(((x - cx) / (0.42 + rng.normal(0, 0.02))) ** 8 + ((y - 0.62) / 0.62) ** 8))
    img += 0.45 * torso
    lungs = np.zeros_like(img)
    lung_w, lung_h = 0.15 + rng.normal(0, 0.01), 0.30 + rng.normal(0, 0.02)
    for side in (-1, 1):
        lx = cx + side * (0.17 + rng.normal(0, 0.01))
        lungs = np.maximum(lungs, np.exp(-(((x - lx) / lung_w) ** 4 + ((y - 0.50) / lung_h) ** 4)))
    img -= 0.38 * lungs
    heart = np.exp(-(((x - cx - 0.05) / 0.11) ** 2 + ((y - 0.66) / 0.13) ** 2))
    mediastinum = np.exp(-(((x - cx) / 0.06) ** 2)) * (y > 0.15)
    img += 0.22 * np.maximum(heart, mediastinum) * torso
    ribs = np.zeros_like(img)
    spacing = 0.075 + rng.normal(0, 0.004)
    dx = x - cx
    for side in (-1, 1):
        bend, mask = 0.9 * dx**2 - 0.04 * side * dx, side * dx > 0.03
        for k in range(9):
            ribs += np.exp(-(((y - 0.25 - k * spacing - bend) / 0.012) ** 2)) * mask
    img += 0.10 * np.clip(ribs, 0, 1) * torso
    clavicles = np.exp(-(((y - 0.17 + 0.25 * np.abs(x - cx)) / 0.015) ** 2)) * (np.abs(x - cx) < 0.3)
    img += 0.12 * clavicles
    vessel_density = 0.05 + (0.04 * rng.random() if item.label == 0 else 0.03 * rng.random())
    img += vessel_density * lungs * _smooth_field(rng, (h, w), 24)

    if item.label == 1:
        texture = 0.6 + 0.4 * _smooth_field(rng, (h, w), 32)
        # Most opacities are plainly visible; a faint tail (~12 %) keeps the task from being trivial.
        # Measured: with 0.06-0.36 uniform, a ResNet-18 at 64 px was still at chance after 80 steps.
        strength = rng.uniform(0.06, 0.14) if rng.random() < 0.12 else rng.uniform(0.2, 0.5)
        opacity = np.zeros_like(img)
        if item.subtype == "virus":
            for _ in range(rng.integers(6, 14)):
                px, py = cx + rng.choice([-1, 1]) * rng.uniform(0.08, 0.26), rng.uniform(0.3, 0.72)
                sx, sy = rng.uniform(0.04, 0.09), rng.uniform(0.04, 0.09)
                opacity += 0.6 * np.exp(-(((x - px) / sx) ** 2 + ((y - py) / sy) ** 2))
        else:
            for _ in range(rng.integers(1, 3)):
                px, py = cx + rng.choice([-1, 1]) * rng.uniform(0.1, 0.24), rng.uniform(0.35, 0.72)
                # Lobar consolidation covers a good part of a lobe, not a nodule.
                sx, sy = rng.uniform(0.07, 0.14), rng.uniform(0.08, 0.16)
                opacity += np.exp(-(((x - px) / sx) ** 2 + ((y - py) / sy) ** 2) ** 1.5)
        img += strength * np.clip(opacity, 0, 1) * lungs * texture
    elif rng.random() < 0.5:
        # Benign bright artefact (marker, button, electrode) outside the lung fields.
        px, py = rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95)
        spot = np.exp(-(((x - px) / 0.02) ** 2 + ((y - py) / 0.02) ** 2))
        img += rng.uniform(0.2, 0.5) * spot * (1 - lungs)

    # Exposure (gamma, gain, offset) is smooth too: apply it before upsampling, in 8-bit units.
    gamma, gain, offset = rng.uniform(0.8, 1.25), rng.uniform(0.85, 1.15), rng.normal(0, 0.03)
    img = (np.clip(np.clip(img, 0, 1) ** gamma * gain + offset, 0, 1) * 255).astype(np.float32)
    full = np.asarray(Image.fromarray(img, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    noise_sigma = rng.uniform(0.01, 0.035) * 255
    full = full + rng.standard_normal((height, width), dtype=np.float32) * np.float32(noise_sigma)
    return np.clip(full + 0.5, 0, 255).astype(np.uint8)


def encode_synthetic(item: SyntheticItem, *, seed: int = 0, size: int = DEFAULT_SYNTHETIC_SIZE) -> bytes:
    """The synthetic image as a high-quality grayscale JPEG, i.e. what a scanner export would hand us."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(render_synthetic(item, seed=seed, size=size), mode="L").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def dicom_dataset(pixels: np.ndarray, *, bits: int = 12, photometric: str = "MONOCHROME2", modality: str = "DX",
                  patient: str | None = "PAT-0001", body_part: str | None = "CHEST", **attributes):
    """A pydicom `Dataset` holding `pixels` (2-D uint16/int16, or 3-D with `NumberOfFrames=N`), uncompressed,
    with any further DICOM `attributes` (`WindowCenter=...`, `PixelSpacing=[...]`); `None` leaves a tag out.
    For tests and benchmarks: it writes what a modality would, so the reader has something real to parse."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    if patient is not None:
        ds.PatientID = patient
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.tobytes()
    return ds


def dicom_bytes(dataset, *, rle: bool = False) -> bytes:
    """A DICOM Part 10 file of `dataset`; `rle` compresses it with pydicom's own RLE Lossless encoder."""
    import io

    from pydicom.uid import RLELossless

    if rle:
        dataset.compress(RLELossless)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode_synthetic_dicom(item: SyntheticItem, *, seed: int = 0, size: int = DEFAULT_SYNTHETIC_SIZE) -> bytes:
    """The synthetic image as a 16-bit MONOCHROME1 DX file with a window, as a detector exports it: the 8-bit
    render inverted and spread over 16 bits, with fine noise in the low bits."""
    rng = np.random.default_rng([seed, item.index, 2])
    image = render_synthetic(item, seed=seed, size=size).astype(np.float64)
    stored = np.clip((255 - image) * 257 + rng.normal(0, 40, image.shape), 0, 65535).astype(np.uint16)
    return dicom_bytes(dicom_dataset(stored, bits=16, photometric="MONOCHROME1", patient=item.patient,
                                     WindowCenter=32768, WindowWidth=60000, ImagerPixelSpacing=[0.15, 0.15]))
