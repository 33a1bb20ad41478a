"""A smoke-trained run shared by the eval.run tests (trained once per session, as a subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _eval_smoke import train_smoke


@pytest.fixture(scope="session")
def smoke_run(tiny_shards, tmp_path_factory) -> Path:
    return train_smoke(tiny_shards, tmp_path_factory.mktemp("eval-smoke") / "smoke")
