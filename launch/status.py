"""The record of each launch, and the state of its jobs.

Every `submit`, `pipeline` and `sweep` writes `<run_root>/launch/<id>/manifest.json` (plus the
resolved config of each job beside it). `python -m launch status` reads them back and asks
Slurm about each job.

Without accounting (no sacct) submitit reports every job as UNKNOWN, and a finished job
disappears from `scontrol show job` after MinJobAge (plus up to a minute of slurmctld's purge
cycle). So the state comes from `scontrol show job` while Slurm still knows the job (and is
written to `<record>/seen.json`, so a later `status` still knows it), after that from
submitit's own files: `<folder>/<id>_0_result.pkl` holds ("success", result) or ("error",
traceback). A job that never ran (cancelled while pending, or because a job it waited on
failed) leaves no file at all: its upstream jobs, recorded at submission, say why.
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
    """(JobState, Reason and a non-zero ExitCode) while Slurm still knows the job, else None."""
    if shutil.which("scontrol") is None:
        return None
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0 or "JobState=" not in out.stdout:
        return None
    line = out.stdout.splitlines()[0]
    state = re.search(r"JobState=(\S+)", line).group(1)
    reason = re.search(r"Reason=(\S+)", line)
    code = re.search(r" ExitCode=(\S+)", line)
    detail = reason.group(1) if reason and reason.group(1) != "None" else ""
    if code and code.group(1) != "0:0" and state not in ACTIVE:
        detail = f"{detail}, exit code {code.group(1)}" if detail else f"exit code {code.group(1)}"
    return state, detail


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
    if not ran(job):
        return "CANCELLED", "never ran: cancelled before it started (it left no log)"
    return "UNKNOWN", "ended without a result file: killed while running (time limit, scancel, node); see its log"


def ran(job: dict) -> bool:
    """The job started: submitit opened its log files."""
    return any(job.get(k) and Path(job[k]).is_file() for k in ("stdout", "stderr"))


def log_path(job: dict) -> Optional[str]:
    """The job's log, where the stage writes (stderr; submitit's lines go to the .out beside it)."""
    for key in ("stderr", "stdout"):
        if job.get(key) and Path(job[key]).is_file():
            return job[key]
    return None


ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
               "DEADLINE", "UNKNOWN")


def manifest_states(manifest: dict) -> List[Tuple[str, str]]:
    """(state, detail) of each job of a launch, in order. On Slurm: what `scontrol` says is
    recorded in <record>/seen.json once final; a job Slurm has forgotten reads from there, then
    from submitit's files; one that never ran and waited on a job that ended badly names the
    job that failed first up its chain, and that job's log."""
    cluster, folder = manifest["cluster"], manifest["folder"]
    seen_path = Path(manifest["record"]) / "seen.json" if manifest.get("record") else None
    seen = json.loads(seen_path.read_text()) if seen_path and seen_path.is_file() else {}
    out: List[Tuple[str, str]] = []
    culprit: Dict[str, Tuple[dict, str]] = {}  # job id -> (the job that ended badly first up its chain, its state)
    learned = False
    for job in manifest["jobs"]:
        job_id = job.get("job_id")
        if cluster != "slurm" or not job_id:
            out.append(job_state(job, cluster, folder))
            continue
        live = scontrol_state(job_id)
        if live is not None:
            state, detail = live
            if state not in ACTIVE and seen.get(job_id) != [state, detail]:
                seen[job_id], learned = [state, detail], True
        elif job_id in seen:
            state, detail = seen[job_id]
        else:
            state, detail = job_state(job, cluster, folder)
        if state in ENDED_BADLY:
            upstream = [culprit[a] for a in job.get("after", []) if a in culprit]
            if upstream and not ran(job):
                (first, first_state), where = upstream[0], log_path(upstream[0][0])
                detail = (f"never ran: {first['stage']} {first['name']} (job {first['job_id']}) "
                          f"{'failed' if first_state == 'FAILED' else 'ended ' + first_state}"
                          + (f"; its log: {where}" if where else " before it started"))
                culprit[job_id] = upstream[0]
            else:
                culprit[job_id] = (job, state)
        out.append((state, detail))
    if learned and seen_path is not None:
        try:
            ckpt.write_json(seen_path, seen)
        except OSError:  # a read-only run root: status still answers
            pass
    return out


def find_run_root(start: str | Path = ".") -> Optional[Path]:
    """The run root above or at `start`: a folder with launch/, or one with runs/launch/."""
    here = Path(start).absolute()
    for folder in (here, *here.parents):
        if any(folder.glob("launch/*/manifest.json")):
            return folder
        if any(folder.glob("runs/launch/*/manifest.json")):
            return folder / "runs"
    return None


def status_lines(run_root: Optional[str | Path] = None, show_all: bool = False) -> List[str]:
    """What `launch status` prints. Every path it prints exists: a run folder not made yet, or the
    log of a job that never ran, is said in words."""
    if run_root is None:
        run_root = find_run_root()
        if run_root is None:
            return [f"no launches found in {Path.cwd()} or above it (looked for runs/launch/ and launch/); "
                    "point at the run root with --run-root DIR (the run_root= the launch used)"]
    manifests = read_manifests(run_root)
    if not manifests:
        return [f"no launches under {Path(run_root).absolute() / 'launch'}; point elsewhere with --run-root DIR "
                "(the run_root= the launch used)"]
    lines = []
    for manifest in manifests if show_all else manifests[-1:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.get("created", 0)))
        lines.append(f"{manifest['kind']} {manifest['name']} ({manifest['cluster']}, {when})  "
                     f"record: {manifest['record']}")
        for job, (state, detail) in zip(manifest["jobs"], manifest_states(manifest)):
            run_dir = job["run_dir"] if Path(job["run_dir"]).exists() else "(no run folder yet)"
            lines.append(f"  {str(job.get('job_id') or '-'):>10}  {state:<10} {job['stage']:<8} {job['name']:<28} "
                         f"{run_dir}" + (f"  [{detail}]" if detail else ""))
            log = log_path(job)
            if log:
                lines.append(f"  {'':>10}  log: {log}")
        if manifest.get("collect"):  # SLURM: the table, written by a last job once the others end
            c = manifest["collect"]
            state, detail = job_state(c, manifest["cluster"], manifest["folder"])
            table = Path(c["out"]) / "results.md"
            lines.append(f"  {c['job_id']:>10}  {state:<10} {'collect':<8} {'the table':<28} "
                         + (f"{table}" if table.is_file() else "no table yet" if state in ACTIVE
                            else "no table (no run finished)")
                         + (f"  [{detail}]" if detail else ""))
            log = log_path(c)
            if log:
                lines.append(f"  {'':>10}  log: {log}")
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
