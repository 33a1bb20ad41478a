import json

import pytest

from pipelines.spec import PreprocessSpec


def test_from_manifest_reads_stats_and_overrides(tiny_shards):
    stats = json.loads((tiny_shards / "manifest.json").read_text())["stats"]
    spec = PreprocessSpec.from_manifest(tiny_shards, image_size=64, channels=3)
    assert (spec.mean, spec.std) == (pytest.approx(stats["mean"]), pytest.approx(stats["std"]))
    assert (spec.image_size, spec.channels, spec.train_hflip) == (64, 3, False)


def test_from_manifest_dict_without_stats_names_the_fix():
    with pytest.raises(ValueError, match="make_shards.py"):
        PreprocessSpec.from_manifest({"splits": {}})


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError, match="image_sise"):
        PreprocessSpec.from_manifest({"stats": {"mean": 0.5, "std": 0.2}}, image_sise=64)


@pytest.mark.parametrize("bad", [{"channels": 2}, {"std": 0.0}, {"train_scale": (0.8, 0.5)}, {"eval_crop_fraction": 1.5}])
def test_invalid_values_are_rejected(bad):
    with pytest.raises(ValueError):
        PreprocessSpec(**bad)


def test_eval_resize_size_follows_crop_fraction():
    assert PreprocessSpec(image_size=224, eval_crop_fraction=0.875).eval_resize_size == 256
    assert PreprocessSpec(image_size=224).eval_resize_size == 224
