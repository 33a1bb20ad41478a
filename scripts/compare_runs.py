"""Compare training runs: the config keys that differ, key results, and val AUROC / train loss curves.

    python scripts/compare_runs.py runs/baseline runs/lr3e-4 [--split test] [--out compare_runs.png]
    python scripts/compare_runs.py --wandb ENTITY/PROJECT [--group G] [--tag T] [--out compare_runs.png]

A thin wrapper: the code and its full description live in `eval/compare.py` (`--help` prints it);
the installed alias is `cxr-compare-runs`.
"""

import sys

from eval.compare import main

if __name__ == "__main__":
    sys.exit(main())
