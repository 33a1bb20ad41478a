"""One typed configuration for training: nested frozen dataclasses, parsed by draccus.

Precedence: dataclass defaults < `train/configs/<recipe>.yaml` < dotted CLI overrides
(`--optim.lr=3e-4`). Every key is declared once below with its type, default and a one-line meaning (the
comment after it, which `train/run.py --help` prints). Unknown keys, wrong types and out-of-range values
are `ConfigError`s naming the key. The config is never mutated after loading; values derived from it and
the runtime (world size, global batch, steps per epoch) live in `train.run.Derived`.

Why draccus (over jsonargparse): both take nested frozen dataclasses, tuple fields, `Literal` choices, a
YAML recipe plus dotted overrides; draccus reads each field's help from the comment beside it (this file's
style, no docstring sections to keep in sync) and names the dotted key in its decoding errors.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import draccus
import yaml

from pipelines.loaders import LoaderName
from pipelines.spec import PreprocessConfig, preprocess_problem


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds a value of the wrong type or range."""


@dataclass(frozen=True)
class DataConfig(PreprocessConfig):
    """Where the shards are and how they are read; the preprocessing fields come from PreprocessConfig."""

    shards: str = "shards/synthetic"  # folder made by scripts/make_shards.py (holds manifest.json)
    loader: LoaderName = "auto"  # auto: DALI when it imports, else the webdataset + PIL fallback
    per_device_batch_size: int = 64  # training images per step on each device (before accumulation)
    per_device_eval_batch_size: int = 128  # evaluation images per step on each device
    num_workers: int = 4  # DALI CPU threads / DataLoader worker processes
    hw_decoder_load: float = 0.65  # share of JPEGs sent to the GPU's hardware decoder (A100/H100); rest on CUDA cores
    train_split: str = "train"  # manifest split to train on
    val_split: str = "val"  # manifest split validated every epoch (model selection, threshold)
    shift_seed: int = 0  # seed of the acquisition-shift proxy (pipelines/shift.py) for val-shifted, in training and eval.run
    verify_shards: bool = False  # re-hash every tar and index against the manifest before training (reads all bytes)

    def __post_init__(self) -> None:
        """Checked by `validate` instead, so the error names the key as `data.<field>`."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"  # any torchvision classifier: resnet18, densenet121, efficientnet_b0, ...
    pretrained: str = ""  # local safetensors file of ImageNet weights; never downloaded
    zero_init_residual: bool = True  # last BN of each residual block starts at 0 (ResNets)
    channels_last: bool = True  # NHWC memory: DALI's HWC output needs no copy, cuDNN/oneDNN run faster
    compile: bool = False  # torch.compile the model (a minute of compilation; measured 1.08x faster on an H100)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adam"] = "adamw"  # adamw: decoupled weight decay; adam: the seed notebook's L2
    lr: float = 1e-3  # peak learning rate (after warm-up)
    weight_decay: float = 0.05  # applied to weights with ndim > 1 only (not norms, not biases)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decay rates
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"  # learning-rate shape after warm-up
    warmup_epochs: float = 1.0  # linear warm-up length in epochs
    min_lr_ratio: float = 0.01  # final learning rate as a fraction of lr (cosine, onecycle)
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    class_weighting: Literal["balanced", "none"] = "balanced"  # balanced: loss weights N / (2 n_class)
    grad_clip_norm: float = 1.0  # global gradient-norm clip; 0 disables clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # passes over the training split
    seed: int = 0  # model init, augmentation and data order
    resume: str = "auto"  # auto | never | PATH of a checkpoint directory
    keep_checkpoints: int = 2  # newest checkpoints kept in run.dir/checkpoints
    early_stopping_patience: int = 0  # epochs without a better val score (train.select_by) before stopping; 0 disables
    select_by: Literal["auroc", "loss"] = "auroc"  # best/ is the epoch with the highest val AUROC or the lowest val NLL
    val_shifted: bool = True  # also validate the val batches under the shift proxy every epoch (val_shifted/*, one more forward pass)
    ema_decay: float = 0.0  # EMA of the weights (e.g. 0.999), used for validation and best/; 0 disables
    mixup_alpha: float = 0.0  # mixup: blend image pairs with Beta(alpha, alpha) weights, soft targets; 0 disables
    cutmix_alpha: float = 0.0  # cutmix: paste a box of another image, area from Beta(alpha, alpha); 0 disables
    mix_prob: float = 1.0  # share of batches mixed (mixup or cutmix, chosen 50/50 when both are on)
    cpu_threads: int = 0  # CPU runs: torch threads per process (wins over OMP_NUM_THREADS); 0 = OMP_NUM_THREADS, else the cores data.num_workers leaves free


@dataclass(frozen=True)
class LogConfig:
    wandb: bool = True  # log to Weights & Biases (offline unless credentials are configured)
    project: str = "cxr-pipeline"  # W&B project
    entity: str = ""  # W&B entity (team); empty: your default
    group: str = ""  # W&B group, e.g. the recipe name
    tags: tuple[str, ...] = ()  # W&B tags
    name: str = ""  # W&B run name; defaults to the run directory's name
    log_every: int = 20  # optimizer steps between host syncs for train/* and perf/* metrics
    progress_bar: bool = True  # tqdm progress bar on the main process


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # run directory: config, metrics, checkpoints, best model, eval reports


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)


# (key, rule, what to do): range checks the types cannot express, each a one-line fix.
RANGES: tuple[tuple[str, typing.Callable[[Any], bool], str], ...] = (
    ("data.per_device_batch_size", lambda v: v >= 1, "must be >= 1"),
    ("data.per_device_eval_batch_size", lambda v: v >= 1, "must be >= 1"),
    ("data.num_workers", lambda v: v >= 0, "must be >= 0"),
    ("data.hw_decoder_load", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    ("optim.lr", lambda v: v > 0, "must be > 0, e.g. 1e-3"),
    ("optim.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("optim.warmup_epochs", lambda v: v >= 0, "must be >= 0"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("optim.label_smoothing", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.grad_clip_norm", lambda v: v >= 0, "must be >= 0 (0 disables clipping)"),
    ("optim.grad_accum_steps", lambda v: v >= 1, "must be >= 1"),
    ("train.epochs", lambda v: v >= 1, "must be >= 1"),
    ("train.keep_checkpoints", lambda v: v >= 1, "must be >= 1"),
    ("train.early_stopping_patience", lambda v: v >= 0, "must be >= 0 (0 disables)"),
    ("train.ema_decay", lambda v: v == 0 or 0.5 <= v < 1, "must be 0 (off) or in [0.5, 1), e.g. 0.999"),
    ("train.mixup_alpha", lambda v: v >= 0, "must be >= 0 (0 disables), e.g. 0.2"),
    ("train.cutmix_alpha", lambda v: v >= 0, "must be >= 0 (0 disables), e.g. 1.0"),
    ("train.mix_prob", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("train.cpu_threads", lambda v: v >= 0, "must be >= 0 (0: the cores data.num_workers leaves free)"),
    ("log.log_every", lambda v: v >= 1, "must be >= 1"),
)
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> Config:
    """Range checks; the first violation is a ConfigError naming the key."""
    for key, ok, rule in RANGES:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"config key '{key}' {rule}, got {value!r}")
    problem = preprocess_problem(cfg.data)
    if problem:
        raise ConfigError(f"config key 'data.{problem}")
    import torchvision  # late: config parsing alone should not pay for it

    if cfg.model.arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"config key 'model.arch' {cfg.model.arch!r} is not a torchvision classifier; "
                          "e.g. resnet50, resnet18, densenet121, efficientnet_b0")
    return cfg


def _field_type(dotted: str) -> Any:
    cls: Any = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _check_override(item: str) -> str:
    """Syntax of one override, `--section.key=value` (draccus would read a bare boolean as 1 for an int)."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r}: key must be section.key, e.g. --optim.lr=3e-4")
    hint = _field_type(dotted)
    if hint in (int, float) and raw.strip().lower() in _BOOL_WORDS:
        raise ConfigError(f"config key '{dotted}': expected {hint.__name__}, got {raw!r}")
    return f"--{dotted}={raw}"


def _config_error(exc: Exception, where: str) -> ConfigError:
    """draccus/argparse messages -> one line naming the dotted key."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    unknown = re.match(r"`([\w.]+)`: The fields (.+) are not valid for (\w+)", text)
    if unknown:
        section, names, cls = unknown.groups()
        keys = ", ".join(f"'{section}.{n.strip(' `')}'" for n in names.split(","))
        valid = ", ".join(f.name for f in dataclasses.fields(_field_type(section))) if _field_type(section) else ""
        return ConfigError(f"unknown config key {keys} in {where}; valid keys of '{section}': {valid}")
    named = re.match(r"`([\w.]+)`: (.*)", text)
    if named:
        return ConfigError(f"config key '{named.group(1)}' in {where}: {named.group(2)}")
    return ConfigError(f"{where}: {text}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML recipe at `path` < dotted overrides; validated."""
    where = "the command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (recipes live in train/configs/)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {path}{at} is not valid YAML: "
                              f"{getattr(exc, 'problem', None) or exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        for section, values in (loaded or {}).items():
            if section in {f.name for f in dataclasses.fields(Config)} and not isinstance(values, dict | None):
                raise ConfigError(f"config key '{section}' in {path} is a section; expected a mapping, "
                                  f"got {values!r}")
        where = f"{path} or the command line"
    args = [_check_override(item) for item in overrides]
    try:
        cfg = draccus.parse(Config, config_path=str(path) if path is not None else None, args=args,
                            exit_on_error=False)
    except SystemExit as exc:  # argparse still exits on a few errors
        raise ConfigError(f"bad overrides {list(overrides)} (see --help)") from exc
    except Exception as exc:  # noqa: BLE001 - draccus raises several types; each becomes one line
        raise _config_error(exc, where) from exc
    return validate(cfg)


def print_help(prog: str) -> None:
    """Every key with its type, default and meaning (the comment beside the field above)."""
    draccus.parse(Config, args=["--help"], prog=prog)


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and W&B."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(draccus.encode(cfg))


def config_from_dict(values: dict) -> Config:
    try:
        return validate(draccus.decode(Config, values))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _config_error(exc, "the config") from exc


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}; used for run comparison and W&B config."""
    flat: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def read_config(path: str | Path) -> Config:
    """Read a resolved config written by `save_config` (e.g. `runs/NAME/config.yaml`)."""
    return load_config(path)
