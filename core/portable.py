"""Backbones in and out of the project: import a pretrained ResNet from the ecosystem's
checkpoint layouts as a standard artifact, export an artifact's backbone as plain torchvision.

Import (`python -m launch import SRC name=N`): the file is read with `weights_only=True` (or
as `.safetensors`); its layout is recognised by its keys:

    torchvision, timm   {"conv1.weight", "layer1.0.conv1.weight", ..., "fc.weight"}
    solo-learn          {"state_dict": {"backbone.*", "momentum_backbone.*", "projector.*", ...}}
    lightly             {"state_dict": {"backbone.*", "teacher_backbone.*", "projection_head.*", ...}}
    moco (v3)           {"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*", ...}}
    dino                {"student": {"module.backbone.*", ...}, "teacher": {"backbone.*", ...}}

`part=online|target` picks the online or the momentum/teacher network (auto: online, but
DINO's teacher, the network DINO evaluates). The architecture (ResNet-18/34/50) comes from the
block keys, the CIFAR stem (3x3 conv1, no max-pool) from conv1's kernel. Heads (fc,
projectors, predictors, classifiers) are dropped and listed. The artifact is what every stage
reads: model.pt (spec, weights, meta with the source file's sha256) and metrics.json.

Export (`python -m launch export ARTIFACT format=torchvision|safetensors`): the backbone as a
torchvision-layout state_dict (the probe head, when the artifact has one, as `fc`), and a
spec.json of every layer's shape, which rebuilds a pruned backbone whose widths are not
torchvision's (the README's `load_exported`). `format=onnx`: the fp32 classifier (backbone +
probe head; the backbone's pooled features when it has none) as `model.onnx`, dynamic batch,
its preprocessing in the file's metadata (core/onnx_export.py; needs the onnx extra).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from core import checkpoint as ckpt
from core.errors import UserError
from core.models import backbone_spec, build_backbone, count_macs, count_params

FORMATS = ("torchvision", "timm", "solo-learn", "lightly", "moco", "dino")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BLOCKS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
          ("bottleneck", (3, 4, 6, 3)): "resnet50"}


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"import: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise UserError(f"import: {path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"import: {path} needs pickled Python objects to load, which weights_only=True refuses "
                            f"(unpickling can run code); if you trust the file, keep only its tensors once, as the "
                            f"README's \"Compress a backbone you already have\" shows, and import that file") from None
        raise UserError(f"import: cannot read {path} ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(blob, dict):
        raise UserError(f"import: {path} holds a {type(blob).__name__}, not a dict of weights")
    return blob


def _tensors(d) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in d.items() if isinstance(v, torch.Tensor)} if isinstance(d, dict) else {}


def _under(d: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- layouts


def layouts(blob: dict, part: str) -> List[Tuple[str, str, Dict[str, torch.Tensor]]]:
    """(format, prefix of the backbone's keys, the dict they are in) for every layout the
    checkpoint matches."""
    online = part in ("auto", "online")
    found = []
    top = _tensors(blob)
    if "conv1.weight" in top:
        found.append(("torchvision", "", top))
    sd = _tensors(blob.get("state_dict"))
    if any(k.startswith("module.base_encoder.") for k in sd):
        found.append(("moco", "module.base_encoder." if online else "module.momentum_encoder.", sd))
    if any(k.startswith("momentum_backbone.") for k in sd):
        found.append(("solo-learn", "backbone." if online else "momentum_backbone.", sd))
    elif any(k.startswith("teacher_backbone.") for k in sd):
        found.append(("lightly", "backbone." if online else "teacher_backbone.", sd))
    elif any(k.startswith("backbone.") for k in sd):  # either's methods without a momentum network
        if not online:
            raise UserError("import: part=target, but this checkpoint has no momentum/teacher backbone")
        found.append(("solo-learn", "backbone.", sd))
    if isinstance(blob.get("teacher"), dict) and isinstance(blob.get("student"), dict):
        which = _tensors(blob["teacher" if part in ("auto", "target") else "student"])
        found.append(("dino", "backbone.", {k[len("module."):] if k.startswith("module.") else k: v
                                            for k, v in which.items()}))
    return [f for f in found if _under(f[2], f[1])]


def pick_layout(blob: dict, fmt: str, part: str, path: Path) -> Tuple[str, Dict[str, torch.Tensor], List[str]]:
    """(format, backbone weights, what was dropped): `format=auto` takes the one layout the
    keys match and refuses a file that matches two."""
    found = layouts(blob, part)
    if fmt == "timm":  # timm's ResNets use torchvision's key names
        fmt = "torchvision"
    if fmt != "auto":
        found = [f for f in found if f[0] == fmt or (fmt == "lightly" and f[0] == "solo-learn")]
        if not found:
            raise UserError(f"import: {path} does not have the {fmt} layout (keys: {', '.join(sorted(_keys(blob))[:4])}, ...)")
    if not found:
        raise UserError(f"import: {path} matches none of the layouts {', '.join(FORMATS)} "
                        f"(keys: {', '.join(sorted(_keys(blob))[:4])}, ...); give format=")
    if len(found) > 1:
        raise UserError(f"import: {path} is ambiguous: it matches the {' and the '.join(f[0] for f in found)} layouts; "
                        f"say which with format=")
    name, prefix, container = found[0]
    weights = _under(container, prefix)
    kept = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    dropped = {"fc.*"} if len(kept) < len(weights) else set()
    for k in container:  # everything beside the backbone, by its module: projector.*, module.predictor.*
        if prefix and not k.startswith(prefix):
            parts = k.split(".")
            depth = 2 if parts[0] == "module" and len(parts) > 2 else 1
            dropped.add(".".join(parts[:depth]) + ".*" if len(parts) > depth else k)
    return name, kept, sorted(dropped)


def _keys(blob: dict) -> List[str]:
    keys = list(blob)
    for sub in ("state_dict", "teacher"):
        if isinstance(blob.get(sub), dict):
            keys += [f"{sub}.{k}" for k in blob[sub]]
    return keys


def architecture(weights: Dict[str, torch.Tensor], path: Path) -> Tuple[str, bool]:
    """(arch, cifar_stem) from the keys and conv1's kernel."""
    kind = "bottleneck" if "layer1.0.conv3.weight" in weights else "basic"
    counts = tuple(1 + max((int(m.group(1)) for k in weights for m in [re.match(rf"layer{i}\.(\d+)\.", k)] if m),
                           default=-1) for i in (1, 2, 3, 4))
    arch = BLOCKS.get((kind, counts))
    if arch is None:
        raise UserError(f"import: {path} is a ResNet with {kind} blocks {list(counts)}; supported: ResNet-18, -34, -50")
    conv1 = weights.get("conv1.weight")
    if conv1 is None or conv1.shape[-1] not in (3, 7):
        raise UserError(f"import: {path}: conv1.weight is {None if conv1 is None else list(conv1.shape)}; "
                        f"expected a 7x7 (ImageNet) or 3x3 (CIFAR) stem")
    return arch, conv1.shape[-1] == 3


def load_backbone(weights: Dict[str, torch.Tensor], arch: str, cifar_stem: bool, path: Path) -> torch.nn.Module:
    model = build_backbone(arch, cifar_stem)
    expected = model.state_dict()
    for k in expected:  # some checkpoints leave out BN's step counters; they hold no weights
        if k.endswith("num_batches_tracked") and k not in weights:
            weights[k] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"import: {path} as {arch}: {len(missing)} missing and {len(unexpected)} unexpected backbone "
                        f"keys, the first {first}")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise UserError(f"import: {path} as {arch}: {k} has shape {list(weights[k].shape)}, "
                            f"{arch} needs {list(v.shape)}")
    model.load_state_dict(weights, strict=True)
    return model.eval()


def import_backbone(src: Path, run_dir: Path, name: str, fmt: str = "auto", part: str = "auto") -> Tuple[Path, str]:
    """Write the artifact; returns (run_dir, what was found, in words)."""
    if fmt not in ("auto", *FORMATS):
        raise UserError(f"import: format={fmt}; choices: auto, {', '.join(FORMATS)}")
    if part not in ("auto", "online", "target"):
        raise UserError(f"import: part={part}; choices: auto, online, target")
    src = Path(src)
    blob = read_checkpoint(src)
    found, weights, dropped = pick_layout(blob, fmt, part, src)
    arch, cifar_stem = architecture(weights, src)
    backbone = load_backbone(weights, arch, cifar_stem, src)
    size = 32 if cifar_stem else 224
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    meta = {"stage": "import", "name": name, "data": None, "num_classes": None, "image_size": size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "parents": [],
            "source_file": str(src.absolute()), "sha256": sha, "format": found, "part": part, "dropped": dropped}
    ckpt.save_model(run_dir, backbone, backbone_spec(backbone, arch, cifar_stem), meta)
    ckpt.write_json(run_dir / "metrics.json", {
        "stage": "import", "arch": arch, "cifar_stem": cifar_stem, "params": count_params(backbone),
        "macs": count_macs(backbone, size), "macs_image_size": size, "source": str(src.absolute()), "sha256": sha,
        "format": found, "part": part, "dropped": dropped})
    said = (f"{found} layout{' (part=' + part + ')' if part != 'auto' else ''}, {arch}, "
            f"{'CIFAR' if cifar_stem else 'ImageNet'} stem; dropped {', '.join(dropped) or 'nothing'}")
    return run_dir, said


# ----------------------------------------------------------------------------- export


def export_backbone(artifact: Path, fmt: str = "torchvision", out: Optional[Path] = None) -> List[Path]:
    """The backbone (and the probe head as `fc`) in torchvision's layout, and spec.json beside it
    (every layer's shape: a pruned model's widths). Returns the files written."""
    if fmt not in ("torchvision", "safetensors", "onnx"):
        raise UserError(f"export: format={fmt}; choices: torchvision, safetensors, onnx")
    if fmt == "onnx":
        from core import onnx_export

        onnx_export.require("export format=onnx")
    art = ckpt.load_model(Path(artifact), "export: artifact")
    out = Path(out) if out else Path(artifact) / "export"
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        return [export_onnx(art, out / "model.onnx")]
    weights = {k: v.contiguous() for k, v in art.backbone.state_dict().items()}
    if art.head is not None:
        weights.update({f"fc.{k}": v.contiguous() for k, v in art.head.state_dict().items()})
    written = []
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = out / "backbone.safetensors"
        save_file(weights, str(path), metadata={"arch": art.spec["arch"], "cifar_stem": str(art.spec["cifar_stem"])})
    else:
        path = out / "backbone.pt"
        ckpt.atomic_save(weights, path)
    written.append(path)
    # What rebuilds it without this project (README: "Export"): a pruned model's widths differ
    spec = {"arch": art.spec["arch"], "cifar_stem": art.spec["cifar_stem"], "shapes": art.spec["shapes"]}
    ckpt.atomic_write_text(out / "spec.json", json.dumps(spec, indent=1) + "\n")
    written.append(out / "spec.json")
    return written


def export_onnx(art: ckpt.Artifact, path: Path) -> Path:
    """The artifact's fp32 classifier (or bare backbone) as ONNX, preprocessing in its metadata."""
    from core import onnx_export
    from core.models import Classifier

    model = (Classifier(art.backbone, art.head) if art.head is not None else art.backbone).eval()
    size = int(art.meta.get("image_size", 224))
    meta = {"stage": art.meta.get("stage", ""), "name": art.meta.get("name", ""), "image_size": size,
            "arch": art.spec.get("arch", ""), "output": "logits" if art.head is not None else "features",
            "input": "float32 [B, 3, image_size, image_size], (pixels / 255 - mean) / std"}
    for key in ("mean", "std"):
        if art.meta.get(key) is not None:
            meta[key] = json.dumps(list(art.meta[key]))
    if art.head is not None:
        meta["num_classes"] = art.head.out_features
    return onnx_export.export(model, torch.zeros(2, 3, size, size), path, meta)
