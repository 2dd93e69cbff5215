"""W&B tracking (offline by default) and the console progress bar.

wandb is imported only when tracking is on. The run id is kept in the stage's checkpoint,
so a resumed or requeued job continues the same W&B run; metrics are logged with the
stage's own step, because an offline resume restarts wandb's step counter at 0.

Every row logged is kept (`rows`) and goes into the stage's checkpoint. Slurm's SIGTERM on
`scontrol requeue` reaches wandb's writer process too (wandb-core), which exits at once and
drops what it had not yet written (it writes every 15 s; the last step's row is only sent
when the next step starts). So a resumed run reads back what W&B did write (its .wandb
files, which online runs keep too), logs again the checkpoint's rows past that step, and
skips the rows it replays that W&B already has: the W&B history is the uninterrupted run's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from core.config import TrackConfig


class Tracker:
    def __init__(self, cfg: TrackConfig, run_dir: Path, name: str, config: dict,
                 run_id: Optional[str] = None, enabled: bool = True, rows: Sequence = ()):
        self.run = None
        self.id = run_id
        self.rows: List[list] = [list(r) for r in rows]  # [step, metrics] of every row logged so far
        self.written = -1  # W&B already holds every row up to this step
        if cfg.mode == "disabled" or not enabled:
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb
        from core.wandb_reader import last_step

        if run_id is not None:  # read before init opens this attempt's file
            self.written = last_step(Path(run_dir) / "wandb", run_id)

        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity or None, group=cfg.group or None,
            tags=list(cfg.tags) or None, name=name, id=run_id, resume="allow", config=config,
            dir=str(run_dir), mode=cfg.mode, settings=wandb.Settings(console="off", silent=True),
        )
        self.id = self.run.id  # wandb's own new id, or run_id when resuming (wandb 0.31 has no util.generate_id)
        lost = [(step, metrics) for step, metrics in self.rows if step > self.written]
        for step, metrics in lost:
            self.run.log(metrics, step=step)
        if lost:
            log_line(f"{name}: logged again {len(lost)} W&B row(s) of steps {lost[0][0]}-{lost[-1][0]} "
                     f"that the interrupted job's W&B writer had not written")
        self.written = max([self.written] + [step for step, _ in lost])

    def log(self, metrics: dict, step: int) -> None:
        self.rows.append([step, {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}])
        if self.run is not None and step > self.written:  # a replayed step W&B has already
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
