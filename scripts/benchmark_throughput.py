"""Throughput benchmarks; `--what loader` times the data loaders against the seed-style baseline.

    .venv/bin/python scripts/benchmark_throughput.py --what loader --loaders dali,torch,imagefolder \
        --device cpu --shards shards/originals --src ../shared/data/kermany-originals-sample \
        --json /tmp/bench-loader.json

Images/s of each loader over one pass of `--split` (after `--warmup-batches`), the ratio of each to
the `imagefolder` baseline, one table, and a JSON with `results`, host, device, versions and the
exact command. New modes (model, train) register a function in `MODES`.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _time_batches(batches, device: torch.device, warmup_batches: int, max_images: int) -> dict:
    images, start, seen = 0, None, 0
    for batch_images in batches:
        seen += 1
        if seen == warmup_batches + 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        if start is not None:
            images += batch_images.shape[0]
        if max_images and images >= max_images:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if start is None or images == 0:
        raise SystemExit(f"only {seen} batches: lower --warmup-batches or --batch-size, or use more data")
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": round(seconds, 4), "images_per_sec": round(images / seconds, 2)}


def bench_loader(args: argparse.Namespace) -> list[dict]:
    from pipelines.imagefolder import build_imagefolder_loader
    from pipelines.loaders import build_loader
    from pipelines.spec import PreprocessSpec

    device = torch.device(args.device)
    results = []
    for name in args.loaders.split(","):
        if name == "imagefolder":
            if not args.src:
                raise SystemExit("--loaders imagefolder needs --src KAGGLE_DIR")
            loader = build_imagefolder_loader(args.src, image_size=args.image_size, batch_size=args.batch_size,
                                              num_workers=args.num_workers, split=args.split)
            # The seed notebook moves each batch to the device itself; do the same so the work compares.
            batches = (images.to(device, non_blocking=True) for images, _ in loader)
            extra = {"source": str(args.src), "channels": 3}
        elif name in ("dali", "torch"):
            if not args.shards:
                raise SystemExit(f"--loaders {name} needs --shards DIR")
            spec = PreprocessSpec.from_manifest(args.shards, image_size=args.image_size)
            loader = build_loader(args.shards, args.split, spec=spec, per_device_batch_size=args.batch_size,
                                  train=args.mode == "train", loader=name, device=device,
                                  num_workers=args.num_workers)
            batches = (batch.images for batch in loader)
            extra = {"source": str(args.shards), "channels": spec.channels, "reason": loader.reason}
        else:
            raise SystemExit(f"unknown loader {name!r}; choose from dali, torch, imagefolder")
        timing = _time_batches(batches, device, args.warmup_batches, args.max_images)
        results.append({"loader": name, **timing, "batch_size": args.batch_size, "image_size": args.image_size,
                        "mode": "eval" if name == "imagefolder" else args.mode, **extra})
    baseline = next((r["images_per_sec"] for r in results if r["loader"] == "imagefolder"), None)
    for result in results:
        result["speedup_vs_imagefolder"] = round(result["images_per_sec"] / baseline, 2) if baseline else None
    return results


MODES: dict[str, Callable[[argparse.Namespace], list[dict]]] = {"loader": bench_loader}


def _versions() -> dict:
    import PIL
    import torchvision

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    for module in ("nvidia.dali", "webdataset"):
        try:
            versions[module] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            versions[module] = None
    return versions


def _print_table(results: list[dict]) -> None:
    print(f"{'loader':<12} {'mode':<6} {'images':>7} {'seconds':>9} {'images/s':>10} {'x baseline':>10}")
    for r in results:
        ratio = "-" if r.get("speedup_vs_imagefolder") is None else f"{r['speedup_vs_imagefolder']:.2f}x"
        print(f"{r['loader']:<12} {r['mode']:<6} {r['images']:>7} {r['seconds']:>9.3f} {r['images_per_sec']:>10.1f} {ratio:>10}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=sorted(MODES), default="loader")
    parser.add_argument("--loaders", default="dali,torch,imagefolder", help="comma list of dali, torch, imagefolder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shards", type=Path, help="shards folder made by scripts/make_shards.py from --src")
    parser.add_argument("--src", type=Path, help="Kaggle folder for the seed-style imagefolder baseline")
    parser.add_argument("--split", default="train")
    parser.add_argument("--mode", choices=["train", "eval"], default="eval",
                        help="shard loaders' preprocessing: eval (resize+crop, like the baseline) or train (augment)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2, help="DALI threads / DataLoader workers")
    parser.add_argument("--warmup-batches", type=int, default=1)
    parser.add_argument("--max-images", type=int, default=0, help="stop after this many timed images (0: one pass)")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = MODES[args.what](args)
    _print_table(results)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    report = {"what": args.what, "results": results,
              "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                       "cpu_count": __import__("os").cpu_count()},
              "device": {"type": args.device, "name": device}, "versions": _versions(),
              "command": " ".join([sys.executable, *sys.argv]) if argv is None else " ".join(argv)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
