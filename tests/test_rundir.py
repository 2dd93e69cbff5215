"""A run folder belongs to one config and one process (core/rundir.py): a rerun with another
config is refused with nothing changed, overwrite=true and resume=force do what they say, a
second writer fails at once with the holder's PID, a SIGKILL leaves no lock, and launch refuses
the same conflicts in its plan before anything is submitted."""

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from core.errors import UserError
from launch.cli import main
from tests.conftest import ROOT, TINY_BYOL
from tests.test_loop import assert_same_state, config, states, tiny_stage


def hashes(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted tiny runs, lr 0.5 (the default) and lr 0.2."""
    root = tmp_path_factory.mktemp("rundir") / "runs"
    return tiny_stage(config(root, "name=ref")), tiny_stage(config(root, "name=lr02", "train.lr=0.2"))


def test_a_finished_run_with_another_config_is_refused_and_left_as_it_was(reference, tmp_path, capsys):
    root = tmp_path / "runs"
    done = tiny_stage(config(root, "name=x"))
    before = hashes(done)
    with pytest.raises(UserError) as e:
        tiny_stage(config(root, "name=x", "train.lr=0.2", "seed=3"))
    message = str(e.value)
    assert "holds a finished run of another config" in message and "\n" not in message
    assert "train.lr: 0.5 -> 0.2" in message and "seed: 0 -> 3" in message
    assert "name=NEW" in message and "overwrite=true" in message
    assert hashes(done) == before
    # What cannot change the result may change: still "nothing to do", nothing written.
    capsys.readouterr()
    tiny_stage(config(root, "name=x", "engine.progress=true", "train.max_steps=2", "train.checkpoint_every_steps=1",
                      "eval.knn_every_epochs=3", "launch.cluster=slurm", "track.project=other", f"run_root={root}"))
    assert "already finished with this config; nothing to do" in capsys.readouterr().err
    assert hashes(done) == before


def test_a_half_finished_run_with_another_config_is_refused_and_left_as_it_was(tmp_path):
    root = tmp_path / "runs"
    part = tiny_stage(config(root, "name=x", "train.max_steps=5"))
    before = hashes(part)
    with pytest.raises(UserError, match=r"holds an unfinished run of another config \(train.lr: 0.5 -> 0.2\).*"
                                        r"resume=force"):
        tiny_stage(config(root, "name=x", "train.lr=0.2"))
    assert hashes(part) == before


def test_overwrite_starts_afresh_and_resume_force_continues_under_the_new_config(reference, tmp_path, capsys):
    ref, lr02 = reference
    root = tmp_path / "runs"
    tiny_stage(config(root, "name=x"))
    again = tiny_stage(config(root, "name=x", "train.lr=0.2", "overwrite=true"))
    assert "overwrite=true: deleted the previous run" in capsys.readouterr().err
    assert_same_state(states(lr02), states(again))  # as if the first run had never been
    assert yaml.safe_load((again / "config.yaml").read_text())["train"]["lr"] == 0.2

    with pytest.raises(UserError, match="holds a finished run, so resume=force has nothing to continue"):
        tiny_stage(config(root, "name=x", "train.lr=0.3", "resume=force"))
    tiny_stage(config(root, "name=y", "train.max_steps=5"))
    forced = tiny_stage(config(root, "name=y", "train.lr=0.2", "resume=force"))
    err = capsys.readouterr().err
    assert "resume=force: continuing" in err and "at step 5" in err and "train.lr: 0.5 -> 0.2" in err
    assert yaml.safe_load((forced / "config.yaml").read_text())["train"]["lr"] == 0.2
    assert yaml.safe_load((forced / "config.1.yaml").read_text())["train"]["lr"] == 0.5
    assert states(forced)["step"] == 12 and (forced / "model.pt").is_file()


def stage_process(root, name, pause_s):
    """The tiny stage in its own process; a UserError is its one line on stderr, exit code 2."""
    code = (f"import sys\nfrom core.errors import UserError\nfrom tests.test_loop import tiny_stage, config\n"
            f"try:\n    tiny_stage(config({str(root)!r}, 'name={name}'), pause_s={pause_s})\n"
            f"except UserError as e:\n    print('error:', e, file=sys.stderr); sys.exit(2)\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_writer_fails_at_once_while_the_first_finishes_untouched(reference, tmp_path):
    ref, _ = reference
    root = tmp_path / "runs"
    first = stage_process(root, "x", pause_s=0.8)  # 12 steps: about 10 s of training
    run_dir = root / "tiny" / "x"
    wait_for(lambda: (run_dir / "checkpoint.pt").is_file() or first.poll() is not None, "the first job's checkpoint")
    t = time.monotonic()
    second = stage_process(root, "x", pause_s=0.0)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert f"is in use by PID {first.pid} on " in err and err.count("\n") == 1, err
    assert first.poll() is None, "the first job ended before the second tried: make it longer"
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert_same_state(states(ref), states(run_dir))  # untouched by the second
    assert time.monotonic() - t < 60


def test_a_killed_writer_leaves_no_lock(reference, tmp_path):
    ref, _ = reference
    root = tmp_path / "runs"
    job = stage_process(root, "x", pause_s=0.4)
    run_dir = root / "tiny" / "x"
    wait_for(lambda: (run_dir / "checkpoint.pt").is_file() or job.poll() is not None, "the job's checkpoint")
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    assert f"PID {job.pid}" in (run_dir / ".lock").read_text()  # it held the lock when it died
    tiny_stage(config(root, "name=x"))  # takes the lock, resumes and finishes
    assert_same_state(states(ref), states(run_dir))


# ----------------------------------------------------------------------------- launch plans


def test_launch_refuses_a_plan_whose_folders_hold_other_configs_before_submitting(tmp_path, capsys):
    root = tmp_path / "runs"
    tiny = [*TINY_BYOL, "train.epochs=1", "eval.probe_epochs=1", f"run_root={root}", "launch.cluster=debug"]
    assert main(["submit", "byol", *tiny, "name=a"]) == 0
    records = sorted((root / "launch").iterdir())
    capsys.readouterr()
    code = main(["submit", "byol", *tiny, "name=a", "train.lr=0.2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"1 planned run folder(s) hold another config: {root}/byol/a (train.lr: 0.05 -> 0.2)" in err
    assert sorted((root / "launch").iterdir()) == records  # no launch record: nothing went out
    assert main(["submit", "byol", *tiny, "name=a", "train.lr=0.2", "overwrite=true"]) == 0


def test_a_sweep_whose_variants_would_share_a_folder_is_refused_at_planning(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"stage": "byol", "config": str(ROOT / "configs/quickstart.yaml"),
                                    "grid": {"data.root": ["data/a", "data_a"]}}))
    code = main(["sweep", str(grid), f"run_root={tmp_path}/runs", "launch.cluster=debug", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "data.root=data/a and data.root=data_a both name the variant 'rootdata_a'" in err
    assert "would share a folder" in err
    assert not (tmp_path / "runs").exists()


def test_two_planned_runs_in_one_folder_are_refused():
    from launch.jobs import Planned, check_run_dirs, resolve

    cfg = resolve("byol", str(ROOT / "configs/quickstart.yaml"), ["run_root=/tmp/never-written"])
    with pytest.raises(UserError, match="two runs of the plan would share /tmp/never-written/byol/quickstart"):
        check_run_dirs([Planned("byol", cfg, variant="a"), Planned("byol", cfg, variant="b")])
