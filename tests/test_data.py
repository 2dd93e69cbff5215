"""Datasets, splits, ImageFolder decoding and its errors."""

import pytest
import torch
from PIL import Image

from core import data as datalib
from core.config import DataConfig
from core.errors import UserError


def test_validation_split_is_deterministic_and_disjoint():
    train, val = datalib.carve_validation(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert not set(train.tolist()) & set(val.tolist())
    again = datalib.carve_validation(1000, 0.1, seed=3)
    other = datalib.carve_validation(1000, 0.1, seed=4)
    assert torch.equal(val, again[1]) and not torch.equal(val, other[1])


def test_digits_is_embedded_and_upscaled():
    s = datalib.load_splits(DataConfig(name="digits", image_size=16, val_fraction=0.2))
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (3, 16, 16)
    assert len(s.train) + len(s.val) == 1797 and s.num_classes == 10
    assert s.train.images.max() > 200  # strokes reach near white after the 0..16 -> 0..255 map


def test_epoch_permutation_is_pure_and_shards_partition():
    a = datalib.epoch_permutation(100, seed=1, epoch=2)
    assert torch.equal(a, datalib.epoch_permutation(100, seed=1, epoch=2))
    assert not torch.equal(a, datalib.epoch_permutation(100, seed=1, epoch=3))
    shards = [datalib.epoch_permutation(100, 1, 2, rank=r, world_size=2) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(100))


def _write_folder(root, n_per_class=4, size=20):
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            colour = (200, 30, 30) if c == "cat" else (30, 30, 200)
            Image.new("RGB", (size, size + i), colour).save(root / c / f"{i}.jpg")


def test_image_folder_in_memory_decodes_caches_and_labels(tmp_path):
    root = tmp_path / "folder"
    _write_folder(root)
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16, val_fraction=0.25,
                     cache_dir=str(tmp_path / "cache"))
    s = datalib.load_splits(cfg)
    assert s.num_classes == 2 and len(s.train) == 6 and len(s.val) == 2
    assert s.train.images.shape[1:] == (3, 16, 16)
    red = s.train.images[s.train.labels == 0].float().mean((0, 2, 3))
    assert red[0] > 150 and red[2] < 80  # class 0 ('cat') is the red one
    assert list((tmp_path / "cache").glob("*.pt")), "decoded tensor was not cached"
    again = datalib.load_splits(cfg)
    assert torch.equal(again.train.images, s.train.images)


def test_the_decode_cache_defaults_to_the_users_cache_not_the_dataset(tmp_path, monkeypatch):
    root = tmp_path / "folder"
    _write_folder(root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root.chmod(0o555)  # a read-only dataset, as clusters often share them
    try:
        datalib.load_splits(DataConfig(name="imagefolder", root=str(root), image_size=16, val_fraction=0.25))
    finally:
        root.chmod(0o755)
    assert list((tmp_path / "xdg" / "byolc").glob("images-16px-*.pt"))
    assert sorted(p.name for p in root.iterdir()) == ["cat", "dog"]  # nothing written beside the images


@pytest.mark.parametrize("in_memory", [True, False])
def test_corrupt_image_is_named(tmp_path, in_memory):
    root = tmp_path / "folder"
    _write_folder(root)
    bad = root / "dog" / "2.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16, val_fraction=0.0,
                     in_memory=in_memory, cache_dir=str(tmp_path / "cache"), num_workers=0)
    with pytest.raises(UserError, match=r"cannot decode image .*dog/2\.jpg"):
        s = datalib.load_splits(cfg)
        order = torch.arange(len(s.train))
        list(datalib.jpeg_batches(s.train, order, 4, 16, torch.device("cpu"), 0))


def test_streaming_jpeg_batches_decode_on_device(tmp_path):
    root = tmp_path / "folder"
    _write_folder(root)
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16, val_fraction=0.0, in_memory=False)
    s = datalib.load_splits(cfg)
    batches = list(datalib.jpeg_batches(s.train, torch.arange(8), 4, 16, torch.device("cpu"), 0))
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 16, 16) and batches[0][0].dtype == torch.uint8


@pytest.mark.parametrize("name, root", [("imagefolder", "/nonexistent/folder"), ("cifar10", "/nonexistent/cifar")])
def test_missing_dataset_path_is_a_clear_error(name, root):
    with pytest.raises(UserError) as e:
        datalib.load_splits(DataConfig(name=name, root=root, download=False))
    assert "/nonexistent/" in str(e.value) and "\n" not in str(e.value)


def test_batch_larger_than_dataset_is_a_clear_error():
    with pytest.raises(UserError, match="train.batch_size=512 is larger"):
        datalib.steps_per_epoch(100, 512)


def test_channel_stats_cover_a_class_sorted_set():
    # An image folder is sorted by class: a dark class first, then a bright one.
    images = torch.cat([torch.full((30000, 3, 2, 2), 50, dtype=torch.uint8),
                        torch.full((30000, 3, 2, 2), 200, dtype=torch.uint8)])
    mean, std = datalib.channel_stats(images)
    assert mean == pytest.approx((125 / 255,) * 3, abs=0.01)
    assert std == pytest.approx((75 / 255,) * 3, abs=0.01)
