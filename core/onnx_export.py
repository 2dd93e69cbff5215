"""ONNX files of the project's models, and ONNX Runtime as a module (the optional `onnx` extra).

Two kinds of file, both with a dynamic batch dimension and the preprocessing in their metadata
(`metadata_props`: mean, std, image_size, num_classes, as the `.pt2` package carries them):
- fp32: any artifact's classifier (`python -m launch export ARTIFACT format=onnx`);
- int8 QDQ: quant's converted PT2E graph (`model_int8.onnx` beside `model_int8.pt2`): int8
  weight initializers, each behind a DequantizeLinear, and a QuantizeLinear/DequantizeLinear pair
  on every quantised activation. ONNX Runtime fuses the pairs into int8 kernels (QLinearConv,
  QGemm); OpenVINO and TensorRT read the same QDQ form.

How: `torch.onnx.export(..., dynamo=True)` on the module (the converted GraphModule itself for
int8). onnxscript's torchlib maps `quantized_decomposed.quantize_per_tensor` / `dequantize_per_*`
to QuantizeLinear / DequantizeLinear, so nothing has to be rewritten. Its mapping drops
quant_min/quant_max (ONNX clamps to the dtype's full range), so a model with 7-bit activations
(`quant.reduce_range=true`, 0..127) would lose its clamp: `export_int8` refuses those.

onnx, onnxscript and onnxruntime are imported lazily: without the extra the project still runs,
and only a request for ONNX says what to install.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from core import checkpoint as ckpt
from core.errors import UserError

EXTRA_HINT = 'pip install -e ".[onnx]"'
OPSET = 21  # QuantizeLinear/DequantizeLinear with int8/uint8 and per-axis scales (any opset >= 13)


def available() -> bool:
    """True when onnx, onnxscript and onnxruntime can all be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def require(what: str) -> None:
    """One line naming the extra when it is missing."""
    if not available():
        raise UserError(f"{what} needs the onnx extra: {EXTRA_HINT}")


# ----------------------------------------------------------------------------- export


def export(module: nn.Module, example: torch.Tensor, path: Path, metadata: Optional[Dict[str, object]] = None) -> Path:
    """`module` as an ONNX file with a dynamic batch dimension (input "images", output "logits"),
    written atomically; `metadata` (strings) goes into the file's metadata_props."""
    require("ONNX export")
    from core.engine import quiet_library_noise

    quiet_library_noise()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=65536)
    # torch.onnx prints its progress ("[torch.onnx] Run decompositions... ✅") to stdout.
    # An exported GraphModule (the converted int8 graph) has no .eval() and reports training mode.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        program = torch.onnx.export(module, (example,), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), dynamo=True, opset_version=OPSET,
                                    external_data=False, verbose=False)
    model = program.model_proto
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=str(value))
    # atomic, and the umask's mode, as every run file (a killed export leaves no half file)
    ckpt.atomic_write_bytes(path, model.SerializeToString())
    return path


def export_int8(converted: torch.fx.GraphModule, example: torch.Tensor, path: Path, reduce_range: bool,
                metadata: Optional[Dict[str, object]] = None) -> Path:
    """The converted PT2E graph as a QDQ ONNX model; checked to hold int8 weights and QDQ pairs."""
    if reduce_range:
        raise UserError("the int8 ONNX export needs full-range activations (quant.reduce_range=false): ONNX's "
                        "QuantizeLinear has no quant_max, so 7-bit activations (0..127) would lose their clamp")
    export(converted, example, path, metadata)
    counts = qdq_counts(path)
    if not counts["int8_weights"] or not counts["QuantizeLinear"] or not counts["DequantizeLinear"]:
        raise RuntimeError(f"{path} is not a QDQ int8 model: {counts}")
    return path


def qdq_counts(path: Path) -> Dict[str, int]:
    """Node counts by op type, and `int8_weights`: the int8 initializers (quantised weights)."""
    import onnx

    model = onnx.load(str(path))
    counts = Counter(n.op_type for n in model.graph.node)
    counts["int8_weights"] = sum(i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1
                                 for i in model.graph.initializer)
    return dict(counts)


# ----------------------------------------------------------------------------- ONNX Runtime


def session(path: Path, threads: Optional[int] = None, optimize: bool = True):
    """An ONNX Runtime CPU session with as many intra-op threads as torch uses (fair timings).
    optimize=False: no graph optimisations, so QDQ pairs run as written (float ops on dequantised
    values, the reference semantics) instead of fused int8 kernels."""
    require("ONNX Runtime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"cannot load the ONNX model {path}: {str(e).splitlines()[0][:160]}") from None


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime, as a module (so latency and evaluation code can call it)."""

    def __init__(self, path: Path, threads: Optional[int] = None, optimize: bool = True):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"no such ONNX model: {path}")
        self.session = session(self.path, threads, optimize)
        self.input_name = self.session.get_inputs()[0].name
        meta = self.metadata()
        self.image_size = int(meta["image_size"]) if "image_size" in meta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])

    def metadata(self) -> Dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def preprocessing(self) -> tuple:
        """(mean, std, image size) from the file's metadata (None where absent)."""
        meta = self.metadata()
        return (tuple(json.loads(meta["mean"])) if "mean" in meta else None,
                tuple(json.loads(meta["std"])) if "std" in meta else None, self.image_size)
