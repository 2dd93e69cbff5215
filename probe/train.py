"""Linear probe + kNN of any backbone artifact, as its own job; optionally linear evaluation
as published.

The backbone stays frozen and in eval mode; features are computed once (no augmentation)
and cached in memory, then a linear classifier trains on them (probe_*: the fast monitor).
With linear.enabled=true a second classifier trains on augmented views of the frozen backbone
(random resized crop + flip, SGD, cosine; linear_*: the protocol BYOL, solo-learn and lightly
publish), on train+val when a test split exists. Both report val and, with a test split,
test_* numbers (README, "Evaluation protocols"). Writes its own artifact dir with the probe
head (head.pt, used as the teacher's classifier by distillation's `kd` loss), the linear
head (linear_head.pt) and metrics.

    python -m probe configs/quickstart.yaml artifact=runs/byol/quickstart
    python -m probe configs/quickstart.yaml artifact=runs/byol/quickstart linear.enabled=true
    python -m probe configs/quickstart.yaml artifact=runs/quant/quickstart   # + the int8 file, checked here
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from core import checkpoint as ckpt
from core import data as datalib
from core import engine
from core import int8
from core import rundir
from core.config import StageConfig, to_dict, to_yaml
from core.errors import UserError
from core.evaluate import LinearEvalConfig, evaluate_backbone, linear_eval, resolve_train_on
from core.models import count_macs, count_params
from core.loop import write_metrics
from core.track import Tracker, log_line

STAGE = "probe"


@dataclass
class Config(StageConfig):
    # the backbone artifact dir to evaluate (byol, distill, prune, quant); for a quant artifact the
    # int8 package is evaluated too, on this CPU, against the top-1 its quant run recorded
    artifact: str = ""
    linear: LinearEvalConfig = field(default_factory=LinearEvalConfig)  # linear evaluation as published


def run(cfg: Config) -> Path:
    if not cfg.artifact:
        raise UserError("probe needs artifact=DIR (a stage's artifact directory with model.pt)")
    source = Path(cfg.artifact)
    name = cfg.name if cfg.name != "default" else "-".join(source.parts[-2:])
    run_dir = ckpt.artifact_dir(cfg.run_root, STAGE, name)
    # A probe is cheap: an equal config is evaluated again; another one is refused (core/rundir.py).
    mode = rundir.check_config(run_dir, cfg, STAGE, finished=False)
    art = ckpt.load_model(source, "artifact")  # fails before any work if absent or broken

    device = engine.resolve_device(cfg.engine)
    engine.seed_everything(cfg.seed)
    splits = datalib.load_splits(cfg.data)
    if art.meta.get("num_classes") not in (None, splits.num_classes) and art.meta.get("data") != cfg.data.name:
        log_line(f"probe: note: {source} was trained on {art.meta.get('data')}, probing on {cfg.data.name}")
    if cfg.linear.enabled:  # a train_on the data cannot serve stops before any work
        resolve_train_on(splits, cfg.linear.train_on)
    rundir.hold(run_dir)  # one writer
    if mode == "overwrite":
        rundir.clear(run_dir)
    elif mode == "force":
        rundir.keep_old_config(run_dir)
    ckpt.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    tracker = Tracker(cfg.track, run_dir, f"{STAGE}/{name}", to_dict(cfg))

    start = time.perf_counter()
    backbone = art.backbone.to(device)
    metrics, head = evaluate_backbone(backbone, splits, cfg.eval, device,
                                      engine.use_bf16(cfg.engine, device), cfg.seed, probe=True)
    metrics.update({"source": str(source), "source_stage": art.meta.get("stage"),
                    "params": count_params(backbone), "macs": count_macs(backbone, splits.image_size)})
    if splits.test is not None:
        metrics["test_split"] = splits.test_name
    if cfg.linear.enabled:
        linear, linear_head = linear_eval(backbone, splits, cfg.linear, device, cfg.seed,
                                          engine.use_bf16(cfg.engine, device), cfg.eval.feature_batch_size,
                                          cfg.engine.progress)
        metrics.update(linear)
        ckpt.atomic_save({"head": linear_head.state_dict(), "source": str(source), "num_classes": splits.num_classes,
                          "data": cfg.data.name, "protocol": "linear"}, run_dir / "linear_head.pt")
    metrics["seconds"] = time.perf_counter() - start
    package = int8.package_of(art, source)
    if package is not None:  # an int8 artifact: also the shipped file, on this CPU, against its record
        model = int8.PackagedModel(package)
        acc = int8.package_accuracy(model, splits.val.images, splits.val.labels, splits)
        metrics.update(int8.verify_against_record(acc[1], ckpt.read_metrics(source)), int8_top5_here=acc[5])
        if splits.test is not None:
            acc = int8.package_accuracy(model, splits.test.images, splits.test.labels, splits)
            metrics.update(test_int8_top1_here=acc[1], test_int8_top5_here=acc[5])
        log_line(f"probe: {int8.verdict_line(metrics)}")
    ckpt.atomic_save({"head": head.state_dict(), "source": str(source), "num_classes": splits.num_classes,
                      "data": cfg.data.name}, run_dir / "head.pt")
    write_metrics(run_dir, metrics, tracker)
    log_line(f"probe: {source}: {summary_line(metrics)} -> {run_dir}")
    rundir.release(run_dir)
    return run_dir


def summary_line(metrics: dict) -> str:
    """`kNN top-1 0.91  probe top-1 0.93  top-5 0.99  |  test: ...` for the splits and protocols measured."""
    def part(prefix: str) -> str:
        names = (("knn_top1", "kNN top-1"), ("probe_top1", "probe top-1"), ("probe_top5", "top-5"),
                 ("linear_top1", "linear top-1"), ("linear_top5", "top-5"))
        return "  ".join(f"{label} {metrics[prefix + key]:.4f}" for key, label in names if prefix + key in metrics)

    test = part("test_")
    return part("") + (f"  |  test ({metrics.get('test_split', '')}): {test}" if test else "")
