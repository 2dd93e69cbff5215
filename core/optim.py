"""LARS and the EMA (target network) update with foreach ops: few kernels, no host syncs.

Why not lightly's: `lightly.utils.lars.LARS` (from PyTorch Lightning Bolts) updates the
parameters one by one in a Python loop, about ten small kernels per parameter, and its
`if p_norm != 0 and g_norm != 0` turns two device tensors into Python booleans: two host
syncs per parameter per step (a ResNet-50 with BYOL's heads has ~170 parameters). On a GPU
that runs 15+ steps/s, the CPU then waits on the device instead of queueing the next step.

`LARS` here gives the same update (tests/test_optim.py holds it to lightly's within 1e-6
over 20 steps) from per-group foreach ops: `torch._foreach_norm` for the norms, the trust
ratio of every parameter at once on the stacked norms with `torch.where` for lightly's
zero-norm rule, foreach momentum and parameter updates. Its state (`momentum_buffer` per
parameter) has lightly's layout, so either optimizer loads the other's state_dict.

`ema_update_` is BYOL's target update with two foreach ops over precomputed parameter
lists (what lightly >= 1.6's `update_momentum` does; earlier lightly looped per parameter).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from lightly.utils.scheduler import cosine_warmup_schedule
from torch import Tensor
from torch.optim.optimizer import Optimizer

__all__ = ["LARS", "ema_update_", "warmup_cosine", "weight_decay_groups", "build_optimizer"]


class LARS(Optimizer):
    """SGD with LARS layer-wise scaling (You et al. 2017, arXiv:1708.03888, Eq. 6), as lightly's.

    For each parameter p with gradient g in a group with weight decay wd != 0:
        trust = eta * |p| / (|g| + wd * |p| + eps)        if |p| != 0 and |g| != 0
        d     = trust * (g + wd * p)                      (else d = g: no decay, no scaling)
    and in a group with wd == 0, d = g: no decay and no scaling. That is lightly's exclusion
    rule (BYOL, Sec. C.1 / SimCLR: BatchNorm and bias parameters go into a wd = 0 group).
    Then PyTorch's SGD momentum: buf = momentum * buf + (1 - dampening) * d (buf = d on the
    first step), d = d + momentum * buf with nesterov else buf, p -= lr * d.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, trust_coefficient: float = 0.001,
                 eps: float = 1e-8):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, trust_coefficient=trust_coefficient, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for device_params, device_grads in _by_device_and_dtype(params, grads):
                self._update(group, device_params, device_grads)
        return loss

    def _update(self, group: dict, params: list, grads: list) -> None:
        wd, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
        if wd != 0:
            grads = _lars_direction(params, grads, wd, group["trust_coefficient"], group["eps"])
        if momentum != 0:
            new = [i for i, p in enumerate(params) if "momentum_buffer" not in self.state[p]]
            old = [i for i, p in enumerate(params) if "momentum_buffer" in self.state[p]]
            for i in new:  # first step of a parameter: buf = d (lightly's clone)
                self.state[params[i]]["momentum_buffer"] = torch.clone(grads[i]).detach()
            if old:
                bufs = [self.state[params[i]]["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1 - group["dampening"])
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            if group["nesterov"]:
                grads = torch._foreach_add(grads, bufs, alpha=momentum)
            else:
                grads = bufs
        torch._foreach_add_(params, grads, alpha=-lr)


def _lars_direction(params: list, grads: list, weight_decay: float, trust_coefficient: float,
                    eps: float) -> list:
    """trust_i * (g_i + wd * p_i), or g_i where |p_i| or |g_i| is 0: lightly's rule, no sync."""
    p_norm = torch.stack(torch._foreach_norm(params))
    g_norm = torch.stack(torch._foreach_norm(grads))
    scaled = (p_norm != 0) & (g_norm != 0)
    # lightly's arithmetic, in its order: p_norm / (g_norm + p_norm * wd + eps) * eta
    trust = p_norm / (g_norm + p_norm * weight_decay + eps) * trust_coefficient
    trust = torch.where(scaled, trust, torch.ones_like(trust))
    decay = torch.where(scaled, torch.full_like(trust, weight_decay), torch.zeros_like(trust))
    # Per-parameter scalars as 0-d device tensors (unbind: views, no copies, no syncs).
    direction = torch._foreach_mul(params, list(decay.unbind()))
    torch._foreach_add_(direction, grads)  # g + wd * p (g where not scaled)
    torch._foreach_mul_(direction, list(trust.unbind()))
    return direction


def _by_device_and_dtype(params: list, grads: list):
    """foreach ops need one device and dtype per call: split a group accordingly."""
    buckets: dict = {}
    for p, g in zip(params, grads):
        ps, gs = buckets.setdefault((p.device, p.dtype), ([], []))
        ps.append(p)
        gs.append(g)
    return buckets.values()


@torch.no_grad()
def ema_update_(target_params: Sequence[Tensor], online_params: Sequence[Tensor], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, in place, two foreach ops.

    BYOL's target update (Grill et al. 2020, Eq. 1), with lightly's arithmetic (>= 1.6:
    `_foreach_mul_` then `_foreach_add_`), on lists built once instead of every step.
    """
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)


def warmup_cosine(step: int, total_steps: int, base_lr: float, warmup_steps: int, final_lr: float = 0.0) -> float:
    """The one learning-rate schedule of every stage: linear warmup to base_lr over warmup_steps
    (its first step already above 0), then cosine to final_lr, reached at the last step.
    lightly's `cosine_warmup_schedule`, as its BYOL benchmark uses it."""
    return cosine_warmup_schedule(step, total_steps, base_lr, final_lr, min(warmup_steps, total_steps), 0.0)


def weight_decay_groups(params: Sequence[torch.nn.Parameter], weight_decay: float) -> list:
    """Two param groups: weight decay on weights, none on BatchNorm scales/shifts and biases.

    The split of lightly's `get_weight_decay_parameters` (BYOL, Sec. C.1), made by shape: in these
    networks the norm parameters and biases are exactly the 1-d ones, and the exported QAT graph
    has no module types to ask (tests/test_optim.py checks the two agree on a ResNet with BYOL's heads).
    """
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def build_optimizer(cfg, params: Sequence[torch.nn.Parameter], lr: float) -> Optimizer:
    """cfg.optimizer (lars | sgd | adamw) over weight_decay_groups(params); cfg is a TrainConfig."""
    groups = weight_decay_groups(params, cfg.weight_decay)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)
