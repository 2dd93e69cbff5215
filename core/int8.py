"""A shipped int8 package (quant's `model_int8.pt2`) as the stages that read it see it.

The quant stage writes the package and names it in its model.pt (`meta["int8_package"]`);
probe and finetune evaluate it as it ships, with the preprocessing stored inside it. The
package's numbers depend on the CPU that runs it (core/cpu.py), so `verify_against_record`
compares a measurement here with the one the quant stage recorded, and says which CPUs.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from core import checkpoint as ckpt
from core.augment import eval_view
from core.cpu import cpu_facts, describe
from core.engine import quiet_library_noise
from core.errors import UserError
from core.evaluate import topk_accuracy

quiet_library_noise()  # torchao's and torch's import-time warnings (core/engine.py)

# A package re-measured on another CPU may differ from its record by this much top-1 before
# `verify_against_record` warns: the int8 budget the project holds a quantised model to (0.5 point).
# Within it: float rounding at quantisation boundaries (README, "int8 on CPUs with and without VNNI").
TOP1_TOLERANCE = 0.005


class PackagedModel(nn.Module):
    """A loaded `.pt2` package as a module (so latency and evaluation code can call it).

    It refuses an input the package was not built for (AOTInductor runs any buffer it is given:
    a 1-channel or 32px batch into a 3x16x16 package returned logits, reading past the input):
    float32 [N, 3, S, S] with S the package's image_size. (AOTInductor's own check,
    AOTI_RUNTIME_CHECK_INPUTS=1, is no substitute: with torch 2.14 it refused batch 1, under the
    export's lower bound of 2, and with that bound's check off, a batch of 24: "expected <= 15".)
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):  # before torch, which logs a warning about it first
            raise UserError(f"cannot load the int8 package {path}: not a .pt2 (zip) archive")
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as e:
            raise UserError(f"cannot load the int8 package {path}: {str(e).splitlines()[0][:160]}") from None
        size = self.metadata().get("image_size")
        self.image_size = int(size) if size else None

    def forward(self, x):
        return self.runner(self.checked(x))

    def checked(self, x) -> torch.Tensor:
        size = self.image_size
        ok = (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.dim() == 4 and x.shape[0] >= 1
              and x.shape[1] == 3 and (size is None or tuple(x.shape[2:]) == (size, size)))
        if not ok:
            got = f"{str(x.dtype).replace('torch.', '')} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(f"{self.path.name} takes float32 images [N, 3, {size or 'S'}, {size or 'S'}] "
                            f"(normalised with its metadata's mean and std); got {got}")
        return x.contiguous()  # the package's kernels assume its export's (contiguous) strides

    def metadata(self) -> Dict[str, str]:
        return dict(self.runner.get_metadata())


def package_of(art: ckpt.Artifact, source: Path) -> Optional[Path]:
    """The exported int8 file an artifact names in its meta (quant's), or None for fp32 ones."""
    name = art.meta.get("int8_package")
    if not name:
        return None
    path = Path(source) / name
    if not path.is_file():
        raise UserError(f"artifact {source} is int8 but its package {path} is missing "
                        f"(model.pt names int8_package={name!r})")
    return path


def preprocessing(model: PackagedModel, splits) -> tuple:
    """(mean, std, image size) stored in the package, checked against the data."""
    meta = model.metadata()
    classes = int(meta.get("num_classes", splits.num_classes))
    if classes != splits.num_classes:
        raise UserError(f"the int8 package {model.path} predicts {classes} classes, the data has {splits.num_classes}")
    mean = tuple(json.loads(meta["mean"])) if "mean" in meta else splits.mean
    std = tuple(json.loads(meta["std"])) if "std" in meta else splits.std
    return mean, std, int(meta.get("image_size", splits.image_size))


@torch.no_grad()
def package_accuracy(model: PackagedModel, images: torch.Tensor, labels: torch.Tensor, splits,
                     batch_size: int = 256) -> Dict[int, float]:
    """top-1 / top-5 of the package on uint8 images, on the CPU (int8 kernels are CPU kernels)."""
    mean, std, size = preprocessing(model, splits)
    logits = torch.cat([model(eval_view(chunk.cpu(), size, mean, std)) for chunk in images.split(batch_size)])
    return topk_accuracy(logits, labels.cpu())


def verify_against_record(measured_top1: float, record: dict) -> dict:
    """This CPU's top-1 of a package beside the one its quant run recorded (metrics.json):
    {"int8_recorded_top1", "int8_top1_here", "int8_cpu_recorded", "int8_cpu_here", "int8_verified"}."""
    here = cpu_facts()
    recorded = record.get("probe_top1")
    out = {"int8_top1_here": measured_top1, "int8_recorded_top1": recorded,
           "int8_cpu_here": here, "int8_cpu_recorded": record.get("cpu"),
           "int8_reduce_range": record.get("reduce_range"), "int8_tolerance": TOP1_TOLERANCE,
           "int8_verified": None}
    if recorded is not None:
        out["int8_verified"] = abs(measured_top1 - recorded) <= TOP1_TOLERANCE
    return out


def verdict_line(check: dict) -> str:
    """One line for the console: agreement, or a warning that names both CPUs."""
    here = describe(check["int8_cpu_here"])
    if check["int8_recorded_top1"] is None:
        return f"int8 package top-1 {check['int8_top1_here']:.4f} on {here} (no recorded top-1 to compare)"
    recorded = check["int8_cpu_recorded"]
    where = describe(recorded) if recorded else "an unrecorded CPU"
    diff = check["int8_top1_here"] - check["int8_recorded_top1"]
    line = (f"int8 package top-1 {check['int8_top1_here']:.4f} on {here}; recorded "
            f"{check['int8_recorded_top1']:.4f} on {where} ({diff * 100:+.2f} points)")
    if check["int8_verified"]:
        return line + f": within {TOP1_TOLERANCE * 100:.1f} point"
    hint = ""
    if not check["int8_cpu_here"]["int8_vnni"] and check["int8_reduce_range"] is False:
        hint = "; this CPU has no VNNI: requantise with quant.reduce_range=true for it"
    return f"WARNING: {line}, past the {TOP1_TOLERANCE * 100:.1f}-point tolerance{hint}"
