"""Check a shards folder against its manifest: `python scripts/verify_shards.py shards/NAME`.

Re-hashes every tar and index, reads every sample through `pipelines.shards` (the API the loaders' plan and
the evaluation report use) and again (decoding the JPEGs) with DALI's CPU reader through the `.idx` files,
and compares keys, labels, metadata and counts (see `pipelines/verify.py`). Exit status 0 when everything
matches; 2 with a one-line message naming the bad shard otherwise. `--no-dali` skips the DALI pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.manifest import ShardsError  # noqa: E402 - after the path fix
from pipelines.verify import verify_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards_dir", type=Path, help="folder with manifest.json, e.g. shards/synthetic")
    parser.add_argument("--no-dali", dest="dali", action="store_false", help="skip the DALI read")
    args = parser.parse_args(argv)
    try:
        counts = verify_shards(args.shards_dir, dali=args.dali)
    except ShardsError as exc:
        print(f"verify_shards: FAILED: {exc}", file=sys.stderr)
        return 2
    print(f"verify_shards: OK {args.shards_dir}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
