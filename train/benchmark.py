"""Throughput benchmarks: data loaders, the model's training step, and end-to-end training.

    make bench   # = .venv/bin/python scripts/benchmark_throughput.py --what all --device auto --json bench/throughput.json

    # one mode, explicit inputs (CPU):
    .venv/bin/python scripts/benchmark_throughput.py --what loader --loaders dali,torch,imagefolder \
        --device cpu --shards shards/originals --src ../shared/data/kermany-originals-sample \
        --json /tmp/bench-loader.json

    # GPU host, the whole grid (fp32/bf16 x NCHW/channels_last x eager/compile) and training on the 224 px set:
    .venv/bin/python scripts/benchmark_throughput.py --what all --device cuda \
        --precisions fp32,bf16 --formats nchw,channels_last --compile-modes eager,compile \
        --train-shards shards/kermany-train-224 --json bench/throughput-gpu.json

Modes (`--what`):
- `loader`: images/s of each loader (`--loaders dali,torch,imagefolder`) and its ratio to the seed-style
  `imagefolder` baseline (the seed notebook's ImageFolder + PIL over the original folders, `--src`); the
  shard loaders read shards made from the same images with default `make_shards.py` settings (`--shards`).
- `model`: one training step (forward, backward, gradient clipping, AdamW) on a synthetic batch that is
  already on the device, for each of `--precisions` x `--formats` x `--compile-modes`.
- `train`: the same step fed by a real loader (`--train-loaders`, DALI by default) on `--train-shards`;
  the data-stall fraction is `1 - train/model` against the model-only figure for the same configuration.
- `all`: loader, model and train.

Every figure is the median over `--repeats` timed windows of `--steps` batches, after `--warmup` batches
that are not timed (torch.compile and cuDNN autotuning happen there). The device is synchronised only at
the edges of a timed window. `--profile DIR` adds a torch.profiler trace of each model/train row. Defaults depend on the device: small on CPU so `make bench` takes a few
minutes on 2 cores (scale with --batch-size/--steps/--repeats), GPU-sized on CUDA. Missing inputs are
found or built: `--src` defaults to ../shared/data/kermany-originals-sample when present (else the
baseline is skipped with a note) and `--shards` to shards made from it under bench/ (else shards/synthetic
or a small synthetic set built under bench/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

DEFAULT_SRC = REPO.parent / "shared" / "data" / "kermany-originals-sample"
BENCH_DIR = REPO / "bench"
SHARD_LOADERS: tuple[str, ...] = ("dali", "torch")
ALL_LOADERS = ("dali", "torch", "imagefolder")
PRECISIONS = ("fp32", "bf16")
FORMATS = ("nchw", "channels_last")
COMPILE_MODES = ("eager", "compile")
# (batch size, steps, warm-up, repeats): CPU keeps `make bench` to a few minutes on 2 cores, where one
# ResNet50 224 px training image costs 0.2-1 s (more when other jobs share the cores); on CUDA the batch is the default recipe's per-device batch
# (so train rows predict the real run) and windows are long enough for stable medians.
DEVICE_DEFAULTS = {"cpu": (8, 2, 2, 3), "cuda": (128, 50, 15, 3)}
# Loader warm-up in batches: the first batch carries the pipeline build / worker start-up (and nvJPEG set-up on CUDA).
LOADER_WARMUP = {"cpu": 1, "cuda": 3}
CPU_GRID_NOTE = ("CPU default grid is fp32 x {nchw, channels_last} x eager: bf16 autocast is an order of magnitude "
                 "slower on CPUs without native bf16 (training runs bf16 only on AVX512-BF16/AMX CPUs, see "
                 "train/launch.py and docs/benchmarks.md) and torch.compile needs a C++ toolchain and minutes of compilation per "
                 "configuration; measure them with --precisions fp32,bf16 --compile-modes eager,compile")
RSS_NOTE = ("peak_host_rss_mb is this process's peak resident memory during the row (VmHWM reset before each row); "
            "DataLoader worker processes are not included. peak_gpu_mb is torch's allocator peak; DALI's own GPU "
            "memory pool is not included")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peaks(device: torch.device) -> bool:
    """Reset the peak counters; False when the host RSS peak cannot be reset (it is then the process's so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        # Linux >= 4.0: "5" resets VmHWM, so each row reports its own peak rather than the process's so far.
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peaks(device: torch.device) -> dict:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss_mb = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_host_rss_mb": round(rss_mb, 1), "peak_gpu_mb": None if gpu_mb is None else round(gpu_mb, 1)}


def time_windows(run_step: Callable[[], int], *, device: torch.device, warmup: int, steps: int, repeats: int,
                 wait: list[float] | None = None) -> dict:
    """Run `warmup` untimed steps, then `repeats` timed windows of `steps` steps; medians of the windows.

    `run_step()` does one step and returns its number of images (from tensor shapes: no host sync).
    `wait`, when given, is a one-element list the step adds its loader-wait seconds to.
    """
    rss_per_row = _reset_peaks(device)
    start = time.perf_counter()
    for _ in range(warmup):
        run_step()
    _sync(device)
    warmup_seconds = time.perf_counter() - start
    rates, seconds, wait_fracs = [], [], []
    images = 0
    for _ in range(repeats):
        if wait is not None:
            wait[0] = 0.0
        start = time.perf_counter()
        images = sum(run_step() for _ in range(steps))
        _sync(device)
        elapsed = time.perf_counter() - start
        rates.append(images / elapsed)
        seconds.append(elapsed)
        if wait is not None:
            wait_fracs.append(wait[0] / elapsed)
    out = {"images": images, "seconds": round(statistics.median(seconds), 4),
           "images_per_sec": round(statistics.median(rates), 2),
           "images_per_sec_repeats": [round(r, 2) for r in rates], "warmup_steps": warmup,
           "warmup_seconds": round(warmup_seconds, 3), "steps": steps, "repeats": repeats, **_peaks(device),
           # Without a VmHWM reset the host peak covers every earlier row of this process too.
           "peak_host_rss_scope": "row" if rss_per_row else "process so far (/proc/self/clear_refs not writable)"}
    if wait is not None:
        out["host_wait_frac"] = round(statistics.median(wait_fracs), 4)
    return out


def _endless(loader) -> Iterator:
    """Batches over successive epochs, as training sees them (epoch boundaries included)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        count = 0
        for item in loader:
            count += 1
            yield item
        if count == 0:
            raise SystemExit(f"{loader!r} yields no batches: lower --batch-size or use a larger split")
        epoch += 1


def _input_dtype(precision: str) -> torch.dtype:
    """What the loader emits for a model running in `precision` (train.launch.input_dtype's rule)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _shard_loader(name: str, shards: Path, s: Settings, *, train: bool, split: str,
                  dtype: torch.dtype = torch.float32):
    from pipelines.loaders import build_loader
    from pipelines.spec import PreprocessSpec

    spec = PreprocessSpec.from_manifest(shards, image_size=s.image_size)
    loader = build_loader(shards, split, spec=spec, per_device_batch_size=s.batch_size, train=train, loader=name,
                          device=s.device, num_workers=s.num_workers, dtype=dtype)
    if len(loader) == 0:
        raise SystemExit(f"{shards}/{split} has {loader.num_samples} samples: fewer than one batch of "
                         f"--batch-size {s.batch_size}; lower it or pass larger --shards/--train-shards")
    return loader, spec.channels


def _imagefolder_loader(s: Settings):
    from pipelines.imagefolder import build_imagefolder_loader

    return build_imagefolder_loader(s.src, image_size=s.image_size, batch_size=s.batch_size,
                                    num_workers=s.num_workers, split=s.split)


def _progress(row: dict) -> dict:
    # Rows take seconds to minutes on CPU: show each as it lands, the table comes at the end.
    print(f"  {row['mode']:<6} {row['config']}: {row['images_per_sec']:.1f} images/s", flush=True)
    return row


def profile_steps(run_step: Callable[[], int], *, device: torch.device, steps: int, out_dir: Path, name: str) -> str:
    """`steps` more steps under torch.profiler: a Chrome trace and the top operators, to show where time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            run_step()
        _sync(device)
    trace = out_dir / f"{slug}.trace.json"
    prof.export_chrome_trace(str(trace))
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out_dir / f"{slug}.top.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
    return str(trace)


def _time_loader(loader, to_tensor: Callable, s: Settings, steps: int) -> dict:
    """Each window is a fresh epoch: its start-up (DALI pipeline build, DataLoader workers) falls in the warm-up."""
    windows = []
    for _ in range(s.repeats):
        stream = _endless(loader)
        windows.append(time_windows(lambda stream=stream: to_tensor(next(stream)).shape[0], device=s.device,
                                    warmup=s.loader_warmup, steps=steps, repeats=1))
        stream.close()  # ends the epoch now: releases the DALI pipeline / DataLoader workers
    rates = [w["images_per_sec"] for w in windows]
    return {**windows[0], "images_per_sec": round(statistics.median(rates), 2), "images_per_sec_repeats": rates,
            "seconds": round(statistics.median(w["seconds"] for w in windows), 4), "repeats": s.repeats,
            "warmup_seconds": round(statistics.median(w["warmup_seconds"] for w in windows), 3),
            "peak_host_rss_mb": max(w["peak_host_rss_mb"] for w in windows),
            "peak_gpu_mb": None if windows[0]["peak_gpu_mb"] is None else max(w["peak_gpu_mb"] for w in windows)}


def bench_loader(s: Settings, session: Session) -> list[dict]:
    device = s.device
    results = []
    for name in s.loaders:
        if name == "imagefolder":
            loader = _imagefolder_loader(s)

            def to_tensor(item):
                # The seed notebook moves each batch to the device itself; do the same so the work compares.
                return item[0].to(device, non_blocking=True)

            extra = {"source": str(s.src), "channels": 3, "preprocessing": "eval"}
        else:
            loader, channels = _shard_loader(name, s.shards, s, train=s.mode == "train", split=s.split)

            def to_tensor(item):
                return item.images

            extra = {"source": str(s.shards), "channels": channels, "reason": loader.reason,
                     "preprocessing": s.mode}
        # One pass over the split per window unless --steps says otherwise.
        steps = s.steps_explicit or max(1, len(loader) - s.loader_warmup)
        timing = _time_loader(loader, to_tensor, s, steps)
        del loader
        results.append(_progress({"mode": "loader", "loader": name,
                                  "config": f"{name} {extra['preprocessing']} {s.image_size}px bs{s.batch_size}",
                                  "batch_size": s.batch_size, "image_size": s.image_size, **timing, **extra}))
    baseline = next((r["images_per_sec"] for r in results if r["loader"] == "imagefolder"), None)
    for result in results:
        ratio = round(result["images_per_sec"] / baseline, 3) if baseline else None
        result["ratio_to_baseline"] = result["speedup_vs_imagefolder"] = ratio
        result["data_stall_frac"] = None
    return results


def build_train_step(*, arch: str, channels: int, precision: str, memory_format: str, compile_mode: str,
                     device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`train.loop.train_step` (the step training runs) without Accelerate: autocast forward, fp32 loss,
    backward, clip, AdamW.

    bf16 uses `torch.autocast(device_type, dtype=torch.bfloat16)` around the forward only, which is what
    Accelerate's `mixed_precision="bf16"` wraps the model's forward in.
    """
    from train.config import ModelConfig, OptimConfig
    from train.loop import train_step
    from train.model import build_model
    from train.optim import build_loss, build_optimizer

    optim_cfg = OptimConfig()
    model = build_model(ModelConfig(arch=arch), channels)
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device).train()
    optimizer = build_optimizer(model, optim_cfg)
    loss_fn = build_loss(optim_cfg, None).to(device)
    forward = torch.compile(model) if compile_mode == "compile" else model
    use_bf16 = precision == "bf16"
    to_format = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return train_step(forward, images.contiguous(memory_format=to_format), labels, loss_fn=loss_fn,
                          optimizer=optimizer, backward=torch.Tensor.backward,
                          clip_grad_norm=torch.nn.utils.clip_grad_norm_, grad_clip_norm=optim_cfg.grad_clip_norm,
                          autocast=partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=use_bf16))

    return step


def _model_key(s: Settings, channels: int, precision: str, memory_format: str, compile_mode: str):
    return (s.arch, channels, precision, memory_format, compile_mode, s.image_size, s.batch_size)


def _describe(key: tuple) -> str:
    arch, channels, precision, memory_format, compile_mode, image_size, batch_size = key
    return f"{arch} {precision} {memory_format} {compile_mode} {image_size}px bs{batch_size} {channels}ch"


def _check_loss(loss: torch.Tensor, what: str) -> float:
    value = loss.float().item()  # after the timed window: the only host read of the loss
    if not math.isfinite(value):
        raise SystemExit(f"{what}: the training loss is {value}; the step is broken, the figure would be meaningless")
    return round(value, 4)


def run_model_config(s: Settings, key: tuple) -> dict:
    arch, channels, precision, memory_format, compile_mode, image_size, batch_size = key
    device = s.device
    step = build_train_step(arch=arch, channels=channels, precision=precision, memory_format=memory_format,
                            compile_mode=compile_mode, device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    # The dtype the loader hands a model of this precision (bf16 for bf16 autocast): the same batch as train rows.
    images = torch.randn(batch_size, channels, image_size, image_size, generator=generator).to(
        device, _input_dtype(precision))
    if memory_format == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch_size,), generator=generator).to(device)
    last = [None]

    def run_step() -> int:
        last[0] = step(images, labels)
        return batch_size

    timing = time_windows(run_step, device=device, warmup=s.warmup, steps=s.steps, repeats=s.repeats)
    if s.profile:
        timing["profile"] = profile_steps(run_step, device=device, steps=min(s.steps, 10), out_dir=s.profile,
                                          name=f"model-{_describe(key)}")
    return _progress({"mode": "model", "config": _describe(key), "arch": arch, "channels": channels,
            "precision": precision, "memory_format": memory_format, "compile": compile_mode, "batch_size": batch_size,
            "image_size": image_size, **timing, "final_loss": _check_loss(last[0], _describe(key))})


def bench_model(s: Settings, session: Session) -> list[dict]:
    results = []
    for precision in s.precisions:
        for memory_format in s.formats:
            for compile_mode in s.compile_modes:
                key = _model_key(s, 1, precision, memory_format, compile_mode)
                results.append(run_model_config(s, key))
                session.model_cache[key] = results[-1]
    _model_ratios(results)
    return results


def _model_ratios(results: list[dict]) -> None:
    """Ratio to the seed notebook's setting (fp32, NCHW, eager) for the same arch, size and batch."""
    for result in results:
        base = next((r for r in results if r["precision"] == "fp32" and r["memory_format"] == "nchw"
                     and r["compile"] == "eager" and r["arch"] == result["arch"]
                     and r["channels"] == result["channels"] and r["batch_size"] == result["batch_size"]
                     and r["image_size"] == result["image_size"]), None)
        result["ratio_to_baseline"] = round(result["images_per_sec"] / base["images_per_sec"], 3) if base else None
        result["data_stall_frac"] = None


def run_train_config(s: Settings, name: str) -> dict:
    """The model step fed by loader `name` over successive epochs of the training split."""
    device = s.device
    if name == "imagefolder":
        loader, channels, source = _imagefolder_loader(s), 3, str(s.src)
        stream = ((images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
                  for images, labels in _endless(loader))
    else:
        loader, channels = _shard_loader(name, s.train_shards, s, train=True, split="train",
                                         dtype=_input_dtype(s.train_precision))
        source = str(s.train_shards)
        stream = ((batch.images, batch.labels) for batch in _endless(loader))
    key = _model_key(s, channels, s.train_precision, s.train_format, s.train_compile_mode)
    step = build_train_step(arch=s.arch, channels=channels, precision=s.train_precision,
                            memory_format=s.train_format, compile_mode=s.train_compile_mode, device=device)
    wait, last = [0.0], [None]

    def run_step() -> int:
        # Host time blocked on the loader; on CUDA, DALI's GPU work overlaps the queued model step.
        start = time.perf_counter()
        images, labels = next(stream)
        wait[0] += time.perf_counter() - start
        last[0] = step(images, labels)
        return images.shape[0]

    timing = time_windows(run_step, device=device, warmup=s.warmup, steps=s.steps, repeats=s.repeats,
                          wait=wait)
    if s.profile:
        timing["profile"] = profile_steps(run_step, device=device, steps=min(s.steps, 10), out_dir=s.profile,
                                          name=f"train-{name}-{_describe(key)}")
    stream.close()
    return _progress({"mode": "train", "loader": name, "config": f"{name} -> {_describe(key)}",
            "arch": s.arch, "channels": channels, "precision": s.train_precision, "memory_format": s.train_format,
            "compile": s.train_compile_mode, "batch_size": s.batch_size, "image_size": s.image_size,
            "source": source, **timing, "final_loss": _check_loss(last[0], f"train {name}"), "model_key": key})


def bench_train(s: Settings, session: Session) -> list[dict]:
    results = [run_train_config(s, name) for name in s.train_loaders]
    references = []
    for result in results:
        key = result.pop("model_key")
        if key not in session.model_cache:
            print(f"model-only reference for train: {_describe(key)}", flush=True)
            session.model_cache[key] = run_model_config(s, key)
            references.append(session.model_cache[key])
        model_rate = session.model_cache[key]["images_per_sec"]
        result["model_images_per_sec"] = model_rate
        result["data_stall_frac"] = round(1.0 - result["images_per_sec"] / model_rate, 4)
        if result["data_stall_frac"] < 0:
            session.notes.append(f"{result['config']}: negative data stall ({result['data_stall_frac']:.1%}) "
                                 "means the two measurements differ by more than the stall; raise "
                                 "--steps/--repeats or measure on a quiet machine")
    _model_ratios(references)
    for reference in references:
        reference["note"] = "model-only reference for the train rows"
    baseline = next((r["images_per_sec"] for r in results if r["loader"] == "imagefolder"), None)
    for result in results:
        result["ratio_to_baseline"] = round(result["images_per_sec"] / baseline, 3) if baseline else None
    return references + results


def bench_all(s: Settings, session: Session) -> list[dict]:
    return bench_loader(s, session) + bench_model(s, session) + bench_train(s, session)


MODES: dict[str, Callable[[Settings, Session], list[dict]]] = {
    "loader": bench_loader, "model": bench_model, "train": bench_train, "all": bench_all,
}


def _versions() -> dict:
    import PIL
    import torchvision

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for module in ("nvidia.dali", "webdataset", "accelerate"):
        try:
            versions[module] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            versions[module] = None
    return versions


def _host() -> dict:
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu_model": cpu_model,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


TABLE_COLUMNS = ["mode", "config", "images/s", "x baseline", "data stall", "host RSS MB", "GPU MB"]


def table_rows(results: list[dict]) -> list[list]:
    return [[r["mode"], r["config"], r["images_per_sec"], r.get("ratio_to_baseline"), r.get("data_stall_frac"),
             r["peak_host_rss_mb"], r["peak_gpu_mb"]] for r in results]


def _print_table(results: list[dict]) -> None:
    rows = table_rows(results)
    width = max([len("config"), *(len(row[1]) for row in rows)])
    print(f"{'mode':<7} {'config':<{width}} {'images/s':>10} {'x baseline':>10} {'data stall':>10} "
          f"{'host RSS MB':>11} {'GPU MB':>8}")
    for mode, config, rate, ratio, stall, rss, gpu in rows:
        print(f"{mode:<7} {config:<{width}} {rate:>10.1f} {'-' if ratio is None else f'{ratio:.2f}x':>10} "
              f"{'-' if stall is None else f'{stall:.1%}':>10} {rss:>11.0f} {'-' if gpu is None else f'{gpu:.0f}':>8}")


def _log_wandb(report: dict, s: Settings) -> str:
    import wandb

    kwargs = {} if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else {"mode": "offline"}
    s.wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=s.wandb_project, job_type="benchmark", dir=str(s.wandb_dir),
                     config={k: report[k] for k in ("what", "host", "device", "versions", "command", "settings")},
                     **kwargs)
    table = wandb.Table(columns=[c.replace(" ", "_").replace("/", "_per_") for c in TABLE_COLUMNS],
                        data=table_rows(report["results"]))
    run.log({"benchmark/throughput": table})
    for r in report["results"]:
        run.summary[f"{r['mode']}/{r['config']}/images_per_sec"] = r["images_per_sec"]
    run.summary["notes"] = report["notes"]
    run_dir = str(Path(run.dir).parent)
    run.finish()
    return run_dir


def _find_shards(src: Path | None, notes: list[str]) -> Path:
    """Shards for the shard loaders: made from --src (a fair comparison with the baseline) or synthetic."""
    from pipelines.make_shards import make_shards

    if src is not None:
        out = BENCH_DIR / "originals-shards"
        source = _manifest_source(out)
        if source and Path(source).resolve().is_relative_to(src.resolve()):
            return out
        print(f"building shards of {src} with default make_shards.py settings in {out}", flush=True)
        make_shards(src, out, overwrite=True, progress=False, workers=os.cpu_count() or 1)
        notes.append(f"shards built from --src with default make_shards.py settings: {out}")
        return out
    demo = REPO / "shards" / "synthetic"
    if (demo / "manifest.json").is_file():
        notes.append(f"no --shards or --src: using the `make demo` synthetic shards {demo}")
        return demo
    out = BENCH_DIR / "synthetic-shards"
    if not (out / "manifest.json").is_file():
        print(f"building a small synthetic shard set in {out}", flush=True)
        make_shards(None, out, synthetic=320, synthetic_size=512, overwrite=True, progress=False,
                    workers=os.cpu_count() or 1)
    notes.append(f"no --shards or --src: synthetic shards {out} (320 images rendered at 512 px)")
    return out


def _manifest_source(shards: Path) -> str | None:
    """The `source` a shards folder was made from ("" for synthetic), or None when it has no readable manifest."""
    from pipelines.manifest import ShardsError, load_manifest

    try:
        return load_manifest(shards).get("source") or ""
    except ShardsError:
        return None


def _same_images_note(shards: Path, src: Path) -> list[str]:
    """The loader ratios compare like with like only when the shards were made from --src."""
    source = _manifest_source(shards)
    if source is None:
        return []  # the loader itself reports a missing or broken manifest, with the fix
    if source and Path(source).resolve().is_relative_to(src.resolve()):
        return []
    return [f"the shards {shards} were made from {source or 'synthetic images'}, not from --src {src}: the loader "
            "ratios to the baseline compare different images; make shards from --src for a like-for-like ratio"]


def _split_list(value: str, choices: tuple[str, ...], flag: str) -> tuple[str, ...]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    bad = [item for item in items if item not in choices]
    if bad or not items:
        raise SystemExit(f"{flag}: unknown {bad or value!r}; choose from {', '.join(choices)} (comma-separated)")
    return tuple(items)


@dataclass(frozen=True)
class Settings:
    """Everything a benchmark run uses, resolved once from the command line (device-dependent defaults
    filled, inputs found); never changed afterwards. Modes are functions of (Settings, Session)."""

    what: str
    device: torch.device
    loaders: tuple[str, ...]  # loader mode
    train_loaders: tuple[str, ...]  # train mode
    shards: Path | None
    train_shards: Path | None
    src: Path | None
    split: str
    mode: str  # loader mode's preprocessing: eval | train
    image_size: int
    batch_size: int
    steps: int
    steps_explicit: int | None  # --steps as given (loader mode: None = one pass over the split)
    warmup: int
    loader_warmup: int
    repeats: int
    num_workers: int
    threads: int
    arch: str
    precisions: tuple[str, ...]
    formats: tuple[str, ...]
    compile_modes: tuple[str, ...]
    train_precision: str
    train_format: str
    train_compile_mode: str
    profile: Path | None
    json: Path | None
    wandb: bool
    wandb_dir: Path
    wandb_project: str


@dataclass
class Session:
    """What a run accumulates: model-only rows (reused as the train rows' references) and notes."""

    model_cache: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resolve(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    """Settings from the parsed command line (device defaults, inputs found or built) and the notes so far."""
    notes: list[str] = []
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False; use --device cpu or auto")
    device = torch.device(name)
    kind = device.type
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size, steps, warmup, repeats = DEVICE_DEFAULTS[kind]
    batch_size, steps = args.batch_size or batch_size, args.steps or steps
    loader_warmup = LOADER_WARMUP[kind] if args.warmup is None else args.warmup
    warmup = warmup if args.warmup is None else args.warmup
    repeats = args.repeats or repeats
    if min(batch_size, steps, repeats) < 1 or warmup < 0:
        raise SystemExit("--batch-size, --steps and --repeats must be >= 1 and --warmup >= 0")
    precisions = _split_list(args.precisions or ("fp32,bf16" if kind == "cuda" else "fp32"), PRECISIONS,
                             "--precisions")
    compile_modes = _split_list(args.compile_modes or ("eager,compile" if kind == "cuda" else "eager"),
                                COMPILE_MODES, "--compile-modes")
    if kind == "cpu" and not (args.precisions or args.compile_modes) and args.what in ("model", "all"):
        notes.append(CPU_GRID_NOTE)
    loaders = _split_list(args.loaders or ",".join(ALL_LOADERS), ALL_LOADERS, "--loaders")
    train_loaders = _split_list(args.train_loaders or args.loaders or "dali", ALL_LOADERS, "--train-loaders")
    if kind == "cuda":
        from train.launch import configure_cuda_backends

        configure_cuda_backends()  # the same flags train/run.py sets

    uses_loader = args.what in ("loader", "all")
    uses_train = args.what in ("train", "all")
    src = args.src
    if src is None and DEFAULT_SRC.is_dir():
        src = DEFAULT_SRC
    wants_baseline = (uses_loader and "imagefolder" in loaders) or (uses_train and "imagefolder" in train_loaders)
    if wants_baseline and (src is None or not src.is_dir()):
        if args.src is not None:
            raise SystemExit(f"--src {args.src} is not a folder; pass the Kaggle folder, "
                             "e.g. ../shared/data/kermany-originals-sample")
        note = f"no --src and {DEFAULT_SRC} is absent: the imagefolder (seed-style) baseline is skipped"
        print(note, flush=True)
        notes.append(note)
        loaders = tuple(n for n in loaders if n != "imagefolder") or SHARD_LOADERS
        train_loaders = tuple(n for n in train_loaders if n != "imagefolder") or ("dali",)
    shards = args.shards
    needs_shards = (uses_loader and any(n in SHARD_LOADERS for n in loaders)) or (
        uses_train and args.train_shards is None and any(n in SHARD_LOADERS for n in train_loaders))
    if shards is None and needs_shards:
        shards = _find_shards(src, notes)
    train_shards = args.train_shards if args.train_shards is not None or not uses_train else shards
    if uses_loader and shards is not None and "imagefolder" in loaders:
        notes.extend(_same_images_note(shards, src))
    if kind == "cpu":
        notes.append(f"CPU defaults: batch {DEVICE_DEFAULTS['cpu'][0]}, {DEVICE_DEFAULTS['cpu'][1]} steps, "
                     f"{DEVICE_DEFAULTS['cpu'][2]} warm-up, {DEVICE_DEFAULTS['cpu'][3]} repeats; "
                     "scale with --batch-size/--steps/--repeats")
    notes.append(RSS_NOTE)
    settings = Settings(
        what=args.what, device=device, loaders=loaders, train_loaders=train_loaders, shards=shards,
        train_shards=train_shards, src=src, split=args.split, mode=args.mode, image_size=args.image_size,
        batch_size=batch_size, steps=steps, steps_explicit=args.steps, warmup=warmup, loader_warmup=loader_warmup,
        repeats=repeats, num_workers=args.num_workers, threads=args.threads, arch=args.arch, precisions=precisions,
        formats=_split_list(args.formats, FORMATS, "--formats"), compile_modes=compile_modes,
        train_precision=args.train_precision or ("bf16" if kind == "cuda" else "fp32"),
        train_format=args.train_format, train_compile_mode=args.train_compile_mode, profile=args.profile,
        json=args.json, wandb=args.wandb, wandb_dir=args.wandb_dir, wandb_project=args.wandb_project)
    return settings, notes




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=sorted(MODES), default="loader")
    parser.add_argument("--loaders", help="comma list of dali, torch, imagefolder (loader mode default: all three; "
                                          "also the train loaders unless --train-loaders is given)")
    parser.add_argument("--train-loaders", help="loaders feeding train mode (default: dali)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shards", type=Path, help="shards made by scripts/make_shards.py from --src "
                                                    "(default: built under bench/ from --src)")
    parser.add_argument("--train-shards", type=Path, help="shards for train mode (default: --shards)")
    parser.add_argument("--src", type=Path, help="Kaggle folder for the seed-style imagefolder baseline "
                                                 f"(default: {DEFAULT_SRC} when present)")
    parser.add_argument("--split", default="train", help="split the loader mode reads")
    parser.add_argument("--mode", choices=["train", "eval"], default="eval",
                        help="loader mode's preprocessing: eval (resize+crop, like the baseline) or train (augment)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int,
                        help="per step (default: 8 on CPU; 128 on CUDA, as in train/configs/default.yaml)")
    parser.add_argument("--steps", type=int, help="timed steps per window (default: 2 on CPU, 50 on CUDA; "
                                                  "loader mode: one pass over --split)")
    parser.add_argument("--warmup", "--warmup-batches", dest="warmup", type=int,
                        help="untimed steps before the windows (default: 2 on CPU, 15 on CUDA; loader mode: 1 "
                             "batch on CPU, 3 on CUDA)")
    parser.add_argument("--repeats", type=int, help="timed windows; figures are their median (default: 3)")
    parser.add_argument("--num-workers", type=int, default=2, help="DALI threads / DataLoader workers")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op CPU threads (default: torch's choice, one per core); on a busy machine "
                             "fewer threads than cores avoids OpenMP barrier stalls")
    parser.add_argument("--arch", default="resnet50", help="torchvision classifier for model and train modes")
    parser.add_argument("--precisions", help="model grid: fp32,bf16 (default: both on CUDA, fp32 on CPU)")
    parser.add_argument("--formats", default="nchw,channels_last", help="model grid: nchw,channels_last")
    parser.add_argument("--compile-modes", help="model grid: eager,compile (default: both on CUDA, eager on CPU)")
    parser.add_argument("--train-precision", choices=PRECISIONS,
                        help="train mode (default: bf16 on CUDA, fp32 on CPU, as the default recipe)")
    parser.add_argument("--train-format", choices=FORMATS, default="channels_last")
    parser.add_argument("--train-compile-mode", choices=COMPILE_MODES, default="eager")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after each model/train row, profile up to 10 more steps with torch.profiler: "
                             "DIR/<row>.trace.json (chrome://tracing, Perfetto) and DIR/<row>.top.txt")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--wandb", action="store_true", help="log the table to W&B (offline unless configured) "
                                                              "as a job_type=benchmark run")
    parser.add_argument("--wandb-dir", type=Path, default=BENCH_DIR, help="where the W&B run folder goes")
    parser.add_argument("--wandb-project", default="cxr-pipeline")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = " ".join([sys.executable, *sys.argv]) if argv is None else " ".join(argv)
    from pipelines.manifest import ShardsError

    try:
        settings, notes = resolve(args)
        session = Session(notes=notes)
        results = MODES[settings.what](settings, session)
    except (ShardsError, FileNotFoundError) as exc:
        # Missing shards or folders: the message names the path and the command that fixes it.
        raise SystemExit(f"error: {exc}") from exc
    _print_table(results)
    device = settings.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _host()["cpu_model"]
    recorded = {k: (str(v) if isinstance(v, Path | torch.device) else v)
                for k, v in dataclasses.asdict(settings).items()}
    report = {"what": settings.what, "results": results, "host": _host(),
              "device": {"type": device.type, "name": device_name}, "versions": _versions(), "command": command,
              "settings": recorded, "notes": session.notes}
    for note in session.notes:
        print(f"note: {note}")
    if settings.wandb:
        report["wandb_run_dir"] = _log_wandb(report, settings)
        print(f"W&B run: {report['wandb_run_dir']}")
    if settings.json:
        settings.json.parent.mkdir(parents=True, exist_ok=True)
        settings.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {settings.json}")
    return report


if __name__ == "__main__":
    main()
