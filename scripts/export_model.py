"""Export a trained run's best model to ONNX or TorchScript, normalisation inside, batch size free.

    python scripts/export_model.py --run runs/demo --format onnx --out runs/demo/model.onnx
    python scripts/export_model.py --run RUN_DIR --format onnx|torchscript --out FILE [--no-check]

A thin wrapper: the code and its full description live in `eval/export_cli.py` (`--help` prints it);
the installed alias is `cxr-export-model`.
"""

from eval.export_cli import cli

if __name__ == "__main__":
    cli()
