"""Check a whole shards folder against its manifest: `python scripts/verify_shards.py shards/NAME`.

`verify_shards(dir)` resolves every split with `pipelines.shards.resolve_split(verify=True)` (paths, sizes,
index counts, sha256 of every tar and index), reads every sample's members through the same API (keys in
order, label in range and equal to the json's, a JPEG, per-class counts) and then reads and decodes every
sample again with DALI's CPU reader through the `.idx` files, as the DALI loader does, so a tampered,
truncated or mis-indexed shard is named before a multi-hour job trips over it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.manifest import ShardsError, load_manifest
from pipelines.shards import SplitShards, parse_label, resolve_split

SAMPLE_PARTS = {"jpg", "cls", "json"}


def _read_samples(shards: SplitShards) -> list[tuple[str, int, dict]]:
    """(key, label, metadata) of every sample, each checked against itself."""
    samples = []
    for sample in shards.read(parts=None):
        tar = sample.shard.tar
        if set(sample.parts) != SAMPLE_PARTS:
            raise ShardsError(f"bad shard {tar}: sample {sample.key!r} has components {sorted(sample.parts)}, "
                              f"expected {sorted(SAMPLE_PARTS)}")
        label = parse_label(sample.parts["cls"], key=sample.key, tar=tar, shards_dir=shards.shards_dir)
        try:
            meta = json.loads(sample.parts["json"])
        except ValueError as exc:
            raise ShardsError(f"bad shard {tar}: sample {sample.key} has an unreadable .json ({exc})") from None
        if meta.get("label") != label or meta.get("key") != sample.key or sample.parts["jpg"][:2] != b"\xff\xd8":
            raise ShardsError(f"bad shard {tar}: sample {sample.key} disagrees with itself (label {label}, "
                              f"json label {meta.get('label')}, json key {meta.get('key')})")
        samples.append((sample.key, label, meta))
    return samples


def _read_with_dali(shards: SplitShards, expected: list[tuple[str, int, dict]]) -> None:
    """Read and decode every sample through the `.idx` files with DALI's CPU operators."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    total = len(expected)
    batch_size = max(1, min(64, total))

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def read_all():
        jpegs, labels, metas = fn.readers.webdataset(
            paths=[str(t) for t in shards.tars], index_paths=[str(i) for i in shards.indexes],
            ext=["jpg", "cls", "json"], missing_component_behavior="error", random_shuffle=False,
            name="reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)
        return images.shape(), labels, metas

    try:
        pipe = read_all()
        pipe.build()
        epoch_size = pipe.reader_meta("reader")["epoch_size"]
    except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError subclasses with the cause
        raise ShardsError(f"bad shard in {[str(t) for t in shards.tars]}: DALI cannot open them through their .idx "
                          f"files: {str(exc).splitlines()[0]}") from exc
    if epoch_size != total:
        raise ShardsError(f"bad index among {[str(i) for i in shards.indexes]}: DALI sees {epoch_size} samples, "
                          f"manifest says {total}")
    position = 0
    while position < total:
        try:
            shapes, labels, metas = pipe.run()
        except Exception as exc:  # noqa: BLE001
            raise ShardsError(f"bad shard {shards.shard_at(position).tar}: DALI fails near sample {position}: "
                              f"{str(exc).splitlines()[0]}") from exc
        for i in range(min(batch_size, total - position)):
            key, label, meta = expected[position]
            tar = shards.shard_at(position).tar
            dali_label = parse_label(np.asarray(labels[i]).tobytes(), key=key, tar=tar, shards_dir=shards.shards_dir)
            dali_meta = json.loads(bytes(np.asarray(metas[i])))
            shape = tuple(int(s) for s in np.asarray(shapes[i]))
            if (dali_label, dali_meta) != (label, meta) or shape != (meta["stored_height"], meta["stored_width"], 1):
                raise ShardsError(f"bad shard {tar}: DALI reads sample {position} as {dali_meta.get('key')} label "
                                  f"{dali_label} shape {shape}; the tar holds {key} label {label} size "
                                  f"{meta['stored_height']}x{meta['stored_width']}")
            position += 1
    del pipe


def verify_shards(shards_dir: str | Path, *, dali: bool = True, check_hashes: bool = True) -> dict:
    """Re-hash every shard and read every sample (and again with DALI); raise `ShardsError` on a mismatch.

    Returns `{split: samples}` as read. The error names the bad shard and what differs.
    """
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    counts = {}
    for split, info in manifest["splits"].items():
        if info.get("samples") == 0 and info.get("shards") == []:
            counts[split] = 0  # every input of this split was rejected; make_shards records it so
            continue
        shards = resolve_split(shards_dir, split, manifest=manifest, verify=check_hashes)
        samples = _read_samples(shards)
        if len(samples) != info.get("samples"):
            raise ShardsError(f"split {split} of {shards_dir}: {len(samples)} samples read, manifest says "
                              f"{info.get('samples')}")
        per_class = {name: 0 for name in manifest["labels"]}
        for _, label, _ in samples:
            per_class[manifest["labels"][label]] += 1
        if per_class != info.get("per_class"):
            raise ShardsError(f"split {split} of {shards_dir}: per-class counts {per_class} differ from the "
                              f"manifest {info.get('per_class')}")
        if dali and samples:
            _read_with_dali(shards, samples)
        counts[split] = len(samples)
    return counts
