"""Model construction: torchvision classifiers with a 1-channel stem and a 2-class head.

X-rays are grayscale, so the default stem takes one channel: a third of the decode output, host-to-device
copy and first-conv cost of a 3-channel stem. ImageNet weights are used only when a local safetensors
file is named (`--model.pretrained=PATH`); conv1 is then adapted by summing its RGB filters, which gives
the same response to a gray image replicated over three channels. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from train.config import ModelConfig

NUM_CLASSES = 2


def _parent_and_name(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent_name, _, child = qualified.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _first_conv(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise ValueError(f"{type(model).__name__} has no Conv2d layer to adapt to grayscale input")


def _last_linear(model: nn.Module) -> str:
    name = None
    for qualified, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = qualified
    if name is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier head")
    return name


def adapt_stem(model: nn.Module, in_channels: int) -> None:
    """Replace the first convolution so it takes `in_channels`; RGB weights are summed into 1 channel."""
    name = _first_conv(model)
    parent, child = _parent_and_name(model, name)
    conv: nn.Conv2d = getattr(parent, child)
    if conv.in_channels == in_channels:
        return
    if in_channels != 1:
        raise ValueError(f"cannot adapt a {conv.in_channels}-channel stem to {in_channels} channels")
    new = nn.Conv2d(
        1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, child, new)


def replace_head(model: nn.Module, num_classes: int) -> None:
    name = _last_linear(model)
    parent, child = _parent_and_name(model, name)
    old: nn.Linear = getattr(parent, child)
    setattr(parent, child, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def build_model(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """A torchvision classifier (`cfg.arch`) with an `in_channels` stem and a 2-class head."""
    if cfg.arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"model.arch={cfg.arch!r} is not a torchvision classifier; e.g. resnet50, resnet18, densenet121, "
            "efficientnet_b0"
        )
    kwargs = {"zero_init_residual": cfg.zero_init_residual} if cfg.arch.startswith(("resnet", "resnext", "wide_resnet")) else {}
    if cfg.pretrained:
        path = Path(cfg.pretrained)
        if path.suffix != ".safetensors" or not path.is_file():
            raise FileNotFoundError(
                f"model.pretrained={path}: expected a local .safetensors file of ImageNet weights for {cfg.arch} "
                "(convert a torchvision checkpoint with safetensors.torch.save_file on a machine that has it); "
                "weights are never downloaded"
            )
        model = torchvision.models.get_model(cfg.arch, weights=None, **kwargs)
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not match {cfg.arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        replace_head(model, NUM_CLASSES)
    else:
        model = torchvision.models.get_model(cfg.arch, weights=None, num_classes=NUM_CLASSES, **kwargs)
    adapt_stem(model, in_channels)
    return model
