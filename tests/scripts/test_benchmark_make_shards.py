"""scripts/benchmark_make_shards.py --dicom at a tiny size: the DICOM set is written, sharded and reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dicom_mode_shards_every_file_it_wrote(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "scripts/benchmark_make_shards.py"), "--dicom", "6", "--dicom-size",
                    "96", "--workers", "1", "--repeats", "1", "--scratch", str(tmp_path), "--json", str(out)],
                   check=True, cwd=REPO, capture_output=True, text=True, timeout=180)
    report = json.loads(out.read_text())
    assert report["source"] == "synthetic 16-bit DICOM 6 @ 96px"
    [row] = report["results"]
    assert (row["mode"], row["workers"], row["images"], row["rejected"], row["passthrough"]) == ("re-encode", 1, 6, 0, 0)
    assert row["convert_images_per_sec"] > 0
    assert not list(tmp_path.glob("bench-make-shards-*")), "scratch files left behind"
