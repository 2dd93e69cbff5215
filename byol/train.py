"""BYOL pretraining (Grill et al. 2020, arXiv:2006.07733), one loop, top to bottom.

Built from lightly's parts: BYOLProjectionHead, BYOLPredictionHead, NegativeCosineSimilarity,
cosine_schedule, get_weight_decay_parameters; LARS and the target's EMA update are core.optim's
foreach versions of lightly's LARS and update_momentum (the same update, no per-parameter loop
or host sync). The data path and the augmentation are the project's own (core.data,
core.augment): uint8 images on the device, both views built there per step with per-sample
random parameters. `build_networks`, `make_views` and `train_step` are the loop's own steps,
also run by bench/byol_throughput.py.

    python -m byol configs/quickstart.yaml name=my-run train.epochs=20
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import numpy as np
import torch
import torch.nn as nn
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters
from lightly.utils.scheduler import cosine_schedule

from core import checkpoint as ckpt
from core import data as datalib
from core import engine
from core.augment import AugmentConfig, apply_view, two_view_augment
from core.config import ModelConfig, StageConfig, TrainConfig, to_dict, to_yaml
from core.evaluate import evaluate_backbone
from core.models import backbone_spec, build_backbone, count_macs, count_params, feature_dim
from core.optim import LARS, ema_update_, lr_schedule
from core.track import Progress, Tracker, log_line

STAGE = "byol"
# Steps between reads of the loss (one host sync each: the CPU stops queueing work until the
# device catches up) and between tracker logs.
LOG_EVERY = 10


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


def view_seed(seed: int, rank: int, step: int) -> int:
    """The augmentation seed of one step on one rank (resume needs no RNG state)."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


def build_optimizer(cfg: TrainConfig, online: nn.Module, lr: float):
    # No weight decay (and no LARS adaptation) on BatchNorm and bias parameters (BYOL, Sec. C.1).
    decay, no_decay = get_weight_decay_parameters([online])
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum,
                               foreach=None if not torch.cuda.is_available() else True)
    return torch.optim.AdamW(groups, lr=lr)


def run(cfg: Config) -> Path:
    run_dir = ckpt.artifact_dir(cfg.run_root, STAGE, cfg.name)
    if (run_dir / "model.pt").is_file() and (run_dir / "metrics.json").is_file():
        log_line(f"byol: {run_dir} is already finished; nothing to do")
        return run_dir

    # ============ device, seeds, distributed ... ============
    device = engine.resolve_device(cfg.engine)
    dist = engine.init_distributed(device)
    # One seed on every rank: identical initial weights, the target copy included (DDP broadcasts
    # only the module it wraps); per-rank randomness (augmentation) comes from aug_gen below.
    engine.seed_everything(cfg.seed, cfg.engine.deterministic)
    bf16 = engine.use_bf16(cfg.engine, device)

    # ============ data: uint8 images resident on the device ============
    splits = datalib.load_splits(cfg.data)
    in_memory = isinstance(splits.train, datalib.ImageSet)
    train_set = splits.train.to(device) if in_memory else splits.train
    batch_size = cfg.train.batch_size  # per process
    steps_per_epoch = datalib.steps_per_epoch(len(train_set), batch_size, dist.world_size)
    total_steps = cfg.train.epochs * steps_per_epoch

    # ============ networks: online (backbone, projector, predictor), target (EMA) ============
    nets = build_networks(cfg, device, dist)
    online, target = nets.online, nets.target

    # ============ loss, optimizer, schedules ============
    criterion = NegativeCosineSimilarity()
    base_lr = cfg.train.lr * batch_size * dist.world_size / 256  # linear scaling rule
    optimizer = build_optimizer(cfg.train, online, base_lr)
    lrs = lr_schedule(cfg.train, base_lr, total_steps, steps_per_epoch)
    # The views of a step are a pure function of (seed, rank, step): the generator is reseeded
    # every step, so a resumed or requeued job (any rank of a DDP job) redraws exactly the views
    # an uninterrupted one would, with no per-rank RNG state to save.
    aug_gen = torch.Generator(device=device)

    # ============ resume ============
    step, wandb_id, history = 0, None, []
    loss_sum, loss_count = 0.0, 0  # running mean of the current epoch's loss
    pending, last_loss = [], None  # losses (device tensors) of the steps not read yet; the last read
    if (run_dir / "checkpoint.pt").is_file():
        state = ckpt.safe_load(run_dir / "checkpoint.pt")
        online.load_state_dict(state["online"])
        target.load_state_dict(state["target"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, wandb_id, history = state["step"], state["wandb_id"], state["history"]
        loss_sum, loss_count = state["epoch_loss"]
        if dist.is_main:
            log_line(f"byol: resumed {run_dir} at step {step}/{total_steps}")
    elif dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))

    tracker = Tracker(cfg.track, run_dir, f"{STAGE}/{cfg.name}", to_dict(cfg), wandb_id, enabled=dist.is_main)

    def read_losses():
        """Read the pending losses in one host sync; stop at once on a non-finite one (DINO-style)."""
        nonlocal loss_sum, loss_count, last_loss
        if not pending:
            return
        values = torch.stack(pending).tolist()
        pending.clear()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise SystemExit(f"byol: loss is {value} at step {step - len(values) + 1 + i}; stopping "
                                 f"(last good checkpoint: {run_dir / 'checkpoint.pt'})")
            loss_sum, loss_count = loss_sum + value, loss_count + 1
        last_loss = values[-1]

    def save_checkpoint():
        read_losses()  # never save weights a non-finite loss has touched
        if not dist.is_main:
            return
        ckpt.atomic_save({
            "step": step, "online": online.state_dict(), "target": target.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(), "wandb_id": tracker.id, "history": history,
            "epoch_loss": [loss_sum, loss_count],
        }, run_dir / "checkpoint.pt")

    def knn_monitor() -> float:
        metrics, _ = evaluate_backbone(online.backbone, splits, cfg.eval, device, bf16, probe=False)
        return metrics["knn_top1"]

    # ============ training loop ============
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else total_steps
    progress = Progress(stop_at, step, desc=f"byol {cfg.name}", enabled=cfg.engine.progress and dist.is_main)
    online.train(), target.train()
    epoch_seconds = []
    with engine.StopGuard() as guard:
        while step < stop_at:
            epoch, first = divmod(step, steps_per_epoch)
            order = datalib.epoch_permutation(len(train_set), cfg.seed, epoch, dist.rank, dist.world_size)
            if in_memory:
                batches = datalib.in_memory_batches(train_set, order, batch_size, first)
            else:
                batches = datalib.jpeg_batches(train_set, order, batch_size, cfg.data.image_size, device,
                                               cfg.data.num_workers, first)
            epoch_start = time.perf_counter()
            for images, _ in batches:
                # float(): a numpy scalar in param_groups would make checkpoint.pt fail weights_only loads
                lr = float(lrs[step])
                momentum = cosine_schedule(step, total_steps, cfg.byol.momentum_start, cfg.byol.momentum_end)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                aug_gen.manual_seed(view_seed(cfg.seed, dist.rank, step))
                view1, view2 = make_views(images, cfg, aug_gen, splits.mean, splits.std, device, nets.augment)
                pending.append(train_step(nets, optimizer, criterion, view1, view2, momentum, cfg, device))
                step += 1

                if step % LOG_EVERY == 0 or step == stop_at:
                    read_losses()
                    tracker.log({"train/loss": last_loss, "train/lr": lr, "train/momentum": momentum,
                                 "train/images_per_s": progress.images_per_s}, step=step)
                shown = {"loss": last_loss} if last_loss is not None else {}
                progress.update(len(images) * dist.world_size, **shown, lr=lr, epoch=epoch)
                if guard.stop_requested:
                    save_checkpoint()
                    tracker.finish()
                    guard.stop()
                if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0:
                    save_checkpoint()
                if step == stop_at:
                    break
            read_losses()

            if step % steps_per_epoch == 0:  # a whole epoch ended here
                if first == 0:  # a resumed partial epoch would understate the time
                    epoch_seconds.append(time.perf_counter() - epoch_start)
                done_epochs = step // steps_per_epoch
                entry = {"epoch": done_epochs, "step": step, "loss": loss_sum / max(1, loss_count)}
                every = cfg.eval.knn_every_epochs
                if dist.is_main and every and (done_epochs % every == 0 or done_epochs == cfg.train.epochs):
                    entry["knn_top1"] = knn_monitor()
                    tracker.log({"val/knn_top1": entry["knn_top1"], "epoch": done_epochs}, step=step)
                    progress.write(f"epoch {done_epochs}: mean loss {entry['loss']:.4f}  "
                                   f"kNN top-1 {entry['knn_top1']:.4f}")
                history.append(entry)
                tracker.log({"train/epoch_loss": entry["loss"]}, step=step)
                loss_sum, loss_count = 0.0, 0
            save_checkpoint()
    progress.close()

    if step < total_steps:  # stopped early on purpose (train.max_steps): resumable, not final
        tracker.finish()
        log_line(f"byol: stopped at step {step}/{total_steps} (train.max_steps); rerun to continue")
        return run_dir

    # ============ final artifact: weights, probe, metrics ============
    if dist.is_main:
        backbone = online.backbone
        spec = backbone_spec(backbone, cfg.model.arch, cfg.model.cifar_stem)
        metrics, head = evaluate_backbone(backbone, splits, cfg.eval, device, bf16, cfg.seed, cfg.eval.probe)
        meta = {"stage": STAGE, "name": cfg.name, "data": cfg.data.name, "num_classes": splits.num_classes,
                "image_size": splits.image_size, "mean": list(splits.mean), "std": list(splits.std),
                "parents": []}
        ckpt.save_model(run_dir, backbone, spec, meta, head)
        metrics.update({
            "stage": STAGE, "arch": cfg.model.arch, "epochs": cfg.train.epochs, "steps": total_steps,
            "params": count_params(backbone), "macs": count_macs(backbone, splits.image_size),
            "file_mb": (run_dir / "model.pt").stat().st_size / 2**20,
            "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
            "final_loss": history[-1]["loss"] if history else None, "history": history,
        })
        ckpt.write_json(run_dir / "metrics.json", metrics)
        tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        log_line(f"byol: done -> {run_dir}  kNN top-1 {metrics['knn_top1']:.4f}"
                 + (f"  probe top-1 {metrics['probe_top1']:.4f}" if "probe_top1" in metrics else ""))
    tracker.finish()
    engine.barrier(dist)
    return run_dir
