"""Measured inference latency: the median wall time of a forward pass, in milliseconds.

A compressed model is judged on how fast it runs, not only on its MACs (a pruned model with
odd channel counts or an int8 model can be slower than its MACs promise). Every stage that
reports latency goes through `latency_metrics`, so the numbers in every metrics.json are
taken the same way: eval mode, no grad, fp32, eager, a few warmup passes, median over
`iters` passes (the median ignores the odd pass that a shared machine slows down).

CPU timings depend on the thread count; `latency_metrics` records it next to the numbers.
"""

from __future__ import annotations

import copy
import statistics
from time import perf_counter
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

__all__ = ["LatencyConfig", "measure_latency", "latency_metrics", "LATENCY_KEYS"]

# metrics.json keys (the names `launch collect` reads).
LATENCY_KEYS = ("latency_ms_cpu_b1", "latency_ms_cpu_b32", "latency_ms_gpu_b256")


@dataclass
class LatencyConfig:
    enabled: bool = True
    warmup: int = 3
    iters: int = 20  # median over this many timed passes
    gpu: bool = True  # also batch 256 on CUDA when a GPU is visible


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(module: nn.Module, example_input: torch.Tensor, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of `module(example_input)` in eval mode without grad.

    Runs on whatever device the module and input are on; CUDA work is synchronised around
    every pass so the time is the kernel time, not the launch time. The module's train/eval
    mode is restored afterwards.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    was_training = module.training
    module.eval()
    device = example_input.device
    try:
        for _ in range(max(0, warmup)):
            module(example_input)
        _sync(device)
        times = []
        for _ in range(iters):
            start = perf_counter()
            module(example_input)
            _sync(device)
            times.append((perf_counter() - start) * 1000.0)
    finally:
        module.train(was_training)
    return float(statistics.median(times))


def latency_metrics(backbone: nn.Module, image_size: int, cfg: Optional[LatencyConfig] = None,
                    ) -> Dict[str, Optional[float]]:
    """{latency_ms_cpu_b1, latency_ms_cpu_b32, latency_ms_gpu_b256, latency_cpu_threads}.

    Measures a copy of `backbone` (the caller's module is left where it is): on the CPU at
    batch 1 and 32, and on CUDA at batch 256 (channels_last, as the stages train there) when
    a GPU is visible and `cfg.gpu`; otherwise latency_ms_gpu_b256 is None. All values are None
    when `cfg.enabled` is False.
    """
    cfg = cfg or LatencyConfig()
    out: Dict[str, Optional[float]] = {k: None for k in LATENCY_KEYS}
    out["latency_cpu_threads"] = torch.get_num_threads()
    if not cfg.enabled:
        return out
    model = copy.deepcopy(backbone).float().cpu().eval()
    for batch, key in ((1, "latency_ms_cpu_b1"), (32, "latency_ms_cpu_b32")):
        x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        out[key] = measure_latency(model, x, cfg.warmup, cfg.iters)
    if cfg.gpu and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        model = model.to(device, memory_format=torch.channels_last)
        x = torch.randn(256, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
        out["latency_ms_gpu_b256"] = measure_latency(model, x, cfg.warmup, cfg.iters)
    del model
    return out
