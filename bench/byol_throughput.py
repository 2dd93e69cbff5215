"""BYOL training throughput, lightly-style pipeline against the project's, and what each learns.

Per architecture (ResNet-18/50 with the CIFAR stem, the recipe of configs/byol/cifar10_<arch>.yaml:
LARS, BYOL heads, the project's CIFAR augmentation), images/s of a full BYOL step:

  a       lightly-style: lightly's BYOLTransform on PIL images in DataLoader workers
          (torchvision ImageFolder, pinned memory), lightly's LARS, eager fp32
  a_bf16  the same with bf16 autocast and channels_last
  b       the project's pipeline: byol/train.py's build_networks / make_views / train_step on
          uint8 images resident on the device (core.data), both views built there per step
          (core.augment), bf16 autocast, channels_last, torch.compile of the model step and
          of the views' arithmetic (auto: CUDA only), foreach LARS and EMA (core.optim)
  c       b's model step on synthetic views already on the device: no data, no augmentation

and the ratios b/a, b/a_bf16 and b/c. Every pipeline reads its loss every 10 steps as
byol/train.py does (one host sync); all share the EMA update (the two foreach ops of lightly
1.6's update_momentum). Timing: `--warmup` steps (compilation, cudnn autotuning, worker
start) untimed, then `--steps` steps between two torch.cuda.synchronize() (perf_counter on
the CPU). The numbers are printed as a table and written to `--out` as JSON.

    python bench/byol_throughput.py --device cuda --out throughput.json
    python bench/byol_throughput.py --device cuda --imagefolder-224 /tmp/imagenet-shaped --archs resnet50
    python bench/byol_throughput.py --device cuda --learn-epochs 50 --archs resnet18
    python bench/byol_throughput.py --report bench/results/*.json        # the README table

Other modes (one per call):
  --imagefolder-224 DIR  a/b/c at 224 px (configs/byol/imagenet_r50.yaml's recipe, ImageNet stem)
                         from an ImageFolder: b streams JPEG bytes from DataLoader workers and
                         decodes them on the device (core.data.jpeg_batches). Build a folder of
                         CIFAR upscaled to 256 px with bench/make_imagenet_shaped.py.
  --learn-epochs N       trains with a and b for N epochs on the training split minus a
                         validation split carved by --split-seed, then kNN top-1 on that split
                         (core.evaluate, the same features code for both). Resumable: b is
                         byol.train.run (checkpoint.pt), a checkpoints every epoch.
  --augment              the two-view augmentation alone, views/s: core.augment (hand-written,
                         batched; eager and torch.compile'd) against kornia.augmentation with the
                         same definition (per-sample parameters, BYOL's fixed jitter order) and
                         against pipeline (a)'s lightly BYOLTransform on PIL (one process), at
                         32 px from the decoded data and at 224 px from 256 px uint8 batches; plus
                         the per-channel mean/std of each implementation's views of the same
                         images, which must agree (same distribution). DESIGN.md asks for the
                         comparison: the faster one is the project's (README, "Augmentation").
  --report FILE...       reads JSON files written by the modes above; prints the Markdown table.
The data is an ImageFolder (`--data`, default ../shared/data/cifar10/train beside the repo);
throughput runs use all of it for training (nothing carved).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from byol.train import Config, build_networks, make_views, train_step  # noqa: E402
from core.loop import LOG_EVERY, view_seed  # noqa: E402
from core.optim import build_optimizer, warmup_cosine  # noqa: E402
from core import checkpoint as ckpt  # noqa: E402
from core import data as datalib  # noqa: E402
from core import engine  # noqa: E402
from core.augment import AugmentConfig, apply_view, blur_kernel_size, two_view_augment  # noqa: E402
from core.config import load_config  # noqa: E402

PIPELINES = ("a", "a_bf16", "b", "c")
LABELS = {"a": "(a) lightly fp32", "a_bf16": "(a) lightly bf16+CL", "b": "(b) project", "c": "(c) synthetic"}
# The acceptance bars (timings are reported, never asserted in tests).
TARGETS = {"b_over_c": 0.9, "b_over_a": {"resnet18": 2.8, "resnet50": 3.0}, "knn_points_below_a": 0.5}
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10" / "train"
SHORT = {"resnet18": "r18", "resnet34": "r18", "resnet50": "r50"}


# ----------------------------------------------------------------------------- configs


def stage_config(args, arch: str, recipe: str, extra=()) -> Config:
    """The BYOL stage's config from a recipe file, pointed at the benchmark's data and device."""
    overrides = [
        f"model.arch={arch}", "data.name=imagefolder", f"data.root={args.data}",
        f"data.cache_dir={args.cache_dir}", f"data.num_workers={args.workers}",
        f"engine.device={args.device}", f"engine.compile={args.compile}", "engine.progress=false",
        "track.mode=disabled", *extra, *args.set,
    ]
    return load_config(Config, REPO / "configs" / "byol" / recipe, overrides)


def cifar_recipe(arch: str) -> str:
    return f"cifar10_{SHORT[arch]}.yaml"


def lightly_style(cfg: Config) -> Config:
    """cfg as lightly's examples train: eager, fp32, contiguous (NCHW) tensors."""
    c = copy.deepcopy(cfg)
    c.engine.compile, c.engine.precision, c.engine.channels_last = "never", "fp32", False
    return c


def with_bf16_channels_last(cfg: Config) -> Config:
    c = lightly_style(cfg)
    c.engine.precision, c.engine.channels_last = "bf16", True
    return c


def base_lr(cfg: Config) -> float:
    return cfg.train.lr * cfg.train.batch_size / 256  # core.loop.Run.base_lr's linear scaling rule


def lightly_optimizer(cfg: Config, online, lr: float):
    """lightly's LARS over the same parameter groups as the project's build_optimizer."""
    from lightly.utils.lars import LARS as LightlyLARS

    ours = build_optimizer(cfg.train, online.parameters(), lr)
    if cfg.train.optimizer != "lars":
        return ours
    return LightlyLARS([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in ours.param_groups],
                       lr=lr, momentum=cfg.train.momentum)


def lightly_transform(aug: AugmentConfig, size: int, mean, std):
    """lightly's BYOLTransform with the project's augmentation parameters (core.augment)."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    common = dict(input_size=size, cj_prob=aug.jitter_p, cj_strength=1.0, cj_bright=aug.brightness,
                  cj_contrast=aug.contrast, cj_sat=aug.saturation, cj_hue=aug.hue,
                  min_scale=aug.crop_scale_min, random_gray_scale=aug.grayscale_p,
                  sigmas=(aug.blur_sigma_min, aug.blur_sigma_max), hf_prob=aug.flip_p,
                  normalize={"mean": list(mean), "std": list(std)})
    return BYOLTransform(
        BYOLView1Transform(**common, gaussian_blur=aug.blur_p1, solarization_prob=aug.solarize_p1),
        BYOLView2Transform(**common, gaussian_blur=aug.blur_p2, solarization_prob=aug.solarize_p2))


class PilFolder(torch.utils.data.Dataset):
    """What torchvision's ImageFolder does per sample (its pil_loader, then the transform), over
    core.data's file list, so sample i is the same image in both pipelines."""

    def __init__(self, root: Path, transform, index=None):
        paths, labels, _ = datalib.scan_image_folder(Path(root))
        index = range(len(paths)) if index is None else index.tolist()
        self.paths, self.labels = [paths[i] for i in index], [labels[i] for i in index]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.datasets.folder import pil_loader

        return self.transform(pil_loader(str(self.paths[i]))), self.labels[i]


def pil_loader(dataset, batch_size: int, workers: int, device: torch.device, sampler=None, seed=None):
    """A DataLoader as lightly's examples use: shuffled (or `sampler`), workers, pinned memory."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0 and sampler is None,
        generator=None if seed is None else torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forever(make_epoch):
    """Batches of epoch 0, 1, 2, ... without end."""
    for epoch in itertools.count():
        yield from make_epoch(epoch)


def measure(batches, step_fn, steps: int, warmup: int, batch_size: int, device: torch.device) -> dict:
    """Images/s of `step_fn(i, batch) -> loss` over `steps` steps after `warmup` untimed ones.

    The time includes waiting for the next batch. Losses are read every LOG_EVERY steps, as
    byol/train.py reads them (one host sync), and checked finite.
    """
    pending = []

    def run(i):
        pending.append(step_fn(i, next(batches)))
        if (i + 1) % LOG_EVERY == 0 or i + 1 == warmup + steps:
            values = torch.stack(pending).tolist()
            pending.clear()
            if not all(math.isfinite(v) for v in values):
                raise RuntimeError(f"non-finite loss at step {i}: {values}")
            return values[-1]

    for i in range(warmup):
        run(i)
    sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        last = run(i)
    sync(device)
    seconds = time.perf_counter() - start
    return {"img_per_s": steps * batch_size / seconds, "seconds": seconds, "steps": steps, "warmup": warmup,
            "batch_size": batch_size, "last_loss": last}


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- pipelines


def make_step(cfg: Config, device: torch.device, nets, optimizer, lr: float, views_of, total_steps: int):
    """The loop's per-step work: schedules, views, train_step (lr constant here)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.utils.scheduler import cosine_schedule

    criterion = NegativeCosineSimilarity()
    nets.online.train(), nets.target.train()

    def step(i, batch):
        for group in optimizer.param_groups:
            group["lr"] = lr
        momentum = cosine_schedule(i, total_steps, cfg.byol.momentum_start, cfg.byol.momentum_end)
        view1, view2 = views_of(i, batch)
        return train_step(nets, optimizer, criterion, view1, view2, momentum, cfg, device)

    return step


def run_lightly(cfg: Config, args, device, dataset, steps: int, warmup: int) -> dict:
    """Pipeline a / a_bf16: PIL views from DataLoader workers, lightly's LARS, eager."""
    engine.seed_everything(cfg.seed)
    nets = build_networks(cfg, device, engine.Dist())
    lr = base_lr(cfg)
    optimizer = lightly_optimizer(cfg, nets.online, lr)
    loader = pil_loader(dataset, cfg.train.batch_size, args.workers, device)
    channels_last = device.type == "cuda" and cfg.engine.channels_last

    def views_of(i, batch):
        (v1, v2), _ = batch
        v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
        if channels_last:
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
        return v1, v2

    step = make_step(cfg, device, nets, optimizer, lr, views_of, warmup + steps)
    result = measure(forever(lambda epoch: loader), step, steps, warmup, cfg.train.batch_size, device)
    result["optimizer"] = type(optimizer).__module__ + "." + type(optimizer).__name__
    del nets, optimizer
    loader = None  # its workers end (the lambda above holds the name, so not `del`)
    free(device)
    return result


def project_nets(cfg: Config, device):
    engine.seed_everything(cfg.seed)
    nets = build_networks(cfg, device, engine.Dist())
    optimizer = build_optimizer(cfg.train, nets.online.parameters(), base_lr(cfg))
    return nets, optimizer


def run_project(cfg: Config, device, splits, nets, optimizer, steps: int, warmup: int) -> dict:
    """Pipeline b: byol.train's data path (uint8 on the device, or streamed JPEG decoded there),
    views made on the device, train_step."""
    batch_size = cfg.train.batch_size
    if isinstance(splits.train, datalib.ImageSet):
        train_set = splits.train.to(device)

        def epoch_batches(epoch):
            order = datalib.epoch_permutation(len(train_set), cfg.seed, epoch)
            return datalib.in_memory_batches(train_set, order, batch_size)
    else:
        train_set = splits.train

        def epoch_batches(epoch):
            order = datalib.epoch_permutation(len(train_set), cfg.seed, epoch)
            return datalib.jpeg_batches(train_set, order, batch_size, cfg.data.image_size, device,
                                        cfg.data.num_workers)
    datalib.steps_per_epoch(len(train_set), batch_size)  # a clear error if the folder is too small
    aug_gen = torch.Generator(device=device)

    def views_of(i, batch):
        aug_gen.manual_seed(view_seed(cfg.seed, 0, i))
        return make_views(batch[0], cfg, aug_gen, splits.mean, splits.std, device, nets.augment)

    step = make_step(cfg, device, nets, optimizer, base_lr(cfg), views_of, warmup + steps)
    result = measure(forever(epoch_batches), step, steps, warmup, batch_size, device)
    result["optimizer"] = type(optimizer).__module__ + "." + type(optimizer).__name__
    return result


def run_synthetic(cfg: Config, device, nets, optimizer, steps: int, warmup: int) -> dict:
    """Pipeline c: the same step on two fixed normalised views already on the device."""
    g = torch.Generator(device=device).manual_seed(0)
    size, batch_size = cfg.data.image_size, cfg.train.batch_size
    views = [torch.randn(batch_size, 3, size, size, generator=g, device=device) for _ in range(2)]
    if device.type == "cuda" and cfg.engine.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    step = make_step(cfg, device, nets, optimizer, base_lr(cfg), lambda i, batch: views, warmup + steps)
    return measure(itertools.repeat(None), step, steps, warmup, batch_size, device)


def ratios(row: dict, arch: str) -> None:
    def ratio(x, y):
        return row[x]["img_per_s"] / row[y]["img_per_s"] if x in row and y in row else None

    row["b_over_a"], row["b_over_a_bf16"], row["b_over_c"] = ratio("b", "a"), ratio("b", "a_bf16"), ratio("b", "c")
    bar_a = TARGETS["b_over_a"].get(arch)
    row["targets"] = {"b_over_a": bar_a, "b_over_c": TARGETS["b_over_c"]}
    row["meets_targets"] = None if row["b_over_a"] is None or row["b_over_c"] is None or bar_a is None else (
        row["b_over_a"] >= bar_a and row["b_over_c"] >= TARGETS["b_over_c"])


def throughput(args, device, archs, recipe_of, extra, pipelines) -> dict:
    """a / a_bf16 / b / c for each arch on one data folder; returns {arch: row}."""
    results = {}
    splits = None
    for arch in archs:
        cfg = stage_config(args, arch, recipe_of(arch), extra)
        if splits is None:  # the data is the same for every arch: decode (or stream-scan) it once
            splits = datalib.load_splits(cfg.data)
            log(f"data: {len(splits.train)} training images from {cfg.data.root} "
                f"({'in device memory' if isinstance(splits.train, datalib.ImageSet) else 'streamed JPEG'})")
        steps, warmup = args.steps, args.warmup
        row = {}
        if any(p in pipelines for p in ("a", "a_bf16")):
            dataset = PilFolder(cfg.data.root, lightly_transform(cfg.aug, cfg.data.image_size, splits.mean, splits.std))
            for name, variant in (("a", lightly_style), ("a_bf16", with_bf16_channels_last)):
                if name in pipelines:
                    log(f"{arch} {LABELS[name]} ...")
                    row[name] = run_lightly(variant(cfg), args, device, dataset, steps, warmup)
                    log(f"{arch} {LABELS[name]}: {row[name]['img_per_s']:,.0f} img/s")
        if "b" in pipelines or "c" in pipelines:
            nets, optimizer = project_nets(cfg, device)
            if "b" in pipelines:
                log(f"{arch} {LABELS['b']} ...")
                row["b"] = run_project(cfg, device, splits, nets, optimizer, steps, warmup)
                log(f"{arch} {LABELS['b']}: {row['b']['img_per_s']:,.0f} img/s")
            if "c" in pipelines:
                log(f"{arch} {LABELS['c']} ...")
                row["c"] = run_synthetic(cfg, device, nets, optimizer, steps, warmup)
                log(f"{arch} {LABELS['c']}: {row['c']['img_per_s']:,.0f} img/s")
            del nets, optimizer
            free(device)
        row["image_size"], row["batch_size"] = cfg.data.image_size, cfg.train.batch_size
        row["recipe"] = recipe_of(arch)
        ratios(row, arch)
        results[arch] = row
    return results


# ----------------------------------------------------------------------------- augmentation alone

AUGMENTS = ("project", "project_compiled", "kornia", "lightly")
AUG_LABELS = {"project": "core.augment eager", "project_compiled": "core.augment compiled",
              "kornia": "kornia.augmentation", "lightly": "lightly BYOLTransform (PIL, 1 process)"}
STATS_OF = ("project", "kornia", "lightly")  # compiled views = eager ones (tested): no stats of their own


def lightly_two_views(aug: AugmentConfig, size: int, mean, std, seed: int = 0):
    """Pipeline (a)'s views: lightly's BYOLTransform on one PIL image at a time, as a DataLoader
    worker runs it (here in this process). lightly's blur and solarization draw from numpy,
    torchvision's ops from torch: both seeded, so a run is repeatable."""
    import random

    import numpy as np
    from torchvision.transforms.functional import to_pil_image

    transform = lightly_transform(aug, size, mean, std)
    random.seed(seed), np.random.seed(seed)

    def views(images):
        pairs = [transform(to_pil_image(image)) for image in images.cpu()]
        return tuple(torch.stack(v).to(images.device) for v in zip(*pairs))

    return views


def kornia_two_views(aug: AugmentConfig, size: int, mean, std, device):
    """BYOL's two views with kornia.augmentation, op by op core.augment's definition: per-sample
    parameters, jitter in BYOL's fixed order, torchvision's factors (ColorJitter, not Jiggle)."""
    import kornia.augmentation as K

    def view(blur_p: float, solarize_p: float):
        ops = [K.RandomResizedCrop((size, size), scale=(aug.crop_scale_min, aug.crop_scale_max),
                                   ratio=(aug.crop_ratio_min, aug.crop_ratio_max),
                                   cropping_mode="resample"),  # one batched warp ("slice" loops)
               K.RandomHorizontalFlip(p=aug.flip_p),
               K.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue, p=aug.jitter_p,
                             order=(0, 1, 2, 3)),
               K.RandomGrayscale(p=aug.grayscale_p)]
        if blur_p > 0:
            ops.append(K.RandomGaussianBlur(blur_kernel_size(size, aug), (aug.blur_sigma_min, aug.blur_sigma_max),
                                            p=blur_p))
        if solarize_p > 0:  # threshold exactly 0.5, nothing added: torchvision's solarize(x, 0.5)
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))
        ops.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
        return K.AugmentationSequential(*ops).to(device)

    view1, view2 = view(aug.blur_p1, aug.solarize_p1), view(aug.blur_p2, aug.solarize_p2)

    def views(images):
        x = images.float() / 255.0
        return view1(x), view2(x)

    return views


def project_two_views(aug: AugmentConfig, size: int, mean, std, device, compiled: bool, seed: int = 0):
    """core.augment's two views; `compiled`: apply_view through torch.compile, as byol/train.py
    runs it where it compiles (the random draws stay eager: two torch.rand calls per view)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    apply = torch.compile(apply_view) if compiled else apply_view
    return lambda images: two_view_augment(images, size, aug, gen, mean, std, apply)


def make_augment(name: str, aug: AugmentConfig, size: int, mean, std, device):
    if name == "kornia":
        return kornia_two_views(aug, size, mean, std, device)
    if name == "lightly":
        return lightly_two_views(aug, size, mean, std)
    return project_two_views(aug, size, mean, std, device, compiled=name == "project_compiled")


def view_statistics(views, images: torch.Tensor, rounds: int, batch_size: int) -> dict:
    """Per-channel mean and std of each view's (normalised) pixels, and the mean per-image std
    (sensitive to crop scale, blur and grayscale), over `rounds` passes of `images`."""
    totals = {v: torch.zeros(3, 3, dtype=torch.float64) for v in ("view1", "view2")}  # sum, sum sq, image std
    n_images, n_pixels = 0, 0
    with torch.no_grad():
        for _ in range(rounds):
            for chunk in images.split(batch_size):
                for name, x in zip(("view1", "view2"), views(chunk)):
                    x = x.double().cpu()
                    totals[name][0] += x.sum(dim=(0, 2, 3))
                    totals[name][1] += (x * x).sum(dim=(0, 2, 3))
                    totals[name][2] += x.flatten(2).std(dim=2).sum(dim=0)
                n_images += len(chunk)
                n_pixels += len(chunk) * x.shape[2] * x.shape[3]
    out = {"images": n_images}
    for name, t in totals.items():
        mean = t[0] / n_pixels
        out[name] = {"mean": mean.tolist(), "std": (t[1] / n_pixels - mean * mean).sqrt().tolist(),
                     "image_std": (t[2] / n_images).tolist()}
    return out


def augment_only(args, device, names) -> dict:
    """views/s of each augmentation at 32 px (the decoded data) and 224 px (256 px uint8
    batches: the data upscaled), and the view statistics of each at 32 px.

    Timed in `--augment-rounds` interleaved rounds (every implementation once per round, each
    round `--steps` steps after `--warmup`), and each implementation's median round reported:
    on a shared or throttling machine, back-to-back runs of one implementation drift apart by
    2-3x (measured on the 2-core CPU machine), interleaving exposes them to the same drift."""
    cfg = stage_config(args, "resnet18", cifar_recipe("resnet18"),
                       ["data.in_memory=true", "data.val_fraction=0.0", f"train.batch_size={args.batch_size}"])
    splits = datalib.load_splits(cfg.data)
    images = splits.train.images.to(device)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    log(f"data: {len(images)} images from {cfg.data.root}")
    results = {}
    for size, source_size, batch_size in ((cfg.data.image_size, None, args.batch_size),
                                          (args.image_size_224, 256, args.batch_size_224)):
        if len(images) < batch_size:
            raise SystemExit(f"--augment: {len(images)} images < batch size {batch_size}")
        if source_size:  # upscaled before timing (4 batches, cycled): the timing is the views' alone
            pool = [F.interpolate(images[order[i * batch_size:(i + 1) * batch_size].to(device)].float(),
                                  size=source_size, mode="bilinear").round().clamp(0, 255).byte()
                    for i in range(min(4, len(images) // batch_size))]
            batches = itertools.cycle(pool)
        else:
            batches = (images[order[start:start + batch_size].to(device)]
                       for start in itertools.cycle(range(0, len(images) - batch_size + 1, batch_size)))
        torch.manual_seed(0)  # kornia draws from the global generator
        augments = {name: make_augment(name, cfg.aug, size, splits.mean, splits.std, device) for name in names}
        rounds = {name: [] for name in names}
        for r in range(args.augment_rounds):
            for name, views in augments.items():
                def step(i, batch, views=views):
                    v1, v2 = views(batch)
                    return v1.view(-1)[0] + v2.view(-1)[0]  # no reduction: the timing is the views'

                rounds[name].append(measure(batches, step, args.steps, args.warmup, batch_size, device))
                log(f"augment {AUG_LABELS[name]} at {size} px, round {r + 1}: "
                    f"{rounds[name][-1]['img_per_s']:,.0f} images/s (two views each)")
        row = {"image_size": size, "batch_size": batch_size, "source_size": source_size or images.shape[-1]}
        for name, runs in rounds.items():
            per_round = sorted(run["img_per_s"] for run in runs)
            median = per_round[len(per_round) // 2]
            row[name] = {**next(run for run in runs if run["img_per_s"] == median), "rounds": per_round}
            if source_size is None and name in STATS_OF:
                torch.manual_seed(0)
                views = make_augment(name, cfg.aug, size, splits.mean, splits.std, device)
                row[name]["stats"] = view_statistics(views, images[order[:args.stats_images].to(device)],
                                                     args.stats_rounds, batch_size)
        for other in ("kornia", "lightly"):
            if "project" in row and other in row:
                row[f"{other}_over_project"] = row[other]["img_per_s"] / row["project"]["img_per_s"]
                row[f"{other}_stats_max_abs_diff"] = max_stat_difference(row["project"].get("stats"),
                                                                         row[other].get("stats"))
        results[f"{size}px"] = row
    return results


def max_stat_difference(a, b):
    """Largest |difference| between two view_statistics results (normalised pixel units)."""
    if not a or not b:
        return None
    return max(abs(x - y) for view in ("view1", "view2") for key in ("mean", "std", "image_std")
               for x, y in zip(a[view][key], b[view][key]))


def print_augment(results: dict) -> None:
    print("\nTwo-view augmentation alone, images/s (two views each)\n")
    print("| px | batch | " + " | ".join(AUG_LABELS[n] for n in AUGMENTS)
          + " | kornia / eager | lightly / eager | max abs stat diff to eager: kornia, lightly |")
    print("|---|---|" + "---|" * len(AUGMENTS) + "---|---|---|")
    for row in results.values():
        cells = [fmt(row.get(n, {}).get("img_per_s")) for n in AUGMENTS]
        ratios = [fmt(row.get(f"{o}_over_project"), "{:.2f}") for o in ("kornia", "lightly")]
        diffs = [fmt(row.get(f"{o}_stats_max_abs_diff"), "{:.3f}") for o in ("kornia", "lightly")]
        print(f"| {row['image_size']} | {row['batch_size']} | " + " | ".join(cells + ratios) + f" | {', '.join(diffs)} |")


# ----------------------------------------------------------------------------- learning


def learn(args, device, arch: str, pipelines) -> dict:
    """N epochs of each pipeline on train minus a carved validation split; kNN top-1 on it."""
    from byol.train import run as run_byol

    extra = [f"data.val_fraction={args.val_fraction}", f"data.split_seed={args.split_seed}",
             f"train.epochs={args.learn_epochs}", f"train.batch_size={args.batch_size}",
             "eval.knn_every_epochs=0", "eval.probe=false", f"run_root={args.learn_dir}"]
    cfg = stage_config(args, arch, cifar_recipe(arch), extra + [f"name=learn-b-{arch}"])
    row = {"epochs": args.learn_epochs, "val_fraction": args.val_fraction, "split_seed": args.split_seed,
           "knn_k": cfg.eval.knn_k, "knn_temperature": cfg.eval.knn_temperature}
    if "b" in pipelines:
        log(f"learn {arch} (b) project: byol.train.run, {args.learn_epochs} epochs")
        metrics = ckpt.read_metrics(run_byol(cfg))
        row["b"] = {"knn_top1": metrics["knn_top1"], "seconds_per_epoch": metrics.get("seconds_per_epoch"),
                    "final_loss": metrics.get("final_loss")}
    if "a" in pipelines:
        row["a"] = learn_lightly(args, device, lightly_style(cfg), cfg)
    for p in ("a", "b"):  # an earlier call's result for the other pipeline, if there is one
        done = Path(args.learn_dir) / "byol" / f"learn-{p}-{arch}" / "metrics.json"
        if p not in row and done.is_file():
            metrics = json.loads(done.read_text())
            row[p] = {k: metrics.get(k) for k in ("knn_top1", "seconds_per_epoch", "final_loss")}
    if "a" in row and "b" in row:
        row["difference_points"] = 100 * (row["b"]["knn_top1"] - row["a"]["knn_top1"])
        row["meets_target"] = row["difference_points"] >= -TARGETS["knn_points_below_a"]
    return row


def learn_lightly(args, device, cfg: Config, eval_cfg: Config) -> dict:
    """Pipeline a for N epochs: PIL views from workers, lightly's LARS, eager fp32, byol.train's
    schedules, model and train_step. Checkpoints every epoch (resumes there, not bit-exact)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.utils.scheduler import cosine_schedule

    run_dir = Path(args.learn_dir) / "byol" / f"learn-a-{cfg.model.arch}"
    if (run_dir / "metrics.json").is_file():
        log(f"learn (a): {run_dir} is already finished")
        return json.loads((run_dir / "metrics.json").read_text())
    engine.seed_everything(cfg.seed)
    splits = datalib.load_splits(cfg.data)  # in memory: the kNN features and the same carve
    full = len(datalib.scan_image_folder(Path(cfg.data.root))[0])
    train_idx, _ = datalib.carve_validation(full, cfg.data.val_fraction, cfg.data.split_seed)
    dataset = PilFolder(cfg.data.root, lightly_transform(cfg.aug, cfg.data.image_size, splits.mean, splits.std),
                        train_idx)
    batch_size = cfg.train.batch_size
    steps_per_epoch = datalib.steps_per_epoch(len(dataset), batch_size)
    total_steps = cfg.train.epochs * steps_per_epoch
    nets = build_networks(cfg, device, engine.Dist())
    lr0 = base_lr(cfg)
    optimizer = lightly_optimizer(cfg, nets.online, lr0)
    warmup = int(cfg.train.warmup_epochs * steps_per_epoch)
    criterion = NegativeCosineSimilarity()
    epoch, history, epoch_seconds = 0, [], []
    if (run_dir / "checkpoint.pt").is_file():
        state = ckpt.safe_load(run_dir / "checkpoint.pt")
        nets.online.load_state_dict(state["online"])
        nets.target.load_state_dict(state["target"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, history, epoch_seconds = state["epoch"], state["history"], state["epoch_seconds"]
        log(f"learn (a): resumed {run_dir} at epoch {epoch}")
    nets.online.train(), nets.target.train()
    while epoch < cfg.train.epochs:
        log(f"learn (a) lightly-style {cfg.model.arch}: epoch {epoch + 1}/{cfg.train.epochs}")
        order = datalib.epoch_permutation(len(dataset), cfg.seed, epoch).tolist()
        # Worker seeds from (seed, epoch): an epoch redone after a restart draws the same views.
        loader = pil_loader(dataset, batch_size, args.workers, device, sampler=order, seed=cfg.seed * 1000 + epoch)
        start, losses = time.perf_counter(), []
        for i, ((v1, v2), _) in enumerate(loader):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, total_steps, lr0, warmup)
            momentum = cosine_schedule(step, total_steps, cfg.byol.momentum_start, cfg.byol.momentum_end)
            losses.append(train_step(nets, optimizer, criterion, v1.to(device, non_blocking=True),
                                     v2.to(device, non_blocking=True), momentum, cfg, device))
        values = torch.stack(losses).tolist()
        if not all(math.isfinite(v) for v in values):
            raise SystemExit(f"learn (a): non-finite loss in epoch {epoch}")
        epoch += 1
        epoch_seconds.append(time.perf_counter() - start)
        history.append({"epoch": epoch, "loss": sum(values) / len(values)})
        ckpt.atomic_save({"epoch": epoch, "online": nets.online.state_dict(), "target": nets.target.state_dict(),
                          "optimizer": optimizer.state_dict(), "history": history,
                          "epoch_seconds": epoch_seconds}, run_dir / "checkpoint.pt")
    from core.evaluate import evaluate_backbone

    # Evaluated exactly as byol.train evaluates b (its features precision included).
    knn, _ = evaluate_backbone(nets.online.backbone, splits, eval_cfg.eval, device,
                               engine.use_bf16(eval_cfg.engine, device), probe=False)
    metrics = {"knn_top1": knn["knn_top1"], "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds),
               "final_loss": history[-1]["loss"], "history": history,
               "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__}
    ckpt.write_json(run_dir / "metrics.json", metrics)
    return metrics


# ----------------------------------------------------------------------------- report


def fmt(value, spec="{:,.0f}"):
    return "–" if value is None else spec.format(value)


def print_table(results: dict, title: str) -> None:
    print(f"\n{title}\n")
    print("| arch | px | batch | (a) lightly fp32 | (a) lightly bf16+CL | (b) project | (c) synthetic | b/a | b/c |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch, row in results.items():
        cells = [fmt(row.get(p, {}).get("img_per_s")) for p in PIPELINES]
        print(f"| {arch} | {row.get('image_size')} | {row.get('batch_size')} | " + " | ".join(cells)
              + f" | {fmt(row.get('b_over_a'), '{:.2f}')} | {fmt(row.get('b_over_c'), '{:.2f}')} |")


def print_learn(results: dict) -> None:
    print("\nkNN top-1 on the validation split carved from the training images\n")
    print("| arch | epochs | k, T | (a) lightly-style | (b) project | b - a (points) | s/epoch a | s/epoch b |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, row in results.items():
        a, b = row.get("a", {}), row.get("b", {})
        print(f"| {arch} | {row.get('epochs')} | {row.get('knn_k')}, {row.get('knn_temperature')}"
              f" | {fmt(a.get('knn_top1'), '{:.4f}')} | {fmt(b.get('knn_top1'), '{:.4f}')}"
              f" | {fmt(row.get('difference_points'), '{:+.2f}')} | {fmt(a.get('seconds_per_epoch'), '{:.1f}')}"
              f" | {fmt(b.get('seconds_per_epoch'), '{:.1f}')} |")


def report(files) -> dict:
    """Merge JSON files of the modes above (rows of one mode and arch: the last file wins)."""
    merged = {"throughput": {}, "imagefolder224": {}, "learn": {}, "augment": {}}
    env = None
    for f in files:
        blob = json.loads(Path(f).read_text())
        env = env or blob.get("env")
        for arch, row in blob.get("results", {}).items():
            merged[blob["mode"]].setdefault(arch, {}).update(row)
    for mode in ("throughput", "imagefolder224"):
        for arch, row in merged[mode].items():
            ratios(row, arch)
    if env:
        print(f"device: {env.get('device')}, torch {env.get('torch')}, lightly {env.get('lightly')}")
    if merged["throughput"]:
        print_table(merged["throughput"], "BYOL training images/s, CIFAR-10 (32 px)")
    if merged["imagefolder224"]:
        print_table(merged["imagefolder224"], "BYOL training images/s, ImageFolder at 224 px")
    if merged["augment"]:
        print_augment(merged["augment"])
    if merged["learn"]:
        for arch in list(merged["learn"]):
            row = merged["learn"][arch]
            if "a" in row and "b" in row:
                row["difference_points"] = 100 * (row["b"]["knn_top1"] - row["a"]["knn_top1"])
                row["meets_target"] = row["difference_points"] >= -TARGETS["knn_points_below_a"]
        print_learn(merged["learn"])
    return merged


# ----------------------------------------------------------------------------- main


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict:
    import lightly

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "lightly": lightly.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", default="resnet18,resnet50")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, help="timed steps (default 50 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder root (class folders)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--compile", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="subset of a,a_bf16,b,c")
    parser.add_argument("--cache-dir", default="/tmp/byolc-cache", help="decoded uint8 tensors are cached here")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run (e.g. byol.proj_hidden_dim=64)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--imagefolder-224", type=Path, metavar="DIR",
                        help="measure at 224 px on this ImageFolder, streamed as JPEG bytes")
    parser.add_argument("--batch-size-224", type=int, default=256)
    parser.add_argument("--image-size-224", type=int, default=224)
    parser.add_argument("--learn-epochs", type=int, help="train a and b this many epochs; kNN top-1 of each")
    parser.add_argument("--learn-pipelines", default="a,b")
    parser.add_argument("--learn-dir", default="/tmp/byol-learn")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--augment", action="store_true", help="time the two-view augmentation alone")
    parser.add_argument("--augments", default=",".join(AUGMENTS), help="subset of " + ",".join(AUGMENTS))
    parser.add_argument("--augment-rounds", type=int, default=5, help="--augment: interleaved timing rounds")
    parser.add_argument("--stats-images", type=int, default=2048, help="--augment: images for the view statistics")
    parser.add_argument("--stats-rounds", type=int, default=4, help="--augment: passes over them")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON", help="print the table of these results")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.steps = args.steps if args.steps is not None else (3 if cpu else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 10)
    if args.steps < 1 or args.warmup < 0 or args.augment_rounds < 1:
        parser.error("--steps and --augment-rounds must be >= 1, --warmup >= 0")
    args.data = args.data.resolve()
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    # Several models compile in one process (each arch, online and target): room for all.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    archs = [a for a in args.archs.split(",") if a]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    blob = {"env": environment(device), "settings": settings}
    if args.learn_epochs:
        blob["mode"] = "learn"
        pipelines = args.learn_pipelines.split(",")
        blob["results"] = {arch: learn(args, device, arch, pipelines) for arch in archs}
        print_learn(blob["results"])
    elif args.augment:
        blob["mode"] = "augment"
        blob["results"] = augment_only(args, device, [a for a in args.augments.split(",") if a])
        print_augment(blob["results"])
    elif args.imagefolder_224:
        blob["mode"] = "imagefolder224"
        args.data = args.imagefolder_224.resolve()
        extra = ["data.in_memory=false", "data.val_fraction=0.0", f"data.image_size={args.image_size_224}",
                 f"train.batch_size={args.batch_size_224}"]
        blob["results"] = throughput(args, device, archs, lambda arch: "imagenet_r50.yaml", extra,
                                     args.pipelines.split(","))
        print_table(blob["results"], f"BYOL training images/s, ImageFolder at {args.image_size_224} px "
                                     f"({blob['env']['device']})")
    else:
        blob["mode"] = "throughput"
        if not args.data.is_dir():
            raise SystemExit(f"--data {args.data}: not a folder (an ImageFolder root of class folders)")
        extra = ["data.in_memory=true", "data.val_fraction=0.0", f"train.batch_size={args.batch_size}"]
        blob["results"] = throughput(args, device, archs, cifar_recipe, extra, args.pipelines.split(","))
        print_table(blob["results"], f"BYOL training images/s, {args.data} ({blob['env']['device']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(blob, indent=2))
        log(f"wrote {args.out}")
    return blob


if __name__ == "__main__":
    main()
