"""pipelines.shards: one key rule, one reader, and the load-time checks that keep every sample read exactly once."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
from _shard_edits import drop_one_sample, edit_manifest, garble_header, rehash
from _shard_truth import split_labels

from eval.report import load_sample_metadata
from pipelines.loaders import build_loader
from pipelines.manifest import ShardsError, load_manifest
from pipelines.plan import resolve_split
from pipelines.shards import read_index, sample_key, split_key
from pipelines.spec import PreprocessSpec
from pipelines.verify import verify_shards


@pytest.fixture
def shards_copy(tiny_shards, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    return copy


def one_line_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(ShardsError, match=match) as error:
        call(*args, **kwargs)
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


def test_one_key_rule_for_members_dali_source_info_and_positions(tiny_shards):
    assert sample_key("train-00000042.jpg") == sample_key("a/b/train-00000042.json") == "train-00000042"
    assert sample_key("/x/val/val-000001.tar:1536:train-00000042.jpg") == "train-00000042"
    assert split_key("test", 7) == "test-00000007"
    shards = resolve_split(tiny_shards, "val")
    truth = split_labels(tiny_shards, "val")  # read with tarfile alone, no pipelines code
    assert shards.keys() == sorted(truth) == [s.key for s in shards.read()]
    assert [shards.shard_at(i).tar for i in range(shards.num_samples)] == [
        t for t, n in zip(shards.tars, shards.samples, strict=True) for _ in range(n)]


def test_report_metadata_comes_from_the_same_reader(tiny_shards):
    metadata = load_sample_metadata(tiny_shards, "test")
    assert list(metadata) == resolve_split(tiny_shards, "test").keys()
    assert all(meta["key"] == key and meta["label"] == label
               for (key, meta), label in zip(metadata.items(), split_labels(tiny_shards, "test").values(), strict=True))
    with pytest.raises(ShardsError, match="no split 'holdout'"):
        load_sample_metadata(tiny_shards, "holdout")


def test_check_keys_names_the_shard_of_a_sample_never_predicted(tiny_shards):
    shards = resolve_split(tiny_shards, "train")
    keys = shards.keys()
    shards.check_keys(keys + keys[:3])  # padding duplicates are fine
    second = shards.shards[1]
    missing = split_key("train", second.first + 1)
    message = one_line_error("were not read", shards.check_keys, [k for k in keys if k != missing])
    assert missing in message and str(second.tar) in message
    one_line_error("not samples of split", shards.check_keys, [*keys, "val-00000000"])


def test_manifest_count_lower_than_the_tar_is_an_error_naming_the_shard(shards_copy):
    """Before: the loaders trusted the manifest's count and evaluation silently used a subset."""
    shard = load_manifest(shards_copy)["splits"]["val"]["shards"][0]
    edit_manifest(shards_copy, drop_one_sample("val"))
    message = one_line_error("lists .* samples, the manifest says", resolve_split, shards_copy, "val")
    assert shard["tar"] in message
    spec = PreprocessSpec.from_manifest(shards_copy, image_size=32)
    for loader in ("dali", "torch"):
        with pytest.raises(ShardsError, match=shard["tar"]):
            build_loader(shards_copy, "val", spec=spec, per_device_batch_size=2, train=False, loader=loader)


def test_index_and_manifest_both_lower_than_the_tar_is_caught(shards_copy):
    shard = load_manifest(shards_copy)["splits"]["val"]["shards"][0]
    index = shards_copy / shard["index"]
    lines = index.read_text().splitlines()
    index.write_text("\n".join([f"v1.2 {len(lines) - 2}", *lines[1:-1]]) + "\n")
    edit_manifest(shards_copy, drop_one_sample("val"))
    rehash(shards_copy)
    message = one_line_error("holds data after the last", resolve_split, shards_copy, "val")
    assert shard["tar"] in message


def test_truncated_or_grown_tar_is_named(tiny_shards, shards_copy):
    rel = load_manifest(shards_copy)["splits"]["train"]["shards"][0]["tar"]
    with open(shards_copy / rel, "r+b") as handle:
        handle.truncate(2048)
    assert rel in one_line_error(r"2048 bytes, the manifest says \d+ \(truncated\)", resolve_split, shards_copy,
                                 "train")
    rehash(shards_copy)  # a manifest that agrees with the short tar: its index still reaches further
    assert rel in one_line_error("truncated tar", resolve_split, shards_copy, "train")
    shutil.copy(tiny_shards / rel, shards_copy / rel)
    _rewrite_tar(shards_copy / rel, extra_sample="train-99999999")  # the tar gains a sample its index lacks
    assert rel in one_line_error(r"\(grown\)", resolve_split, shards_copy, "train")
    rehash(shards_copy)
    assert rel in one_line_error("holds data after the last", resolve_split, shards_copy, "train")


def test_verify_true_rehashes_against_the_manifest(shards_copy):
    shard = load_manifest(shards_copy)["splits"]["test"]["shards"][0]
    path = shards_copy / shard["tar"]
    data = bytearray(path.read_bytes())
    jpg = read_index(shards_copy / shard["index"])[0][1]
    data[jpg[1] + 100] ^= 0xFF  # same size, same index: only a hash can tell
    path.write_bytes(bytes(data))
    resolve_split(shards_copy, "test")
    message = one_line_error("sha256", resolve_split, shards_copy, "test", verify=True)
    assert shard["tar"] in message


@pytest.mark.parametrize("field, value", [("tar", "../../etc/passwd"), ("index", "/etc/hostname"),
                                          ("tar", "..\\..\\x.tar")])
def test_manifest_paths_stay_inside_the_shards_folder(shards_copy, field, value):
    def escape(manifest):
        manifest["splits"]["val"]["shards"][0][field] = value
    edit_manifest(shards_copy, escape)
    assert repr(value) in one_line_error("leaves the shards folder", resolve_split, shards_copy, "val")
    one_line_error("leaves the shards folder", verify_shards, shards_copy, dali=False)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["splits"]["val"].pop("shards"), "lacks a 'shards' list"),
    (lambda m: m["splits"]["val"]["shards"][0].pop("samples"), "lacks a valid 'samples'"),
    (lambda m: m["splits"]["val"]["shards"].__setitem__(0, "val/val-000000.tar"), "is not an object"),
])
def test_malformed_shard_records_are_one_line_errors(shards_copy, edit, match):
    edit_manifest(shards_copy, edit)
    one_line_error(match, verify_shards, shards_copy, dali=False)
    one_line_error(match, resolve_split, shards_copy, "val")


def _rewrite_tar(tar: Path, *, extra_sample: str) -> None:
    """The same tar with one more sample (`.cls`, `.jpg`, `.json`) appended."""
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    extra = [(f"{extra_sample}.{ext}", data) for ext, data in (("cls", b"0"), ("jpg", members[1][1]), ("json", b"{}"))]
    with tarfile.open(tar, "w") as dst:
        for member, data in members:
            dst.addfile(member, io.BytesIO(data))
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("where", ["first", "middle"])
def test_tar_header_that_does_not_parse_names_the_tar(shards_copy, where):
    shard = load_manifest(shards_copy)["splits"]["val"]["shards"][0]
    garble_header(shards_copy / shard["tar"], 0 if where == "first" else 4)
    rehash(shards_copy)
    for call, args in ((load_sample_metadata, (shards_copy, "val")), (verify_shards, (shards_copy,))):
        message = one_line_error("bad shard", call, *args, **({"dali": False} if call is verify_shards else {}))
        assert shard["tar"] in message
