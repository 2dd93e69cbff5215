"""int8 QAT stage: `python -m quant CONFIG [key=value ...]`; `run(cfg) -> artifact dir`."""

from quant.train import STAGE, Config, run

__all__ = ["STAGE", "Config", "run"]
