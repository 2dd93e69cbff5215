"""kNN monitor, linear probe on cached features, augmented linear evaluation, linear CKA,
frozen-weight guards.

Two linear protocols (README, "Evaluation protocols"):
- the probe (`probe_*`, every stage's monitor): features computed once, without augmentation,
  with the backbone in eval mode (BatchNorm in train mode would rewrite running statistics,
  which are part of the pretrained model); the classifier trains on the cached tensors:
  seconds, not an epoch of forwards.
- linear evaluation as published (`linear_*`, `linear_eval`): the classifier trains on freshly
  augmented views (random resized crop + flip) of the frozen backbone, every epoch.
Each reports on the val split and, where one is configured, on the test split (`test_*`); the
test split is only ever measured, never used to choose anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.augment import AugmentConfig, eval_view, one_view
from core.config import choice
from core.data import ImageSet, epoch_permutation
from core.errors import UserError
from core.models import feature_dim
from core.track import Progress


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, mean, std, image_size: int,
                     device: torch.device, batch_size: int = 512, bf16: bool = False) -> torch.Tensor:
    """Pooled features [N, D] (float32, on CPU) of uint8 images [N, 3, H, W]."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for chunk in images.split(batch_size):
        x = eval_view(chunk.to(device, non_blocking=True), image_size, mean, std)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(backbone(x).float().cpu())
    backbone.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def predict(model, images: torch.Tensor, mean, std, image_size: int, device: torch.device,
            batch_size: int = 256, bf16: bool = False) -> torch.Tensor:
    """Logits [N, C] (float32, on CPU) of uint8 images through `model`, no augmentation. The
    caller sets the mode (an exported QAT graph has no .eval(); a package none at all)."""
    out = []
    for chunk in images.split(batch_size):
        x = eval_view(chunk.to(device), image_size, mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float().cpu())
    return torch.cat(out)


def features_cka(net: nn.Module, teacher: nn.Module, splits, device: torch.device, batch_size: int = 512,
                 bf16: bool = False) -> Tuple[float, torch.Tensor, torch.Tensor]:
    """(linear CKA, features of `net`, features of `teacher`) on the val split: how much of its
    teacher's representation a distilled, pruned or quantised backbone kept."""
    f_net, f_teacher = (extract_features(m.to(device), splits.val.images, splits.mean, splits.std, splits.image_size,
                                         device, batch_size, bf16) for m in (net, teacher))
    return linear_cka(f_net, f_teacher), f_net, f_teacher


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[int, float]:
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(labels[:, None])
    return {k: hits[:, :min(k, k_max)].any(1).float().mean().item() for k in ks}


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores (Wu et al. 2018): cosine similarity, weights exp(sim / T)."""
    bank = F.normalize(train_features, dim=1)
    k = min(k, len(bank))
    scores = []
    for q in F.normalize(query, dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        one_hot = F.one_hot(train_labels[idx], num_classes).float()
        scores.append((one_hot * weights[..., None]).sum(1))
    return torch.cat(scores)


def knn_top1(train_features, train_labels, test_features, test_labels, num_classes: int,
             k: int = 200, temperature: float = 0.1) -> float:
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return scores.argmax(1).eq(test_labels).float().mean().item()


def train_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                       epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0,
                       batch_size: int = 512, seed: int = 0, device: Optional[torch.device] = None,
                       min_std: float = 1e-6) -> nn.Linear:
    """A linear classifier on frozen features; returns a head that takes raw features.

    Features are standardised for conditioning (the BN-without-affine trick of MoCo v3's probe),
    then the standardisation is folded into the returned Linear. `min_std` floors each feature's
    std: a feature that barely varies is not blown up (folded, 1/std becomes its weight). For
    int8 features pass their quantisation step: a feature that moves by one step in a few
    images would otherwise get a weight hundreds of times the others', and the head's
    per-channel int8 scale would round every other weight of its row to zero.
    """
    device = device or torch.device("cpu")
    x, y = train_features.to(device), train_labels.to(device)
    mu, sd = x.mean(0), x.std(0).clamp_min(min_std)
    xs = (x - mu) / sd
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes).to(device)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g).to(device)
        for idx in perm.split(batch_size):
            for group in opt.param_groups:  # cosine decay per step
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(xs[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    folded = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        folded.weight.copy_((head.weight / sd).cpu())
        folded.bias.copy_((head.bias - (head.weight * (mu / sd)).sum(1)).cpu())
    return folded.eval()


@torch.no_grad()
def probe_accuracy(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    acc = topk_accuracy(head(features), labels)
    return {"probe_top1": acc[1], "probe_top5": acc[5]}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two sets of features of the same samples."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (x.T @ y).norm() ** 2
    return (cross / ((x.T @ x).norm() * (y.T @ y).norm())).item()


# ----------------------------------------------------------------------------- frozen guards


def snapshot(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to prove later that nothing changed."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: Dict[str, torch.Tensor], what: str) -> None:
    """MoCo v3's check: a frozen network must end exactly as it started."""
    for k, v in module.state_dict().items():
        if not torch.equal(v.detach().cpu(), before[k].cpu()):
            raise RuntimeError(f"{what} changed during training: {k} (it must stay frozen)")


def evaluate_backbone(backbone: nn.Module, splits, eval_cfg, device: torch.device, bf16: bool,
                      seed: int = 0, probe: bool = True) -> Tuple[Dict[str, float], Optional[nn.Linear]]:
    """kNN top-1 and (optionally) linear-probe top-1/top-5 on the validation split, and the same
    as test_* on the test split when one is configured. The bank and the head come from the
    training split alone: the test split changes no decision and no val number."""
    frozen = snapshot(backbone)

    def features(images):
        return extract_features(backbone, images, splits.mean, splits.std, splits.image_size, device,
                                eval_cfg.feature_batch_size, bf16)

    f_train, y_train = features(splits.train.images), splits.train.labels.cpu()
    scored = {"": (features(splits.val.images), splits.val.labels.cpu())}
    if getattr(splits, "test", None) is not None:
        scored["test_"] = (features(splits.test.images), splits.test.labels.cpu())
    metrics = {f"{prefix}knn_top1": knn_top1(f_train, y_train, f, y, splits.num_classes, eval_cfg.knn_k,
                                             eval_cfg.knn_temperature) for prefix, (f, y) in scored.items()}
    head = None
    if probe:
        head = train_linear_probe(f_train, y_train, splits.num_classes, eval_cfg.probe_epochs,
                                  eval_cfg.probe_lr, eval_cfg.probe_weight_decay,
                                  eval_cfg.probe_batch_size, seed, device)
        for prefix, (f, y) in scored.items():
            metrics.update({prefix + k: v for k, v in probe_accuracy(head, f, y).items()})
    assert_unchanged(backbone, frozen, "the backbone under evaluation")
    return metrics, head


# ----------------------------------------------------------------------------- linear evaluation as published


def linear_eval_aug() -> AugmentConfig:
    """Random resized crop (scale 0.08-1, torchvision's default) + horizontal flip, nothing else:
    the training views of BYOL's linear evaluation (Grill et al. 2020, App. C.1) and solo-learn's."""
    return AugmentConfig(crop_scale_min=0.08, jitter_p=0.0, grayscale_p=0.0, blur_p1=0.0, blur_p2=0.0,
                         solarize_p1=0.0, solarize_p2=0.0)


@dataclass
class LinearEvalConfig:
    """A linear classifier on the frozen backbone (BatchNorm in eval mode), trained on augmented
    views. Defaults: solo-learn's linear configs (SGD, batch 256, lr 0.3, no weight decay, 100
    epochs; scripts/linear/*/byol.yaml) with BYOL's Nesterov momentum 0.9 (App. C.1), and a
    cosine schedule instead of solo-learn's steps at epochs 60 and 80."""

    enabled: bool = False  # the probe stage runs it when true (every stage's own probe stays the cached one)
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.3  # for a batch of 256, scaled linearly
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    # train+val: the full training set, as published (needs a test split to report on);
    # train: val stays held out and is reported; auto: train+val when a test split exists.
    train_on: str = choice("auto", "auto", "train+val", "train")
    aug: AugmentConfig = field(default_factory=linear_eval_aug)


def resolve_train_on(splits, train_on: str) -> str:
    """linear.train_on as train+val or train; a setting the data cannot serve stops here."""
    test = getattr(splits, "test", None)
    if train_on == "auto":
        train_on = "train+val" if test is not None else "train"
    if train_on == "train+val" and test is None:
        raise UserError("linear.train_on=train+val trains on val too, so it needs a test split to report on "
                        "(data.test / data.test_root); or use linear.train_on=train")
    for name, part in (("train", splits.train), ("val", splits.val), ("test", test)):
        if part is not None and not isinstance(part, ImageSet):
            raise UserError(f"linear evaluation needs the images in memory (data.in_memory=true); the {name} split streams")
    return train_on


def linear_eval_sets(splits, train_on: str):
    """(training set, {metric prefix: split to report on}) for the published protocol."""
    test = getattr(splits, "test", None)
    if resolve_train_on(splits, train_on) == "train+val":
        train = ImageSet(torch.cat([splits.train.images, splits.val.images.to(splits.train.images.device)]),
                         torch.cat([splits.train.labels, splits.val.labels.to(splits.train.labels.device)]),
                         splits.num_classes)
        return train, {"test_": test}
    return splits.train, {"": splits.val, **({"test_": test} if test is not None else {})}


@torch.no_grad()
def fold_batchnorm(norm: nn.BatchNorm1d, linear: nn.Linear) -> nn.Linear:
    """One Linear equal to linear(norm(x)) with norm in eval mode (its running statistics)."""
    scale = (norm.running_var + norm.eps).rsqrt()
    folded = nn.Linear(linear.in_features, linear.out_features)
    folded.weight.copy_(linear.weight * scale)
    folded.bias.copy_(linear.bias - (linear.weight * scale * norm.running_mean).sum(1))
    return folded.eval()


def linear_eval(backbone: nn.Module, splits, cfg: LinearEvalConfig, device: torch.device, seed: int = 0,
                bf16: bool = False, feature_batch_size: int = 512, progress: bool = True
                ) -> Tuple[Dict[str, float], nn.Linear]:
    """({linear_top1, linear_top5, test_linear_top1, ...}, head): linear evaluation as published.

    The backbone is frozen and in eval mode (BN keeps its statistics), so only the head learns;
    every epoch sees new random crops and flips, unlike the cached-feature probe. The reported
    splits are scored with the eval view (resize only), like every other number here.
    """
    train, scored = linear_eval_sets(splits, cfg.train_on)
    frozen = snapshot(backbone)
    backbone.eval()
    images, labels = train.images.to(device), train.labels.to(device)
    batch = min(cfg.batch_size, len(images))
    steps_per_epoch = len(images) // batch  # full batches, as every training loop here
    total = cfg.epochs * steps_per_epoch
    # BatchNorm without affine before the linear layer (MAE's linear probing, He et al. 2022, after
    # MoCo v3): it only rescales features, so the classifier stays linear (folded in at the end),
    # and one lr suits any backbone. Without it the quickstart's ResNet-50 features (2048-d, large
    # norms) gave losses above 20 at lr 0.3 and test top-1 0.47 against 0.71 for the probe.
    norm = nn.BatchNorm1d(feature_dim(backbone), affine=False, eps=1e-6).to(device)
    head = nn.Linear(feature_dim(backbone), splits.num_classes).to(device)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    base_lr = cfg.lr * batch / 256
    opt = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    generator = torch.Generator(device=device)
    bar = Progress(total, desc="linear eval", enabled=progress)
    step, shown = 0, {}
    for epoch in range(cfg.epochs):
        order = epoch_permutation(len(images), seed, epoch).to(device)
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            generator.manual_seed(seed * 1_000_003 + step)  # a pure function of the step, as in the loop
            x = one_view(images[idx], splits.image_size, cfg.aug, generator, splits.mean, splits.std)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                f = backbone(x).float()
            for group in opt.param_groups:  # cosine decay per step
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(norm(f)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 20 == 1:  # a host sync now and then, not every step
                shown = {"loss": loss.item(), "epoch": epoch}
            bar.update(batch, **shown)
    bar.close()
    head = fold_batchnorm(norm.cpu(), head.cpu())
    metrics = {}
    for prefix, part in scored.items():
        f = extract_features(backbone, part.images, splits.mean, splits.std, splits.image_size, device,
                             feature_batch_size, bf16)
        with torch.no_grad():
            acc = topk_accuracy(head(f), part.labels.cpu())
        metrics.update({f"{prefix}linear_top1": acc[1], f"{prefix}linear_top5": acc[5]})
    assert_unchanged(backbone, frozen, "the backbone under linear evaluation")
    metrics.update({"linear_train_on": "train+val" if "" not in scored else "train", "linear_epochs": cfg.epochs,
                    "linear_train_images": len(images)})
    return metrics, head
