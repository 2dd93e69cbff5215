"""CPU latency (batch 1 and 32) and file size of artifacts: fp32 model.pt vs the int8 package.

For each artifact dir: the fp32 classifier rebuilt from model.pt (eager, as every stage reports
it) and, where the dir holds one, the int8 AOTInductor package the quant stage wrote
(model_int8.pt2, loaded with torch._inductor.aoti_load_package only). Median of `--iters`
timed passes after warmup (core.latency.measure_latency), random inputs at the artifact's
image size, `--threads` CPU threads. Prints a Markdown table.

    python bench/latency_artifacts.py runs/quant/quickstart runs/prune/quickstart runs/byol/quickstart
    python bench/latency_artifacts.py --demo /tmp/qbench   # random CIFAR ResNet-18 -> quant -> table
    python bench/latency_artifacts.py runs/quant/a runs/quant/b --rounds 3   # interleaved, median round

`--demo DIR` needs no data: it saves a randomly initialised CIFAR-stem ResNet-18 (+ head) as an
artifact, runs the quant stage on it for two steps of synthetic 32px images (the numbers are
about speed and size, not accuracy), then measures both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import checkpoint as ckpt  # noqa: E402
from core.latency import measure_latency  # noqa: E402
from core.models import Classifier, backbone_spec, build_backbone, count_params  # noqa: E402

PACKAGE_NAME = "model_int8.pt2"  # quant.pt2e.PACKAGE_NAME, repeated so loading needs no quant code


class Package(nn.Module):
    def __init__(self, path: Path):
        super().__init__()
        self.runner = torch._inductor.aoti_load_package(str(path))

    def forward(self, x):
        return self.runner(x)


def measure(run_dir: Path, iters: int, warmup: int, image_size: int = 0) -> dict:
    art = ckpt.load_model(run_dir)
    size = image_size or int(art.meta.get("image_size") or 32)
    fp32 = (Classifier(art.backbone, art.head) if art.head is not None else art.backbone).eval()
    row = {"artifact": str(run_dir), "arch": art.spec.get("arch"), "stage": art.meta.get("stage"),
           "params": count_params(fp32), "size": size, "fp32_mb": art.path.stat().st_size / 2**20}
    models = {"fp32": fp32}
    package = Path(run_dir) / PACKAGE_NAME
    if package.is_file():
        models["int8"] = Package(package)
        row["int8_mb"] = package.stat().st_size / 2**20
    for batch in (1, 32):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        for kind, model in models.items():
            row[f"{kind}_b{batch}"] = measure_latency(model, x, warmup, iters)
    return row


def measure_rounds(dirs: list, iters: int, warmup: int, rounds: int, image_size: int = 0) -> list:
    """measure() of every dir once per round, `rounds` interleaved rounds; each timing is the
    median round, and row["rounds"] keeps them all. Interleaved: on a shared 2-core machine one
    model's timings drifted 2-3x between back-to-back runs, enough to flip a 15x comparison."""
    runs = [[measure(d, iters, warmup, image_size) for d in dirs] for _ in range(rounds)]
    rows = []
    for i in range(len(dirs)):
        row = dict(runs[0][i], rounds={})
        for key in [k for k in runs[0][i] if k.endswith(("_b1", "_b32"))]:
            row["rounds"][key] = [run[i][key] for run in runs]
            row[key] = statistics.median(row["rounds"][key])
        rows.append(row)
    return rows


def fmt(value, spec="{:.2f}"):
    return "-" if value is None else spec.format(value)


def print_table(rows: list) -> None:
    print(f"\nCPU latency (ms, median), {torch.get_num_threads()} threads; file sizes in MiB\n")
    print("| artifact | arch | params | px | fp32 MiB | int8 MiB | size ratio | fp32 b1 | int8 b1 | "
          "fp32 b32 | int8 b32 | speedup b32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        int8_mb, int8_b32 = r.get("int8_mb"), r.get("int8_b32")
        print(f"| {r['artifact']} | {r['arch']} | {r['params'] / 1e6:.2f}M | {r['size']} | {r['fp32_mb']:.1f} | "
              f"{fmt(int8_mb, '{:.1f}')} | {fmt(int8_mb and int8_mb / r['fp32_mb'])} | {r['fp32_b1']:.2f} | "
              f"{fmt(r.get('int8_b1'))} | {r['fp32_b32']:.2f} | {fmt(int8_b32)} | "
              f"{fmt(int8_b32 and r['fp32_b32'] / int8_b32, '{:.1f}x')} |")


def make_demo(root: Path) -> list:
    """A random CIFAR ResNet-18 artifact and its int8 package made by the quant stage."""
    from core.config import load_config
    from quant import Config, run

    torch.manual_seed(0)
    source = root / "source" / "cifar-r18-random"
    backbone = build_backbone("resnet18", cifar_stem=True).eval()
    meta = {"stage": "demo", "name": "cifar-r18-random", "data": "synthetic", "num_classes": 10,
            "image_size": 32, "parents": []}
    ckpt.save_model(source, backbone, backbone_spec(backbone, "resnet18", True), meta, nn.Linear(512, 10))
    cfg = load_config(Config, None, [
        f"run_root={root}", "name=demo", f"source={source}", "loss.kd=0", "loss.ce=1",
        "data.name=synthetic", "data.synthetic_size=160", "data.image_size=32", "data.val_fraction=0.2",
        "train.epochs=1", "train.batch_size=64", "latency.enabled=false", "engine.device=cpu",
        "track.mode=disabled"])
    return [source, run(cfg)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="*", type=Path, help="artifact dirs (with model.pt)")
    parser.add_argument("--demo", type=Path, help="make a random CIFAR ResNet-18 and its int8 package here")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=0, help="0 = the artifact's own")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every artifact once per round, interleaved; report each one's median round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dirs = list(args.artifacts) + (make_demo(args.demo) if args.demo else [])
    if not dirs:
        parser.error("name artifact dirs, or --demo DIR")
    rows = measure_rounds(dirs, args.iters, args.warmup, args.rounds, args.image_size)
    if args.rounds > 1:
        for d, row in zip(dirs, rows):
            for key, values in row["rounds"].items():
                print(f"{d} {key}: " + " / ".join(f"{v:.2f}" for v in values) + " ms")
    print_table(rows)


if __name__ == "__main__":
    main()
