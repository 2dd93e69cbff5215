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
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from core import checkpoint as ckpt
from core import engine
from core import int8
from core import data as datalib
from core import onnx_export
from core.augment import AugmentConfig, eval_view, one_view, supervised_aug
from core.config import StageConfig, TrainConfig, choice
from core.cpu import cpu_facts, describe, int8_has_vnni
from core.distill import LOSSES, DistillLossConfig, kd_loss, load_teacher
from core.errors import UserError
from core.evaluate import (assert_unchanged, features_cka, knn_top1, predict, snapshot, topk_accuracy,
                           train_linear_probe)
from core.latency import LatencyConfig, measure_latency
from core.loop import Run
from core.models import Classifier, backbone_from_spec, count_macs, count_params, feature_dim
from core.optim import build_optimizer
from core.track import log_line
from quant import pt2e

STAGE = "quant"
ONNX_NAME = "model_int8.onnx"


@dataclass
class QuantConfig:
    backend: str = choice("x86", "x86")  # oneDNN int8 kernels (x86 CPUs); see pt2e.QUANTIZERS
    # qat: fake-quant training, then conversion. ptq: the same PT2E flow without training (the
    # baseline every QAT number is read against): observers calibrated on `calib_batches` batches
    # of train.batch_size training images (eval view, no augmentation), converted, packaged and
    # measured like QAT; the source's head is kept (refit_head is QAT's), as ONNX Runtime's
    # quantize_static keeps it.
    mode: str = choice("qat", "qat", "ptq")
    calib_batches: int = 8
    # model_int8.onnx beside the .pt2 (QDQ, dynamic batch; core/onnx_export.py), evaluated with
    # ONNX Runtime. auto: when the onnx extra is installed and activations are full-range (ONNX's
    # QuantizeLinear cannot clamp at 127); true: required, else an error before any work.
    onnx: str = choice("auto", "auto", "true", "false")
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
    # protocol of every stage's probe_top1), then quantised with them: the QAT-tuned head scored
    # lower in every comparison so far (README, "int8 QAT on CIFAR-10 at CPU scale", from
    # bench/qat_cifar_cpu.sh). false: keep the QAT-tuned head.
    refit_head: bool = True


def default_train() -> TrainConfig:
    # A short, gentle fine-tune: the model is trained already; QAT only adapts it to int8, and
    # with BN frozen late a larger lr (0.01 per 256) diverged on the quickstart.
    return TrainConfig(epochs=8, batch_size=256, optimizer="sgd", lr=0.001, weight_decay=5e-5,
                       momentum=0.9, warmup_epochs=0.0)


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
    aug: AugmentConfig = field(default_factory=supervised_aug)  # crop + flip
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
    if cfg.quant.onnx == "true":
        onnx_export.require("quant.onnx=true")
    if cfg.quant.mode == "ptq":  # no training: no loss, the teacher only for CKA
        if cfg.quant.calib_batches < 1:
            raise UserError(f"quant.mode=ptq needs quant.calib_batches >= 1, got {cfg.quant.calib_batches}")
        return
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


def resolve_reduce_range(setting: str) -> bool:
    return int8_has_vnni() is False if setting == "auto" else setting == "true"


def apply_freezes(prepared: torch.fx.GraphModule, epoch: int, cfg: QuantConfig, scale: float = 1.0) -> None:
    """The freeze schedule as a function of the epoch (idempotent), so resume needs no flag.
    scale: planned epochs / train.epochs (a time budget keeps the freezes at the same fractions)."""
    if epoch >= round(cfg.freeze_bn_epoch * scale):
        pt2e.freeze_bn_stats(prepared)
    if epoch >= round(cfg.freeze_observers_epoch * scale):
        pt2e.freeze_observers(prepared)


def build_prepared(source: ckpt.Artifact, image_size: int, backend: str, device: torch.device,
                   reduce_range: bool = False, mode: str = "qat") -> torch.fx.GraphModule:
    """A copy of the source classifier with one ReLU per call site, exported and prepared for QAT
    (or, mode="ptq", in eval mode with observers for calibration).

    Deterministic: the same source and image size give the same graph and state_dict keys, so a
    checkpoint's `model` state loads strictly into a new one (resume, conversion on the CPU).
    """
    model = pt2e.split_relus(copy.deepcopy(Classifier(source.backbone, source.head))).to(device)
    prepare = pt2e.prepare_qat if mode == "qat" else pt2e.prepare_ptq
    return prepare(model, torch.zeros(2, 3, image_size, image_size, device=device), backend, reduce_range)


def fp32_weights(state: dict, source: ckpt.Artifact) -> Classifier:
    """The QAT-tuned float weights as an ordinary fp32 classifier of the source's architecture
    (the prepared graph keeps the original parameter names; fake-quant buffers are left out)."""
    model = Classifier(backbone_from_spec(source.spec), nn.Linear(source.head.in_features, source.head.out_features))
    model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True)
    return model.eval()


def int8_knn(features, train_features: torch.Tensor, splits, cfg: Config, device: torch.device) -> dict:
    """kNN top-1 of the int8 model's features (bank: the train split's `train_features`) on val and,
    where data.test configures one, on the test split (measured only)."""
    out = {}
    for prefix, part in (("", splits.val), ("test_", splits.test)):
        if part is not None:
            out[f"{prefix}knn_top1"] = knn_top1(
                train_features, splits.train.labels.cpu(),
                predict(features, part.images, splits.mean, splits.std, splits.image_size, device),
                part.labels.cpu(), splits.num_classes, cfg.eval.knn_k, cfg.eval.knn_temperature)
    return out


def convert_int8(prepared: torch.fx.GraphModule, source: ckpt.Artifact, splits, cfg: Config, reduce_range: bool,
                 device: torch.device) -> tuple:
    """BN and observers frozen; the int8 model's own (fake-quantised) features computed where it
    trained, for its kNN top-1 and the head refitted on them (quant.refit_head); then real int8
    ops on the CPU (int8 kernels are CPU kernels). Returns (int8 graph, the prepared graph's
    final state on the CPU, report)."""
    cpu, size, labels = torch.device("cpu"), splits.image_size, splits.val.labels.cpu()
    pt2e.freeze_observers(prepared)
    pt2e.freeze_bn_stats(prepared)
    report = {"qat_head_top1": topk_accuracy(predict(prepared, splits.val.images, splits.mean, splits.std, size,
                                                     device), labels)[1]}  # fake-quant, QAT-tuned source head
    features = pt2e.feature_extractor(prepared)  # the head's input: what conversion computes, in float
    train_features = predict(features, splits.train.images, splits.mean, splits.std, size, device)
    report.update(int8_knn(features, train_features, splits, cfg, device))
    state = {k: v.detach().cpu().clone() for k, v in prepared.state_dict().items()}
    if device.type != "cpu":  # the same graph rebuilt on the CPU (as on resume)
        prepared = build_prepared(source, size, cfg.quant.backend, cpu, reduce_range)
        prepared.load_state_dict(state, strict=True)
        pt2e.freeze_observers(prepared)
        pt2e.freeze_bn_stats(prepared)
    if cfg.quant.refit_head:
        # Standardised with std >= the features' int8 step: without that floor the CIFAR-10 check
        # (bench/qat_cifar_cpu.sh) fell from 0.47 to 0.19 top-1 (core.evaluate.train_linear_probe says why).
        head = train_linear_probe(train_features, splits.train.labels.cpu(), splits.num_classes, cfg.eval.probe_epochs,
                                  cfg.eval.probe_lr, cfg.eval.probe_weight_decay, cfg.eval.probe_batch_size, cfg.seed,
                                  min_std=pt2e.head_input_step(prepared))
        pt2e.replace_head(prepared, head)
        state.update({"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()})
    check_images = eval_view(splits.val.images[:64].cpu(), size, splits.mean, splits.std)
    with torch.no_grad():
        fake_quant_logits = prepared(check_images)
    int8_model = pt2e.convert(prepared)  # in place: `prepared` is the int8 graph from here on
    with torch.no_grad():
        report["int8_vs_fakequant_cosine"] = F.cosine_similarity(
            int8_model(check_images).flatten(), fake_quant_logits.flatten(), dim=0).item()
    return int8_model, state, report


def calibration_batches(cfg: Config, splits) -> Iterator[torch.Tensor]:
    """PTQ's calibration set: the first `quant.calib_batches` batches (train.batch_size) of epoch
    0's seeded order of the training split, eval view (no augmentation), as float batches.
    bench/int8_peers.py calibrates ONNX Runtime's quantize_static on exactly these."""
    if not isinstance(splits.train, datalib.ImageSet):
        raise UserError(f"quant.mode=ptq calibrates on in-memory images; data.name={cfg.data.name} streams JPEGs")
    order = datalib.epoch_permutation(len(splits.train), cfg.seed, 0)
    batches = datalib.in_memory_batches(splits.train, order, cfg.train.batch_size)
    for images, _ in itertools.islice(batches, cfg.quant.calib_batches):
        yield eval_view(images.cpu(), splits.image_size, splits.mean, splits.std)


def calibrate_and_convert(source: ckpt.Artifact, r: Run, cfg: Config, reduce_range: bool) -> tuple:
    """PTQ: calibration (`calibration_batches`), then the same conversion as QAT, on the CPU,
    with the source's head. Returns (int8 graph, the source's weights as state, report)."""
    cpu, splits, size = torch.device("cpu"), r.splits, r.splits.image_size
    prepared = build_prepared(source, size, cfg.quant.backend, cpu, reduce_range, mode="ptq")
    seen = pt2e.calibrate(prepared, calibration_batches(cfg, splits))
    log_line(f"quant: calibrated on {seen} training images ({cfg.quant.calib_batches} batches of "
             f"{cfg.train.batch_size} asked), no training")
    state = {k: v.detach().clone() for k, v in Classifier(source.backbone, source.head).state_dict().items()}
    int8_model = pt2e.convert(prepared)
    features = pt2e.feature_extractor(int8_model)  # the int8 model's own features, for its kNN top-1
    train_features = predict(features, splits.train.images, splits.mean, splits.std, size, cpu)
    return int8_model, state, {"qat_head_top1": None, "int8_vs_fakequant_cosine": None, "calib_images": seen,
                               **int8_knn(features, train_features, splits, cfg, cpu)}


def export(int8_model: torch.fx.GraphModule, cfg: Config, splits, run_dir: Path) -> Path:
    """One AOTInductor file that runs without this project, its preprocessing inside."""
    size, meta_strings = splits.image_size, package_metadata(cfg, splits)
    start = time.perf_counter()
    package = pt2e.export_package(int8_model, torch.zeros(2, 3, size, size), run_dir / pt2e.PACKAGE_NAME, meta_strings)
    log_line(f"quant: compiled {package} ({package.stat().st_size / 2**20:.1f} MB) in {time.perf_counter() - start:.0f} s")
    return package


def package_metadata(cfg: Config, splits) -> dict:
    """What travels inside both int8 files: the preprocessing and where the model came from."""
    return {"stage": STAGE, "name": cfg.name, "source": cfg.source, "data": cfg.data.name, "mode": cfg.quant.mode,
            "num_classes": splits.num_classes, "image_size": splits.image_size,
            "mean": json.dumps(list(splits.mean)), "std": json.dumps(list(splits.std)),
            "input": "float32 [B, 3, image_size, image_size], (pixels / 255 - mean) / std"}


def wants_onnx(cfg: Config, reduce_range: bool) -> bool:
    """quant.onnx resolved: true/false as given; auto when the extra is there and the range fits."""
    if cfg.quant.onnx == "false" or not cfg.quant.export:
        return False
    if cfg.quant.onnx == "true":
        return True
    if not onnx_export.available():
        log_line(f"quant: no model_int8.onnx (quant.onnx=auto, the onnx extra is not installed: {onnx_export.EXTRA_HINT})")
        return False
    if reduce_range:
        log_line("quant: no model_int8.onnx (quant.onnx=auto): 7-bit activations do not survive ONNX's QuantizeLinear")
        return False
    return True


# metrics.json's ONNX keys, None where no model_int8.onnx was written (the same keys either way).
NO_ONNX = {k: None for k in ("onnx_file", "onnx_top1", "onnx_top5", "onnx_file_mb", "onnx_vs_pt2_max_abs_diff",
                             "onnx_vs_pt2_logit_scale", "onnx_vs_pt2_top1_agreement", "onnx_latency_ms_cpu_b1",
                             "onnx_latency_ms_cpu_b32", "onnx_qdq")}


def export_and_check_onnx(int8_model: torch.fx.GraphModule, package_model, cfg: Config, splits, run_dir: Path,
                          reduce_range: bool) -> dict:
    """model_int8.onnx from the converted graph, run by ONNX Runtime on the val split beside the
    .pt2: its top-1/top-5, how far its logits are from the package's, its latency and size."""
    size, labels = splits.image_size, splits.val.labels.cpu()
    start = time.perf_counter()
    path = onnx_export.export_int8(int8_model, torch.zeros(2, 3, size, size), run_dir / ONNX_NAME, reduce_range,
                                   package_metadata(cfg, splits))
    log_line(f"quant: exported {path} ({path.stat().st_size / 2**20:.1f} MB) in {time.perf_counter() - start:.0f} s")
    ort_model = onnx_export.OnnxModel(path)
    cpu = torch.device("cpu")
    ort_logits = predict(ort_model, splits.val.images, splits.mean, splits.std, size, cpu)
    pt2_logits = predict(package_model, splits.val.images, splits.mean, splits.std, size, cpu)
    acc = topk_accuracy(ort_logits, labels)
    out = {**NO_ONNX, "onnx_file": path.name, "onnx_top1": acc[1], "onnx_top5": acc[5],
           "onnx_file_mb": path.stat().st_size / 2**20,
           "onnx_vs_pt2_max_abs_diff": (ort_logits - pt2_logits).abs().max().item(),
           "onnx_vs_pt2_logit_scale": pt2_logits.abs().max().item(),
           "onnx_vs_pt2_top1_agreement": ort_logits.argmax(1).eq(pt2_logits.argmax(1)).float().mean().item(),
           "onnx_qdq": onnx_export.qdq_counts(path)}
    log_line(f"quant: {path.name} in ONNX Runtime: top-1 {acc[1]:.4f} (the .pt2: "
             f"{topk_accuracy(pt2_logits, labels)[1]:.4f}), same class for {out['onnx_vs_pt2_top1_agreement']:.1%} "
             f"of images, logits within {out['onnx_vs_pt2_max_abs_diff']:.3g} of {out['onnx_vs_pt2_logit_scale']:.3g}")
    if cfg.latency.enabled:
        for batch in (1, 32):
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            out[f"onnx_latency_ms_cpu_b{batch}"] = measure_latency(ort_model, x, cfg.latency.warmup, cfg.latency.iters)
    return out


def measure(int8_model, fp32_model: Classifier, splits, cfg: Config, device: torch.device, package) -> dict:
    """On the CPU: top-1/top-5 of the int8 model (its own head) and of the fp32 source; latency."""
    cpu, size = torch.device("cpu"), splits.image_size
    out = {"latency_ms_cpu_b1": None, "latency_ms_cpu_b32": None, "latency_ms_gpu_b256": None,
           "fp32_latency_ms_cpu_b1": None, "fp32_latency_ms_cpu_b32": None,
           "latency_cpu_threads": torch.get_num_threads()}
    # val, and the test split where data.test configures one (measured, never used to decide)
    for prefix, part in (("", splits.val), ("test_", splits.test)):
        if part is None:
            continue
        labels = part.labels.cpu()
        int8_acc = topk_accuracy(predict(int8_model, part.images, splits.mean, splits.std, size, cpu), labels)
        fp32_acc = topk_accuracy(predict(fp32_model.to(device), part.images, splits.mean, splits.std, size, device),
                                 labels)
        fp32_model.cpu()
        out.update({f"{prefix}probe_top1": int8_acc[1], f"{prefix}probe_top5": int8_acc[5],
                    f"{prefix}fp32_top1": fp32_acc[1], f"{prefix}fp32_top5": fp32_acc[5]})
    out["top1_drop"] = out["fp32_top1"] - out["probe_top1"]
    if cfg.latency.enabled:
        for batch in (1, 32):
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            out[f"onnx_latency_ms_cpu_b{batch}"] = measure_latency(ort_model, x, cfg.latency.warmup, cfg.latency.iters)
    return out


def measure(int8_model, fp32_model: Classifier, splits, cfg: Config, device: torch.device, package) -> dict:
    """On the CPU: top-1/top-5 of the int8 model (its own head) and of the fp32 source; latency."""
    cpu, size, labels = torch.device("cpu"), splits.image_size, splits.val.labels.cpu()
    int8_acc = topk_accuracy(predict(int8_model, splits.val.images, splits.mean, splits.std, size, cpu), labels)
    fp32_acc = topk_accuracy(predict(fp32_model.to(device), splits.val.images, splits.mean, splits.std, size, device),
                             labels)
    fp32_model.cpu()
    out = {"probe_top1": int8_acc[1], "probe_top5": int8_acc[5], "fp32_top1": fp32_acc[1], "fp32_top5": fp32_acc[5],
           "top1_drop": fp32_acc[1] - int8_acc[1], "latency_ms_cpu_b1": None, "latency_ms_cpu_b32": None,
           "latency_ms_gpu_b256": None, "fp32_latency_ms_cpu_b1": None, "fp32_latency_ms_cpu_b32": None,
           "latency_cpu_threads": torch.get_num_threads()}
    if splits.test is not None:  # the same two models on the test split (data.test): measured, never used
        test_labels = splits.test.labels.cpu()
        int8_test = topk_accuracy(predict(int8_model, splits.test.images, splits.mean, splits.std, size, cpu),
                                  test_labels)
        fp32_test = topk_accuracy(predict(fp32_model.to(device), splits.test.images, splits.mean, splits.std, size,
                                          device), test_labels)
        fp32_model.cpu()
        out.update(test_probe_top1=int8_test[1], test_probe_top5=int8_test[5], test_fp32_top1=fp32_test[1],
                   test_fp32_top5=fp32_test[5])
    if cfg.latency.enabled:
        for batch in (1, 32):
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            out[f"fp32_latency_ms_cpu_b{batch}"] = measure_latency(fp32_model, x, cfg.latency.warmup, cfg.latency.iters)
            if package:  # the int8 number is the shipped file's; the eager q/dq graph is a simulation
                out[f"latency_ms_cpu_b{batch}"] = measure_latency(int8_model, x, cfg.latency.warmup, cfg.latency.iters)
    return out


# ----------------------------------------------------------------------------- the stage


def run(cfg: Config) -> Path:
    r = Run(cfg, STAGE)
    if r.done:
        return r.dir

    # ============ inputs: every config or artifact problem stops here, before any work ============
    check_config(cfg)
    source = load_source(cfg.source)
    # The teacher trains (loss.kd) and/or is measured against (CKA of the tuned backbone).
    qat = cfg.quant.mode == "qat"
    teacher = load_teacher(cfg.teacher, cfg.teacher_head, need_head=qat and cfg.loss.kd > 0) if cfg.teacher else None

    # ============ device, seed, data (uint8 images resident on the device) ============
    r.start(epochs=None if qat else 0)  # PTQ: no training steps
    device, splits, size = r.device, r.splits, r.splits.image_size
    for what, head in (("source", source.head), ("teacher", teacher.head if teacher else None)):
        if head is not None and head.out_features != splits.num_classes:
            raise UserError(f"the {what}'s probe head has {head.out_features} classes, "
                            f"data.name={cfg.data.name} has {splits.num_classes}")

    # ============ networks: fake-quant classifier (PT2E), frozen teacher ============
    reduce_range = r.state["reduce_range"] if r.state else resolve_reduce_range(cfg.quant.reduce_range)
    r.extra["reduce_range"] = reduce_range  # a resumed run keeps the range it trained with
    if cfg.quant.onnx == "true" and reduce_range:  # before any work, not after training
        raise UserError("quant.onnx=true needs full-range activations (quant.reduce_range=false): ONNX's "
                        "QuantizeLinear has no quant_max, so 7-bit activations would lose their clamp")
    if not qat:  # PTQ: calibrate, convert, then the same packaging and measurement as QAT
        int8_model, state, report = calibrate_and_convert(source, r, cfg, reduce_range)
        return finish(r, cfg, source, teacher, int8_model, state, report, reduce_range)
    prepared = build_prepared(source, size, cfg.quant.backend, device, reduce_range)
    teacher_net = None
    if cfg.loss.kd > 0:
        teacher_net = Classifier(teacher.backbone, teacher.head).to(device).eval()
        teacher_frozen = snapshot(teacher_net)

    # ============ optimizer, resume: the prepared graph's state_dict (weights + fake-quant buffers) ============
    optimizer = build_optimizer(cfg.train, prepared.parameters(), r.base_lr())
    r.resume(model=prepared, optimizer=optimizer)  # the loop re-applies the freezes

    # ============ training loop: fake-quant forward, distillation from the teacher's logits ============
    frozen_at = None
    # What the end costs, for a time budget: conversion, the int8 features, the package's compile
    # (11 s for a ResNet-18 on the 2-core CPU here) and its evaluation and latency on the CPU.
    # 30 s left the CPU rehearsal of the budgeted CIFAR-10 pipeline 22 s over its share.
    for s in r.steps(optimizer, final_s=50.0 if cfg.quant.export else 20.0):
        if s.epoch != frozen_at:
            apply_freezes(prepared, s.epoch, cfg.quant, r.epochs / max(1, cfg.train.epochs))
            frozen_at = s.epoch
        x = one_view(s.images, size, cfg.aug, s.generator, splits.mean, splits.std)
        logits = prepared(x)  # fp32: fake-quant under bf16 autocast would round twice
        parts = {}
        if cfg.loss.kd > 0:
            with torch.no_grad(), engine.autocast(cfg.engine, device):
                teacher_logits = teacher_net(x).float()
            parts["kd"] = kd_loss(logits, teacher_logits, cfg.loss.kd_kind, cfg.loss.kd_temperature)
        if cfg.loss.ce > 0:
            parts["ce"] = F.cross_entropy(logits, s.labels)
        loss = sum(getattr(cfg.loss, name) * value for name, value in parts.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        r.record(loss, parts)
    if r.paused():
        return r.dir
    if teacher_net is not None:
        assert_unchanged(teacher_net, teacher_frozen, "the teacher")

    # ============ convert, export what ships, measure it against the fp32 source ============
    int8_model, state, report = convert_int8(prepared, source, splits, cfg, reduce_range, device)
    return finish(r, cfg, source, teacher, int8_model, state, report, reduce_range)


def finish(r: Run, cfg: Config, source: ckpt.Artifact, teacher, int8_model: torch.fx.GraphModule, state: dict,
           report: dict, reduce_range: bool) -> Path:
    """QAT's and PTQ's common end: the .pt2 (and .onnx), measured against the fp32 source, and
    the artifact: model.pt (the tuned fp32 weights; PTQ's are the source's), metrics.json."""
    device, splits, size = r.device, r.splits, r.splits.image_size
    package = export(int8_model, cfg, splits, r.dir) if cfg.quant.export else None
    onnx_metrics = dict(NO_ONNX)
    if package and wants_onnx(cfg, reduce_range):
        onnx_metrics = export_and_check_onnx(int8_model, int8.PackagedModel(package), cfg, splits, r.dir, reduce_range)
    if package:
        int8_model = int8.PackagedModel(package)  # evaluate what ships
    metrics = measure(int8_model, Classifier(source.backbone, source.head).eval(), splits, cfg, device, package)
    tuned = fp32_weights(state, source)
    if teacher is not None:  # feature agreement of the tuned backbone with the teacher (as distill)
        metrics["cka_teacher"] = features_cka(tuned.backbone, teacher.backbone, splits, device,
                                              cfg.eval.feature_batch_size, r.bf16)[0]
        tuned.cpu()
    metrics.update(report, **onnx_metrics, **{
        "mode": cfg.quant.mode, "calib_batches": cfg.quant.calib_batches if cfg.quant.mode == "ptq" else None,
        "arch": source.spec.get("arch"), "source": cfg.source, "source_stage": source.meta.get("stage"),
        "backend": cfg.quant.backend, "format": "aoti-pt2" if package else None,
        "head": "source" if cfg.quant.mode == "ptq" else "refit" if cfg.quant.refit_head else "qat",
        "params": count_params(source.backbone), "macs": count_macs(source.backbone, size),
        "file_mb": package.stat().st_size / 2**20 if package else None,
        "fp32_file_mb": source.path.stat().st_size / 2**20,
        # The int8 numbers hold for this CPU's kernels (core/cpu.py): `python -m probe ...
        # artifact=<this run>` re-measures the package on another machine against them.
        "cpu": cpu_facts(), "reduce_range": reduce_range,
    })
    # ============ final artifact: tuned fp32 weights (model.pt), int8 file, metrics ============
    return r.finish(tuned.backbone, source.spec, tuned.head, metrics, parents=(cfg.source, cfg.teacher, cfg.teacher_head),
                    meta={"int8_package": pt2e.PACKAGE_NAME if package else None, "backend": cfg.quant.backend,
                          "int8_onnx": onnx_metrics["onnx_file"], "quant_mode": cfg.quant.mode},
                    summary=f"  (int8 {cfg.quant.mode}; fp32 source {metrics['fp32_top1']:.4f})"
                    + (f"  {metrics['file_mb']:.1f} MB vs {metrics['fp32_file_mb']:.1f} MB" if package else "")
                    + f"  [{describe(metrics['cpu'])}, activations {'0..127' if reduce_range else '0..255'}]")
