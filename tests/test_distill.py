"""The distill stage: clear errors before any training, exact resume, the artifact, and an end
to end run on CPU where the distilled student beats the same student at random init."""

import json

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from core import checkpoint as ckpt
from core.config import load_config
from core.distill import Distiller
from core.errors import UserError
from core.models import backbone_spec, build_backbone
from distill import Config, run
from tests.conftest import ROOT, run_cli

# A distillation small enough for a 2-core CPU: synthetic 16px images, ImageNet stem, every
# loss on (so the resume test covers adapters, projector, student head and the SEED queue).
TINY_DISTILL = [
    "data.name=synthetic", "data.synthetic_size=100", "data.image_size=16", "data.val_fraction=0.2",
    "model.arch=resnet18", "model.cifar_stem=false",
    "train.epochs=2", "train.batch_size=32", "train.optimizer=sgd", "train.lr=0.05", "train.warmup_epochs=0.5",
    "aug.blur_p1=0.0", "aug.blur_p2=0.0",
    "loss.embed=1.0", "loss.hint=1.0", "loss.relation=1.0", "loss.kd=1.0", "loss.ce=0.5",
    "loss.relation_queue=48", "loss.hint_layers=[layer3,layer4]",
    "eval.knn_every_epochs=1", "eval.knn_k=10", "eval.probe_epochs=5", "latency.warmup=1", "latency.iters=2",
    "engine.device=cpu", "engine.progress=false", "track.mode=disabled",
]


def save_teacher(run_dir, arch="resnet18", classes=10, head=True, seed=0, stem=False):
    torch.manual_seed(seed)
    backbone = build_backbone(arch, cifar_stem=stem).eval()
    dim = 2048 if arch == "resnet50" else 512
    meta = {"stage": "byol", "name": run_dir.name, "data": "synthetic", "num_classes": classes,
            "image_size": 16, "parents": []}
    ckpt.save_model(run_dir, backbone, backbone_spec(backbone, arch, stem), meta,
                    nn.Linear(dim, classes) if head else None)
    return run_dir


@pytest.fixture
def teacher(run_root):
    return save_teacher(run_root / "byol" / "teacher")


def distill_cfg(run_root, teacher, *extra):
    return load_config(Config, None, [*TINY_DISTILL, f"run_root={run_root}", f"teacher={teacher}", *extra])


# ----------------------------------------------------------------------------- errors


def test_bad_teacher_stops_before_any_training(run_root, teacher, tmp_path):
    no_head = save_teacher(run_root / "byol" / "nohead", head=False)
    other_data = save_teacher(run_root / "byol" / "c100", classes=100, head=False)
    probe_dir = run_root / "probe" / "byol-teacher"
    ckpt.atomic_save({"head": nn.Linear(512, 10).state_dict(), "source": str(teacher), "num_classes": 10,
                      "data": "synthetic"}, probe_dir / "head.pt")
    other_arch = save_teacher(run_root / "byol" / "r34", arch="resnet34", head=False)
    cases = [
        ([f"teacher={tmp_path / 'absent'}"], "does not exist"),
        ([f"teacher={probe_dir}"], "probe artifact"),
        ([f"teacher={no_head}"], "loss.kd > 0 needs the teacher's probe head"),
        ([f"teacher={other_data}", "loss.kd=0"], "trained for 100 classes"),
        ([f"teacher={teacher}", f"teacher_head={run_root / 'byol'}"], "has no head.pt"),
        ([f"student_init={other_arch}"], "is a resnet34"),
        ([f"student_init={teacher}", "model.cifar_stem=true"], r"\(cifar_stem=False\) but the student"),
    ]
    for i, (extra, message) in enumerate(cases):
        cfg = distill_cfg(run_root, teacher, f"name=bad{i}", *extra)
        with pytest.raises(UserError, match=message):
            run(cfg)
        assert not (run_root / "distill" / f"bad{i}" / "checkpoint.pt").exists(), extra


def test_cli_error_is_one_line(run_root, tmp_path):
    res = run_cli(["-m", "distill", "configs/quickstart.yaml", f"run_root={run_root}",
                   f"teacher={tmp_path / 'nothing'}", "track.mode=disabled"], timeout=300)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert lines == [f"error: teacher {tmp_path / 'nothing'} does not exist (teacher=...)"], res.stderr
    assert not (run_root / "distill").exists()


# ----------------------------------------------------------------------------- resume


def test_resume_is_exact_and_artifact_is_complete(run_root, teacher):
    full = run(distill_cfg(run_root, teacher, "name=full", "train.epochs=3"))
    # 80 training images, batch 32: 2 steps an epoch, 6 in all (the last at lr 0). Interrupted
    # mid-epoch 2 (train.max_steps), then the same command again runs to the end.
    part = run(distill_cfg(run_root, teacher, "name=part", "train.epochs=3", "train.max_steps=3"))
    assert (part / "checkpoint.pt").is_file() and not (part / "model.pt").exists()
    assert ckpt.safe_load(part / "checkpoint.pt")["step"] == 3
    run(distill_cfg(run_root, teacher, "name=part", "train.epochs=3"))

    a, b = ckpt.safe_load(full / "model.pt"), ckpt.safe_load(part / "model.pt")
    for group in ("backbone", "head"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
    sa, sb = ckpt.safe_load(full / "checkpoint.pt"), ckpt.safe_load(part / "checkpoint.pt")
    for k in sa["distiller"]:  # adapters and queue too
        assert torch.equal(sa["distiller"][k], sb["distiller"][k]), k
    assert {"queue", "queue_ptr", "adapters.layer3.weight", "projector.0.weight"} <= set(sa["distiller"])

    m = json.loads((full / "metrics.json").read_text())
    assert m["knn_top1"] == json.loads((part / "metrics.json").read_text())["knn_top1"]
    for key in ("stage", "arch", "knn_top1", "probe_top1", "probe_top5", "params", "macs", "file_mb",
                "seconds_per_epoch", "epochs", "cka_teacher", "teacher_probe_top1", "latency_ms_cpu_b1",
                "latency_ms_cpu_b32"):
        assert m[key] is not None, key
    assert m["stage"] == "distill" and m["arch"] == "resnet18" and 0 <= m["cka_teacher"] <= 1
    assert set(m["losses"]) == {"embed", "hint", "relation", "kd", "ce"}
    assert a["meta"]["parents"] == [str(teacher)] and a["meta"]["stage"] == "distill"
    # The teacher's file is untouched and the student artifact loads as any backbone artifact.
    assert ckpt.load_model(full).head.out_features == 10
    assert OmegaConf.load(full / "config.yaml").teacher == str(teacher)


# ----------------------------------------------------------------------------- configs


def test_shipped_configs_load():
    cfg = load_config(Config, ROOT / "configs/quickstart.yaml", stage="distill")
    assert cfg.teacher == "runs/byol/quickstart" and cfg.teacher_head == ""
    assert (cfg.data.name, cfg.model.arch, cfg.loss.embed, cfg.loss.kd) == ("digits", "resnet18", 1.0, 1.0)
    recipe = load_config(Config, ROOT / "configs/distill/cifar10_r50_to_r18.yaml")
    assert recipe.teacher == "runs/byol/cifar10-r50" and recipe.model.cifar_stem
    grid = OmegaConf.load(ROOT / "configs/ablations/distill_losses.yaml")
    assert grid.stage == "distill" and set(grid.variants) == {"embed", "hint", "relation", "kd", "embed_kd", "all"}
    on = {}
    for name, overrides in grid.variants.items():
        cfg = load_config(Config, ROOT / grid.config, [f"{k}={v}" for k, v in overrides.items()])
        on[name] = {k for k in ("embed", "hint", "relation", "kd", "ce") if getattr(cfg.loss, k) > 0}
    assert on == {"embed": {"embed"}, "hint": {"hint"}, "relation": {"relation"}, "kd": {"kd"},
                  "embed_kd": {"embed", "kd"}, "all": {"embed", "hint", "relation", "kd"}}


# ----------------------------------------------------------------------------- end to end


def shifted_digits(root, size=16, seed=0):
    """scikit-learn's 8x8 digits at a random position of a 16x16 black canvas, as an image folder.

    Why this set: on plain upscaled digits a random-init ResNet-18 already probes at ~0.95
    (../shared/DESIGN.md), so "beats random init" could not fail. Random positions bring the
    random-init probe down to ~0.4 at this resolution (ImageNet stem, 16px), while a network
    trained with labels learns the translation invariance within a few epochs: a teacher with
    something to teach.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, size - 8 + 1, (len(digits.images), 2), generator=g).tolist()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        canvas = torch.zeros(size, size, dtype=torch.uint8)
        top, left = offsets[i]
        canvas[top:top + 8, left:left + 8] = torch.from_numpy(image * 255.0 / 16.0).round().to(torch.uint8)
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas.numpy()).convert("RGB").save(root / str(label) / f"{i:04d}.png")
    return root


def train_supervised_teacher(splits, epochs, seed=0):
    """The planted teacher: a ResNet-18 trained with labels (cross-entropy, Adam) on clean views."""
    from core.augment import eval_view

    torch.manual_seed(seed)
    backbone, head = build_backbone("resnet18", cifar_stem=False), nn.Linear(512, splits.num_classes)
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=2e-3)
    x = eval_view(splits.train.images, splits.image_size, splits.mean, splits.std)
    y = splits.train.labels
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.cross_entropy(head(backbone(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return backbone.eval(), head.eval()


E2E = [
    "data.name=imagefolder", "data.image_size=16", "data.val_fraction=0.2",
    "model.arch=resnet18", "model.cifar_stem=false",
    "train.epochs=4", "train.batch_size=128", "train.optimizer=adamw", "train.lr=0.004",
    "train.weight_decay=0.0", "train.warmup_epochs=0.5",
    # Mild views: a small crop of a 16px canvas often misses the 8px digit altogether.
    "aug.crop_scale_min=0.6", "aug.flip_p=0.0", "aug.jitter_p=0.0", "aug.grayscale_p=0.0",
    "aug.blur_p1=0.0", "aug.blur_p2=0.0", "aug.solarize_p2=0.0",
    "loss.embed=1.0",  # label-free: the student never sees a label, only the teacher's embedding
    "eval.knn_every_epochs=0", "eval.knn_k=20", "eval.probe_epochs=30", "latency.enabled=false",
    "engine.device=cpu", "engine.progress=false", "track.mode=disabled",
]


@pytest.mark.slow
def test_distilled_student_beats_random_init_on_shifted_digits(run_root, tmp_path):
    from core import data as datalib
    from core.evaluate import evaluate_backbone, extract_features, linear_cka

    data = [f"data.root={shifted_digits(tmp_path / 'digits')}", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(Config, None, [*E2E, *data, f"run_root={run_root}", "teacher=" + str(run_root / "byol" / "t")])
    splits = datalib.load_splits(cfg.data)
    device = torch.device("cpu")

    backbone, _ = train_supervised_teacher(splits, epochs=4)
    teacher_metrics, head = evaluate_backbone(backbone, splits, cfg.eval, device, False, probe=True)
    meta = {"stage": "byol", "name": "t", "data": "imagefolder", "num_classes": 10, "image_size": 16, "parents": []}
    ckpt.save_model(run_root / "byol" / "t", backbone, backbone_spec(backbone, "resnet18", False), meta, head)

    # The same student at random init: the stage seeds, then builds it first.
    torch.manual_seed(cfg.seed)
    random_student = build_backbone("resnet18", cifar_stem=False)
    random_metrics, _ = evaluate_backbone(random_student, splits, cfg.eval, device, False, cfg.seed, probe=True)

    def features(net):
        return extract_features(net, splits.val.images, splits.mean, splits.std, 16, device)

    random_cka = linear_cka(features(random_student), features(backbone))
    # What `embed` optimises, before training: a fresh projector on the random student's features.
    teacher_art = ckpt.load_model(run_root / "byol" / "t")
    fresh = Distiller(teacher_art, random_student, cfg.loss, 10, 16).eval()
    with torch.no_grad():
        random_cosine = nn.functional.cosine_similarity(fresh.projector(features(random_student)),
                                                        features(backbone), dim=1).mean().item()

    out = run(cfg)
    m = json.loads((out / "metrics.json").read_text())
    print(f"teacher probe {teacher_metrics['probe_top1']:.3f}, random-init student {random_metrics['probe_top1']:.3f}"
          f" (CKA {random_cka:.3f}, embedding cosine {random_cosine:.3f}), distilled {m['probe_top1']:.3f}"
          f" (CKA {m['cka_teacher']:.3f}, embedding cosine {m['embed_cosine_val']:.3f})")
    assert teacher_metrics["probe_top1"] > random_metrics["probe_top1"] + 0.2, "the planted teacher is too weak"
    # Measured, seeds 0 and 1 on the AVX-512 and AVX2 paths: probe 0.35-0.38 -> 0.56-0.59; the
    # val cosine of the projected student to the teacher -0.03-0.04 -> 0.74-0.76. Linear CKA is
    # printed, not asserted: its gain over the same four runs was 0.29, 0.16, 0.00 and 0.01.
    assert m["probe_top1"] > random_metrics["probe_top1"] + 0.1
    assert m["embed_cosine_val"] > random_cosine + 0.5
    # The teacher's probe head (in its model.pt) scores the same on the same val split.
    assert m["teacher_probe_top1"] == pytest.approx(teacher_metrics["probe_top1"], abs=1e-6)


def test_student_init_keeps_a_pruned_architecture_with_or_without_its_weights(run_root, teacher):
    """student_init of a pruned artifact: its channel widths survive; student_reinit draws
    fresh weights (torchvision's init) instead of copying them."""
    from distill.train import build_student
    from core.models import backbone_from_spec

    torch.manual_seed(1)
    spec = backbone_spec(build_backbone("resnet18", False), "resnet18", False)
    for name in ("layer1.0.conv1", "layer1.0.bn1"):
        spec["shapes"][name][0] = 40  # a narrower block, as pruning leaves it
    spec["shapes"]["layer1.0.conv2"][1] = 40
    pruned = backbone_from_spec(spec)
    with torch.no_grad():
        for p in pruned.parameters():
            p.normal_()  # weights no fresh init would give (BN scales far from 1)
    ckpt.save_model(run_root / "prune" / "p", pruned, spec, {"stage": "prune"})
    init = [f"student_init={run_root / 'prune' / 'p'}"]

    kept = build_student(distill_cfg(run_root, teacher, *init))
    fresh = build_student(distill_cfg(run_root, teacher, *init, "student_reinit=true"))
    for student in (kept, fresh):
        assert student.layer1[0].conv1.weight.shape[0] == 40 and student.layer1[0].conv2.weight.shape[1] == 40
    assert torch.equal(kept.layer1[0].conv1.weight, pruned.layer1[0].conv1.weight)
    assert not torch.equal(fresh.layer1[0].conv1.weight, pruned.layer1[0].conv1.weight)
    assert torch.equal(fresh.layer1[0].bn1.weight, torch.ones(40))
    # He fan-out normal: std sqrt(2 / (out_channels * k * k)), as torchvision's fresh ResNet.
    w = fresh.layer2[0].conv1.weight
    assert w.std().item() == pytest.approx((2 / (w.shape[0] * 9)) ** 0.5, rel=0.1)
    with pytest.raises(UserError, match="student_reinit=true re-initialises"):
        build_student(distill_cfg(run_root, teacher, "student_reinit=true"))
