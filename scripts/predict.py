"""Predict P(PNEUMONIA) for new chest X-ray images with a trained run, optionally with Grad-CAM overlays.

    python scripts/predict.py --run runs/demo --out predictions/ xray.jpeg scans/ 'more/**/*.png' [--cam]
    python scripts/predict.py --run RUN_DIR --out OUT_DIR INPUT... [--threshold FLOAT] [--cam]

A thin wrapper: the code and its full description live in `eval/predict_cli.py` (`--help` prints it);
the installed alias is `cxr-predict`.
"""

from eval.predict_cli import cli

if __name__ == "__main__":
    cli()
