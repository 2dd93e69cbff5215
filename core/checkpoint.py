"""The artifact directory: atomic writes, safe loads, lineage.

    <run_root>/<stage>/<name>/
      config.yaml     the fully resolved config
      checkpoint.pt   latest resumable state (plain tensors and numbers only)
      model.pt        final weights: {"spec", "backbone", "head", "meta"}
      metrics.json    final metrics

Every write goes to a temporary file in the same directory, is fsynced, then renamed over
the target: a job killed mid-write leaves the previous file intact. Every load uses
`torch.load(weights_only=True)`, so a file can never run code.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
import torch.nn as nn

from core.errors import UserError
from core.models import backbone_from_spec


def artifact_dir(run_root: str, stage: str, name: str) -> Path:
    return Path(run_root) / stage / name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Signals that would stop the process in the middle of a write: held back until the file is
# renamed into place (a local job's time limit sent SIGINT seconds after the USR2 that started
# the checkpoint), then raised again. Python handlers, not a thread mask: any of torch's threads
# may be the one the kernel hands a process signal to.
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class _SignalsHeld:
    def __enter__(self):
        self.received, self.previous = [], {}
        if threading.current_thread() is threading.main_thread():
            for sig in HELD_SIGNALS:
                self.previous[sig] = signal.signal(sig, lambda signum, frame: self.received.append(signum))
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for signum in self.received:
            signal.raise_signal(signum)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _SignalsHeld():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; colleagues on a cluster read runs
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


def remove_interrupted_writes(directory: Path, also: Sequence[str] = ()) -> List[str]:
    """Delete the temp files of atomic writes a killed job never finished (`.NAME.*.tmp`, never
    read: the rename is what publishes a write) and the names in `also`; returns what went."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    gone = [f for f in directory.glob(".*.tmp") if f.is_file()] + [directory / n for n in also if (directory / n).is_file()]
    for f in gone:
        f.unlink(missing_ok=True)
    return sorted(f.name for f in gone)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temp file + rename."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def safe_load(path: Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True; a truncated or corrupt file is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load {path}: the file is truncated or corrupt ({msg[:160]})") from None


# ----------------------------------------------------------------------------- json / config


def write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------- models


@dataclass
class Artifact:
    """A loaded model.pt: rebuilt backbone (eval mode), optional probe head, metadata."""

    path: Path
    backbone: nn.Module
    head: Optional[nn.Linear]
    spec: dict
    meta: dict


def save_model(run_dir: Path, backbone: nn.Module, spec: dict, meta: dict,
               head: Optional[nn.Linear] = None) -> Path:
    """model.pt: weights + the spec that rebuilds the module + meta (data stats, lineage)."""
    blob = {
        "spec": spec,
        "backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "head": None if head is None else {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "meta": meta,
    }
    path = Path(run_dir) / "model.pt"
    atomic_save(blob, path)
    return path


def save_head(run_dir: Path, head: nn.Linear) -> None:
    """Add (or replace) the probe head in an existing model.pt."""
    path = Path(run_dir) / "model.pt"
    blob = safe_load(path)
    blob["head"] = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    atomic_save(blob, path)


def load_model(run_dir: Path, what: str = "artifact") -> Artifact:
    """Rebuild the backbone from its spec and load its weights strictly."""
    run_dir = Path(run_dir)
    path = run_dir / "model.pt" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"{what} {run_dir} has no model.pt (not a finished stage artifact?)")
    blob = safe_load(path)
    if not isinstance(blob, dict) or "spec" not in blob or "backbone" not in blob:
        raise UserError(f"{path} is not a model artifact (expected keys spec, backbone)")
    backbone = backbone_from_spec(blob["spec"])
    try:
        backbone.load_state_dict(blob["backbone"], strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match the spec ({str(e).splitlines()[0]})") from None
    head = None
    if blob.get("head") is not None:
        w = blob["head"]["weight"]
        head = nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict(blob["head"])
        head.eval()
    backbone.eval()
    return Artifact(path, backbone, head, blob["spec"], blob.get("meta", {}))
