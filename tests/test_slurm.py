"""The launcher against a real SLURM cluster (scripts/slurm_up.sh makes one on this machine).

Skipped only when `sbatch` is absent; CI starts the cluster first. Jobs are tiny (synthetic
16px images, ResNet-18 with the stride-4 stem, 1 CPU each) so the file stays within minutes.
States are read with `scontrol` and submitit's result files (no sacct here), always with a
time limit.
"""

import copy
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from launch import status
from launch.cli import main
from core.wandb_reader import find_runs, read_run
from tests.conftest import ROOT, TINY_BYOL

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs a SLURM cluster (sbatch)")]

SLURM = ["launch.cluster=slurm", "launch.cpus_per_task=1", "launch.mem_gb=3", "launch.timeout_min=20"]
# 192 training images, batch 32: 6 steps per epoch; 4 epochs leave time to signal a running job.
TRAIN = [*TINY_BYOL, "train.epochs=4", "eval.probe_epochs=3", *SLURM]
WAIT_S = 240


@pytest.fixture(scope="module", autouse=True)
def cluster_up():
    res = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=30)
    if res.returncode != 0 or "up" not in res.stdout:
        pytest.fail(f"the SLURM cluster is not answering (run scripts/slurm_up.sh): {res.stderr.strip()}")


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # jobs run in the submitting directory and import the project from it


def submit(args):
    """`python -m launch ...` in this process; returns the launch's manifest."""
    root = next(Path(a.split("=", 1)[1]) for a in args if str(a).startswith("run_root="))
    before = len(status.read_manifests(root))
    code = main([str(a) for a in args])
    manifests = status.read_manifests(root)
    assert code == 0 and len(manifests) == before + 1, f"launch failed with code {code}"
    return manifests[-1]


def wait(manifest, timeout=WAIT_S):
    ids = [j["job_id"] for j in manifest["jobs"]]
    states = status.wait_slurm(ids, manifest["folder"], timeout)
    return [states[i] for i in ids]


def log(job, which="stderr"):
    path = Path(job[which])
    return path.read_text() if path.is_file() else ""


def assert_completed(manifest, states):
    for job, (state, detail) in zip(manifest["jobs"], states):
        assert state == "COMPLETED", f"{job['job_id']} {state} {detail}\n{log(job)[-3000:]}"


def backbone_weights(run_dir):
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)["backbone"]


# ----------------------------------------------------------------------------- bad input


def pipeline_file(tmp_path):
    """byol -> probe (the quickstart's other stages have their own tests)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"common": {"name": "tiny"}, "stages": {"byol": {}, "probe": {}}}))
    return path


def test_bad_input_is_refused_before_anything_is_submitted(tmp_path, capsys):
    root = tmp_path / "runs"
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"stage": "byol", "config": str(ROOT / "configs/quickstart.yaml"),
                                    "grid": {"train.lr": 0.1}}))
    cases = [
        (["submit", "bogus", "configs/quickstart.yaml"], "unknown stage 'bogus'"),
        (["submit", "probe", f"artifact={tmp_path}/byol/none"], "the input artifact does not exist"),
        (["sweep", grid], "grid axis 'train.lr' must be a non-empty list"),
        (["submit", "byol", "configs/quickstart.yaml", "launch.partition=nosuchpart"],
         "launch.partition=nosuchpart: no such SLURM partition; partitions: debug"),
        (["pipeline", pipeline_file(tmp_path), "launch.partition=nosuchpart"], "no such SLURM partition"),
        (["submit", "byol", "configs/quickstart.yaml", "launch.tasks_per_node=64"], "SLURM would refuse this job"),
        (["pipeline", pipeline_file(tmp_path), "--dry-run", "launch.partition=nosuchpart"], "no such SLURM partition"),
    ]
    queue_before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    for args, message in cases:
        code = main([str(a) for a in [*args, f"run_root={root}", *SLURM]])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not root.exists()  # no manifest, no submitit folder: nothing went to sbatch
    queue_after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert set(queue_after.split()) <= set(queue_before.split())


# ----------------------------------------------------------------------------- one job


@pytest.fixture(scope="module")
def reference_job(tmp_path_factory):
    """An uninterrupted BYOL job (W&B offline): the reference the requeued runs must equal."""
    root = tmp_path_factory.mktemp("slurm") / "runs"
    manifest = submit(["submit", "byol", f"run_root={root}", "name=ref", *TRAIN, "track.mode=offline"])
    return manifest, wait(manifest)


def read_finished(path, timeout=60):
    """read_run once the file holds the run's exit record: wandb-core writes it from another
    process and may still be flushing when the job is reported done."""
    run, deadline = read_run(path), time.monotonic() + timeout
    while not run.finished and time.monotonic() < deadline:
        time.sleep(0.2)
        run = read_run(path)
    return run


def test_stage_job_writes_its_artifact_and_wandb_run(reference_job):
    manifest, states = reference_job
    assert_completed(manifest, states)
    job = manifest["jobs"][0]
    run_dir = Path(job["run_dir"])
    assert {"config.yaml", "checkpoint.pt", "model.pt", "metrics.json"} <= {p.name for p in run_dir.iterdir()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stage"] == "byol" and metrics["steps"] == 24 and 0 <= metrics["probe_top1"] <= 1
    assert "Job completed successfully" in log(job, "stdout")

    # The W&B offline run, read back with wandb's own protobuf classes, holds what the job logged.
    [path] = find_runs(run_dir)
    run = read_finished(path)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert run.run_id == state["wandb_id"] and run.name == "byol/ref" and run.project == "byolc"
    assert run.config["train"]["epochs"] == 4
    steps = [row["_step"] for row in run.history if "train/loss" in row]
    assert steps == [10, 20, 24]  # byol logs every 10 steps and at the last one
    assert all(isinstance(v, float) for v in run.metric("train/loss"))
    for key in ("knn_top1", "probe_top1", "probe_top5", "params", "macs"):
        assert run.summary[key] == pytest.approx(metrics[key])
    assert status.job_state(job, "slurm", manifest["folder"])[0] == "COMPLETED"


# ----------------------------------------------------------------------------- requeue


def checkpoint_step(run_dir) -> int:
    """The step of the job's checkpoint.pt, -1 before it has one."""
    path = Path(run_dir) / "checkpoint.pt"
    try:
        return torch.load(path, weights_only=True)["step"] if path.is_file() else -1
    except (OSError, RuntimeError, EOFError):  # replaced while being read
        return -1


def wandb_history(run_dir):
    """Every W&B row a job logged, over all its offline files (one per start), without what
    differs between two runs of the same config (wall-clock times, images/s)."""
    paths = find_runs(run_dir)
    runs = [read_run(p) for p in paths[:-1]] + [read_finished(paths[-1])]  # only the last one ended
    return [{k: v for k, v in row.items() if k in ("_step",) or not (k.startswith("_") or k.endswith("images_per_s"))}
            for run in runs for row in run.history]


def test_requeue_and_usr2_resume_from_checkpoint_to_identical_weights(reference_job, tmp_path):
    """`scontrol requeue` (SIGTERM, submitit's checkpoint() not called: the job restarts from its
    pickle) and `scancel --signal=USR2` (submitit's timeout signal: checkpoint() + requeue) of a
    running job: both resume from the stage's checkpoint.pt and end bit-identical to the
    uninterrupted reference job (same config, same node, same thread count)."""
    ref_manifest, ref_states = reference_job
    assert_completed(ref_manifest, ref_states)
    root = tmp_path / "runs"
    term = submit(["submit", "byol", f"run_root={root}", "name=term", *TRAIN, "train.checkpoint_every_steps=3",
                   "track.mode=offline"])
    usr2 = submit(["submit", "byol", f"run_root={root}", "name=usr2", *TRAIN, "train.checkpoint_every_steps=3",
                   "track.mode=offline"])
    # Each signalled once past W&B rows (an epoch at 6, train/loss at 10), both watched at once.
    waiting = {term["jobs"][0]["job_id"]: (term["jobs"][0], ["scontrol", "requeue"]),
               usr2["jobs"][0]["job_id"]: (usr2["jobs"][0], ["scancel", "--signal=USR2"])}
    deadline = time.time() + WAIT_S
    while waiting and time.time() < deadline:
        for job_id, (job, command) in list(waiting.items()):
            if checkpoint_step(job["run_dir"]) >= 10:
                subprocess.run([*command, job_id], check=True, timeout=30)
                assert checkpoint_step(job["run_dir"]) < 24, "the job finished before it could be interrupted"
                del waiting[job_id]
        time.sleep(0.1)
    assert not waiting, f"no checkpoint at step 10 after {WAIT_S} s"
    term_states, usr2_states = wait(term), wait(usr2)
    assert_completed(term, term_states)
    assert_completed(usr2, usr2_states)

    reference = backbone_weights(ref_manifest["jobs"][0]["run_dir"])
    for manifest in (term, usr2):
        job = manifest["jobs"][0]
        text = log(job)
        assert "resumed" in text and "at step" in text, text[-3000:]  # it did restart mid-run
        # The restarted job took the run folder's lock: its first start's holder died with it.
        assert f"(Slurm job {job['job_id']}, restart 1)" in (Path(job["run_dir"]) / ".lock").read_text()
        got = backbone_weights(job["run_dir"])
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference), f"{job['run_dir']} differs"
    assert "DUE TO JOB REQUEUE" in log(term["jobs"][0]) + log(term["jobs"][0], "stdout")
    out = log(usr2["jobs"][0], "stdout") + log(usr2["jobs"][0])
    assert "Calling checkpoint method" in out and "Requeued job" in out

    # Both continued their W&B run (a second offline folder under the same run id), and together
    # the files hold exactly the uninterrupted run's rows: same steps, same values. (Slurm's
    # SIGTERM kills wandb-core too, before it writes its buffer: the resumed job logs again
    # what its checkpoint kept past the last row W&B wrote.)
    reference_rows = wandb_history(ref_manifest["jobs"][0]["run_dir"])
    assert [r["_step"] for r in reference_rows] == [6, 10, 12, 18, 20, 24]
    for manifest in (term, usr2):
        run_dir = Path(manifest["jobs"][0]["run_dir"])
        run_id = torch.load(run_dir / "checkpoint.pt", weights_only=True)["wandb_id"]
        paths = find_runs(run_dir)
        assert len(paths) == 2 and all(p.name == f"run-{run_id}.wandb" for p in paths)
        assert wandb_history(run_dir) == reference_rows, run_dir


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_runs_in_order_and_a_failed_stage_cancels_its_dependents(tmp_path):
    good_root, bad_root = tmp_path / "good", tmp_path / "bad"
    common = [*[o for o in TRAIN if not o.startswith(("model.", "train.", "byol.", "aug."))]]
    byol_only = [f"stages.byol.{o}" for o in TRAIN if o.startswith(("model.", "train.", "byol.", "aug."))]
    good = submit(["pipeline", pipeline_file(tmp_path), f"run_root={good_root}", *common, *byol_only,
                   "stages.byol.train.epochs=1"])
    # Valid config, but its data folder is missing: byol fails when it runs.
    bad = submit(["pipeline", pipeline_file(tmp_path), f"run_root={bad_root}", *common, *byol_only,
                  "data.name=imagefolder", f"data.root={tmp_path}/missing"])
    byol_job, probe_job = bad["jobs"]
    assert probe_job["after"] == [byol_job["job_id"]]
    dependency = subprocess.run(["scontrol", "-o", "show", "job", probe_job["job_id"]], capture_output=True,
                                text=True).stdout
    assert f"Dependency=afterok:{byol_job['job_id']}" in dependency

    bad_states = wait(bad, timeout=120)
    assert bad_states[0][0] == "FAILED", bad_states
    assert bad_states[1] == ("CANCELLED", "DependencyNeverSatisfied"), bad_states
    assert not Path(probe_job["run_dir"]).exists() and not Path(probe_job["stdout"]).exists()  # never ran

    good_states = wait(good)
    assert_completed(good, good_states)
    # The table, without a manual collect: a last job after all the others (afterany).
    for manifest, rows in ((good, 2), (bad, 0)):
        c = manifest["collect"]
        assert c["after"] == sorted(j["job_id"] for j in manifest["jobs"])
        assert status.wait_slurm([c["job_id"]], manifest["folder"], timeout_s=120)[c["job_id"]][0] == "COMPLETED"
        table = Path(c["out"]) / "results.md"
        if rows:
            text = table.read_text()
            assert all(f"| {j['stage']}/{j['name']} |" in text for j in manifest["jobs"]), text
            assert (Path(c["out"]) / "runs.csv").is_file()
        else:  # nothing finished: no table, and the log says why
            assert not table.exists() and "none of the 2 runs finished" in Path(c["stdout"]).read_text()
    lines = status.status_lines(good_root)
    assert any("collect" in ln and "COMPLETED" in ln and str(Path(good["collect"]["out"]) / "results.md") in ln
               for ln in lines), lines

    # Once Slurm has forgotten the failed pipeline's jobs (MinJobAge), status still says why
    # probe never ran, names the stage that failed and its log, and prints no missing path.
    status.status_lines(bad_root)  # what scontrol says now is kept in the launch's seen.json
    ids = [j["job_id"] for j in bad["jobs"]] + [bad["collect"]["job_id"]]
    deadline = time.time() + 200
    while any(status.scontrol_state(i) for i in ids) and time.time() < deadline:
        time.sleep(2)
    assert not any(status.scontrol_state(i) for i in ids), "Slurm still knows the jobs (MinJobAge too long?)"
    lines = status.status_lines(bad_root)
    text = "\n".join(lines)
    failed_log = Path(byol_job["stderr"])
    assert any("FAILED" in ln and "byol" in ln for ln in lines), text
    assert any("CANCELLED" in ln and "probe" in ln and f"never ran: byol tiny (job {byol_job['job_id']}) failed; "
               f"its log: {failed_log}" in ln for ln in lines), text
    assert "data folder" in failed_log.read_text() or "missing" in failed_log.read_text()
    # Every path status points at exists. A FAILED job's bracket quotes its own error, which can
    # name the missing file it failed on (here data.root): that text is the job's, not a pointer.
    pointers = [ln.split("  [")[0] if "FAILED" in ln else ln for ln in lines]
    printed = [w for ln in pointers for w in ln.replace("[", " ").replace("]", " ").replace(";", " ").split()
               if w.startswith("/")]
    assert printed and all(Path(w).exists() for w in printed), text
    assert str(failed_log) in printed  # the never-ran job's pointer to the failed stage's log is checked
    byol_dir, probe_dir = (Path(j["run_dir"]) for j in good["jobs"])
    # probe read byol's finished artifact: it started after byol wrote its last file
    assert (probe_dir / "config.yaml").stat().st_mtime >= (byol_dir / "metrics.json").stat().st_mtime
    assert json.loads((probe_dir / "metrics.json").read_text())["source"] == str(byol_dir)


# ----------------------------------------------------------------------------- sweep


def test_sweep_is_one_job_array_with_per_task_overrides_and_one_wandb_group(reference_job, tmp_path, capsys):
    manifest, states = reference_job
    assert_completed(manifest, states)
    teacher = manifest["jobs"][0]["run_dir"]
    root = tmp_path / "runs"
    grid = tmp_path / "probe-lr.yaml"
    grid.write_text(yaml.safe_dump({
        "stage": "probe", "config": str(ROOT / "configs/quickstart.yaml"), "seeds": [0, 1],
        "overrides": [f"artifact={teacher}"],
        "variants": {"slow": {"eval.probe_lr": 0.01}, "fast": {"eval": {"probe_lr": 0.5}}}}))
    # data.test=auto: the quickstart requires its digits test split; synthetic data has none
    common = [o for o in TRAIN if not o.startswith(("model.", "train.", "byol.", "aug."))] + ["data.test=auto"]
    sweep = submit(["sweep", grid, f"run_root={root}", *common, "track.mode=offline", "launch.array_parallelism=2"])
    ids = [j["job_id"] for j in sweep["jobs"]]
    array_id = ids[0].split("_")[0]
    assert ids == [f"{array_id}_{i}" for i in range(4)]  # one array, four tasks
    script = (Path(sweep["folder"]) / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --job-name=sweep-probe-lr" in script
    assert_completed(sweep, wait(sweep))
    c = sweep["collect"]  # one table for the whole array, after its last task
    assert c["after"] == [array_id] and status.wait_slurm([c["job_id"]], sweep["folder"], timeout_s=120)[c["job_id"]][0] == "COMPLETED"
    assert (Path(c["out"]) / "results.md").read_text().count("| probe/probe-lr-") == 4

    groups, run_ids = set(), set()
    for job in sweep["jobs"]:
        cfg = yaml.safe_load((Path(job["run_dir"]) / "config.yaml").read_text())
        seed = int(job["name"][-1])
        assert cfg["name"] == f"probe-lr-{job['variant']}-s{seed}" and cfg["seed"] == seed
        assert cfg["eval"]["probe_lr"] == {"slow": 0.01, "fast": 0.5}[job["variant"]]
        [path] = find_runs(job["run_dir"])
        run = read_run(path)
        groups.add(run.group)
        run_ids.add(run.run_id)
        assert run.config["eval"]["probe_lr"] == cfg["eval"]["probe_lr"]
    assert groups == {"probe-lr"} and len(run_ids) == 4

    sweep_json = json.loads((root / "sweeps/probe-lr/sweep.json").read_text())
    assert {r["run_dir"] for r in sweep_json["runs"]} == {j["run_dir"] for j in sweep["jobs"]}
    assert main(["collect", str(root), "--out", str(tmp_path / "table")]) == 0
    text = capsys.readouterr().out
    assert "| probe-lr-slow | probe | resnet18 | 2 |" in text and "| probe-lr-fast | probe | resnet18 | 2 |" in text


# ----------------------------------------------------------------------------- DDP


def reference_training(cfg, world_size, chunks):
    """BYOL's step in one process over the global batch of `world_size` ranks (no DDP).

    Rank r's images and views are exactly those the DDP job's rank r sees (same permutation
    shard, same per-rank augmentation generator). With `chunks=world_size` each rank's chunk
    goes through the networks on its own, so every BatchNorm normalises per rank as DDP on CPU
    does (SyncBatchNorm needs CUDA); the loss is the mean of the per-rank losses, whose gradient
    is DDP's all-reduced mean. `chunks=1` is the naive reference: BatchNorm over the global batch.
    """
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    from byol.train import Online
    from core.loop import view_seed
    from core.optim import build_optimizer, warmup_cosine
    from core import data as datalib
    from core import engine
    from core.augment import two_view_augment
    from core.models import build_backbone, feature_dim

    splits = datalib.load_splits(cfg.data)
    train, batch = splits.train, cfg.train.batch_size
    engine.seed_everything(cfg.seed)
    backbone = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    dim = feature_dim(backbone)
    online = Online(backbone, BYOLProjectionHead(dim, cfg.byol.proj_hidden_dim, cfg.byol.proj_dim),
                    BYOLPredictionHead(cfg.byol.proj_dim, cfg.byol.pred_hidden_dim, cfg.byol.proj_dim))
    target = copy.deepcopy(nn.Sequential(online.backbone, online.projection))
    deactivate_requires_grad(target)
    steps_per_epoch = datalib.steps_per_epoch(len(train), batch, world_size)
    total = cfg.train.epochs * steps_per_epoch
    base_lr = cfg.train.lr * batch * world_size / 256
    optimizer = build_optimizer(cfg.train, online.parameters(), base_lr)
    warmup = int(cfg.train.warmup_epochs * steps_per_epoch)
    gens = [torch.Generator() for r in range(world_size)]
    criterion = NegativeCosineSimilarity()
    online.train(), target.train()
    for step in range(total):
        epoch, b = divmod(step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, total, base_lr, warmup)
        views = []
        for r in range(world_size):
            order = datalib.epoch_permutation(len(train), cfg.seed, epoch, r, world_size)
            images = train.images[order[b * batch:(b + 1) * batch]]
            gens[r].manual_seed(view_seed(cfg.seed, r, step))
            views.append(two_view_augment(images, cfg.data.image_size, cfg.aug, gens[r], splits.mean, splits.std))
        if chunks == 1:
            views = [(torch.cat([v[0] for v in views]), torch.cat([v[1] for v in views]))]
        losses = []
        for v1, v2 in views:
            p1, _ = online(v1)
            p2, _ = online(v2)
            with torch.no_grad():
                z1, z2 = target(v1), target(v2)
            losses.append(criterion(p1, z2) + criterion(p2, z1))
        optimizer.zero_grad()
        (sum(losses) / len(losses)).backward()
        optimizer.step()
        update_momentum(nn.Sequential(online.backbone, online.projection), target,
                        cosine_schedule(step, total, cfg.byol.momentum_start, cfg.byol.momentum_end))
    return online, total


def test_two_task_ddp_job_matches_one_process_on_the_same_global_batch(tmp_path):
    """A 2-task DDP job (gloo on CPU, one CPU per task) against `reference_training` in this
    process with one thread: the online network's parameters agree within float tolerance.

    Compared after 2 steps: this tiny BYOL amplifies float rounding fast (1 vs 2 threads of the
    same single-process run differ by 1e-7 after 2 steps, 2e-5 after 3 and 6e-4 after 4), so a
    longer run would test chaos, not DDP. BatchNorm running statistics are not compared: each
    rank keeps its own (broadcast_buffers=False), so rank 0's follow its shard only. The naive reference
    (BatchNorm over the global batch) must differ by far more than the tolerance, so the test
    can tell per-rank BN from global BN, and a rank that trained alone from both.
    """
    from byol.train import Config
    from core.config import load_config

    root = tmp_path / "runs"
    manifest = submit(["submit", "byol", f"run_root={root}", "name=ddp", *TINY_BYOL, *SLURM,
                       "data.synthetic_size=80", "train.epochs=1", "train.batch_size=16", "train.warmup_epochs=0",
                       "eval.probe=false", "launch.tasks_per_node=2", "launch.mem_gb=6"])
    states = wait(manifest)
    assert_completed(manifest, states)
    job = manifest["jobs"][0]
    run_dir = Path(job["run_dir"])
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    rank1_log = Path(job["stderr"].replace("_0_log", "_1_log")).read_text()
    assert "byol: done" in log(job) and "byol: done" not in rank1_log  # rank 0 alone wrote and logged

    cfg = load_config(Config, run_dir / "config.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_rank, total = reference_training(cfg, 2, chunks=2)
        global_bn, _ = reference_training(cfg, 2, chunks=1)
    finally:
        torch.set_num_threads(threads)
    assert total == 2

    def max_diff(module):
        return max((state["online"][k] - p.detach()).abs().max().item() for k, p in module.named_parameters())

    assert max_diff(per_rank) < 1e-5, max_diff(per_rank)
    assert max_diff(global_bn) > 1e-4, max_diff(global_bn)
