"""ONNX: the fp32 export of any artifact, quant's int8 QDQ model beside its .pt2, ONNX Runtime
running both, the missing-extra and bad-file errors, and bench/int8_peers.py end to end.

One PTQ run of a narrow ResNet-18 (no training: calibration, conversion, .pt2 + .onnx) is shared
by the module.
"""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core import checkpoint as ckpt
from core import data as datalib
from core import onnx_export
from core.augment import eval_view
from core.errors import UserError
from core.evaluate import topk_accuracy
from core.int8 import PackagedModel
from core.models import Classifier
from core.portable import export_backbone
from quant import run
from quant import pt2e
from quant.train import ONNX_NAME
from tests.conftest import ROOT, run_cli
from tests.test_quant import SIZE, make_source, quant_config, random_images

pytest.importorskip("onnxruntime")  # the onnx extra (in dev): CI runs these


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("source") / "byol", width_divisor=4)  # 128-d features


@pytest.fixture(scope="module")
def ptq_run(source_dir, tmp_path_factory):
    return run(quant_config(tmp_path_factory.mktemp("runs"), source_dir, "quant.mode=ptq", "quant.calib_batches=2",
                            "quant.onnx=true", "quant.reduce_range=false"))


def val_images(run_dir):
    splits = datalib.load_splits(quant_config(run_dir.parent, "unused").data)
    return eval_view(splits.val.images, SIZE, splits.mean, splits.std), splits.val.labels


# ----------------------------------------------------------------------------- fp32


def test_fp32_export_matches_pytorch_at_any_batch(source_dir, tmp_path):
    (path,) = export_backbone(source_dir, "onnx", tmp_path / "export")
    assert path.name == "model.onnx"
    art = ckpt.load_model(source_dir)
    model = Classifier(art.backbone, art.head).eval()
    ort_model = onnx_export.OnnxModel(path)
    assert ort_model.image_size == SIZE and json.loads(ort_model.metadata()["num_classes"]) == 10
    worst = 0.0
    for batch in (1, 7):
        x = random_images(batch, seed=batch)
        with torch.no_grad():
            ref, out = model(x), ort_model(x)
        assert out.shape == (batch, 10)
        worst = max(worst, (out - ref).abs().max().item() / ref.abs().max().item())
    print(f"fp32 ONNX vs PyTorch: max abs diff {worst:.2e} of the logits' scale")
    assert worst < 1e-4  # measured here: ~1e-6 (float summation order)


# ----------------------------------------------------------------------------- int8


def test_int8_onnx_is_qdq_with_int8_weights(ptq_run, source_dir):
    counts = onnx_export.qdq_counts(ptq_run / ONNX_NAME)
    layers = sum(isinstance(m, nn.Conv2d) for m in ckpt.load_model(source_dir).backbone.modules()) + 1  # + head
    assert counts["int8_weights"] == layers, counts  # every conv and the head: int8 initializers
    assert counts["DequantizeLinear"] >= layers + 10 and counts["QuantizeLinear"] >= 10, counts
    assert counts.get("BatchNormalization", 0) == 0, counts  # folded, as in the .pt2
    import onnx

    model = onnx.load(str(ptq_run / ONNX_NAME))
    float_kernels = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4]
    assert not float_kernels, float_kernels  # no fp32 conv weight left
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch


def test_int8_onnx_runs_with_only_onnxruntime_and_agrees_with_the_pt2(ptq_run, tmp_path):
    x = random_images(64, seed=5)
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(ptq_run / ONNX_NAME)!r}, providers=["CPUExecutionProvider"])
        x = np.load({str(tmp_path / 'x.npy')!r})
        np.save({str(tmp_path / 'all.npy')!r}, s.run(None, {{"images": x}})[0])
        np.save({str(tmp_path / 'b1.npy')!r}, s.run(None, {{"images": x[:1]}})[0])
        assert "torch" not in sys.modules and not any(m.split(".")[0] in ("core", "quant") for m in sys.modules)
        print(s.get_modelmeta().custom_metadata_map["image_size"])
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "2"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == str(SIZE)
    out, b1 = torch.from_numpy(np.load(tmp_path / "all.npy")), torch.from_numpy(np.load(tmp_path / "b1.npy"))
    assert out.shape == (64, 10) and b1.shape == (1, 10)
    with torch.no_grad():
        pt2 = PackagedModel(ptq_run / pt2e.PACKAGE_NAME)(x)
    diff, scale = (out - pt2).abs().max().item(), pt2.abs().max().item()
    cosine = F.cosine_similarity(out.flatten(), pt2.flatten(), dim=0).item()
    agree = out.argmax(1).eq(pt2.argmax(1)).float().mean().item()
    print(f"ORT vs .pt2: max abs diff {diff:.3g} of {scale:.3g}, cosine {cosine:.5f}, top-1 agreement {agree:.3f}")
    # Two int8 runtimes round requantised activations differently (one step here and there):
    # the same function, not the same bits. Measured here: cosine >= 0.999, agreement >= 0.98.
    assert cosine >= 0.99 and agree >= 0.9, (diff, scale, cosine, agree)


def test_onnx_metrics_are_recomputed_from_the_file(ptq_run):
    m = json.loads((ptq_run / "metrics.json").read_text())
    assert m["onnx_file"] == ONNX_NAME and m["onnx_qdq"]["int8_weights"] > 0
    assert m["onnx_latency_ms_cpu_b1"] > 0 and m["onnx_latency_ms_cpu_b32"] > 0
    x, labels = val_images(ptq_run)
    acc = topk_accuracy(onnx_export.OnnxModel(ptq_run / ONNX_NAME)(x), labels)
    assert m["onnx_top1"] == pytest.approx(acc[1]) and m["onnx_top5"] == pytest.approx(acc[5])
    assert abs(m["onnx_top1"] - m["probe_top1"]) <= 1 / len(labels) + 1e-6  # at most one image of 24
    assert ckpt.load_model(ptq_run).meta["int8_onnx"] == ONNX_NAME


def test_seven_bit_activations_are_refused_not_exported_wrong(ptq_run, source_dir, tmp_path):
    """ONNX's QuantizeLinear clamps to the dtype's range: 0..127 activations would come back 0..255."""
    with pytest.raises(UserError, match="quant.reduce_range=false"):
        onnx_export.export_int8(nn.Identity(), torch.zeros(1, 3, SIZE, SIZE), tmp_path / "m.onnx", reduce_range=True)
    with pytest.raises(UserError, match="quant.onnx=true needs full-range"):
        run(quant_config(tmp_path / "runs", source_dir, "quant.mode=ptq", "quant.onnx=true", "quant.reduce_range=true"))


# ----------------------------------------------------------------------------- errors


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, source_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert not onnx_export.available()
    hint = r'needs the onnx extra: pip install -e "\.\[onnx\]"'
    with pytest.raises(UserError, match="quant.onnx=true " + hint):
        run(quant_config(tmp_path / "runs", source_dir, "quant.mode=ptq", "quant.onnx=true"))
    with pytest.raises(UserError, match="format=onnx " + hint):
        export_backbone(source_dir, "onnx", tmp_path / "export")
    assert not (tmp_path / "runs").exists()


def test_bad_files_are_one_line_errors(ptq_run, tmp_path):
    garbage = tmp_path / "bad.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(UserError, match="cannot load the ONNX model"):
        onnx_export.OnnxModel(garbage)
    half = tmp_path / "half.pt2"
    half.write_bytes((ptq_run / pt2e.PACKAGE_NAME).read_bytes()[:4096])
    with pytest.raises(UserError, match="cannot load the int8 package"):
        PackagedModel(half)


def corrupt_copy(run_dir, dest, name, mode=None):
    shutil.copytree(run_dir, dest)
    (dest / name).write_bytes(b"\x00" * 100)
    if mode:  # the same files presented as a run of another mode
        m = json.loads((dest / "metrics.json").read_text())
        (dest / "metrics.json").write_text(json.dumps({**m, "mode": mode}))
    return dest


@pytest.mark.slow
def test_the_bench_says_which_file_is_corrupt_in_one_line(ptq_run, tmp_path):
    qat = corrupt_copy(ptq_run, tmp_path / "qat", "unused", mode="qat")  # a valid "QAT" run
    for label, args in (
            (".pt2", ["--qat", str(corrupt_copy(ptq_run, tmp_path / "q2", pt2e.PACKAGE_NAME, mode="qat")),
                      "--ptq", str(ptq_run)]),
            (".onnx", ["--qat", str(qat), "--ptq", str(corrupt_copy(ptq_run, tmp_path / "p2", ONNX_NAME))])):
        res = run_cli(["bench/int8_peers.py", *args, "--out", str(tmp_path / "out"), "--rounds", "1", "--iters", "1"],
                      cwd=ROOT)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: cannot load"), res.stderr[-2000:]
        assert label in lines[0]


@pytest.mark.slow
def test_the_bench_measures_every_peer(ptq_run, tmp_path):
    qat = corrupt_copy(ptq_run, tmp_path / "qat", "unused", mode="qat")
    res = run_cli(["bench/int8_peers.py", "--qat", str(qat), "--ptq", str(ptq_run), "--out", str(tmp_path / "out"),
                   "--rounds", "2", "--iters", "2", "--warmup", "1", "--reference"], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "peers.json").read_text())["rows"]
    assert len(rows) == 9 and all(len(r["rounds_b1"]) == 2 for r in rows.values())
    assert rows["fp32 ONNX Runtime"]["top1"] == pytest.approx(rows["fp32 eager (PyTorch)"]["top1"])
    assert rows["PTQ .pt2 (AOTInductor)"]["top1"] == pytest.approx(json.loads((ptq_run / "metrics.json").read_text())
                                                                   ["probe_top1"])
    assert onnx_export.qdq_counts(tmp_path / "out" / "ort_quantize_static.onnx")["int8_weights"] > 0
    assert "| ORT quantize_static |" in (tmp_path / "out" / "peers.md").read_text()


def test_collect_shows_the_onnx_file_as_a_row_of_its_own(tmp_path):
    """launch collect reads quant's onnx_* keys like any other run's metrics: one '(onnx)' row with
    ONNX Runtime's top-1, latency and file size; a quant run without an ONNX file adds none."""
    from launch.collect import collect

    base = {"stage": "quant", "arch": "resnet18", "probe_top1": 0.61, "probe_top5": 0.95, "params": 5.4e6,
            "macs": 7.6e6, "file_mb": 6.0, "latency_ms_cpu_b1": 0.7, "latency_ms_cpu_b32": 1.3}
    onnx = {"onnx_top1": 0.605, "onnx_top5": 0.94, "onnx_file_mb": 5.5, "onnx_latency_ms_cpu_b1": 0.65,
            "onnx_latency_ms_cpu_b32": 7.4}
    for name, extra in (("with", onnx), ("without", {"onnx_top1": None})):
        d = tmp_path / "runs" / "quant" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({**base, **extra}))
    lines = collect([tmp_path / "runs"]).splitlines()
    rows = [line for line in lines if line.startswith("| quant/")]
    assert len(rows) == 3, rows
    onnx_rows = [line for line in rows if "(onnx)" in line]
    assert onnx_rows == ["| quant/with (onnx) | quant | resnet18 | 0.6050 | 0.9400 | 5.40M | 7.6M | 5.50 | 0.65 | 7.40 |"]
