"""Backbones (torchvision ResNets, optional CIFAR stem) and the spec that rebuilds them.

A backbone maps images to pooled features ([B, D]); its `fc` is an Identity. A spec is a
plain dict (arch, cifar_stem and the shape of every conv/BN/linear weight), so a pruned
backbone, whose channel counts differ from torchvision's, is rebuilt from its spec and then
gets its state_dict: nothing is ever unpickled.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from core.errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50")


def build_backbone(arch: str, cifar_stem: bool = True) -> nn.Module:
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choices: {', '.join(ARCHS)}")
    model = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        # 32px inputs: a 3x3 stride-1 stem and no max-pool keep 32x32 maps into layer1
        # (He et al. 2016, Sec. 4.2; the SimCLR/BYOL CIFAR variants do the same).
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features: the last BatchNorm's channels (holds for pruned ResNets)."""
    last = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    return last.num_features


def backbone_spec(backbone: nn.Module, arch: str, cifar_stem: bool) -> dict:
    shapes = {name: list(m.weight.shape) for name, m in backbone.named_modules()
              if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))}
    return {"arch": arch, "cifar_stem": cifar_stem, "shapes": shapes}


def backbone_from_spec(spec: dict) -> nn.Module:
    """torchvision's module, with every conv/BN/linear resized to the shapes in `spec`."""
    model = build_backbone(spec["arch"], spec["cifar_stem"])
    shapes = spec.get("shapes", {})
    for name, module in list(model.named_modules()):
        if name not in shapes or list(module.weight.shape) == shapes[name]:
            continue
        shape = shapes[name]
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(shape[1] * module.groups, shape[0], module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(shape[0], module.eps, module.momentum, module.affine)
        elif isinstance(module, nn.Linear):
            new = nn.Linear(shape[1], shape[0], module.bias is not None)
        else:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


class Classifier(nn.Module):
    """Backbone + linear head: what the probe, KD teacher and QAT see as 'the model'."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(backbone: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one image, counted by Torch-Pruning (counts real channels)."""
    import torch_pruning as tp

    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    macs, _ = tp.utils.count_ops_and_params(backbone, torch.zeros(1, 3, image_size, image_size, device=device))
    backbone.train(was_training)
    return int(macs)
