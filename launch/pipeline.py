"""`python -m launch pipeline FILE [overrides]`: byol -> probe -> distill -> prune -> quant.

A pipeline file is `common:` (every stage) + `stages.<stage>:` (that stage only), the shape of
configs/quickstart.yaml. Stages run in the fixed order above; absent ones are skipped. Each
stage's inputs are wired to the artifact dirs of the earlier stages (the table
`launch.jobs.INPUTS`), whatever the file says: a value in the file (`teacher: runs/byol/r50`)
is used only when the stage it would come from is not in the pipeline, and then it must exist.

Overrides: `key=value` applies to every stage (like `common:`), `stages.<stage>.key=value` to
one stage (like its section), e.g. `stages.byol.train.epochs=2 run_root=/scratch/runs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from omegaconf import DictConfig

from core.config import read_yaml
from core.errors import UserError
from launch.jobs import INPUTS, STAGES, Planned, check_inputs, resolve


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


def _in_stage(stage: str, fn, *args):
    """fn(*args), with a UserError naming the pipeline stage it came from."""
    try:
        return fn(*args)
    except UserError as e:
        raise UserError(f"pipeline stage {stage}: {e}") from None


def plan_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> Tuple[str, List[Planned]]:
    """Resolve every stage's config (nothing is submitted yet); returns (pipeline name, jobs)."""
    raw = read_yaml(path)
    if not isinstance(raw, DictConfig) or "stages" not in raw or not raw.stages:
        raise UserError(f"{path} is not a pipeline file: it needs `stages:` (and optionally `common:`), "
                        f"like configs/quickstart.yaml; for one stage use `python -m launch submit STAGE {path}`")
    unknown = [s for s in raw.stages if s not in STAGES]
    if unknown:
        raise UserError(f"{path}: unknown stage(s) {', '.join(unknown)} under stages:; stages: {', '.join(STAGES)}")
    order = [s for s in STAGES if s in raw.stages]
    common, per_stage = split_overrides(overrides, order)

    first = _in_stage(order[0], resolve, order[0], path, common + per_stage[order[0]])
    name = first.name if first.name != "default" else Path(path).stem
    planned: List[Planned] = []
    index: Dict[str, int] = {}  # stage -> its position in `planned`
    for stage in order:
        base = common + per_stage[stage]
        cfg = _in_stage(stage, resolve, stage, path, base)
        extra = [] if cfg.track.group else [f"track.group={name}"]  # W&B: one group per pipeline
        after = []
        for inp in INPUTS[stage]:
            source = next((s for s in inp.sources if s in index), None)
            if source is not None and hasattr(cfg, inp.field):
                extra.append(f"{inp.field}={planned[index[source]].run_dir}")
                after.append(index[source])
        cfg = _in_stage(stage, resolve, stage, path, base + extra)
        _in_stage(stage, check_inputs, stage, cfg, [p.run_dir for p in planned])
        index[stage] = len(planned)
        planned.append(Planned(stage, cfg, overrides=base + extra, after=sorted(set(after))))
    return name, planned
