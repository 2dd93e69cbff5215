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
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from core import checkpoint as ckpt
from core import data as datalib
from core import engine
from core.augment import AugmentConfig, augment_view, eval_view, normalize
from core.config import StageConfig, TrainConfig, choice, to_dict, to_yaml
from core.distill import Distiller, DistillLossConfig, load_teacher
from core.errors import UserError
from core.evaluate import (assert_unchanged, evaluate_backbone, extract_features, linear_cka, snapshot,
                           train_linear_probe)
from core.latency import LatencyConfig, latency_metrics
from core.models import Classifier, backbone_from_spec, backbone_spec, count_macs, count_params
from core.track import Progress, Tracker, log_line
from core.optim import LARS, lr_schedule  # lightly's LARS update, foreach (no per-parameter loop or sync)

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
    # Kept channel counts are multiples of this. 32: oneDNN's int8 convolutions (what the quant
    # stage exports) fall off their fast path at batch 1 otherwise. Measured on the 2-core CPU
    # (AVX-512 VNNI): the quickstart's pruned ResNet-18 as int8 ran 45 ms at batch 1 with widths
    # like 40 and 104 (round_to=8), 2.7 ms at round_to=16; the CIFAR ResNet-18 pruned to half its
    # MACs by configs/pipelines/cifar10.yaml's rehearsal ran 21-27 ms with widths 48, 144, 240
    # (round_to=16) and 2.2-3.7 ms at round_to=32 (bench/prune_widths_cpu.sh; README, "CIFAR-10
    # end to end").
    round_to: int = 32
    max_layer_ratio: float = 0.9  # no layer loses more than this fraction of its channels
    keep_embedding: bool = False  # True: the pooled embedding keeps its full width
    # Fixed fractions of channels removed from named parts of the backbone (`{layer4: 0.7}`),
    # each ranked on its own (Torch-Pruning's pruning_ratio_dict); the rest is pruned to the
    # MACs target. Why: the MACs target alone leaves the parameters where they were measured
    # cheapest, and a ResNet-18's layer4 holds 75% of its parameters but ~25% of its MACs at
    # 32 px. configs/pipelines/cifar10.yaml's rehearsal (README) pruned to 48% of the MACs and
    # kept 67% of the parameters: an int8 file 9.6x smaller than the teacher's, not 20x.
    layer_ratios: Dict[str, float] = field(default_factory=dict)
    # The ratio search stops as soon as target - tol <= achieved <= target, or after
    # `search_trials` prunings; the result is always <= target (the closest one found).
    macs_tolerance: float = 0.02
    search_trials: int = 10
    taylor_batches: int = 4  # labelled batches whose loss gradients rank channels for taylor
    # Removing channels changes what every later BatchNorm sees, so the student's running
    # statistics go stale (measured here: a pruned digits ResNet-18 gave CE 12.5 with batch
    # statistics against 0.03 with its stored ones). Re-estimate them on this many training
    # batches after pruning (adaptive BN, EagleEye, Li et al. ECCV 2020); 0 keeps them.
    bn_recalibration_batches: int = 20


def default_train() -> TrainConfig:
    # Recovery is fine-tuning from the pruned weights: short, SGD, a gentle start while the
    # new distillation projector (random at step 0) finds its feet.
    return TrainConfig(epochs=10, batch_size=256, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                       warmup_epochs=1.0)


def default_aug() -> AugmentConfig:
    # Fine-tuning views: crop + flip; BYOL's colour, blur and solarize are off (one view a step).
    return AugmentConfig(crop_scale_min=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p1=0.0, blur_p2=0.0,
                         solarize_p1=0.0, solarize_p2=0.0)


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
    student: str = ""  # artifact dir of the backbone to prune (runs/distill/N, or any with model.pt)
    teacher: str = ""  # artifact dir of the teacher (runs/byol/N); needed for recovery=distill
    teacher_head: str = ""  # probe dir (runs/probe/byol-N) for kd; "" = the head in the teacher's model.pt
    recovery: str = choice("distill", "distill", "ce")
    # For the first epochs only the new parts train (distillation projector / adapters / head)
    # and the pruned backbone stays frozen, in eval mode: a random projector's gradients would
    # otherwise distort good features before it has learned anything (LP-FT, Kumar et al. 2022).
    adapter_warmup_epochs: float = 1.0
    prune: PruneConfig = field(default_factory=PruneConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)  # off by default
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)  # default: embed (cosine), label-free
    train: TrainConfig = field(default_factory=default_train)
    aug: AugmentConfig = field(default_factory=default_aug)
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


@torch.no_grad()
def recalibrate_bn(backbone: nn.Module, views) -> int:
    """BatchNorm running statistics := their plain average over `views` (an iterable of input
    batches), with nothing else changed; returns the number of batches seen."""
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an EMA
    was_training, seen = backbone.training, 0
    backbone.train()
    for x in views:
        backbone(x)
        seen += 1
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    backbone.train(was_training)
    return seen


def model_metrics(backbone: nn.Module, image_size: int, latency_cfg: LatencyConfig, file: Path) -> dict:
    """params, MACs, file size and latency: the cost side of the before/after table."""
    return {"params": count_params(backbone), "macs": count_macs(backbone, image_size),
            "file_mb": file.stat().st_size / 2**20, **latency_metrics(backbone, image_size, latency_cfg)}


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


def build_optimizer(cfg: TrainConfig, params: List[nn.Parameter], lr: float):
    # No weight decay on BatchNorm and bias parameters (the vectors), as in every stage here.
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def head_from_state(state: dict) -> nn.Linear:
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head


# ----------------------------------------------------------------------------- the stage


def run(cfg: Config) -> Path:
    check_config(cfg)
    run_dir = ckpt.artifact_dir(cfg.run_root, STAGE, cfg.name)
    if (run_dir / "model.pt").is_file() and (run_dir / "metrics.json").is_file():
        log_line(f"prune: {run_dir} is already finished; nothing to do")
        return run_dir
    student_dir = Path(cfg.student)
    started = (run_dir / "checkpoint.pt").is_file()  # then the student is not needed again
    student = None if started else ckpt.load_model(student_dir, "student")  # fails before any work
    teacher = load_teacher(cfg.teacher, cfg.teacher_head, need_head=cfg.recovery == "distill" and cfg.loss.kd > 0) \
        if cfg.teacher else None
    teacher_frozen = snapshot(teacher.backbone) if teacher is not None else None

    # ============ device, seeds, distributed ... ============
    device = engine.resolve_device(cfg.engine)
    dist = engine.init_distributed(device)
    engine.seed_everything(cfg.seed + dist.rank, cfg.engine.deterministic)
    bf16 = engine.use_bf16(cfg.engine, device)

    # ============ data: uint8 images resident on the device ============
    splits = datalib.load_splits(cfg.data)
    in_memory = isinstance(splits.train, datalib.ImageSet)
    train_set = splits.train.to(device) if in_memory else splits.train
    size, batch_size = splits.image_size, cfg.train.batch_size
    steps_per_epoch = datalib.steps_per_epoch(len(train_set), batch_size, dist.world_size)
    # One step counter for both phases: [0, sparsity_steps) sparsity, then recovery.
    sparsity_steps = cfg.sparsity.epochs * steps_per_epoch
    total_steps = sparsity_steps + cfg.train.epochs * steps_per_epoch
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else total_steps
    if student is not None and student.meta.get("data") not in (None, cfg.data.name):
        log_line(f"prune: note: {student_dir} was trained on {student.meta.get('data')}, pruning on {cfg.data.name}")

    def batches(epoch: int, first: int = 0):
        order = datalib.epoch_permutation(len(train_set), cfg.seed, epoch, dist.rank, dist.world_size)
        if in_memory:
            return datalib.in_memory_batches(train_set, order, batch_size, first)
        return datalib.jpeg_batches(train_set, order, batch_size, size, device, cfg.data.num_workers, first)

    def load_classifier(state: dict) -> Classifier:
        """The model of a checkpoint: the backbone rebuilt from its spec, its weights, its head."""
        backbone = backbone_from_spec(state["spec"])
        backbone.load_state_dict(state["backbone"])
        return engine.prepare_module(Classifier(backbone, head_from_state(state["head"])), cfg.engine, device)

    # ============ the student, once: its costs and a probe head; checkpoint.pt at step 0 ============
    if not started and dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        before = model_metrics(student.backbone, size, cfg.latency, student.path)
        head = student.head
        if head is None:  # a new linear head on labels: a probe fitted on the frozen features
            features = extract_features(student.backbone.to(device), splits.train.images, splits.mean, splits.std,
                                        size, device, cfg.eval.feature_batch_size, bf16)
            head = train_linear_probe(features, splits.train.labels.cpu(), splits.num_classes, cfg.eval.probe_epochs,
                                      cfg.eval.probe_lr, cfg.eval.probe_weight_decay, cfg.eval.probe_batch_size,
                                      cfg.seed, device)
        report = {f"{k}_before": v for k, v in before.items() if k != "latency_cpu_threads"}
        report["embedding_dim_before"] = head.in_features
        ckpt.atomic_save({
            "pruned": False, "step": 0,
            "spec": backbone_spec(student.backbone, student.spec["arch"], student.spec["cifar_stem"]),
            "backbone": student.backbone.state_dict(), "head": head.state_dict(), "report": report,
            "bn_scales_before": bn_scales(student.backbone), "wandb_id": None, "history": [],
        }, run_dir / "checkpoint.pt")
        del student
    engine.barrier(dist)
    state = ckpt.safe_load(run_dir / "checkpoint.pt")
    tracker = Tracker(cfg.track, run_dir, f"{STAGE}/{cfg.name}", to_dict(cfg), state["wandb_id"], enabled=dist.is_main)

    def train_phase(phase: str, model: Classifier, state: dict, start: int, end: int,
                    regularize: Optional[Callable[[nn.Module], None]] = None) -> Tuple[int, float, List[float]]:
        """Train `model` over the global steps [start, end) with the recovery objective, from the
        checkpoint `state` (resuming inside the phase if state["step"] > start), calling
        `regularize(model)` after every backward; checkpoint.pt follows it. Returns the step
        reached (< end when train.max_steps stopped it), the last loss and the whole epochs' seconds.
        """
        # ============ objective: distillation from the teacher, or cross-entropy ============
        # Whatever ran before must not change what follows: a job restarted from the phase's
        # first checkpoint initialises the distillation adapters exactly as an unbroken one.
        salt = {"recovery": 1, "sparsity": 2}[phase]
        torch.manual_seed(cfg.seed * 1_000_003 + salt + dist.rank)
        distiller = None
        if cfg.recovery == "distill" and end > start:
            distiller = Distiller(teacher, model.backbone, cfg.loss, splits.num_classes, size).to(device)
            if distiller.student_head is not None:  # kd/ce start from the model's probe head, not at random
                distiller.student_head.load_state_dict(model.head.state_dict())
            trainable: nn.Module = distiller
        else:
            trainable = model
        step_module = trainable
        if dist.world_size > 1:
            step_module = nn.parallel.DistributedDataParallel(
                trainable, device_ids=[device.index] if device.type == "cuda" else None)
        step_fwd = engine.maybe_compile(step_module, cfg.engine, device)

        # ============ optimizer, schedule ============
        base_lr = cfg.train.lr * batch_size * dist.world_size / 256  # linear scaling rule
        params = list(model.parameters()) if distiller is None else \
            list(model.backbone.parameters()) + list(distiller.adapter_parameters())
        optimizer = build_optimizer(cfg.train, params, base_lr)
        lrs = lr_schedule(cfg.train, base_lr, end - start, steps_per_epoch)
        aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + (salt - 1) * 104_729 + dist.rank)

        # ============ resume ============
        step, history = state["step"], state["history"]
        if step > start:
            optimizer.load_state_dict(state["optimizer"])
            aug_gen.set_state(state["aug_rng"].cpu() if device.type == "cpu" else state["aug_rng"])
            torch.set_rng_state(state["torch_rng"])
            if distiller is not None:
                distiller.load_state_dict(state["distiller"])
            if dist.is_main:
                log_line(f"prune: resumed {run_dir} at step {step}/{total_steps} ({phase})")
        # What the checkpoints of this phase carry over unchanged.
        kept = {k: state[k] for k in ("pruned", "spec", "report", "bn_scales_before") if k in state}

        def save_checkpoint():
            if not dist.is_main:
                return
            ckpt.atomic_save({
                **kept, "step": step, "backbone": model.backbone.state_dict(), "head": model.head.state_dict(),
                "optimizer": optimizer.state_dict(), "aug_rng": aug_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "wandb_id": tracker.id, "history": history,
                **({"distiller": distiller.state_dict()} if distiller is not None else {}),
            }, run_dir / "checkpoint.pt")

        # ============ training loop ============
        last = min(end, stop_at)
        progress = Progress(last, step, desc=f"prune {cfg.name} {phase}",
                            enabled=cfg.engine.progress and dist.is_main)
        trainable.train()
        freeze_steps = int(cfg.adapter_warmup_epochs * steps_per_epoch)
        prefix = "train" if phase == "recovery" else phase  # W&B names: train/loss, sparsity/loss, ...
        epoch_seconds, loss_value = [], float("nan")
        with engine.StopGuard() as guard:
            while step < last:
                epoch, first = divmod(step, steps_per_epoch)
                epoch_start = time.perf_counter()
                for images, labels in batches(epoch, first):
                    frozen = step - start < freeze_steps
                    model.backbone.train(not frozen)
                    # a float: a numpy scalar in the optimizer state would not load with weights_only
                    lr = float(lrs[step - start])
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    # One augmented view; teacher and student see the same one.
                    view = normalize(augment_view(images, size, cfg.aug, cfg.aug.blur_p1, cfg.aug.solarize_p1, aug_gen),
                                     splits.mean, splits.std)
                    if device.type == "cuda" and cfg.engine.channels_last:
                        view = view.contiguous(memory_format=torch.channels_last)
                    with engine.autocast(cfg.engine, device):
                        if distiller is not None:
                            loss, parts = step_fwd(view, labels)
                        else:
                            loss = F.cross_entropy(step_fwd(view), labels)
                            parts = {"ce": loss.detach()}
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if frozen:  # no grad, no weight decay, no momentum: the backbone does not move
                        for p in model.backbone.parameters():
                            p.grad = None
                    if regularize is not None:  # + reg * sign(gamma) on each BN scale's gradient (none when frozen)
                        regularize(model)
                    optimizer.step()
                    step += 1

                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise SystemExit(f"prune: loss is {loss_value} at step {step} ({phase}); stopping "
                                         f"(last good checkpoint: {run_dir / 'checkpoint.pt'})")
                    progress.update(len(images) * dist.world_size, loss=loss_value, lr=lr, epoch=epoch)
                    if step % 10 == 0 or step == last:
                        tracker.log({f"{prefix}/loss": loss_value, f"{prefix}/lr": lr,
                                     **{f"{prefix}/{k}": v.item() for k, v in parts.items()}}, step=step)
                    if guard.stop_requested:
                        save_checkpoint()
                        tracker.finish()
                        guard.stop()
                    if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0:
                        save_checkpoint()
                    if step == last:
                        break

                if step % steps_per_epoch == 0:  # a whole epoch ended here
                    if first == 0:  # a resumed partial epoch would understate the time
                        epoch_seconds.append(time.perf_counter() - epoch_start)
                    done_epochs, every = (step - start) // steps_per_epoch, cfg.eval.knn_every_epochs
                    values = {}
                    if phase == "sparsity":  # the penalised quantity, every epoch
                        values["bn_scale_l1"] = float(bn_scales(model.backbone).sum())
                    if dist.is_main and every and (done_epochs % every == 0 or step == end):
                        knn, _ = evaluate_backbone(model.backbone, splits, cfg.eval, device, bf16, probe=False)
                        values["knn_top1"] = knn["knn_top1"]
                    if dist.is_main and values:
                        history.append({"phase": phase, "epoch": done_epochs, "step": step, "loss": loss_value,
                                        **values})
                        tracker.log({**{f"val/{k}": v for k, v in values.items()}, "epoch": step // steps_per_epoch},
                                    step=step)
                        progress.write(f"{phase} epoch {done_epochs}: loss {loss_value:.4f}  "
                                       + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
                save_checkpoint()
        progress.close()
        if distiller is not None and distiller.student_head is not None:
            # kd/ce trained the distiller's copy of the head; the model's follows it (pruning reshapes
            # it, Taylor importance and the recovery's kd/ce start from it).
            model.head.load_state_dict(distiller.student_head.state_dict())
        return step, loss_value, epoch_seconds

    def stopped(step: int) -> Path:
        """train.max_steps ended the job early on purpose: resumable, not final."""
        tracker.finish()
        log_line(f"prune: stopped at step {step}/{total_steps} (train.max_steps); rerun to continue")
        return run_dir

    # ============ sparsity: network slimming of the unpruned student (sparsity.epochs > 0) ============
    if not state.get("pruned", True):  # (checkpoints written before the sparsity phase existed hold pruned weights)
        model = load_classifier(state)
        example = torch.zeros(1, 3, size, size, device=device)
        if sparsity_steps:
            if dist.is_main and cfg.prune.importance != "bn_scale" and state["step"] == 0:
                log_line(f"prune: note: sparsity training drives BN scales to 0; prune.importance="
                         f"{cfg.prune.importance} ranks channels by something else (network slimming is bn_scale)")
            slimmer = build_pruner(model, example, cfg.prune, sparsity_reg=cfg.sparsity.reg)
            step, _, _ = train_phase("sparsity", model, state, 0, sparsity_steps, slimmer.regularize)
            if step == stop_at < total_steps:  # train.max_steps <= sparsity_steps: stop before pruning
                return stopped(step)

        # ============ prune (once; afterwards the model always comes from checkpoint.pt) ============
        if dist.is_main:
            report = state["report"]
            report.update({"sparsity_epochs": cfg.sparsity.epochs, "sparsity_reg": cfg.sparsity.reg})
            if sparsity_steps:  # "after" = after sparsity training, before pruning
                report.update(bn_scale_report(state["bn_scales_before"], bn_scales(model.backbone)))

            def taylor_loss(m: nn.Module) -> torch.Tensor:
                """Cross-entropy of the student's head on the first labelled batches (no augmentation)."""
                loss, it = 0.0, batches(epoch=0)
                for _ in range(cfg.prune.taylor_batches):
                    images, labels = next(it, (None, None))
                    if images is None:
                        break
                    loss = loss + F.cross_entropy(m(eval_view(images, size, splits.mean, splits.std)), labels)
                return loss / cfg.prune.taylor_batches

            start = time.perf_counter()
            model, ratio, macs = prune_to_target(model.eval(), size, cfg.prune, taylor_loss)
            pruned = model.backbone
            if cfg.prune.bn_recalibration_batches:
                recalibrate_bn(pruned, (eval_view(images, size, splits.mean, splits.std) for images, _ in
                                        itertools.islice(batches(epoch=0), cfg.prune.bn_recalibration_batches)))
            # Judged before recovery too, so metrics.json shows what pruning cost and recovery won back.
            after_prune, _ = evaluate_backbone(pruned, splits, cfg.eval, device, bf16, cfg.seed, cfg.eval.probe)
            report.update({
                "target_macs_ratio": cfg.prune.target_macs_ratio, "pruning_ratio": ratio,
                "macs_ratio": macs / report["macs_before"],
                "params_ratio": count_params(pruned) / report["params_before"],
                "prune_seconds": time.perf_counter() - start,
                **{f"{k}_pruned": v for k, v in after_prune.items()},  # knn_top1_pruned, probe_top1_pruned, ...
                "embedding_dim": model.head.in_features,
            })
            log_line(f"prune: MACs {report['macs_before'] / 1e6:.1f}M -> {macs / 1e6:.1f}M "
                     f"({report['macs_ratio']:.3f}, target {cfg.prune.target_macs_ratio}), "
                     f"params {report['params_before'] / 1e6:.2f}M -> "
                     f"{count_params(pruned) / 1e6:.2f}M, kNN top-1 right after pruning {after_prune['knn_top1']:.4f}")
            ckpt.atomic_save({
                "pruned": True, "step": sparsity_steps, "spec": backbone_spec(pruned, state["spec"]["arch"],
                                                                               state["spec"]["cifar_stem"]),
                "backbone": pruned.state_dict(), "head": model.head.state_dict(), "report": report,
                "wandb_id": tracker.id, "history": state["history"],
            }, run_dir / "checkpoint.pt")
        del model
        engine.barrier(dist)
        state = ckpt.safe_load(run_dir / "checkpoint.pt")

    # ============ recovery: fine-tune the pruned student ============
    model = load_classifier(state)
    step, loss_value, epoch_seconds = train_phase("recovery", model, state, sparsity_steps, total_steps)
    if step < total_steps:
        return stopped(step)

    # ============ final artifact: weights, probe, metrics ============
    if dist.is_main:
        if teacher is not None:
            assert_unchanged(teacher.backbone, teacher_frozen, "the teacher")
        spec, report, history = state["spec"], state["report"], state["history"]
        backbone = model.backbone
        metrics, head = evaluate_backbone(backbone, splits, cfg.eval, device, bf16, cfg.seed, cfg.eval.probe)
        parents = [str(student_dir)] + ([cfg.teacher] if cfg.teacher else [])
        meta = {"stage": STAGE, "name": cfg.name, "data": cfg.data.name, "num_classes": splits.num_classes,
                "image_size": size, "mean": list(splits.mean), "std": list(splits.std), "parents": parents}
        ckpt.save_model(run_dir, backbone, spec, meta, head)
        metrics.update(report)
        metrics.update(model_metrics(backbone, size, cfg.latency, run_dir / "model.pt"))
        before_metrics = ckpt.read_metrics(student_dir)
        for key in ("knn_top1", "probe_top1", "probe_top5"):
            metrics[f"{key}_before"] = before_metrics.get(key)
        if teacher is not None:  # how much the pruned student still agrees with its teacher
            f_student = extract_features(backbone, splits.val.images, splits.mean, splits.std, size, device,
                                         cfg.eval.feature_batch_size, bf16)
            f_teacher = extract_features(teacher.backbone.to(device), splits.val.images, splits.mean, splits.std,
                                         size, device, cfg.eval.feature_batch_size, bf16)
            metrics["cka_teacher"] = linear_cka(f_student, f_teacher)
        recovery_steps = total_steps - sparsity_steps
        metrics.update({
            "stage": STAGE, "arch": spec["arch"], "recovery": cfg.recovery, "importance": cfg.prune.importance,
            "global_pruning": cfg.prune.global_pruning, "epochs": cfg.train.epochs, "steps": total_steps,
            "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
            "final_loss": loss_value if recovery_steps else None, "knn_history": history,
        })
        if "bn_scale_hist_edges" in metrics:
            plot_bn_scales(metrics, run_dir / "bn_scales.png")
        ckpt.write_json(run_dir / "metrics.json", metrics)
        tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        log_line(f"prune: done -> {run_dir}  MACs {metrics['macs_before'] / 1e6:.1f}M -> {metrics['macs'] / 1e6:.1f}M"
                 f"  kNN top-1 {metrics['knn_top1']:.4f}"
                 + (f"  probe top-1 {metrics['probe_top1']:.4f}" if "probe_top1" in metrics else "")
                 + (f"  BN-scale L1 {metrics['bn_scale_l1_before']:.1f} -> {metrics['bn_scale_l1_after']:.1f}"
                    " (sparsity)" if "bn_scale_l1_after" in metrics else ""))
    tracker.finish()
    engine.barrier(dist)
    return run_dir
