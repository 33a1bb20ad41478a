"""bf16 + channels_last training steps on CUDA through Accelerate (skipped without a GPU)."""

from __future__ import annotations

import json

import pytest
import torch
from _runs import VENV_BIN, run_train, train_env

pytestmark = pytest.mark.gpu


def test_bf16_channels_last_steps_on_cuda():
    from accelerate import Accelerator

    from train.config import ModelConfig, OptimConfig
    from train.model import build_model
    from train.optim import build_optimizer

    accelerator = Accelerator(mixed_precision="bf16")
    model = build_model(ModelConfig(), in_channels=1).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.to(accelerator.device), OptimConfig())
    model, optimizer = accelerator.prepare(model, optimizer)
    images = torch.randn(16, 224, 224, 1, device=accelerator.device).permute(0, 3, 1, 2)  # DALI's HWC layout
    labels = torch.randint(0, 2, (16,), device=accelerator.device)
    before = accelerator.unwrap_model(model).fc.weight.detach().clone()
    seen = {}
    handle = accelerator.unwrap_model(model).layer1.register_forward_hook(
        lambda _m, _i, out: seen.update(dtype=out.dtype, cl=out.is_contiguous(memory_format=torch.channels_last)))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    handle.remove()
    assert seen == {"dtype": torch.bfloat16, "cl": True}
    assert torch.isfinite(loss).item()
    assert not torch.equal(before, accelerator.unwrap_model(model).fc.weight.detach())


def test_run_py_on_cuda_uses_bf16_and_the_mixed_decoder(tiny_shards, tmp_path):
    run_dir = tmp_path / "gpu-smoke"
    launcher = (str(VENV_BIN / "accelerate"), "launch", "--config_file", "accelerate_config.yaml")
    result = run_train(tiny_shards, run_dir, "--log.wandb=false", launcher=launcher, env=train_env(tmp_path))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["device"].startswith("cuda")
    # DALI is part of the GPU stack: the run must decode on the GPU, not fall back to the torch loader.
    assert summary["loader"] == "dali" and "mixed" in summary["loader_reason"]
    assert "using fp32" not in result.stderr
