"""Distillation of a frozen teacher backbone (BYOL ResNet-50) into a student (ResNet-18).

One loop, top to bottom. The losses, the teacher loader and the `Distiller` (frozen teacher +
projector, hint adapters, student head, SEED queue) live in core/distill.py, shared with the
prune and quant stages. Teacher and student see the same augmented views, built on the device
by core.augment.two_view_augment (the byol stage's augmentation): both views of a batch are
concatenated into one batch of 2B, so every loss is the mean over both views.

    python -m distill configs/quickstart.yaml teacher=runs/byol/quickstart
    python -m distill configs/distill/cifar10_r50_to_r18.yaml loss.hint=1.0
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightly.utils.scheduler import cosine_warmup_schedule

from core import checkpoint as ckpt
from core import data as datalib
from core import engine
from core.augment import AugmentConfig, apply_view, two_view_augment
from core.config import ModelConfig, StageConfig, TrainConfig, to_dict, to_yaml
from core.distill import DistillLossConfig, Distiller, load_teacher
from core.errors import UserError
from core.evaluate import assert_unchanged, evaluate_backbone, extract_features, linear_cka, snapshot
from core.latency import LatencyConfig, latency_metrics
from core.models import backbone_spec, build_backbone, count_macs, count_params
from core.track import Progress, Tracker, log_line
from core.optim import LARS  # lightly's LARS update, foreach (no per-parameter loop or sync)

STAGE = "distill"


@dataclass
class Config(StageConfig):
    teacher: str = ""  # backbone artifact dir, e.g. runs/byol/NAME (the launcher fills it)
    teacher_head: str = ""  # probe artifact dir with head.pt; "" = the head in the teacher's model.pt
    student_init: str = ""  # "" = random init, or an artifact dir of the student's arch (BYOL, pruned, ...)
    # Keep only student_init's architecture (a pruned model's channel widths), with fresh
    # weights: "distil into the pruned architecture" (configs/ablations/order.yaml).
    student_reinit: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)  # the student
    train: TrainConfig = field(default_factory=TrainConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)  # of the student, as every stage reports


def lr_schedule(cfg: TrainConfig, base_lr: float, total_steps: int, steps_per_epoch: int) -> np.ndarray:
    """Linear warmup then cosine to 0, one value per step (precomputed, DINO-style)."""
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps)
    return np.array([cosine_warmup_schedule(s, total_steps, base_lr, 0.0, warmup, 0.0)
                     for s in range(total_steps)])


def build_optimizer(cfg: TrainConfig, params: list, lr: float):
    # No weight decay (and no LARS adaptation) on BatchNorm weights and biases (BYOL, Sec. C.1).
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def build_student(cfg: Config) -> nn.Module:
    """Random init, or the backbone of an artifact of the same architecture (its weights, or
    with student_reinit only its channel widths)."""
    if cfg.student_reinit and not cfg.student_init:
        raise UserError("student_reinit=true re-initialises student_init's architecture: set student_init=DIR")
    if not cfg.student_init:
        return build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    init = ckpt.load_model(Path(cfg.student_init), "student_init")
    arch, stem = init.spec.get("arch"), bool(init.spec.get("cifar_stem"))
    if (arch, stem) != (cfg.model.arch, cfg.model.cifar_stem):
        raise UserError(f"student_init {cfg.student_init} is a {arch} (cifar_stem={stem}) but the student is "
                        f"model.arch={cfg.model.arch} model.cifar_stem={cfg.model.cifar_stem}")
    if cfg.student_reinit:
        reinit_like_torchvision(init.backbone)
    return init.backbone


@torch.no_grad()
def reinit_like_torchvision(backbone: nn.Module) -> None:
    """torchvision's ResNet initialisation (He normal fan-out convs, BN at 1/0, its default
    Linear), so a re-initialised pruned student starts as a fresh `build_backbone` one does."""
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


def check_teacher_data(teacher, splits, cfg: Config) -> None:
    t_classes = teacher.head.out_features if teacher.head is not None else teacher.meta.get("num_classes")
    if t_classes is not None and t_classes != splits.num_classes:
        raise UserError(f"teacher {cfg.teacher} was trained for {t_classes} classes "
                        f"({teacher.meta.get('data')}), data.name={cfg.data.name} has {splits.num_classes}")
    for key, ours in (("data", cfg.data.name), ("image_size", splits.image_size)):
        if teacher.meta.get(key) not in (None, ours):
            log_line(f"distill: note: the teacher was trained with {key}={teacher.meta[key]}, this run uses {ours}")


def run(cfg: Config) -> Path:
    run_dir = ckpt.artifact_dir(cfg.run_root, STAGE, cfg.name)
    if (run_dir / "model.pt").is_file() and (run_dir / "metrics.json").is_file():
        log_line(f"distill: {run_dir} is already finished; nothing to do")
        return run_dir

    # ============ teacher: every artifact problem stops here, before any work ============
    teacher = load_teacher(cfg.teacher, cfg.teacher_head, need_head=cfg.loss.kd > 0)

    # ============ device, seeds, distributed ... ============
    device = engine.resolve_device(cfg.engine)
    dist = engine.init_distributed(device)
    engine.seed_everything(cfg.seed + dist.rank, cfg.engine.deterministic)
    bf16 = engine.use_bf16(cfg.engine, device)

    # ============ data: uint8 images resident on the device ============
    splits = datalib.load_splits(cfg.data)
    check_teacher_data(teacher, splits, cfg)
    in_memory = isinstance(splits.train, datalib.ImageSet)
    train_set = splits.train.to(device) if in_memory else splits.train
    batch_size = cfg.train.batch_size  # per process, per view
    steps_per_epoch = datalib.steps_per_epoch(len(train_set), batch_size, dist.world_size)
    total_steps = cfg.train.epochs * steps_per_epoch

    # ============ networks: frozen teacher, student, adapters ============
    student = build_student(cfg)
    distiller = Distiller(teacher, student, cfg.loss, splits.num_classes, splits.image_size)
    if dist.world_size > 1 and device.type == "cuda":
        distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
    distiller = engine.prepare_module(distiller, cfg.engine, device)
    student = distiller.student
    frozen = nn.ModuleList([m for m in (distiller.teacher, distiller.teacher_head) if m is not None])
    frozen_before = snapshot(frozen)
    distiller_step = distiller
    if dist.world_size > 1:
        # Hint-only runs leave the layers after the last hinted one without gradients.
        unused = not (cfg.loss.embed or cfg.loss.relation or cfg.loss.kd or cfg.loss.ce)
        distiller_step = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused)
    distiller_fwd = engine.maybe_compile(distiller_step, cfg.engine, device)
    augment = engine.maybe_compile(apply_view, cfg.engine, device)  # the views' arithmetic, as byol's

    # ============ optimizer, schedules ============
    base_lr = cfg.train.lr * batch_size * dist.world_size / 256  # linear scaling rule
    optimizer = build_optimizer(cfg.train, list(student.parameters()) + distiller.adapter_parameters(), base_lr)
    lrs = lr_schedule(cfg.train, base_lr, total_steps, steps_per_epoch)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + dist.rank)

    # ============ resume ============
    step, wandb_id, history = 0, None, []
    if (run_dir / "checkpoint.pt").is_file():
        state = ckpt.safe_load(run_dir / "checkpoint.pt")
        student.load_state_dict(state["student"])
        distiller.load_resumable_state(state["distiller"])  # adapters + SEED queue
        optimizer.load_state_dict(state["optimizer"])
        aug_gen.set_state(state["aug_rng"].cpu() if device.type == "cpu" else state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, wandb_id, history = state["step"], state["wandb_id"], state["history"]
        if dist.is_main:
            log_line(f"distill: resumed {run_dir} at step {step}/{total_steps}")
    elif dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))

    tracker = Tracker(cfg.track, run_dir, f"{STAGE}/{cfg.name}", to_dict(cfg), wandb_id, enabled=dist.is_main)

    def save_checkpoint():
        if not dist.is_main:
            return
        ckpt.atomic_save({
            "step": step, "student": student.state_dict(), "distiller": distiller.resumable_state(),
            "optimizer": optimizer.state_dict(), "aug_rng": aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(), "wandb_id": tracker.id, "history": history,
        }, run_dir / "checkpoint.pt")

    def knn_monitor() -> float:
        metrics, _ = evaluate_backbone(student, splits, cfg.eval, device, bf16, probe=False)
        return metrics["knn_top1"]

    # ============ training loop ============
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else total_steps
    progress = Progress(stop_at, step, desc=f"distill {cfg.name}", enabled=cfg.engine.progress and dist.is_main)
    distiller.train()  # the teacher stays in eval mode (Distiller.train)
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
            for images, labels in batches:
                lr = float(lrs[step])  # a numpy scalar would not load with weights_only=True
                for group in optimizer.param_groups:
                    group["lr"] = lr
                view1, view2 = two_view_augment(images, cfg.data.image_size, cfg.aug, aug_gen,
                                                splits.mean, splits.std, augment)
                # Both views in one batch: teacher and student see exactly the same images.
                views = torch.cat([view1, view2])
                if device.type == "cuda" and cfg.engine.channels_last:
                    views = views.contiguous(memory_format=torch.channels_last)
                with engine.autocast(cfg.engine, device):
                    loss, parts = distiller_fwd(views, labels.to(device).repeat(2))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1

                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise SystemExit(f"distill: loss is {loss_value} at step {step}; stopping "
                                     f"(last good checkpoint: {run_dir / 'checkpoint.pt'})")
                progress.update(len(images) * dist.world_size, loss=loss_value, lr=lr, epoch=epoch)
                if step % 10 == 0 or step == stop_at:
                    tracker.log({"train/loss": loss_value, "train/lr": lr, "train/images_per_s": progress.images_per_s,
                                 **{f"train/{k}": v.item() for k, v in parts.items()}}, step=step)
                if guard.stop_requested:
                    save_checkpoint()
                    tracker.finish()
                    guard.stop()
                if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0:
                    save_checkpoint()
                if step == stop_at:
                    break

            if step % steps_per_epoch == 0:  # a whole epoch ended here
                if first == 0:  # a resumed partial epoch would understate the time
                    epoch_seconds.append(time.perf_counter() - epoch_start)
                done_epochs = step // steps_per_epoch
                every = cfg.eval.knn_every_epochs
                if dist.is_main and every and (done_epochs % every == 0 or done_epochs == cfg.train.epochs):
                    knn = knn_monitor()
                    history.append({"epoch": done_epochs, "step": step, "knn_top1": knn, "loss": loss_value})
                    tracker.log({"val/knn_top1": knn, "epoch": done_epochs}, step=step)
                    progress.write(f"epoch {done_epochs}: loss {loss_value:.4f}  kNN top-1 {knn:.4f}")
            save_checkpoint()
    progress.close()
    # MoCo v3's guard: the teacher must end exactly as its artifact (weights and BN buffers).
    assert_unchanged(frozen, frozen_before, "the teacher")

    if step < total_steps:  # stopped early on purpose (train.max_steps): resumable, not final
        tracker.finish()
        log_line(f"distill: stopped at step {step}/{total_steps} (train.max_steps); rerun to continue")
        return run_dir

    # ============ final artifact: weights, probe, agreement with the teacher, metrics ============
    if dist.is_main:
        spec = backbone_spec(student, cfg.model.arch, cfg.model.cifar_stem)
        metrics, head = evaluate_backbone(student, splits, cfg.eval, device, bf16, cfg.seed, cfg.eval.probe)
        metrics.update(teacher_agreement(distiller, splits, cfg, device, bf16))
        parents = [str(p) for p in (cfg.teacher, cfg.teacher_head, cfg.student_init) if p]
        meta = {"stage": STAGE, "name": cfg.name, "data": cfg.data.name, "num_classes": splits.num_classes,
                "image_size": splits.image_size, "mean": list(splits.mean), "std": list(splits.std),
                "parents": parents, "teacher_arch": teacher.spec.get("arch")}
        ckpt.save_model(run_dir, student, spec, meta, head)
        metrics.update({
            "stage": STAGE, "arch": cfg.model.arch, "teacher_arch": teacher.spec.get("arch"),
            "epochs": cfg.train.epochs, "steps": total_steps,
            "losses": {k: v for k, v in to_dict(cfg.loss).items() if k in distiller.weights},
            "params": count_params(student), "macs": count_macs(student, splits.image_size),
            "file_mb": (run_dir / "model.pt").stat().st_size / 2**20,
            **latency_metrics(student, splits.image_size, cfg.latency),
            "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
            "final_loss": history[-1]["loss"] if history else None, "knn_history": history,
        })
        ckpt.write_json(run_dir / "metrics.json", metrics)
        tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        log_line(f"distill: done -> {run_dir}  kNN top-1 {metrics['knn_top1']:.4f}"
                 + (f"  probe top-1 {metrics['probe_top1']:.4f}" if "probe_top1" in metrics else "")
                 + f"  CKA to the teacher {metrics['cka_teacher']:.4f}")
    tracker.finish()
    engine.barrier(dist)
    return run_dir


def teacher_agreement(distiller: Distiller, splits, cfg: Config, device, bf16: bool) -> dict:
    """Linear CKA of student vs teacher pooled features on the val split, the mean cosine of the
    projected student embedding to the teacher's there (`embed_cosine_val`, when a projector was
    trained), and the teacher's own probe top-1 (when it has a head): what the student kept."""
    feats = {}
    for name, net in (("student", distiller.student), ("teacher", distiller.teacher)):
        feats[name] = extract_features(net, splits.val.images, splits.mean, splits.std, splits.image_size,
                                       device, cfg.eval.feature_batch_size, bf16)
    out = {"cka_teacher": linear_cka(feats["student"], feats["teacher"])}
    if distiller.projector is not None:  # what `embed` optimises, on images it never trained on
        was_training = distiller.projector.training
        with torch.no_grad():
            z = distiller.projector.eval()(feats["student"].to(device)).float().cpu()
        distiller.projector.train(was_training)
        out["embed_cosine_val"] = F.cosine_similarity(z, feats["teacher"].float(), dim=1).mean().item()
    if distiller.teacher_head is not None:
        with torch.no_grad():
            pred = distiller.teacher_head(feats["teacher"].to(device)).argmax(1).cpu()
        out["teacher_probe_top1"] = pred.eq(splits.val.labels.cpu()).float().mean().item()
    return out
