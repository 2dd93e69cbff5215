"""int8 quantization-aware training (QAT) with distillation, then a real int8 model, one loop.

Input: any backbone artifact with a probe head in its model.pt (byol, distill, prune), i.e. a
classifier whose accuracy can be measured. The loop fine-tunes it with fake quantisation
(per-channel symmetric int8 weights, per-tensor uint8 activations, Conv-BN folded the QAT way)
against the teacher's logits (`loss.kd`, Hinton et al. 2015) and/or the labels (`loss.ce`);
BatchNorm statistics and then the observers are frozen late in training (the schedule of
PyTorch's QAT tutorial: BN from epoch 3, observers from epoch 4, of 8). The result is converted
to a real int8 model, compiled into one AOTInductor file, and measured on the CPU against the
fp32 source: top-1/top-5 of the converted model with its own head, latency at batch 1 and 32,
file size.

API: torchao's PT2E (export -> prepare_qat_pt2e -> convert_pt2e), not torch.ao's FX QAT; why,
and what makes it work on torchvision ResNets, is in quant/pt2e.py.

    python -m quant configs/quickstart.yaml                       # after byol and probe
    python -m quant configs/quant/cifar10_r18.yaml source=runs/prune/r18-50 teacher=runs/byol/r50

Artifacts (runs/quant/NAME/): model_int8.pt2 (the int8 model; runs without this project):

    import torch
    model = torch._inductor.aoti_load_package("runs/quant/NAME/model_int8.pt2")
    meta = model.get_metadata()          # mean, std, image_size, num_classes
    logits = model(x)                     # x: float32 [B, 3, S, S], (pixels/255 - mean) / std

model.pt (the QAT-tuned fp32 weights: the same architecture as the source, chainable like any
backbone artifact), checkpoint.pt, config.yaml, metrics.json.
"""

from __future__ import annotations

import copy
import json
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
from core import int8
from core.augment import AugmentConfig, augment_view, eval_view, normalize
from core.config import StageConfig, TrainConfig, choice, to_dict, to_yaml
from core.cpu import cpu_facts, describe, int8_has_vnni
from core.distill import LOSSES, DistillLossConfig, kd_loss, load_teacher
from core.errors import UserError
from core.evaluate import (assert_unchanged, extract_features, knn_top1, linear_cka, snapshot, topk_accuracy,
                           train_linear_probe)
from core.latency import LatencyConfig, measure_latency
from core.models import Classifier, backbone_from_spec, count_macs, count_params, feature_dim
from core.track import Progress, Tracker, log_line
from core.optim import LARS  # lightly's LARS update, foreach (no per-parameter loop or sync)
from quant import pt2e

STAGE = "quant"


@dataclass
class QuantConfig:
    backend: str = choice("x86", "x86")  # oneDNN int8 kernels (x86 CPUs); see pt2e.QUANTIZERS
    # 7-bit activations (0..127): needed where the int8 model runs on a CPU without VNNI, whose
    # kernels saturate full-range ones (core/cpu.py; README, "int8 on CPUs with and without
    # VNNI"). auto: true exactly when this machine's int8 kernels lack VNNI. Kept in
    # checkpoint.pt, so a resumed run keeps the range it started with.
    reduce_range: str = choice("auto", "auto", "true", "false")
    # At the start of these epochs (0-based) BN switches to its running statistics, which stop
    # updating, then the observers stop moving the quantisation ranges (PyTorch's QAT tutorial:
    # epochs 3 and 4 of 8). A value >= train.epochs never freezes during training; conversion
    # always reads frozen values.
    freeze_bn_epoch: int = 3
    freeze_observers_epoch: int = 4
    export: bool = True  # compile model_int8.pt2 (AOTInductor; ~1 min for a ResNet-18 on 2 cores)
    # After QAT the head is refitted as a linear probe on the int8 model's own features (the
    # protocol of every stage's probe_top1), then quantised with them. Why: on the digits
    # quickstart the QAT-tuned source head lost 5-10 points that a probe on the same int8
    # features recovers; on CIFAR-10 at CPU scale the refitted head scored 0.5038 against the
    # QAT-tuned one's 0.4768 (README, "int8 QAT on CIFAR-10 at CPU scale"). false: keep the
    # QAT-tuned head.
    refit_head: bool = True


def default_train() -> TrainConfig:
    # A short, gentle fine-tune: the model is trained already; QAT only adapts it to int8.
    # Measured on the digits quickstart (BYOL ResNet-18, 3 epochs): lr 0.01 per 256 diverged
    # (int8 top-1 0.08; fp32 fine-tuning with frozen BN diverges at that lr too), 0.001 kept the
    # int8 model at the fp32 source's 0.958, 0.0001 gave 0.955.
    return TrainConfig(epochs=8, batch_size=256, optimizer="sgd", lr=0.001, weight_decay=5e-5,
                       momentum=0.9, warmup_epochs=0.0)


def default_aug() -> AugmentConfig:
    # Supervised fine-tuning views: crop + flip; BYOL's colour, blur and solarize are off.
    return AugmentConfig(crop_scale_min=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p1=0.0, blur_p2=0.0,
                         solarize_p1=0.0, solarize_p2=0.0)


def default_loss() -> DistillLossConfig:
    # Logit distillation only; plain fine-tuning is loss.kd=0 loss.ce=1 (no teacher needed).
    return DistillLossConfig(embed=0.0, hint=0.0, relation=0.0, kd=1.0, ce=0.0)


@dataclass
class Config(StageConfig):
    source: str = ""  # backbone artifact with a probe head in model.pt: runs/distill/N, runs/prune/N, ...
    teacher: str = ""  # backbone artifact for loss.kd (and CKA in metrics.json), e.g. runs/byol/N
    teacher_head: str = ""  # probe artifact (head.pt); "" = the head in the teacher's model.pt
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=default_train)
    aug: AugmentConfig = field(default_factory=default_aug)
    loss: DistillLossConfig = field(default_factory=default_loss)
    latency: LatencyConfig = field(default_factory=LatencyConfig)


# ----------------------------------------------------------------------------- inputs


def load_source(path: str) -> ckpt.Artifact:
    """The fp32 classifier to quantise: a backbone artifact whose model.pt holds a probe head."""
    if not path:
        raise UserError("quant needs source=DIR: a backbone artifact with a probe head in its model.pt "
                        "(runs/byol/N, runs/distill/N, runs/prune/N)")
    art = ckpt.load_model(Path(path), "source")
    if art.head is None:
        raise UserError(f"source {path} is not a classifier: its model.pt has no probe head (quant measures "
                        f"the int8 model's accuracy with it); use an artifact finished with eval.probe=true")
    if art.head.in_features != feature_dim(art.backbone):
        raise UserError(f"source {path}: the head takes {art.head.in_features}-d features, "
                        f"the backbone gives {feature_dim(art.backbone)}-d")
    return art


def check_config(cfg: Config) -> None:
    pt2e.make_quantizer(cfg.quant.backend)  # unsupported backend: an error now, not after training
    unused = [name for name in LOSSES if name not in ("kd", "ce") and getattr(cfg.loss, name) != 0]
    if unused:
        raise UserError(f"quant trains on logits: only loss.kd and loss.ce apply; set "
                        f"{', '.join(f'loss.{n}=0' for n in unused)}")
    if cfg.loss.kd < 0 or cfg.loss.ce < 0 or cfg.loss.kd + cfg.loss.ce == 0:
        raise UserError(f"quant needs loss.kd > 0 (distillation from teacher=...) or loss.ce > 0 "
                        f"(plain fine-tuning), both >= 0; got kd={cfg.loss.kd} ce={cfg.loss.ce}")
    if cfg.loss.kd > 0 and not cfg.teacher:
        raise UserError("loss.kd > 0 needs teacher=DIR (e.g. runs/byol/N); "
                        "for plain fine-tuning set loss.kd=0 loss.ce=1")
    if min(cfg.quant.freeze_bn_epoch, cfg.quant.freeze_observers_epoch) < 0:
        raise UserError("quant.freeze_bn_epoch and quant.freeze_observers_epoch must be >= 0")


# ----------------------------------------------------------------------------- helpers


def lr_schedule(cfg: TrainConfig, base_lr: float, total_steps: int, steps_per_epoch: int) -> np.ndarray:
    """Linear warmup then cosine to 0, one value per step (precomputed, DINO-style)."""
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps)
    return np.array([cosine_warmup_schedule(s, total_steps, base_lr, 0.0, warmup, 0.0)
                     for s in range(total_steps)])


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float):
    # No weight decay on BN weights and biases (1-d); the exported graph has no BN module types.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def apply_freezes(prepared: torch.fx.GraphModule, epoch: int, cfg: QuantConfig) -> None:
    """The freeze schedule as a function of the epoch (idempotent), so resume needs no flag."""
    if epoch >= cfg.freeze_bn_epoch:
        pt2e.freeze_bn_stats(prepared)
    if epoch >= cfg.freeze_observers_epoch:
        pt2e.freeze_observers(prepared)


@torch.no_grad()
def predict(model, images: torch.Tensor, mean, std, image_size: int, device: torch.device,
            batch_size: int = 256) -> torch.Tensor:
    """Logits [N, C] (float32, CPU) of uint8 images through `model` (no augmentation)."""
    out = []
    for chunk in images.split(batch_size):
        out.append(model(eval_view(chunk.to(device), image_size, mean, std)).float().cpu())
    return torch.cat(out)


def resolve_reduce_range(setting: str) -> bool:
    return int8_has_vnni() is False if setting == "auto" else setting == "true"


def build_prepared(source: ckpt.Artifact, image_size: int, backend: str, device: torch.device,
                   reduce_range: bool = False) -> torch.fx.GraphModule:
    """A copy of the source classifier with one ReLU per call site, exported and prepared for QAT.

    Deterministic: the same source and image size give the same graph and state_dict keys, so a
    checkpoint's `model` state loads strictly into a new one (resume, conversion on the CPU).
    """
    model = pt2e.split_relus(copy.deepcopy(Classifier(source.backbone, source.head))).to(device)
    return pt2e.prepare_qat(model, torch.zeros(2, 3, image_size, image_size, device=device), backend, reduce_range)


def fp32_weights(state: dict, source: ckpt.Artifact) -> Classifier:
    """The QAT-tuned float weights as an ordinary fp32 classifier of the source's architecture
    (the prepared graph keeps the original parameter names; fake-quant buffers are left out)."""
    model = Classifier(backbone_from_spec(source.spec), nn.Linear(source.head.in_features, source.head.out_features))
    model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True)
    return model.eval()


def run(cfg: Config) -> Path:
    run_dir = ckpt.artifact_dir(cfg.run_root, STAGE, cfg.name)
    if (run_dir / "model.pt").is_file() and (run_dir / "metrics.json").is_file():
        log_line(f"quant: {run_dir} is already finished; nothing to do")
        return run_dir

    # ============ inputs: every config or artifact problem stops here, before any work ============
    check_config(cfg)
    source = load_source(cfg.source)
    # The teacher trains (loss.kd) and/or is measured against (CKA of the tuned backbone).
    teacher = load_teacher(cfg.teacher, cfg.teacher_head, need_head=cfg.loss.kd > 0) if cfg.teacher else None

    # ============ device, seeds ============
    device = engine.resolve_device(cfg.engine)
    cpu = torch.device("cpu")
    engine.seed_everything(cfg.seed, cfg.engine.deterministic)

    # ============ data: uint8 images resident on the device ============
    splits = datalib.load_splits(cfg.data)
    for what, head in (("source", source.head), ("teacher", teacher.head if teacher else None)):
        if head is not None and head.out_features != splits.num_classes:
            raise UserError(f"the {what}'s probe head has {head.out_features} classes, "
                            f"data.name={cfg.data.name} has {splits.num_classes}")
    in_memory = isinstance(splits.train, datalib.ImageSet)
    train_set = splits.train.to(device) if in_memory else splits.train
    size, batch_size = splits.image_size, cfg.train.batch_size
    steps_per_epoch = datalib.steps_per_epoch(len(train_set), batch_size)
    total_steps = cfg.train.epochs * steps_per_epoch

    # ============ networks: fake-quant classifier (PT2E), frozen teacher ============
    resume_state = ckpt.safe_load(run_dir / "checkpoint.pt") if (run_dir / "checkpoint.pt").is_file() else None
    reduce_range = resume_state["reduce_range"] if resume_state else resolve_reduce_range(cfg.quant.reduce_range)
    prepared = build_prepared(source, size, cfg.quant.backend, device, reduce_range)
    teacher_net = None
    if cfg.loss.kd > 0:
        teacher_net = Classifier(teacher.backbone, teacher.head).to(device).eval()
        teacher_frozen = snapshot(teacher_net)

    # ============ optimizer, schedule ============
    base_lr = cfg.train.lr * batch_size / 256  # linear scaling rule
    optimizer = build_optimizer(cfg.train, prepared, base_lr)
    lrs = lr_schedule(cfg.train, base_lr, total_steps, steps_per_epoch)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919)

    # ============ resume: the prepared graph's state_dict (weights + fake-quant buffers) ============
    step, wandb_id, history = 0, None, []
    if resume_state is not None:
        state = resume_state
        prepared.load_state_dict(state["model"], strict=True)  # the loop re-applies the freezes
        optimizer.load_state_dict(state["optimizer"])
        aug_gen.set_state(state["aug_rng"].cpu() if device.type == "cpu" else state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, wandb_id, history = state["step"], state["wandb_id"], state["history"]
        log_line(f"quant: resumed {run_dir} at step {step}/{total_steps}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))

    tracker = Tracker(cfg.track, run_dir, f"{STAGE}/{cfg.name}", to_dict(cfg), wandb_id)

    def save_checkpoint():
        ckpt.atomic_save({
            "step": step, "model": prepared.state_dict(), "optimizer": optimizer.state_dict(),
            "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state(), "wandb_id": tracker.id,
            "history": history, "reduce_range": reduce_range,
        }, run_dir / "checkpoint.pt")

    # ============ training loop: fake-quant forward, distillation from the teacher's logits ============
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else total_steps
    progress = Progress(stop_at, step, desc=f"quant {cfg.name}", enabled=cfg.engine.progress)
    epoch_seconds, loss_value = [], float("nan")
    with engine.StopGuard() as guard:
        while step < stop_at:
            epoch, first = divmod(step, steps_per_epoch)
            apply_freezes(prepared, epoch, cfg.quant)
            order = datalib.epoch_permutation(len(train_set), cfg.seed, epoch)
            if in_memory:
                batches = datalib.in_memory_batches(train_set, order, batch_size, first)
            else:
                batches = datalib.jpeg_batches(train_set, order, batch_size, size, device,
                                               cfg.data.num_workers, first)
            epoch_start = time.perf_counter()
            for images, labels in batches:
                lr = float(lrs[step])  # a numpy scalar would not load with weights_only=True
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = normalize(augment_view(images, size, cfg.aug, cfg.aug.blur_p1, cfg.aug.solarize_p1, aug_gen),
                              splits.mean, splits.std)
                logits = prepared(x)  # fp32: fake-quant under bf16 autocast would round twice
                parts = {}
                if cfg.loss.kd > 0:
                    with torch.no_grad(), engine.autocast(cfg.engine, device):
                        teacher_logits = teacher_net(x).float()
                    parts["kd"] = kd_loss(logits, teacher_logits, cfg.loss.kd_kind, cfg.loss.kd_temperature)
                if cfg.loss.ce > 0:
                    parts["ce"] = F.cross_entropy(logits, labels)
                loss = sum(getattr(cfg.loss, name) * value for name, value in parts.items())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1

                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise SystemExit(f"quant: loss is {loss_value} at step {step}; stopping "
                                     f"(last good checkpoint: {run_dir / 'checkpoint.pt'})")
                progress.update(len(images), loss=loss_value, lr=lr, epoch=epoch)
                if step % 10 == 0 or step == stop_at:
                    tracker.log({"train/loss": loss_value, "train/lr": lr,
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
                history.append({"epoch": step // steps_per_epoch, "step": step, "loss": loss_value})
                progress.write(f"epoch {step // steps_per_epoch}: loss {loss_value:.4f}")
            save_checkpoint()
    progress.close()

    if step < total_steps:  # stopped early on purpose (train.max_steps): resumable, not final
        tracker.finish()
        log_line(f"quant: stopped at step {step}/{total_steps} (train.max_steps); rerun to continue")
        return run_dir
    if teacher_net is not None:
        assert_unchanged(teacher_net, teacher_frozen, "the teacher")

    # ============ convert on the CPU: BN folded, observers frozen, real int8 ops ============
    state = {k: v.detach().cpu().clone() for k, v in prepared.state_dict().items()}  # convert works in place
    if device.type != "cpu":  # int8 kernels are CPU kernels: the same graph rebuilt there (as on resume)
        prepared = build_prepared(source, size, cfg.quant.backend, cpu, reduce_range)
        prepared.load_state_dict(state, strict=True)
    pt2e.freeze_observers(prepared)
    pt2e.freeze_bn_stats(prepared)
    val_labels = splits.val.labels.cpu()
    qat_head_acc = topk_accuracy(predict(prepared, splits.val.images, splits.mean, splits.std, size, cpu), val_labels)
    # The int8 model's own features (fake-quantised: what conversion computes, in float), for
    # its kNN top-1, the same monitor as every other stage's, and the refitted head.
    features = pt2e.feature_extractor(prepared)
    train_features = predict(features, splits.train.images, splits.mean, splits.std, size, cpu)
    int8_knn = knn_top1(train_features, splits.train.labels.cpu(),
                        predict(features, splits.val.images, splits.mean, splits.std, size, cpu), val_labels,
                        splits.num_classes, cfg.eval.knn_k, cfg.eval.knn_temperature)
    if cfg.quant.refit_head:  # a linear probe on the int8 model's own (fake-quantised) features
        # Standardised with std >= the features' int8 step: without that floor the CIFAR-10 check
        # (bench/qat_cifar_cpu.sh) fell from 0.47 to 0.19 top-1, all of it the head's own int8
        # weight rounding (core.evaluate.train_linear_probe says why).
        head = train_linear_probe(train_features,
                                  splits.train.labels.cpu(), splits.num_classes, cfg.eval.probe_epochs,
                                  cfg.eval.probe_lr, cfg.eval.probe_weight_decay, cfg.eval.probe_batch_size, cfg.seed,
                                  min_std=pt2e.head_input_step(prepared))
        pt2e.replace_head(prepared, head)
        state.update({"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()})
    check_images = eval_view(splits.val.images[:64].cpu(), size, splits.mean, splits.std)
    with torch.no_grad():
        fake_quant_logits = prepared(check_images)
    int8_model = pt2e.convert(prepared)  # in place: `prepared` is the int8 graph from here on
    with torch.no_grad():
        agreement = F.cosine_similarity(int8_model(check_images).flatten(), fake_quant_logits.flatten(), dim=0).item()

    # ============ export: one AOTInductor file that runs without this project ============
    package = None
    if cfg.quant.export:
        meta_strings = {"stage": STAGE, "name": cfg.name, "source": cfg.source, "data": cfg.data.name,
                        "num_classes": splits.num_classes, "image_size": size,
                        "mean": json.dumps(list(splits.mean)), "std": json.dumps(list(splits.std)),
                        "input": "float32 [B, 3, image_size, image_size], (pixels / 255 - mean) / std"}
        compile_start = time.perf_counter()
        package = pt2e.export_package(int8_model, torch.zeros(2, 3, size, size), run_dir / pt2e.PACKAGE_NAME,
                                      meta_strings)
        log_line(f"quant: compiled {package} ({package.stat().st_size / 2**20:.1f} MB) "
                 f"in {time.perf_counter() - compile_start:.0f} s")
        int8_model = int8.PackagedModel(package)  # evaluate what ships

    # ============ evaluate on the CPU: int8 (own head) vs the fp32 source ============
    fp32_model = Classifier(source.backbone, source.head).eval()
    int8_acc = topk_accuracy(predict(int8_model, splits.val.images, splits.mean, splits.std, size, cpu), val_labels)
    fp32_acc = topk_accuracy(predict(fp32_model.to(device), splits.val.images, splits.mean, splits.std, size,
                                     device), val_labels)
    fp32_model.cpu()
    tuned = fp32_weights(state, source)
    metrics = {
        "stage": STAGE, "arch": source.spec.get("arch"), "source": cfg.source, "source_stage": source.meta.get("stage"),
        "backend": cfg.quant.backend, "format": "aoti-pt2" if package else None,
        "probe_top1": int8_acc[1], "probe_top5": int8_acc[5],
        "fp32_top1": fp32_acc[1], "fp32_top5": fp32_acc[5], "top1_drop": fp32_acc[1] - int8_acc[1],
        "int8_vs_fakequant_cosine": agreement, "head": "refit" if cfg.quant.refit_head else "qat",
        "knn_top1": int8_knn,  # on the fake-quantised features (int8_vs_fakequant_cosine says how close)
        "qat_head_top1": qat_head_acc[1],  # fake-quant, with the QAT-tuned source head (before any refit)
        "params": count_params(source.backbone), "macs": count_macs(source.backbone, size),
        "file_mb": package.stat().st_size / 2**20 if package else None,
        "fp32_file_mb": source.path.stat().st_size / 2**20,
        "epochs": cfg.train.epochs, "steps": total_steps,
        "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
        "final_loss": loss_value if math.isfinite(loss_value) else None, "history": history,
        "latency_ms_cpu_b1": None, "latency_ms_cpu_b32": None, "latency_ms_gpu_b256": None,
        "fp32_latency_ms_cpu_b1": None, "fp32_latency_ms_cpu_b32": None,
        "latency_cpu_threads": torch.get_num_threads(),
        # The int8 numbers above hold for this CPU's kernels (core/cpu.py): `python -m probe ...
        # artifact=<this run>` re-measures the package on another machine against them.
        "cpu": cpu_facts(), "reduce_range": reduce_range,
    }
    if cfg.latency.enabled:
        for batch in (1, 32):
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            metrics[f"fp32_latency_ms_cpu_b{batch}"] = measure_latency(fp32_model, x, cfg.latency.warmup,
                                                                       cfg.latency.iters)
            if package:  # the int8 number is the shipped file's; the eager q/dq graph is a simulation
                metrics[f"latency_ms_cpu_b{batch}"] = measure_latency(int8_model, x, cfg.latency.warmup,
                                                                      cfg.latency.iters)
    if teacher is not None:  # feature agreement of the tuned backbone with the teacher (as distill)
        feats = [extract_features(net.to(device), splits.val.images, splits.mean, splits.std, size, device,
                                  cfg.eval.feature_batch_size, engine.use_bf16(cfg.engine, device))
                 for net in (tuned.backbone, teacher.backbone)]
        metrics["cka_teacher"] = linear_cka(*feats)
        tuned.cpu()

    # ============ final artifact: tuned fp32 weights (model.pt), int8 file, metrics ============
    parents = [p for p in (cfg.source, cfg.teacher, cfg.teacher_head) if p]
    meta = {"stage": STAGE, "name": cfg.name, "data": cfg.data.name, "num_classes": splits.num_classes,
            "image_size": size, "mean": list(splits.mean), "std": list(splits.std), "parents": parents,
            "int8_package": pt2e.PACKAGE_NAME if package else None, "backend": cfg.quant.backend}
    ckpt.save_model(run_dir, tuned.backbone, source.spec, meta, tuned.head)
    ckpt.write_json(run_dir / "metrics.json", metrics)
    tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.finish()
    log_line(f"quant: done -> {run_dir}  int8 top-1 {int8_acc[1]:.4f} (fp32 {fp32_acc[1]:.4f})"
             + (f"  {metrics['file_mb']:.1f} MB vs {metrics['fp32_file_mb']:.1f} MB" if package else "")
             + f"  [{describe(metrics['cpu'])}, activations {'0..127' if reduce_range else '0..255'}]")
    return run_dir
