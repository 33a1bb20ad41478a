"""The device and mixed-precision rule shared by training and evaluation."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

# /proc/cpuinfo flags of CPUs that compute bf16 in hardware: AVX512-BF16 dot products (Cooper Lake, Zen 4+)
# and AMX tiles (Sapphire Rapids+). oneDNN also "supports" bf16 on plain AVX512 by emulating it, which
# measured an order of magnitude slower than fp32, so emulation does not count as native here.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_support(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool, str]:
    """(native, why): whether this CPU has bf16 arithmetic in hardware, and the evidence.

    The CPU flags first (Linux); without /proc/cpuinfo, torch's own probe of the same instructions.
    """
    path = Path(cpuinfo)
    if path.is_file():
        flags: set[str] = set()
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[-1].split())
        found = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
        if found:
            return True, f"CPU flag {' and '.join(found)} in {path}"
        if flags:
            return False, f"neither {' nor '.join(NATIVE_BF16_FLAGS)} among the CPU flags in {path}"
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    found = [flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]
    if found:
        return True, f"torch.cpu reports {' and '.join(found)}"
    return False, "no native bf16 (torch.cpu reports neither AVX512-BF16 nor AMX)"


@dataclass(frozen=True)
class Precision:
    mixed_precision: str  # what Accelerate runs: "no", "bf16" or "fp16"
    reason: str  # one line for the run log
    fell_back: bool = False  # the launch asked for mixed precision this device cannot run fast (warned about)


def choose_precision(requested: str, on_cpu: bool, cpu_bf16: tuple[bool, str]) -> Precision:
    """The launch's mixed precision on GPU; on CPU bf16 only where the CPU has it natively, else fp32.

    bf16 autocast on CPUs without native bf16 is an order of magnitude slower than fp32; on AVX512-BF16 it
    measured 1.9x faster (docs/benchmarks.md). fp16 autocast on CPU has no fast kernels at all.
    """
    if requested == "no":
        return Precision("no", "fp32: no mixed precision requested")
    if not on_cpu:
        return Precision(requested, f"{requested} requested by the launch config, on GPU")
    native, why = cpu_bf16
    if requested == "bf16" and native:
        return Precision("bf16", f"bf16 requested by the launch config and this CPU has native bf16 ({why})")
    detail = why if requested == "bf16" else "fp16 has no fast CPU kernels"
    return Precision("no", f"mixed_precision={requested} requested but this runs on CPU ({detail}): using fp32",
                     fell_back=True)


def _on_cpu() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()


def launch_precision() -> Precision:
    """The rule applied to this process: the launcher's request (ACCELERATE_MIXED_PRECISION) and the device.
    A pure function of the environment, so the run log can state the reason `build_accelerator` acted on."""
    on_cpu = _on_cpu()
    return choose_precision(os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), on_cpu,
                            cpu_bf16_support() if on_cpu else (False, "on GPU"))


def build_accelerator(**kwargs) -> Accelerator:
    """An Accelerator with the launch's mixed precision on GPU; on CPU bf16 where native, else fp32 (warning)."""
    precision = launch_precision()
    if precision.fell_back:
        warnings.warn(precision.reason, stacklevel=2)
    return Accelerator(cpu=_on_cpu(), mixed_precision=precision.mixed_precision, **kwargs)


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
