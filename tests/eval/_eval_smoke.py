"""Helpers for the eval.run tests: offline W&B environment and smoke training as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def offline_env(tmp: Path) -> dict[str, str]:
    """W&B offline into `tmp`, never the network; one intra-op thread per process on the shared CPU."""
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train_smoke(shards: Path, run_dir: Path, *overrides: str) -> Path:
    cmd = [sys.executable, "train/run.py", "--config", "train/configs/smoke.yaml", f"--data.shards={shards}",
           f"--run.dir={run_dir}", "--log.wandb=false", *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=offline_env(run_dir.parent))
    assert result.returncode == 0, f"smoke training failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return run_dir

