"""Synthetic DICOM radiographs made with pydicom (`pipelines.synthetic.dicom_dataset`, which only writes
tags), and the reference 8-bit pixels computed from the raw array with numpy (DICOM PS3.3 C.11.2.1.2
windowing), independently of the code under test."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipelines.synthetic import dicom_bytes as to_bytes
from pipelines.synthetic import dicom_dataset as dataset

__all__ = ["dataset", "jpeg_baseline", "radiograph", "reference_lut", "reference_minmax", "reference_window",
           "to_bytes", "with_voi_lut"]


def radiograph(bits: int = 12, height: int = 80, width: int = 96, signed: bool = False) -> np.ndarray:
    """A non-square image spanning the whole `bits` range: a horizontal ramp plus a bright disc."""
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    y, x = np.mgrid[0:height, 0:width]
    ramp = x / (width - 1)
    disc = ((y - height * 0.35) ** 2 + (x - width * 0.7) ** 2) < (min(height, width) * 0.2) ** 2
    values = np.clip(0.8 * ramp + 0.2 * disc + 0.05 * (y / height), 0, 1)
    return np.round(low + values * (high - low)).astype(np.int16 if signed else np.uint16)


def voi_lut_item(first_mapped: int, lut: np.ndarray, lut_bits: int = 16) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(lut), first_mapped, lut_bits]
    item.LUTData = lut.astype("<u2").tobytes()  # OW: 16-bit little-endian words
    return item


def with_voi_lut(ds: Dataset, first_mapped: int, lut: np.ndarray) -> Dataset:
    ds.VOILUTSequence = Sequence([voi_lut_item(first_mapped, lut)])
    return ds


def reference_window(raw: np.ndarray, center: float, width: float, slope: float = 1.0, intercept: float = 0.0,
                     monochrome1: bool = False) -> np.ndarray:
    """8-bit display values: rescale, linear window (PS3.3 C.11.2.1.2.1) onto 0..255, then MONOCHROME1 inverted."""
    x = raw.astype(np.float64) * slope + intercept
    y = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    y = np.rint(y)
    return (255 - y if monochrome1 else y).astype(np.uint8)


def reference_lut(raw: np.ndarray, first_mapped: int, lut: np.ndarray, monochrome1: bool = False) -> np.ndarray:
    """8-bit display values through a (monotonic) VOI LUT, scaled over its first..last entry."""
    y = lut[np.clip(raw.astype(np.int64) - first_mapped, 0, len(lut) - 1)].astype(np.float64)
    y = np.rint((y - lut[0]) * 255 / (lut[-1] - lut[0]))
    return (255 - y if monochrome1 else y).astype(np.uint8)


def reference_minmax(raw: np.ndarray, monochrome1: bool = False) -> np.ndarray:
    x = raw.astype(np.float64)
    y = np.rint((x - x.min()) * 255 / (x.max() - x.min()))
    return (255 - y if monochrome1 else y).astype(np.uint8)


def jpeg_baseline(raw: np.ndarray, **attributes) -> bytes:
    """An 8-bit DICOM whose pixel data is one JPEG Baseline frame (pydicom decodes it with Pillow)."""
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buffer = io.BytesIO()
    Image.fromarray(raw.astype(np.uint8), "L").save(buffer, "JPEG", quality=95)
    ds = dataset(raw.astype(np.uint8), bits=8, **attributes)
    ds.BitsAllocated = 8
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)
