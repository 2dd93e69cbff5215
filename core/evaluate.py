"""kNN monitor, linear probe on cached features, linear CKA, frozen-weight guards.

Features are computed once, without augmentation, with the backbone in eval mode (BatchNorm
in train mode would rewrite running statistics, which are part of the pretrained model), and
every classifier after that trains on the cached tensors: seconds, not an epoch of forwards.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.augment import eval_view


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
    """kNN top-1 and (optionally) linear-probe top-1/top-5 on the validation split."""
    frozen = snapshot(backbone)
    f_train = extract_features(backbone, splits.train.images, splits.mean, splits.std, splits.image_size,
                               device, eval_cfg.feature_batch_size, bf16)
    f_val = extract_features(backbone, splits.val.images, splits.mean, splits.std, splits.image_size,
                             device, eval_cfg.feature_batch_size, bf16)
    y_train, y_val = splits.train.labels.cpu(), splits.val.labels.cpu()
    metrics = {"knn_top1": knn_top1(f_train, y_train, f_val, y_val, splits.num_classes,
                                    eval_cfg.knn_k, eval_cfg.knn_temperature)}
    head = None
    if probe:
        head = train_linear_probe(f_train, y_train, splits.num_classes, eval_cfg.probe_epochs,
                                  eval_cfg.probe_lr, eval_cfg.probe_weight_decay,
                                  eval_cfg.probe_batch_size, seed, device)
        metrics.update(probe_accuracy(head, f_val, y_val))
    assert_unchanged(backbone, frozen, "the backbone under evaluation")
    return metrics, head
