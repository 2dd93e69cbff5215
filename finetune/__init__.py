"""Fine-tuning evaluation stage: `python -m finetune CONFIG artifact=DIR [labels_fraction=0.1]`."""

from finetune.train import STAGE, Config, run

__all__ = ["STAGE", "Config", "run"]
