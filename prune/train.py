"""Structured pruning to a MACs budget with Torch-Pruning (DepGraph, Fang et al. CVPR 2023),
optionally after sparsity training (network slimming), then recovery fine-tuning with the
distillation losses (or plain cross-entropy).

    python -m prune configs/quickstart.yaml student=runs/distill/quickstart
    python -m prune configs/quickstart.yaml sparsity.epochs=5 sparsity.reg=1e-3 prune.importance=bn_scale

In the order the work happens:
1. Load the student artifact (any backbone with a model.pt) and measure it: params, MACs,
   file size, latency. Give it a probe head if it has none. Write checkpoint.pt at step 0 with
   the (unpruned) student: from here on the model always comes from checkpoint.pt.
2. Sparsity (`sparsity.epochs > 0`; off by default): network slimming (Liu et al., ICCV 2017).
   The unpruned student trains with the recovery objective of step 5 plus
   `sparsity.reg * sum |BN scale|`: after every backward, Torch-Pruning's
   `BNScalePruner.regularize` adds reg * sign(gamma) to each BatchNorm scale's gradient, so the
   channels the loss does not need drift to gamma = 0, where removing them costs nothing.
   metrics.json records the |gamma| histogram and L1 norm before and after (bn_scales.png).
3. Search the pruning ratio whose pruned model's MACs land at or just under
   `prune.target_macs_ratio` x the original. Every trial prunes a fresh copy with
   Torch-Pruning (importance, global or uniform ranking, iterative steps, channel counts
   rounded to multiples of prune.round_to), so the result is a pure function of the weights, the config
   and the data: pruning twice gives the same model (tests/test_prune.py checks it).
4. Write checkpoint.pt with the pruned architecture (a spec of every conv/BN shape) and its
   weights. A restarted job rebuilds the model from the spec and never prunes again.
5. Recovery: fine-tune the pruned student against the teacher with core.distill's losses
   (`recovery: distill`) or with cross-entropy through its probe head (`recovery: ce`).
6. Final: kNN and linear probe, model.pt (spec + weights + probe head), metrics.json with
   params/MACs/size/latency before and after.

Sparsity and recovery share one step counter and one checkpoint.pt: steps [0, S) train the
unpruned student (S = sparsity.epochs x steps per epoch), [S, S + R) the pruned one, and
`train.max_steps` counts both. A job stopped anywhere resumes exactly where it was.

What is never pruned: the classes of the probe head. The head rides along in the pruned graph
as the last layer, so its input columns follow the embedding's kept channels and it stays a
valid head for the pruned backbone. The pooled embedding itself (the last stage's residual
width, 512 in a ResNet-18) is pruned by default: that stage holds 75% of a ResNet-18's
parameters, and everything after the embedding (probe head, distillation projector) is sized
from the pruned width (`core.models.feature_dim` reads the last BatchNorm).
`prune.keep_embedding=true` keeps it at full width instead.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.optim.swa_utils import update_bn

from core import checkpoint as ckpt
from core import engine
from core.augment import AugmentConfig, eval_view, one_view, supervised_aug
from core.config import StageConfig, TrainConfig, choice
from core.distill import Distiller, DistillLossConfig, load_teacher
from core.errors import UserError
from core.evaluate import (assert_unchanged, evaluate_backbone, extract_features, features_cka, snapshot,
                           train_linear_probe)
from core.latency import LatencyConfig, latency_metrics
from core.loop import Run
from core.models import Classifier, backbone_from_spec, backbone_spec, count_macs, count_params
from core.optim import build_optimizer
from core.track import log_line

STAGE = "prune"

# Torch-Pruning's importance criteria. Group* variants sum a channel's score over every layer
# its removal touches (conv filters, BN, the next conv's input columns), as DepGraph does.
IMPORTANCES = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),  # |gamma| (Liu et al. 2017, network slimming)
    "taylor": lambda: tp.importance.GroupTaylorImportance(),  # |w * dL/dw| (Molchanov et al. 2019)
}


@dataclass
class PruneConfig:
    target_macs_ratio: float = 0.5  # MACs kept / MACs of the student; 0 < x < 1
    importance: str = choice("l2", "l1", "l2", "bn_scale", "taylor")
    # Rank channels across all layers (True) or remove the same fraction from every layer
    # (False). Global lands close to any MACs target; uniform can only land on the steps its
    # rounded channel counts allow (see `macs_tolerance`).
    global_pruning: bool = True
    iterative_steps: int = 1  # prune in this many equal steps, re-ranking importance after each
    # Kept channel counts are multiples of this: oneDNN's int8 convolutions (what the quant stage
    # exports) leave their fast path at batch 1 on other widths (bench/prune_widths_cpu.sh measures
    # it; README, "CIFAR-10 end to end").
    round_to: int = 32
    max_layer_ratio: float = 0.9  # no layer loses more than this fraction of its channels
    keep_embedding: bool = False  # True: the pooled embedding keeps its full width
    # Fixed fractions of channels removed from named parts of the backbone (`{layer4: 0.7}`),
    # each ranked on its own (Torch-Pruning's pruning_ratio_dict); the rest is pruned to the MACs
    # target. Why: a MACs target alone removes little of a ResNet-18's layer4, which holds most of
    # its parameters at few of its MACs (README, "CIFAR-10 end to end", has the rehearsal's sizes).
    layer_ratios: Dict[str, float] = field(default_factory=dict)
    # The ratio search stops as soon as target - tol <= achieved <= target, or after
    # `search_trials` prunings; the result is always <= target (the closest one found).
    macs_tolerance: float = 0.02
    search_trials: int = 10
    taylor_batches: int = 4  # labelled batches whose loss gradients rank channels for taylor
    # Removing channels changes what every later BatchNorm sees, so the student's running
    # statistics go stale: re-estimate them on this many training batches after pruning
    # (adaptive BN, EagleEye, Li et al. ECCV 2020); 0 keeps them.
    bn_recalibration_batches: int = 20


def default_train() -> TrainConfig:
    # Recovery is fine-tuning from the pruned weights: short, SGD, a gentle start while the
    # new distillation projector (random at step 0) finds its feet.
    return TrainConfig(epochs=10, batch_size=256, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                       warmup_epochs=1.0)


@dataclass
class SparsityConfig:
    """Network slimming (Liu et al., ICCV 2017): before pruning, train the unpruned student on
    loss + reg * sum |BN scale| (Torch-Pruning's BNScalePruner.regularize), so that pruning by
    BN scale removes channels already near 0.

    The phase uses the recovery objective (`recovery`, `loss`) and the `train` optimizer
    settings, with its own warmup + cosine schedule over sparsity.epochs, and the same adapter
    warmup (backbone frozen, hence unpenalised, for its first adapter_warmup_epochs, which
    sparsity.epochs must therefore exceed).
    The penalty does not depend on prune.importance: bn_scale ranks channels by exactly the
    scales it drives to 0 (the paper's method); l1/l2 group magnitudes count the BN scales among
    the group's weights; taylor ignores them. Any of them runs, and metrics.json names it.
    """

    epochs: int = 0  # 0 = off: prune the student as it is
    # lambda. Liu et al. trained from scratch (160 CIFAR epochs) with 1e-4 for VGG and 1e-5 for
    # ResNets. A few epochs of fine-tuning need the larger end: SGD moves every scale toward 0 by
    # about reg * (sum of the phase's lrs) / (1 - momentum), whatever the loss does.
    reg: float = 1e-4


@dataclass
class Config(StageConfig):
    least_train_epochs: ClassVar[int] = 0  # train.epochs=0: prune (after any sparsity epochs), no recovery
    student: str = ""  # artifact dir of the backbone to prune (runs/distill/N, or any with model.pt)
    teacher: str = ""  # artifact dir of the teacher (runs/byol/N); needed for recovery=distill
    teacher_head: str = ""  # probe dir (runs/probe/NAME) for kd; "" = the head in the teacher's model.pt
    recovery: str = choice("distill", "distill", "ce")
    # For the first epochs only the new parts train (distillation projector / adapters / head)
    # and the pruned backbone stays frozen, in eval mode: a random projector's gradients would
    # otherwise distort good features before it has learned anything (LP-FT, Kumar et al. 2022).
    adapter_warmup_epochs: float = 1.0
    prune: PruneConfig = field(default_factory=PruneConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)  # off by default
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)  # default: embed (cosine), label-free
    train: TrainConfig = field(default_factory=default_train)
    aug: AugmentConfig = field(default_factory=supervised_aug)  # crop + flip
    latency: LatencyConfig = field(default_factory=LatencyConfig)


def check_config(cfg: Config) -> None:
    """Every mistake the config can hold, found before any work is done."""
    p = cfg.prune
    if not 0.0 < p.target_macs_ratio < 1.0:
        raise UserError(f"bad value for 'prune.target_macs_ratio': {p.target_macs_ratio}; expected 0 < x < 1 "
                        "(the fraction of the student's MACs to keep)")
    if p.importance not in IMPORTANCES:
        raise UserError(f"bad value for 'prune.importance': {p.importance!r}; choices: {', '.join(IMPORTANCES)}")
    if cfg.recovery not in ("distill", "ce"):
        raise UserError(f"bad value for 'recovery': {cfg.recovery!r}; choices: distill, ce")
    for key, value, ok, expected in [
        ("prune.iterative_steps", p.iterative_steps, p.iterative_steps >= 1, ">= 1"),
        ("prune.round_to", p.round_to, p.round_to >= 1, ">= 1"),
        ("prune.max_layer_ratio", p.max_layer_ratio, 0.0 < p.max_layer_ratio < 1.0, "0 < x < 1"),
        ("prune.macs_tolerance", p.macs_tolerance, 0.0 <= p.macs_tolerance < p.target_macs_ratio,
         "0 <= x < target_macs_ratio"),
        ("prune.search_trials", p.search_trials, p.search_trials >= 1, ">= 1"),
        *[(f"prune.layer_ratios.{k}", v, isinstance(v, (int, float)) and 0.0 <= v <= p.max_layer_ratio,
           "0 <= x <= prune.max_layer_ratio") for k, v in p.layer_ratios.items()],
        ("prune.taylor_batches", p.taylor_batches, p.taylor_batches >= 1, ">= 1"),
        ("prune.bn_recalibration_batches", p.bn_recalibration_batches, p.bn_recalibration_batches >= 0, ">= 0"),
        ("train.epochs", cfg.train.epochs, cfg.train.epochs >= 0, ">= 0 (0 = prune without recovery)"),
        ("adapter_warmup_epochs", cfg.adapter_warmup_epochs, 0 <= cfg.adapter_warmup_epochs, ">= 0"),
        ("sparsity.epochs", cfg.sparsity.epochs, cfg.sparsity.epochs >= 0, ">= 0 (0 = no sparsity training)"),
        ("sparsity.reg", cfg.sparsity.reg, math.isfinite(cfg.sparsity.reg) and cfg.sparsity.reg >= 0,
         ">= 0 (the L1 weight lambda on BN scales; 0 trains without the penalty)"),
    ]:
        if not ok:
            raise UserError(f"bad value for '{key}': {value}; expected {expected}")
    if 0 < cfg.sparsity.epochs <= cfg.adapter_warmup_epochs:
        raise UserError(f"sparsity.epochs={cfg.sparsity.epochs} <= adapter_warmup_epochs={cfg.adapter_warmup_epochs}: "
                        "the backbone would stay frozen, and unpenalised, for the whole sparsity phase; "
                        "raise sparsity.epochs or lower adapter_warmup_epochs")
    if not cfg.student:
        raise UserError("prune needs student=DIR (the artifact dir of the backbone to prune, e.g. runs/distill/N)")
    if cfg.recovery == "distill" and (cfg.train.epochs > 0 or cfg.sparsity.epochs > 0):
        if not cfg.teacher:
            raise UserError("recovery=distill needs teacher=DIR (the teacher's artifact dir; sparsity "
                            "training uses the same objective); or use recovery=ce to train with labels alone")
        weights = {k: getattr(cfg.loss, k) for k in ("embed", "hint", "relation", "kd", "ce")}
        if not any(w > 0 for w in weights.values()) or any(w < 0 for w in weights.values()):
            raise UserError(f"recovery=distill needs loss weights >= 0 and at least one > 0; got {weights}")


# ----------------------------------------------------------------------------- pruning


def ignored_layers(model: Classifier, keep_embedding: bool) -> List[nn.Module]:
    """Layers whose output channels Torch-Pruning must not remove.

    The head's outputs are the classes. Torch-Pruning skips a whole group (every layer tied to
    it through residual additions) when any of its out-channel layers is ignored, so keeping
    the embedding only needs the last conv of the last residual block.
    """
    ignored = [model.head]
    if keep_embedding:
        last_block = model.backbone.layer4[-1]
        ignored.append([m for m in last_block.modules() if isinstance(m, nn.Conv2d)][-1])
    return ignored


def part_ratios(model: Classifier, layer_ratios: Dict[str, float]) -> Dict[nn.Module, float]:
    """prune.layer_ratios as Torch-Pruning's pruning_ratio_dict: {conv: ratio} for every conv of
    each named part. One entry per conv, not one tuple per part: a tuple is one ranking scope, and
    on the CPU rehearsal of configs/pipelines/cifar10.yaml ranking layer4 as one scope took the
    residual width from 512 to 48 (a 48-d embedding) while the inner widths kept 240."""
    parts = dict(model.backbone.named_children())
    out = {}
    for name, ratio in layer_ratios.items():
        convs = [m for m in parts[name].modules() if isinstance(m, nn.Conv2d)] if name in parts else []
        if not convs:
            raise UserError(f"prune.layer_ratios: the backbone has no part {name!r} with convolutions; parts: "
                            f"{', '.join(n for n, m in parts.items() if any(isinstance(c, nn.Conv2d) for c in m.modules()))}")
        out.update({conv: ratio for conv in convs})
    return out


def build_pruner(model: Classifier, example: torch.Tensor, cfg: PruneConfig, ratio: float = 0.0,
                 sparsity_reg: Optional[float] = None) -> tp.pruner.BasePruner:
    """Torch-Pruning's pruner over `model`, whose step() removes `ratio` of the channels.

    With `sparsity_reg` it is a BNScalePruner: its regularize(model) adds sparsity_reg *
    sign(gamma) to the gradient of every BatchNorm scale outside the ignored layers (the
    subgradient of sparsity_reg * sum |gamma|; the ignored layers here are the head and, with
    keep_embedding, a conv, so every BN of the backbone is penalised). Its step() is
    BasePruner's, so the ratio search prunes its copies with the plain one, built here with
    the same importance, ignored layers and rounding.
    """
    model.eval()  # tracing and gradients must not touch BatchNorm's running statistics
    kwargs = dict(global_pruning=cfg.global_pruning, pruning_ratio=ratio, max_pruning_ratio=cfg.max_layer_ratio,
                  iterative_steps=cfg.iterative_steps, ignored_layers=ignored_layers(model, cfg.keep_embedding),
                  round_to=cfg.round_to, pruning_ratio_dict=part_ratios(model, cfg.layer_ratios) or None)
    importance = IMPORTANCES[cfg.importance]()
    if sparsity_reg is None:
        return tp.pruner.BasePruner(model, example, importance, **kwargs)
    return tp.pruner.BNScalePruner(model, example, importance, reg=sparsity_reg, **kwargs)


def prune_channels(model: Classifier, example: torch.Tensor, cfg: PruneConfig, ratio: float,
                   loss_fn: Optional[Callable[[nn.Module], torch.Tensor]] = None) -> Classifier:
    """Remove `ratio` of the channels in place, in `cfg.iterative_steps` steps (Torch-Pruning).

    `ratio` is Torch-Pruning's pruning_ratio: the fraction of channels removed from each layer
    (uniform) or from all layers together (global). Taylor importance needs gradients: before
    every step `loss_fn(model)` is backpropagated through the current (partly pruned) model.
    """
    pruner = build_pruner(model, example, cfg, ratio)
    for _ in range(cfg.iterative_steps):
        if cfg.importance == "taylor":
            model.zero_grad(set_to_none=True)
            loss_fn(model).backward()
        pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def prune_to_target(model: Classifier, image_size: int, cfg: PruneConfig,
                    loss_fn: Optional[Callable[[nn.Module], torch.Tensor]] = None, log=log_line
                    ) -> Tuple[Classifier, float, int]:
    """(pruned copy, pruning ratio, its backbone MACs): the largest MACs <= target found.

    Searches Torch-Pruning's pruning_ratio by regula falsi on sqrt(MACs) (a conv's MACs fall
    with the square of the kept channel fraction, so sqrt(MACs) is nearly linear in the ratio),
    starting from the uniform guess 1 - sqrt(target). Each trial prunes a fresh copy.
    """
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    base = count_macs(model.backbone, image_size)
    target = cfg.target_macs_ratio
    gap = lambda kept: math.sqrt(kept) - math.sqrt(target)  # noqa: E731  (> 0: too many MACs left)
    lo, gap_lo, hi, gap_hi = 0.0, gap(1.0), None, None
    ratio, best = 1.0 - math.sqrt(target), None
    for trial in range(cfg.search_trials):
        pruned = prune_channels(copy.deepcopy(model), example, cfg, ratio, loss_fn)
        macs = count_macs(pruned.backbone, image_size)
        kept = macs / base
        log(f"prune: trial {trial + 1}: pruning ratio {ratio:.4f} -> MACs {kept:.4f} of the student")
        if kept <= target:
            if best is None or macs > best[2]:
                best = (pruned, ratio, macs)
            hi, gap_hi = ratio, gap(kept)
            if kept >= target - cfg.macs_tolerance:
                break
        else:
            lo, gap_lo = ratio, gap(kept)
        if hi is None:  # nothing under the target yet: extrapolate the line through (0, 1), 5% past it
            if lo >= cfg.max_layer_ratio - 1e-6:
                break
            guess = 1.05 * lo * gap(1.0) / (gap(1.0) - gap_lo) if gap_lo < gap(1.0) else 2 * lo
            ratio = min(cfg.max_layer_ratio, max(guess, lo + 0.01))
        else:
            span = hi - lo
            if span < 1e-3:  # a step of the rounded channel counts lies between lo and hi
                break
            # Interpolate, but stay inside the bracket so a flat stretch cannot stall the search.
            ratio = min(max(lo + span * gap_lo / (gap_lo - gap_hi), lo + 0.1 * span), hi - 0.1 * span)
    if best is None:
        raise UserError(f"prune.target_macs_ratio={target} is out of reach with prune.max_layer_ratio="
                        f"{cfg.max_layer_ratio}: raise max_layer_ratio or the target")
    return best


def model_metrics(backbone: nn.Module, image_size: int, latency_cfg: LatencyConfig) -> dict:
    """params, MACs and latency: the cost side of the before/after table."""
    return {"params": count_params(backbone), "macs": count_macs(backbone, image_size),
            **latency_metrics(backbone, image_size, latency_cfg)}


# ----------------------------------------------------------------------------- BN scales


def bn_scales(backbone: nn.Module) -> torch.Tensor:
    """|gamma| of every BatchNorm channel of the backbone, one flat float32 CPU tensor: what
    BNScalePruner.regularize penalises and BNScaleImportance ranks."""
    return torch.cat([m.weight.detach().abs().flatten().float().cpu() for m in backbone.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine])


def bn_scale_report(before: torch.Tensor, after: torch.Tensor, bins: int = 40) -> dict:
    """L1 norms and histograms of |gamma| before and after sparsity training, as plain numbers
    for metrics.json: one set of bins for both (0 to the largest scale of either)."""
    top = float(max(before.max(), after.max())) or 1.0
    edges = np.linspace(0.0, top, bins + 1)
    return {"bn_scale_l1_before": float(before.sum()), "bn_scale_l1_after": float(after.sum()),
            "bn_scale_hist_edges": edges.tolist(),
            "bn_scale_hist_before": np.histogram(before.numpy(), edges)[0].tolist(),
            "bn_scale_hist_after": np.histogram(after.numpy(), edges)[0].tolist()}


def plot_bn_scales(report: dict, path: Path) -> Path:
    """bn_scales.png: the two histograms of bn_scale_report, overlaid (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = report["bn_scale_hist_edges"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for when, color in (("before", "tab:blue"), ("after", "tab:red")):
        ax.stairs(report[f"bn_scale_hist_{when}"], edges, fill=True, alpha=0.45, color=color,
                  label=f"{when} sparsity training (L1 {report[f'bn_scale_l1_{when}']:.1f})")
    ax.set_xlabel("|BN scale| (gamma)")
    ax.set_ylabel("channels")
    ax.set_title(f"BatchNorm scales, sparsity.reg={report['sparsity_reg']:g}, "
                 f"{report['sparsity_epochs']} epoch(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- training


def load_classifier(state: dict, cfg: Config, device: torch.device) -> Classifier:
    """The model of a checkpoint: the backbone rebuilt from its spec, its weights, its head."""
    backbone = backbone_from_spec(state["spec"])
    backbone.load_state_dict(state["backbone"])
    w = state["head"]["weight"]
    head = nn.Linear(w.shape[1], w.shape[0])
    head.load_state_dict(state["head"])
    return engine.prepare_module(Classifier(backbone, head), cfg.engine, device)


def student_state(r: Run, student: ckpt.Artifact, cfg: Config) -> dict:
    """The step-0 checkpoint's content: the unpruned student with a probe head (fitted on its
    frozen features if it has none), its costs, its BN scales."""
    splits, size = r.splits, r.splits.image_size
    before = {**model_metrics(student.backbone, size, cfg.latency), "file_mb": student.path.stat().st_size / 2**20}
    head = student.head
    if head is None:  # a new linear head on labels: a probe fitted on the frozen features
        features = extract_features(student.backbone.to(r.device), splits.train.images, splits.mean, splits.std,
                                    size, r.device, cfg.eval.feature_batch_size, r.bf16)
        head = train_linear_probe(features, splits.train.labels.cpu(), splits.num_classes, cfg.eval.probe_epochs,
                                  cfg.eval.probe_lr, cfg.eval.probe_weight_decay, cfg.eval.probe_batch_size,
                                  cfg.seed, r.device)
    report = {f"{k}_before": v for k, v in before.items() if k != "latency_cpu_threads"}
    report["embedding_dim_before"] = head.in_features
    return {"pruned": False, "spec": backbone_spec(student.backbone, student.spec["arch"], student.spec["cifar_stem"]),
            "backbone": student.backbone.state_dict(), "head": head.state_dict(), "report": report,
            "bn_scales_before": bn_scales(student.backbone)}


def train_range(r: Run, cfg: Config, phase: str, model: Classifier, teacher, start: int, end: int,
                regularize: Optional[Callable[[nn.Module], None]] = None) -> None:
    """Train `model` over the global steps [start, end) (sparsity, or recovery of the pruned
    student) with the recovery objective, resuming inside the range when checkpoint.pt is there;
    `regularize(model)` runs after every backward (network slimming's BN-scale penalty)."""
    if end <= start:  # train.epochs=0: pruned, not recovered
        return
    device, splits, size = r.device, r.splits, r.splits.image_size
    # Whatever ran before must not change what follows: a job restarted from the range's first
    # checkpoint initialises the distillation adapters exactly as an unbroken one.
    torch.manual_seed(cfg.seed * 1_000_003 + {"recovery": 1, "sparsity": 2}[phase])
    distiller = None
    if cfg.recovery == "distill":
        distiller = Distiller(teacher, model.backbone, cfg.loss, splits.num_classes, size).to(device)
        if distiller.student_head is not None:  # kd/ce start from the model's probe head, not at random
            distiller.student_head.load_state_dict(model.head.state_dict())
    trainable = distiller if distiller is not None else model
    step_module = trainable
    if r.dist.world_size > 1:
        step_module = nn.parallel.DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    step_fwd = engine.maybe_compile(step_module, cfg.engine, device)
    params = [*model.parameters()] if distiller is None else [*model.backbone.parameters(),
                                                               *distiller.adapter_parameters()]
    optimizer = build_optimizer(cfg.train, params, r.base_lr())
    objects = {"backbone": model.backbone, "head": model.head, "optimizer": optimizer,
               **({"distiller": distiller} if distiller is not None else {})}
    if r.step > start:
        r.resume(**objects)
    else:  # the range's first step: the model is the checkpoint's, the rest is new
        r.register(**objects)

    def penalised_l1(done_epochs: int) -> dict:  # what sparsity training drives down, every epoch
        return {"bn_scale_l1": float(bn_scales(model.backbone).sum())} if phase == "sparsity" else {}

    freeze_steps = int(cfg.adapter_warmup_epochs * r.steps_per_epoch)
    trainable.train()
    for s in r.steps(optimizer, start=start, end=None if phase == "recovery" else end, phase=phase,
                     monitor=r.knn_monitor(model.backbone), per_epoch=penalised_l1,
                     log_prefix="train" if phase == "recovery" else phase):
        frozen = s.index - start < freeze_steps
        model.backbone.train(not frozen)
        view = one_view(s.images, size, cfg.aug, s.generator, splits.mean, splits.std)  # teacher and student alike
        if device.type == "cuda" and cfg.engine.channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        with engine.autocast(cfg.engine, device):
            if distiller is not None:
                loss, parts = step_fwd(view, s.labels)
            else:
                loss = F.cross_entropy(step_fwd(view), s.labels)
                parts = {"ce": loss.detach()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if frozen:  # no grad, no weight decay, no momentum: the backbone does not move
            for p in model.backbone.parameters():
                p.grad = None
        if regularize is not None:  # + reg * sign(gamma) on each BN scale's gradient (none when frozen)
            regularize(model)
        optimizer.step()
        r.record(loss, parts)
    if distiller is not None:
        if distiller.student_head is not None:
            # kd/ce trained the distiller's copy of the head; the model's follows it (pruning reshapes
            # it, Taylor importance and the recovery's kd/ce start from it).
            model.head.load_state_dict(distiller.student_head.state_dict())
        distiller.remove_hooks()  # the student outlives its Distiller (pruned next)


def prune_student(r: Run, cfg: Config, model: Classifier, report: dict) -> Tuple[Classifier, dict]:
    """Prune to the MACs target (a pure function of the weights, the config and the data),
    re-estimate BatchNorm, judge the result before recovery. Returns (pruned model, report)."""
    splits, size = r.splits, r.splits.image_size

    def taylor_loss(m: nn.Module) -> torch.Tensor:
        """Cross-entropy of the student's head on the first labelled batches (no augmentation)."""
        loss, it = 0.0, r.batches(epoch=0)
        for _ in range(cfg.prune.taylor_batches):
            images, labels = next(it, (None, None))
            if images is None:
                break
            loss = loss + F.cross_entropy(m(eval_view(images, size, splits.mean, splits.std)), labels)
        return loss / cfg.prune.taylor_batches

    start = time.perf_counter()
    model, ratio, macs = prune_to_target(model.eval(), size, cfg.prune, taylor_loss)
    pruned = model.backbone
    if cfg.prune.bn_recalibration_batches:  # adaptive BN (EagleEye): statistics of the pruned network
        update_bn((eval_view(images, size, splits.mean, splits.std) for images, _ in
                   itertools.islice(r.batches(epoch=0), cfg.prune.bn_recalibration_batches)), pruned)
        pruned.eval()
    # Judged before recovery too, so metrics.json shows what pruning cost and recovery won back.
    after, _ = evaluate_backbone(pruned, splits, cfg.eval, r.device, r.bf16, cfg.seed, cfg.eval.probe)
    report = {**report, "target_macs_ratio": cfg.prune.target_macs_ratio, "pruning_ratio": ratio,
              "macs_ratio": macs / report["macs_before"], "params_ratio": count_params(pruned) / report["params_before"],
              "prune_seconds": time.perf_counter() - start,
              **{f"{k}_pruned": v for k, v in after.items()},  # knn_top1_pruned, probe_top1_pruned, ...
              "embedding_dim": model.head.in_features}
    log_line(f"prune: MACs {report['macs_before'] / 1e6:.1f}M -> {macs / 1e6:.1f}M ({report['macs_ratio']:.3f}, "
             f"target {cfg.prune.target_macs_ratio}), params {report['params_before'] / 1e6:.2f}M -> "
             f"{count_params(pruned) / 1e6:.2f}M, kNN top-1 right after pruning {after['knn_top1']:.4f}")
    return model, report


# ----------------------------------------------------------------------------- the stage


def run(cfg: Config) -> Path:
    check_config(cfg)
    r = Run(cfg, STAGE)
    if r.done:
        return r.dir
    student = None if r.state else ckpt.load_model(Path(cfg.student), "student")  # fails before any work
    teacher = load_teacher(cfg.teacher, cfg.teacher_head, need_head=cfg.recovery == "distill" and cfg.loss.kd > 0) \
        if cfg.teacher else None
    teacher_frozen = snapshot(teacher.backbone) if teacher is not None else None

    # ============ device, DDP, seed, data; one step counter: [0, S) sparsity, [S, S + R) recovery ============
    r.start(epochs=cfg.sparsity.epochs + cfg.train.epochs)
    device, splits, size = r.device, r.splits, r.splits.image_size
    sparsity_steps = cfg.sparsity.epochs * r.steps_per_epoch
    if student is not None and student.meta.get("data") not in (None, cfg.data.name):
        log_line(f"prune: note: {cfg.student} was trained on {student.meta.get('data')}, pruning on {cfg.data.name}")

    # ============ the student, once: its costs and a probe head; checkpoint.pt at step 0 ============
    if r.state is None:
        if r.dist.is_main:
            r.extra = student_state(r, student, cfg)
            r.save()
        del student
        r.reload()  # from here on the model always comes from checkpoint.pt

    # ============ sparsity: network slimming of the unpruned student (sparsity.epochs > 0) ============
    if not r.state.get("pruned", True):
        model = load_classifier(r.state, cfg, device)
        r.extra = {k: r.state[k] for k in ("pruned", "spec", "report", "bn_scales_before")}
        if sparsity_steps:
            if r.dist.is_main and cfg.prune.importance != "bn_scale" and r.step == 0:
                log_line(f"prune: note: sparsity training drives BN scales to 0; prune.importance="
                         f"{cfg.prune.importance} ranks channels by something else (network slimming is bn_scale)")
            example = torch.zeros(1, 3, size, size, device=device)
            slimmer = build_pruner(model, example, cfg.prune, sparsity_reg=cfg.sparsity.reg)
            train_range(r, cfg, "sparsity", model, teacher, 0, sparsity_steps, slimmer.regularize)
            if r.paused(sparsity_steps):  # train.max_steps <= sparsity_steps: stopped before pruning
                return r.dir

        # ============ prune (once; afterwards the model always comes from checkpoint.pt) ============
        if r.dist.is_main:
            report = {**r.state["report"], "sparsity_epochs": cfg.sparsity.epochs, "sparsity_reg": cfg.sparsity.reg}
            if sparsity_steps:  # "after" = after sparsity training, before pruning
                report.update(bn_scale_report(r.state["bn_scales_before"], bn_scales(model.backbone)))
            model, report = prune_student(r, cfg, model, report)
            spec = backbone_spec(model.backbone, r.state["spec"]["arch"], r.state["spec"]["cifar_stem"])
            r.extra, r.objects = {"pruned": True, "spec": spec, "report": report}, {}
            r.register(backbone=model.backbone, head=model.head)
            r.save()
        del model
        r.reload()

    # ============ recovery: fine-tune the pruned student ============
    model = load_classifier(r.state, cfg, device)
    r.extra = {k: r.state[k] for k in ("pruned", "spec", "report")}
    train_range(r, cfg, "recovery", model, teacher, sparsity_steps, r.total_steps)
    if r.paused():
        return r.dir

    # ============ final artifact: weights, probe, metrics ============
    if not r.dist.is_main:
        return r.finish()
    if teacher is not None:
        assert_unchanged(teacher.backbone, teacher_frozen, "the teacher")
    spec, backbone = r.state["spec"], model.backbone
    metrics, head = evaluate_backbone(backbone, splits, cfg.eval, device, r.bf16, cfg.seed, cfg.eval.probe)
    metrics.update(r.state["report"])
    metrics.update(model_metrics(backbone, size, cfg.latency))
    before = ckpt.read_metrics(Path(cfg.student))
    metrics.update({f"{key}_before": before.get(key) for key in ("knn_top1", "probe_top1", "probe_top5")})
    if teacher is not None:  # how much the pruned student still agrees with its teacher
        metrics["cka_teacher"] = features_cka(backbone, teacher.backbone, splits, device, cfg.eval.feature_batch_size,
                                              r.bf16)[0]
    metrics.update({"arch": spec["arch"], "recovery": cfg.recovery, "importance": cfg.prune.importance,
                    "global_pruning": cfg.prune.global_pruning, "recovery_epochs": cfg.train.epochs})
    if "bn_scale_hist_edges" in metrics:
        plot_bn_scales(metrics, r.dir / "bn_scales.png")
    return r.finish(backbone, spec, head, metrics, parents=(cfg.student, cfg.teacher),
                    summary=f"  MACs {metrics['macs_before'] / 1e6:.1f}M -> {metrics['macs'] / 1e6:.1f}M"
                    + (f"  BN-scale L1 {metrics['bn_scale_l1_before']:.1f} -> {metrics['bn_scale_l1_after']:.1f}"
                       " (sparsity)" if "bn_scale_l1_after" in metrics else ""))
