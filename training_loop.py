"""The bookkeeping around every optimizer step of the trainers: the weight average, the
metrics log, the NaN and Ctrl-C guards, and `TrainingLoop`, which says after each step what is
due (log, validate, sample, save), so that each trainer shows only its own step.
"""
import json
import os
import signal
import sys
import time
from typing import NamedTuple

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from utils import UserError, read_jsonl


def weight_average(model, decay):
    """--ema-decay: an exponential moving average of `model`'s parameters (torch's
    AveragedModel), which validation, grids and the inference weights use; None at decay 0.
    It starts as the weights at its first update_parameters; each later optimizer step makes it
    d x average + (1 - d) x weights with d = min(decay, (1 + n) / (10 + n)) after n updates
    (TensorFlow's ExponentialMovingAverage with num_updates), so that a short run averages its
    last steps, not its first. Its buffers are copies of the model's at creation. Its
    state_dict is saved as "ema" (utils.averaged_weights reads the weights back out)."""
    if not decay:
        return None

    def update(averaged, current, n):  # n: a tensor on their device, so no sync with a GPU
        weight = 1 - ((1 + n) / (10 + n)).clamp(max=decay)
        for average, weights in zip(averaged, current):
            average.lerp_(weights, weight.to(average.dtype))
    return AveragedModel(model, multi_avg_fn=update)


class MetricsLog:
    """Appends one JSON object per call to RUN/metrics.jsonl; truncates lines past a resume step."""

    def __init__(self, path, resume_step=None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            kept = [line for line in read_jsonl(path) if line.get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(line) + "\n" for line in kept)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class FiniteCheck:
    """Collects loss values on the device; check() syncs once and stops the run on NaN/inf."""

    def __init__(self):
        self.bad = None

    def add(self, loss):
        flag = ~torch.isfinite(loss.detach())
        self.bad = flag if self.bad is None else self.bad | flag

    def check(self, step, checkpoint_path, dist=None):
        bad = self.bad is not None and bool(self.bad)
        if dist is not None:  # every rank stops together, or none does
            bad = dist.any(bad)
        if bad:
            last = (f"the last good checkpoint {checkpoint_path} is intact"
                    if os.path.exists(checkpoint_path) else "no checkpoint was written yet")
            raise UserError(f"the loss became NaN or infinite by step {step}; nothing was saved "
                            f"after it and {last}; lower --lr (or check the data) and --resume")


class StopRequest:
    """Ctrl-C asks the loop to stop after the current step and save; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def should_stop(self, dist, at_sync_point):
        """One process stops as soon as asked; several agree at sync points (the log steps),
        so that no rank waits forever in a collective the others left."""
        if not dist.enabled:
            return self.requested
        return at_sync_point and dist.any(self.requested)

    def restore(self):
        signal.signal(signal.SIGINT, self._previous)


class Due(NamedTuple):
    """What is due after a step: log on every rank; validate, sample and save on rank 0 only."""

    log: bool
    validate: bool
    sample: bool
    save: bool


class TrainingLoop:
    """The bookkeeping around both trainers' optimizer steps: progress bar, metrics log, NaN
    check (`health`), Ctrl-C, and what is due after each step (`end_step`):

        with TrainingLoop(run, dist, step, total, ...) as loop:
            while loop.running():
                ...one optimizer step; loop.health.add(loss)...
                due = loop.end_step()
                if due.log: loop.log({...}, images_per_s=count)   # every rank
                if due.validate / due.sample / due.save: ...         # rank 0
        return loop.stopped_at

    The ranks log every --log-every steps, at the last one and where Ctrl-C stops the run (which
    several ranks agree on at the log steps), so that the logged windows cover every step; rank 0
    validates at each epoch's end, samples every --sample-every and saves every --save-every
    steps, all three at the last step too, and saves when stopped. Nothing is logged or saved
    past a NaN.
    """

    def __init__(self, run, dist, step, total, steps_per_epoch, log_every, save_every,
                 sample_every, resumed, desc):
        self.run, self.dist, self.step, self.total = run, dist, step, total
        self.steps_per_epoch = steps_per_epoch
        self.log_every, self.save_every, self.sample_every = log_every, save_every, sample_every
        run.remove_previous_run()  # --overwrite: only now that every check has passed
        self.metrics = (MetricsLog(run.path("metrics.jsonl"), step if resumed else None)
                        if dist.is_main else None)
        self.desc, self.stopping = desc, False

    def __enter__(self):
        self.health, self.stop = FiniteCheck(), StopRequest()
        self.progress = tqdm(total=self.total, initial=self.step, desc=self.desc,
                             dynamic_ncols=True, disable=not self.dist.is_main)
        self.window_seconds = 0.0  # the time spent in the steps since the last log
        return self

    def __exit__(self, *error):  # also on errors (NaN, a second Ctrl-C): callers get Ctrl-C back
        self.progress.close()
        self.stop.restore()

    def running(self):
        self.step_start = time.perf_counter()
        return self.step < self.total and not self.stopping

    def end_step(self):
        """Count the step just taken -> what is due after it."""
        self.step += 1
        self.progress.update(1)
        last, main = self.step == self.total, self.dist.is_main
        log = self.step % self.log_every == 0 or last
        save = self.step % self.save_every == 0 or last
        self.stopping = self.stop.should_stop(self.dist, log)
        log = log or self.stopping  # a stopped run logs its last, partial window too
        if log or save or self.stopping:  # never log or save past a NaN
            self.health.check(self.step, self.run.path(self.run.last_name), self.dist)
        # after the check's sync with the device; what is due after the step is not counted
        self.window_seconds += time.perf_counter() - self.step_start
        return Due(log, main and (self.step % self.steps_per_epoch == 0 or last),
                   main and (self.step % self.sample_every == 0 or last),
                   main and (save or self.stopping))

    def log(self, values, postfix=None, **counts):
        """Rank 0 writes `values` at this step, with each of `counts` per second of the steps
        since the last log (e.g. images_per_s=...: validation, grids and saves between steps
        are not counted), and shows `postfix` on the progress bar."""
        if self.dist.is_main:
            self.write({**values, **{name: count / self.window_seconds
                                     for name, count in counts.items()}})
            self.progress.set_postfix(postfix or {})
        self.window_seconds = 0.0

    def write(self, values):
        """One line of metrics.jsonl at this step (rank 0)."""
        self.metrics.write({"step": self.step, **values})

    def records(self):
        """Everything logged so far, for the loss curves."""
        return read_jsonl(self.metrics.path) if os.path.exists(self.metrics.path) else []

    @property
    def stopped_at(self):
        """The step at which Ctrl-C stopped the run (after saving), else None."""
        return self.step if self.stopping else None

