"""`python -m launch pipeline FILE [overrides]`: byol -> probe -> distill -> prune -> quant.

A pipeline file is `common:` (every stage) + `stages.<stage>:` (that stage only), the shape of
configs/quickstart.yaml. Stages run in the fixed order above; absent ones are skipped. Each
stage's inputs are wired to the artifact dirs of the earlier stages (the table
`launch.jobs.INPUTS`), whatever the file says: a value in the file (`teacher: runs/byol/r50`)
is used only when the stage it would come from is not in the pipeline, and then it must exist.

Named steps, for studies that need a stage twice or another order (configs/ablations/order.yaml):
when any section has a `stage:` key, every section is a step named by its key, the steps run in
the file's order, each run is named `<name>-<step>`, and nothing is wired automatically: an
input names an earlier step as `@step` (`student: "@byol18"`), a directory, or "" (none).

    stages:
      teacher: {stage: byol, model: {arch: resnet50}}
      byol18:  {stage: byol, model: {arch: resnet18}}
      pruned:  {stage: prune, student: "@byol18", teacher: "@teacher", recovery: ce}

A time budget: `budget_min=N` shares N minutes among the stages by each one's
`launch.budget_share` (they sum to 1): locally each stage gets its share of what is left when it
starts (stages that finish early leave more to the next), on SLURM its share of N; it becomes the
stage's `train.budget_min` (core/loop.py fits the epochs to it).

Overrides: `key=value` applies to every stage whose config has that key (like `common:`;
`train.max_steps=2` skips the probe, which does not train), `stages.<step>.key=value` to one
(like its section), e.g. `stages.byol.train.epochs=2 run_root=/scratch/runs`. A key that no
stage has is an error.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from core.config import read_yaml
from core.errors import UserError
from launch.jobs import INPUTS, STAGES, Planned, check_inputs, load_stage, resolve

SAFE_STEP = re.compile(r"^[A-Za-z0-9_-]+$")


def split_overrides(overrides: Sequence[str], stages: Sequence[str]) -> Tuple[List[str], Dict[str, List[str]]]:
    """`stages.<stage>.k=v` -> that stage; `common.k=v` and `k=v` -> every stage."""
    common: List[str] = []
    per_stage: Dict[str, List[str]] = {s: [] for s in stages}
    for item in overrides:
        key = item.split("=", 1)[0]
        if key.startswith("stages."):
            parts = item.split(".", 2)
            if len(parts) < 3 or parts[1] not in per_stage:
                raise UserError(f"override {item!r}: the pipeline has no stage {parts[1] if len(parts) > 1 else ''!r}; "
                                f"its stages: {', '.join(stages)}")
            per_stage[parts[1]].append(parts[2])
        else:
            common.append(item[len("common."):] if key.startswith("common.") else item)
    return common, per_stage


def applicable(overrides: Sequence[str], stage: str) -> List[str]:
    """The overrides whose top-level key `stage`'s config has."""
    keys = {f.name for f in dataclasses.fields(load_stage(stage).Config)}
    return [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in keys]


def _in_stage(step: str, fn, *args):
    """fn(*args), with a UserError naming the pipeline step it came from."""
    try:
        return fn(*args)
    except UserError as e:
        raise UserError(f"pipeline stage {step}: {e}") from None


def pipeline_steps(raw: DictConfig, path: str | Path) -> Tuple[List[Tuple[str, str]], bool]:
    """[(step, stage)] in run order, and whether the file uses named steps."""
    named = any(isinstance(sec, DictConfig) and "stage" in sec for sec in raw.stages.values())
    if not named:
        unknown = [s for s in raw.stages if s not in STAGES]
        if unknown:
            raise UserError(f"{path}: unknown stage(s) {', '.join(unknown)} under stages:; stages: "
                            f"{', '.join(STAGES)} (or named steps, each with a `stage:` key)")
        return [(s, s) for s in STAGES if s in raw.stages], False
    steps = []
    for step, sec in raw.stages.items():
        stage = sec.get("stage") if isinstance(sec, DictConfig) else None
        if stage not in STAGES:
            raise UserError(f"{path}: stages.{step} needs `stage:` (one of {', '.join(STAGES)}) in a pipeline "
                            f"of named steps; got {stage!r}")
        if not SAFE_STEP.match(str(step)):
            raise UserError(f"{path}: step name {step!r} may use only letters, digits and _ -")
        steps.append((str(step), str(stage)))
    return steps, True


def wire_references(stage: str, step: str, cfg, index: Dict[str, int], planned: List[Planned]) -> Tuple[List[str], List[int]]:
    """`field: "@step"` -> that earlier step's run dir (and a dependency on it)."""
    extra, after = [], []
    for inp in INPUTS[stage]:
        value = getattr(cfg, inp.field, None)
        if isinstance(value, str) and value.startswith("@"):
            ref = value[1:]
            if ref not in index:
                raise UserError(f"stages.{step}.{inp.field}={value}: no earlier step named {ref!r} "
                                f"(steps run in the file's order; earlier: {', '.join(index) or 'none'})")
            extra.append(f"{inp.field}={planned[index[ref]].run_dir}")
            after.append(index[ref])
    return extra, after


def split_budget(overrides: Sequence[str]) -> Tuple[Optional[float], List[str]]:
    """`budget_min=N` (minutes for the whole pipeline) out of the pipeline's overrides."""
    rest, budget = [], None
    for item in overrides:
        if item.split("=", 1)[0] == "budget_min":
            try:
                budget = float(item.split("=", 1)[1])
            except ValueError:
                raise UserError(f"bad value for 'budget_min': {item.split('=', 1)[1]!r}; expected minutes, "
                                f"e.g. budget_min=7.5") from None
            if not budget > 0:
                raise UserError(f"bad value for 'budget_min': {budget:g}; expected > 0 minutes")
        else:
            rest.append(item)
    return budget, rest


def check_shares(planned: Sequence[Planned], budget_min: float) -> None:
    """Before any work: the stages' launch.budget_share sum to 1, and every stage that trains has one."""
    shares = {p.variant or p.stage: p.cfg.launch.budget_share for p in planned}
    bad = [f"{k}={v:g}" for k, v in shares.items() if not 0 <= v <= 1]
    if bad:
        raise UserError(f"budget_min={budget_min:g}: launch.budget_share must lie in [0, 1]; got {', '.join(bad)}")
    unshared = [p.variant or p.stage for p in planned if hasattr(p.cfg, "train") and p.cfg.launch.budget_share == 0]
    if unshared:
        raise UserError(f"budget_min={budget_min:g}: stage(s) {', '.join(unshared)} train but have no "
                        f"launch.budget_share; give every training stage its share in the pipeline file")
    total = sum(shares.values())
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"budget_min={budget_min:g}: the stages' launch.budget_share sum to {total:g}, not 1 "
                        f"({', '.join(f'{k} {v:g}' for k, v in shares.items())})")


def stage_budget_min(left_s: float, shares: Sequence[float], index: int) -> float:
    """Minutes for stage `index` when `left_s` seconds of the pipeline's budget are left: its
    share of what is left, among itself and the stages after it."""
    rest = sum(shares[index:])
    return max(0.0, left_s) / 60 * (shares[index] / rest if rest > 0 else 0.0)


def plan_pipeline(path: str | Path, overrides: Sequence[str] = (), name_suffix: str = "") -> Tuple[str, List[Planned]]:
    """Resolve every stage's config (nothing is submitted yet); returns (pipeline name, jobs).

    name_suffix: appended to every run's name (a sweep's `-s<seed>`). `skip=byol,probe` among the
    overrides leaves those steps out: their inputs then come from the file or the command line
    (`teacher=runs/import/r50`: a teacher you already have)."""
    raw = read_yaml(path)
    if not isinstance(raw, DictConfig) or "stages" not in raw or not raw.stages:
        raise UserError(f"{path} is not a pipeline file: it needs `stages:` (and optionally `common:`), "
                        f"like configs/quickstart.yaml; for one stage use `python -m launch submit STAGE {path}`")
    steps, named = pipeline_steps(raw, path)
    skip = [o.split("=", 1)[1] for o in overrides if o.startswith("skip=")]
    overrides = [o for o in overrides if not o.startswith("skip=")]
    skipped = {s for value in skip for s in value.split(",") if s}
    unknown = skipped - {step for step, _ in steps}
    if unknown:
        raise UserError(f"skip={','.join(skip)}: {path} has no step(s) {', '.join(sorted(unknown))}; "
                        f"its steps: {', '.join(step for step, _ in steps)}")
    steps = [(step, stage) for step, stage in steps if step not in skipped]
    if not steps:
        raise UserError(f"skip={','.join(skip)} leaves no step of {path} to run")
    common, per_step = split_overrides(overrides, [step for step, _ in steps])

    first_step, first_stage = steps[0]
    unused = [o for o in common if not any(o in applicable([o], stage) for _, stage in steps)]
    if unused:  # no stage has this key: the first stage's config says so, with its valid keys
        _in_stage(first_step, resolve, first_stage, path, unused, first_step)
    first = _in_stage(first_step, resolve, first_stage, path, applicable(common, first_stage) + per_step[first_step],
                      first_step)
    name = first.name if first.name != "default" else Path(path).stem
    planned: List[Planned] = []
    index: Dict[str, int] = {}  # step -> its position in `planned`
    for step, stage in steps:
        base = applicable(common, stage) + per_step[step]
        if named:  # two steps of one stage must not share a run dir
            base.append(f"name={name}-{step}{name_suffix}")
        elif name_suffix:
            base.append(f"name={_in_stage(step, resolve, stage, path, base, step).name}{name_suffix}")
        cfg = _in_stage(step, resolve, stage, path, base, step)
        extra = [] if cfg.track.group else [f"track.group={name}"]  # W&B: one group per pipeline
        if named:
            wired, after = _in_stage(step, wire_references, stage, step, cfg, index, planned)
            extra += wired
        else:
            after = []
            for inp in INPUTS[stage]:
                source = next((s for s in inp.sources if s in index), None)
                if source is not None and hasattr(cfg, inp.field):
                    extra.append(f"{inp.field}={planned[index[source]].run_dir}")
                    after.append(index[source])
        cfg = _in_stage(step, resolve, stage, path, base + extra, step)
        _in_stage(step, check_inputs, stage, cfg, [p.run_dir for p in planned])
        index[step] = len(planned)
        planned.append(Planned(stage, cfg, overrides=base + extra, after=sorted(set(after)), variant=step))
    return name, planned
