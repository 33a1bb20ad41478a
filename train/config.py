"""One typed configuration for training: nested frozen dataclasses.

Precedence: dataclass defaults < `train/configs/<recipe>.yaml` < dotted CLI overrides
(`--optim.lr=3e-4`). Unknown keys and wrong types are errors naming the key. The config is never
mutated after loading; values derived from it and the runtime (world size, global batch, steps per
epoch) live in `train.run.Derived`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds a value of the wrong type."""


@dataclass(frozen=True)
class DataConfig:
    shards: str = "shards/synthetic"
    loader: str = "auto"  # auto | dali | torch
    image_size: int = 224
    channels: int = 1  # 1: grayscale stem (X-rays are gray); 3: replicate for ImageNet-pretrained weights
    per_device_batch_size: int = 64
    per_device_eval_batch_size: int = 128
    num_workers: int = 4  # DALI CPU threads / DataLoader workers
    hw_decoder_load: float = 0.65  # share of JPEGs sent to the GPU's hardware decoder (A100/H100); rest on CUDA cores
    train_split: str = "train"
    val_split: str = "val"
    # Augmentation and eval policy: same names and defaults as pipelines.spec.PreprocessSpec (a test pins it).
    train_scale: tuple[float, float] = (0.5, 1.0)  # random-resized-crop area fraction
    train_ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # crop aspect ratio range
    train_rotate_deg: float = 7.0
    train_brightness: float = 0.2
    train_contrast: float = 0.2
    train_hflip: bool = False  # chest anatomy is not mirror-symmetric (heart on the left)
    eval_crop_fraction: float = 1.0  # resize shorter side to size / fraction, then centre crop


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"  # any torchvision classifier: resnet18, densenet121, efficientnet_b0, ...
    pretrained: str = ""  # local safetensors file of ImageNet weights; never downloaded
    zero_init_residual: bool = True
    channels_last: bool = True
    compile: bool = False


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | adam
    lr: float = 1e-3
    weight_decay: float = 0.05  # applied to weights with ndim > 1 only (not norms, not biases)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    class_weighting: str = "balanced"  # balanced | none
    grad_clip_norm: float = 1.0  # 0 disables clipping
    grad_accum_steps: int = 1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    seed: int = 0
    resume: str = "auto"  # auto | never | PATH of a checkpoint directory
    keep_checkpoints: int = 2
    early_stopping_patience: int = 0  # epochs without a better val AUROC; 0 disables


@dataclass(frozen=True)
class LogConfig:
    wandb: bool = True
    project: str = "cxr-pipeline"
    entity: str = ""
    group: str = ""
    tags: tuple[str, ...] = ()
    name: str = ""  # W&B run name; defaults to the run directory's name
    log_every: int = 20  # optimizer steps between host syncs for train/* and perf/* metrics
    progress_bar: bool = True


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.loader": ("auto", "dali", "torch"),
    "optim.name": ("adamw", "adam"),
    "optim.schedule": ("cosine", "onecycle", "constant"),
    "optim.class_weighting": ("balanced", "none"),
}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's annotation; convert only where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads exponent-only floats such as 3e-4 as strings.
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a resume path or a group named 2024
    elif origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(key, v, args[0]) for v in value)
            if len(value) == len(args):
                return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"config key '{key}': expected {name}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' in {where}; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
            kwargs[name] = _build(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, hint)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(CHOICES[key])}")
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for k, v in update.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def parse_overrides(overrides: list[str]) -> dict:
    """`['--optim.lr=3e-4', 'train.epochs=2']` -> nested dict; values parsed as YAML scalars."""
    nested: dict = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        dotted, raw = text.split("=", 1)
        parts = dotted.split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: key must be section.key, e.g. --optim.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from exc
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML recipe at `path` < dotted overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (recipes live in train/configs/)")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        values = loaded
    values = _merge(values, parse_overrides(list(overrides)))
    return _build(Config, values, "")


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and W&B."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def config_from_dict(values: dict) -> Config:
    return _build(Config, values, "")


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
