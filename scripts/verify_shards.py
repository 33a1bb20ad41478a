"""Check a shards folder against its manifest.

    python scripts/verify_shards.py shards/NAME [--no-dali]

A thin wrapper: the code and its full description live in `pipelines/verify_cli.py` (`--help` prints it);
the installed alias is `cxr-verify-shards`.
"""

import sys

from pipelines.verify_cli import main

if __name__ == "__main__":
    sys.exit(main())
