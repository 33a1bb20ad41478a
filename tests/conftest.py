"""Shared test fixtures: paths to the real data, GPU marker handling."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ORIGINALS_SAMPLE = SHARED_DATA / "kermany-originals-sample"
TRAIN_224 = SHARED_DATA / "kermany-train-224"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import problem means no usable GPU
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def require_dir(path: Path) -> Path:
    """Skip the calling test, with the reason, when a real-data folder is absent."""
    if not path.is_dir():
        pytest.skip(f"real data not present at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A synthetic shards folder (96 images at ~96 px, >= 2 shards per split) built once per test session."""
    from pipelines.make_shards import make_shards

    out = tmp_path_factory.mktemp("tiny-shards") / "synthetic"
    make_shards(None, out, synthetic=96, synthetic_size=96, min_shards=2, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def smoke_training(tiny_shards, tmp_path_factory):
    """One smoke-trained run per session, through `accelerate launch` with the repo's config, W&B offline.

    Returns (run_dir, CompletedProcess). Tests may add files (eval-*/) but must not remove any.
    """
    from _runs import VENV_BIN, run_train, train_env

    run_dir = tmp_path_factory.mktemp("smoke") / "smoke"
    launcher = (str(VENV_BIN / "accelerate"), "launch", "--config_file", "accelerate_config.yaml")
    result = run_train(tiny_shards, run_dir, "--log.wandb=true", launcher=launcher,
                       env=train_env(run_dir.parent, ACCELERATE_USE_CPU="1"))
    return run_dir, result


@pytest.fixture(scope="session")
def smoke_run(smoke_training) -> Path:
    return smoke_training[0]
