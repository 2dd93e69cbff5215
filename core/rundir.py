"""A run folder belongs to one config and one process.

One config: `config.yaml` records the resolved config a run was made with. A rerun into the
same folder is compared with it, leaving out what cannot change the result (IGNORED below); a
difference stops the stage before any work with one line naming the first differing keys, both
values, and the ways forward: `name=` for a new run, `overwrite=true` (delete the folder's run
and start afresh) or `resume=force` (continue its checkpoint under the new config; the old
config is kept as config.N.yaml). `launch submit/pipeline/sweep` run the same check on their
whole plan before submitting anything.

One process: the process that writes a run folder holds an exclusive `fcntl.flock` on its
`.lock` file for as long as it runs (DDP: rank 0). The kernel drops the lock when the process
ends however it ends (SIGKILL, a requeue, a node reboot), so no lock is ever stale; a second
process fails at once, naming the holder's PID and host, which the holder writes into the file.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from core.errors import UserError

# What a rerun may change without making another run: where it lives and logs, how it runs
# (progress bar, Slurm settings, data loading), when it pauses, saves and monitors. A budgeted
# run keeps the epoch plan its first job made (core/loop.py), so a new budget changes nothing
# there: train.budget_min is left out when the recorded one is > 0.
IGNORED = ("run_root", "overwrite", "resume", "engine.progress", "track.", "launch.", "eval.knn_every_epochs",
           "train.max_steps", "train.checkpoint_every_steps", "data.num_workers", "data.cache_dir")
LOCK = ".lock"

_held: Dict[str, Any] = {}  # run folder -> the open lock file this process holds


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _ignored(key: str) -> bool:
    return any(key == i or (i.endswith(".") and key.startswith(i)) for i in IGNORED)


def _same(old: Any, new: Any) -> bool:
    if old == new:
        return True
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return float(old) == float(new)
    if isinstance(old, str) and isinstance(new, str) and old and new:  # the same file, written two ways
        return Path(old).exists() and Path(old).resolve() == Path(new).resolve()
    return False


def differences(run_dir: str | Path, cfg: Any) -> List[Tuple[str, Any, Any]]:
    """(key, recorded value, new value) for each key that differs from the folder's config.yaml."""
    from omegaconf import OmegaConf

    from core.config import to_dict

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    try:
        old = _flat(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    except Exception as e:
        raise UserError(f"{path} is unreadable ({str(e).splitlines()[0]}); move the folder away or pick another name=")
    new = _flat(to_dict(cfg))
    diffs = []
    for key in list(old) + [k for k in new if k not in old]:
        if _ignored(key) or (key == "train.budget_min" and (old.get(key) or 0) > 0):
            continue
        if not _same(old.get(key, "<unset>"), new.get(key, "<unset>")):
            diffs.append((key, old.get(key, "<unset>"), new.get(key, "<unset>")))
    return diffs


def describe(diffs: List[Tuple[str, Any, Any]], most: int = 3) -> str:
    shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs[:most])
    return shown + (f" (and {len(diffs) - most} more)" if len(diffs) > most else "")


def check_config(run_dir: Path, cfg: Any, stage: str, finished: bool) -> str:
    """'same' (a new folder, or the same config), 'overwrite' or 'force' (cfg says so and the
    config differs); raises UserError for any other difference, before anything is written."""
    overwrite, force = getattr(cfg, "overwrite", False), getattr(cfg, "resume", "auto") == "force"
    if overwrite:
        return "overwrite" if (Path(run_dir) / "config.yaml").is_file() else "same"
    diffs = differences(run_dir, cfg)
    if not diffs:
        return "same"
    what = "a finished run" if finished else "an unfinished run"
    if force and not finished:
        return "force"
    if force:
        raise UserError(f"{stage}: {run_dir} holds a finished run, so resume=force has nothing to continue "
                        f"(its config differs: {describe(diffs)}); use name=NEW for a new run or overwrite=true")
    raise UserError(f"{stage}: {run_dir} holds {what} of another config ({describe(diffs)}); use name=NEW "
                    f"for a new run, overwrite=true to delete it and start afresh"
                    + ("" if finished else ", or resume=force to continue its checkpoint under this config"))


def keep_old_config(run_dir: Path) -> Path:
    """resume=force: config.yaml -> config.N.yaml (the first free N), before the new one is written."""
    n = 1
    while (Path(run_dir) / f"config.{n}.yaml").exists():
        n += 1
    kept = Path(run_dir) / f"config.{n}.yaml"
    os.replace(Path(run_dir) / "config.yaml", kept)
    return kept


def clear(run_dir: Path) -> List[str]:
    """overwrite=true: delete every file and folder of the previous run (not the lock we hold)."""
    gone = []
    for p in sorted(Path(run_dir).iterdir()):
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        gone.append(p.name)
    return gone


def hold(run_dir: Path) -> None:
    """Take the folder's lock for the rest of this process (or until release), or fail at once."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _held:  # an earlier run in this process (a test, the debug executor): ours to retake
        _held.pop(key).close()
    f = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "an unknown process"
        f.close()
        raise UserError(f"{run_dir} is in use by {holder}; wait for it to end, or pick another name=") from None
    holder = f"PID {os.getpid()} on {socket.gethostname()}"
    if os.environ.get("SLURM_JOB_ID"):
        holder += f" (Slurm job {os.environ['SLURM_JOB_ID']}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')})"
    f.seek(0)
    f.truncate()
    f.write(f"{holder} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _held[key] = f


def release(run_dir: Optional[Path]) -> None:
    if run_dir is not None:
        f = _held.pop(str(Path(run_dir).resolve()), None)
        if f is not None:
            f.close()
