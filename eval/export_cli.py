"""Export a trained run's best model to ONNX or TorchScript, normalisation inside, batch size free.

    python scripts/export_model.py --run runs/demo --format onnx --out runs/demo/model.onnx

    python scripts/export_model.py --run RUN_DIR --format onnx|torchscript --out FILE [--no-check]

Input of the exported model: float32 images in [0, 1], N x C x H x W at the run's image size (any N); output:
(N, 2) logits. The file carries how to preprocess and read it (ONNX `metadata_props`; TorchScript extra file
`metadata.json`): mean, std, image_size, channels, labels, the threshold and the calibration (method,
slope, intercept, temperature) chosen on the validation split (RUN_DIR/calibration.json, written by
`python -m eval.run`; fitted now if missing). After writing, the file is run (onnxruntime on the CPU, or
torch.jit.load) on random batches of 1 and 3 images and compared with the PyTorch model: exit 1 when a logit
differs by more than 1e-4. ONNX needs the `export` extra: `pip install -e '.[export]'` (onnx, onnxscript,
onnxruntime).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval import calibration as C
from eval import export as X
from eval.inference import OperatingPointError, ensure_operating_point
from eval.run import EvalError, load_trained, preprocess_spec
from pipelines.manifest import ShardsError, load_manifest, sha256_file
from train.cli import run_cli
from train.config import ConfigError
from train.launch import build_accelerator

MAX_LOGIT_DIFF = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="training run directory (holds best/)")
    parser.add_argument("--format", required=True, choices=X.FORMATS, help="onnx or torchscript")
    parser.add_argument("--out", required=True, type=Path, help="file to write, e.g. model.onnx or model.pt")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip running the exported file against the PyTorch model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run.is_dir():
        raise EvalError(f"run directory {args.run} does not exist; pass the --run.dir of a trained run")
    cfg, meta, model = load_trained(args.run)
    spec = preprocess_spec(meta, cfg, {} if "spec" in meta else load_manifest(cfg.data.shards))
    point, source = ensure_operating_point(args.run, cfg, spec, model, build_accelerator())
    # Exported from the CPU in fp32: the graph does not depend on the device, and the parity check runs there.
    module = X.NormalizedClassifier(model.cpu().eval(), spec)
    metadata = X.export_metadata(run_dir=args.run, arch=cfg.model.arch, spec=spec, point=point,
                                 model_sha256=sha256_file(args.run / "best" / "model.safetensors"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write = X.export_onnx if args.format == "onnx" else X.export_torchscript
    write(module, spec, args.out, metadata)
    print(f"wrote {args.out} ({args.format}; input {metadata['input']}; threshold {float(metadata['threshold']):.4g} "
          f"and calibration {C.describe_calibration(point['calibration'])} from {source})")
    if args.check:
        diff = X.parity(args.out, args.format, module, spec)
        print(f"parity with PyTorch on batches of 1 and 3: max |logit difference| {diff:.2e} (limit {MAX_LOGIT_DIFF:g})")
        if diff > MAX_LOGIT_DIFF:
            print(f"error: {args.out} differs from the PyTorch model by {diff:.2e}; do not use it", file=sys.stderr)
            return 1
    return 0


def cli() -> None:
    run_cli(main, EvalError, ConfigError, ShardsError, OperatingPointError)


if __name__ == "__main__":
    cli()
