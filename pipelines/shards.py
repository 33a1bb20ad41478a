"""One way to read a shards folder: a split's shards (tar, DALI index, sample count, hashes), its sample keys,
its labels and the members of its samples.

The loaders' plan (`pipelines.plan`), verification (`pipelines.verify`) and the evaluation report
(`eval.report.load_sample_metadata`) all read through here, so the rules live once:
- a sample key is `<split>-<8-digit position in the split>` (`split_key`), and a tar member's key is its
  file name up to the first dot (`sample_key`, webdataset's and DALI's grouping rule);
- `resolve_split` checks what is cheap on every load: manifest paths stay inside the shards folder, every
  tar and index exists, the tar has the manifest's size, the index has the manifest's sample count and
  nothing follows its last sample in the tar (so no reader can see more or fewer samples than the
  manifest promises). `verify=True` also re-hashes tars and indexes against the manifest's sha256;
- a `.cls` is `0` or `1` or an error naming the shard and key (`parse_label`).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipelines.manifest import FIX_HINT, LABELS, MANIFEST_NAME, ShardsError, load_manifest, sha256_file

TAR_BLOCK = 512


def split_key(split: str, position: int) -> str:
    """The key of the sample at `position` (0-based, in shard order) of `split`: `train-00000042`."""
    return f"{split}-{position:08d}"


def sample_key(name: str) -> str:
    """Key of a tar member name or DALI source_info (`<tar>:<offset>:<member>`).

    `.../train-00000042.jpg` -> `train-00000042`: the file name up to its first dot, webdataset's grouping rule.
    """
    return name.rsplit(":", 1)[-1].rsplit("/", 1)[-1].split(".", 1)[0]


def _member_ext(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[1] if "." in base else ""


def parse_label(raw: bytes, *, key: str, tar: Path | str, shards_dir: Path | str) -> int:
    """The class index in a `.cls` member; anything but `0`..`len(LABELS)-1` is an error naming shard and key."""
    text = bytes(raw).decode("ascii", errors="replace").strip()
    if text not in {str(i) for i in range(len(LABELS))}:
        raise ShardsError(f"sample {key} in shard {tar} has .cls {text[:20]!r}, expected 0 ({LABELS[0]}) or 1 "
                          f"({LABELS[1]}); {FIX_HINT.format(dir=shards_dir)}")
    return int(text)


def read_index(index_path: Path) -> list[list[tuple[str, int, int]]]:
    """Parse a DALI `wds2idx` index: `v1.2 N` then one line per sample of `ext offset size [name]` groups."""
    lines = index_path.read_text().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != "v1.2" or not header[1].isdigit():
        raise ShardsError(f"{index_path}: not a DALI v1.2 index (header {lines[:1]!r})")
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) % 4 or not all(f.isdigit() for i in range(0, len(fields), 4) for f in fields[i + 1:i + 3]):
            raise ShardsError(f"{index_path}:{number}: expected `ext offset size name` groups, got {line!r}")
        samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)])
    if len(samples) != int(header[1]):
        raise ShardsError(f"{index_path}: header says {header[1]} samples, {len(samples)} lines follow")
    return samples


@dataclass(frozen=True)
class Shard:
    """One tar of a split: its files, sample count, size and hashes as the manifest records them."""

    tar: Path
    index: Path
    samples: int
    first: int  # split position (key number) of its first sample
    bytes: int
    sha256: str | None
    index_sha256: str | None


@dataclass(frozen=True)
class Sample:
    """One sample as stored: `parts` maps each member extension to its bytes (None where not read)."""

    shard: Shard
    key: str
    parts: dict[str, bytes | None]


@dataclass(frozen=True)
class SplitShards:
    """A split's shards in manifest order (what the loaders, verification and the report read)."""

    shards_dir: Path
    split: str
    shards: tuple[Shard, ...]
    manifest: dict

    @property
    def tars(self) -> tuple[Path, ...]:
        return tuple(s.tar for s in self.shards)

    @property
    def indexes(self) -> tuple[Path, ...]:
        return tuple(s.index for s in self.shards)

    @property
    def samples(self) -> tuple[int, ...]:
        return tuple(s.samples for s in self.shards)

    @property
    def num_samples(self) -> int:
        return sum(self.samples)

    def keys(self) -> list[str]:
        return [split_key(self.split, i) for i in range(self.num_samples)]

    def shard_at(self, position: int) -> Shard:
        """The shard holding the sample at split position `position`."""
        for shard in self.shards:
            if position < shard.first + shard.samples:
                return shard
        return self.shards[-1]

    def read(self, parts: Iterable[str] | None = ("json",)) -> Iterator[Sample]:
        """Every sample in key order, with the bytes of the members named in `parts` (None: all).

        Members not asked for are skipped by seeking, so reading only the `.json` costs a fraction of a
        decode pass. A sample out of key order, a missing or extra sample, or a tar that does not parse is
        a `ShardsError` naming the shard.
        """
        wanted = None if parts is None else set(parts)
        for shard in self.shards:
            count = 0
            for key, sample_parts in _read_tar(shard.tar, wanted, self.shards_dir):
                expected = split_key(self.split, shard.first + count)
                if count >= shard.samples or key != expected:
                    what = f"sample {count} is {key!r}, expected {expected!r}" if count < shard.samples else \
                        f"holds more than the manifest's {shard.samples} samples"
                    raise ShardsError(f"bad shard {shard.tar}: {what}; {FIX_HINT.format(dir=self.shards_dir)}")
                count += 1
                yield Sample(shard, key, sample_parts)
            if count != shard.samples:
                raise ShardsError(f"bad shard {shard.tar}: reading stops after {count} of the manifest's "
                                  f"{shard.samples} samples (a tar header that does not parse, or a truncated tar); "
                                  f"{FIX_HINT.format(dir=self.shards_dir)}")

    def metadata(self) -> dict[str, dict]:
        """`{key: the sample's .json}` for every sample of the split."""
        metadata = {}
        for sample in self.read(("json",)):
            try:
                metadata[sample.key] = json.loads(sample.parts["json"])
            except (KeyError, TypeError, ValueError):
                raise ShardsError(f"bad shard {sample.shard.tar}: sample {sample.key} has no readable .json; "
                                  f"{FIX_HINT.format(dir=self.shards_dir)}") from None
        return metadata

    def check_keys(self, keys: Iterable[str]) -> None:
        """Raise `ShardsError` unless `keys` (e.g. de-duplicated predictions) are exactly this split's samples.

        The message names the shard of the first missing sample, so an evaluation that skipped samples fails
        instead of reporting metrics on a subset.
        """
        got = set(keys)
        expected = self.keys()
        missing = [k for k in expected if k not in got]
        extra = sorted(got - set(expected))
        if missing:
            shard = self.shard_at(int(missing[0].rsplit("-", 1)[1]))
            raise ShardsError(f"{len(missing)} of {len(expected)} samples of split {self.split!r} were not read "
                              f"(first: {missing[0]} in shard {shard.tar}); {FIX_HINT.format(dir=self.shards_dir)}")
        if extra:
            raise ShardsError(f"{len(extra)} keys are not samples of split {self.split!r} of {self.shards_dir} "
                              f"(first: {extra[0]!r}); {FIX_HINT.format(dir=self.shards_dir)}")


def _read_tar(tar: Path, wanted: set[str] | None, shards_dir: Path) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {ext: bytes or None}) per sample of one tar, grouping consecutive members by key."""
    fix = FIX_HINT.format(dir=shards_dir)
    try:
        # "r:" (not "r"): an uncompressed tar only, so a bad header reads as one message, not one per codec.
        with tarfile.open(tar, "r:") as archive:
            key, parts = None, {}
            for member in archive:
                if not member.isfile():
                    continue
                member_key, ext = sample_key(member.name), _member_ext(member.name)
                if member_key != key:
                    if key is not None:
                        yield key, parts
                    key, parts = member_key, {}
                parts[ext] = archive.extractfile(member).read() if wanted is None or ext in wanted else None
            if key is not None:
                yield key, parts
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardsError(f"bad shard {tar}: not a readable tar ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); {fix}") from None


def _shard_record(shards_dir: Path, manifest_path: Path, split: str, number: int, record) -> tuple[Path, Path]:
    """Check one manifest shard record's fields and paths; return (tar, index) inside `shards_dir`."""
    where = f"{manifest_path} split {split!r} shard {number}"
    fix = FIX_HINT.format(dir=shards_dir)
    if not isinstance(record, dict):
        raise ShardsError(f"{where} is not an object; {fix}")
    for field, kind in (("tar", str), ("index", str), ("samples", int), ("bytes", int)):
        if not isinstance(record.get(field), kind) or isinstance(record.get(field), bool):
            raise ShardsError(f"{where} lacks a valid {field!r} ({kind.__name__}); {fix}")
    paths = []
    for field in ("tar", "index"):
        relative = PurePosixPath(record[field])
        if relative.is_absolute() or ".." in relative.parts or "\\" in record[field]:
            raise ShardsError(f"{where}: {field} path {record[field]!r} leaves the shards folder; the manifest is "
                              f"corrupt or not this tool's; {fix}")
        paths.append(shards_dir / relative)
    return paths[0], paths[1]


def _check_shard(shard: Shard, shards_dir: Path, verify: bool) -> None:
    """Cheap checks of one shard against its manifest record (hashes too with `verify`)."""
    fix = FIX_HINT.format(dir=shards_dir)
    for path, what in ((shard.tar, "shard"), (shard.index, "DALI index (.idx)")):
        if not path.is_file():
            raise ShardsError(f"{what} {path} listed in {shards_dir / MANIFEST_NAME} is missing; {fix}")
    size = shard.tar.stat().st_size
    if size != shard.bytes:
        how = "truncated" if size < shard.bytes else "grown"
        raise ShardsError(f"bad shard {shard.tar}: {size} bytes, the manifest says {shard.bytes} ({how}); {fix}")
    index = read_index(shard.index)
    if len(index) != shard.samples:
        raise ShardsError(f"bad shard {shard.tar}: its index {shard.index} lists {len(index)} samples, the manifest "
                          f"says {shard.samples}; {fix}")
    if index:
        # The member after the index's last sample must be the tar's end-of-archive block; anything else is a
        # sample that the manifest and index do not count and that a tar reader would still read.
        end = max(offset + length for _, offset, length in index[-1])
        next_header = -(-end // TAR_BLOCK) * TAR_BLOCK
        if next_header + 2 * TAR_BLOCK > size:
            raise ShardsError(f"bad shard {shard.tar}: truncated tar: {size} bytes, its index places sample data "
                              f"up to byte {end}; {fix}")
        with open(shard.tar, "rb") as handle:
            handle.seek(next_header)
            block = handle.read(TAR_BLOCK)
        if block.count(0) != TAR_BLOCK:
            raise ShardsError(f"bad shard {shard.tar}: the tar holds data after the last of the {shard.samples} "
                              f"samples its index and the manifest count (at byte {next_header}); {fix}")
    if verify:
        for path, digest in ((shard.tar, shard.sha256), (shard.index, shard.index_sha256)):
            if not digest:
                raise ShardsError(f"bad shard {shard.tar}: the manifest has no sha256 for {path.name} to verify; {fix}")
            if sha256_file(path) != digest:
                raise ShardsError(f"bad shard {shard.tar}: sha256 of {path.name} differs from the manifest "
                                  f"(modified or corrupt); {fix}")


def resolve_split(shards_dir: str | Path, split: str, *, manifest: dict | None = None,
                  verify: bool = False) -> SplitShards:
    """The split's shards, checked against the manifest (see the module doc); `ShardsError` naming the fix if not.

    `manifest`: an already loaded manifest of `shards_dir` (read from disk when None). `verify`: also
    re-hash every tar and index against the manifest (reads every byte of the split).
    """
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir) if manifest is None else manifest
    manifest_path = shards_dir / MANIFEST_NAME
    fix = FIX_HINT.format(dir=shards_dir)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardsError(f"{manifest_path} has no split {split!r} (has {sorted(splits)}); {fix}")
    info = splits[split]
    if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
        raise ShardsError(f"{manifest_path} split {split!r} lacks a 'shards' list; {fix}")
    if not info["shards"]:
        raise ShardsError(f"split {split!r} of {shards_dir} has no shards; {fix}")
    shards, first = [], 0
    for number, record in enumerate(info["shards"]):
        tar, index = _shard_record(shards_dir, manifest_path, split, number, record)
        shard = Shard(tar, index, record["samples"], first, record["bytes"], record.get("sha256"),
                      record.get("index_sha256"))
        _check_shard(shard, shards_dir, verify)
        shards.append(shard)
        first += shard.samples
    return SplitShards(shards_dir, split, tuple(shards), manifest)
