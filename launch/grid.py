"""`python -m launch sweep GRID [overrides]`: an ablation as one job array.

A grid file (configs/ablations/*.yaml):

    name: byol-momentum          # optional; default: the file's stem. Runs are <name>-<variant>-s<seed>
    stage: byol                  # which stage every run is
    config: configs/quickstart.yaml   # its config (a stage file or a pipeline file); relative
                                      # paths are tried from the working dir, then the grid's dir
    seeds: [0, 1, 2]             # optional, default [0]: each seed is one run of each variant
    overrides: [train.epochs=20] # optional: applied to every run
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
Mistakes (unknown keys, empty axes, a variant whose config does not validate) fail before
anything is submitted. `<run_root>/sweeps/<name>/sweep.json` records each run's dir,
variant, seed and overrides.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from core import checkpoint as ckpt
from core.config import read_yaml
from core.errors import UserError
from launch.jobs import STAGES, Planned, check_inputs, resolve

KEYS = {"name", "stage", "config", "seeds", "overrides", "grid", "variants"}
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
            name = "-".join(f"{label}{_value(v)}" for label, v in zip(labels, combo))
            out[re.sub(r"[^A-Za-z0-9_.+-]", "_", name)] = [f"{k}={_value(v)}" for k, v in zip(grid, combo)]
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


def read_grid(path: str | Path) -> dict:
    raw = read_yaml(path)
    if not isinstance(raw, DictConfig):
        raise UserError(f"{path}: a grid file is a mapping with stage, config, seeds and grid or variants")
    spec = OmegaConf.to_container(raw, resolve=True)
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; a grid file has: {', '.join(sorted(KEYS))}")
    for key in ("stage", "config"):
        if not spec.get(key):
            raise UserError(f"{path}: missing `{key}:`")
    if spec["stage"] not in STAGES:
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
    return {**spec, "name": name, "config": str(config), "seeds": seeds, "overrides": overrides,
            "variants": variants_of(spec, str(path))}


def plan_sweep(path: str | Path, cli_overrides: Sequence[str] = ()) -> Tuple[dict, List[Planned]]:
    """Every run of the sweep, resolved and checked; returns (grid spec, jobs)."""
    spec = read_grid(path)
    stage, name = spec["stage"], spec["name"]
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
            planned.append(Planned(stage, cfg, overrides=var_overrides + run, variant=variant))
    launches = {str(p.cfg.launch) for p in planned}
    if len(launches) > 1:
        raise UserError(f"{path}: the runs of one array must share their launch.* settings")
    return spec, planned


def write_sweep_json(spec: dict, planned: Sequence[Planned], record: str = "") -> Path:
    """<run_root>/sweeps/<name>/sweep.json: what `collect` needs to group runs by variant."""
    path = Path(planned[0].cfg.run_root) / "sweeps" / spec["name"] / "sweep.json"
    ckpt.write_json(path, {
        "sweep": spec["name"], "stage": spec["stage"], "config": spec["config"], "seeds": spec["seeds"],
        "created": time.time(), "launch_record": record,
        "variants": spec["variants"],
        "runs": [{"name": p.cfg.name, "variant": p.variant, "seed": p.cfg.seed, "run_dir": str(p.run_dir),
                  "overrides": p.overrides} for p in planned],
    })
    return path

