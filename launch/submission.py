"""Submit a plan of jobs: on Slurm with afterok dependencies or as one job array; locally in order.

Everything that can be checked is checked before the first job goes out (configs, input
artifacts, partition, `sbatch --test-only` of every script), so a mistake submits nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from core import checkpoint as ckpt
from core import rundir
from core.config import to_yaml
from core.errors import UserError
from launch import status
from launch.pipeline import stage_budget_min
from launch.jobs import (CollectJob, Planned, StageJob, check_run_dirs, check_slurm, collect_parameters, launch_settings,
                         make_executor, sbatch_script, slurm_parameters, submitit_folder, wait_local)


def _dependency(planned: Planned, job_ids: Sequence[str]) -> str:
    return "afterok:" + ":".join(job_ids[i] for i in planned.after) if planned.after else ""


def describe(planned: Sequence[Planned], array: bool, say: Callable[[str], None] = print, array_name: str = "") -> None:
    """--dry-run: each resolved config and the sbatch script submitit would write; submits nothing."""
    settings = launch_settings(planned)
    folder = submitit_folder(planned[0].cfg)
    placeholders = [f"JOB{i}" for i in range(len(planned))]  # ids Slurm has not given yet
    for i, p in enumerate(planned):
        waits = f", after {', '.join(planned[j].job_name for j in p.after)} succeeds" if p.after else ""
        say(f"# ===== job {i}: {p.stage} -> {p.run_dir}{waits}")
        say(to_yaml(p.cfg).rstrip())
        say("")
    if settings.cluster != "slurm":
        say(f"# launch.cluster={settings.cluster}: no sbatch script; the jobs run "
            f"{'in this process' if settings.cluster == 'debug' else 'as local subprocesses'}, in order")
        return
    if array:
        params = slurm_parameters(planned[0].cfg.launch, array_name or planned[0].job_name)
        say(f"# ===== sbatch script: one array of {len(planned)} tasks")
        say(sbatch_script(folder, params, array_size=len(planned)))
        return
    for i, p in enumerate(planned):
        params = slurm_parameters(p.cfg.launch, p.job_name, _dependency(p, placeholders))
        say(f"# ===== sbatch script of job {i} ({p.job_name})")
        say(sbatch_script(folder, params))


def preflight(planned: Sequence[Planned], array: bool, dry_run: bool = False, array_name: str = "") -> None:
    """Everything Slurm can tell before a job exists; a dry run without sbatch skips it."""
    settings = launch_settings(planned)
    if settings.cluster != "slurm":
        return
    folder = submitit_folder(planned[0].cfg)
    firsts = planned[:1] if array else planned
    # Without the dependency: --test-only cannot know job ids that do not exist yet.
    scripts = [sbatch_script(folder, slurm_parameters(p.cfg.launch, (array_name or p.job_name) if array else p.job_name),
                             len(planned) if array else 0) for p in firsts]
    check_slurm(settings, scripts, dry_run)


def launch(kind: str, name: str, planned: List[Planned], *, array: bool = False, stop_on_failure: bool = True,
           dry_run: bool = False, extra: Optional[dict] = None, on_record: Optional[Callable[[Path], None]] = None,
           say: Callable[[str], None] = print, budget_min: Optional[float] = None,
           collect_to: Optional[Path] = None) -> Optional[dict]:
    """Submit (slurm) or run (local/debug) the plan; returns the manifest, None on a dry run.

    `collect_to` (slurm): a last job, after all the others however they end, writes the table of
    the finished runs there (`launch collect`); locally the caller collects when the jobs are done.

    `on_record(record_dir)` runs once every check has passed, just before the first job goes out.
    `budget_min` (local runs): minutes for all the jobs, shared by their launch.budget_share as
    each starts (launch.pipeline.stage_budget_min).
    """
    started = time.time()
    if not planned:
        raise UserError("nothing to launch")
    array_name = f"{kind}-{name}"  # squeue shows the sweep, not its first task
    check_run_dirs(planned)
    preflight(planned, array, dry_run, array_name)
    if dry_run:
        describe(planned, array, say, array_name)
        return None
    settings = launch_settings(planned)
    folder = submitit_folder(planned[0].cfg)
    record = status.new_record(planned[0].cfg.run_root, kind, name)
    configs = []
    for i, p in enumerate(planned):
        path = record / f"{i:02d}-{p.stage}-{p.cfg.name}.yaml"
        ckpt.atomic_write_text(path, to_yaml(p.cfg))
        configs.append(path.absolute())
    manifest = {
        "kind": kind, "name": name, "cluster": settings.cluster, "folder": str(folder),
        "created": time.time(), "command": " ".join([Path(sys.executable).name, "-m", "launch", *sys.argv[1:]]),
        "jobs": [{"index": i, "job_id": None, "stage": p.stage, "name": p.cfg.name, "variant": p.variant,
                  "run_dir": str(p.run_dir), "config": str(configs[i]), "overrides": p.overrides,
                  "after": [], "state": "NOT_RUN"} for i, p in enumerate(planned)],
        **(extra or {}),
    }
    status.write_manifest(record, manifest)
    if on_record is not None:
        on_record(record)
    if settings.cluster == "slurm":
        _submit_slurm(planned, configs, folder, array, manifest, say, array_name)
        if collect_to is not None:
            _submit_collect(planned, folder, manifest, say, f"collect-{name}", collect_to)
    else:
        _run_locally(planned, configs, folder, stop_on_failure, manifest, record, say,
                     (budget_min, started) if budget_min else None)
    status.write_manifest(record, manifest)
    manifest["record"] = str(record)
    return manifest


def _submit_slurm(planned, configs, folder, array, manifest, say, array_name: str) -> None:
    jobs = []
    try:
        if array:
            ex = make_executor(planned[0].cfg.launch, folder, slurm_parameters(planned[0].cfg.launch, array_name))
            with ex.batch():
                jobs = [ex.submit(StageJob(p.stage, configs[i])) for i, p in enumerate(planned)]
        else:
            for i, p in enumerate(planned):
                params = slurm_parameters(p.cfg.launch, p.job_name, _dependency(p, [j.job_id for j in jobs]))
                jobs.append(make_executor(p.cfg.launch, folder, params).submit(StageJob(p.stage, configs[i])))
    except Exception as e:  # sbatch refused a job after others went out: take those back
        ids = [j.job_id for j in jobs]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
        raise UserError(f"submission failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        + (f"; cancelled the jobs already submitted: {' '.join(ids)}" if ids else "")) from None
    for entry, job, p in zip(manifest["jobs"], jobs, planned):
        entry.update(job_id=str(job.job_id), state="SUBMITTED", stdout=str(job.paths.stdout),
                     stderr=str(job.paths.stderr), after=[str(jobs[i].job_id) for i in p.after])
        waits = f" after {','.join(entry['after'])}" if entry["after"] else ""
        say(f"submitted {p.job_name}: job {job.job_id}{waits} -> {p.run_dir}\n  log: {job.paths.stderr}")


def _submit_collect(planned, folder, manifest, say, job_name: str, out: Path) -> None:
    after = sorted({j["job_id"].split("_")[0] for j in manifest["jobs"]})  # an array: its base id
    params = collect_parameters(planned[0].cfg.launch, job_name, after)
    job = make_executor(planned[0].cfg.launch, folder, params).submit(
        CollectJob(planned[0].cfg.run_root, [p.run_dir for p in planned], out))
    manifest["collect"] = {"job_id": str(job.job_id), "out": str(out), "stdout": str(job.paths.stdout),
                           "after": after}
    say(f"submitted {job_name}: job {job.job_id} after {','.join(after)} ends -> {out}/results.md")


def finished_with_this_config(p: Planned) -> bool:
    """The run's artifact is finished and its config.yaml equals this one (core/rundir.py)."""
    return ((Path(p.run_dir) / "metrics.json").is_file() and (Path(p.run_dir) / "config.yaml").is_file()
            and not p.cfg.overwrite and not rundir.differences(p.run_dir, p.cfg))


def _run_locally(planned, configs, folder, stop_on_failure, manifest, record, say, budget=None) -> None:
    failed: set = set()
    shares = [p.cfg.launch.budget_share for p in planned]
    for i, p in enumerate(planned):
        entry = manifest["jobs"][i]
        blocked = [planned[j].job_name for j in p.after if j in failed]
        if blocked or (failed and stop_on_failure):
            failed.add(i)
            entry.update(state="NOT_RUN", error=f"not run: {', '.join(blocked) or 'an earlier job'} failed")
            say(f"skipped {p.job_name}: {entry['error']}")
            continue
        if finished_with_this_config(p):  # no process to start, no imports to wait for
            entry.update(state="COMPLETED", note="already finished with this config; nothing to do")
            say(f"done {p.job_name}: {p.run_dir} is already finished with this config; nothing to do")
            continue
        if budget is not None and hasattr(p.cfg, "train") and not (Path(p.run_dir) / "metrics.json").is_file():
            total_min, started = budget  # this stage's share of what is left of the pipeline's budget
            p.cfg.train.budget_min = stage_budget_min(total_min * 60 - (time.time() - started), shares, i)
            ckpt.atomic_write_text(configs[i], to_yaml(p.cfg))
            entry["budget_min"] = p.cfg.train.budget_min
            say(f"budget: {p.job_name} gets {p.cfg.train.budget_min:.2f} of the {total_min:g} minutes "
                f"({(time.time() - started) / 60:.2f} spent)")
        job = make_executor(p.cfg.launch, folder).submit(StageJob(p.stage, configs[i]))
        entry.update(job_id=str(job.job_id), state="RUNNING", stdout=str(job.paths.stdout),
                     stderr=str(job.paths.stderr))
        where = "in this process" if p.cfg.launch.cluster == "debug" else f"log: {job.paths.stderr}"
        say(f"running {p.job_name} -> {p.run_dir}  ({where})")
        status.write_manifest(record, manifest)
        try:
            error = wait_local(job)
        except KeyboardInterrupt:  # a local job dies with its launcher; its last checkpoint stays
            job.cancel()
            entry.update(state="FAILED", error="interrupted (rerun the same command to resume)")
            status.write_manifest(record, manifest)
            raise
        if error is None and not (Path(p.run_dir) / "metrics.json").is_file():
            # The job returned without finishing (train.max_steps): later stages need its artifact.
            error = f"stopped before the end of training, no artifact in {p.run_dir} (train.max_steps?); rerun to continue"
        if error is None:
            entry["state"] = "COMPLETED"
        else:
            failed.add(i)
            entry.update(state="FAILED", error=error)
            say(f"FAILED {p.job_name}: {error}\n  log: {job.paths.stderr}")
        status.write_manifest(record, manifest)
