import pytest
import torch
import torchvision
from safetensors.torch import save_file

from train.config import ModelConfig
from train.model import build_model


@pytest.mark.parametrize("arch", ["resnet50", "resnet18", "densenet121", "efficientnet_b0"])
def test_gray_stem_two_classes(arch):
    model = build_model(ModelConfig(arch=arch), in_channels=1).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64).to(memory_format=torch.channels_last))
    assert out.shape == (2, 2)


def test_three_channel_option():
    model = build_model(ModelConfig(arch="resnet18"), in_channels=3)
    assert model.conv1.in_channels == 3


def test_zero_init_residual():
    model = build_model(ModelConfig(zero_init_residual=True), in_channels=1)
    assert torch.count_nonzero(model.layer1[0].bn3.weight) == 0
    model = build_model(ModelConfig(zero_init_residual=False), in_channels=1)
    assert torch.count_nonzero(model.layer1[0].bn3.weight) > 0


def test_local_pretrained_weights_sum_rgb(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = build_model(ModelConfig(arch="resnet18", pretrained=str(path)), in_channels=1)
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.fc.out_features == 2
    # A gray image through the adapted stem equals the RGB-replicated image through the original one.
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(model.conv1(x), reference.conv1(x.expand(1, 3, 32, 32)))


def test_pretrained_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model(ModelConfig(pretrained=str(tmp_path / "nope.safetensors")), in_channels=1)


def test_unknown_arch():
    with pytest.raises(ValueError, match="not a torchvision classifier"):
        build_model(ModelConfig(arch="resnet51"), in_channels=1)
