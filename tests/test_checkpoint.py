"""Atomic writes, safe loads, and model artifacts rebuilt from their spec."""

import pytest
import torch

from core import checkpoint as ckpt
from core.errors import UserError
from core.models import backbone_from_spec, backbone_spec, build_backbone


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def exploding_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("node died mid-write")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError):
        ckpt.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = ckpt.safe_load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="truncated or corrupt"):
        ckpt.safe_load(path)


class NotAllowed:
    pass


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": NotAllowed()}, path)
    with pytest.raises(UserError):
        ckpt.safe_load(path)


def test_model_artifact_roundtrip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = build_backbone("resnet18", cifar_stem=True).eval()
    head = torch.nn.Linear(512, 10)
    ckpt.save_model(tmp_path, net, backbone_spec(net, "resnet18", True), {"stage": "byol"}, head)
    art = ckpt.load_model(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(art.head(art.backbone(x)), head(net(x)))
    assert art.meta["stage"] == "byol"


def test_spec_rebuilds_narrower_channels():
    net = build_backbone("resnet18", cifar_stem=True)
    spec = backbone_spec(net, "resnet18", True)
    # a pruned layer1.0: conv1 emits 40 channels instead of 64
    spec["shapes"]["layer1.0.conv1"] = [40, 64, 3, 3]
    spec["shapes"]["layer1.0.bn1"] = [40]
    spec["shapes"]["layer1.0.conv2"] = [64, 40, 3, 3]
    rebuilt = backbone_from_spec(spec)
    assert rebuilt.layer1[0].conv1.out_channels == 40 and rebuilt.layer1[0].conv2.in_channels == 40
    assert rebuilt(torch.randn(1, 3, 32, 32)).shape == (1, 512)


def test_missing_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="has no model.pt"):
        ckpt.load_model(tmp_path / "runs/byol/none", "teacher")


def test_a_stop_signal_during_a_write_waits_for_the_file(tmp_path, monkeypatch):
    """SIGINT arriving mid-write (a local job's time limit, seconds after the USR2 that started the
    checkpoint) is delivered once the file is in place: never a half checkpoint, never a lost one."""
    import os
    import signal

    path = tmp_path / "checkpoint.pt"
    state = {"w": torch.arange(1000.0)}
    save = torch.save

    def signalled_mid_write(obj, f):
        f.write(b"")  # the file is open, nothing in it yet
        os.kill(os.getpid(), signal.SIGINT)
        save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", signalled_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save(state, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])
    assert not list(tmp_path.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_written_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        ckpt.atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        ckpt.atomic_save({"x": 1}, tmp_path / "checkpoint.pt")
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}  # mkstemp alone: 0600
