"""Launch the real entry points as subprocesses, W&B offline, on the shared 2-core CPU (train and eval tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def train_env(tmp: Path, **extra: str) -> dict[str, str]:
    """W&B offline into `tmp`, never the network; one intra-op thread per process on the shared CPU."""
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true",
            "OMP_NUM_THREADS": "1",
            # Prepended, not replaced: a host whose packages come on PYTHONPATH (a carried stack) keeps them.
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p), **extra}


def train_cmd(shards: Path, run_dir: Path, *overrides: str, launcher: tuple[str, ...] = ()) -> list[str]:
    entry = [sys.executable] if not launcher else list(launcher)
    return [*entry, "train/run.py", "--config", "train/configs/smoke.yaml", f"--data.shards={shards}",
            f"--run.dir={run_dir}", *overrides]


def run_train(shards: Path, run_dir: Path, *overrides: str, launcher: tuple[str, ...] = (),
              env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(train_cmd(shards, run_dir, *overrides, launcher=launcher), cwd=REPO,
                            capture_output=True, text=True, timeout=timeout,
                            env=env or train_env(run_dir.parent))
    assert result.returncode == 0, f"training failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
