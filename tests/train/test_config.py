import dataclasses
from pathlib import Path

import pytest
import yaml

from pipelines.spec import PreprocessConfig, PreprocessSpec
from train.config import (
    Config,
    ConfigError,
    DataConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


def test_precedence_defaults_recipe_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.01\n  weight_decay: 0.2\ntrain:\n  epochs: 7\n")
    cfg = load_config(recipe, ["--optim.lr=3e-4", "train.seed=5"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # CLI beats recipe (and YAML 1.1 '3e-4' is read as a float)
    assert cfg.optim.weight_decay == pytest.approx(0.2)  # recipe beats default
    assert cfg.train.epochs == 7
    assert cfg.train.seed == 5
    assert cfg.optim.betas == Config().optim.betas  # untouched default


def test_contract_keys_parse():
    cfg = load_config(None, ["--data.shards=/x/y", "--data.loader=torch", "--train.epochs=3", "--run.dir=runs/a",
                             "--train.resume=never", "--log.wandb=false", "--log.tags=[a, b]"])
    assert (cfg.data.shards, cfg.data.loader, cfg.train.epochs, cfg.run.dir) == ("/x/y", "torch", 3, "runs/a")
    assert cfg.train.resume == "never" and cfg.log.wandb is False and cfg.log.tags == ("a", "b")


@pytest.mark.parametrize("override, key", [
    ("--optim.lrr=1", "optim.lrr"),
    ("--nosuch.lr=1", "nosuch"),
])
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_unknown_key_in_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  archh: resnet18\n")
    with pytest.raises(ConfigError, match="model.archh"):
        load_config(recipe)


@pytest.mark.parametrize("override, key", [
    ("--train.epochs=1.5", "train.epochs"),
    ("--train.epochs=true", "train.epochs"),
    ("--log.wandb=yes please", "log.wandb"),
    ("--optim.lr=fast", "optim.lr"),
    ("--optim.betas=[0.9]", "optim.betas"),
    ("--data.loader=pil", "data.loader"),
])
def test_bad_type_is_named(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key"):
        load_config(None, ["--lr=1"])
    with pytest.raises(ConfigError, match="--section.key=value"):
        load_config(None, ["--optim.lr"])


def test_frozen_and_round_trip(tmp_path):
    cfg = load_config(None, ["--optim.lr=0.5", "--log.tags=[x]"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert config_to_dict(cfg)["log"]["tags"] == ["x"]


def test_preprocessing_keys_reach_the_spec_without_a_copy():
    """DataConfig *is* a PreprocessConfig: a --data override reaches the loaders' spec unchanged."""
    cfg = load_config(None, ["--data.train_scale=[0.3, 0.9]", "--data.image_size=96", "--data.train_hflip=true"])
    spec = PreprocessSpec.from_config(cfg.data, {"stats": {"mean": 0.4, "std": 0.2}})
    assert (spec.train_scale, spec.image_size, spec.train_hflip) == ((0.3, 0.9), 96, True)
    assert (spec.mean, spec.std) == (0.4, 0.2)
    assert isinstance(DataConfig(), PreprocessConfig)


@pytest.mark.parametrize("override, key", [
    ("--optim.lr=0", "optim.lr"),
    ("--optim.lr=-1e-3", "optim.lr"),
    ("--optim.grad_accum_steps=0", "optim.grad_accum_steps"),
    ("--data.per_device_batch_size=0", "data.per_device_batch_size"),
    ("--data.channels=2", "data.channels"),
    ("--data.image_size=0", "data.image_size"),
    ("--data.train_scale=[0.9, 0.2]", "data.train_scale"),
    ("--model.arch=resnet5O", "model.arch"),
    ("--train.epochs=0", "train.epochs"),
    ("--train.ema_decay=0.2", "train.ema_decay"),
    ("--train.ema_decay=1", "train.ema_decay"),
    ("--train.mixup_alpha=-1", "train.mixup_alpha"),
    ("--train.mix_prob=1.5", "train.mix_prob"),
    ("--train.select_by=f1", "train.select_by"),
    ("--data.train_gamma=3", "data.train_gamma"),
    ("--data.train_affine_zoom=[1.2, 0.9]", "data.train_affine_zoom"),
    ("--data.train_affine_translate=0.6", "data.train_affine_translate"),
    ("--data.train_erase_prob=2", "data.train_erase_prob"),
    ("--data.train_noise_std=-0.1", "data.train_noise_std"),
])
def test_out_of_range_values_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("optim:\n  lr: [1e-3\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml line \d+ is not valid YAML"):
        load_config(recipe)


def test_help_lists_every_key_with_its_meaning(tmp_path):
    import subprocess
    import sys

    from _runs import REPO, train_env

    # train_env puts this checkout first on PYTHONPATH: `python train/run.py` would otherwise import the
    # packages beside train/ from wherever the project is pip-installed (another worktree's copy).
    out = subprocess.run([sys.executable, "train/run.py", "--help"], cwd=REPO, env=train_env(tmp_path),
                         capture_output=True, text=True, check=True).stdout
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.type if isinstance(section.type, type) else getattr(
                __import__("train.config", fromlist=["x"]), section.type)):
            assert f"--{section.name}.{f.name}" in out, f"{section.name}.{f.name}"
    assert "random-resized-crop area fraction" in out and "peak learning rate" in out


@pytest.mark.parametrize("recipe", ["default", "demo", "smoke"])
def test_recipes_load(recipe):
    cfg = load_config(f"train/configs/{recipe}.yaml")
    assert cfg.model.arch == "resnet50"


def test_cpu_recipe_loads_and_comments_every_value():
    # STYLE: each recipe YAML comments every non-default value with its reason.
    cfg = load_config("train/configs/cpu.yaml")
    assert cfg.model.arch == "resnet50" and cfg.data.image_size == 128 and cfg.train.cpu_threads == 2
    defaults = load_config(None)
    lines = Path("train/configs/cpu.yaml").read_text().splitlines()
    for section in ("data", "model", "optim", "train", "log"):
        for f in dataclasses.fields(getattr(cfg, section)):
            if getattr(getattr(cfg, section), f.name) != getattr(getattr(defaults, section), f.name):
                line = next((x for x in lines if x.strip().startswith(f"{f.name}:")), "")
                assert "#" in line, f"{section}.{f.name} differs from the default without a comment"


def test_cpu_threads_key_env_and_default(monkeypatch):
    """train.cpu_threads wins (accelerate launch exports OMP_NUM_THREADS=1), then OMP_NUM_THREADS, then the
    cores data.num_workers leaves free."""
    import types

    import torch

    from train.run import configure_cpu_threads

    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)))
    try:
        configure_cpu_threads(load_config(None, ["--data.num_workers=1"]), cpu)
        assert torch.get_num_threads() == 3
        configure_cpu_threads(load_config(None, ["--data.num_workers=1", "--train.cpu_threads=2"]), cpu)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        configure_cpu_threads(load_config(None, ["--train.cpu_threads=2"]), cpu)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        configure_cpu_threads(load_config(None, ["--data.num_workers=1"]), cpu)
        assert torch.get_num_threads() == 1  # the variable, not the 3 free cores
        with pytest.raises(ConfigError, match="train.cpu_threads"):
            load_config(None, ["--train.cpu_threads=-1"])
    finally:
        torch.set_num_threads(before)
