"""W&B tracking (offline by default) and the console progress bar.

wandb is imported only when tracking is on. The run id is kept in the stage's checkpoint,
so a resumed or requeued job continues the same W&B run; metrics are logged with the
stage's own step, because an offline resume restarts wandb's step counter at 0.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from core.config import TrackConfig


class Tracker:
    def __init__(self, cfg: TrackConfig, run_dir: Path, name: str, config: dict,
                 run_id: Optional[str] = None, enabled: bool = True):
        self.run = None
        self.id = run_id
        if cfg.mode == "disabled" or not enabled:
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity or None, group=cfg.group or None,
            tags=list(cfg.tags) or None, name=name, id=run_id, resume="allow", config=config,
            dir=str(run_dir), mode=cfg.mode, settings=wandb.Settings(console="off", silent=True),
        )
        self.id = self.run.id  # wandb's own new id, or run_id when resuming (wandb 0.31 has no util.generate_id)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class Progress:
    """A tqdm bar that shows loss, lr and images/s over the last few seconds."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                        dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0,
                        file=sys.stderr, leave=True)
        self.window_start, self.window_images = time.perf_counter(), 0
        self.images_per_s = 0.0

    def update(self, images: int, **values) -> None:
        self.window_images += images
        elapsed = time.perf_counter() - self.window_start
        if elapsed >= 2.0:
            self.images_per_s = self.window_images / elapsed
            self.window_start, self.window_images = time.perf_counter(), 0
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()}
        if self.images_per_s:
            shown["img/s"] = f"{self.images_per_s:,.0f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def write(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def log_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
