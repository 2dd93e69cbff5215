"""BYOL pretraining stage: `python -m byol CONFIG [key=value ...]`; `run(cfg) -> artifact dir`."""

from byol.train import STAGE, Config, run

__all__ = ["STAGE", "Config", "run"]
