import sys

from byol.train import STAGE, Config, run
from core.cli import stage_main

sys.exit(stage_main(STAGE, Config, run))
