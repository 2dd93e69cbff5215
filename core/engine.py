"""Device, precision, compile, seeding, distributed init and the stop-on-signal guard."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from core.config import EngineConfig
from core.errors import UserError


@functools.cache  # once a process: each call would add the same filters again
def quiet_library_noise() -> None:
    """Drop what torch and torchao print that is no concern of a user of this project, and that
    every quant run printed, even one that ends in a config error: torchao's import-time
    `KernelPreference ... deprecated`, torch's `No CUDA runtime is found` when it looks for a
    compiler on a machine without CUDA, and a copy-construct UserWarning inside Inductor's oneDNN
    lowering. Each filter matches that one message only."""
    import logging
    import warnings

    for logger, text in (("torch.utils._pytree", "KernelPreference"), ("torch.utils.cpp_extension", "No CUDA runtime")):
        logging.getLogger(logger).addFilter(lambda record, text=text: text not in record.getMessage())
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning,
                            module=r"torch\._inductor\.mkldnn_lowerings")


def resolve_device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("engine.device=cuda but no CUDA device is visible; use engine.device=cpu")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def use_bf16(cfg: EngineConfig, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast(cfg: EngineConfig, device: torch.device):
    if not use_bf16(cfg, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def maybe_compile(fn, cfg: EngineConfig, device: torch.device):
    """torch.compile on CUDA by default; eager on CPU where compile time outweighs the gain."""
    if cfg.compile == "always" or (cfg.compile == "auto" and device.type == "cuda"):
        return torch.compile(fn)
    return fn


def prepare_module(module: nn.Module, cfg: EngineConfig, device: torch.device) -> nn.Module:
    module = module.to(device)
    if cfg.channels_last and device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return module


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """One process per task; RANK/WORLD_SIZE/MASTER_ADDR come from the launcher's env.

    NCCL on GPUs, gloo on CPUs. Single-process runs skip process groups entirely.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------- signals


class StopGuard:
    """SIGTERM/SIGUSR2 set a flag; the training loop checkpoints at the end of the step, then stops.

    If a handler was installed before ours (submitit's USR2 handler, which requeues the job),
    it is called after our checkpoint is on disk, so the requeued job resumes from it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: signals cannot be handled here
            self.previous = {}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _on_signal(self, signum, frame):
        self.received = signum

    @property
    def stop_requested(self) -> bool:
        return self.received is not None

    def stop(self) -> None:
        """Call after the checkpoint is written: hand over to the previous handler, or exit."""
        signum, previous = self.received, self.previous.get(self.received)
        self.__exit__()
        name = signal.Signals(signum).name
        print(f"received {name}: checkpoint saved, stopping (rerun the same command to resume)",
              file=sys.stderr, flush=True)
        if callable(previous):
            previous(signum, None)
        raise SystemExit(128 + signum)
