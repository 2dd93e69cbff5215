"""The record of each launch, and the state of its jobs.

Every `submit`, `pipeline` and `sweep` writes `<run_root>/launch/<id>/manifest.json` (plus the
resolved config of each job beside it). `python -m launch status` reads them back and asks
Slurm about each job.

Without accounting (no sacct) submitit reports every job as UNKNOWN, and a finished job
disappears from `scontrol show job` after MinJobAge (60-120 s). So the state comes from
`scontrol show job` while Slurm still knows the job, and after that from submitit's own files:
`<folder>/<id>_0_result.pkl` holds ("success", result) or ("error", traceback); a job that
never ran (cancelled, dependency never satisfied) leaves none.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from core import checkpoint as ckpt

ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


# ----------------------------------------------------------------------------- manifests


def new_record(run_root: str | Path, kind: str, name: str) -> Path:
    """A fresh directory <run_root>/launch/<time>-<kind>-<name>-<random>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(run_root) / "launch" / f"{stamp}-{kind}-{name}-{secrets.token_hex(2)}"
    path.mkdir(parents=True)
    return path


def write_manifest(record: Path, manifest: dict) -> None:
    ckpt.write_json(Path(record) / "manifest.json", manifest)


def read_manifests(run_root: str | Path) -> List[dict]:
    """Every launch under run_root, oldest first."""
    out = []
    for path in sorted(Path(run_root).glob("launch/*/manifest.json")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        manifest["record"] = str(path.parent)
        out.append(manifest)
    return sorted(out, key=lambda m: (m.get("created", 0), m["record"]))


# ----------------------------------------------------------------------------- job states


def scontrol_state(job_id: str) -> Optional[Tuple[str, str]]:
    """(JobState, Reason) while Slurm still knows the job, else None."""
    if shutil.which("scontrol") is None:
        return None
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0 or "JobState=" not in out.stdout:
        return None
    line = out.stdout.splitlines()[0]
    state = re.search(r"JobState=(\S+)", line).group(1)
    reason = re.search(r"Reason=(\S+)", line)
    return state, (reason.group(1) if reason and reason.group(1) != "None" else "")


def result_state(folder: str | Path, job_id: str) -> Optional[Tuple[str, str]]:
    """COMPLETED / FAILED from submitit's result file, None if the job wrote none."""
    path = Path(folder) / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    from submitit.core.utils import pickle_load  # the file submitit's job.result() reads

    try:
        outcome, payload = pickle_load(path)
    except Exception:
        return "UNKNOWN", f"unreadable {path.name}"
    if outcome == "success":
        return "COMPLETED", ""
    lines = [ln for ln in str(payload).splitlines() if ln.strip()]
    return "FAILED", lines[-1] if lines else ""


def pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError, PermissionError):
        return False


def job_state(job: dict, cluster: str, folder: str) -> Tuple[str, str]:
    """(state, detail) of one manifest entry."""
    if job.get("job_id") is None:  # a local/debug job that never started
        return job.get("state", "NOT_RUN"), job.get("error", "")
    if cluster == "slurm":
        live = scontrol_state(job["job_id"])
        if live is not None:
            return live
    elif cluster == "local" and pid_alive(job["job_id"]) and job.get("state") not in ("COMPLETED", "FAILED"):
        return "RUNNING", ""
    if cluster != "slurm" and job.get("state") in ("COMPLETED", "FAILED", "NOT_RUN"):
        return job["state"], job.get("error", "")
    done = result_state(folder, job["job_id"])
    if done is not None:
        return done
    if job.get("run_dir") and (Path(job["run_dir"]) / "metrics.json").is_file():  # collect has none
        return "COMPLETED", "artifact finished (job record gone)"
    return "UNKNOWN", "no longer known to Slurm and no result file: cancelled or killed (see the log)"


def status_lines(run_root: str | Path, show_all: bool = False) -> List[str]:
    manifests = read_manifests(run_root)
    if not manifests:
        return [f"no launches under {Path(run_root) / 'launch'}"]
    lines = []
    for manifest in manifests if show_all else manifests[-1:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.get("created", 0)))
        lines.append(f"{manifest['kind']} {manifest['name']} ({manifest['cluster']}, {when})  "
                     f"record: {manifest['record']}")
        for job in manifest["jobs"]:
            state, detail = job_state(job, manifest["cluster"], manifest["folder"])
            lines.append(f"  {str(job.get('job_id') or '-'):>10}  {state:<10} {job['stage']:<8} {job['name']:<28} "
                         f"{job['run_dir']}" + (f"  [{detail}]" if detail else ""))
            if job.get("stdout"):
                lines.append(f"  {'':>10}  log: {job['stdout']}  (.err beside it)")
        if manifest.get("collect"):  # SLURM: the table, written by a last job once the others end
            c = manifest["collect"]
            state, detail = job_state(c, manifest["cluster"], manifest["folder"])
            table = Path(c["out"]) / "results.md"
            lines.append(f"  {c['job_id']:>10}  {state:<10} {'collect':<8} {'the table':<28} "
                         + (f"{table}" if table.is_file() else f"{table} (not written yet)")
                         + (f"  [{detail}]" if detail else ""))
    return lines


def wait_slurm(job_ids: List[str], folder: str | Path, timeout_s: float, poll_s: float = 2.0
               ) -> Dict[str, Tuple[str, str]]:
    """Poll until every job has ended (or timeout_s passes); returns {id: (state, detail)}."""
    deadline = time.time() + timeout_s
    states: Dict[str, Tuple[str, str]] = {}
    while True:
        for job_id in job_ids:
            live = scontrol_state(job_id)
            if live is not None and live[0] not in ACTIVE:
                states[job_id] = live
            elif live is None:
                states[job_id] = result_state(folder, job_id) or ("UNKNOWN", "gone from Slurm")
            else:
                states.pop(job_id, None)
        if len(states) == len(job_ids) or time.time() > deadline:
            return {j: states.get(j, scontrol_state(j) or ("UNKNOWN", "")) for j in job_ids}
        time.sleep(poll_s)
