"""core/loop.py once, on a tiny stage: exact resume, SIGTERM/SIGUSR2, the non-finite-loss stop,
checkpoint_every_steps, max_steps, the schedule's end points, the epoch history.

The tiny stage is a linear classifier on 8px synthetic images whose inputs get noise from the
step's generator, so a resume that redrew other views (or other batches) would end elsewhere.
Each stage keeps its own exact-resume integration test (test_byol, test_distill, ...).
"""

import os
import signal
import time
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core import checkpoint as ckpt
from core.config import StageConfig, TrainConfig, load_config
from core.loop import Run, view_seed
from core.optim import build_optimizer, warmup_cosine

STEPS_PER_EPOCH = 4  # 40 train images (50, val_fraction 0.2), batch 10


def tiny_train() -> TrainConfig:
    return TrainConfig(epochs=3, batch_size=10, optimizer="sgd", lr=0.5, weight_decay=1e-4, warmup_epochs=0.5)


@dataclass
class TinyConfig(StageConfig):
    train: TrainConfig = field(default_factory=tiny_train)


def config(run_root, *overrides):
    return load_config(TinyConfig, None, [
        "data.name=synthetic", "data.synthetic_size=50", "data.image_size=8", "data.val_fraction=0.2",
        "engine.device=cpu", "engine.progress=false", "track.mode=disabled", f"run_root={run_root}", *overrides])


def tiny_stage(cfg, poison_at=None, signal_at=None, pause_s=0.0):
    """A whole stage on core.loop: what a new stage's train.py looks like, minus its own parts.
    pause_s: a sleep in every step, to keep a job running while a test does something to it."""
    r = Run(cfg, "tiny")
    if r.done:
        return r.dir
    r.start()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    optimizer = build_optimizer(cfg.train, model.parameters(), r.base_lr())
    r.resume(model=model, optimizer=optimizer)
    for s in r.steps(optimizer, per_epoch=lambda done: {"weight_norm": model[1].weight.norm().item()}):
        x = s.images.float() / 255 + 0.1 * torch.randn(s.images.shape, generator=s.generator)
        loss = F.cross_entropy(model(x), s.labels)
        if s.index == poison_at:
            loss = loss * float("nan")
        if s.index == signal_at:
            os.kill(os.getpid(), signal_at_signal)
        time.sleep(pause_s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        r.record(loss, {"ce": loss.detach()})
    if r.paused():
        return r.dir
    return r.finish(model, {"arch": "tiny"}, None, {"lr_at_last_step": optimizer.param_groups[0]["lr"]})


signal_at_signal = signal.SIGTERM


def states(run_dir):
    return ckpt.safe_load(run_dir / "checkpoint.pt")


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"] == b["history"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return tiny_stage(config(tmp_path_factory.mktemp("loop") / "runs", "name=ref"))


def test_uninterrupted_run_writes_the_artifact_and_its_history(uninterrupted):
    import json

    m = json.loads((uninterrupted / "metrics.json").read_text())
    assert m["stage"] == "tiny" and m["epochs"] == 3 and m["steps"] == 3 * STEPS_PER_EPOCH
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3] and all("weight_norm" in h for h in m["history"])
    assert m["final_loss"] == m["history"][-1]["loss"] and m["seconds_per_epoch"] > 0
    assert m["lr_at_last_step"] == 0.0  # the cosine ends at its final value on the last step
    state = states(uninterrupted)
    assert "aug_rng" not in state and state["step"] == 12  # views come from (seed, rank, step): no RNG state
    blob = ckpt.safe_load(uninterrupted / "model.pt")  # the stage's spec, weights and meta
    assert blob["spec"] == {"arch": "tiny"} and blob["meta"]["stage"] == "tiny" and blob["meta"]["num_classes"] == 10


def test_schedule_warms_up_then_ends_at_zero():
    lrs = [warmup_cosine(t, 12, 1.0, 2) for t in range(12)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] == 0.0  # lightly's: warmup from its first step
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_max_steps_then_resume_is_exact(uninterrupted, tmp_path):
    root = tmp_path / "runs"
    part = tiny_stage(config(root, "name=ref", "train.max_steps=5"))  # stops inside epoch 2
    assert states(part)["step"] == 5 and not (part / "model.pt").exists()
    assert tiny_stage(config(root, "name=ref")) == part
    assert_same_state(states(uninterrupted), states(part))


def test_a_resumed_run_removes_the_writes_a_killed_job_left_unfinished(uninterrupted, tmp_path, capsys):
    root = tmp_path / "runs"
    part = tiny_stage(config(root, "name=ref", "train.max_steps=5"))
    # What a kill during a checkpoint write (or during a budget's calibration) leaves behind
    leftovers = [part / ".checkpoint.pt.k3x9a1.tmp", part / ".metrics.json.q2.tmp", part / "calibration.pt"]
    for f in leftovers:
        f.write_bytes(b"half a write")
    (part / "notes.tmp").write_text("a user's file: not ours")
    tiny_stage(config(root, "name=ref"))
    assert not any(f.exists() for f in leftovers) and (part / "notes.tmp").exists()
    assert "removed 3 unfinished write(s) of an interrupted job" in capsys.readouterr().err
    assert_same_state(states(uninterrupted), states(part))


# Mid-epoch, and at an epoch's last step (index 3 of 4 a epoch): that epoch's end comes first.
@pytest.mark.parametrize("sig,at", [(signal.SIGTERM, 6), (signal.SIGUSR2, 6), (signal.SIGUSR2, 3)])
def test_a_signal_checkpoints_at_the_end_of_the_step_then_resumes_exactly(uninterrupted, tmp_path, sig, at):
    global signal_at_signal
    signal_at_signal = sig
    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as stop:
        tiny_stage(config(root, "name=ref"), signal_at=at)
    assert stop.value.code == 128 + sig
    state = states(root / "tiny" / "ref")
    assert state["step"] == at + 1  # the step in flight finished, then saved
    assert len(state["history"]) == (at + 1) // STEPS_PER_EPOCH
    tiny_stage(config(root, "name=ref"))
    assert_same_state(states(uninterrupted), states(root / "tiny" / "ref"))


def test_non_finite_loss_stops_and_leaves_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(SystemExit, match=r"loss is nan at step 6; stopping \(last good checkpoint"):
        tiny_stage(config(root, "name=nan", "train.checkpoint_every_steps=2"), poison_at=5)
    state = states(root / "tiny" / "nan")
    assert state["step"] == 4  # checkpoint_every_steps=2 saved at 4; the save at 6 read the nan first
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_checkpoint_every_steps_saves_between_epochs(tmp_path):
    root = tmp_path / "runs"
    tiny_stage(config(root, "name=every", "train.checkpoint_every_steps=3", "train.max_steps=3"))
    assert states(root / "tiny" / "every")["step"] == 3  # mid-epoch (4 steps an epoch)


def test_view_seeds_differ_by_rank_and_step():
    seeds = {view_seed(0, rank, step) for rank in range(4) for step in range(1000)}
    assert len(seeds) == 4000 and all(0 <= s < 2**63 for s in seeds)


def test_w_and_b_rows_every_log_every_steps_and_at_the_last(tmp_path, monkeypatch):
    """Losses are read (one host sync) and logged every LOG_EVERY steps and at the last step,
    whatever the epoch length; the epoch rows carry the epoch's mean loss."""
    import core.loop

    rows = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            self.id, self.rows = "test", []

        def log(self, metrics, step):
            rows.append((step, metrics))

        def summary(self, metrics):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(core.loop, "Tracker", Recorder)
    tiny_stage(config(tmp_path / "runs", "name=rows", "train.epochs=6"))  # 24 steps of 4 an epoch
    assert [step for step, m in rows if "train/loss" in m] == [10, 20, 24]
    assert [step for step, m in rows if "train/epoch_loss" in m] == [4, 8, 12, 16, 20, 24]
    assert all(isinstance(m["train/loss"], float) and "train/ce" in m for _, m in rows if "train/loss" in m)
