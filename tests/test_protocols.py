"""The field's evaluation protocols: official test splits in torchvision's on-disk formats and as
image folders, STL-10's unlabelled split, linear evaluation on augmented views, and test numbers
that never change a decision."""

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from core import data as datalib
from core.config import DataConfig
from core.data import ImageSet, Splits
from core.errors import UserError
from core.evaluate import LinearEvalConfig, evaluate_backbone, linear_eval
from core.config import EvalConfig


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- torchvision's formats


def write_cifar10(root, n_train=60, n_test=40):
    """cifar-10-batches-py as torchvision reads it: five pickled train batches, one test batch,
    batches.meta; each image's class is its row's first pixel value (so labels can be checked)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n, offset):
        labels = [(offset + i) % 10 for i in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = labels  # red channel, pixel (0, 0)
        return {"data": data, "labels": labels}

    names = [f"data_batch_{i}" for i in range(1, 6)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(pickle.dumps(batch(n_train // 5, i)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test, 3)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder, names


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder, names = write_cifar10(tmp_path / "cifar")
    # torchvision checks each file's md5 against the real archive's: point it at these files'.
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(folder / n)] for n in names])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(folder / "batches.meta")})
    return tmp_path / "cifar"


def test_cifar10_official_test_split_is_loaded_beside_train_and_val(cifar_root):
    cfg = DataConfig(name="cifar10", root=str(cifar_root), image_size=32, val_fraction=0.2)
    s = datalib.load_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (48, 12, 40)
    assert s.test_name == "cifar10 test (40)" and s.test.classes == tuple(f"c{i}" for i in range(10))
    # the right file behind each split: label == the planted pixel; test rows start at class 3
    for part in (s.train, s.val, s.test):
        assert torch.equal(part.images[:, 0, 0, 0].long(), part.labels)
    assert s.test.labels[:3].tolist() == [3, 4, 5]
    off = datalib.load_splits(DataConfig(name="cifar10", root=str(cifar_root), image_size=32, val_fraction=0.2,
                                         test="false"))
    assert off.test is None and torch.equal(off.train.images, s.train.images)


def write_stl10(root, n_train=30, n_test=20, n_unlabeled=50):
    """stl10_binary as torchvision reads it: column-major 96x96 images, labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        x.tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            np.array([i % 10 + 1 for i in range(n)], dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"s{i}" for i in range(10)) + "\n")
    return folder


@pytest.fixture
def stl_root(tmp_path, monkeypatch):
    from torchvision.datasets import STL10

    folder = write_stl10(tmp_path / "stl")
    monkeypatch.setattr(STL10, "train_list", [[n, md5(folder / n)] for n in ("train_X.bin", "train_y.bin",
                                                                               "unlabeled_X.bin")])
    monkeypatch.setattr(STL10, "test_list", [[n, md5(folder / n)] for n in ("test_X.bin", "test_y.bin")])
    return tmp_path / "stl"


def test_stl10_uses_unlabeled_for_self_supervised_training_only(stl_root):
    cfg = DataConfig(name="stl10", root=str(stl_root), image_size=32, val_fraction=0.2)
    byol = datalib.load_splits(cfg, self_supervised=True)
    assert (len(byol.train), len(byol.val), len(byol.test), len(byol.unlabeled)) == (24, 6, 20, 50)
    assert (byol.unlabeled.labels == -1).all() and byol.test.labels.tolist()[:3] == [0, 1, 2]
    assert byol.train.images.shape[1:] == (3, 32, 32)
    joined = datalib.with_unlabeled(byol.train, byol.unlabeled)
    assert len(joined) == 74 and joined.num_classes == 10
    probe = datalib.load_splits(cfg)  # a labelled stage: train only
    assert probe.unlabeled is None and len(probe.test) == 20
    off = datalib.load_splits(DataConfig(name="stl10", root=str(stl_root), image_size=32, unlabeled="false"),
                              self_supervised=True)
    assert off.unlabeled is None
    with pytest.raises(UserError, match="only stl10 has an unlabelled split"):
        datalib.load_splits(DataConfig(name="digits", unlabeled="true"))


def test_byol_trains_on_train_plus_unlabeled(stl_root, run_root):
    from byol.train import Config
    from core.config import load_config
    from core.loop import Run

    cfg = load_config(Config, None, ["data.name=stl10", f"data.root={stl_root}", "data.image_size=16",
                                     f"run_root={run_root}", "track.mode=disabled", "engine.device=cpu",
                                     "data.val_fraction=0.2", "train.batch_size=16"])
    r = Run(cfg, "byol")
    r.start(self_supervised=True)
    assert len(r.train_set) == 24 + 50 and len(r.splits.train) == 24
    assert r.steps_per_epoch == 74 // 16
    r.tracker.finish()


# ----------------------------------------------------------------------------- image folders


def write_folder(root, classes=("cat", "dog"), n=4, size=20):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            colour = (200, 30, 30) if c == "cat" else (30, 30, 200)
            Image.new("RGB", (size, size), colour).save(root / c / f"{i}.jpg")


@pytest.mark.parametrize("in_memory", [True, False])
def test_image_folder_test_root(tmp_path, in_memory):
    write_folder(tmp_path / "train", n=5)
    write_folder(tmp_path / "val", n=3)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "train"), test_root=str(tmp_path / "val"),
                     image_size=16, val_fraction=0.2, in_memory=in_memory, cache_dir=str(tmp_path / "cache"))
    s = datalib.load_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 2, 6)
    assert s.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    if in_memory:
        blue = s.test.images[s.test.labels == 1].float().mean((0, 2, 3))
        assert blue[2] > 150 and blue[0] < 80
    none = datalib.load_splits(DataConfig(name="imagefolder", root=str(tmp_path / "train"), image_size=16,
                                          val_fraction=0.2, in_memory=in_memory, cache_dir=str(tmp_path / "cache")))
    assert none.test is None and len(none.train) == 8


def test_test_split_errors_are_one_line_and_name_both_folders(tmp_path):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "other", classes=("cat", "cow"))
    (tmp_path / "empty").mkdir()
    base = dict(name="imagefolder", root=str(tmp_path / "train"), image_size=16, cache_dir=str(tmp_path / "c"))
    cases = {
        "other": "has other classes than the training folder .*only in training: dog; only in test: cow",
        "empty": "no class folders in .*empty.*training folder: .*train",
        "missing": "dataset folder not found: .*missing.*training folder: .*train",
    }
    for folder, message in cases.items():
        with pytest.raises(UserError, match=message) as e:
            datalib.load_splits(DataConfig(**base, test_root=str(tmp_path / folder)))
        assert "\n" not in str(e.value) and str(tmp_path / "train") in str(e.value)
    assert not (tmp_path / "c").exists(), "a bad test folder must stop before the training images are decoded"
    with pytest.raises(UserError, match="needs data.test_root"):
        datalib.load_splits(DataConfig(**base, test="true"))
    with pytest.raises(UserError, match="synthetic has no test split.*or data.test=auto"):
        datalib.load_splits(DataConfig(name="synthetic", test="true"))


def test_digits_test_split_is_fixed_and_apart_from_train_and_val():
    a = datalib.load_splits(DataConfig(name="digits", image_size=8, test="true", split_seed=0))
    b = datalib.load_splits(DataConfig(name="digits", image_size=8, test="true", split_seed=1))
    assert len(a.test) == 359 and len(a.train) + len(a.val) == 1797 - 359
    assert torch.equal(a.test.images, b.test.images)  # the same test digits for every split_seed
    full = datalib.load_digits(DataConfig(name="digits", image_size=8))
    rest, test_index = datalib.carve_validation(1797, datalib.DIGITS_TEST_FRACTION, datalib.DIGITS_TEST_SEED)
    assert not set(rest.tolist()) & set(test_index.tolist())
    train_index, val_index = datalib.carve_validation(len(rest), 0.1, 0)
    assert torch.equal(a.test.images, full.images[test_index])
    assert torch.equal(a.train.images, full.images[rest[train_index]])
    assert torch.equal(a.val.images, full.images[rest[val_index]])


# ----------------------------------------------------------------------------- linear evaluation


def colour_set(n, seed, classes=3, random_labels=False):
    """Images whose class is the bright channel, plus noise: crop- and flip-invariant, and
    linearly separable from their mean colour. random_labels: labels drawn apart from the colours."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.arange(n) % classes
    x = torch.full((n, 3, 12, 12), 50.0)
    x[torch.arange(n), colour] = 190.0
    x += torch.randint(-40, 41, x.shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g) if random_labels else colour
    return ImageSet(x.clamp(0, 255).to(torch.uint8), y, classes)


def mean_colour_backbone():
    """Features = the mean colour (a BatchNorm2d first, in eval mode the identity: core.models.feature_dim reads it)."""
    return nn.Sequential(nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def colour_splits(random_labels=False):
    return Splits(colour_set(300, 0, random_labels=random_labels), colour_set(90, 1, random_labels=random_labels), 3,
                  (0.5,) * 3, (0.25,) * 3, 12, test=colour_set(120, 2, random_labels=random_labels),
                  test_name="colours test (120)")


LINEAR = LinearEvalConfig(enabled=True, epochs=15, batch_size=32, lr=0.3, train_on="train")


def test_linear_eval_reaches_95_on_separable_images_and_reports_both_splits():
    metrics, head = linear_eval(mean_colour_backbone(), colour_splits(), LINEAR, torch.device("cpu"), progress=False)
    assert metrics["linear_top1"] >= 0.95 and metrics["test_linear_top1"] >= 0.95, metrics
    assert metrics["linear_train_on"] == "train" and metrics["linear_train_images"] == 300
    assert isinstance(head, nn.Linear) and head.in_features == 3


def test_linear_eval_fails_on_random_labels():
    metrics, _ = linear_eval(mean_colour_backbone(), colour_splits(random_labels=True), LINEAR, torch.device("cpu"),
                             progress=False)
    assert metrics["test_linear_top1"] < 0.6, metrics  # chance is 1/3: the 95% above is earned


def test_linear_eval_on_train_plus_val_reports_test_only_and_needs_a_test_split():
    from dataclasses import replace

    metrics, _ = linear_eval(mean_colour_backbone(), colour_splits(), replace(LINEAR, train_on="auto"),
                             torch.device("cpu"), progress=False)
    assert "linear_top1" not in metrics and metrics["test_linear_top1"] >= 0.95
    assert metrics["linear_train_on"] == "train+val" and metrics["linear_train_images"] == 390
    with pytest.raises(UserError, match="needs a test split"):
        linear_eval(mean_colour_backbone(), replace(colour_splits(), test=None), replace(LINEAR, train_on="train+val"),
                    torch.device("cpu"), progress=False)


def test_the_test_split_changes_no_head_and_no_val_number():
    from dataclasses import replace

    from core.models import build_backbone

    backbone = build_backbone("resnet18", cifar_stem=False).eval()
    splits = colour_splits()
    cfg = EvalConfig(knn_k=10, probe_epochs=5)
    with_test, head_a = evaluate_backbone(backbone, splits, cfg, torch.device("cpu"), False, seed=0)
    without, head_b = evaluate_backbone(backbone, replace(splits, test=None), cfg, torch.device("cpu"), False, seed=0)
    assert {k for k in with_test if k.startswith("test_")} == {"test_knn_top1", "test_probe_top1", "test_probe_top5"}
    assert {k: v for k, v in with_test.items() if not k.startswith("test_")} == without
    assert torch.equal(head_a.weight, head_b.weight) and torch.equal(head_a.bias, head_b.bias)
    short = replace(LINEAR, epochs=2)
    lin_a, la = linear_eval(backbone, splits, short, torch.device("cpu"), progress=False)
    lin_b, lb = linear_eval(backbone, replace(splits, test=None), short, torch.device("cpu"), progress=False)
    assert lin_a["linear_top1"] == lin_b["linear_top1"] and torch.equal(la.weight, lb.weight)


# ----------------------------------------------------------------------------- stages and tables


def test_probe_stage_writes_test_metrics_and_collect_shows_them(tmp_path, run_root):
    from core import checkpoint as ckpt
    from core.config import load_config
    from core.models import backbone_spec, build_backbone
    from launch.collect import collect
    from probe.train import Config, run

    write_folder(tmp_path / "train", n=12)
    write_folder(tmp_path / "test", n=6)
    backbone = build_backbone("resnet18", cifar_stem=False)
    art = run_root / "init" / "r18"
    ckpt.save_model(art, backbone, backbone_spec(backbone, "resnet18", False), {"stage": "init"})
    overrides = [
        "data.name=imagefolder", f"data.root={tmp_path / 'train'}", f"data.test_root={tmp_path / 'test'}",
        "data.image_size=16", "data.val_fraction=0.25", f"data.cache_dir={tmp_path / 'cache'}",
        f"run_root={run_root}", f"artifact={art}", "track.mode=disabled", "engine.device=cpu",
        "engine.progress=false", "eval.knn_k=5", "eval.probe_epochs=5",
        "linear.enabled=true", "linear.epochs=2", "linear.batch_size=8", "linear.train_on=train"]
    out = run(load_config(Config, None, overrides))
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("knn_top1", "probe_top1", "test_knn_top1", "test_probe_top1", "test_probe_top5", "test_linear_top1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["linear_train_on"] == "train" and "linear_top1" in metrics
    assert metrics["test_split"].endswith("test (12)") and (out / "linear_head.pt").is_file()
    # The same probe without the test split: the same head and the same val numbers.
    no_test = load_config(Config, None, [*(o for o in overrides if not o.startswith("data.test_root")), "name=no-test"])
    plain = run(no_test)
    again = json.loads((plain / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k in again and k not in ("seconds", "linear_train_on",
                                                                        "linear_train_images")} == \
        {k: v for k, v in again.items() if k in metrics and k not in ("seconds", "linear_train_on",
                                                                     "linear_train_images")}
    assert not any(k.startswith("test_") for k in again)
    heads = [torch.load(d / "head.pt", weights_only=True)["head"] for d in (out, plain)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    text = collect([run_root])
    header = text.splitlines()[2]
    assert "test columns: " in text and "test (12)" in text
    for label in ("val probe top-1", "test probe top-1", "test kNN top-1", "test linear top-1"):
        assert label in header, header
