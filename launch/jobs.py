"""Jobs: the one submitit callable every stage runs as, and how it reaches an executor.

A job is `StageJob(stage, config_file)`: in the job's process it loads the config with
`core.config.load_config(<stage>.Config, config_file, stage=STAGE)` and calls the stage's
`run(cfg)`, the same function `python -m <stage>` calls. The executor comes from the config's
`launch.cluster`: submitit's SlurmExecutor, LocalExecutor (a subprocess) or DebugExecutor (in
this process).

The launcher never sends a job a config it has not resolved itself: every config is merged
and validated here first (`resolve`), written out as `<run_root>/launch/<id>/<stage>-<name>.yaml`,
and the job reads that file. An edit to the YAML file while a job pends changes nothing, and
a typo fails before anything is submitted.
"""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import submitit

from core import checkpoint as ckpt
from core import rundir
from core.config import LaunchConfig, load_config
from core.errors import UserError

STAGES = ("byol", "probe", "distill", "prune", "quant", "finetune")  # also the pipeline's order


# ----------------------------------------------------------------------------- stages


def load_stage(name: str):
    """The stage package (`STAGE`, `Config`, `run`), imported by name only when needed."""
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"stage {name} cannot be imported: {e}") from None
    missing = [a for a in ("STAGE", "Config", "run") if not hasattr(module, a)]
    if missing:
        raise UserError(f"stage {name} is not available yet: its package has no {', '.join(missing)}")
    return module


@dataclass(frozen=True)
class Input:
    """A config field naming another stage's artifact dir: the file that dir must hold, and
    which earlier pipeline stages can provide it (the first one present wins)."""

    field: str
    file: str
    sources: Tuple[str, ...]
    required: bool = False


# What each stage reads, and how `launch pipeline` wires it. `teacher_head: ""` means
# "the probe head inside the teacher's model.pt".
INPUTS: Dict[str, List[Input]] = {
    "byol": [],
    "probe": [Input("artifact", "model.pt", ("byol",), required=True)],
    "distill": [Input("teacher", "model.pt", ("byol",), required=True),
                Input("teacher_head", "head.pt", ("probe",)), Input("student_init", "model.pt", ())],
    "prune": [Input("student", "model.pt", ("distill",), required=True),
              Input("teacher", "model.pt", ("byol",)), Input("teacher_head", "head.pt", ("probe",))],
    "quant": [Input("source", "model.pt", ("prune", "distill"), required=True),
              Input("teacher", "model.pt", ("byol",)), Input("teacher_head", "head.pt", ("probe",))],
    "finetune": [Input("artifact", "model.pt", ("quant", "prune", "distill", "byol"), required=True)],
}


def run_dir_of(stage: str, cfg: Any) -> Path:
    """Where the stage will write; probe names an unnamed run after its input (see probe/train.py)."""
    name = cfg.name
    if stage == "probe" and name == "default" and getattr(cfg, "artifact", ""):
        name = "-".join(Path(cfg.artifact).parts[-2:])
    return ckpt.artifact_dir(cfg.run_root, stage, name)


def check_inputs(stage: str, cfg: Any, produced: Sequence[Path] = ()) -> None:
    """Every input artifact exists now, or is the run dir of a job submitted before this one."""
    produced = {Path(p).resolve() for p in produced}
    for inp in INPUTS.get(stage, []):
        value = getattr(cfg, inp.field, None)
        if value is None:  # the stage's schema has no such field
            continue
        if not value:
            if inp.required:
                raise UserError(f"{stage}.{inp.field} is not set: name the artifact dir it reads "
                                f"({stage} {inp.field}=runs/<stage>/<name>)")
            continue
        path = Path(value)
        if path.resolve() in produced:
            continue
        if not (path / inp.file).is_file():
            why = "does not exist" if not path.exists() else f"has no {inp.file} (not a finished artifact?)"
            raise UserError(f"{stage}.{inp.field}={value}: the input artifact {why}")


def check_run_dirs(planned: Sequence["Planned"]) -> None:
    """Before anything is submitted: no two runs of the plan share a folder, and no planned run's
    folder holds another config (core/rundir.py) unless that run says overwrite=true or resume=force."""
    owners: Dict[Path, str] = {}
    for p in planned:
        label = f"{p.stage} {p.variant or p.cfg.name}"
        key = p.run_dir.absolute()
        if key in owners:
            raise UserError(f"two runs of the plan would share {p.run_dir}: {owners[key]} and {label}; "
                            f"give them different names (a sweep's variants are named from their values)")
        owners[key] = label
    conflicts = [f"{p.run_dir} ({rundir.describe(diffs, 2)})" for p in planned
                 if not (p.cfg.overwrite or p.cfg.resume == "force") and (diffs := rundir.differences(p.run_dir, p.cfg))]
    if conflicts:
        raise UserError(f"{len(conflicts)} planned run folder(s) hold another config: {'; '.join(conflicts)}; use "
                        f"name=NEW for new runs, overwrite=true to start them afresh, or resume=force to continue "
                        f"them under this config")


# ----------------------------------------------------------------------------- the job


class StageJob(submitit.helpers.Checkpointable):
    """One stage run as a submitit job. Requeue-safe: the stage resumes from its checkpoint.pt."""

    def __init__(self, stage: str, config: str | Path):
        self.stage, self.config = stage, str(config)

    def __call__(self) -> str:
        module = load_stage(self.stage)
        cfg = load_config(module.Config, self.config, [], stage=self.stage)
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            # The CPUs Slurm gave this task, not every core of the node (torch's default where
            # the task is not pinned): otherwise jobs sharing a node oversubscribe it.
            import torch

            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        if cfg.launch.nodes * cfg.launch.tasks_per_node > 1:
            # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for core.engine.init_distributed.
            # CUDA_VISIBLE_DEVICES stays whole: the engine picks cuda:LOCAL_RANK itself.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return str(module.run(cfg))

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # On USR2 (timeout, preemption) submitit requeues what this returns: the same job,
        # whose run(cfg) then resumes from the checkpoint.pt the stage saved on the signal.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"StageJob({self.stage}, {self.config})"


class CollectJob:
    """The last job of a SLURM pipeline or sweep (afterany: it runs whatever the stages did): the
    table `launch collect` writes, for the runs that finished, where a local run writes it."""

    def __init__(self, run_root: str | Path, run_dirs: Sequence[str | Path], out: str | Path):
        self.run_root, self.run_dirs, self.out = str(run_root), [str(d) for d in run_dirs], str(out)

    def __call__(self) -> str:
        from launch.collect import collect

        done = [d for d in self.run_dirs if (Path(d) / "metrics.json").is_file()]
        if not done:
            print(f"collect: none of the {len(self.run_dirs)} runs finished; no table", flush=True)
            return ""
        print(collect([self.run_root], out=self.out, only=done), flush=True)  # the run root: sweep groups too
        return self.out

    def __repr__(self) -> str:
        return f"CollectJob({len(self.run_dirs)} runs -> {self.out})"


def collect_parameters(launch: LaunchConfig, job_name: str, after: Sequence[str]) -> Dict[str, Any]:
    """A small CPU job on the stages' partition, once every job in `after` has ended however
    it ended (a failed stage's table still shows the stages before it)."""
    small = replace(launch, nodes=1, tasks_per_node=1, gpus_per_node=0, cpus_per_task=1,
                    timeout_min=min(launch.timeout_min or 30, 30))
    return slurm_parameters(small, job_name, "afterany:" + ":".join(after))


# ----------------------------------------------------------------------------- configs


@dataclass
class Planned:
    """A job the launcher will submit: its resolved config and the jobs it waits for."""

    stage: str
    cfg: Any
    overrides: List[str] = field(default_factory=list)  # on top of the config file, for the record
    after: List[int] = field(default_factory=list)  # indexes of planned jobs that must succeed first
    variant: str = ""  # sweeps: the variant this run belongs to

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.stage, self.cfg)

    @property
    def job_name(self) -> str:
        return f"{self.stage}-{self.cfg.name}"


def resolve(stage: str, path: str | Path | None, overrides: Sequence[str] = (), section: str | None = None) -> Any:
    """The stage's config exactly as its job will see it (strict: unknown keys are errors).
    section: a pipeline file's step (`stages.<section>`), when it is not named after its stage."""
    return load_config(load_stage(stage).Config, path, list(overrides), stage=stage, section=section)


def launch_settings(planned: Sequence[Planned]) -> LaunchConfig:
    """One cluster per launch; the first job's settings name it."""
    clusters = {p.cfg.launch.cluster for p in planned}
    if len(clusters) > 1:
        raise UserError(f"one launch runs on one cluster; these jobs ask for {sorted(clusters)} "
                        f"(set launch.cluster once, in `common:`)")
    launch = planned[0].cfg.launch
    for p in planned:
        n = p.cfg.launch.nodes * p.cfg.launch.tasks_per_node
        if n > 1 and p.cfg.launch.cluster == "debug":
            raise UserError(f"{p.job_name}: launch.cluster=debug runs one process in this one; "
                            f"{n} tasks need launch.cluster=local or slurm")
        if p.cfg.launch.nodes > 1 and p.cfg.launch.cluster == "local":
            raise UserError(f"{p.job_name}: launch.cluster=local has one node; launch.nodes={p.cfg.launch.nodes}")
    return launch


def submitit_folder(cfg: Any) -> Path:
    return Path(cfg.launch.folder or Path(cfg.run_root) / "submitit").absolute()


# ----------------------------------------------------------------------------- SLURM


def slurm_parameters(launch: LaunchConfig, job_name: str, dependency: str = "") -> Dict[str, Any]:
    """LaunchConfig -> submitit SlurmExecutor parameters (= #SBATCH lines)."""
    params: Dict[str, Any] = {
        "job_name": job_name, "time": launch.timeout_min or SLURM_DEFAULT_MIN, "nodes": launch.nodes,
        "ntasks_per_node": launch.tasks_per_node, "cpus_per_task": launch.cpus_per_task,
        "array_parallelism": launch.array_parallelism,
    }
    if launch.mem_gb > 0:  # 0: the partition's default memory per CPU
        params["mem"] = f"{launch.mem_gb}GB"
    if launch.gpus_per_node > 0:
        params["gpus_per_node"] = launch.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            params[key] = getattr(launch, key)
    extra = dict(launch.slurm_extra)
    if dependency:
        # Without kill_on_invalid_dep a child of a failed parent pends forever
        # (DependencyNeverSatisfied); with it Slurm cancels the child.
        extra.update(dependency=dependency, kill_on_invalid_dep="yes")
    if extra:
        params["additional_parameters"] = extra
    return params


def sbatch_script(folder: Path, params: Dict[str, Any], array_size: int = 0) -> str:
    """The sbatch file submitit writes for these parameters (what `--dry-run` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size or None, **params)


def check_slurm(launch: LaunchConfig, scripts: Sequence[str], dry_run: bool = False) -> None:
    """Fail before submitting anything: no sbatch, a partition that does not exist, or a job
    Slurm could never run (sbatch --test-only: resources, account, qos, constraint)."""
    if shutil.which("sbatch") is None:
        if dry_run:
            return
        raise UserError("launch.cluster=slurm but `sbatch` is not on PATH (not on a SLURM login node?); "
                        "use launch.cluster=local to run here")
    if launch.partition:
        out = subprocess.run(["sinfo", "-h", "-p", launch.partition, "-o", "%P"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0 or not out.stdout.strip():
            known = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
            raise UserError(f"launch.partition={launch.partition}: no such SLURM partition; partitions: "
                            f"{', '.join(known.stdout.split()) or '(none)'}")
    for script in scripts:
        with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
            f.write(script)
            f.flush()
            out = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            lines = [ln for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
            raise UserError(f"SLURM would refuse this job: {' / '.join(lines[-2:])}")


# ----------------------------------------------------------------------------- executors


NO_LIMIT_MIN = 60 * 24 * 365  # launch.timeout_min=0 locally
SLURM_DEFAULT_MIN = 60  # launch.timeout_min=0 on Slurm


def make_executor(launch: LaunchConfig, folder: Path, params: Optional[Dict[str, Any]] = None):
    if launch.cluster == "debug":
        return submitit.DebugExecutor(folder)
    if launch.cluster == "local":
        ex = submitit.LocalExecutor(folder)
        # No limit unless the user set one: submitit's local default (2 min; ours was Slurm's 60)
        # stopped a slow machine's quickstart mid-stage.
        ex.update_parameters(timeout_min=launch.timeout_min or NO_LIMIT_MIN, tasks_per_node=launch.tasks_per_node,
                             gpus_per_node=launch.gpus_per_node)
        return ex
    ex = submitit.SlurmExecutor(folder)
    ex.update_parameters(**params)
    return ex


def follow_log(job, poll_s: float = 1.0) -> None:
    """Echo a local job's stderr (the stage's messages) to ours until the job ends."""
    position = 0
    while True:
        finished = job.done()
        path = Path(job.paths.stderr)
        if path.is_file():
            with open(path, errors="replace") as f:
                f.seek(position)
                text = f.read()
                position = f.tell()
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()
        if finished:
            return
        time.sleep(poll_s)


def wait_local(job) -> Optional[str]:
    """Run/wait for a local or debug job; None on success, else the error's last line."""
    try:
        if isinstance(job, submitit.local.debug.DebugJob):
            err = job.exception()  # runs it here; .result() would open pdb on failure
            if err is not None:
                return f"{type(err).__name__}: {err}"
        else:
            follow_log(job)
        job.result()
        return None
    except Exception as e:  # a failed job: its traceback is in its log
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return lines[-1] if lines else type(e).__name__
    except SystemExit as e:  # a stage stopping itself (non-finite loss, signal)
        return f"SystemExit: {e}"
