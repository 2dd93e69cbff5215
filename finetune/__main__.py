import sys

from core.cli import stage_main
from finetune.train import STAGE, Config, run

sys.exit(stage_main(STAGE, Config, run))
