"""Structured pruning stage: `python -m prune CONFIG [key=value ...]`; `run(cfg) -> artifact dir`."""

from prune.train import STAGE, Config, run

__all__ = ["STAGE", "Config", "run"]
