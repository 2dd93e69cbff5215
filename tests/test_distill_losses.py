"""core.distill: each loss against an independent reference (numpy, explicit loops), the
frozen teacher, where gradients go, the Distiller's state, and the teacher loader's errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from core import checkpoint as ckpt
from core.distill import (DistillLossConfig, Distiller, embed_loss, hint_loss, kd_loss, load_teacher,
                          relation_loss)
from core.errors import UserError
from core.evaluate import assert_unchanged, snapshot
from core.models import backbone_spec, build_backbone

# ----------------------------------------------------------------------------- references


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_kl_rows(p, q):
    """mean over rows of sum_j p log(p / q), row by row."""
    return float(np.mean([np.sum(pi * (np.log(pi) - np.log(qi))) for pi, qi in zip(p, q)]))


def ref_embed(s, t, distance, temperature):
    s, t = s.double().numpy(), t.double().numpy()
    if distance == "cosine":
        return float(np.mean([1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(s, t)]))
    if distance == "mse":
        return float(((s - t) ** 2).sum() / s.size)
    return temperature ** 2 * np_kl_rows(np_softmax(t / temperature), np_softmax(s / temperature))


def ref_attention(x):
    x = x.double().numpy()
    a = (x ** 2).mean(axis=1).reshape(len(x), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def ref_hint(s_maps, t_maps, kind):
    per_layer = []
    for s, t in zip(s_maps, t_maps):
        if kind == "fitnets":
            per_layer.append(((s.double().numpy() - t.double().numpy()) ** 2).mean())
        else:
            per_layer.append(((ref_attention(s) - ref_attention(t)) ** 2).mean())
    return float(np.mean(per_layer))


def ref_relation(s, t, queue, ts, tt):
    """SEED by its definition, one sample at a time."""
    s, t, q = s.double().numpy(), t.double().numpy(), queue.double().numpy()
    total = 0.0
    for si, ti in zip(s, t):
        si, ti = si / np.linalg.norm(si), ti / np.linalg.norm(ti)
        bank = np.vstack([ti[None], q])  # the sample's own teacher embedding first, then the queue
        p_t = np_softmax(bank @ ti / tt)
        p_s = np_softmax(bank @ si / ts)
        total += np.sum(p_t * np.log(p_t / p_s))
    return total / len(s)


def ref_kd(s, t, kind, temperature):
    s, t = s.double().numpy(), t.double().numpy()
    ps, pt = np_softmax(s / temperature), np_softmax(t / temperature)
    if kind == "kl":
        return temperature ** 2 * np_kl_rows(pt, ps)
    return float(((ps - pt) ** 2).mean())


@pytest.fixture
def g():
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("distance", ["cosine", "mse", "kl"])
def test_embed_loss_matches_reference_and_vanishes_on_agreement(g, distance):
    s, t = torch.randn(6, 20, generator=g), torch.randn(6, 20, generator=g).relu()
    got = embed_loss(s, t, distance, 3.0).item()
    assert got == pytest.approx(ref_embed(s, t, distance, 3.0), rel=1e-5, abs=1e-6)
    assert got > 1e-3
    assert embed_loss(t.clone(), t, distance, 3.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["fitnets", "attention"])
def test_hint_loss_matches_reference_and_vanishes_on_agreement(g, kind):
    shapes = [(4, 8, 6, 6), (4, 16, 3, 3)]
    s_maps = [torch.randn(*sh, generator=g) for sh in shapes]
    t_maps = [torch.randn(*sh, generator=g).relu() for sh in shapes]
    got = hint_loss(s_maps, t_maps, kind).item()
    assert got == pytest.approx(ref_hint(s_maps, t_maps, kind), rel=1e-5)
    assert got > 1e-4
    assert hint_loss([t.clone() for t in t_maps], t_maps, kind).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_transfer_compares_spatial_attention_only(g):
    """AT is blind to channel count and per-sample scale (it normalises the attention map)."""
    t = torch.randn(3, 16, 5, 5, generator=g)
    a = t.pow(2).mean(1, keepdim=True).sqrt()  # a 1-channel map with the same attention as t
    assert hint_loss([a * 3.0], [t], "attention").item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="fitnets hint"):  # FitNets needs adapted maps
        hint_loss([a * 3.0], [t], "fitnets")


def test_relation_loss_matches_reference_and_vanishes_on_agreement(g):
    s, t = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    queue = nn.functional.normalize(torch.randn(9, 12, generator=g), dim=1)
    got = relation_loss(s, t, queue, 0.2, 0.07).item()
    assert got == pytest.approx(ref_relation(s, t, queue, 0.2, 0.07), rel=1e-5)
    assert got > 1e-3
    # Equal temperatures: the student's distribution is the teacher's when embeddings agree
    # (up to scale: both are normalised).
    assert relation_loss(2.0 * t, t, queue, 0.1, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    # Different temperatures: no longer 0, but agreement still beats a random student.
    assert relation_loss(t, t, queue, 0.2, 0.07).item() < got


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_kd_loss_matches_reference_and_vanishes_on_agreement(g, kind):
    s, t = 3 * torch.randn(7, 10, generator=g), 3 * torch.randn(7, 10, generator=g)
    got = kd_loss(s, t, kind, 4.0).item()
    assert got == pytest.approx(ref_kd(s, t, kind, 4.0), rel=1e-5)
    assert got > 1e-4
    assert kd_loss(t.clone(), t, kind, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_kl_is_scaled_by_t_squared(g):
    """Hinton's T^2: at high T the KL term falls like 1/T^2, so the product stays of order 1."""
    s, t = torch.randn(64, 10, generator=g), torch.randn(64, 10, generator=g)
    raw = {T: nn.functional.kl_div(torch.log_softmax(s / T, 1), torch.softmax(t / T, 1), reduction="batchmean")
           for T in (8.0, 16.0)}
    assert kd_loss(s, t, "kl", 8.0).item() == pytest.approx(64 * raw[8.0].item(), rel=1e-5)
    assert kd_loss(s, t, "kl", 16.0).item() == pytest.approx(kd_loss(s, t, "kl", 8.0).item(), rel=0.1)


# ----------------------------------------------------------------------------- distiller


def make_teacher(arch="resnet18", classes=10, head=True, seed=0):
    torch.manual_seed(seed)
    backbone = build_backbone(arch, cifar_stem=False).eval()
    # Non-trivial BN statistics, so a BN update in train mode would show.
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    dim = 2048 if arch == "resnet50" else 512
    return ckpt.Artifact(None, backbone, nn.Linear(dim, classes).eval() if head else None,
                         backbone_spec(backbone, arch, False), {"num_classes": classes})


ALL_LOSSES = dict(embed=1.0, hint=1.0, relation=1.0, kd=1.0, ce=1.0, relation_queue=32)


def make_distiller(arch="resnet18", student_stem=False, **loss):
    cfg = DistillLossConfig(**{**ALL_LOSSES, **loss})
    torch.manual_seed(1)
    return Distiller(make_teacher(arch), build_backbone("resnet18", cifar_stem=student_stem), cfg, 10, 16)


def batch(n=8, size=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_gradients_reach_only_student_and_adapters(arch):
    d = make_distiller(arch)
    x, y = batch()
    loss, parts = d(x, y)
    assert set(parts) == {"embed", "hint", "relation", "kd", "ce"}
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-5)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is None for p in d.teacher_head.parameters())
    missing = [n for n, p in d.student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert d.adapter_parameters() and all(p.grad is not None for p in d.adapter_parameters())
    if arch == "resnet50":  # adapters map student channels to the teacher's
        assert {k: tuple(a.weight.shape[:2]) for k, a in d.adapters.items()} == {
            "layer2": (512, 128), "layer3": (1024, 256), "layer4": (2048, 512)}


def test_teacher_stays_frozen_through_training_steps():
    d = make_distiller()
    before = snapshot(nn.ModuleList([d.teacher, d.teacher_head]))
    parent = nn.ModuleList([d])  # a parent's .train() must not reach the teacher either
    parent.train()
    assert d.student.training and not d.teacher.training and not d.teacher_head.training
    opt = torch.optim.SGD(list(d.student.parameters()) + d.adapter_parameters(), lr=0.1)
    for seed in range(3):
        loss, _ = d(*batch(seed=seed))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_unchanged(nn.ModuleList([d.teacher, d.teacher_head]), before, "teacher")
    # The same check catches a teacher that was switched to train mode (BN buffers move).
    nn.Module.train(d)  # the base-class train(): flips the teacher too
    assert d.teacher.training
    with torch.no_grad():
        d(*batch(seed=9))
    with pytest.raises(RuntimeError, match="running_mean|running_var|num_batches"):
        assert_unchanged(nn.ModuleList([d.teacher, d.teacher_head]), before, "teacher")


def test_state_dict_holds_adapters_and_queue_not_teacher_or_student():
    d = make_distiller()
    keys = set(d.state_dict())
    assert {"queue", "queue_ptr", "projector.0.weight", "student_head.weight", "adapters.layer3.weight"} <= keys
    assert not any(k.startswith(("teacher", "student.")) for k in keys)
    d(*batch())  # moves the queue and ptr
    fresh = make_distiller()
    assert not torch.equal(fresh.queue, d.queue)
    fresh.load_state_dict(d.state_dict())
    for k, v in d.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    broken = {k: v for k, v in d.state_dict().items() if k != "adapters.layer2.weight"}
    with pytest.raises(RuntimeError, match="adapters.layer2.weight"):
        make_distiller().load_state_dict(broken)


def test_a_copy_of_a_hooked_student_copies_no_teacher():
    """The hint hooks hold a small HintTaps, never the Distiller: copying the student (prune's
    ratio search copies the model once per trial) must not copy the teacher along. And
    remove_hooks() leaves the student as it was built."""
    import copy

    d = make_distiller(hint=1.0, embed=0.0)
    taps = [m for m in d.student.modules() if m._forward_hooks]
    assert taps  # the hint layers are hooked
    memo = {}
    copy.deepcopy(d.student, memo)
    copied = {id(v) for v in memo}  # ids of everything copied (memo keys)
    assert id(d) not in copied and not any(id(p) in copied for p in d.teacher.parameters())
    d.remove_hooks()
    assert not any(m._forward_hooks for m in d.student.modules())
    assert not any(m._forward_hooks for m in d.teacher.modules())


def test_queue_is_a_fifo_of_normalised_teacher_embeddings():
    d = make_distiller(relation_queue=12, hint=0.0, ce=0.0)
    x1, x2 = batch(8, seed=1)[0], batch(8, seed=2)[0]
    with torch.no_grad():
        t1 = nn.functional.normalize(d.teacher(x1), dim=1)
        t2 = nn.functional.normalize(d.teacher(x2), dim=1)
    d(x1)  # no labels needed without ce
    assert d.queue_ptr.item() == 8
    assert torch.allclose(d.queue[:8], t1, atol=1e-6)
    d(x2)  # 8 more in a queue of 12: wraps around
    assert d.queue_ptr.item() == 4
    assert torch.allclose(d.queue[8:], t2[:4], atol=1e-6)
    assert torch.allclose(d.queue[:4], t2[4:], atol=1e-6)
    assert torch.allclose(d.queue[4:8], t1[4:], atol=1e-6)


def test_hint_maps_of_different_stems_are_resampled():
    """A CIFAR-stem student (16x16 maps at layer1) with an ImageNet-stem teacher (4x4)."""
    d = make_distiller(student_stem=True, embed=0.0, relation=0.0, kd=0.0, ce=0.0)
    loss, parts = d(*batch())
    assert set(parts) == {"hint"} and math.isfinite(loss.item())


def test_distiller_config_errors():
    with pytest.raises(UserError, match="every distillation loss weight is 0"):
        make_distiller(embed=0.0, hint=0.0, relation=0.0, kd=0.0, ce=0.0)
    with pytest.raises(UserError, match="no module 'layer9'"):
        make_distiller(hint_layers=["layer9"])
    with pytest.raises(UserError, match="probe head"):
        Distiller(make_teacher(head=False), build_backbone("resnet18", False), DistillLossConfig(kd=1.0), 10, 16)
    with pytest.raises(UserError, match="100 classes"):
        Distiller(make_teacher(classes=100), build_backbone("resnet18", False), DistillLossConfig(kd=1.0), 10, 16)


# ----------------------------------------------------------------------------- load_teacher


@pytest.fixture
def teacher_dir(tmp_path):
    art = make_teacher(head=False)
    out = tmp_path / "byol" / "t"
    ckpt.save_model(out, art.backbone, art.spec, {"stage": "byol", "num_classes": 10})
    return out


def save_head(path, dim=512, classes=10, source="runs/byol/t"):
    head = nn.Linear(dim, classes)
    ckpt.atomic_save({"head": head.state_dict(), "source": source, "num_classes": classes, "data": "x"},
                     path / "head.pt")
    return head


def test_load_teacher_frozen_with_head_from_probe_artifact(teacher_dir, tmp_path):
    head = save_head(tmp_path / "probe" / "byol-t")
    art = load_teacher(str(teacher_dir), str(tmp_path / "probe" / "byol-t"), need_head=True)
    assert torch.equal(art.head.weight, head.weight)
    assert not art.backbone.training and not any(p.requires_grad for p in art.backbone.parameters())
    assert not any(p.requires_grad for p in art.head.parameters())


def test_load_teacher_errors(teacher_dir, tmp_path):
    cases = []
    (tmp_path / "empty").mkdir()
    save_head(tmp_path / "probe" / "byol-t")
    save_head(tmp_path / "probe" / "wide", dim=2048)
    save_head(tmp_path / "probe" / "other", source="runs/byol/other")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.pt").write_bytes(b"not a torch file")
    (tmp_path / "notmodel").mkdir()
    ckpt.atomic_save({"step": 3}, tmp_path / "notmodel" / "model.pt")
    cases = [
        (("",), "needs teacher=DIR"),
        ((str(tmp_path / "absent"),), "does not exist"),
        ((str(tmp_path / "empty"),), "has no model.pt"),
        ((str(tmp_path / "probe" / "byol-t"),), "probe artifact: pass it as teacher_head"),
        ((str(tmp_path / "broken"),), "truncated or corrupt"),
        ((str(tmp_path / "notmodel"),), "not a model artifact"),
        ((str(teacher_dir), "", True), "loss.kd > 0 needs the teacher's probe head"),
        ((str(teacher_dir), str(tmp_path / "empty")), "has no head.pt"),
        ((str(teacher_dir), str(tmp_path / "probe" / "wide")), "takes 2048-d features"),
        ((str(teacher_dir), str(tmp_path / "probe" / "other")), "was trained on runs/byol/other"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
            load_teacher(*args)
