import dataclasses

import pytest
import yaml

from pipelines.spec import PreprocessSpec
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


def test_data_defaults_match_preprocess_spec():
    """The config mirrors the spec's augmentation fields; drifting defaults would change training silently."""
    spec_fields = {f.name: f.default for f in dataclasses.fields(PreprocessSpec)}
    data = DataConfig()
    for field in dataclasses.fields(DataConfig):
        if field.name in spec_fields and field.name not in ("mean", "std"):
            assert getattr(data, field.name) == pytest.approx(spec_fields[field.name]), field.name


@pytest.mark.parametrize("recipe", ["default", "demo", "smoke"])
def test_recipes_load(recipe):
    cfg = load_config(f"train/configs/{recipe}.yaml")
    assert cfg.model.arch == "resnet50"
