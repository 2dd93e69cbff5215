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

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core import checkpoint as ckpt
from core import engine
from core.augment import AugmentConfig, apply_view, two_view_augment
from core.config import ModelConfig, StageConfig, TrainConfig, to_dict
from core.distill import DistillLossConfig, Distiller, load_teacher
from core.errors import UserError
from core.evaluate import assert_unchanged, evaluate_backbone, features_cka, snapshot
from core.latency import LatencyConfig, latency_metrics
from core.loop import Run
from core.models import backbone_spec, build_backbone, count_macs, count_params
from core.optim import build_optimizer
from core.track import log_line

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
    r = Run(cfg, STAGE)
    if r.done:
        return r.dir

    # ============ teacher: every artifact problem stops here, before any work ============
    teacher = load_teacher(cfg.teacher, cfg.teacher_head, need_head=cfg.loss.kd > 0)

    # ============ device, DDP, seed, data (uint8 images resident on the device) ============
    r.start()
    device, splits = r.device, r.splits
    check_teacher_data(teacher, splits, cfg)

    # ============ networks: frozen teacher, student, adapters ============
    student = build_student(cfg)
    distiller = Distiller(teacher, student, cfg.loss, splits.num_classes, splits.image_size)
    if r.dist.world_size > 1 and device.type == "cuda":
        distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
    distiller = engine.prepare_module(distiller, cfg.engine, device)
    student = distiller.student
    frozen = nn.ModuleList([m for m in (distiller.teacher, distiller.teacher_head) if m is not None])
    frozen_before = snapshot(frozen)
    distiller_step = distiller
    if r.dist.world_size > 1:
        # Hint-only runs leave the layers after the last hinted one without gradients.
        unused = not (cfg.loss.embed or cfg.loss.relation or cfg.loss.kd or cfg.loss.ce)
        distiller_step = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused)
    distiller_fwd = engine.maybe_compile(distiller_step, cfg.engine, device)
    augment = engine.maybe_compile(apply_view, cfg.engine, device)  # the views' arithmetic, as byol's

    # ============ optimizer, resume ============
    optimizer = build_optimizer(cfg.train, [*student.parameters(), *distiller.adapter_parameters()], r.base_lr())
    r.resume(student=student, distiller=distiller, optimizer=optimizer)  # distiller: adapters + SEED queue

    # ============ training loop ============
    distiller.train()  # the teacher stays in eval mode (Distiller.train)
    for s in r.steps(optimizer, monitor=r.knn_monitor(student)):
        view1, view2 = two_view_augment(s.images, cfg.data.image_size, cfg.aug, s.generator,
                                        splits.mean, splits.std, augment)
        # Both views in one batch: teacher and student see exactly the same images.
        views = torch.cat([view1, view2])
        if device.type == "cuda" and cfg.engine.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with engine.autocast(cfg.engine, device):
            loss, parts = distiller_fwd(views, s.labels.to(device).repeat(2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        r.record(loss, parts)
    # MoCo v3's guard: the teacher must end exactly as its artifact (weights and BN buffers).
    assert_unchanged(frozen, frozen_before, "the teacher")
    if r.paused():
        return r.dir

    # ============ final artifact: weights, probe, agreement with the teacher, metrics ============
    if not r.dist.is_main:
        return r.finish()
    metrics, head = evaluate_backbone(student, splits, cfg.eval, device, r.bf16, cfg.seed, cfg.eval.probe)
    metrics.update(teacher_agreement(distiller, splits, cfg, device, r.bf16))
    metrics.update({
        "arch": cfg.model.arch, "teacher_arch": teacher.spec.get("arch"),
        "losses": {k: v for k, v in to_dict(cfg.loss).items() if k in distiller.weights},
        "params": count_params(student), "macs": count_macs(student, splits.image_size),
        **latency_metrics(student, splits.image_size, cfg.latency),
    })
    return r.finish(student, backbone_spec(student, cfg.model.arch, cfg.model.cifar_stem), head, metrics,
                    parents=(cfg.teacher, cfg.teacher_head, cfg.student_init),
                    meta={"teacher_arch": teacher.spec.get("arch")},
                    summary=f"  CKA to the teacher {metrics['cka_teacher']:.4f}")


def teacher_agreement(distiller: Distiller, splits, cfg: Config, device, bf16: bool) -> dict:
    """Linear CKA of student vs teacher pooled features on the val split, the mean cosine of the
    projected student embedding to the teacher's there (`embed_cosine_val`, when a projector was
    trained), and the teacher's own probe top-1 (when it has a head): what the student kept."""
    cka, f_student, f_teacher = features_cka(distiller.student, distiller.teacher, splits, device,
                                             cfg.eval.feature_batch_size, bf16)
    out = {"cka_teacher": cka}
    if distiller.projector is not None:  # what `embed` optimises, on images it never trained on
        was_training = distiller.projector.training
        with torch.no_grad():
            z = distiller.projector.eval()(f_student.to(device)).float().cpu()
        distiller.projector.train(was_training)
        out["embed_cosine_val"] = F.cosine_similarity(z, f_teacher, dim=1).mean().item()
    if distiller.teacher_head is not None:
        with torch.no_grad():
            pred = distiller.teacher_head(f_teacher.to(device)).argmax(1).cpu()
        out["teacher_probe_top1"] = pred.eq(splits.val.labels.cpu()).float().mean().item()
    return out
