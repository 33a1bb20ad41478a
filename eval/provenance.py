"""Which shards a model was trained on, and whether an evaluation's samples were among them.

Training records the sha256 of the manifest it read and hashes of its train and val splits' sample keys and
contents (`best/meta.json` key `data`, and `summary.json`), and lists the content identity of every training
sample in `best/train_samples.json`. `eval.run` refuses shards whose manifest hash differs unless
`--allow-other-shards`, and every report counts the evaluated samples that were in the model's training
split: 0 for a valid report.

Content identity is the sha256 of the sample's stored JPEG bytes, read from the tars. Not the key: keys are
`<split>-<counter>`, renumbered by every rebuild, so another seed puts other images behind the same key and a
training image carved into val gets a `val-*` key that no training key equals. Not the source path: paths are
names, not content (the synthetic set reuses the same paths for other images under another seed, and two
datasets can share relative names). `make_shards` converts without any seed (and passes grayscale JPEGs
through byte for byte), so one input converted with the same `--max-side`/`--quality` is the same bytes in
every rebuild, whatever its split, key or shard; `make_shards` also drops byte-identical inputs, the same
notion of "one image". Other conversion options re-encode every image and byte identity cannot see the
copies: the overlap is then reported as unknown, and the report as not valid, never as 0.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipelines.manifest import FIX_HINT, MANIFEST_NAME, ShardsError, sha256_file
from pipelines.shards import resolve_split

IDENTITY = "sha256 of the stored JPEG bytes"
TRAIN_SAMPLES = "train_samples.json"
# make_shards arguments that change the stored bytes of a given input (the seed does not; --synthetic-size
# renders other inputs, which rightly match nothing).
CONVERSION_ARGS = ("max_side", "quality")


def split_content(shards_dir: str | Path, split: str, manifest: dict | None = None) -> dict[str, str]:
    """`{key: sha256 of the stored JPEG}` for every sample of `split` (the other members are skipped)."""
    content = {}
    for sample in resolve_split(shards_dir, split, manifest=manifest).read(("jpg",)):
        if sample.parts.get("jpg") is None:
            raise ShardsError(f"bad shard {sample.shard.tar}: sample {sample.key} has no .jpg; "
                              f"{FIX_HINT.format(dir=shards_dir)}")
        content[sample.key] = hashlib.sha256(sample.parts["jpg"]).hexdigest()
    return content


def _digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def _conversion(manifest: dict) -> dict:
    args = manifest.get("args") or {}
    return {k: args.get(k) for k in CONVERSION_ARGS}


@dataclass(frozen=True)
class TrainingData:
    """What a run records about the data it trained on."""

    meta: dict  # best/meta.json "data"
    train_samples: dict  # best/train_samples.json

    def summary(self) -> dict:
        """The hashes summary.json carries (flat keys, like the rest of it)."""
        splits = self.meta["splits"]
        return {"manifest_sha256": self.meta["manifest_sha256"],
                "train_keys_sha256": splits[self.meta["train_split"]]["keys_sha256"],
                "val_keys_sha256": splits[self.meta["val_split"]]["keys_sha256"]}


def record_training_data(shards_dir: str | Path, manifest: dict, train_split: str, val_split: str) -> TrainingData:
    """Hash the manifest and both splits' keys and contents (reads every JPEG of both splits once)."""
    shards_dir = Path(shards_dir)
    contents = {split: split_content(shards_dir, split, manifest) for split in (train_split, val_split)}
    meta = {
        "manifest": str(shards_dir / MANIFEST_NAME),
        "manifest_sha256": sha256_file(shards_dir / MANIFEST_NAME),
        "conversion": _conversion(manifest),
        "identity": IDENTITY,
        "train_split": train_split,
        "val_split": val_split,
        "splits": {split: {"samples": len(content), "keys_sha256": _digest(content),
                           "content_sha256": _digest(content.values())} for split, content in contents.items()},
    }
    samples = {"identity": IDENTITY, "split": train_split, "sha256": sorted(set(contents[train_split].values()))}
    return TrainingData(meta, samples)


def other_shards_problem(meta: dict, shards_dir: Path, run_dir: Path, allow_other_shards: bool) -> str | None:
    """Why evaluating `shards_dir` must be refused (one line naming the fix), or None."""
    recorded = (meta.get("data") or {}).get("manifest_sha256")
    if allow_other_shards:
        return None
    if recorded is None:
        return (f"{run_dir / 'best' / 'meta.json'} records no manifest sha256 (trained before runs recorded their "
                "shards), so these shards cannot be checked: pass --allow-other-shards to evaluate anyway")
    current = sha256_file(shards_dir / MANIFEST_NAME)
    if current == recorded:
        return None
    return (f"{shards_dir / MANIFEST_NAME} (sha256 {current[:12]}) is not the manifest this model was trained on "
            f"({recorded[:12]}, {meta['data'].get('manifest')}): the shards were rebuilt or are others. Evaluate "
            "on the training shards, or pass --allow-other-shards (the report then counts evaluated samples that "
            "were in the model's training split)")


def check_training_overlap(meta: dict, best_dir: Path, shards_dir: Path, manifest: dict, splits: Iterable[str],
                           allow_other_shards: bool) -> dict:
    """The report's `provenance.data` section: same shards or not, and per evaluated split how many samples
    were in the model's training split (None: unknown, with the reason). `valid` only when all are 0."""
    recorded = meta.get("data") or {}
    current = sha256_file(shards_dir / MANIFEST_NAME)
    check = {"manifest_sha256": current, "trained_on_manifest_sha256": recorded.get("manifest_sha256"),
             "same_shards": current == recorded.get("manifest_sha256"), "allow_other_shards": allow_other_shards,
             "identity": IDENTITY, "in_training_split": {}, "unknown_reason": None}
    trained = _training_content(best_dir)
    if isinstance(trained, str):
        check["unknown_reason"] = trained
    elif recorded.get("conversion") != _conversion(manifest):
        check["unknown_reason"] = (f"these shards were converted with {_conversion(manifest)}, the model's with "
                                   f"{recorded.get('conversion')}: re-encoded copies of training images cannot be "
                                   "recognised by their bytes")
    else:
        for split in dict.fromkeys(splits):
            content = split_content(shards_dir, split, manifest)
            check["in_training_split"][split] = sum(h in trained for h in content.values())
    check["valid"] = check["unknown_reason"] is None and not any(check["in_training_split"].values())
    check["warning"] = None if check["valid"] else _warning(check)
    return check


def _training_content(best_dir: Path) -> set[str] | str:
    """The training split's content hashes, or why they are not available."""
    path = best_dir / TRAIN_SAMPLES
    if not path.is_file():
        return f"{path} is missing (trained before runs recorded their training samples)"
    try:
        samples = json.loads(path.read_text())
        if samples.get("identity") != IDENTITY:
            return f"{path} holds another identity ({samples.get('identity')!r}), not {IDENTITY!r}"
        return set(samples["sha256"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        return f"{path} is unreadable ({exc})"


def _warning(check: dict) -> str:
    if check["unknown_reason"]:
        return (f"NOT A VALID EVALUATION: whether evaluated samples were in the model's training split is unknown: "
                f"{check['unknown_reason']}")
    counts = ", ".join(f"{n} {split} sample(s)" for split, n in check["in_training_split"].items() if n)
    return (f"NOT A VALID EVALUATION: {counts} evaluated here were in the model's training split "
            f"(matched by {IDENTITY}); these metrics overstate how the model does on unseen images")


def flag_report(report_md: Path, check: dict) -> None:
    """Put the warning of an invalid evaluation at the top of report.md, where no reader can miss it."""
    if check.get("warning"):
        report_md.write_text(f"> **WARNING — {check['warning']}**\n\n{report_md.read_text()}")
