"""The project's int8 models beside what a user would pick instead: ONNX Runtime, in one run.

For one fp32 source (the `source` of a QAT run), on this CPU, with the same thread count for
torch and ONNX Runtime, in interleaved rounds (every model once per round, rounds repeated; the
median round is reported, so a slow stretch of a shared machine hits every row alike):

    fp32 eager                    the source classifier in PyTorch
    fp32 ONNX Runtime             the source exported to ONNX (core/onnx_export.py)
    QAT .pt2                      the quant run's model_int8.pt2 (AOTInductor, oneDNN int8)
    QAT ONNX Runtime              the same run's model_int8.onnx (QDQ)
    PTQ .pt2                      a quant.mode=ptq run's model_int8.pt2 on the same source
    PTQ ONNX Runtime              that run's model_int8.onnx
    ORT quantize_static           ONNX Runtime's own PTQ of the fp32 ONNX: QDQ, per-channel int8
                                  weights, uint8 activations, MinMax calibration on the same
                                  batches as the PTQ run (quant.train.calibration_batches)

--reference adds the project's two .onnx files in ONNX Runtime with its graph optimisations off:
the QDQ pairs run as written (float convolutions on dequantised values), the reference the int8
kernels of both runtimes approximate.

Columns: top-1 and top-5 on the val split of the QAT run's data, latency at batch 1 and 32
(core.latency.measure_latency), file size. Writes peers.md and peers.json to --out.

    python bench/int8_peers.py --qat runs/quant/quickstart --ptq runs/quant/quickstart-ptq --out runs/peers
    python bench/int8_peers.py --qat A --ptq B --out DIR --threads 1 --rounds 5 --iters 20

Needs the onnx extra (pip install -e ".[onnx]"). A file that does not load is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import checkpoint as ckpt  # noqa: E402
from core import data as datalib  # noqa: E402
from core import onnx_export  # noqa: E402
from core.config import load_config  # noqa: E402
from core.cpu import cpu_facts  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.evaluate import predict, topk_accuracy  # noqa: E402
from core.int8 import PackagedModel  # noqa: E402
from core.latency import measure_latency  # noqa: E402
from core.models import Classifier  # noqa: E402
from core.portable import export_onnx  # noqa: E402
from quant.train import ONNX_NAME, Config, calibration_batches  # noqa: E402
from quant.pt2e import PACKAGE_NAME  # noqa: E402


def read_run(run_dir: Path, mode: str) -> tuple:
    """(config, metrics) of a finished quant run of the given mode."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "metrics.json"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir} is not a finished quant run (no {name})")
    cfg = load_config(Config, str(run_dir / "config.yaml"), [])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics.get("mode", "qat") != mode:
        raise UserError(f"{run_dir} is a quant.mode={metrics.get('mode', 'qat')} run; --{mode} needs a {mode} run")
    return cfg, metrics


def load_file(path: Path):
    """A .pt2 or .onnx as a module; a missing or unreadable file is a UserError."""
    if not path.is_file():
        raise UserError(f"missing file {path}")
    return PackagedModel(path) if path.suffix == ".pt2" else onnx_export.OnnxModel(path)


def ort_quantize_static(fp32_onnx: Path, calibration: list, out: Path) -> Path:
    """ONNX Runtime's recommended PTQ: pre-processing (shape inference, graph fusions), then
    quantize_static in QDQ format, per-channel int8 weights, uint8 activations, MinMax ranges."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"images": x.numpy()}

    prepared = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink()
    return out


def build_rows(qat_dir: Path, ptq_dir: Path, out: Path, reference: bool = False) -> tuple:
    """{row name: (module, file or None)} and the data splits, every file loaded up front."""
    qat_cfg, _ = read_run(qat_dir, "qat")
    ptq_cfg, _ = read_run(ptq_dir, "ptq")
    if Path(qat_cfg.source).resolve() != Path(ptq_cfg.source).resolve():
        raise UserError(f"--qat and --ptq quantise different sources: {qat_cfg.source} and {ptq_cfg.source}")
    source = ckpt.load_model(Path(qat_cfg.source), "source")
    splits = datalib.load_splits(qat_cfg.data)
    fp32 = Classifier(source.backbone, source.head).eval()
    fp32_onnx = export_onnx(source, out / "source_fp32.onnx")
    calibration = list(calibration_batches(ptq_cfg, datalib.load_splits(ptq_cfg.data)))
    ort_ptq = ort_quantize_static(fp32_onnx, calibration, out / "ort_quantize_static.onnx")
    files = {"fp32 eager (PyTorch)": None, "fp32 ONNX Runtime": fp32_onnx,
             "QAT .pt2 (AOTInductor)": qat_dir / PACKAGE_NAME, "QAT ONNX Runtime": qat_dir / ONNX_NAME,
             "PTQ .pt2 (AOTInductor)": ptq_dir / PACKAGE_NAME, "PTQ ONNX Runtime": ptq_dir / ONNX_NAME,
             "ORT quantize_static": ort_ptq}
    rows = {name: (fp32 if path is None else load_file(path), path) for name, path in files.items()}
    rows["fp32 eager (PyTorch)"] = (fp32, source.path)
    if reference:
        for mode, run_dir in (("QAT", qat_dir), ("PTQ", ptq_dir)):
            rows[f"{mode} ONNX, ORT optimisations off"] = (onnx_export.OnnxModel(run_dir / ONNX_NAME, optimize=False),
                                                          run_dir / ONNX_NAME)
    return rows, splits, len(calibration)


def benchmark(rows: dict, splits, rounds: int, warmup: int, iters: int) -> dict:
    """Accuracy once per row, then latency in interleaved rounds; the median round per row."""
    size, cpu = splits.image_size, torch.device("cpu")
    results = {}
    for name, (model, path) in rows.items():
        with torch.no_grad():
            acc = topk_accuracy(predict(model, splits.val.images, splits.mean, splits.std, size, cpu),
                                splits.val.labels.cpu())
        results[name] = {"top1": acc[1], "top5": acc[5], "file": str(path),
                         "file_mb": path.stat().st_size / 2**20, "b1": [], "b32": []}
    inputs = {b: torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0)) for b in (1, 32)}
    for _ in range(rounds):
        for name, (model, _) in rows.items():
            for batch, x in inputs.items():
                results[name][f"b{batch}"].append(measure_latency(model, x, warmup, iters))
    for r in results.values():
        r["rounds_b1"], r["rounds_b32"] = r.pop("b1"), r.pop("b32")
        r["latency_ms_b1"], r["latency_ms_b32"] = statistics.median(r["rounds_b1"]), statistics.median(r["rounds_b32"])
    return results


def table(results: dict) -> str:
    lines = ["| model | top-1 | top-5 | ms b1 | ms b32 | file MB |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['top1']:.4f} | {r['top5']:.4f} | {r['latency_ms_b1']:.2f} | "
                     f"{r['latency_ms_b32']:.2f} | {r['file_mb']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qat", required=True, type=Path, help="a finished quant run (quant.mode=qat)")
    p.add_argument("--ptq", required=True, type=Path, help="a finished quant.mode=ptq run on the same source")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and ONNX Runtime alike")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reference", action="store_true", help="also the .onnx files with ORT's optimisations off")
    a = p.parse_args(argv)
    try:
        onnx_export.require("bench/int8_peers.py")
        torch.set_num_threads(a.threads)
        a.out.mkdir(parents=True, exist_ok=True)
        rows, splits, calib = build_rows(a.qat, a.ptq, a.out, a.reference)
        results = benchmark(rows, splits, a.rounds, a.warmup, a.iters)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import onnxruntime

    setup = {"qat": str(a.qat), "ptq": str(a.ptq), "threads": a.threads, "rounds": a.rounds, "iters": a.iters,
             "calib_batches": calib, "val_images": len(splits.val.labels), "torch": torch.__version__,
             "onnxruntime": onnxruntime.__version__, "cpu": cpu_facts()}
    md = table(results)
    (a.out / "peers.md").write_text(md + "\n")
    (a.out / "peers.json").write_text(json.dumps({"setup": setup, "rows": results}, indent=1) + "\n")
    print(md)
    print(f"{len(splits.val.labels)} val images, {a.threads} threads, median of {a.rounds} interleaved rounds "
          f"of {a.iters} timed passes; {a.out / 'peers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
