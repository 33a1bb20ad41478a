"""All of a session's GPU work in one prepared call, most valuable first, inside a time budget.

    # on the GPU host (after the carried DALI/webdataset/wandb stack is unpacked into /tmp/site):
    PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_check.py --out $OUT --budget-s 470 \
        --kermany-shards .gpu-data/kermany224 --originals-src .gpu-data/originals

    # CPU rehearsal with tiny sizes (same steps, same files, minutes on 2 cores):
    python scripts/gpu_check.py --out /tmp/gpu-check --budget-s 600 --rehearse \
        --kermany-shards shards/kermany224 --originals-src ../shared/data/kermany-originals-sample

Steps, in order of value (docs/benchmarks.md section 5 has the carry plan and the device minutes of each):
  1. facts     nvidia-smi, torch/CUDA/cuDNN/DALI/webdataset/wandb/accelerate versions
  2. pytest    `pytest -m gpu` (output kept)
  3. run30     the default recipe's 30-epoch run on the kermany-train-224 shards (wall time including
               start-up) and `eval.run --split val`
  4. train     end-to-end images/s (DALI mixed, bf16, channels_last, eager) against model-only on the
               same batch: the data-stall fraction
  5. loaders   DALI mixed vs the torch fallback vs the seed-style ImageFolder baseline, on shards of the
               original-resolution sample
  6. model     fp32 NCHW eager (the seed's setting), bf16 channels_last eager, bf16 channels_last compile

Each step runs as a subprocess with a timeout from what is left of `--budget-s` (a step that cannot get
its minimum is skipped and says so). After every step `gpu_check.json` (all results so far),
`gpu_check.log` (every command's output) and `artifacts.tar.gz` (benchmark JSONs, run summary, metrics,
eval report, pytest output) are rewritten under `--out`, so a call cut off by its time limit still
returns everything that finished. Three files: the device tool returns at most eight.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Check:
    """Where results go and how much time is left; one per call."""

    out: Path
    work: Path
    budget_s: float
    rehearse: bool
    started: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)

    @property
    def artifacts(self) -> Path:
        return self.work / "artifacts"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.out / "gpu_check.log", "a") as handle:
            handle.write(text + "\n")

    def run(self, name: str, command: list[str], *, cap_s: float, env: dict | None = None) -> dict:
        """Run `command` with a timeout of min(cap_s, time left); its output goes to the log and a file."""
        timeout = max(1.0, min(cap_s, self.left() - 5))
        self.log(f"$ {' '.join(command)}    (timeout {timeout:.0f} s)")
        start = time.monotonic()
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            output, code, timed_out = done.stdout + done.stderr, done.returncode, False
        except subprocess.TimeoutExpired as exc:
            output = _text(exc.stdout) + _text(exc.stderr)
            code, timed_out = None, True
        wall = time.monotonic() - start
        (self.artifacts / f"{name}.txt").write_text(output)
        self.log(output[-6000:])
        self.log(f"-> {name}: exit {code}{' (timed out)' if timed_out else ''} in {wall:.1f} s")
        return {"command": " ".join(command), "exit_code": code, "timed_out": timed_out, "wall_s": round(wall, 2)}

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2) + "\n")
        tmp = self.out / "artifacts.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.artifacts, arcname="artifacts")
        os.replace(tmp, self.out / "artifacts.tar.gz")


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _python() -> list[str]:
    return [sys.executable]


def make_carried_binaries_executable() -> list[str]:
    """Wheels unpacked with zipfile lose their exec bits: wandb's service binary then fails with EACCES."""
    import importlib.util

    fixed = []
    spec = importlib.util.find_spec("wandb")
    if spec is not None and spec.origin:
        for binary in (Path(spec.origin).parent / "bin").glob("*"):
            if binary.is_file() and not os.access(binary, os.X_OK):
                binary.chmod(binary.stat().st_mode | 0o111)
                fixed.append(str(binary))
    return fixed


def step_facts(check: Check, args) -> dict:
    facts: dict = {"made_executable": make_carried_binaries_executable()}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        (check.artifacts / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True)
        facts["nvidia_smi"] = query.stdout.strip()
    probe = (
        "import json, os, platform, torch\n"
        "v = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
        "     'cudnn': torch.backends.cudnn.version(), 'cuda_available': torch.cuda.is_available(),\n"
        "     'cpu_count': os.cpu_count()}\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    v.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)\n"
        "for m in ('nvidia.dali', 'webdataset', 'wandb', 'accelerate', 'torchvision', 'sklearn'):\n"
        "    try:\n"
        "        v[m] = __import__(m, fromlist=['__version__']).__version__\n"
        "    except Exception as exc:\n"
        "        v[m] = f'missing: {exc}'\n"
        "print(json.dumps(v))\n")
    done = subprocess.run([*_python(), "-c", probe], cwd=REPO, capture_output=True, text=True)
    try:
        facts.update(json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        facts["probe_error"] = (done.stdout + done.stderr)[-2000:]
    check.log(json.dumps(facts, indent=1))
    return facts


def step_pytest(check: Check, args) -> dict:
    # On the CPU rehearsal every test is collected and skipped: that checks imports and collection.
    result = check.run("pytest-gpu", [*_python(), "-m", "pytest", "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider"],
                       cap_s=150,
                       env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    lines = (check.artifacts / "pytest-gpu.txt").read_text().strip().splitlines()
    result["summary"] = lines[-1] if lines else ""
    return result


def _kermany_shards(check: Check, args) -> Path:
    if args.kermany_shards and (args.kermany_shards / "manifest.json").is_file():
        return args.kermany_shards
    out = check.work / "kermany224"
    if not (out / "manifest.json").is_file():
        check.run("make-shards-kermany", [*_python(), "scripts/make_shards.py", "--src", str(args.kermany_src),
                                          "--out", str(out), "--workers", str(os.cpu_count() or 1)], cap_s=120)
    return out


def step_run30(check: Check, args) -> dict:
    shards = _kermany_shards(check, args)
    run_dir = check.work / "runs" / "r50-default"
    overrides = [f"--data.shards={shards}", f"--run.dir={run_dir}", "--log.progress_bar=false"]
    if check.rehearse:
        overrides += ["--train.epochs=2", "--data.image_size=32", "--data.per_device_batch_size=64",
                      "--data.num_workers=1", "--log.log_every=5"]
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "accelerate_config.yaml"]
    if not Path(launcher[0]).exists():
        launcher = [*_python(), "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(check.work)}
    result = check.run("run30-train", [*launcher, "train/run.py", "--config", "train/configs/default.yaml",
                                       *overrides], cap_s=330, env=env)
    result["wall_s_including_startup"] = result.pop("wall_s")
    summary = _read_json(run_dir / "summary.json")
    result["summary"] = summary
    for name in ("summary.json", "metrics.jsonl", "config.yaml"):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, check.artifacts / f"run30-{name}")
    if summary is None or check.left() < 40:
        return result
    check.save()
    evaluated = check.run("run30-eval-val", [*_python(), "-m", "eval.run", "--run", str(run_dir), "--split", "val",
                                             "--threshold", "0.5", "--wandb", "false"], cap_s=90, env=env)
    report = _read_json(run_dir / "eval-val" / "report.json")
    result["eval_val"] = {**evaluated, "report": report}
    if report is not None:
        shutil.copy(run_dir / "eval-val" / "report.json", check.artifacts / "run30-eval-val-report.json")
    return result


def _bench(check: Check, name: str, bench_args: list[str], cap_s: float) -> dict:
    json_path = check.artifacts / f"bench-{name}.json"
    result = check.run(f"bench-{name}", [*_python(), "scripts/benchmark_throughput.py", *bench_args,
                                         "--json", str(json_path)], cap_s=cap_s)
    report = _read_json(json_path)
    result["results"] = report["results"] if report else None
    if report:
        result["device"], result["versions"] = report["device"], report["versions"]
    return result


def _small(check: Check) -> list[str]:
    return ["--batch-size", "8", "--steps", "2", "--repeats", "2", "--warmup", "1", "--image-size", "64"] \
        if check.rehearse else []


def step_train(check: Check, args) -> dict:
    shards = _kermany_shards(check, args)
    device = "cpu" if check.rehearse else "cuda"
    workers = "1" if check.rehearse else str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    return _bench(check, "train", ["--what", "train", "--device", device, "--train-shards", str(shards),
                                   "--train-loaders", "dali", "--train-precision", "fp32" if check.rehearse else "bf16",
                                   "--num-workers", workers, *_small(check)], cap_s=150)


DALI_BUILD_PROBE = """
import json, sys, time, torch
from pipelines.loaders import build_loader
from pipelines.spec import PreprocessSpec
shards, device, batch, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spec = PreprocessSpec.from_manifest(shards, image_size=size)
rows = []
for train, split in ((True, "train"), (False, "val")):
    for _ in range(3):
        start = time.perf_counter()
        loader = build_loader(shards, split, spec=spec, per_device_batch_size=batch, train=train, loader="dali",
                              device=device, num_workers=4, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        batch_out = next(iter(loader))
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append({"split": split, "build_s": round(loader.build_seconds, 4),
                     "build_and_first_batch_s": round(time.perf_counter() - start, 4)})
        del loader, batch_out
print(json.dumps(rows))
"""


def step_dali_build(check: Check, args) -> dict:
    """What rebuilding the DALI pipeline every epoch (the old loader) cost: build + first batch, fresh each time."""
    shards = _kermany_shards(check, args)
    device, batch, size = ("cpu", "8", "64") if check.rehearse else ("cuda", "128", "224")
    result = check.run("dali-build", [*_python(), "-c", DALI_BUILD_PROBE, str(shards), device, batch, size], cap_s=60)
    result["rows"] = None
    for line in reversed((check.artifacts / "dali-build.txt").read_text().splitlines()):
        if line.startswith("[{"):
            result["rows"] = json.loads(line)
            break
    return result


def step_loaders(check: Check, args) -> dict:
    if args.originals_src is None or not args.originals_src.is_dir():
        return {"skipped": f"--originals-src {args.originals_src} is not a folder"}
    shards = check.work / "originals-shards"
    if not (shards / "manifest.json").is_file():
        check.run("make-shards-originals", [*_python(), "scripts/make_shards.py", "--src", str(args.originals_src),
                                            "--out", str(shards), "--workers", str(os.cpu_count() or 1)], cap_s=90)
    device = "cpu" if check.rehearse else "cuda"
    workers = "1" if check.rehearse else str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    sizing = ["--batch-size", "8", "--repeats", "2"] if check.rehearse else ["--batch-size", "16", "--repeats", "5"]
    return _bench(check, "loaders", ["--what", "loader", "--device", device, "--loaders", "dali,torch,imagefolder",
                                     "--shards", str(shards), "--src", str(args.originals_src),
                                     "--num-workers", workers, *sizing], cap_s=150)


def step_model(check: Check, args) -> dict:
    device = "cpu" if check.rehearse else "cuda"
    rows = []
    grids = [("fp32", "nchw", "eager"), ("bf16", "channels_last", "eager,compile")]
    if check.rehearse:
        grids = [("fp32", "nchw", "eager"), ("bf16", "channels_last", "eager")]
    for i, (precision, layout, modes) in enumerate(grids):
        if check.left() < 30:
            rows.append({"skipped": f"{precision} {layout} {modes}: budget spent"})
            continue
        rows.append(_bench(check, f"model-{i}", ["--what", "model", "--device", device, "--precisions", precision,
                                                 "--formats", layout, "--compile-modes", modes, *_small(check)],
                           cap_s=240))
    return {"grids": rows}


STEPS: list[tuple[str, Callable[[Check, argparse.Namespace], dict], float]] = [
    # (name, function, minimum seconds it needs to be worth starting)
    ("facts", step_facts, 5),
    ("pytest", step_pytest, 40),
    ("run30", step_run30, 90),
    ("train", step_train, 40),
    ("dali_build", step_dali_build, 20),
    ("loaders", step_loaders, 40),
    ("model", step_model, 40),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder ($OUT on the device machine)")
    parser.add_argument("--budget-s", type=float, default=470, help="stop starting steps after this many seconds")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"), help="scratch folder (shards, runs)")
    parser.add_argument("--kermany-shards", type=Path, help="shards of kermany-train-224 made here and carried")
    parser.add_argument("--kermany-src", type=Path, default=REPO.parent / "shared/data/kermany-train-224",
                        help="used to build the shards when --kermany-shards is absent")
    parser.add_argument("--originals-src", type=Path, help="original-resolution Kaggle folder for the loader step")
    parser.add_argument("--steps", default=",".join(name for name, _, _ in STEPS),
                        help="comma list of steps to run, in the fixed order above")
    parser.add_argument("--rehearse", action="store_true", help="CPU, tiny sizes: checks the script, not the GPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(out=args.out, work=args.work, budget_s=args.budget_s, rehearse=args.rehearse)
    check.artifacts.mkdir(parents=True, exist_ok=True)
    wanted = {s.strip() for s in args.steps.split(",") if s.strip()}
    unknown = wanted - {name for name, _, _ in STEPS}
    if unknown:
        print(f"error: --steps: unknown {sorted(unknown)}; choose from {[n for n, _, _ in STEPS]}", file=sys.stderr)
        return 2
    check.results = {"budget_s": args.budget_s, "rehearse": args.rehearse, "steps": {}}
    for name, function, minimum in STEPS:
        if name not in wanted:
            continue
        if check.left() < minimum:
            check.results["steps"][name] = {"skipped": f"{check.left():.0f} s left, needs >= {minimum:.0f} s"}
            check.log(f"== {name}: skipped (budget)")
            check.save()
            continue
        check.log(f"== {name} ({check.left():.0f} s left)")
        start = time.monotonic()
        try:
            check.results["steps"][name] = function(check, args)
        except Exception as exc:  # noqa: BLE001 - one broken step must not cost the steps after it
            check.results["steps"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            check.log(f"!! {name}: {type(exc).__name__}: {exc}")
        check.results["steps"][name]["step_s"] = round(time.monotonic() - start, 1)
        check.save()
    check.log(f"done in {time.monotonic() - check.started:.0f} s; results in {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
