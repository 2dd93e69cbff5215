import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A BYOL run small enough for a 2-core CPU: synthetic 16px images, ImageNet stem (stride 4).
TINY_BYOL = [
    "data.name=synthetic", "data.synthetic_size=240", "data.image_size=16", "data.val_fraction=0.2",
    "model.arch=resnet18", "model.cifar_stem=false",
    "train.epochs=2", "train.batch_size=32", "train.optimizer=sgd", "train.lr=0.05",
    "train.warmup_epochs=0.5",
    "byol.proj_hidden_dim=64", "byol.pred_hidden_dim=64", "byol.proj_dim=32",
    "aug.blur_p1=0.0", "aug.blur_p2=0.0",
    "eval.knn_every_epochs=0", "eval.knn_k=10", "eval.probe_epochs=5",
    "engine.device=cpu", "engine.progress=false", "track.mode=disabled",
]


def run_cli(args, cwd=ROOT, timeout=600, env=None):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def pytest_report_header(config):
    """The CPU first: int8 kernels and float summation order differ by processor, so a failure
    should name its machine (core/cpu.py)."""
    from core.cpu import cpu_facts

    f = cpu_facts()
    return (f"cpu: {f['model']}; torch {f['torch']} capability {f['capability']}; int8 VNNI {f['int8_vnni']}"
            + (f"; ONEDNN_MAX_CPU_ISA={f['onednn_max_cpu_isa']}" if f["onednn_max_cpu_isa"] else "")
            + f"; {f['threads']} threads")


@pytest.fixture
def run_root(tmp_path):
    return tmp_path / "runs"
