"""What the CPU's int8 kernels can do: the facts an int8 number depends on.

x86 int8 convolutions (oneDNN) multiply uint8 activations by int8 weights. With VNNI
(AVX512_VNNI, AVX-VNNI) one instruction sums four such products into int32, exactly. Without
it (AVX2-only CPUs: AMD before Zen 4, Intel before Cascade Lake / Alder Lake) oneDNN uses
`vpmaddubsw`, which adds PAIRS of products in int16 and saturates: 2 x 255 x 127 = 64,770 does
not fit in 32,767, so a full-range (0..255) activation can clip inside the kernel. A 7-bit
activation range (0..127, "reduce_range") keeps every pair within int16 (2 x 127 x 128 = 32,512).
torchao's x86 quantizer documents the same ("set reduce_range=True on earlier CPUs without
VNNI"); README, "int8 on CPUs with and without VNNI", has what it measured here.

`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` makes an AVX-512 VNNI machine take the AVX2
paths of both ATen and oneDNN, so the non-VNNI behaviour can be reproduced anywhere (tests do).
"""

from __future__ import annotations

import os
import platform
from typing import Dict

import torch

# ONEDNN_MAX_CPU_ISA values (oneDNN's cpu_isa names) at or above which int8 has VNNI.
_VNNI_ISAS = ("AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16",
              "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX",
              "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")


def _cpuinfo_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_vnni() -> bool:
    """The processor has an int8 dot-product instruction (AVX512_VNNI or AVX-VNNI)."""
    caps = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.13; /proc/cpuinfo before
    if caps is not None:
        c = caps()
        return bool(c.get("avx512_vnni") or c.get("avx_vnni"))
    return bool({"avx512_vnni", "avx_vnni"} & _cpuinfo_flags())


def int8_has_vnni() -> bool:
    """oneDNN's int8 kernels will use VNNI here: the hardware has it and ONEDNN_MAX_CPU_ISA
    (if set) does not cap oneDNN below it."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return hardware_vnni() and (not cap or cap in _VNNI_ISAS)


def cpu_facts() -> Dict[str, object]:
    """What every int8 accuracy and latency is recorded with (metrics.json `cpu`)."""
    return {"capability": torch.backends.cpu.get_cpu_capability(), "model": cpu_model(),
            "int8_vnni": int8_has_vnni(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def describe(facts: Dict[str, object]) -> str:
    return f"{facts['model']}, {facts['capability']}, int8 {'VNNI' if facts['int8_vnni'] else 'without VNNI'}"
