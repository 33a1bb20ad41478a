"""scripts/gpu_check.py: results land under --out after every step, and the budget skips what cannot fit."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _check(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "scripts/gpu_check.py"), "--out", str(out), "--work",
                    str(tmp_path / "work"), "--rehearse", *args], check=True, cwd=REPO, timeout=120,
                   capture_output=True)
    return json.loads((out / "gpu_check.json").read_text())


def test_facts_step_writes_the_three_result_files(tmp_path):
    results = _check(tmp_path, "--steps", "facts")
    facts = results["steps"]["facts"]
    assert facts["torch"] and facts["nvidia.dali"] and "cuda_available" in facts
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["artifacts.tar.gz", "gpu_check.json", "gpu_check.log"]
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        assert "artifacts" in tar.getnames()


def test_a_step_that_cannot_fit_the_budget_is_skipped_and_says_so(tmp_path):
    results = _check(tmp_path, "--steps", "facts,run30", "--budget-s", "60")
    assert "skipped" not in results["steps"]["facts"]
    assert "skipped" in results["steps"]["run30"] and "needs" in results["steps"]["run30"]["skipped"]
