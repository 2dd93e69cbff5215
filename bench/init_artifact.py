"""An untrained backbone artifact (model.pt, no head), optionally narrower than torchvision's.

Two uses: the from-scratch baseline of a fine-tuning comparison (`python -m finetune ...
artifact=DIR`, the "random init" row of SSL papers), and the CPU-scale QAT check of
bench/qat_cifar_cpu.sh (a half-width ResNet-18 is the shape of the pipeline's pruned student,
trainable on 2 CPU cores). Every channel count is scaled by --width (the RGB input stays 3) and
kept a multiple of 16, as the prune stage keeps them (oneDNN's int8 fast path).

    python bench/init_artifact.py runs/init/r18-w05 --arch resnet18 --width 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import checkpoint as ckpt  # noqa: E402
from core.models import backbone_from_spec, backbone_spec, build_backbone, count_macs, count_params  # noqa: E402
from distill.train import reinit_like_torchvision  # noqa: E402


def scaled(channels: int, width: float, multiple: int = 16) -> int:
    return max(multiple, int(round(channels * width / multiple)) * multiple)


def narrow_spec(arch: str, cifar_stem: bool, width: float) -> dict:
    """torchvision's spec with every conv/BN channel count scaled by `width`."""
    spec = backbone_spec(build_backbone(arch, cifar_stem), arch, cifar_stem)
    shapes = {}
    for name, shape in spec["shapes"].items():
        shape = list(shape)
        shape[0] = scaled(shape[0], width)
        if len(shape) == 4 and shape[1] != 3:  # conv input channels (not the image's)
            shape[1] = scaled(shape[1], width)
        shapes[name] = shape
    return {**spec, "shapes": shapes}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="artifact directory to write (model.pt)")
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet34", "resnet50"))
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (0.5: half the channels)")
    parser.add_argument("--imagenet-stem", action="store_true", help="7x7 stride-2 stem (default: CIFAR stem)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32, help="for the MACs printed")
    args = parser.parse_args(argv)
    if not 0 < args.width <= 4:
        parser.error(f"--width must be in (0, 4], got {args.width}")
    if (args.out / "model.pt").exists():
        raise SystemExit(f"{args.out}/model.pt exists; pick another directory")
    spec = narrow_spec(args.arch, not args.imagenet_stem, args.width)
    torch.manual_seed(args.seed)
    backbone = backbone_from_spec(spec)  # resized modules start with PyTorch's default init:
    reinit_like_torchvision(backbone)    # torchvision's ResNet init instead, seeded
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"stage": "init", "name": args.out.name, "width": args.width, "seed": args.seed, "parents": []}
    path = ckpt.save_model(args.out, backbone, spec, meta)
    print(f"{path}: {args.arch} x{args.width}, {count_params(backbone) / 1e6:.2f}M params, "
          f"{count_macs(backbone, args.image_size) / 1e6:.1f}M MACs at {args.image_size} px (untrained)")
    return path


if __name__ == "__main__":
    main()
