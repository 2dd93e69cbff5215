"""Linear-probe / kNN evaluation stage: `python -m probe CONFIG artifact=DIR`."""

from probe.train import STAGE, Config, run

__all__ = ["STAGE", "Config", "run"]
