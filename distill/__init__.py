"""Distillation stage: `python -m distill CONFIG [key=value ...]`; `run(cfg) -> artifact dir`."""

from distill.train import STAGE, Config, run

__all__ = ["STAGE", "Config", "run"]
