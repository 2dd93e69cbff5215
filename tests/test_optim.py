"""core.optim against lightly: the foreach LARS gives lightly's LARS update, the EMA lightly's
update_momentum, and the comparisons are tight enough to catch a wrong coefficient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightly.models.utils import get_weight_decay_parameters, update_momentum
from lightly.utils.lars import LARS as LightlyLARS

from core.optim import LARS, ema_update_

STEPS = 20


class Net(nn.Module):
    """Conv + BN + linear layers, plus the corner cases of lightly's LARS rule: a weight that
    starts at zero (|p| = 0), one whose gradient is exactly zero (|g| = 0) and one that gets
    no gradient at all (grad None)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 5)
        self.zero_init = nn.Linear(16, 5)
        nn.init.zeros_(self.zero_init.weight)
        self.dead = nn.Parameter(torch.randn(4, 3))  # in the graph with a zero gradient
        self.unused = nn.Linear(3, 3)  # never called: grad stays None

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        h = F.relu(self.fc1(h))
        return self.fc2(h) + self.zero_init(h) + 0.0 * self.dead.sum()


def groups(model: nn.Module) -> list:
    """Several groups: lightly's decay / no-decay split (BYOL's), with the head at its own lr and wd."""
    decay, no_decay = get_weight_decay_parameters([model])
    head = {id(p) for p in model.fc2.parameters()}
    return [
        {"params": [p for p in decay if id(p) not in head], "weight_decay": 1e-2},
        {"params": [p for p in model.fc2.parameters()], "weight_decay": 5e-2, "lr": 0.3},
        {"params": [p for p in no_decay if id(p) not in head], "weight_decay": 0.0, "lars_exclude": True},
    ]


def batches(n: int = STEPS):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def train(model: nn.Module, optimizer, data, lr_schedule=None) -> None:
    for step, (x, y) in enumerate(data):
        if lr_schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = group.get("base_lr", group["lr"]) * lr_schedule(step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def run_pair(ours_kwargs: dict, theirs_kwargs: dict, steps: int = STEPS):
    torch.manual_seed(0)
    model = Net()
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    opt_theirs = LightlyLARS(groups(theirs), lr=0.1, **theirs_kwargs)
    opt_ours = LARS(groups(ours), lr=0.1, **ours_kwargs)
    data = batches(steps)
    train(theirs, opt_theirs, data)
    train(ours, opt_ours, data)
    return model, theirs, ours, opt_theirs, opt_ours


@pytest.mark.parametrize("kwargs", [
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "dampening": 0.1},
    {"momentum": 0.0},
    {"momentum": 0.9, "trust_coefficient": 0.02, "eps": 1e-6},
])
def test_lars_matches_lightly_over_20_steps(kwargs):
    start, theirs, ours, opt_theirs, opt_ours = run_pair(kwargs, kwargs)
    assert max_difference(start, theirs) > 1e-3  # the run moved the weights
    assert max_difference(theirs, ours) < 1e-6
    # The corner cases behaved as lightly's: zero-init weight moved (|p| = 0 -> plain SGD step),
    # the never-used layer did not move and has no state, momentum buffers agree.
    assert ours.zero_init.weight.abs().max() > 0
    assert torch.equal(ours.unused.weight, start.unused.weight)
    assert ours.unused.weight not in opt_ours.state
    for p_theirs, p_ours in zip(theirs.parameters(), ours.parameters()):
        if "momentum_buffer" in opt_theirs.state[p_theirs]:
            torch.testing.assert_close(opt_ours.state[p_ours]["momentum_buffer"],
                                       opt_theirs.state[p_theirs]["momentum_buffer"], atol=1e-6, rtol=0)
        else:
            assert "momentum_buffer" not in opt_ours.state[p_ours]


def test_the_comparison_fails_on_a_different_update():
    # A different trust coefficient (eta), or plain SGD, is far outside the 1e-6 the test allows.
    _, theirs, ours, _, _ = run_pair({"momentum": 0.9, "trust_coefficient": 0.002}, {"momentum": 0.9})
    assert max_difference(theirs, ours) > 1e-4
    torch.manual_seed(0)
    model = Net()
    theirs, sgd = copy.deepcopy(model), copy.deepcopy(model)
    data = batches()
    train(theirs, LightlyLARS(groups(theirs), lr=0.1, momentum=0.9), data)
    train(sgd, torch.optim.SGD(groups(sgd), lr=0.1, momentum=0.9), data)
    assert max_difference(theirs, sgd) > 1e-3


def test_lars_follows_a_changing_lr_and_resumes_from_lightly_state():
    """The loop sets group['lr'] every step, and checkpoint.pt files written with lightly's LARS
    load into ours (the same state layout) and continue identically."""
    torch.manual_seed(1)
    model = Net()
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    opt_theirs = LightlyLARS(groups(theirs), lr=0.1, momentum=0.9)
    data = batches(2 * STEPS)
    schedule = lambda s: 1.0 / (1 + s)  # noqa: E731
    train(theirs, opt_theirs, data[:STEPS], schedule)
    ours.load_state_dict(theirs.state_dict())
    opt_ours = LARS(groups(ours), lr=0.1, momentum=0.9)
    opt_ours.load_state_dict(opt_theirs.state_dict())
    train(theirs, opt_theirs, data[STEPS:], schedule)
    train(ours, opt_ours, data[STEPS:], schedule)
    assert max_difference(theirs, ours) < 1e-6
    # ...and lightly loads ours.
    LightlyLARS(groups(copy.deepcopy(model)), lr=0.1, momentum=0.9).load_state_dict(opt_ours.state_dict())


def test_lars_rejects_bad_arguments():
    p = [nn.Parameter(torch.ones(2))]
    for kwargs in ({"lr": -1.0}, {"lr": 0.1, "momentum": -0.1}, {"lr": 0.1, "weight_decay": -1.0},
                   {"lr": 0.1, "nesterov": True}):
        with pytest.raises(ValueError):
            LARS(p, **kwargs)


def test_ema_update_matches_lightly_update_momentum():
    torch.manual_seed(2)
    online, target = Net(), Net()
    theirs = copy.deepcopy(target)
    target_params, online_params = list(target.parameters()), list(online.parameters())
    for m in (0.99, 0.996, 0.5, 1.0):
        update_momentum(online, theirs, m)
        ema_update_(target_params, online_params, m)
        assert max_difference(theirs, target) < 1e-7
    # A different momentum is caught at that tolerance.
    ema_update_(target_params, online_params, 0.99)
    update_momentum(online, theirs, 0.98)
    assert max_difference(theirs, target) > 1e-4
    # momentum 0 copies the online weights, 1 keeps the target.
    ema_update_(target_params, online_params, 0.0)
    assert max_difference(online, target) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lars_and_ema_on_cuda_match_and_never_sync():
    torch.manual_seed(3)
    model = Net()
    theirs, ours = copy.deepcopy(model).cuda(), copy.deepcopy(model).cuda()
    opt_theirs = LightlyLARS(groups(theirs), lr=0.1, momentum=0.9)
    opt_ours = LARS(groups(ours), lr=0.1, momentum=0.9)
    data = [(x.cuda(), y.cuda()) for x, y in batches()]
    train(theirs, opt_theirs, data[:1])
    train(ours, opt_ours, data[:1])  # first step creates the state
    target = copy.deepcopy(ours)
    target_params, online_params = list(target.parameters()), list(ours.parameters())
    for x, y in data[1:]:
        loss = F.cross_entropy(theirs(x), y)
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        opt_theirs.step()
        loss = F.cross_entropy(ours(x), y)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt_ours.step()
            ema_update_(target_params, online_params, 0.99)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert max_difference(theirs, ours) < 1e-5  # TF32 / reduction order on the device


def test_weight_decay_groups_are_lightlys_split_on_byol_networks():
    """core.optim.weight_decay_groups splits by shape (the exported QAT graph has no module types);
    on a ResNet with BYOL's heads and a distillation projector it must be exactly lightly's
    get_weight_decay_parameters: decay on conv/linear weights, none on norm parameters and biases."""
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

    from core.models import build_backbone
    from core.optim import weight_decay_groups

    net = nn.ModuleList([build_backbone("resnet18"), BYOLProjectionHead(512, 64, 32), BYOLPredictionHead(32, 64, 32),
                         nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 10))])
    decay, no_decay = get_weight_decay_parameters([net])
    ours = weight_decay_groups(list(net.parameters()), 1e-4)
    assert [id(p) for p in ours[0]["params"]] == [id(p) for p in decay] and ours[0]["weight_decay"] == 1e-4
    assert [id(p) for p in ours[1]["params"]] == [id(p) for p in no_decay] and ours[1]["weight_decay"] == 0.0
