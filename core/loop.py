"""The scaffolding every training stage shares, written once: a `Run` and its step generator.

A stage keeps what makes it that stage (its networks, its loss, its step body, its
end-of-stage evaluation) and drives this from its own `for` loop, as DINO's `main_dino.py`
drives `utils.py`:

    r = Run(cfg, STAGE)                        # run dir; r.done if finished already
    if r.done:
        return r.dir
    r.start()                                  # device, DDP, seed, data, config.yaml, W&B
    ...networks...
    optimizer = build_optimizer(cfg.train, params, r.base_lr())
    r.resume(online=online, optimizer=optimizer)   # strict, weights_only; step, history, W&B id
    for s in r.steps(optimizer, monitor=r.knn_monitor(backbone)):
        loss = ...                             # the stage's own step on s.images, s.generator
        r.record(loss, parts)                  # device tensors, read every LOG_EVERY steps
    if r.paused():                             # train.max_steps stopped it: resumable
        return r.dir
    return r.finish(backbone, spec, head, metrics)

What the generator does around each step: the learning rate from the one warmup-cosine
schedule, the step's batch (an epoch's permutation is a pure function of (seed, epoch)) and
its augmentation generator (reseeded from (seed, rank, step): no RNG state to checkpoint),
progress bar and W&B rows, the non-finite-loss stop, SIGTERM/SIGUSR2 (checkpoint, then
stop), `train.checkpoint_every_steps`, `train.max_steps`, epoch timing, the per-epoch history
and monitor, an atomic checkpoint.pt after every epoch, and a time budget (`train.budget_min`:
`_calibrate`). A resumed job redraws exactly the batches and views an uninterrupted one would,
so it ends with the same weights.

Nothing is called back but the monitor (at the kNN cadence) and `per_epoch`; no hooks, no class
hierarchy: a stage that needs something else writes it in its own loop body.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn as nn

from core import checkpoint as ckpt
from core import data as datalib
from core import engine
from core import rundir
from core.config import check_numbers, to_dict, to_yaml
from core.errors import UserError
from core.evaluate import evaluate_backbone
from core.optim import warmup_cosine
from core.track import Progress, Tracker, log_line

# A time budget (train.budget_min) is planned from at least CALIBRATION_STEPS timed steps (and
# CALIBRATION_S seconds of them), after WARM_STEPS untimed ones (compilation, cuDNN's autotuning,
# the first batches): their mean without the slowest TRIM of them (a 2-core machine shared with
# other jobs showed single steps at 2-3x the typical one; a median would also drop the slower step
# that starts each epoch, and short epochs then overran by 6%). PLAN_MARGIN of what is left stays
# unplanned.
WARM_STEPS, CALIBRATION_STEPS, CALIBRATION_S, TRIM, PLAN_MARGIN = 3, 10, 2.0, 0.1, 0.03
# Steps between reads of the recorded losses (one host sync each: the CPU stops queueing work
# until the device catches up) and between W&B rows.
LOG_EVERY = 10


def view_seed(seed: int, rank: int, step: int) -> int:
    """The augmentation seed of one step on one rank (resume needs no RNG state)."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


@dataclass
class Step:
    """One training step as the generator hands it to the stage."""

    index: int  # global step, 0-based, before this step's update
    epoch: int  # global epoch
    images: torch.Tensor  # uint8 [B, 3, S, S] on the device
    labels: torch.Tensor
    generator: torch.Generator  # seeded from (seed, rank, step): this step's augmentation
    lr: float


def write_metrics(run_dir: Path, metrics: dict, tracker: Tracker) -> None:
    """metrics.json (atomic) and the W&B summary of its numbers; closes the W&B run."""
    ckpt.write_json(Path(run_dir) / "metrics.json", metrics)
    tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.finish()


class Run:
    """One stage run: its artifact directory, device, data, checkpoint and tracker."""

    def __init__(self, cfg, stage: str, name: Optional[str] = None):
        self.cfg, self.stage = cfg, stage
        self.name = name or cfg.name
        self.dir = ckpt.artifact_dir(cfg.run_root, stage, self.name)
        finished = (self.dir / "model.pt").is_file() and (self.dir / "metrics.json").is_file()
        # The folder's config against this one (core/rundir.py): refused here, before any work, if
        # they differ, unless overwrite=true (start afresh) or resume=force (continue under this one).
        self.mode = rundir.check_config(self.dir, cfg, stage, finished)
        self.done = finished and self.mode == "same"
        if self.done:
            log_line(f"{stage}: {self.dir} is already finished with this config; nothing to do")
        path = self.dir / "checkpoint.pt"
        # The resumable state, when a previous job left one (read before the networks are
        # built: pruned widths and the QAT activation range come from it).
        self.state: Optional[dict] = (ckpt.safe_load(path) if path.is_file() and not self.done
                                      and self.mode != "overwrite" else None)
        self.step = self.state["step"] if self.state else 0
        self.history: List[dict] = list(self.state["history"]) if self.state else []
        self.extra: Dict[str, object] = {}  # plain data every checkpoint carries (prune's spec, ...)
        self.objects: Dict[str, object] = {}  # name -> module/optimizer whose state_dict is saved
        self.epoch_seconds: List[float] = []
        self._pending: List[torch.Tensor] = []
        self._names: List[str] = []
        self._scalars: Dict[str, float] = {}
        self._epoch_sum, self._epoch_count = self.state["epoch_loss"] if self.state else (0.0, 0)
        self.last: Dict[str, float] = {}
        self.t0 = time.perf_counter()  # a time budget counts from here: setup is part of the stage
        self.budget_plan: Optional[dict] = self.state.get("plan") if self.state else None

    # ------------------------------------------------------------------ setup

    def start(self, train=None, batch_size: Optional[int] = None, epochs: Optional[int] = None,
              self_supervised: bool = False) -> None:
        """Device, distributed init, seeds, data (uint8 on the device), the plan, config.yaml, W&B.

        train: the training set when it is not the split's (finetune's labelled subset).
        self_supervised: a stage that ignores labels (byol) also trains on the dataset's
        unlabelled images where it has them (stl10's 100k, data.unlabeled).
        """
        cfg = self.cfg
        check_numbers(cfg)  # as load_config does: for configs built in code too
        self.device = engine.resolve_device(cfg.engine)
        self.dist = engine.init_distributed(self.device)
        if self.dist.is_main:  # a second writer stops here, before any work
            self.claim()
        # One seed on every rank: identical initial weights everywhere (DDP broadcasts only the
        # module it wraps); per-rank randomness comes from the views' (seed, rank, step).
        engine.seed_everything(cfg.seed, cfg.engine.deterministic)
        self.bf16 = engine.use_bf16(cfg.engine, self.device)
        self.splits = datalib.load_splits(cfg.data, self_supervised)
        train = self.splits.train if train is None else train
        if self.splits.unlabeled is not None and train is self.splits.train:
            train = datalib.with_unlabeled(train, self.splits.unlabeled)
            log_line(f"{self.stage}: training on {len(train)} images: {len(self.splits.train)} labelled + "
                     f"{len(self.splits.unlabeled)} unlabelled (data.unlabeled)")
        self.in_memory = isinstance(train, datalib.ImageSet)
        self.train_set = train.to(self.device) if self.in_memory else train
        self.batch_size = batch_size or cfg.train.batch_size  # per process
        self.steps_per_epoch = datalib.steps_per_epoch(len(self.train_set), self.batch_size, self.dist.world_size)
        self.plan(cfg.train.epochs if epochs is None else epochs)
        if self.budget_plan is not None:  # a resumed budgeted run keeps the plan it made
            self.plan(self.budget_plan["epochs"])
            self.extra["plan"] = self.budget_plan
        if self.dist.is_main:  # what a job killed mid-write left behind (nothing reads it)
            gone = ckpt.remove_interrupted_writes(self.dir, also=("calibration.pt",))
            if gone:
                log_line(f"{self.stage}: removed {len(gone)} unfinished write(s) of an interrupted job: {', '.join(gone)}")
        if self.state is None and self.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.dir / "config.yaml", to_yaml(cfg))
        elif self.state is not None and self.dist.is_main:
            log_line(f"{self.stage}: resumed {self.dir} at step {self.step}/{self.total_steps}")
        self.tracker = Tracker(cfg.track, self.dir, f"{self.stage}/{self.name}", to_dict(cfg),
                               self.state["wandb_id"] if self.state else None, enabled=self.dist.is_main,
                               rows=self.state.get("wandb_rows", []) if self.state else ())

    def claim(self) -> None:
        """Before the first write: this process's lock on the folder (a second writer fails at once),
        then what overwrite=true or resume=force asked for."""
        rundir.hold(self.dir)
        if self.mode == "overwrite":
            gone = rundir.clear(self.dir)
            log_line(f"{self.stage}: overwrite=true: deleted the previous run in {self.dir} ({', '.join(gone)})")
        elif self.mode == "force":
            diffs = rundir.describe(rundir.differences(self.dir, self.cfg))
            kept = rundir.keep_old_config(self.dir)
            ckpt.atomic_write_text(self.dir / "config.yaml", to_yaml(self.cfg))
            log_line(f"{self.stage}: resume=force: continuing {self.dir} at step {self.step} under this config "
                     f"({diffs}); the old one is kept as {kept.name}")

    def reload(self) -> dict:
        """Every rank reads checkpoint.pt as rank 0 just wrote it (a stage's step-0 or phase-start
        checkpoint): from there on the model comes from the file, for a fresh and a resumed job alike."""
        engine.barrier(self.dist)
        self.state = ckpt.safe_load(self.dir / "checkpoint.pt")
        self.step, self.history = self.state["step"], list(self.state["history"])
        return self.state

    def plan(self, epochs: int) -> None:
        self.epochs = epochs
        self.total_steps = epochs * self.steps_per_epoch

    def base_lr(self) -> float:
        """train.lr is per 256 images: scaled with the global batch (Goyal et al. 2017)."""
        return self.cfg.train.lr * self.batch_size * self.dist.world_size / 256

    def register(self, **objects) -> None:
        """What checkpoint.pt saves from now on (modules, optimizers: anything with a state_dict)."""
        self.objects.update(objects)

    def resume(self, **objects) -> None:
        """register(objects) and, when resuming, load each from checkpoint.pt strictly."""
        self.register(**objects)
        if self.state is None:
            return
        for name, obj in objects.items():
            if name not in self.state:
                raise RuntimeError(f"{self.dir / 'checkpoint.pt'} has no {name!r} state (written by another version?)")
            if isinstance(obj, nn.Module):
                obj.load_state_dict(self.state[name], strict=True)
            else:
                obj.load_state_dict(self.state[name])
        if "torch_rng" in self.state:
            torch.set_rng_state(self.state["torch_rng"])

    # ------------------------------------------------------------------ the loop

    def knn_due(self, done_epochs: int, last_epoch: Optional[int] = None) -> bool:
        """The kNN cadence every stage shares: every eval.knn_every_epochs, and the last epoch."""
        every = self.cfg.eval.knn_every_epochs
        return bool(every) and (done_epochs % every == 0 or done_epochs == (last_epoch or self.epochs))

    def knn_monitor(self, backbone: nn.Module) -> Callable[[], Dict[str, float]]:
        """The kNN monitor of `backbone` on the val split (features without augmentation)."""
        return lambda: {"knn_top1": evaluate_backbone(backbone, self.splits, self.cfg.eval, self.device, self.bf16,
                                                      probe=False)[0]["knn_top1"]}

    def batches(self, epoch: int, first: int = 0):
        """The uint8 batches of one epoch from batch `first` on (a pure function of seed and epoch)."""
        order = datalib.epoch_permutation(len(self.train_set), self.cfg.seed, epoch, self.dist.rank,
                                          self.dist.world_size)
        if self.in_memory:
            return datalib.in_memory_batches(self.train_set, order, self.batch_size, first)
        return datalib.jpeg_batches(self.train_set, order, self.batch_size, self.cfg.data.image_size, self.device,
                                    self.cfg.data.num_workers, first)

    def steps(self, optimizer, base_lr: Optional[float] = None, start: int = 0, end: Optional[int] = None,
              phase: str = "train", monitor: Optional[Callable[[], Dict[str, float]]] = None,
              per_epoch: Optional[Callable[[int], Dict[str, float]]] = None, log_prefix: Optional[str] = None,
              final_s: Optional[float] = None) -> Iterator[Step]:
        """The steps [start, end) of the run (default: from `start` to the last), from wherever it stands.

        Sets every param group's lr from one warmup-cosine schedule over [start, end)
        (train.warmup_epochs, lightly's `cosine_warmup_schedule`: the last step at 0). After each
        whole epoch: `monitor()` at the kNN cadence and `per_epoch(epochs done in this range)`
        every epoch (main rank only) may return values for the history, W&B (`val/...`) and the
        console. Stops at train.max_steps.

        With train.budget_min the range that ends the run (end=None) is planned first: a few
        calibration steps go through the stage's own loop body and are then undone (every
        registered state restored), and the number of epochs is fixed so that training, the
        monitors and the end of the stage (`final_s`, default: twice a monitor) fit the budget.
        The plan goes into checkpoint.pt: a resumed run keeps it, so it ends where an
        uninterrupted one with the same plan does (one without a budget, with train.epochs = the
        plan's epochs, too).
        """
        if end is None and self.cfg.train.budget_min > 0 and self.budget_plan is None:
            yield from self._calibrate(optimizer, base_lr, start, monitor, final_s)
        cfg = self.cfg
        end = self.total_steps if end is None else end
        base_lr = self.base_lr() if base_lr is None else base_lr
        stop_at = min(end, cfg.train.max_steps) if cfg.train.max_steps > 0 else end
        spe = self.steps_per_epoch
        warmup = min(int(cfg.train.warmup_epochs * spe), end - start)
        prefix = log_prefix or phase  # W&B names: train/loss, sparsity/loss, ...
        self._prefix = prefix
        progress = Progress(stop_at - start, self.step - start, desc=f"{self.stage} {self.name}"
                            + (f" {phase}" if phase != "train" else ""), enabled=cfg.engine.progress and self.dist.is_main)
        generator = torch.Generator(device=self.device)
        with engine.StopGuard() as guard:
            while self.step < stop_at:
                epoch, first = divmod(self.step, spe)
                epoch_start = time.perf_counter()
                for images, labels in self.batches(epoch, first):
                    # float(): a numpy scalar in param_groups would fail a weights_only load
                    lr = float(warmup_cosine(self.step - start, end - start, base_lr, warmup))
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    generator.manual_seed(view_seed(cfg.seed, self.dist.rank, self.step))
                    yield Step(self.step, epoch, images, labels, generator, lr)
                    self.step += 1

                    if self.step % LOG_EVERY == 0 or self.step == stop_at:
                        self._read_losses()
                        self.tracker.log({f"{prefix}/{k}": v for k, v in self.last.items()}
                                         | {f"{prefix}/lr": lr, f"{prefix}/images_per_s": progress.images_per_s}
                                         | {f"{prefix}/{k}": v for k, v in self._scalars.items()}, step=self.step)
                    shown = {"loss": self.last["loss"]} if "loss" in self.last else {}
                    progress.update(len(images) * self.dist.world_size, **shown, lr=lr, epoch=epoch)
                    # At an epoch's last step its end (history, monitor, W&B row) comes first: a
                    # checkpoint written before it would resume without that epoch's row.
                    epoch_end = self.step % spe == 0
                    if guard.stop_requested and not epoch_end:
                        self._stop(guard)
                    every = cfg.train.checkpoint_every_steps
                    if every and self.step % every == 0 and not epoch_end:
                        self.save()
                    if self.step == stop_at:
                        break
                self._read_losses()
                if self.step % spe == 0:  # a whole epoch ended here
                    if first == 0:  # a resumed partial epoch would understate the time
                        self.epoch_seconds.append(time.perf_counter() - epoch_start)
                    done = (self.step - start) // spe
                    values = {}
                    if self.dist.is_main:
                        values.update(per_epoch(done) if per_epoch is not None else {})
                        if monitor is not None and self.knn_due(done, (end - start) // spe):
                            values.update(monitor())
                    self._end_epoch(done, phase, values, progress)
                self.save()
                if guard.stop_requested:
                    self._stop(guard)
        progress.close()

    def _stop(self, guard: engine.StopGuard) -> None:
        """A signal asked the job to stop: checkpoint, let W&B write what it has, hand over."""
        self.save()
        self.tracker.finish()
        guard.stop()

    # ------------------------------------------------------------------ time budget

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _calibrate(self, optimizer, base_lr, start: int, monitor, final_s: Optional[float]) -> Iterator[Step]:
        """Time the stage's own step (CALIBRATION_STEPS after WARM_STEPS), one monitor and one
        checkpoint write, undo the steps, and fix the plan."""
        cfg, spe = self.cfg, self.steps_per_epoch
        saved = {name: copy.deepcopy(obj.state_dict()) for name, obj in self.objects.items()}
        rng = torch.get_rng_state()
        base_lr = self.base_lr() if base_lr is None else base_lr
        generator = torch.Generator(device=self.device)
        times = [time.perf_counter()]
        step = start
        self.plan(10**6)  # provisional, for schedules that read the plan (BYOL's momentum): these steps are undone

        def enough() -> bool:
            return len(times) > WARM_STEPS + CALIBRATION_STEPS and times[-1] - times[WARM_STEPS] >= CALIBRATION_S

        while not enough():
            epoch, first = divmod(step, spe)
            for images, labels in self.batches(epoch, first):
                for group in optimizer.param_groups:  # any lr: these steps are undone
                    group["lr"] = base_lr
                generator.manual_seed(view_seed(cfg.seed, self.dist.rank, step))
                yield Step(step, epoch, images, labels, generator, base_lr)
                self._sync()
                times.append(time.perf_counter())
                step += 1
                if enough():
                    break
        self._read_losses()  # a non-finite loss here stops the run before it starts
        timed = np.sort(np.diff(times[WARM_STEPS:]))
        step_s = float(np.mean(timed[:len(timed) - max(1, int(TRIM * len(timed)))]))
        # A checkpoint as large as the run's (the optimizer's state exists only after a step: the
        # step-0 checkpoint is half the size with SGD momentum), written where resume never reads;
        # the fastest of three writes (single writes of a new file took up to 3x the typical one here).
        save_s = 0.0
        if self.dist.is_main:
            scratch, writes = self.dir / "calibration.pt", []
            for _ in range(3):
                t = time.perf_counter()
                ckpt.atomic_save(self._checkpoint(), scratch)
                writes.append(time.perf_counter() - t)
            scratch.unlink()
            save_s = min(writes)
        monitor_s = 0.0  # timed even without a cadence: the final evaluation is about two of them
        if monitor is not None and self.dist.is_main:
            t = time.perf_counter()
            monitor()
            monitor_s = time.perf_counter() - t
        for name, obj in self.objects.items():  # undo the calibration steps
            obj.load_state_dict(saved[name])
        torch.set_rng_state(rng)
        self._pending.clear()
        self._epoch_sum, self._epoch_count, self.last = 0.0, 0, {}
        self.step = start
        fresh = self.state is None
        self.save()  # a resumable step 0
        final_s = 2 * monitor_s if final_s is None else final_s
        left = (cfg.train.budget_min * 60 - (time.perf_counter() - self.t0) - final_s) * (1 - PLAN_MARGIN)
        epoch_s = step_s * spe + save_s
        every = cfg.eval.knn_every_epochs

        def cost(epochs: int) -> float:
            monitors = sum(1 for d in range(1, epochs + 1) if every and (d % every == 0 or d == epochs))
            return epochs * epoch_s + (monitors * monitor_s if monitor is not None else 0.0)

        epochs = 0
        while cost(epochs + 1) <= left:
            epochs += 1
        if self.dist.world_size > 1:  # one plan for every rank: rank 0's
            box = [epochs]
            torch.distributed.broadcast_object_list(box, src=0)
            epochs = box[0]
        done_before = start // spe  # prune: the sparsity epochs, already spent
        if epochs < 1:
            if fresh and self.dist.is_main:  # nothing of this run is left behind
                (self.dir / "checkpoint.pt").unlink(missing_ok=True)
            raise UserError(f"train.budget_min={cfg.train.budget_min:g} is too small for one epoch of {self.stage}: "
                            f"{left:.0f} s are left for training after setup and calibration, one epoch takes "
                            f"{cost(1):.0f} s (a step {step_s * 1000:.0f} ms x {spe}, checkpoint {save_s:.1f} s, "
                            f"kNN monitor {monitor_s:.1f} s); raise train.budget_min")
        self.budget_plan = {"budget_min": cfg.train.budget_min, "epochs": done_before + epochs,
                            "planned_epochs": epochs, "seconds_per_step": step_s, "seconds_per_epoch": epoch_s,
                            "monitor_s": monitor_s, "checkpoint_s": save_s, "final_s": final_s,
                            "images_per_s": self.batch_size * self.dist.world_size / step_s,
                            "setup_s": time.perf_counter() - self.t0, "calibration_steps": len(times) - 1}
        self.plan(done_before + epochs)
        self.extra["plan"] = self.budget_plan
        if self.dist.is_main:
            log_line(f"{self.stage}: budget {cfg.train.budget_min:g} min -> {epochs} epochs of {spe} steps "
                     f"({step_s * 1000:.1f} ms a step, {self.budget_plan['images_per_s']:,.0f} img/s; "
                     f"{epochs * epoch_s:.0f} s training, {cost(epochs) - epochs * epoch_s:.0f} s monitors, "
                     f"{final_s:.0f} s final evaluation, {self.budget_plan['setup_s']:.0f} s spent before)")
        self.save()

    def record(self, loss: torch.Tensor, parts: Optional[Dict[str, torch.Tensor]] = None, **scalars: float) -> None:
        """This step's loss and its parts, as device tensors: read back every LOG_EVERY steps in
        one host sync, never one per step. `scalars` (plain numbers, e.g. BYOL's momentum) go to W&B."""
        parts = parts or {}
        self._names = ["loss", *parts]
        self._pending.append(torch.stack([loss.detach().float().reshape(()),
                                          *(v.detach().float().reshape(()) for v in parts.values())]))
        self._scalars = scalars

    def _read_losses(self) -> None:
        """Read the pending losses; stop at once on a non-finite one (DINO-style): the last
        checkpoint was written before any of these steps and stays good."""
        if not self._pending:
            return
        rows = torch.stack(self._pending).tolist()
        self._pending.clear()
        for i, row in enumerate(rows):
            if not math.isfinite(row[0]):
                raise SystemExit(f"{self.stage}: loss is {row[0]} at step {self.step - len(rows) + i + 1}; stopping "
                                 f"(last good checkpoint: {self.dir / 'checkpoint.pt'})")
            self._epoch_sum, self._epoch_count = self._epoch_sum + row[0], self._epoch_count + 1
        self.last = dict(zip(self._names, rows[-1]))

    def _end_epoch(self, done: int, phase: str, values: Dict[str, float], progress: Progress) -> None:
        entry = {"epoch": done, "step": self.step, "loss": self._epoch_sum / max(1, self._epoch_count)}
        if phase != "train":
            entry["phase"] = phase
        entry.update(values)
        self.history.append(entry)
        self.tracker.log({f"{self._prefix}/epoch_loss": entry["loss"], "epoch": self.step // self.steps_per_epoch,
                          **{f"val/{k}": v for k, v in values.items()}}, step=self.step)
        progress.write(f"{self.stage}{' ' + phase if phase != 'train' else ''} epoch {done}: loss {entry['loss']:.4f}"
                       + "".join(f"  {k} {v:.4f}" for k, v in values.items()))
        self._epoch_sum, self._epoch_count = 0.0, 0

    # ------------------------------------------------------------------ checkpoint, end

    def save(self) -> None:
        """checkpoint.pt (atomic): the registered objects' states, step, history, W&B id, extras."""
        self._read_losses()  # never save weights a non-finite loss has touched
        if not self.dist.is_main:
            return
        ckpt.atomic_save(self._checkpoint(), self.dir / "checkpoint.pt")

    def _checkpoint(self) -> dict:
        return {
            **self.extra, **{name: obj.state_dict() for name, obj in self.objects.items()},
            "step": self.step, "history": self.history, "wandb_id": self.tracker.id, "wandb_rows": self.tracker.rows,
            "epoch_loss": [self._epoch_sum, self._epoch_count], "torch_rng": torch.get_rng_state(),
        }

    def paused(self, end: Optional[int] = None) -> bool:
        """True (and the job ends resumable) when train.max_steps stopped it: before `end` (default:
        the last step), or at `end` when that is where max_steps falls (nothing after it runs)."""
        end = self.total_steps if end is None else end
        max_steps = self.cfg.train.max_steps
        if self.step >= end and not (0 < max_steps <= self.step < self.total_steps):
            return False
        self.tracker.finish()
        rundir.release(self.dir)
        log_line(f"{self.stage}: stopped at step {self.step}/{self.total_steps} (train.max_steps); rerun to continue")
        return True

    def common_metrics(self) -> dict:
        """What every stage's metrics.json says about its training, under the same names."""
        return {"stage": self.stage, "epochs": self.epochs, "steps": self.total_steps,
                "seconds_per_epoch": float(np.mean(self.epoch_seconds)) if self.epoch_seconds else None,
                "final_loss": self.history[-1]["loss"] if self.history else None, "history": self.history,
                "budget_plan": self.budget_plan, "stage_seconds": time.perf_counter() - self.t0,
                **({"test_split": self.splits.test_name} if self.splits.test is not None else {})}

    def meta(self, parents=(), **extra) -> dict:
        """model.pt's meta: the data it was trained on, its preprocessing, its lineage."""
        s = self.splits
        return {"stage": self.stage, "name": self.name, "data": self.cfg.data.name, "num_classes": s.num_classes,
                "image_size": s.image_size, "mean": list(s.mean), "std": list(s.std),
                "parents": [str(p) for p in parents if p], **extra}

    def finish(self, backbone: Optional[nn.Module] = None, spec: Optional[dict] = None,
               head: Optional[nn.Linear] = None, metrics: Optional[dict] = None, parents=(),
               meta: Optional[dict] = None, summary: str = "") -> Path:
        """model.pt, metrics.json (the stage's metrics after the common ones), W&B summary.
        Ranks other than 0 call it with nothing: they only wait for rank 0."""
        if self.dist.is_main:
            ckpt.save_model(self.dir, backbone, spec, self.meta(parents, **(meta or {})), head)
            metrics = {**self.common_metrics(), "file_mb": (self.dir / "model.pt").stat().st_size / 2**20, **metrics}
            write_metrics(self.dir, metrics, self.tracker)
            shown = "".join(f"  {label} {metrics[key]:.4f}" for key, label in
                            (("knn_top1", "kNN top-1"), ("probe_top1", "probe top-1")) if metrics.get(key) is not None)
            log_line(f"{self.stage}: done -> {self.dir}{shown}{summary}")
        self.tracker.finish()
        rundir.release(self.dir)
        engine.barrier(self.dist)
        return self.dir
