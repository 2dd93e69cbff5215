"""int8 for x86 CPUs with torchao's PT2E flow: export -> prepare_qat -> train -> convert -> package
(QAT), or export -> prepare -> calibrate -> convert -> package (PTQ, the baseline QAT is read against).

Why PT2E and not torch.ao.quantization's FX QAT (prepare_qat_fx / convert_fx): both work with
torch 2.14 (DESIGN.md has the FX measurement), but the FX API is deprecated and slated for
removal, and its TorchScript output is a dead end too. PT2E is its successor and ends in a file
that runs without Python model code: the converted graph, exported under `torch.no_grad()` and
compiled by AOTInductor with freezing, becomes one `.pt2` whose kernels are oneDNN int8
convolutions (checked in tests/test_quant.py by reading the package's generated code; sizes and
latencies against fp32: bench/latency_artifacts.py, README).

Two things make it work on torchvision's ResNets (DESIGN.md, "Quantization-aware training"):
- torchvision's BasicBlock/Bottleneck call one `self.relu` module two or three times, and
  X86InductorQuantizer's fusion matching assumes one call site per module ("Input partition
  has more than one output node", pytorch/ao#4478): `split_relus` gives each call its own ReLU
  (no parameters, so state_dict keys do not change).
- Without `torch.no_grad()` around export + compile the package keeps fp32 kernels, and an
  export with a fixed batch silently returns that many rows for any input: export with a
  dynamic batch dimension (`torch.export.Dim`). (Both seen here again: 20 fp32 `convolution`
  calls and 2 rows for a batch of 1.)
- torchao's default x86 QAT config trains with fused fake-quant ops whose weight scales are
  not the ones conversion uses: `x86_quantizer` swaps in plain `FakeQuantize` (see there).

The prepared model is an exported GraphModule, so `.train()` / `.eval()` do not apply; BN
and observer freezing are done with torchao's own helpers (`freeze_bn_stats`,
`freeze_observers`). Its state_dict (the original parameter names plus
`activation_post_process_*` fake-quant buffers) is all a checkpoint needs: re-exporting the
same architecture and preparing it again gives the same graph, and the state loads strictly.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from core.errors import UserError
from core.engine import quiet_library_noise

quiet_library_noise()  # torchao's and torch's import-time warnings (core/engine.py)

PACKAGE_NAME = "model_int8.pt2"


# ----------------------------------------------------------------------------- model surgery


class SplitReluBasicBlock(nn.Module):
    """torchvision's BasicBlock with one ReLU module per call site (same submodule names)."""

    def __init__(self, block: BasicBlock):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.downsample, self.stride = block.downsample, block.stride
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class SplitReluBottleneck(nn.Module):
    """torchvision's Bottleneck with one ReLU module per call site (same submodule names)."""

    def __init__(self, block: Bottleneck):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.conv3, self.bn3 = block.conv3, block.bn3
        self.downsample, self.stride = block.downsample, block.stride
        self.relu1, self.relu2, self.relu3 = nn.ReLU(inplace=True), nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


def split_relus(model: nn.Module) -> nn.Module:
    """Replace every torchvision BasicBlock/Bottleneck (in place) by its split-ReLU twin.

    The blocks share their conv/BN modules with the originals, so the model computes the same
    function and keeps its state_dict keys; only the ReLUs (parameter-free) are new modules.
    """
    for name, child in model.named_children():
        if isinstance(child, BasicBlock):
            setattr(model, name, SplitReluBasicBlock(child))
        elif isinstance(child, Bottleneck):
            setattr(model, name, SplitReluBottleneck(child))
        else:
            split_relus(child)
    return model


# ----------------------------------------------------------------------------- QAT


def x86_quantizer(reduce_range: bool = False):
    """int8 for x86 (oneDNN): per-channel symmetric int8 weights, per-tensor affine uint8
    activations, moving-average min/max observers (torchao's x86 QAT defaults), with one change:
    plain `FakeQuantize` modules instead of the fused `FusedMovingAvgObsFakeQuantize`.

    reduce_range: activations in 0..127 instead of 0..255, so that oneDNN's int8 kernels on
    CPUs without VNNI cannot saturate their int16 pair sums (core/cpu.py says why; torchao's
    own x86 config has the same switch).

    Why: the fused op recomputes its scales on every call with its own formula (per-channel
    symmetric: max/127 or |min|/128), even with the observer disabled, while convert_pt2e takes
    the observer's `calculate_qparams` (max(|min|, max)/127.5) (torch 2.14, torchao 0.18). The
    converted weights then round differently from the trained fake-quant ones in about half of
    the elements, and the logits of a ResNet-18 agree only to cosine ~0.99. `FakeQuantize` uses
    `calculate_qparams` itself, so training sees exactly the int8 weights that conversion makes.
    """
    from dataclasses import replace

    from torchao.quantization.pt2e import (FakeQuantize, MovingAverageMinMaxObserver,
                                           MovingAveragePerChannelMinMaxObserver)
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    default = get_default_x86_inductor_quantization_config(is_qat=True)
    eps = 2 ** -12  # torchao's x86 default
    activation = replace(default.input_activation, quant_max=127 if reduce_range else 255,
                         observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver,
                                                                           eps=eps))
    weight = replace(default.weight, observer_or_fake_quant_ctr=FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, eps=eps))
    config = replace(default, input_activation=activation, output_activation=activation, weight=weight)
    return X86InductorQuantizer().set_global(config)


def x86_ptq_quantizer(reduce_range: bool = False):
    """torchao's x86 post-training config unchanged but for `reduce_range`: per-channel symmetric
    int8 weights (min/max), per-tensor affine uint8 activations from a histogram observer (the
    range that minimises the quantisation error of what calibration saw, not its min/max)."""
    from dataclasses import replace

    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    default = get_default_x86_inductor_quantization_config(is_qat=False)
    activation = replace(default.input_activation, quant_max=127 if reduce_range else 255)
    config = replace(default, input_activation=activation, output_activation=activation)
    return X86InductorQuantizer().set_global(config)


QUANTIZERS = {"x86": x86_quantizer}
PTQ_QUANTIZERS = {"x86": x86_ptq_quantizer}


def make_quantizer(backend: str, reduce_range: bool = False, qat: bool = True):
    if backend not in QUANTIZERS:
        raise UserError(f"unsupported quant.backend {backend!r}; supported: {', '.join(QUANTIZERS)}")
    return (QUANTIZERS if qat else PTQ_QUANTIZERS)[backend](reduce_range=reduce_range)


def _head_linear(prepared: torch.fx.GraphModule) -> torch.fx.Node:
    """The classifier head's linear node: the graph's last aten.linear."""
    linears = [n for n in prepared.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]
    if not linears:
        raise ValueError("the prepared graph has no linear layer (no classifier head)")
    return linears[-1]


def feature_extractor(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of the prepared graph that returns the head's input: the pooled features exactly as
    the int8 model computes them (fake-quantised), for fitting a linear probe on them."""
    features = copy.deepcopy(prepared)
    linear = _head_linear(features)
    output = next(n for n in features.graph.nodes if n.op == "output")
    output.args = ((linear.args[0],),)
    features.graph.eliminate_dead_code()
    features.recompile()
    return features


def head_input_step(prepared: torch.fx.GraphModule) -> float:
    """The quantisation step of the head's input (its fake-quant scale): the resolution of the
    int8 features, the floor for a probe's feature standardisation (train_linear_probe)."""
    node = _head_linear(prepared).args[0]
    module = prepared.get_submodule(node.target) if node.op == "call_module" else None
    if not hasattr(module, "scale"):
        raise ValueError(f"the head's input is not fake-quantised ({node.op} {node.target})")
    return float(module.scale.max())


@torch.no_grad()
def replace_head(prepared: torch.fx.GraphModule, head: nn.Linear) -> None:
    """New head weights in the prepared graph, and its weight fake-quant's ranges recomputed from
    them (a frozen observer would keep the old weights' scales)."""
    linear = _head_linear(prepared)
    weight_fq = prepared.get_submodule(linear.args[1].target)
    prepared.get_parameter("head.weight").copy_(head.weight)
    prepared.get_parameter("head.bias").copy_(head.bias)
    weight_fq.activation_post_process.reset_min_max_vals()
    weight_fq.enable_observer()
    weight_fq(prepared.get_parameter("head.weight"))  # observes, then sets scale/zero_point
    weight_fq.disable_observer()


def batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=65536)


def prepare_qat(model: nn.Module, example: torch.Tensor, backend: str = "x86",
                reduce_range: bool = False) -> torch.fx.GraphModule:
    """Export `model` in train mode (dynamic batch) and insert fake-quant around every conv/linear.

    `model` must already have one module per ReLU call site (`split_relus`). The returned
    GraphModule trains like the model (BatchNorm in train mode, Conv-BN fused the QAT way:
    weights scaled by the BN statistics before fake-quant, Jacob et al. 2018, Sec. 3.2).
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model.train()
    with torch.random.fork_rng():  # torchao draws pattern example inputs from the global RNG
        # strict=True (TorchDynamo): the quantizer finds convs and linears by the nodes'
        # source_fn_stack, which only strict export records. torch 2.13+ also matches by
        # nn_module_stack; with torch 2.11's default (non-strict) export it annotated nothing and
        # the "int8" model stayed fp32.
        graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch_dim()},), strict=True).module()
        prepared = prepare_qat_pt2e(graph, make_quantizer(backend, reduce_range))
    if not any(name.startswith("activation_post_process") for name, _ in prepared.named_children()):
        raise RuntimeError(f"the {backend} quantizer inserted no fake-quant into the exported graph "
                           f"(torch {torch.__version__}): nothing would be quantised")
    return prepared


def prepare_ptq(model: nn.Module, example: torch.Tensor, backend: str = "x86",
                reduce_range: bool = False) -> torch.fx.GraphModule:
    """Export `model` in eval mode (dynamic batch, strictly, as `prepare_qat`) and insert
    observers for post-training quantisation: BN is folded into the convs here, and forward
    passes (`calibrate`) only record ranges. `model` needs one module per ReLU call site."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    model.eval()
    with torch.random.fork_rng():
        graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch_dim()},), strict=True).module()
        prepared = prepare_pt2e(graph, make_quantizer(backend, reduce_range, qat=False))
    if not any(name.startswith("activation_post_process") for name, _ in prepared.named_children()):
        raise RuntimeError(f"the {backend} quantizer inserted no observer into the exported graph "
                           f"(torch {torch.__version__}): nothing would be quantised")
    return prepared


@torch.no_grad()
def calibrate(prepared: torch.fx.GraphModule, batches) -> int:
    """Run float batches through the observers (no training); returns how many images they saw."""
    seen = 0
    for x in batches:
        prepared(x)
        seen += len(x)
    return seen


def freeze_observers(prepared: torch.fx.GraphModule) -> None:
    """Stop updating quantisation ranges (scale, zero point); fake-quant keeps running."""
    from torchao.quantization.pt2e import disable_observer

    prepared.apply(disable_observer)


def freeze_bn_stats(prepared: torch.fx.GraphModule) -> None:
    """BatchNorm uses (and stops updating) its running statistics; training goes on.

    torchao's move-to-eval rewrites the graph's batch_norm calls to training=False: in a ResNet
    (no dropout) that is exactly BN freezing, while the fake-quant modules do not depend on the
    mode. Idempotent.
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval

    with torch.random.fork_rng():  # its pattern matching draws from the global RNG: keep resume exact
        move_exported_model_to_eval(prepared)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The real int8 model: BN folded into the convs, int8 weights, q/dq around int8 ops.

    Freezes observers and BN first (conversion reads the final ranges). torchao converts the
    prepared model IN PLACE: convert a fresh copy (`prepare_qat` + `load_state_dict`) when the
    prepared model is still needed.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    freeze_observers(prepared)
    freeze_bn_stats(prepared)
    with torch.random.fork_rng():
        return convert_pt2e(prepared)


def quantized_op_counts(graph_module: torch.fx.GraphModule) -> Dict[str, int]:
    """How many quantize/dequantize nodes and which fp ops remain, by op name, in a graph."""
    return dict(Counter(str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"))


# ----------------------------------------------------------------------------- package


def export_package(converted: torch.fx.GraphModule, example: torch.Tensor, path: Path,
                   metadata: Optional[Dict[str, str]] = None) -> Path:
    """AOTInductor package (`.pt2`) of the converted model, with a dynamic batch dimension.

    Export and compile run under `torch.no_grad()`: with grad enabled Inductor keeps the fp32
    path and the package is as slow as fp32. `freezing` lets Inductor prepack the int8 weights
    for oneDNN and fold the q/dq pairs into quantized conv/linear kernels. `metadata` (strings)
    travels inside the file: `aoti_load_package(path).get_metadata()`.

    The package holds machine code for this CPU's ISA (see its AOTI_CPU_ISA metadata): compile
    it on the CPU family it will run on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same file name in a temp folder (the archive's root folder is named after the file).
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=".package-"))
    try:
        tmp = tmp_dir / path.name
        with torch.no_grad():
            program = torch.export.export(converted, (example,), dynamic_shapes=({0: batch_dim()},))
            configs = {"freezing": True, "aot_inductor.metadata": {k: str(v) for k, v in (metadata or {}).items()}}
            if hasattr(torch._inductor.config.aot_inductor, "enable_line_tables"):
                # On by default (torch 2.14): -g1 line tables, a sixth of the quickstart package
                # (README), for profilers' symbolisation only.
                configs["aot_inductor.enable_line_tables"] = False
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
        tmp.replace(path)  # atomic: a killed compile leaves no half package under the real name
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def package_kernel_counts(path: Path) -> Dict[str, int]:
    """Calls of CPU kernels in the package's generated C++ (e.g. `_qconv_pointwise_tensor`).

    The proof that the file runs int8 kernels and not fp32 ones: read the generated wrapper.
    """
    with zipfile.ZipFile(path) as z:
        source = "".join(z.read(n).decode(errors="replace") for n in z.namelist() if n.endswith("wrapper.cpp"))
    return dict(Counter(re.findall(r"aoti_torch_cpu_(\w+?)\(", source)))
