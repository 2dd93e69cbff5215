"""`python -m launch sweep GRID [overrides]`: an ablation as one job array.

A grid file (configs/ablations/*.yaml):

    name: byol-momentum          # optional; default: the file's stem. Runs are <name>-<variant>-s<seed>
    stage: byol                  # which stage every run is
    config: configs/quickstart.yaml   # its config (a stage file or a pipeline file); relative
                                      # paths are tried from the working dir, then the grid's dir
    seeds: [0, 1, 2]             # optional, default [0]: each seed is one run of each variant
    overrides: [train.epochs=20] # optional: applied to every run
    compare: [a, b]              # pipeline sweeps only: the steps `collect` ranks against each other
    grid:                        # either a product of axes ...
      byol.momentum_start: [0.99, 0.996]
      train.lr: [0.1, 0.2]
    variants:                    # ... or named variants, each a dict of overrides
      baseline: {}
      no-stop-grad: {byol.stop_gradient: false}

`grid:` variants are named from their values (`momentum_start0.99-lr0.1`). Every run gets
`seed=S`, `name=<sweep>-<variant>-s<seed>` and `track.group=<sweep>`, so its W&B runs share a
group and `collect` can average the seeds of each variant. The precedence is: config file <
`overrides:` < command-line overrides < the variant's overrides < seed/name/group.
The array's Slurm settings (launch.*) are shared by all runs, so they cannot be swept.
On the command line, `seeds=[0,1,2]` and `config=FILE` replace the grid file's own (a quick
digits run of a CIFAR-10 study: configs/ablations/order.yaml's header).
Mistakes (unknown keys, empty axes, a variant whose config does not validate) fail before
anything is submitted. `<run_root>/sweeps/<name>/sweep.json` records each run's dir,
variant, seed and overrides.

A study that compares different chains of stages (distill then prune, against prune with no
teacher, ...) is a pipeline sweep: no `stage:`, `config:` a pipeline file (usually of named
steps, launch/pipeline.py), and `seeds:`/`overrides:` only. Every seed runs the whole pipeline
as chained jobs (afterok), its runs named `<sweep>-<step>-s<seed>`; each step is a variant, so
`collect` gives one row per step, averaged over seeds (configs/ablations/order.yaml).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf

from core import checkpoint as ckpt
from core.config import read_yaml
from core.errors import UserError
from launch.jobs import STAGES, Planned, check_inputs, resolve
from launch.pipeline import plan_pipeline

KEYS = {"name", "stage", "config", "seeds", "overrides", "grid", "variants", "compare"}
RESERVED = ("seed", "name", "track.group", "run_root")  # set per run by the sweep itself
SAFE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def _value(v: Any) -> str:
    """A YAML value as the right-hand side of a `key=value` override."""
    return v if isinstance(v, str) else json.dumps(v)


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_key(where: str, key: str) -> None:
    if key in RESERVED or key.startswith("launch."):
        raise UserError(f"{where}: '{key}' cannot be swept (the sweep sets seed, name, track.group and "
                        f"run_root per run, and one array shares its launch.* settings)")


def variants_of(spec: dict, path: str) -> Dict[str, List[str]]:
    """variant name -> its overrides, from `grid:` (a product) or `variants:` (listed)."""
    if ("grid" in spec) == ("variants" in spec):
        raise UserError(f"{path}: give exactly one of `grid:` (axes to combine) or `variants:` (named override sets)")
    if "grid" in spec:
        grid = spec["grid"]
        if not isinstance(grid, dict) or not grid:
            raise UserError(f"{path}: `grid:` must map each key to a list of values, e.g. train.lr: [0.1, 0.2]")
        for key, values in grid.items():
            _check_key(f"{path}: grid", key)
            if isinstance(values, dict):
                raise UserError(f"{path}: grid axis '{key}' is a dict; named sets of overrides go under "
                                f"`variants:` (grid: axis -> list of values)")
            if not isinstance(values, list) or not values:
                raise UserError(f"{path}: grid axis '{key}' must be a non-empty list of values; got {values!r}")
        shorts = [k.split(".")[-1] for k in grid]
        labels = shorts if len(set(shorts)) == len(shorts) else [k.replace(".", "_") for k in grid]
        out = {}
        for combo in itertools.product(*grid.values()):
            name = re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(f"{label}{_value(v)}" for label, v in zip(labels, combo)))
            overrides = [f"{k}={_value(v)}" for k, v in zip(grid, combo)]
            if name in out and out[name] != overrides:  # e.g. values a/b and a_b
                raise UserError(f"{path}: grid values {' '.join(out[name])} and {' '.join(overrides)} both name "
                                f"the variant '{name}', so their runs would share a folder; use `variants:` to name them")
            out[name] = overrides
        return out
    variants = spec["variants"]
    if not isinstance(variants, dict) or not variants:
        raise UserError(f"{path}: `variants:` must map each variant name to a dict of overrides")
    out = {}
    for name, overrides in variants.items():
        if not SAFE.match(str(name)):
            raise UserError(f"{path}: variant name {name!r} may use only letters, digits and . _ + -")
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise UserError(f"{path}: variant '{name}' must be a dict of overrides (key: value); got {overrides!r}")
        flat = _flatten(overrides)
        for key in flat:
            _check_key(f"{path}: variant '{name}'", key)
        out[str(name)] = [f"{k}={_value(v)}" for k, v in flat.items()]
    return out


SWEEP_KEYS = ("seeds", "config")  # command-line `seeds=[0,1,2]` / `config=FILE` replace the grid file's


def split_sweep_overrides(overrides: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
    """`seeds=[...]` and `config=...` from the command line are the sweep's; the rest go to every run."""
    sweep, runs = {}, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in SWEEP_KEYS:
            sweep[key] = yaml.safe_load(value) if key == "seeds" else value
        else:
            runs.append(item)
    return sweep, runs


def read_grid(path: str | Path, replace: Optional[Dict[str, Any]] = None) -> dict:
    raw = read_yaml(path)
    if not isinstance(raw, DictConfig):
        raise UserError(f"{path}: a grid file is a mapping with stage, config, seeds and grid or variants")
    spec = {**OmegaConf.to_container(raw, resolve=True), **(replace or {})}
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; a grid file has: {', '.join(sorted(KEYS))}")
    if not spec.get("config"):
        raise UserError(f"{path}: missing `config:`")
    if spec.get("stage") and spec["stage"] not in STAGES:
        raise UserError(f"{path}: unknown stage {spec['stage']!r}; stages: {', '.join(STAGES)}")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise UserError(f"{path}: `seeds:` must be a non-empty list of integers; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{path}: `seeds:` repeats a seed: {seeds}")
    overrides = spec.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{path}: `overrides:` must be a list of key=value strings")
    name = str(spec.get("name") or Path(path).stem)
    if not SAFE.match(name):
        raise UserError(f"{path}: sweep name {name!r} may use only letters, digits and . _ + -")
    config = Path(spec["config"])
    if not config.is_file() and (Path(path).parent / config).is_file():
        config = Path(path).parent / config
    if not config.is_file():
        raise UserError(f"{path}: config file not found: {spec['config']}")
    if not spec.get("stage"):  # a pipeline sweep: its steps are the variants
        raw = read_yaml(config)
        if not isinstance(raw, DictConfig) or "stages" not in raw:
            raise UserError(f"{path}: missing `stage:` (a one-stage sweep), or `config:` must be a pipeline "
                            f"file (a pipeline sweep); {config} is neither")
        if "grid" in spec or "variants" in spec:
            raise UserError(f"{path}: a pipeline sweep compares the pipeline's steps; `grid:`/`variants:` "
                            f"need `stage:` (one stage swept)")
        compare = spec.get("compare", [])
        if not isinstance(compare, list) or not all(isinstance(c, str) for c in compare):
            raise UserError(f"{path}: `compare:` must list step names, e.g. [distill_prune, prune_no_teacher]")
        unknown = [c for c in compare if c not in raw.stages]
        if unknown:
            raise UserError(f"{path}: compare: no step(s) {', '.join(unknown)} in {config}; "
                            f"its steps: {', '.join(raw.stages)}")
        return {**spec, "stage": "", "name": name, "config": str(config), "seeds": seeds, "overrides": overrides,
                "variants": {}, "compare": compare}
    if "compare" in spec:
        raise UserError(f"{path}: `compare:` lists a pipeline sweep's steps; a one-stage sweep compares "
                        f"all its variants")
    return {**spec, "name": name, "config": str(config), "seeds": seeds, "overrides": overrides,
            "variants": variants_of(spec, str(path))}


def plan_sweep(path: str | Path, cli_overrides: Sequence[str] = ()) -> Tuple[dict, List[Planned]]:
    """Every run of the sweep, resolved and checked; returns (grid spec, jobs)."""
    replace, cli_overrides = split_sweep_overrides(cli_overrides)
    spec = read_grid(path, replace)
    stage, name = spec["stage"], spec["name"]
    if not stage:
        return spec, plan_pipeline_sweep(spec, path, cli_overrides)
    planned = []
    for variant, var_overrides in spec["variants"].items():
        for seed in spec["seeds"]:
            run = [f"seed={seed}", f"name={name}-{variant}-s{seed}", f"track.group={name}"]
            overrides = list(spec["overrides"]) + list(cli_overrides) + var_overrides + run
            try:
                cfg = resolve(stage, spec["config"], overrides)
                check_inputs(stage, cfg)
            except UserError as e:
                raise UserError(f"{path}: variant '{variant}' seed {seed}: {e}") from None
            # recorded whole, in the order applied: the grid file's, the command line's, the variant's, the run's
            planned.append(Planned(stage, cfg, overrides=overrides, variant=variant))
    launches = {str(p.cfg.launch) for p in planned}  # one array shares them
    if len(launches) > 1:
        raise UserError(f"{path}: the runs of one array must share their launch.* settings")
    return spec, planned


def plan_pipeline_sweep(spec: dict, path: str | Path, cli_overrides: Sequence[str]) -> List[Planned]:
    """The whole pipeline once per seed, chained; fills spec["variants"] with its steps."""
    planned: List[Planned] = []
    for seed in spec["seeds"]:
        run = [f"seed={seed}", f"name={spec['name']}", f"track.group={spec['name']}"]
        try:
            _, jobs = plan_pipeline(spec["config"], list(spec["overrides"]) + list(cli_overrides) + run,
                                    name_suffix=f"-s{seed}")
        except UserError as e:
            raise UserError(f"{path}: seed {seed}: {e}") from None
        offset = len(planned)
        for job in jobs:
            job.after = [offset + i for i in job.after]
            spec["variants"].setdefault(job.variant, [f"stage={job.stage}"])
        planned += jobs
    return planned


def write_sweep_json(spec: dict, planned: Sequence[Planned], record: str = "") -> Path:
    """<run_root>/sweeps/<name>/sweep.json: what `collect` needs to group runs by variant."""
    path = Path(planned[0].cfg.run_root) / "sweeps" / spec["name"] / "sweep.json"
    ckpt.write_json(path, {
        "sweep": spec["name"], "stage": spec["stage"], "config": spec["config"], "seeds": spec["seeds"],
        "created": time.time(), "launch_record": record,
        "variants": spec["variants"], "compare": spec.get("compare", []),
        "runs": [{"name": p.cfg.name, "variant": p.variant, "seed": p.cfg.seed, "run_dir": str(p.run_dir),
                  "overrides": p.overrides} for p in planned],
    })
    return path

