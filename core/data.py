"""Dataset registry, train/val split by seed, and the two input paths.

Small images (CIFAR, STL-10, digits, synthetic, and any ImageFolder with `in_memory=True`)
are decoded once into a uint8 tensor [N, 3, S, S] (cached on disk for ImageFolder), moved to
the training device whole, and batched by indexing: no DataLoader, no workers, no host
round trip. Large images (ImageFolder with `in_memory=False`) stream JPEG bytes from
DataLoader workers and are decoded in batches on the device (`torchvision.io.decode_jpeg`).
Either way a stage sees uint8 batches on its device and augments them with `core.augment`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from core.config import DataConfig
from core.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ImageSet:
    """Images held in memory as uint8 [N, 3, H, W] with int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    classes: Tuple[str, ...] = ()  # class names where the data has them (image folders)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.num_classes, self.classes)

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device), self.num_classes, self.classes)


@dataclass
class Splits:
    train: "ImageSet | JpegFolder"
    val: "ImageSet | JpegFolder"
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    image_size: int
    # The held-out test split (data.test): reported beside val as test_*, never used to decide
    # anything (no early stopping, no head selection); None where the data has none.
    test: "ImageSet | JpegFolder | None" = None
    test_name: str = ""  # where it came from, e.g. "cifar10 test (10000)"
    unlabeled: Optional[ImageSet] = None  # stl10's unlabelled images, for self-supervised training


# ----------------------------------------------------------------------------- registry


def load_splits(cfg: DataConfig, self_supervised: bool = False) -> Splits:
    """The training set with a validation split carved from it by `cfg.split_seed`, the test
    split where one is configured (data.test), and stl10's unlabelled images for a
    self-supervised stage (data.unlabeled)."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"bad value for 'data.val_fraction': {cfg.val_fraction}; expected 0 <= x < 1")
    if cfg.image_size < 8:
        raise UserError(f"bad value for 'data.image_size': {cfg.image_size}; expected >= 8")
    if cfg.unlabeled == "true" and cfg.name != "stl10":
        raise UserError(f"data.unlabeled=true: only stl10 has an unlabelled split, not data.name={cfg.name}")
    if cfg.test_root and cfg.name != "imagefolder":
        raise UserError(f"data.test_root is for data.name=imagefolder; {cfg.name} brings its own test split "
                        f"(data.test=auto uses it)")
    if cfg.name == "imagefolder" and not cfg.in_memory:
        paths, labels, classes = scan_image_folder(Path(cfg.root))
        full, test = JpegFolder(paths, labels, len(classes)), None
        if wants_test(cfg):
            test_paths, test_labels, test_classes = scan_test_folder(cfg)
            check_test_classes(cfg, classes, test_classes)
            test = JpegFolder(test_paths, test_labels, len(test_classes))
        train_idx, val_idx = carve_validation(len(full), cfg.val_fraction, cfg.split_seed)
        return Splits(full.subset(train_idx), full.subset(val_idx), full.num_classes,
                      IMAGENET_MEAN, IMAGENET_STD, cfg.image_size, test, name_test_split(cfg, test))
    if cfg.name == "imagefolder" and wants_test(cfg):  # a bad test folder stops before the decode
        check_test_classes(cfg, scan_image_folder(Path(cfg.root))[2], scan_test_folder(cfg)[2])
    full = LOADERS[cfg.name](cfg)
    full, test = split_off_test(cfg, full)
    train_idx, val_idx = carve_validation(len(full), cfg.val_fraction, cfg.split_seed)
    train = full.subset(train_idx)
    mean, std = channel_stats(train.images)
    unlabeled = load_stl10_unlabeled(cfg) if cfg.name == "stl10" and (
        cfg.unlabeled == "true" or (cfg.unlabeled == "auto" and self_supervised)) else None
    return Splits(train, full.subset(val_idx), full.num_classes, mean, std, cfg.image_size, test,
                  name_test_split(cfg, test), unlabeled)


def with_unlabeled(train: ImageSet, unlabeled: ImageSet) -> ImageSet:
    """train + unlabelled images (label -1) as one training set for a stage that ignores labels."""
    return ImageSet(torch.cat([train.images, unlabeled.images]), torch.cat([train.labels, unlabeled.labels]),
                    train.num_classes, train.classes)


# ----------------------------------------------------------------------------- test splits

DIGITS_TEST_FRACTION, DIGITS_TEST_SEED = 0.2, 2026  # fixed: the same 359 test digits for every split_seed


def wants_test(cfg: DataConfig) -> bool:
    """data.test as a yes/no: auto = the dataset has an official test split (or data.test_root)."""
    if cfg.test == "false":
        return False
    has = cfg.name in ("cifar10", "cifar100", "stl10") or (cfg.name == "imagefolder" and bool(cfg.test_root))
    if cfg.test == "true" and not has and cfg.name != "digits":
        need = "data.test_root=DIR (a folder of class folders)" if cfg.name == "imagefolder" else "another dataset"
        raise UserError(f"data.test=true: data.name={cfg.name} has no test split; it needs {need}, "
                        f"or data.test=auto (a test split only where the data has one)")
    return has or (cfg.test == "true" and cfg.name == "digits")


def name_test_split(cfg: DataConfig, test) -> str:
    if test is None:
        return ""
    where = cfg.test_root if cfg.name == "imagefolder" else f"{cfg.name} test"
    return f"{where} ({len(test)})"


def split_off_test(cfg: DataConfig, full: ImageSet) -> Tuple[ImageSet, Optional[ImageSet]]:
    """(what train and val are carved from, the test split or None)."""
    if not wants_test(cfg):
        return full, None
    if cfg.name == "digits":  # no official split: a fixed fifth, held out before train/val
        rest, test = carve_validation(len(full), DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
        return full.subset(rest), full.subset(test)
    if cfg.name == "imagefolder":
        return full, load_image_folder_in_memory(replace(cfg, root=cfg.test_root))
    return full, TEST_LOADERS[cfg.name](cfg)


def scan_test_folder(cfg: DataConfig) -> Tuple[list, list, list]:
    """scan_image_folder of data.test_root, its errors naming both folders."""
    try:
        return scan_image_folder(Path(cfg.test_root))
    except UserError as e:
        raise UserError(f"data.test_root: {e} (training folder: {cfg.root})") from None


def check_test_classes(cfg: DataConfig, train_classes: list, test_classes: list) -> None:
    """The test folder's class folders must be the training folder's: labels are folder indices."""
    if list(train_classes) != list(test_classes):
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        what = (f"only in training: {', '.join(only_train[:5]) or '-'}; only in test: {', '.join(only_test[:5]) or '-'}"
                if only_train or only_test else "same names in another order")
        raise UserError(f"the test folder {cfg.test_root} has other classes than the training folder {cfg.root} "
                        f"({len(test_classes)} vs {len(train_classes)}; {what})")


def carve_validation(n: int, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split of range(n): the same seed always gives the same (train, val)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def channel_stats(images: torch.Tensor, most: int = 10000) -> Tuple[tuple, tuple]:
    # Spread over the whole set: an image folder is sorted by class, and its first 10,000
    # (CIFAR-10: airplanes and cars) gave a blue mean of 0.508 instead of 0.447.
    index = torch.linspace(0, len(images) - 1, min(len(images), most)).round().long()
    x = images[index].float().div_(255)
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp_min(1e-3).tolist())


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, 3, size, size] (grey repeated to 3 channels)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = []
    for chunk in images.split(4096):
        out.append(F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False).round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def load_digits(cfg: DataConfig) -> ImageSet:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), upscaled."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images).float().mul_(255.0 / 16.0).round_().to(torch.uint8)[:, None]
    return ImageSet(_resize_uint8(x, cfg.image_size), torch.from_numpy(d.target).long(), 10)


def load_synthetic(cfg: DataConfig) -> ImageSet:
    """Class-conditional images: each class is a fixed smooth colour pattern plus noise."""
    g = torch.Generator().manual_seed(1234)
    k, n, s = cfg.synthetic_classes, cfg.synthetic_size, cfg.image_size
    templates = F.interpolate(torch.rand(k, 3, 4, 4, generator=g), size=(s, s), mode="bilinear",
                              align_corners=False)
    labels = torch.arange(n) % k
    x = templates[labels] * 0.7 + 0.3 * torch.rand(n, 3, s, s, generator=g)
    return ImageSet((x * 255).round().to(torch.uint8), labels, k)


def _torchvision_set(cls, cfg: DataConfig, **kwargs):
    try:
        return cls(root=cfg.root, download=cfg.download, **kwargs)
    except RuntimeError as e:
        if "not found" in str(e) or "corrupted" in str(e):
            raise UserError(f"{cls.__name__} not found under data.root={cfg.root!r}; "
                            "pass data.download=true or point data.root at it") from None
        raise


def load_cifar(cfg: DataConfig, train: bool = True) -> ImageSet:
    """CIFAR-10/100's train split (50,000 images), or its official test split (10,000)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    ds = _torchvision_set(cls, cfg, train=train)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
    return ImageSet(_resize_uint8(x, cfg.image_size), torch.tensor(ds.targets).long(), len(ds.classes),
                    tuple(ds.classes))


def load_stl10(cfg: DataConfig, split: str = "train") -> ImageSet:
    """STL-10's labelled train split (5,000 images at 96px), or its test split (8,000)."""
    from torchvision import datasets

    ds = _torchvision_set(datasets.STL10, cfg, split=split)
    x = torch.from_numpy(ds.data)
    return ImageSet(_resize_uint8(x, cfg.image_size), torch.from_numpy(ds.labels).long(), 10,
                    tuple(getattr(ds, "classes", ())))


def load_stl10_unlabeled(cfg: DataConfig) -> ImageSet:
    """STL-10's 100,000 unlabelled images (label -1): BYOL-style pretraining uses train + these."""
    return load_stl10(cfg, split="unlabeled")


def scan_image_folder(root: Path) -> Tuple[list, list, list]:
    """(paths, labels, class names) of root/<class>/<image>, sorted like torchvision's ImageFolder."""
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root} (data.root)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"no class folders in {root}: expected {root}/<class>/<image files>")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(f for f in (root / c).iterdir() if f.suffix in IMAGE_EXTENSIONS)
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS[:5])}) in the class folders of {root}")
    return paths, labels, classes


def default_cache_dir() -> Path:
    """The user's cache folder ($XDG_CACHE_HOME/byolc, else ~/.cache/byolc), not the dataset's:
    cluster datasets are often read-only or shared. Entries are keyed by the dataset's path."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "byolc"


def load_image_folder_in_memory(cfg: DataConfig) -> ImageSet:
    """Decode every image once (resized to image_size), cache the uint8 tensor on disk."""
    root = Path(cfg.root)
    paths, labels, classes = scan_image_folder(root)
    key = hashlib.sha1(f"{root.resolve()}|{len(paths)}|{paths[-1].name}|{cfg.image_size}".encode()).hexdigest()[:12]
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    cache = cache_dir / f"images-{cfg.image_size}px-{key}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return ImageSet(blob["images"], blob["labels"], len(blob["classes"]), tuple(blob["classes"]))
        except Exception:
            pass  # a stale or broken cache is rebuilt below
    images = torch.empty(len(paths), 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        images[i] = decode_image_file(path, cfg.image_size)
    blob = {"images": images, "labels": torch.tensor(labels), "classes": classes}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only dataset folder only costs the decode next time
    return ImageSet(images, blob["labels"], len(classes), tuple(classes))


def decode_image_file(path: Path, size: int) -> torch.Tensor:
    """uint8 [3, size, size]; a file that cannot be decoded stops with its path."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    except Exception as e:
        raise UserError(f"cannot decode image {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


LOADERS = {
    "digits": load_digits,
    "synthetic": load_synthetic,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "stl10": load_stl10,
    "imagefolder": load_image_folder_in_memory,
}
TEST_LOADERS = {  # the official test splits, read from the same files as train (torchvision's formats)
    "cifar10": lambda cfg: load_cifar(cfg, train=False),
    "cifar100": lambda cfg: load_cifar(cfg, train=False),
    "stl10": lambda cfg: load_stl10(cfg, split="test"),
}


def check_labels_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise UserError(f"bad value for 'labels_fraction': {fraction}; expected 0 < x <= 1 (e.g. 0.01, 0.1, 1.0)")


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices (sorted, int64) of a class-balanced `fraction` of `labels`, a pure function of the seed.

    Each class keeps round(fraction x its size) samples, at least one, drawn without
    replacement: the semi-supervised protocol of SimCLR (1% / 10% of ImageNet's labels sampled
    class-balanced, Chen et al. 2020, Sec. 6), which BYOL reports on (Grill et al. 2020, Sec. 4).
    Its own generator, so the subset neither depends on nor disturbs torch's global RNG.
    """
    check_labels_fraction(fraction)
    labels = torch.as_tensor(labels).cpu()
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique(sorted=True).tolist():  # class order is fixed, so the draws are too
        members = (labels == c).nonzero().flatten()
        keep = min(len(members), max(1, int(fraction * len(members) + 0.5)))  # half up, not banker's
        chosen.append(members[torch.randperm(len(members), generator=g)[:keep]])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


# ----------------------------------------------------------------------------- batching


def epoch_permutation(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The sample order of one epoch, a pure function of (seed, epoch): resume needs no state.

    With DDP each rank takes every world_size-th index of the same permutation.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)[rank::world_size]


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches only (drop_last), so every step sees the same batch size."""
    steps = (n // world_size) // batch_size
    if steps < 1:
        raise UserError(f"train.batch_size={batch_size} is larger than the {n} training images "
                        f"per process; lower train.batch_size")
    return steps


def in_memory_batches(data: ImageSet, order: torch.Tensor, batch_size: int, start: int = 0
                      ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """uint8 batches by indexing the (device-resident) tensor; starts at batch `start`."""
    order = order.to(data.images.device)
    for b in range(start, len(order) // batch_size):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield data.images[idx], data.labels[idx]


# ----------------------------------------------------------------------------- streaming JPEG


class JpegFolder(torch.utils.data.Dataset):
    """ImageFolder that returns raw file bytes: workers only read, the device decodes."""

    def __init__(self, paths, labels, num_classes):
        self.paths, self.labels, self.num_classes = list(paths), torch.as_tensor(labels), num_classes

    @classmethod
    def scan(cls, root: Path) -> "JpegFolder":
        paths, labels, classes = scan_image_folder(root)
        return cls(paths, labels, len(classes))

    def subset(self, index: torch.Tensor) -> "JpegFolder":
        return JpegFolder([self.paths[i] for i in index.tolist()], self.labels[index], self.num_classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        # The file's bytes in a tensor of its own. (torchvision's read_file returns a tensor on a
        # mapping of the file that a worker cannot send: with num_workers > 0 the DataLoader hung
        # on "Bad file descriptor" in the worker's queue; torchvision 0.29, torch 2.14.)
        data = Path(self.paths[i]).read_bytes()
        if not data:
            return torch.empty(0, dtype=torch.uint8), int(self.labels[i]), i
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), int(self.labels[i]), i


def _collate_bytes(batch):
    # One flat tensor per batch: a worker sends one shared-memory block, not one file descriptor
    # per image (hundreds per batch would run into the open-files limit).
    data, labels, index = zip(*batch)
    return torch.cat(data), torch.tensor([len(d) for d in data]), torch.tensor(labels), torch.tensor(index)


def jpeg_batches(folder: JpegFolder, order: torch.Tensor, batch_size: int, size: int, device,
                 num_workers: int, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """uint8 [B, 3, size, size] batches decoded on `device` (nvjpeg on CUDA, libjpeg on CPU)."""
    n_batches = len(order) // batch_size
    order = order[start * batch_size: n_batches * batch_size].tolist()
    loader = torch.utils.data.DataLoader(
        folder, batch_size=batch_size, sampler=order, num_workers=num_workers,
        collate_fn=_collate_bytes, pin_memory=False, persistent_workers=False, drop_last=True)
    for flat, sizes, labels, index in loader:
        data = list(flat.split(sizes.tolist()))
        yield decode_jpeg_batch(data, [folder.paths[i] for i in index.tolist()], size, device), labels.to(device)


def decode_jpeg_batch(data: list, paths: list, size: int, device) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    device = torch.device(device)
    try:
        if device.type == "cuda":
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        else:
            images = [decode_image(d, mode=ImageReadMode.RGB) for d in data]
    except RuntimeError:
        for d, p in zip(data, paths):  # find and name the bad file
            try:
                decode_image(d, mode=ImageReadMode.RGB)
            except RuntimeError as e:
                raise UserError(f"cannot decode image {p}: {str(e).splitlines()[0]}") from None
        raise
    # Square resize of each image: the random resized crop that follows samples scale and
    # aspect ratio anyway; a per-image loop because decoded sizes differ.
    return torch.stack([
        F.interpolate(im[None].float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
        for im in images])
