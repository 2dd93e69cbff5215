"""The README points at things that exist: every file path it names, every `python -m` module,
every `bench/gpu.sh` step. A renamed config or script breaks this test, not a newcomer's first
command."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TOP = ("configs", "bench", "scripts", "tests", "core", "byol", "distill", "prune", "quant", "launch", "probe",
       "finetune")


def readme_paths():
    """Repository paths in the README: a top-level folder, then a file name with an extension."""
    pattern = r"(?<![\w./-])((?:%s)/[\w./-]*\w\.(?:py|yaml|sh|md|toml))" % "|".join(TOP)
    return sorted(set(re.findall(pattern, README)))


def gpu_sh_steps():
    text = (REPO / "bench" / "gpu.sh").read_text()
    case = text[text.index('case "$step" in'):]
    return set(re.findall(r"^\s+([\w-]+)\)", case, flags=re.M))


def test_every_path_in_the_readme_exists():
    paths = readme_paths()
    assert len(paths) > 20, paths  # the pattern still finds the README's paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"README names files that do not exist: {missing}"


def test_every_python_module_in_the_readme_runs_as_a_module():
    modules = set(re.findall(r"python -m ([\w.]+)", README)) - {"pytest", "pip", "zipfile"}
    assert {"byol", "probe", "distill", "prune", "quant", "launch"} <= modules
    missing = [m for m in modules if not (REPO / m.replace(".", "/") / "__main__.py").exists()]
    assert not missing, f"README runs modules without a __main__.py: {missing}"


def test_every_gpu_sh_step_in_the_readme_is_one_gpu_sh_knows():
    steps = gpu_sh_steps()
    assert {"setup", "c10", "throughput-r18", "learn-a"} <= steps
    named = set()
    for call in re.findall(r"bash bench/gpu\.sh ([\w -]+)", README):
        named |= set(call.split())
    # The tables whose header names the script (`bash bench/gpu.sh ...`): their rows name the steps.
    tables = re.findall(r"(?:^\|.*\|\n)+", README, flags=re.M)
    gpu_rows = "".join(t.split("\n", 2)[2] for t in tables if "gpu.sh" in t.split("\n", 1)[0])
    for cell in re.findall(r"^\|[^|\n]+\|[^|\n]+\| (`[^|\n]+`[^|\n]*)\|$", gpu_rows, flags=re.M):
        named |= set(re.findall(r"[\w-]+", " ".join(re.findall(r"`([^`]+)`", cell))))
    named -= {"then", "until", "done"}
    assert {"draw", "draw-speed", "imagefolder224", "tests-gpu"} <= named  # the table's steps were read
    unknown = sorted(named - steps)
    assert not unknown, f"README names gpu.sh steps that gpu.sh does not have: {unknown}"


def readme_commands(after: str):
    """The command lines of the first ```bash block after the README line that contains `after`."""
    start = README.index("```bash\n", README.index(after)) + len("```bash\n")
    block = README[start:README.index("```", start)]
    return [line.split(" #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


# What makes each command short here; the commands themselves are the README's.
SHORT = {"byol": ["train.epochs=1"], "probe": ["eval.probe_epochs=5"], "distill": ["train.epochs=1"],
         "prune": ["train.epochs=1"], "quant": ["train.epochs=1"]}


def test_the_readme_stage_chain_runs_as_written(tmp_path):
    """The compression stages' block, command by command, against a temporary run root at reduced
    epochs: each artifact a command names is one an earlier command wrote (the block once named
    runs/probe/byol-quickstart, a folder the probe never writes)."""
    import shlex

    from tests.conftest import run_cli

    commands = readme_commands("Each takes the artifact directory of the stage before it")
    stages = [shlex.split(c)[2] for c in commands]
    assert stages == ["byol", "probe", "distill", "prune", "quant"], commands
    runs = tmp_path / "runs"
    for command, stage in zip(commands, stages):
        args = [re.sub(r"=runs/", f"={runs}/", a) for a in shlex.split(command)[3:]]
        res = run_cli(["-m", stage, *args, f"run_root={runs}", "engine.progress=false", "track.mode=disabled",
                       *SHORT[stage]], timeout=900)
        assert res.returncode == 0, f"{command}\n{res.stderr[-2000:]}"
    assert (runs / "quant" / "quickstart" / "model_int8.pt2").is_file()
