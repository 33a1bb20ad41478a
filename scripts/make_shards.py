"""Chest X-ray folders (Kaggle layout, DICOM/PNG sets named by a labels CSV) or a synthetic set -> shards.

    python scripts/make_shards.py --src ~/data/chest_xray --out shards/kermany --workers 2
    python scripts/make_shards.py --src ~/data/nih --labels ~/data/nih/Data_Entry_2017_v2020.csv --preset nih14 --out shards/nih14
    python scripts/make_shards.py --synthetic 1200 --out shards/synthetic --overwrite

A thin wrapper: the code and its full description live in `pipelines/make_shards/cli.py` (`--help` prints it);
the installed alias is `cxr-make-shards`.
"""

import sys

from pipelines.make_shards.cli import main

if __name__ == "__main__":
    sys.exit(main())
