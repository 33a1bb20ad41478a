"""The device and mixed-precision rule shared by training and evaluation."""

from __future__ import annotations

import os
import warnings

import torch
from accelerate import Accelerator


def build_accelerator(**kwargs) -> Accelerator:
    """An Accelerator with the launch's mixed precision on GPU and fp32 on CPU (warning if bf16 was asked for).

    bf16 autocast on CPUs without native bf16 is an order of magnitude slower than fp32; fp32 keeps CPU runs
    predictable and comparable (on AVX512-BF16 hosts bf16 measured faster: docs/benchmarks.md).
    """
    requested = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    mixed_precision = requested
    if on_cpu and requested != "no":
        warnings.warn(f"mixed_precision={requested} requested but this runs on CPU: using fp32", stacklevel=2)
        mixed_precision = "no"
    return Accelerator(cpu=on_cpu, mixed_precision=mixed_precision, **kwargs)


def input_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype loaders emit: what the model's first layer computes in, so autocast has nothing to cast."""
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32


def configure_cuda_backends() -> None:
    """cuDNN autotuning and TF32 matmuls/convolutions: the one place these flags are set (training,
    evaluation and the benchmark). No-op without CUDA."""
    if not torch.cuda.is_available():
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
