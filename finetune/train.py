"""Fine-tuning evaluation of any backbone artifact: backbone + linear head trained with labels,
with all of them or a class-balanced 1% / 10% (SimCLR's semi-supervised protocol, which BYOL
reports on). Beside the linear probe and kNN, it answers whether a compressed backbone still
fine-tunes as well as it probes.

    python -m finetune configs/finetune/cifar10.yaml artifact=runs/distill/cifar10-r50-to-r18
    python -m finetune configs/finetune/cifar10.yaml artifact=runs/prune/cifar10-r18-p50 labels_fraction=0.1
    python -m finetune configs/finetune/cifar10.yaml artifact=runs/byol/cifar10-r50 labels_fraction=0.01 train.epochs=60
    python -m finetune configs/finetune/cifar10.yaml artifact=runs/quant/cifar10-r18-p50-int8   # int8: evaluated only

On the digits quickstart (no config file: overrides alone; `configs/quickstart.yaml` works the
same way once it has a `stages.finetune` section):

    python -m finetune artifact=runs/byol/quickstart labels_fraction=0.1 data.name=digits data.image_size=16 \
        data.val_fraction=0.2 train.batch_size=48 aug.flip_p=0 aug.crop_scale_min=0.8 eval.knn_k=20 engine.device=cpu

(a flip or a tight crop changes a digit's class); README, "Evaluation", has what it measured.

In the order the work happens:
1. Inputs: the artifact's model.pt (any stage's backbone, pruned ones rebuilt from their spec),
   the labelled subset (`core.data.balanced_subset` of the training split, by `labels_seed`:
   the same labels for every artifact and training seed, as SimCLR's fixed splits).
2. Head: zeros (default), or a linear probe fitted on the labelled subset's frozen features
   (`head_init=probe`, LP-FT; why zeros is the default: Config.head_init). Never the artifact's
   own probe head: that one saw every training label, which a 1% run must not. Both the head
   and a linear probe on the same labels (the "probes" side of the question) are computed once
   and written to checkpoint.pt at step 0; from there on the model always comes from the
   checkpoint, so a resumed job starts identically.
3. One loop: cross-entropy on one crop + flip view per image, backbone (BatchNorm in train
   mode) and head both trained, cosine lr, checkpoint every epoch and on SIGTERM/SIGUSR2.
4. Final: BatchNorm statistics re-estimated (Config.precise_bn), val top-1/top-5 of the
   fine-tuned classifier beside the linear probe's on the same labels, kNN top-1 of the
   fine-tuned backbone with the labelled subset as its bank; model.pt keeps the source's spec,
   so a pruned architecture stays pruned.

An int8 artifact (runs/quant/N whose model.pt names an `int8_package`) cannot be trained: its
exported `model_int8.pt2` is evaluated as it ships (val top-1/top-5 through the package, with
the mean/std/size stored in it), and metrics.json says `trained: false`.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from core import checkpoint as ckpt
from core import data as datalib
from core import engine
from core import int8
from core import rundir
from core.cpu import cpu_facts, describe
from core.augment import AugmentConfig, eval_view, one_view, supervised_aug
from core.config import StageConfig, TrainConfig, choice, to_dict, to_yaml
from core.errors import UserError
from core.evaluate import (evaluate_backbone, extract_features, predict, probe_accuracy, topk_accuracy,
                           train_linear_probe)
from core.models import Classifier, count_macs, count_params, feature_dim
from core.loop import Run, write_metrics
from core.optim import build_optimizer
from core.track import Tracker, log_line

STAGE = "finetune"


def default_train() -> TrainConfig:
    # SimCLR's fine-tuning recipe (Chen et al. 2020, Appendix B.5), the protocol behind BYOL's
    # semi-supervised numbers: SGD with Nesterov momentum 0.9, lr 0.05 per 256 images, no warmup,
    # no weight decay, crop + flip only. 30 epochs; SimCLRv2 (Chen et al. 2020b) uses 60 with 1%.
    return TrainConfig(epochs=30, batch_size=256, optimizer="sgd", lr=0.05, weight_decay=0.0,
                       momentum=0.9, nesterov=True, warmup_epochs=0.0)


@dataclass
class Config(StageConfig):
    artifact: str = ""  # any backbone artifact dir (runs/byol/N, distill, prune, quant: int8 evaluated only)
    labels_fraction: float = 1.0  # class-balanced share of the training labels; the protocol's: 1.0, 0.1, 0.01
    labels_seed: int = 0  # picks the labelled subset; apart from `seed`, so every run sees the same labels
    # zero: a zero-initialised head (the backbone gets no gradient until the head has moved).
    # probe: a linear probe fitted on the labelled subset's frozen features (LP-FT, Kumar et al.
    # 2022). zero by default: a probe fitted to near-zero loss on few clean images is overconfident
    # on augmented views, and its large first gradients damaged the features on digits.
    head_init: str = choice("zero", "zero", "probe")
    # Re-estimate BatchNorm's running statistics with the final weights on the labelled images
    # before evaluating (PreciseBN, Wu & Johnson 2021): a short fine-tune's EMA (momentum 0.1)
    # lags weights that moved.
    precise_bn: bool = True
    train: TrainConfig = field(default_factory=default_train)
    aug: AugmentConfig = field(default_factory=supervised_aug)  # crop + flip


# ----------------------------------------------------------------------------- inputs


def check_config(cfg: Config) -> None:
    """Every mistake the config alone can hold, found before anything is loaded."""
    if not cfg.artifact:
        raise UserError("finetune needs artifact=DIR (a stage's artifact directory with model.pt, "
                        "e.g. runs/distill/N)")
    datalib.check_labels_fraction(cfg.labels_fraction)
    for key, value in (("train.epochs", cfg.train.epochs), ("train.batch_size", cfg.train.batch_size)):
        if value < 1:
            raise UserError(f"bad value for '{key}': {value}; expected >= 1")
    if cfg.train.lr < 0:
        raise UserError(f"bad value for 'train.lr': {cfg.train.lr}; expected >= 0")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("finetune runs in one process; set launch.tasks_per_node=1 and launch.nodes=1")


def run_name(cfg: Config) -> str:
    """cfg.name, or <stage>-<name>-<percent>pct of the artifact (runs/prune/r18 -> prune-r18-10pct)."""
    if cfg.name != "default":
        return cfg.name
    return "-".join(Path(cfg.artifact).parts[-2:] + (f"{cfg.labels_fraction * 100:.10g}pct",))


def check_data(cfg: Config, art: ckpt.Artifact, splits) -> None:
    """A backbone fine-tunes on any data (its head is new); only say so when it differs."""
    if not isinstance(splits.train, datalib.ImageSet):
        raise UserError("finetune needs the images in memory (data.in_memory=true), as the probe and kNN do")
    for key, ours in (("data", cfg.data.name), ("num_classes", splits.num_classes), ("image_size", splits.image_size)):
        if art.meta.get(key) not in (None, ours):
            log_line(f"finetune: note: {cfg.artifact} was trained with {key}={art.meta[key]}, this run uses {ours}")


def labels_digest(index: torch.Tensor) -> str:
    """Short fingerprint of the labelled subset, so two runs can be shown to share their labels."""
    return hashlib.sha1(index.numpy().astype(np.int64).tobytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------- helpers


def val_accuracy(model: nn.Module, splits, device, batch_size: int, bf16: bool = False, test: bool = False) -> dict:
    """finetune_top1/top5 on val; with test=True also test_finetune_* where a test split exists."""
    was_training = model.training
    parts = {"": splits.val, **({"test_": splits.test} if test and splits.test is not None else {})}
    out = {}
    for prefix, part in parts.items():
        logits = predict(model.eval(), part.images, splits.mean, splits.std, splits.image_size, device, batch_size,
                         bf16)
        acc = topk_accuracy(logits, part.labels.cpu())
        out.update({f"{prefix}finetune_top1": acc[1], f"{prefix}finetune_top5": acc[5]})
    model.train(was_training)
    return out


def initial_head(backbone: nn.Module, labelled: datalib.ImageSet, splits, cfg: Config, device,
                 bf16: bool) -> tuple[nn.Linear, dict]:
    """(the head fine-tuning starts from, the val accuracy of a linear probe on the same labels)."""
    def features(images):
        return extract_features(backbone, images, splits.mean, splits.std, splits.image_size, device,
                                cfg.eval.feature_batch_size, bf16)

    e = cfg.eval
    probe = train_linear_probe(features(labelled.images), labelled.labels.cpu(), splits.num_classes, e.probe_epochs,
                               e.probe_lr, e.probe_weight_decay, e.probe_batch_size, cfg.seed, device)
    report = {f"subset_{k}": v for k, v in probe_accuracy(probe, features(splits.val.images),
                                                          splits.val.labels.cpu()).items()}
    if cfg.head_init == "probe":
        return probe, report
    head = nn.Linear(feature_dim(backbone), splits.num_classes)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    return head, report


# ----------------------------------------------------------------------------- int8: evaluated as exported


def evaluate_int8(cfg: Config, art: ckpt.Artifact, package: Path, splits, r: Run) -> Path:
    """Val top-1/top-5 of the shipped int8 file, with the preprocessing stored in it; no training."""
    model = int8.PackagedModel(package)
    int8.preprocessing(model, splits)  # a class-count mismatch stops here, before anything is written
    if cfg.labels_fraction != 1.0:
        log_line(f"finetune: note: {package.name} is int8 and cannot be fine-tuned; "
                 f"labels_fraction={cfg.labels_fraction} does not apply")
    run_dir = r.dir
    r.claim()  # the folder's lock, and what overwrite/resume=force asked for
    ckpt.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    tracker = Tracker(cfg.track, run_dir, f"{STAGE}/{run_dir.name}", to_dict(cfg))

    start = time.perf_counter()
    acc = int8.package_accuracy(model, splits.val.images, splits.val.labels, splits, cfg.eval.feature_batch_size)
    size = int8.preprocessing(model, splits)[2]
    metrics = {
        "finetune_top1": acc[1], "finetune_top5": acc[5],
        "stage": STAGE, "trained": False, "evaluated": "int8 as exported", "package": str(package),
        "source": cfg.artifact, "source_stage": art.meta.get("stage"), "arch": art.spec.get("arch"),
        "labels_fraction": cfg.labels_fraction, "n_labeled": 0, "cpu": cpu_facts(),
        "params": count_params(art.backbone), "macs": count_macs(art.backbone, size),
        "file_mb": package.stat().st_size / 2**20, "seconds": time.perf_counter() - start,
    }
    if splits.test is not None:
        acc = int8.package_accuracy(model, splits.test.images, splits.test.labels, splits, cfg.eval.feature_batch_size)
        metrics.update(test_finetune_top1=acc[1], test_finetune_top5=acc[5], test_split=splits.test_name)
    write_metrics(run_dir, metrics, tracker)
    log_line(f"finetune: {cfg.artifact} is int8: evaluated as exported, top-1 {metrics['finetune_top1']:.4f}"
             f"  top-5 {metrics['finetune_top5']:.4f} on {describe(metrics['cpu'])} -> {run_dir}")
    rundir.release(run_dir)
    return run_dir


# ----------------------------------------------------------------------------- the stage


def run(cfg: Config) -> Path:
    # ============ inputs: every config or artifact problem stops here, before any work ============
    check_config(cfg)
    source = Path(cfg.artifact)
    name = run_name(cfg)
    r = Run(cfg, STAGE, name)  # a folder holding a fine-tune of another source or fraction is refused here
    if r.done:
        return r.dir
    art = ckpt.load_model(source, "artifact")
    package = int8.package_of(art, source)
    if package is not None:  # int8: evaluated as it ships, no training
        splits = datalib.load_splits(cfg.data)
        check_data(cfg, art, splits)
        return evaluate_int8(cfg, art, package, splits, r)

    # ============ the labelled subset: a pure function of (training split, fraction, labels_seed) ============
    splits = datalib.load_splits(cfg.data)
    check_data(cfg, art, splits)
    subset = datalib.balanced_subset(splits.train.labels, cfg.labels_fraction, cfg.labels_seed)
    if r.state is not None and not torch.equal(r.state["subset"], subset):
        raise UserError(f"{r.dir}/checkpoint.pt was trained on another labelled subset (data or labels_seed "
                        f"changed); rerun with the original config or remove it")
    labelled = splits.train.subset(subset)
    batch_size = min(cfg.train.batch_size, len(subset))
    if batch_size < cfg.train.batch_size:
        log_line(f"finetune: note: {len(subset)} labelled images < train.batch_size={cfg.train.batch_size}; "
                 f"batches of {batch_size} (the lr scales with it)")
    r.start(train=labelled, batch_size=batch_size)
    device, size = r.device, splits.image_size

    # ============ network: the artifact's architecture (pruned ones too) + linear head ============
    head = nn.Linear(feature_dim(art.backbone), splits.num_classes)
    if r.state is None:  # the head once, written at step 0; afterwards the model comes from checkpoint.pt
        head, report = initial_head(art.backbone.to(device), labelled, splits, cfg, device, r.bf16)
        report.update({"n_labeled": len(subset), "labels_sha1": labels_digest(subset)})
        log_line(f"finetune: {len(subset)} labelled images ({cfg.labels_fraction:g} of {len(splits.train)}); "
                 f"linear probe on them: val top-1 {report['subset_probe_top1']:.4f}")
    else:
        report = r.state["report"]
    r.extra.update({"subset": subset, "source": cfg.artifact, "labels_fraction": cfg.labels_fraction, "report": report})
    model = engine.prepare_module(Classifier(art.backbone, head), cfg.engine, device)
    model_fwd = engine.maybe_compile(model, cfg.engine, device)
    optimizer = build_optimizer(cfg.train, model.parameters(), r.base_lr())
    r.resume(model=model)
    if r.step > 0:
        r.resume(optimizer=optimizer)
    else:
        r.register(optimizer=optimizer)
        r.save()

    def val_monitor() -> dict:  # at the monitor cadence every stage shares (eval.knn_every_epochs)
        return {"val_top1": val_accuracy(model, splits, device, cfg.eval.feature_batch_size, r.bf16)["finetune_top1"]}

    # ============ training loop: cross-entropy on one augmented view, everything trains ============
    model.train()  # BatchNorm too: full fine-tuning adapts its statistics to the labelled views
    for s in r.steps(optimizer, monitor=val_monitor):
        x = one_view(s.images, size, cfg.aug, s.generator, splits.mean, splits.std)
        if device.type == "cuda" and cfg.engine.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with engine.autocast(cfg.engine, device):
            logits = model_fwd(x)
        loss = F.cross_entropy(logits.float(), s.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        r.record(loss)
    if r.paused():
        return r.dir

    # ============ final: the fine-tuned classifier on val, kNN of its backbone, model.pt ============
    if cfg.precise_bn:  # running statistics := their plain average over full batches of clean views
        full = labelled.images[: len(labelled) - len(labelled) % batch_size]
        update_bn((eval_view(chunk.to(device), size, splits.mean, splits.std) for chunk in full.split(batch_size)),
                  model.backbone)
    metrics = val_accuracy(model, splits, device, cfg.eval.feature_batch_size, r.bf16, test=True)
    # kNN with only the labels this run saw as its bank (with all labels: the usual kNN monitor).
    knn, _ = evaluate_backbone(model.backbone, replace(splits, train=labelled), cfg.eval, device, r.bf16, probe=False)
    metrics.update({
        **knn, **report, "trained": True, "evaluated": "fine-tuned fp32",
        "source": cfg.artifact, "source_stage": art.meta.get("stage"), "arch": art.spec.get("arch"),
        "labels_fraction": cfg.labels_fraction, "labels_seed": cfg.labels_seed, "head_init": cfg.head_init,
        "precise_bn": cfg.precise_bn, "params": count_params(model.backbone), "macs": count_macs(model.backbone, size),
        "batch_size": batch_size,
    })
    return r.finish(model.backbone, art.spec, model.head, metrics, parents=(cfg.artifact,),
                    meta={"labels_fraction": cfg.labels_fraction, "n_labeled": len(subset)},
                    summary=f"  fine-tuned top-1 {metrics['finetune_top1']:.4f} (linear probe on the same "
                            f"{len(subset)} labels {report['subset_probe_top1']:.4f})")
