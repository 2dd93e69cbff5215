"""The launcher without a SLURM cluster: dry runs, planning, local/debug runs, status, collect,
and reading W&B offline runs back. (tests/test_slurm.py submits real jobs.)"""

import json
import os
import pickle
import statistics
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from core.config import StageConfig
from core.errors import UserError
from launch import collect as collect_mod
from launch import jobs, status
from launch.cli import main
from launch.grid import plan_sweep
from launch.pipeline import plan_pipeline
from core.wandb_reader import BLOCK, find_runs, read_records, read_run
from tests.conftest import ROOT, TINY_BYOL, run_cli

# TINY_BYOL split into what every stage accepts (pipeline `common`) and what only byol has.
BYOL_ONLY = ("model.", "train.", "byol.", "aug.")
TINY_COMMON = [o for o in TINY_BYOL if not o.startswith(BYOL_ONLY)] + ["data.synthetic_size=120"]
TINY_STAGE_BYOL = [f"stages.byol.{o}" for o in TINY_BYOL if o.startswith(BYOL_ONLY)] + ["stages.byol.train.epochs=1"]


@pytest.fixture
def no_slurm(monkeypatch):
    """In-process runs of the CLI that see no sbatch (like a laptop), so a dry run checks nothing
    against this machine's cluster."""
    monkeypatch.setattr(jobs.shutil, "which", lambda name: None)


def cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- dry run


def test_dry_run_prints_sbatch_settings_and_config_and_submits_nothing(tmp_path, no_slurm, capsys):
    root = tmp_path / "runs"
    code, out, err = cli(["submit", "byol", ROOT / "configs/quickstart.yaml", f"run_root={root}", "--dry-run",
                   "launch.cluster=slurm", "launch.partition=gpu", "launch.account=lab", "launch.qos=high",
                   "launch.constraint=a100", "launch.nodes=2", "launch.tasks_per_node=4", "launch.gpus_per_node=4",
                   "launch.cpus_per_task=8", "launch.mem_gb=64", "launch.timeout_min=720",
                   "launch.slurm_extra.exclusive=true", "launch.slurm_extra.comment=r50"], capsys)
    assert code == 0, err
    for line in ["#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB",
                 "#SBATCH --time=720", "#SBATCH --exclusive", "#SBATCH --comment=r50",
                 "#SBATCH --signal=USR2@90", "#SBATCH --job-name=byol-quickstart",
                 f"#SBATCH --output={root.absolute()}/submitit/%j_0_log.out", "-m submitit.core._submit"]:
        assert line in out, line
    assert "arch: resnet50" in out and f"run_root: {root}" in out  # the resolved config
    assert not root.exists()  # nothing written, nothing submitted


def test_dry_run_of_pipeline_and_sweep_show_dependency_and_array(tmp_path, no_slurm, capsys):
    root = tmp_path / "runs"
    code, out, err = cli(["pipeline", ROOT / "configs/quickstart.yaml", f"run_root={root}", "launch.cluster=slurm",
                          "--dry-run"], capsys)
    assert code == 0, err
    stages = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())["stages"]
    scripts = out.split("# ===== sbatch script")[1:]
    assert len(scripts) == len(stages) >= 2  # one job per stage of the quickstart
    assert "--dependency" not in scripts[0]
    assert "#SBATCH --dependency=afterok:JOB0" in scripts[1]  # JOB0: byol's id, once it has one
    assert all("#SBATCH --kill-on-invalid-dep=yes" in s for s in scripts[1:])
    assert f"artifact: {root}/byol/quickstart" in out  # probe wired to byol's artifact

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"stage": "byol", "config": str(ROOT / "configs/quickstart.yaml"),
                                    "seeds": [0, 1, 2], "grid": {"train.lr": [0.1, 0.2]}}))
    code, out, err = cli(["sweep", grid, f"run_root={root}", "launch.cluster=slurm", "launch.array_parallelism=2",
                          "--dry-run"], capsys)
    assert code == 0, err
    assert out.count("#!/bin/bash") == 1 and "#SBATCH --array=0-5%2" in out
    assert "#SBATCH --job-name=sweep-g" in out  # the array is named after the sweep, not its first task
    assert "%A_%a_0_log.out" in out
    assert not root.exists()


# ----------------------------------------------------------------------------- planning


def fake_stages(monkeypatch):
    """distill/prune/quant stand-ins with the input fields of the real ones, to test the wiring."""

    @dataclass
    class Distill(StageConfig):
        teacher: str = ""
        teacher_head: str = ""
        student_init: str = ""

    @dataclass
    class Prune(Distill):
        student: str = ""

    @dataclass
    class Quant(Distill):
        source: str = ""

    real = jobs.load_stage
    fakes = {s: types.SimpleNamespace(STAGE=s, Config=c, run=None)
             for s, c in (("distill", Distill), ("prune", Prune), ("quant", Quant))}
    monkeypatch.setattr(jobs, "load_stage", lambda name: fakes[name] if name in fakes else real(name))


def write_pipeline(path, stages, common=None):
    path.write_text(yaml.safe_dump({"common": {"name": "p", **(common or {})}, "stages": stages}, sort_keys=False))
    return path


def test_pipeline_wires_each_stage_to_earlier_artifacts(tmp_path, monkeypatch):
    fake_stages(monkeypatch)
    root = tmp_path / "runs"
    f = write_pipeline(tmp_path / "p.yaml", {"quant": {}, "probe": {}, "byol": {}, "prune": {}, "distill": {}})
    name, planned = plan_pipeline(f, [f"run_root={root}", "stages.byol.train.epochs=3"])
    assert name == "p"
    assert [p.stage for p in planned] == ["byol", "probe", "distill", "prune", "quant"]  # fixed order
    byol, probe, distill, prune, quant = planned
    d = {p.stage: str(root / p.stage / "p") for p in planned}
    assert probe.cfg.artifact == d["byol"] and probe.after == [0]
    assert (distill.cfg.teacher, distill.cfg.teacher_head) == (d["byol"], d["probe"]) and distill.after == [0, 1]
    assert (prune.cfg.student, prune.cfg.teacher, prune.cfg.teacher_head) == (d["distill"], d["byol"], d["probe"])
    assert quant.cfg.source == d["prune"] and quant.after == [0, 1, 3]
    assert byol.cfg.train.epochs == 3 and all(p.cfg.track.group == "p" for p in planned)

    # Without prune, quant takes distill's artifact; without probe, the teacher's own head ("").
    # A path written in the file (right only for the default run_root) gives way to the wiring.
    f2 = write_pipeline(tmp_path / "p2.yaml", {"byol": {}, "distill": {"teacher": "runs/byol/p"}, "quant": {}})
    _, planned = plan_pipeline(f2, [f"run_root={root}"])
    assert planned[2].cfg.source == d["distill"] and planned[1].cfg.teacher_head == ""
    assert planned[1].cfg.teacher == d["byol"]


def test_pipeline_explicit_input_is_kept_and_must_exist(tmp_path, monkeypatch):
    fake_stages(monkeypatch)
    teacher = tmp_path / "old" / "byol" / "t"
    f = write_pipeline(tmp_path / "p.yaml", {"distill": {"teacher": str(teacher)}})
    with pytest.raises(UserError, match=r"distill.teacher=.*the input artifact does not exist"):
        plan_pipeline(f, [f"run_root={tmp_path}/runs"])
    teacher.mkdir(parents=True)
    with pytest.raises(UserError, match="has no model.pt"):
        plan_pipeline(f, [f"run_root={tmp_path}/runs"])
    (teacher / "model.pt").write_bytes(b"")
    _, planned = plan_pipeline(f, [f"run_root={tmp_path}/runs"])
    assert planned[0].cfg.teacher == str(teacher) and planned[0].after == []
    f2 = write_pipeline(tmp_path / "p2.yaml", {"distill": {}})
    with pytest.raises(UserError, match="distill.teacher is not set"):
        plan_pipeline(f2, [])


@pytest.mark.parametrize("stages, overrides, message", [
    ({"byol": {}, "probe": {"bogus": 1}}, [], "pipeline stage probe: unknown key 'bogus'"),
    ({"byol": {}, "bogus": {}}, [], "unknown stage(s) bogus"),
    ({"byol": {}}, ["stages.probe.seed=1"], "the pipeline has no stage 'probe'"),
    ({"byol": {}, "probe": {}}, ["trian.epochs=2"], "pipeline stage byol: unknown key 'trian'"),
])
def test_pipeline_mistakes_fail_before_anything_runs(tmp_path, stages, overrides, message):
    f = write_pipeline(tmp_path / "p.yaml", stages)
    root = tmp_path / "runs"
    code = main(["pipeline", str(f), f"run_root={root}", "launch.cluster=debug", *overrides])
    assert code == 2
    assert not root.exists()  # byol did not run either
    with pytest.raises(UserError) as e:
        plan_pipeline(f, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_common_override_goes_to_the_stages_that_have_its_key(tmp_path):
    # train.* reaches byol and distill; the probe, which does not train, is planned without it.
    f = write_pipeline(tmp_path / "p.yaml", {"byol": {}, "probe": {}, "distill": {}})
    _, planned = plan_pipeline(f, [f"run_root={tmp_path}/runs", "train.max_steps=2", "seed=3"])
    byol, probe, distill = planned
    assert byol.cfg.train.max_steps == 2 and distill.cfg.train.max_steps == 2
    assert not hasattr(probe.cfg, "train") and "train.max_steps=2" not in probe.overrides
    assert {p.cfg.seed for p in planned} == {3}


NAMED = {  # the shape of configs/ablations/order.yaml
    "teacher": {"stage": "byol"},
    "byol18": {"stage": "byol", "model": {"arch": "resnet18"}},
    "pruned": {"stage": "prune", "student": "@byol18", "teacher": ""},
    "distilled": {"stage": "distill", "teacher": "@teacher", "student_init": "@pruned"},
}


def test_named_steps_run_in_file_order_wired_by_reference(tmp_path, monkeypatch):
    fake_stages(monkeypatch)
    root = tmp_path / "runs"
    f = write_pipeline(tmp_path / "p.yaml", NAMED)
    name, planned = plan_pipeline(f, [f"run_root={root}", "stages.byol18.train.epochs=3"])
    assert name == "p"
    assert [(p.stage, p.variant, p.cfg.name) for p in planned] == [
        ("byol", "teacher", "p-teacher"), ("byol", "byol18", "p-byol18"), ("prune", "pruned", "p-pruned"),
        ("distill", "distilled", "p-distilled")]
    teacher, byol18, pruned, distilled = planned
    assert byol18.cfg.train.epochs == 3 and teacher.cfg.train.epochs != 3  # per-step override
    assert byol18.cfg.model.arch == "resnet18"
    # Only what the file references is wired: pruned has no teacher, though a byol step exists.
    assert (pruned.cfg.student, pruned.cfg.teacher, pruned.after) == (str(root / "byol/p-byol18"), "", [1])
    assert (distilled.cfg.teacher, distilled.cfg.student_init, distilled.after) == (
        str(root / "byol/p-teacher"), str(root / "prune/p-pruned"), [0, 2])
    # With a sweep's suffix every run name ends in it.
    _, planned = plan_pipeline(f, [f"run_root={root}"], name_suffix="-s4")
    assert [p.cfg.name for p in planned][-1] == "p-distilled-s4" and planned[3].cfg.student_init.endswith("p-pruned-s4")


@pytest.mark.parametrize("stages, message", [
    ({**NAMED, "late": {"stage": "prune", "student": "@later"}, "later": {"stage": "byol"}},
     "pipeline stage late: stages.late.student=@later: no earlier step named 'later'"),
    ({"teacher": {"stage": "byol"}, "x": {"student": "@teacher"}}, "stages.x needs `stage:`"),
    ({"teacher": {"stage": "bogus"}}, "stages.teacher needs `stage:`"),
    ({"teacher": {"stage": "byol", "train": {"lrr": 1}}}, "pipeline stage teacher: unknown key 'train.lrr'"),
])
def test_named_step_mistakes_are_one_line(tmp_path, monkeypatch, stages, message):
    fake_stages(monkeypatch)
    f = write_pipeline(tmp_path / "p.yaml", stages)
    with pytest.raises(UserError) as e:
        plan_pipeline(f, [f"run_root={tmp_path}/runs"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_pipeline_sweep_runs_every_step_per_seed_chained(tmp_path, monkeypatch):
    fake_stages(monkeypatch)
    f = write_pipeline(tmp_path / "p.yaml", NAMED)
    g = tmp_path / "order.yaml"
    g.write_text(yaml.safe_dump({"config": str(f), "seeds": [0, 1], "overrides": ["stages.byol18.train.epochs=2"],
                                 "compare": ["pruned", "distilled"]}))
    spec, planned = plan_sweep(g, [f"run_root={tmp_path}/runs"])
    assert spec["stage"] == "" and list(spec["variants"]) == ["teacher", "byol18", "pruned", "distilled"]
    assert [p.cfg.name for p in planned] == [f"order-{s}-s{seed}" for seed in (0, 1) for s in spec["variants"]]
    assert [p.cfg.seed for p in planned] == [0] * 4 + [1] * 4
    assert planned[7].after == [4, 6]  # seed 1's steps wait on seed 1's steps
    assert planned[7].cfg.student_init.endswith("prune/order-pruned-s1")
    assert {p.cfg.track.group for p in planned} == {"order"}
    g.write_text(yaml.safe_dump({"config": str(f), "compare": ["nope"]}))
    with pytest.raises(UserError, match="compare: no step.s. nope"):
        plan_sweep(g)
    g.write_text(yaml.safe_dump({"config": str(f), "grid": {"train.lr": [1]}}))
    with pytest.raises(UserError, match="a pipeline sweep compares the pipeline's steps"):
        plan_sweep(g)


def write_grid(tmp_path, **spec):
    spec = {"stage": "byol", "config": str(ROOT / "configs/quickstart.yaml"), **spec}
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_sweep_expands_grid_and_variants_into_named_runs(tmp_path):
    g = write_grid(tmp_path, seeds=[0, 1], grid={"train.lr": [0.1, 0.2], "byol.momentum_start": [0.99, 0.996]},
                   overrides=["train.epochs=7"])
    spec, planned = plan_sweep(g, [f"run_root={tmp_path}/runs", "train.epochs=5"])
    assert len(planned) == 8
    names = [p.cfg.name for p in planned]
    assert len(set(names)) == 8 and "ablate-lr0.1-momentum_start0.996-s1" in names
    run = planned[names.index("ablate-lr0.2-momentum_start0.99-s1")]
    assert (run.cfg.train.lr, run.cfg.byol.momentum_start, run.cfg.seed) == (0.2, 0.99, 1)
    assert run.cfg.train.epochs == 5  # command line beats the grid file's `overrides:`
    # What the manifest and sweep.json record: everything that made the config, in order
    assert run.overrides == ["train.epochs=7", f"run_root={tmp_path}/runs", "train.epochs=5", "train.lr=0.2",
                             "byol.momentum_start=0.99", "seed=1", "name=ablate-lr0.2-momentum_start0.99-s1",
                             "track.group=ablate"]
    assert {p.cfg.track.group for p in planned} == {"ablate"}

    g = write_grid(tmp_path, name="sg", variants={"base": {}, "no-sg": {"byol": {"stop_gradient": False}}})
    spec, planned = plan_sweep(g)
    assert [(p.cfg.name, p.variant, p.cfg.byol.stop_gradient) for p in planned] == [
        ("sg-base-s0", "base", True), ("sg-no-sg-s0", "no-sg", False)]


@pytest.mark.parametrize("spec, message", [
    ({"seeds": [0]}, "give exactly one of `grid:`"),
    ({"grid": {"train.lr": [0.1]}, "variants": {"a": {}}}, "give exactly one of `grid:`"),
    ({"grid": {"train.lr": 0.1}}, "grid axis 'train.lr' must be a non-empty list"),
    ({"grid": {"train.lr": []}}, "grid axis 'train.lr' must be a non-empty list"),
    ({"grid": {"kd": {"loss.kd": 1.0}}}, "grid axis 'kd' is a dict; named sets of overrides go under `variants:`"),
    ({"grid": {"train.lrr": [0.1]}}, "unknown key 'train.lrr'; did you mean 'lr'?"),
    ({"grid": {"launch.partition": ["a", "b"]}}, "'launch.partition' cannot be swept"),
    ({"grid": {"seed": [1, 2]}}, "'seed' cannot be swept"),
    ({"seeds": "0,1", "grid": {"train.lr": [0.1]}}, "`seeds:` must be a non-empty list of integers"),
    ({"seeds": [1, 1], "grid": {"train.lr": [0.1]}}, "repeats a seed"),
    ({"variants": {"a b": {}}}, "variant name 'a b'"),
    ({"variants": {"a": "train.lr=1"}}, "variant 'a' must be a dict"),
    ({"variants": {"a": {}}, "stage": "bogus"}, "unknown stage 'bogus'"),
    ({"variants": {"a": {}}, "compare": ["a"]}, "`compare:` lists a pipeline sweep's steps"),
    ({"variants": {"a": {}}, "config": "nope.yaml"}, "config file not found: nope.yaml"),
    ({"variants": {"a": {}}, "grids": {}}, "unknown key(s) grids"),
])
def test_malformed_grid_is_a_clear_error(tmp_path, spec, message):
    g = write_grid(tmp_path, **spec)
    with pytest.raises(UserError) as e:
        plan_sweep(g)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert main(["sweep", str(g), f"run_root={tmp_path}/runs", "launch.cluster=debug"]) == 2
    assert not (tmp_path / "runs").exists()


def test_shipped_pipelines_and_example_grid_resolve(no_slurm, capsys):
    for path in sorted((ROOT / "configs/pipelines").glob("*.yaml")):
        if any("stage" in (sec or {}) for sec in yaml.safe_load(path.read_text())["stages"].values()):
            continue  # named steps, planned below through their sweeps
        name, planned = plan_pipeline(path)
        assert [p.stage for p in planned] == ["byol", "probe", "distill", "prune", "quant"], path
        assert all(p.cfg.launch.cluster == "local" and p.cfg.track.group == name for p in planned)  # one GPU
        assert main(["pipeline", str(path), "launch.cluster=slurm", "--dry-run"]) == 0
        assert capsys.readouterr().out.count("#SBATCH --dependency=afterok:") == 4
    spec, planned = plan_sweep(ROOT / "configs/ablations/byol_momentum.yaml")
    assert len(planned) == 6 and {p.cfg.byol.momentum_start for p in planned} == {0.99, 0.996}
    # The multi-stage studies, with their documented digits override (the CIFAR-10 files need
    # the main pipeline's artifacts to exist first).
    for study, steps in (("order", 6), ("recovery", 7)):
        spec, planned = plan_sweep(ROOT / f"configs/ablations/{study}.yaml",
                                   [f"config={ROOT}/configs/pipelines/{study}_digits.yaml", "seeds=[0,1]"])
        assert len(planned) == 2 * steps and {p.cfg.data.name for p in planned} == {"digits"}
        assert main(["sweep", str(ROOT / f"configs/ablations/{study}.yaml"), "--dry-run",
                     f"config={ROOT}/configs/pipelines/{study}_digits.yaml"]) == 0
        with pytest.raises(UserError, match="the input artifact does not exist"):
            plan_sweep(ROOT / f"configs/ablations/{study}.yaml", ["run_root=/nonexistent"])
    capsys.readouterr()


# ----------------------------------------------------------------------------- running locally


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """byol -> probe through `launch pipeline` on the debug executor (in this process)."""
    tmp = tmp_path_factory.mktemp("pipe")
    root = tmp / "runs"
    f = write_pipeline(tmp / "tiny.yaml", {"byol": {}, "probe": {}}, {"name": "tiny"})
    code = main(["pipeline", str(f), f"run_root={root}", "launch.cluster=debug", *TINY_COMMON, *TINY_STAGE_BYOL])
    return code, root


def test_local_pipeline_runs_stages_in_order_and_collects(tiny_pipeline, capsys):
    code, root = tiny_pipeline
    assert code == 0
    manifest = status.read_manifests(root)[-1]
    assert [(j["stage"], j["state"]) for j in manifest["jobs"]] == [("byol", "COMPLETED"), ("probe", "COMPLETED")]
    probe_cfg = yaml.safe_load((root / "probe/tiny/config.yaml").read_text())
    assert probe_cfg["artifact"] == str(root / "byol/tiny")  # wired to byol's artifact
    assert probe_cfg["track"]["group"] == "tiny"
    head = json.loads((root / "probe/tiny/metrics.json").read_text())
    assert head["source"] == str(root / "byol/tiny")
    table = (root / "collect/tiny/results.md").read_text()
    assert "| byol/tiny | byol | resnet18 |" in table and "| probe/tiny | probe | resnet18 |" in table
    lines = status.status_lines(root)
    assert any("COMPLETED" in ln and "byol" in ln for ln in lines)


def test_a_finished_pipeline_rerun_starts_no_job(tiny_pipeline, capsys):
    """Every stage already finished with this config: nothing is started (a rerun of the
    quickstart took 189 s to do nothing when each stage's process started and looked)."""
    _, root = tiny_pipeline
    f = root.parent / "tiny.yaml"
    code = main(["pipeline", str(f), f"run_root={root}", "launch.cluster=debug", *TINY_COMMON, *TINY_STAGE_BYOL])
    out = capsys.readouterr().out
    assert code == 0
    manifest = status.read_manifests(root)[-1]
    assert [(j["state"], j["job_id"]) for j in manifest["jobs"]] == [("COMPLETED", None)] * 2
    assert out.count("is already finished with this config; nothing to do") == 2
    assert (root / "collect/tiny/results.md").is_file()


def test_local_pipeline_stops_at_first_failure(tmp_path, capsys):
    root = tmp_path / "runs"
    f = write_pipeline(tmp_path / "tiny.yaml", {"byol": {}, "probe": {}}, {"name": "tiny"})
    # A config that validates but fails when the job runs: the data folder does not exist.
    code = main(["pipeline", str(f), f"run_root={root}", "launch.cluster=debug",
                 "data.name=imagefolder", f"data.root={tmp_path}/missing", *TINY_STAGE_BYOL])
    assert code == 1
    manifest = status.read_manifests(root)[-1]
    assert [j["state"] for j in manifest["jobs"]] == ["FAILED", "NOT_RUN"]
    assert "not run: byol-tiny failed" in manifest["jobs"][1]["error"]
    assert not (root / "probe").exists()
    assert "FAILED byol-tiny" in capsys.readouterr().out


def test_pipeline_stops_when_a_stage_ends_without_its_artifact(tmp_path, capsys):
    # train.max_steps stops byol early with only checkpoint.pt: the probe must not run on it.
    root = tmp_path / "runs"
    f = write_pipeline(tmp_path / "tiny.yaml", {"byol": {}, "probe": {}}, {"name": "tiny"})
    code = main(["pipeline", str(f), f"run_root={root}", "launch.cluster=debug", *TINY_COMMON, *TINY_STAGE_BYOL,
                 "train.max_steps=1"])
    assert code == 1
    manifest = status.read_manifests(root)[-1]
    assert [j["state"] for j in manifest["jobs"]] == ["FAILED", "NOT_RUN"]
    assert "stopped before the end of training" in manifest["jobs"][0]["error"]
    assert (root / "byol/tiny/checkpoint.pt").is_file() and not (root / "probe").exists()


def test_local_executor_runs_a_job_in_a_subprocess(tiny_pipeline, tmp_path):
    _, pipe_root = tiny_pipeline
    root = tmp_path / "runs"
    res = run_cli(["-m", "launch", "submit", "probe", f"artifact={pipe_root}/byol/tiny", f"run_root={root}",
                   "launch.cluster=local", "name=again", *TINY_COMMON])
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = status.read_manifests(root)[-1]
    job = manifest["jobs"][0]
    assert job["state"] == "COMPLETED" and int(job["job_id"]) != os.getpid()
    assert (root / "probe/again/head.pt").is_file()
    assert "probe: " in Path(job["stderr"]).read_text()  # the stage's output is in the job's log
    assert f"log: {job['stderr']}" in res.stdout  # and that is the log the launcher points at


@pytest.mark.parametrize("args, message", [
    (["submit", "bogus", "x.yaml"], "unknown stage 'bogus'"),
    (["submit", "probe", "artifact=/nonexistent/byol/x"], "probe.artifact=/nonexistent/byol/x: the input artifact does not exist"),
    (["submit", "probe"], "probe.artifact is not set"),
    (["submit", "byol", ROOT / "configs/quickstart.yaml", "train.lrr=1"], "unknown key 'train.lrr'"),
    (["pipeline", ROOT / "configs/byol/cifar10_r50.yaml"], "is not a pipeline file"),
    (["submit", "byol", ROOT / "configs/quickstart.yaml", "launch.cluster=slurm"], "`sbatch` is not on PATH"),
])
def test_bad_input_is_one_line_and_runs_nothing(tmp_path, no_slurm, capsys, args, message):
    root = tmp_path / "runs"
    code, out, err = cli([*args, f"run_root={root}"], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not root.exists()


def test_cli_entry_point_reports_errors_without_traceback(tmp_path):
    res = run_cli(["-m", "launch", "submit", "probe", f"artifact={tmp_path}/nope", f"run_root={tmp_path}/runs"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: probe.artifact={tmp_path}/nope: the input artifact does not exist"


def test_stage_job_is_checkpointable_and_pickles():
    import cloudpickle

    job = jobs.StageJob("byol", "/x/config.yaml")
    again = job.checkpoint()
    assert again.function is job and again.args == () and again.kwargs == {}
    copy = cloudpickle.loads(cloudpickle.dumps(job))
    assert (copy.stage, copy.config) == ("byol", "/x/config.yaml")


# ----------------------------------------------------------------------------- status


def test_status_falls_back_to_submitit_files_when_slurm_forgot_the_job(tmp_path):
    root, folder = tmp_path / "runs", tmp_path / "runs/submitit"
    folder.mkdir(parents=True)
    ids = ["990001", "990002", "990003", "990004", "990005"]  # never known to this cluster
    with open(folder / f"{ids[0]}_0_result.pkl", "wb") as f:
        pickle.dump(("success", "runs/byol/a"), f)
    with open(folder / f"{ids[1]}_0_result.pkl", "wb") as f:
        pickle.dump(("error", "Traceback ...\ncore.errors.UserError: data folder not found"), f)
    done = root / "byol/d"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    (folder / f"{ids[4]}_0_log.err").write_text("training...\n")  # it ran, then was killed
    record = status.new_record(root, "sweep", "s")
    jobs_ = [{"job_id": j, "stage": "byol", "name": n, "run_dir": str(root / "byol" / n),
              "stdout": str(folder / f"{j}_0_log.out"), "stderr": str(folder / f"{j}_0_log.err")}
             for j, n in zip(ids, "abcde")]
    status.write_manifest(record, {"kind": "sweep", "name": "s", "cluster": "slurm", "folder": str(folder),
                                   "created": 1.0, "jobs": jobs_})
    states = [status.job_state(j, "slurm", str(folder)) for j in jobs_]
    assert states[0] == ("COMPLETED", "")
    assert states[1] == ("FAILED", "core.errors.UserError: data folder not found")
    assert states[2] == ("CANCELLED", "never ran: cancelled before it started (it left no log)")
    assert states[3][0] == "COMPLETED"  # artifact finished, job records purged
    assert states[4][0] == "UNKNOWN" and "killed while running" in states[4][1]
    text = "\n".join(status.status_lines(root))
    assert "990002" in text and "FAILED" in text


def test_status_names_the_failed_stage_a_job_never_ran_for(tmp_path):
    """A chain a -> b -> c whose first job failed: b and c never ran (no log, no run folder);
    status says which job failed and where its log is, and prints no path that does not exist.
    What scontrol said while it knew (seen.json) outlives Slurm's memory."""
    root, folder = tmp_path / "runs", tmp_path / "runs/submitit"
    folder.mkdir(parents=True)
    ids = ["990011", "990012", "990013"]
    with open(folder / f"{ids[0]}_0_result.pkl", "wb") as f:
        pickle.dump(("error", "Traceback ...\ncore.errors.UserError: data folder not found"), f)
    (folder / f"{ids[0]}_0_log.err").write_text("Traceback ...\n")
    (folder / f"{ids[0]}_0_log.out").write_text("submitit ...\n")
    (root / "byol/a").mkdir(parents=True)
    record = status.new_record(root, "pipeline", "p")
    jobs_ = [{"job_id": j, "stage": st, "name": "a", "run_dir": str(root / st / "a"), "after": after,
              "stdout": str(folder / f"{j}_0_log.out"), "stderr": str(folder / f"{j}_0_log.err")}
             for j, st, after in zip(ids, ("byol", "distill", "prune"), ([], [ids[0]], [ids[1]]))]
    status.write_manifest(record, {"kind": "pipeline", "name": "p", "cluster": "slurm", "folder": str(folder),
                                   "created": 1.0, "jobs": jobs_})
    (record / "seen.json").write_text(json.dumps({ids[1]: ["CANCELLED", "DependencyNeverSatisfied"]}))
    lines = status.status_lines(root)
    text = "\n".join(lines)
    why = f"never ran: byol a (job {ids[0]}) failed; its log: {folder / (ids[0] + '_0_log.err')}"
    assert sum(why in ln and "CANCELLED" in ln for ln in lines) == 2, text  # distill and prune
    printed = [w for ln in lines for w in ln.replace("[", " ").replace("]", " ").replace(";", " ").split()
               if w.startswith("/")]
    assert printed and all(Path(w).exists() for w in printed), text
    assert "(no run folder yet)" in text


def test_status_finds_the_run_root_from_where_it_is_called(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    record = status.new_record(root, "submit", "x")
    status.write_manifest(record, {"kind": "submit", "name": "x", "cluster": "local", "folder": str(root),
                                   "created": 1.0, "jobs": []})
    for where in (tmp_path, root, root / "launch", record):  # the project folder, the run root, inside it
        monkeypatch.chdir(where)
        assert status.status_lines()[0].startswith("submit x (local"), where
    monkeypatch.chdir(tmp_path.parent)
    [line] = status.status_lines()
    assert f"no launches found in {tmp_path.parent}" in line and "--run-root DIR" in line
    [line] = status.status_lines(tmp_path / "elsewhere")
    assert f"no launches under {tmp_path / 'elsewhere' / 'launch'}" in line and "--run-root DIR" in line


# ----------------------------------------------------------------------------- collect


def plant(root, stage, name, metrics, seed=0):
    d = root / stage / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"stage": stage, **metrics}))
    (d / "config.yaml").write_text(yaml.safe_dump({"name": name, "seed": seed}))
    return d


def test_collect_tables_groups_and_pareto_on_planted_metrics(tmp_path):
    root = tmp_path / "runs"
    plant(root, "byol", "teacher", {"arch": "resnet50", "probe_top1": 0.90, "macs": 4.1e9, "params": 23.5e6,
                                    "file_mb": 94.0, "latency_ms_cpu_b1": 24.5})
    accs = {"kd": [0.80, 0.82, 0.84], "embed": [0.70, 0.75, 0.71]}
    dirs = []
    for variant, values in accs.items():
        for seed, acc in enumerate(values):
            dirs.append(plant(root, "distill", f"abl-{variant}-s{seed}", {
                "arch": "resnet18", "probe_top1": acc, "macs": 0.56e9, "file_mb": 42.7 + seed,
                "latency_ms_cpu_b1": 5.0 + seed, "cka_teacher": 0.9}, seed))
    plant(root, "prune", "half", {"arch": "resnet18", "probe_top1": 0.79, "macs": 0.14e9, "file_mb": 11.0,
                                  "latency_ms_cpu_b1": 1.1})
    plant(root, "quant", "bad", {"arch": "resnet18", "probe_top1": 0.60, "macs": 0.2e9, "file_mb": 4.8,
                                 "latency_ms_cpu_b1": 1.0})
    # sweep.json names the variant of the `kd` runs and their overrides
    sweep = root / "sweeps/abl/sweep.json"
    sweep.parent.mkdir(parents=True)
    sweep.write_text(json.dumps({"sweep": "abl", "variants": {"kd": ["distill.kd=1.0"]}, "runs": [
        {"run_dir": str(d), "variant": "kd"} for d in dirs[:3]]}))

    out = tmp_path / "out"
    text = collect_mod.collect([root], out, "macs")
    assert "| distill/abl-kd-s1 | distill | resnet18 | 0.8200 |" in text
    # readable headers, and no column of dashes for what no run measured (fine-tune, top-5, ...)
    assert text.splitlines()[2] == "| run | stage | arch | val probe top-1 | params | MACs | file MB | CPU ms b1 | CKA |"
    groups = {g["group"]: g for g in collect_mod.group_runs(
        [collect_mod.read_run(d, collect_mod.sweep_index([root])) for d in collect_mod.find_artifacts([root])])}
    for variant, values in accs.items():
        g = groups[f"abl-{variant}"]
        assert g["n"] == 3
        assert g["probe_top1_mean"] == pytest.approx(statistics.mean(values))
        assert g["probe_top1_std"] == pytest.approx(statistics.stdev(values))  # sample std (n-1)
    assert groups["abl-kd"]["overrides"] == "distill.kd=1.0"
    assert "0.8200 ± 0.0200" in text and "| abl-kd | distill | resnet18 | 3 |" in text

    rows = list(csv_rows(out / "groups.csv"))
    kd = next(r for r in rows if r["group"] == "abl-kd")
    assert float(kd["probe_top1_std"]) == pytest.approx(0.02) and kd["n"] == "3"
    runs = list(csv_rows(out / "runs.csv"))
    assert len(runs) == 9 and list(runs[0])[:len(collect_mod.COLUMNS)] == collect_mod.COLUMNS

    # Front over (macs, mean top-1): prune/half (cheapest), abl-kd, teacher; quant/bad costs more than half
    # and is worse, abl-embed costs as much as abl-kd and is worse.
    pts = {g["group"]: (g["macs_mean"], g["probe_top1_mean"]) for g in groups.values()}
    names = list(pts)
    front = {names[i] for i in collect_mod.pareto_front([pts[n] for n in names])}
    assert front == {"half", "abl-kd", "teacher"}
    from PIL import Image

    with Image.open(out / "pareto_macs.png") as im:
        assert im.size[0] > 300
    collect_mod.collect([root], out, "latency")
    assert (out / "pareto_latency.png").is_file()


def test_collect_marks_differences_within_the_spread_as_not_significant(tmp_path):
    """A pipeline sweep's compared steps (different stages) form one cohort; the other steps
    are ranked within their stage. Planted accuracies with known means and spreads."""
    root = tmp_path / "runs"
    accs = {("prune", "a"): [0.80, 0.82, 0.84],   # best: mean 0.82, std 0.02
            ("prune", "b"): [0.79, 0.81, 0.83],   # -0.01, spread sqrt(2) * 0.02: not significant
            ("distill", "c"): [0.70, 0.71, 0.72],  # -0.11: significant
            ("distill", "d"): [0.90],              # not compared: its own cohort, alone
            ("prune", "e"): [0.81]}                # one seed: no spread to judge by
    runs = []
    for (stage, step), values in accs.items():
        for seed, acc in enumerate(values):
            d = plant(root, stage, f"o-{step}-s{seed}", {"probe_top1": acc}, seed)
            runs.append({"run_dir": str(d), "variant": step, "seed": seed})
    sweep = root / "sweeps/o/sweep.json"
    sweep.parent.mkdir(parents=True)
    sweep.write_text(json.dumps({"sweep": "o", "variants": {}, "compare": ["a", "b", "c", "e"], "runs": runs}))
    text = collect_mod.collect([root], tmp_path / "out")
    groups = {g["group"]: g for g in collect_mod.group_runs(
        [collect_mod.read_run(d, collect_mod.sweep_index([root])) for d in collect_mod.find_artifacts([root])])}
    assert groups["o-a"]["vs_best"] == "best"
    assert groups["o-b"]["vs_best"] == "-0.0100 n.s."
    assert groups["o-c"]["vs_best"] == "-0.1100"
    assert groups["o-e"]["vs_best"] == "+0.0000 (1 seed: no spread)".replace("+0.0000", f"{0.81 - 0.82:+.4f}")
    assert groups["o-d"]["vs_best"] == ""
    assert "| -0.0100 n.s. |" in text and "| best |" in text


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_pareto_front_against_brute_force():
    import random

    rng = random.Random(0)
    pts = [(rng.choice([1, 2, 3, 4, 5]), rng.choice([0.1, 0.2, 0.3, 0.4])) for _ in range(40)]
    front = set(collect_mod.pareto_front(pts))
    for i, (c, a) in enumerate(pts):
        better = [j for j, (c2, a2) in enumerate(pts) if (c2 < c and a2 >= a) or (c2 <= c and a2 > a)]
        assert (i in front) == (not better)


# ----------------------------------------------------------------------------- W&B offline runs


def test_wandb_reader_reads_back_every_logged_value(tmp_path):
    import wandb

    big = "x" * 70_000  # one record over two 32 KiB blocks: first/middle/last chunks
    run = wandb.init(project="t", group="g", name="n", id="readback1", dir=str(tmp_path), mode="offline",
                     config={"big": big, "lr": 0.1}, settings=wandb.Settings(console="off", silent=True))
    logged = [{"train/loss": 1.0 / s, "epoch": s // 50} for s in range(1, 400)]
    for s, row in enumerate(logged, start=1):
        run.log(row, step=s)
    run.summary["knn_top1"] = 0.5
    run.finish()

    [path] = find_runs(tmp_path)
    got, deadline = read_run(path), time.monotonic() + 60
    while not got.finished and time.monotonic() < deadline:  # W&B's writer process may still be writing
        time.sleep(0.1)
        got = read_run(path)
    assert got.finished and path.stat().st_size > 2 * BLOCK
    assert (got.run_id, got.group, got.project, got.name) == ("readback1", "g", "t", "n")
    assert got.config["big"] == big and got.config["lr"] == 0.1
    assert got.metric("train/loss") == [r["train/loss"] for r in logged]
    assert [r["_step"] for r in got.history] == list(range(1, 400))
    assert got.summary["knn_top1"] == 0.5

    # A job killed mid-write leaves a torn tail: reading stops there, what came before is intact.
    torn = tmp_path / "torn.wandb"
    data = path.read_bytes()
    torn.write_bytes(data[: len(data) - 100] + b"\x00" * 7)
    assert 0 < len(list(read_records(torn))) < len(list(read_records(path)))
    assert not read_run(torn).finished
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(UserError, match="not a W&B run file"):
        read_run(bad)


def read_all_finished(root, timeout=60):
    """Every .wandb file under root, read once each holds its exit record (W&B writes from another process)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [read_run(p) for p in find_runs(root)]
        if all(r.finished for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)


@pytest.mark.parametrize("written,checkpoint", [(3, 5), (3, 2)])
def test_a_resumed_tracker_logs_again_the_rows_an_interrupted_writer_lost(tmp_path, written, checkpoint):
    """Slurm's SIGTERM kills wandb-core before it writes its buffer. On resume, the rows the
    checkpoint kept past the last step W&B wrote are logged again (W&B wrote 3, the checkpoint is
    at 5), and replayed steps W&B already has are skipped (W&B wrote 3, the checkpoint is at 2)."""
    from core.config import TrackConfig
    from core.track import Tracker

    cfg = TrackConfig(mode="offline", project="t")
    row = lambda s: {"train/loss": 1.0 / s, "train/lr": 0.1 * s}  # noqa: E731
    first = Tracker(cfg, tmp_path, "byol/x", {"a": 1})
    for s in range(1, written + 1):  # what W&B wrote before its writer was killed
        first.log(row(s), step=s)
    first.finish()
    assert [r["_step"] for run in read_all_finished(tmp_path) for r in run.history] == list(range(1, written + 1))
    kept = [[s, row(s)] for s in range(1, checkpoint + 1)]  # what checkpoint.pt holds

    second = Tracker(cfg, tmp_path, "byol/x", {"a": 1}, run_id=first.id, rows=kept)
    assert second.written == max(written, checkpoint)
    for s in range(checkpoint + 1, 8):  # the resumed job replays what came after its checkpoint
        second.log(row(s), step=s)
    second.finish()
    runs = read_all_finished(tmp_path)
    assert len(runs) == 2 and {r.run_id for r in runs} == {first.id}
    rows = [r for run in runs for r in run.history]
    assert [r["_step"] for r in rows] == list(range(1, 8))  # every step once, in order
    assert [{k: r[k] for k in row(1)} for r in rows] == [row(s) for s in range(1, 8)]
    assert [s for s, _ in second.rows] == list(range(1, 8))  # the next checkpoint keeps them all


def test_a_local_run_has_no_time_limit_unless_the_user_sets_one(tmp_path):
    """submitit's local executor stops a job at its timeout (SIGUSR2, then SIGINT): a slow machine's
    quickstart was killed at 60 minutes. Locally, launch.timeout_min=0 (the default) is no limit."""
    from core.config import LaunchConfig

    default = jobs.make_executor(LaunchConfig(cluster="local"), tmp_path)
    assert default.parameters["timeout_min"] >= 60 * 24 * 365
    assert jobs.make_executor(LaunchConfig(cluster="local", timeout_min=5), tmp_path).parameters["timeout_min"] == 5
    assert jobs.slurm_parameters(LaunchConfig(cluster="slurm"), "j")["time"] == 60  # Slurm's default stays
    assert jobs.slurm_parameters(LaunchConfig(cluster="slurm", timeout_min=7), "j")["time"] == 7


def test_collect_of_one_artifact_writes_under_its_run_root_not_the_working_dir(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    d = plant(root, "byol", "a", {"probe_top1": 0.5})
    monkeypatch.chdir(tmp_path)
    collect_mod.collect([d])
    assert (root / "collect" / "results.md").is_file() and not (tmp_path / "collect").exists()
