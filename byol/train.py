"""BYOL pretraining (Grill et al. 2020, arXiv:2006.07733), one loop, top to bottom.

Built from lightly's parts: BYOLProjectionHead, BYOLPredictionHead, NegativeCosineSimilarity,
cosine_schedule; LARS and the target's EMA update are core.optim's foreach versions of lightly's
LARS and update_momentum (the same update, no per-parameter loop or host sync), and its weight
decay groups are lightly's split (core.optim.build_optimizer). The data path and the
augmentation are the project's own (core.data, core.augment): uint8 images on the device, both
views built there per step with per-sample random parameters. The step scaffolding (resume,
schedule, logging, signals, checkpoints) is core.loop's, shared by every stage. `build_networks`,
`make_views` and `train_step` are this loop's own steps, also run by bench/byol_throughput.py.

    python -m byol configs/quickstart.yaml name=my-run train.epochs=20
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import torch
import torch.nn as nn
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad
from lightly.utils.scheduler import cosine_schedule

from core import engine
from core.augment import AugmentConfig, apply_view, two_view_augment
from core.config import ModelConfig, StageConfig, TrainConfig
from core.evaluate import evaluate_backbone
from core.loop import Run
from core.models import backbone_spec, build_backbone, count_macs, count_params, feature_dim
from core.optim import build_optimizer, ema_update_

STAGE = "byol"


@dataclass
class ByolConfig:
    proj_hidden_dim: int = 4096  # BYOL paper, Sec. 3.3
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    momentum_start: float = 0.99  # tau_base; rises to 1 on a cosine (paper, Sec. 3.3)
    momentum_end: float = 1.0
    # False makes the targets come from the online network with gradients: the collapsing
    # variant (SimSiam, Chen & He 2021, Fig. 2). It exists for the test that must fail on it.
    stop_gradient: bool = True


@dataclass
class Config(StageConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    byol: ByolConfig = field(default_factory=ByolConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)


class Online(nn.Module):
    """backbone -> projection -> prediction; one module so DDP can wrap it."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, prediction: nn.Module):
        super().__init__()
        self.backbone, self.projection, self.prediction = backbone, projection, prediction

    def forward(self, x):
        z = self.projection(self.backbone(x))
        return self.prediction(z), z


@dataclass
class Networks:
    online: Online  # trained and saved
    target: nn.Module  # EMA of online's backbone + projection, no gradients
    online_fwd: Callable  # online as the step calls it: DDP-wrapped and/or compiled
    target_fwd: Callable
    target_params: List[torch.Tensor]  # the EMA pairs, listed once
    online_params: List[torch.Tensor]
    # core.augment.apply_view, compiled where the networks are (engine.compile; CUDA by default):
    # it fuses the views' hundred-odd small elementwise kernels. `bench/gpu.sh augment` times both.
    augment: Callable = apply_view


def build_networks(cfg: Config, device: torch.device, dist: engine.Dist) -> Networks:
    """Online (backbone, projection, prediction) and target networks, on the device."""
    backbone = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    dim = feature_dim(backbone)
    online = Online(backbone,
                    BYOLProjectionHead(dim, cfg.byol.proj_hidden_dim, cfg.byol.proj_dim),
                    BYOLPredictionHead(cfg.byol.proj_dim, cfg.byol.pred_hidden_dim, cfg.byol.proj_dim))
    if dist.world_size > 1 and device.type == "cuda":
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)  # BN over the global batch
    online = engine.prepare_module(online, cfg.engine, device)
    source = nn.Sequential(online.backbone, online.projection)
    target = copy.deepcopy(source)
    deactivate_requires_grad(target)
    online_step = online
    if dist.world_size > 1:
        # broadcast_buffers=False: the step calls DDP twice (one view each) before one backward,
        # and rank 0's BN statistics copied in place at the second call broke that backward with
        # torch 2.11 ("modified by an inplace operation"). Training BN normalises with the batch's
        # own statistics, and rank 0 alone evaluates and saves, so nothing it computes changes.
        online_step = nn.parallel.DistributedDataParallel(
            online, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return Networks(online, target, engine.maybe_compile(online_step, cfg.engine, device),
                    engine.maybe_compile(target, cfg.engine, device),
                    list(target.parameters()), list(source.parameters()),
                    engine.maybe_compile(apply_view, cfg.engine, device))


def make_views(images: torch.Tensor, cfg: Config, generator: torch.Generator, mean, std,
               device: torch.device, apply: Callable = apply_view):
    """BYOL's two augmented views of a uint8 batch, built on its device (core.augment);
    `apply`: Networks.augment (apply_view, compiled on CUDA)."""
    view1, view2 = two_view_augment(images, cfg.data.image_size, cfg.aug, generator, mean, std, apply)
    if device.type == "cuda" and cfg.engine.channels_last:
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)
    return view1, view2


def train_step(nets: Networks, optimizer: torch.optim.Optimizer, criterion: nn.Module,
               view1: torch.Tensor, view2: torch.Tensor, momentum: float, cfg: Config,
               device: torch.device) -> torch.Tensor:
    """Loss, backward, optimizer step, EMA update of the target. Returns the loss on the
    device: reading it waits for the device, so the caller decides when."""
    with engine.autocast(cfg.engine, device):
        # Views go through the networks separately, so each BatchNorm sees one view.
        p1, z1_online = nets.online_fwd(view1)
        p2, z2_online = nets.online_fwd(view2)
        if cfg.byol.stop_gradient:
            with torch.no_grad():
                z1, z2 = nets.target_fwd(view1), nets.target_fwd(view2)
        else:
            z1, z2 = z1_online, z2_online
        # Symmetric loss: each view's prediction regresses the other view's target
        # (paper Eq. 2-3; -cos instead of 2-2cos, the same gradient up to a factor 2).
        loss = criterion(p1, z2.detach() if cfg.byol.stop_gradient else z2) + \
            criterion(p2, z1.detach() if cfg.byol.stop_gradient else z1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema_update_(nets.target_params, nets.online_params, momentum)
    return loss.detach()


def run(cfg: Config) -> Path:
    r = Run(cfg, STAGE)
    if r.done:
        return r.dir

    # ============ device, DDP, seed, data (uint8 images resident on the device) ============
    r.start(self_supervised=True)  # stl10: train + unlabelled (data.unlabeled)
    device, splits = r.device, r.splits

    # ============ networks: online (backbone, projector, predictor), target (EMA) ============
    nets = build_networks(cfg, device, r.dist)
    online, target = nets.online, nets.target

    # ============ loss, optimizer, resume ============
    criterion = NegativeCosineSimilarity()
    optimizer = build_optimizer(cfg.train, online.parameters(), r.base_lr())
    r.resume(online=online, target=target, optimizer=optimizer)

    # ============ training loop ============
    online.train(), target.train()
    for s in r.steps(optimizer, monitor=r.knn_monitor(online.backbone)):
        # tau rises from momentum_start to 1 on a cosine over the whole run (paper, Sec. 3.3)
        momentum = cosine_schedule(s.index, r.total_steps, cfg.byol.momentum_start, cfg.byol.momentum_end)
        view1, view2 = make_views(s.images, cfg, s.generator, splits.mean, splits.std, device, nets.augment)
        r.record(train_step(nets, optimizer, criterion, view1, view2, momentum, cfg, device), momentum=momentum)
    if r.paused():
        return r.dir

    # ============ final artifact: weights, probe, metrics ============
    if not r.dist.is_main:
        return r.finish()
    backbone = online.backbone
    metrics, head = evaluate_backbone(backbone, splits, cfg.eval, device, r.bf16, cfg.seed, cfg.eval.probe)
    metrics.update({"arch": cfg.model.arch, "params": count_params(backbone),
                    "macs": count_macs(backbone, splits.image_size)})
    return r.finish(backbone, backbone_spec(backbone, cfg.model.arch, cfg.model.cifar_stem), head, metrics)
