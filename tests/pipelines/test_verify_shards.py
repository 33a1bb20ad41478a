"""verify_shards catches tampering: changed bytes, a wrong index, lying metadata, missing files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _shard_edits import rehash
from conftest import REPO

from pipelines.manifest import ShardsError, load_manifest
from pipelines.shards import read_index
from pipelines.verify import verify_shards


@pytest.fixture
def shards_copy(tiny_shards, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    return copy


def test_clean_shards_pass(shards_copy):
    counts = verify_shards(shards_copy)
    assert counts == {split: info["samples"] for split, info in load_manifest(shards_copy)["splits"].items()}


def test_flipped_byte_names_the_shard(shards_copy):
    shard = load_manifest(shards_copy)["splits"]["train"]["shards"][1]
    path = shards_copy / shard["tar"]
    data = bytearray(path.read_bytes())
    jpg = read_index(shards_copy / shard["index"])[0][1]
    data[jpg[1] + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardsError, match=f"bad shard .*{shard['tar']}.*sha256"):
        verify_shards(shards_copy)


def test_label_tampered_with_matching_hash_is_caught(shards_copy):
    shard = load_manifest(shards_copy)["splits"]["val"]["shards"][0]
    path = shards_copy / shard["tar"]
    data = bytearray(path.read_bytes())
    extension, offset, size = read_index(shards_copy / shard["index"])[0][0]
    assert extension == "cls" and size == 1
    data[offset] = ord("1") if data[offset] == ord("0") else ord("0")
    path.write_bytes(bytes(data))
    rehash(shards_copy)
    with pytest.raises(ShardsError, match=f"bad shard .*{shard['tar']}"):
        verify_shards(shards_copy)


def test_wrong_index_is_caught_by_dali(shards_copy):
    """Offsets shifted in the .idx (count unchanged): only a reader that uses the index notices."""
    shard = load_manifest(shards_copy)["splits"]["train"]["shards"][0]
    index = shards_copy / shard["index"]
    lines = index.read_text().splitlines()
    first, second = lines[1], lines[2]
    lines[1], lines[2] = second, first  # DALI now returns samples 0 and 1 swapped
    index.write_text("\n".join(lines) + "\n")
    rehash(shards_copy)
    verify_shards(shards_copy, dali=False)  # reading the tar itself (not the index) sees nothing wrong
    with pytest.raises(ShardsError, match="DALI reads sample 0"):
        verify_shards(shards_copy)


def test_missing_files_and_manifest(shards_copy, tmp_path):
    shard = load_manifest(shards_copy)["splits"]["test"]["shards"][-1]
    (shards_copy / shard["index"]).unlink()
    with pytest.raises(ShardsError, match="is missing"):
        verify_shards(shards_copy)
    with pytest.raises(ShardsError, match="make_shards.py") as error:
        load_manifest(tmp_path / "nowhere")
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, ValueError)


def test_cli_exit_codes(shards_copy):
    ok = subprocess.run([sys.executable, "scripts/verify_shards.py", str(shards_copy), "--no-dali"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "OK" in ok.stdout
    shard = load_manifest(shards_copy)["splits"]["train"]["shards"][0]
    with open(shards_copy / shard["tar"], "r+b") as handle:
        handle.truncate(1024)
    bad = subprocess.run([sys.executable, "scripts/verify_shards.py", str(shards_copy)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and shard["tar"] in bad.stderr
