"""Launch stages on SLURM (or locally) through submitit: submit, pipeline, sweep, status, collect.

    python -m launch submit byol configs/quickstart.yaml launch.cluster=slurm launch.partition=gpu
    python -m launch pipeline configs/quickstart.yaml          # byol -> probe -> distill -> prune -> quant
    python -m launch sweep configs/ablations/byol_momentum.yaml
    python -m launch status
    python -m launch collect runs --cost latency

Every job is `launch.jobs.StageJob`: it loads the resolved config and calls the stage's
`run(cfg)`, the same function `python -m <stage>` calls.
"""

from launch.jobs import STAGES, StageJob

__all__ = ["STAGES", "StageJob"]
