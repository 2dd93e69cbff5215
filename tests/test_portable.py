"""Bring your own backbone (core/portable.py): every layout the ecosystem writes imports to an
artifact whose features are bit-identical to the original model's; auto-detection says what
it found and refuses what it cannot tell apart; pickled objects, wrong shapes and unknown files
are one line; export round-trips into plain torchvision, pruned widths included."""

import argparse
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torchvision

from core import checkpoint as ckpt
from core import portable
from core.errors import UserError
from tests.conftest import ROOT


def torchvision_model(arch, cifar_stem, seed):
    """A seeded torchvision ResNet with a 10-way fc and BN statistics that are not the defaults."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=10)
    if cifar_stem:
        model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def prefixed(sd, prefix, drop_fc=True):
    return {prefix + k: v for k, v in sd.items() if not (drop_fc and k.startswith("fc."))}


def write_layout(fmt, online, target, path):
    """A checkpoint in `fmt`'s real key layout, heads and all (online / target: state_dicts)."""
    proj = {"weight": torch.randn(8, 4)}
    if fmt in ("torchvision", "timm"):
        blob = dict(online)
    elif fmt == "solo-learn":  # a Lightning checkpoint of solo-learn's BYOL
        blob = {"state_dict": {**prefixed(online, "backbone."), **prefixed(target, "momentum_backbone."),
                               "projector.0.weight": proj["weight"], "momentum_projector.0.weight": proj["weight"],
                               "predictor.0.weight": proj["weight"], "classifier.weight": torch.randn(10, 4)},
                "epoch": 3, "global_step": 30}
    elif fmt == "lightly":  # lightly's benchmark BYOL module
        blob = {"state_dict": {**prefixed(online, "backbone."), **prefixed(target, "teacher_backbone."),
                               "projection_head.layers.0.weight": proj["weight"],
                               "prediction_head.layers.0.weight": proj["weight"],
                               "online_classifier.classification_head.weight": torch.randn(10, 4)},
                "epoch": 3}
    elif fmt == "moco":  # MoCo v3: DDP-wrapped encoders whose fc is the projector MLP
        blob = {"state_dict": {**prefixed(online, "module.base_encoder."), **prefixed(target, "module.momentum_encoder."),
                               "module.base_encoder.fc.0.weight": proj["weight"],
                               "module.momentum_encoder.fc.0.weight": proj["weight"],
                               "module.predictor.0.weight": proj["weight"]},
                "epoch": 100, "arch": "resnet50"}
    elif fmt == "dino":  # DINO: student (DDP) and teacher, backbone + head
        blob = {"student": {**prefixed(online, "module.backbone."), "module.head.mlp.0.weight": proj["weight"]},
                "teacher": {**prefixed(target, "backbone."), "head.mlp.0.weight": proj["weight"]}, "epoch": 100}
    torch.save(blob, path)
    return path


def features(model, x):
    head, model.fc = model.fc, nn.Identity()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.fc = head


CASES = [("resnet18", True), ("resnet50", False)]


@pytest.mark.parametrize("arch,cifar_stem", CASES, ids=["r18-cifar", "r50-imagenet"])
@pytest.mark.parametrize("fmt", ["torchvision", "timm", "solo-learn", "lightly", "moco", "dino"])
def test_every_layout_imports_to_bit_identical_features(tmp_path, fmt, arch, cifar_stem):
    online, target = torchvision_model(arch, cifar_stem, 0), torchvision_model(arch, cifar_stem, 1)
    src = write_layout(fmt, online.state_dict(), target.state_dict(), tmp_path / "ckpt.pth")
    x = torch.randn(2, 3, 32, 32)
    # auto: the online network (DINO: its teacher, the one DINO evaluates)
    run_dir, said = portable.import_backbone(src, tmp_path / "runs/import/x", "x")
    assert said.startswith(f"{'torchvision' if fmt == 'timm' else fmt} layout, {arch}, "
                           f"{'CIFAR' if cifar_stem else 'ImageNet'} stem")
    expected = target if fmt == "dino" else online
    art = ckpt.load_model(run_dir)
    with torch.no_grad():
        assert torch.equal(art.backbone(x), features(expected, x))
    assert art.meta["format"] in (fmt, "torchvision") and art.meta["sha256"] and art.head is None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["arch"] == arch and metrics["params"] == sum(p.numel() for p in art.backbone.parameters())
    if fmt in ("solo-learn", "lightly", "moco", "dino"):  # the other network, on request
        other = "online" if fmt == "dino" else "target"
        run_dir, _ = portable.import_backbone(src, tmp_path / "runs/import/y", "y", fmt, other)
        with torch.no_grad():
            assert torch.equal(ckpt.load_model(run_dir).backbone(x), features(online if fmt == "dino" else target, x))
    if fmt == "torchvision":
        assert "fc.*" in art.meta["dropped"]


def test_safetensors_files_import_too(tmp_path):
    from safetensors.torch import save_file

    model = torchvision_model("resnet18", True, 0)
    src = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    run_dir, said = portable.import_backbone(src, tmp_path / "runs/import/s", "s")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ckpt.load_model(run_dir).backbone(x), features(model, x))


def test_refusals_are_one_line(tmp_path):
    sd = torchvision_model("resnet18", True, 0).state_dict()
    cases = []
    # pickled Python objects (a Lightning checkpoint's hyper-parameters)
    torch.save({"state_dict": prefixed(sd, "backbone."), "hparams": argparse.Namespace(lr=0.1)}, tmp_path / "p.ckpt")
    cases.append((tmp_path / "p.ckpt", {}, "needs pickled Python objects to load, which weights_only=True refuses"))
    # two layouts at once: which backbone is meant?
    torch.save({**sd, "state_dict": prefixed(sd, "module.base_encoder.")}, tmp_path / "two.pth")
    cases.append((tmp_path / "two.pth", {}, "is ambiguous: it matches the torchvision and the moco layouts"))
    # a wrong shape names its key
    bad = dict(sd)
    bad["layer2.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    torch.save(bad, tmp_path / "shape.pth")
    cases.append((tmp_path / "shape.pth", {}, "layer2.0.conv1.weight has shape [64, 64, 3, 3], resnet18 needs [128, 64, 3, 3]"))
    # a missing key names it
    torch.save({k: v for k, v in sd.items() if k != "layer3.1.bn2.weight"}, tmp_path / "missing.pth")
    cases.append((tmp_path / "missing.pth", {}, "1 missing and 0 unexpected backbone keys, the first missing layer3.1.bn2.weight"))
    # a layout asked for that the file does not have, and a file of no known layout
    torch.save(sd, tmp_path / "tv.pth")
    cases.append((tmp_path / "tv.pth", {"fmt": "dino"}, "does not have the dino layout"))
    torch.save({"weights": sd}, tmp_path / "odd.pth")
    cases.append((tmp_path / "odd.pth", {}, "matches none of the layouts"))
    for src, kwargs, message in cases:
        with pytest.raises(UserError) as e:
            portable.import_backbone(src, tmp_path / "runs/import/bad", "bad", **kwargs)
        assert message in str(e.value) and "\n" not in str(e.value), (src, str(e.value))
    assert not (tmp_path / "runs").exists()


README_LOADER = "def load_exported("


def readme_loader() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n", text.index("## Compress a backbone you already have")) + len("```python\n")
    code = text[start:text.index("```", start)]
    assert README_LOADER in code
    return code


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors"])
def test_export_round_trips_into_plain_torchvision_pruned_widths_included(tmp_path, fmt):
    """A pruned backbone with a probe head: exported, rebuilt by the README's loader in a fresh
    process with only torch and torchvision (load_state_dict strict), the same logits."""
    from core.models import backbone_from_spec, backbone_spec, build_backbone

    torch.manual_seed(0)
    spec = backbone_spec(build_backbone("resnet18", True), "resnet18", True)
    spec["shapes"]["layer1.0.conv1"], spec["shapes"]["layer1.0.bn1"] = [40, 64, 3, 3], [40]  # pruned
    spec["shapes"]["layer1.0.conv2"] = [64, 40, 3, 3]
    backbone = backbone_from_spec(spec).eval()
    head = nn.Linear(512, 10)
    art = tmp_path / "runs/prune/p"
    ckpt.save_model(art, backbone, spec, {"stage": "prune"}, head)
    files = portable.export_backbone(art, fmt)
    assert [f.name for f in files] == [f"backbone.{'pt' if fmt == 'torchvision' else 'safetensors'}", "spec.json"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = head(backbone(x))
    torch.save(x, tmp_path / "x.pt")
    weights = "backbone.pt" if fmt == "torchvision" else "backbone.safetensors"
    script = readme_loader() + textwrap.dedent(f"""
        import sys
        model = load_exported({str(art / 'export')!r}, {weights!r})
        assert not [m for m in sys.modules if m.split(".")[0] in ("core", "prune", "launch")]
        torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_import_and_export_commands_and_a_pipeline_from_an_imported_teacher(tmp_path, capsys):
    from launch.cli import main
    from launch.pipeline import plan_pipeline

    root = tmp_path / "runs"
    src = write_layout("moco", torchvision_model("resnet50", False, 0).state_dict(),
                       torchvision_model("resnet50", False, 1).state_dict(), tmp_path / "moco.pth.tar")
    assert main(["import", str(src), "name=r50", f"run_root={root}"]) == 0
    out = capsys.readouterr().out
    assert "moco layout, resnet50, ImageNet stem; dropped fc.*, module.momentum_encoder.*, module.predictor.*" in out
    assert main(["import", str(src), "name=r50", f"run_root={root}"]) == 2  # it exists: no silent replace
    assert "already holds an import of" in capsys.readouterr().err
    assert main(["import", str(src), "name=r50", f"run_root={root}", "overwrite=true", "part=target"]) == 0
    capsys.readouterr()
    assert main(["export", str(root / "import/r50"), "format=safetensors"]) == 0
    assert (root / "import/r50/export/backbone.safetensors").is_file()

    # The quickstart's pipeline from the probe on, with the imported backbone as its teacher
    art = str(root / "import/r50")
    _, planned = plan_pipeline(ROOT / "configs/quickstart.yaml", [f"run_root={root}", "skip=byol", "name=c",
                                                                 f"teacher={art}", f"artifact={art}"])
    assert [p.stage for p in planned] == ["probe", "distill", "prune", "quant"]
    distill = planned[1].cfg
    assert distill.teacher == art and distill.teacher_head == str(root / "probe/c") and planned[1].after == [0]
    with pytest.raises(UserError, match="has no step.s. nope"):
        plan_pipeline(ROOT / "configs/quickstart.yaml", [f"run_root={root}", "skip=nope"])
