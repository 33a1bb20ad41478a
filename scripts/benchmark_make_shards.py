"""Throughput of make_shards (images/s) for 1 and 2 workers, re-encoding and passing through.

    python scripts/benchmark_make_shards.py --src ../shared/data/kermany-originals-sample --json bench/make_shards.json
    python scripts/benchmark_make_shards.py --dicom 300 --dicom-size 2048 --workers 1 2 --json bench/make_shards-dicom.json

A thin wrapper: the code and its full description live in `pipelines/make_shards/benchmark.py` (`--help` prints it);
the installed alias is `cxr-benchmark-make-shards`.
"""

import sys

from pipelines.make_shards.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
