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

(a flip or a tight crop changes a digit's class). Measured (2-core CPU, 1 thread, the BYOL
quickstart ResNet-50): val top-1 after fine-tuning / of a linear probe on the same labels:
1% (13 images) 0.31 / 0.36, 10% (144) 0.74 / 0.53, 100% (1,438) 0.96 / 0.77 (15 s, 37 s, 5 min).

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
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core import checkpoint as ckpt
from core import data as datalib
from core import engine
from core import int8
from core.cpu import cpu_facts, describe
from core.augment import AugmentConfig, augment_view, eval_view, normalize
from core.config import StageConfig, TrainConfig, choice, to_dict, to_yaml
from core.errors import UserError
from core.evaluate import evaluate_backbone, extract_features, probe_accuracy, topk_accuracy, train_linear_probe
from core.models import Classifier, count_macs, count_params, feature_dim
from core.track import Progress, Tracker, log_line
from core.optim import LARS, lr_schedule  # lightly's LARS update, foreach (no per-parameter loop or sync)

STAGE = "finetune"


def default_train() -> TrainConfig:
    # SimCLR's fine-tuning recipe (Chen et al. 2020, Appendix B.5), the protocol behind BYOL's
    # semi-supervised numbers: SGD with Nesterov momentum 0.9, lr 0.05 per 256 images, no warmup,
    # no weight decay, crop + flip only. 30 epochs; SimCLRv2 (Chen et al. 2020b) uses 60 with 1%.
    return TrainConfig(epochs=30, batch_size=256, optimizer="sgd", lr=0.05, weight_decay=0.0,
                       momentum=0.9, warmup_epochs=0.0)


def default_aug() -> AugmentConfig:
    # Supervised views: crop + flip; BYOL's colour, blur and solarize are off (as quant and prune).
    return AugmentConfig(crop_scale_min=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p1=0.0, blur_p2=0.0,
                         solarize_p1=0.0, solarize_p2=0.0)


@dataclass
class Config(StageConfig):
    artifact: str = ""  # any backbone artifact dir (runs/byol/N, distill, prune, quant: int8 evaluated only)
    labels_fraction: float = 1.0  # class-balanced share of the training labels; the protocol's: 1.0, 0.1, 0.01
    labels_seed: int = 0  # picks the labelled subset; apart from `seed`, so every run sees the same labels
    # zero: a zero-initialised head (the backbone gets no gradient until the head has moved).
    # probe: a linear probe fitted on the labelled subset's frozen features (LP-FT, Kumar et al.
    # 2022). Measured on digits (10% labels, 10 epochs): zero 0.63 vs probe 0.49 top-1 from the
    # BYOL quickstart ResNet-50, 0.91 vs 0.84 from a random-init ResNet-18: the probe, fitted to
    # near-zero loss on few clean images, is overconfident on augmented views, and its large
    # first gradients damage the features it was meant to protect.
    head_init: str = choice("zero", "zero", "probe")
    # Re-estimate BatchNorm's running statistics with the final weights on the labelled images
    # before evaluating (PreciseBN, Wu & Johnson 2021). A short fine-tune leaves them stale: its
    # EMA (momentum 0.1) lags weights that moved. Measured on digits (10% labels, 20 steps,
    # random-init ResNet-18): val top-1 0.11 with the EMA statistics, 0.84 re-estimated.
    precise_bn: bool = True
    train: TrainConfig = field(default_factory=default_train)
    aug: AugmentConfig = field(default_factory=default_aug)


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


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float):
    # No weight decay on BatchNorm and bias parameters (the vectors), as in every stage here.
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":  # Nesterov, as SimCLR's fine-tuning (it needs momentum > 0)
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


@torch.no_grad()
def predict(model, images: torch.Tensor, mean, std, image_size: int, device: torch.device,
            batch_size: int = 512, bf16: bool = False) -> torch.Tensor:
    """Logits [N, C] (float32, CPU) of uint8 images, no augmentation; eval mode for modules."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    out = []
    for chunk in images.split(batch_size):
        x = eval_view(chunk.to(device), image_size, mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float().cpu())
    if isinstance(model, nn.Module):
        model.train(was_training)
    return torch.cat(out)


def val_accuracy(model, splits, device, batch_size: int, bf16: bool = False, mean=None, std=None,
                 image_size: int | None = None) -> dict:
    logits = predict(model, splits.val.images, mean or splits.mean, std or splits.std,
                     image_size or splits.image_size, device, batch_size, bf16)
    acc = topk_accuracy(logits, splits.val.labels.cpu())
    return {"finetune_top1": acc[1], "finetune_top5": acc[5]}


@torch.no_grad()
def precise_bn(backbone: nn.Module, images: torch.Tensor, mean, std, image_size: int, device: torch.device,
               batch_size: int) -> None:
    """BatchNorm running statistics := their plain average over full batches of `images` (clean
    views; the training batch size, whose statistics the weights were trained with), nothing else changed."""
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an EMA
    was_training = backbone.training
    backbone.train()
    for chunk in images[: len(images) - len(images) % batch_size].split(batch_size):
        backbone(eval_view(chunk.to(device), image_size, mean, std))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    backbone.train(was_training)


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


def evaluate_int8(cfg: Config, art: ckpt.Artifact, package: Path, splits, run_dir: Path) -> Path:
    """Val top-1/top-5 of the shipped int8 file, with the preprocessing stored in it; no training."""
    model = int8.PackagedModel(package)
    int8.preprocessing(model, splits)  # a class-count mismatch stops here, before anything is written
    if cfg.labels_fraction != 1.0:
        log_line(f"finetune: note: {package.name} is int8 and cannot be fine-tuned; "
                 f"labels_fraction={cfg.labels_fraction} does not apply")
    run_dir.mkdir(parents=True, exist_ok=True)
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
    ckpt.write_json(run_dir / "metrics.json", metrics)
    tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.finish()
    log_line(f"finetune: {cfg.artifact} is int8: evaluated as exported, top-1 {metrics['finetune_top1']:.4f}"
             f"  top-5 {metrics['finetune_top5']:.4f} on {describe(metrics['cpu'])} -> {run_dir}")
    return run_dir


# ----------------------------------------------------------------------------- the stage


def run(cfg: Config) -> Path:
    # ============ inputs: every config or artifact problem stops here, before any work ============
    check_config(cfg)
    source = Path(cfg.artifact)
    run_dir = ckpt.artifact_dir(cfg.run_root, STAGE, run_name(cfg))
    done = ckpt.read_metrics(run_dir)
    if done:
        if (done.get("source"), done.get("labels_fraction")) != (cfg.artifact, cfg.labels_fraction):
            raise UserError(f"{run_dir} already holds a fine-tune of {done.get('source')} with labels_fraction="
                            f"{done.get('labels_fraction')}; pick another name=")
        log_line(f"finetune: {run_dir} is already finished; nothing to do")
        return run_dir
    resuming = (run_dir / "checkpoint.pt").is_file()
    state = ckpt.safe_load(run_dir / "checkpoint.pt") if resuming else None
    if resuming:  # a checkpoint of another run under the same name must not be continued
        if (state["source"], state["labels_fraction"]) != (cfg.artifact, cfg.labels_fraction):
            raise UserError(f"{run_dir}/checkpoint.pt is a fine-tune of {state['source']} with labels_fraction="
                            f"{state['labels_fraction']}; pick another name= or remove it")
    art = ckpt.load_model(source, "artifact")
    package = int8.package_of(art, source)

    # ============ device, seeds, data ============
    device = engine.resolve_device(cfg.engine)
    engine.seed_everything(cfg.seed, cfg.engine.deterministic)
    bf16 = engine.use_bf16(cfg.engine, device)
    splits = datalib.load_splits(cfg.data)
    check_data(cfg, art, splits)
    if package is not None:
        return evaluate_int8(cfg, art, package, splits, run_dir)

    # The labelled subset: a pure function of (training split, fraction, labels_seed).
    subset = datalib.balanced_subset(splits.train.labels, cfg.labels_fraction, cfg.labels_seed)
    labelled = splits.train.subset(subset)
    train_set = labelled.to(device)
    size = splits.image_size
    batch_size = min(cfg.train.batch_size, len(subset))
    if batch_size < cfg.train.batch_size:
        log_line(f"finetune: note: {len(subset)} labelled images < train.batch_size={cfg.train.batch_size}; "
                 f"batches of {batch_size} (the lr scales with it)")
    steps_per_epoch = datalib.steps_per_epoch(len(train_set), batch_size)
    total_steps = cfg.train.epochs * steps_per_epoch

    # ============ head (once; afterwards the model always comes from checkpoint.pt) ============
    if not resuming:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        head, report = initial_head(art.backbone.to(device), labelled, splits, cfg, device, bf16)
        report.update({"n_labeled": len(subset), "labels_sha1": labels_digest(subset)})
        ckpt.atomic_save({
            "step": 0, "model": Classifier(art.backbone, head).state_dict(), "subset": subset,
            "source": cfg.artifact, "labels_fraction": cfg.labels_fraction, "report": report,
            "wandb_id": None, "history": [],
        }, run_dir / "checkpoint.pt")
        log_line(f"finetune: {len(subset)} labelled images ({cfg.labels_fraction:g} of {len(splits.train)}); "
                 f"linear probe on them: val top-1 {report['subset_probe_top1']:.4f}")
        state = ckpt.safe_load(run_dir / "checkpoint.pt")
    if not torch.equal(state["subset"], subset):
        raise UserError(f"{run_dir}/checkpoint.pt was trained on another labelled subset (data or labels_seed "
                        f"changed); rerun with the original config or remove it")

    # ============ network: the artifact's architecture (pruned ones too) + linear head ============
    model = Classifier(art.backbone, nn.Linear(feature_dim(art.backbone), splits.num_classes))
    model.load_state_dict(state["model"], strict=True)
    model = engine.prepare_module(model, cfg.engine, device)
    model_fwd = engine.maybe_compile(model, cfg.engine, device)

    # ============ optimizer, schedule ============
    base_lr = cfg.train.lr * batch_size / 256  # linear scaling rule
    optimizer = build_optimizer(cfg.train, model, base_lr)
    lrs = lr_schedule(cfg.train, base_lr, total_steps, steps_per_epoch)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919)

    # ============ resume ============
    step, wandb_id, history, report = state["step"], state["wandb_id"], state["history"], state["report"]
    if step > 0:
        optimizer.load_state_dict(state["optimizer"])
        aug_gen.set_state(state["aug_rng"].cpu() if device.type == "cpu" else state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        log_line(f"finetune: resumed {run_dir} at step {step}/{total_steps}")
    tracker = Tracker(cfg.track, run_dir, f"{STAGE}/{run_dir.name}", to_dict(cfg), wandb_id)

    def save_checkpoint():
        ckpt.atomic_save({
            "step": step, "model": model.state_dict(), "subset": subset, "source": cfg.artifact,
            "labels_fraction": cfg.labels_fraction, "report": report, "optimizer": optimizer.state_dict(),
            "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state(), "wandb_id": tracker.id,
            "history": history,
        }, run_dir / "checkpoint.pt")

    # ============ training loop: cross-entropy on one augmented view, everything trains ============
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else total_steps
    progress = Progress(stop_at, step, desc=f"finetune {run_dir.name}", enabled=cfg.engine.progress)
    model.train()  # BatchNorm too: full fine-tuning adapts its statistics to the labelled views
    epoch_seconds, loss_value = [], float("nan")
    with engine.StopGuard() as guard:
        while step < stop_at:
            epoch, first = divmod(step, steps_per_epoch)
            order = datalib.epoch_permutation(len(train_set), cfg.seed, epoch)
            epoch_start = time.perf_counter()
            for images, labels in datalib.in_memory_batches(train_set, order, batch_size, first):
                lr = float(lrs[step])  # a numpy scalar would not load with weights_only=True
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = normalize(augment_view(images, size, cfg.aug, cfg.aug.blur_p1, cfg.aug.solarize_p1, aug_gen),
                              splits.mean, splits.std)
                if device.type == "cuda" and cfg.engine.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with engine.autocast(cfg.engine, device):
                    logits = model_fwd(x)
                loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1

                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise SystemExit(f"finetune: loss is {loss_value} at step {step}; stopping "
                                     f"(last good checkpoint: {run_dir / 'checkpoint.pt'})")
                progress.update(len(images), loss=loss_value, lr=lr, epoch=epoch)
                if step % 10 == 0 or step == stop_at:
                    tracker.log({"train/loss": loss_value, "train/lr": lr,
                                 "train/images_per_s": progress.images_per_s}, step=step)
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
                entry = {"epoch": done_epochs, "step": step, "loss": loss_value}
                every = cfg.eval.knn_every_epochs  # the monitor cadence every stage shares
                if every and (done_epochs % every == 0 or done_epochs == cfg.train.epochs):
                    entry["val_top1"] = val_accuracy(model, splits, device, cfg.eval.feature_batch_size,
                                                     bf16)["finetune_top1"]
                    tracker.log({"val/top1": entry["val_top1"], "epoch": done_epochs}, step=step)
                    progress.write(f"epoch {done_epochs}: loss {loss_value:.4f}  val top-1 {entry['val_top1']:.4f}")
                history.append(entry)
            save_checkpoint()
    progress.close()

    if step < total_steps:  # stopped early on purpose (train.max_steps): resumable, not final
        tracker.finish()
        log_line(f"finetune: stopped at step {step}/{total_steps} (train.max_steps); rerun to continue")
        return run_dir

    # ============ final: the fine-tuned classifier on val, kNN of its backbone, model.pt ============
    if cfg.precise_bn:
        precise_bn(model.backbone, labelled.images, splits.mean, splits.std, size, device, batch_size)
    metrics = val_accuracy(model, splits, device, cfg.eval.feature_batch_size, bf16)
    # kNN with only the labels this run saw as its bank (with all labels: the usual kNN monitor).
    knn, _ = evaluate_backbone(model.backbone, replace(splits, train=labelled), cfg.eval, device, bf16, probe=False)
    meta = {"stage": STAGE, "name": run_dir.name, "data": cfg.data.name, "num_classes": splits.num_classes,
            "image_size": size, "mean": list(splits.mean), "std": list(splits.std), "parents": [cfg.artifact],
            "labels_fraction": cfg.labels_fraction, "n_labeled": len(subset)}
    ckpt.save_model(run_dir, model.backbone, art.spec, meta, model.head)
    metrics.update({
        **knn, **report, "stage": STAGE, "trained": True, "evaluated": "fine-tuned fp32",
        "source": cfg.artifact, "source_stage": art.meta.get("stage"), "arch": art.spec.get("arch"),
        "labels_fraction": cfg.labels_fraction, "labels_seed": cfg.labels_seed, "head_init": cfg.head_init,
        "precise_bn": cfg.precise_bn,
        "params": count_params(model.backbone), "macs": count_macs(model.backbone, size),
        "file_mb": (run_dir / "model.pt").stat().st_size / 2**20,
        "epochs": cfg.train.epochs, "steps": total_steps, "batch_size": batch_size,
        "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
        "final_loss": loss_value if math.isfinite(loss_value) else None, "history": history,
    })
    ckpt.write_json(run_dir / "metrics.json", metrics)
    tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.finish()
    log_line(f"finetune: done -> {run_dir}  top-1 {metrics['finetune_top1']:.4f} (linear probe on the same "
             f"{len(subset)} labels {report['subset_probe_top1']:.4f})  kNN top-1 {metrics['knn_top1']:.4f}")
    return run_dir
