"""Training runs: the run flags, the learning-rate schedule, the run directory and resuming,
and `run_training`, which runs a trainer inside the process group and turns its stops and
write failures into one line (the steps themselves: training_loop.py).

The trainers (training_vqgan.py, training_transformer.py, training_superres.py) run inside
`run_training` and share the rest: `Schedule` says how long and how fast, `RunDirectory` holds
the checkpoint, writes it atomically and checks a --resume against it.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

from cli import absolute_path, device_name, non_negative_int, output_folder, positive_float, \
    positive_int, same_flag, unit_fraction
from data import SPLIT_FLAGS
from distributed import setup_distributed
from utils import PRECISIONS, Interrupted, UserError, atomic_save, get_rng_state, \
    load_checkpoint, set_rng_state, stable_hash

# ----------------------------------------------------------------------------------------------
# Run flags and the learning-rate schedule
# ----------------------------------------------------------------------------------------------


def add_run_args(parser):
    """Flags both trainers share: where the run lives, how long, how fast, on what device. Each
    trainer sets its own defaults of --run-dir, --batch-size, --base-lr, --warmup-steps and
    --min-lr-ratio, and of default_max_steps (the length without --max-steps or --epochs), with
    parser.set_defaults."""
    group = parser.add_argument_group("run")
    group.add_argument("--run-dir", type=output_folder)
    group.add_argument("--resume", nargs="?", const="last", default=None,
                       help="continue a run: alone, from RUN_DIR's last checkpoint; or a path")
    group.add_argument("--overwrite", action="store_true",
                       help="start a new run in a --run-dir that holds one, deleting its "
                            "checkpoints, metrics and grids as the new run's first step starts "
                            "(its token or pair cache is reused)")
    group.add_argument("--device", type=device_name, default="auto",
                       help="auto, cpu, cuda, cuda:1, mps")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--batch-size", type=positive_int)
    group.add_argument("--grad-accum", type=positive_int, default=1,
                       help="micro-batches per optimizer step")
    group.add_argument("--lr", type=positive_float, default=None,
                       help="learning rate; default: --base-lr x effective batch size")
    group.add_argument("--base-lr", type=positive_float)
    group.add_argument("--warmup-steps", type=non_negative_int,
                       help="linear learning-rate warm-up over this many steps")
    group.add_argument("--min-lr-ratio", type=unit_fraction,
                       help="after the warm-up the learning rate follows a cosine down to this "
                            "fraction of its peak at the last step; 1 keeps it constant")
    group.add_argument("--max-steps", type=positive_int, default=None,
                       help="total optimizer steps of the run, a resumed run continuing to it "
                            "(default: the trainer's own, printed when it starts, or --epochs "
                            "when given)")
    group.add_argument("--epochs", type=positive_int, default=None,
                       help="total epochs, when --max-steps is not given")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="autocast dtype: auto is bf16 on GPUs with native bf16 (compute "
                            "capability 8.0+), fp16 with a GradScaler on older GPUs, bf16 on "
                            "CPUs with AMX (stage 2: AVX512-BF16), fp32 on other CPUs")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory format for the convolutions (default: on with CUDA "
                            "and x86 CPUs)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--ema-decay", type=unit_fraction, default=0.0,
                       help="keep an exponential moving average of the weights with this decay "
                            "per step, for validation, grids and the inference weights (0: off; "
                            "stage 2: 0.995, or what a resumed run was trained with)")
    group.add_argument("--log-every", type=positive_int, default=50)
    group.add_argument("--save-every", type=positive_int, default=500)
    group.add_argument("--sample-every", type=positive_int, default=500)
    return group


# Flags that decide which batches a run sees: a resumed run must keep them.
DATA_ORDER_FLAGS = SPLIT_FLAGS + ("flip", "seed", "batch_size", "grad_accum")


# The data flags that decide what a run's split holds; evaluate.py takes the scored run's own (a
# transformer's, else a --superres model's) where its command line gives none (take_run_data_flags).
RUN_DATA_FLAGS = tuple(flag for flag in SPLIT_FLAGS if flag != "image_size") + ("part_labels",)
NOT_GIVEN = object()


def defer_data_flags(parser):
    """Make RUN_DATA_FLAGS default to NOT_GIVEN in `parser` (data.add_data_args' flags) ->
    their defaults there, for take_run_data_flags."""
    defaults = {flag: parser.get_default(flag) for flag in RUN_DATA_FLAGS}
    parser.set_defaults(**dict.fromkeys(RUN_DATA_FLAGS, NOT_GIVEN))
    return defaults


def take_run_data_flags(args, trained_args, defaults):
    """The RUN_DATA_FLAGS of `args` that were not given: the run's (`trained_args`, its
    checkpoint's flags), so that its held-out split is the one scored, else `defaults`. Given
    ones that differ from the run's get a warning: that split may hold its training images."""
    given = {k: value for k in RUN_DATA_FLAGS if (value := getattr(args, k)) is not NOT_GIVEN}
    vars(args).update({k: trained_args.get(k, defaults[k]) for k in RUN_DATA_FLAGS}, **given)
    changed = [k for k in given if k in trained_args
               and not same_flag(k, trained_args[k], given[k])]
    if changed:
        details = ", ".join(f"--{k.replace('_', '-')} {trained_args[k]!r}" for k in changed)
        print(f"warning: the model was trained with {details}; with other data settings the "
              "evaluated split may hold its training images", file=sys.stderr)


# Flags a resumed run may change unwarned (where it runs, logs, writes), and those that a trainer
# takes from the run's own when not given (stage 2's EMA, condition dropout; stage 3's LPIPS start)
UNCHECKED_FLAGS = ("resume", "overwrite", "run_dir", "device", "max_steps", "epochs",
                   "log_every", "save_every", "sample_every", "num_workers", "lpips_weights",
                   "grid_examples", "default_max_steps")
FROM_THE_RUN = ("ema_decay", "condition_dropout", "perceptual_start")
# A stage-2 or stage-3 config's content hash of a frozen model -> the flag naming its file
FROZEN_FLAGS = {"vqgan_sha256": "vqgan_checkpoint", "condition_vqgan_sha256": "condition_vqgan"}


def plain_args(args):
    """argparse namespace -> dict of plain values (loads with weights_only=True), the
    cli.PATH_FLAGS absolute."""
    return {k: (list(v) if isinstance(v, tuple) else absolute_path(k, v))
            for k, v in vars(args).items()}


def learning_rate(flags, world_size=1):
    """The peak learning rate the run flags give: --lr, else --base-lr x the global batch."""
    return flags.lr if flags.lr is not None else (
        flags.base_lr * flags.batch_size * flags.grad_accum * world_size)


def scheduled_lr(step, peak, warmup, total, min_ratio):
    """Linear warm-up to `peak`, then a cosine down to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Schedule:
    """How long a run trains and how fast: `total` optimizer steps, the learning rate warming up
    linearly to `peak` over `warmup_steps`, then a cosine down to min_lr_ratio x peak."""

    peak: float
    total: int
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    length: str = ""  # how the flags set `total`, for messages: '--max-steps 5', '12 steps'

    @classmethod
    def from_flags(cls, flags, batches_per_epoch, world_size=1):
        """The schedule of add_run_args' flags: --max-steps, else --epochs worth of optimizer
        steps, else the trainer's default_max_steps."""
        if flags.max_steps is not None:
            total = flags.max_steps
        elif flags.epochs is not None:
            total = flags.epochs * batches_per_epoch // flags.grad_accum
            if total == 0 and not flags.resume:
                raise UserError(f"--epochs {flags.epochs} makes no optimizer step of --grad-accum "
                                f"{flags.grad_accum} micro-batches; raise one or lower the other")
        else:
            total = flags.default_max_steps
        length = f"--max-steps {total}" if flags.max_steps is not None else f"{total} steps"
        return cls(learning_rate(flags, world_size), total, flags.warmup_steps,
                   flags.min_lr_ratio, length)

    def apply(self, optimizers, step):
        """Set every optimizer's learning rate to the schedule's at `step`; returns it."""
        lr = scheduled_lr(step, self.peak, self.warmup_steps, self.total, self.min_lr_ratio)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        return lr


# ----------------------------------------------------------------------------------------------
# The run directory: checkpoints, resume, metrics
# ----------------------------------------------------------------------------------------------


class RunDirectory:
    """A run's folder: its training checkpoint (atomic), and checks before resuming it.

    Opened when a run starts, before the data is read, with the run's `flags` (plain_args):
    a folder that already holds a run is refused unless the run resumes or overwrites it
    (--resume, --overwrite), and a --resume whose checkpoint was trained on other data or by
    another number of processes is refused (check_resume) before any data is encoded; the
    folder, or the one it will be made in, must take a file (a read-only or full one stops the
    run before any training); it is made by the run's first file (`path`), so that a refused
    command leaves none. Rank 0 (`is_main`) deletes the .tmp-*.pt files of killed writes.
    """

    def __init__(self, root, kind, last_name, flags, world_size=1, is_main=True, frozen=None):
        self.root, self.kind, self.last_name = root, kind, last_name
        resume = flags.get("resume")
        if not (resume or flags.get("overwrite")) and os.path.exists(os.path.join(root, last_name)):
            raise UserError(f"{root} already holds a run ({last_name}): pass --resume to "
                            "continue it, --overwrite to replace it, or another --run-dir")
        if resume:
            self.check_resume(resume, flags, world_size, frozen)
        writable = os.path.abspath(root)
        while not os.path.exists(writable):  # the folder the run's first file will be made in
            writable = os.path.dirname(writable)
        try:
            tempfile.TemporaryFile(dir=writable).close()
        except OSError as error:
            raise UserError(f"cannot write into the run directory {root} ({error.strerror}); "
                            "choose another --run-dir, or fix its permissions or free space"
                            ) from None
        if is_main:
            self.remove_stale_temporaries()
        self.replaces_run = is_main and bool(flags.get("overwrite")) and not resume

    def remove_stale_temporaries(self):
        stale = [os.path.join(folder, name) for folder, _, names in os.walk(self.root)
                 for name in names if name.startswith(".tmp-") and name.endswith(".pt")]
        if stale:
            size = sum(os.path.getsize(path) for path in stale)
            for path in stale:
                os.remove(path)
            print(f"removed {len(stale)} temporary file(s) ({size / 1e6:.3g} MB) that an "
                  f"interrupted write left in {self.root}")

    def remove_previous_run(self):
        """--overwrite, as the new run's first step starts (TrainingLoop; a command refused
        before then leaves the old run whole): the checkpoints, curves and grids of the run it
        replaces (MetricsLog restarts its metrics), so that none outlives the new run."""
        if not self.replaces_run:
            return
        for name in (self.last_name, self.last_name.replace("_last", ""), "loss_curves.png",
                     "samples"):
            path = os.path.join(self.root, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    def path(self, *parts):
        path = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def save(self, checkpoint):
        path = self.path(self.last_name)
        try:
            atomic_save(checkpoint, path)
        except OSError as error:  # e.g. disk full: a write to a file handle names no file
            error.filename = error.filename or path
            raise

    def resume_path(self, resume):
        """The checkpoint --resume names: alone ("last"), this folder's training checkpoint."""
        return self.path(self.last_name) if resume == "last" else resume

    def trained_flags(self, resume):
        """The flags (plain_args) of the checkpoint --resume names, {} without --resume or
        checkpoint: what a resumed run keeps where a default changed since it was trained."""
        path = self.resume_path(resume) if resume else None
        return load_checkpoint(path, self.kind)["args"] if path and os.path.exists(path) else {}

    def steps_left(self, step, schedule, resume):
        """Whether the loop has a step to take. A resumed run already at the end of `schedule`
        says so in one line (False); one past its end is a UserError."""
        if step < schedule.total:
            return True
        checkpoint = self.resume_path(resume)
        if step == schedule.total:
            print(f"nothing to train: {checkpoint} is already at step {step}, the end of this "
                  f"run ({schedule.length}); pass a larger --max-steps to train on")
            return False
        raise UserError(f"{checkpoint} is already at step {step}, past the end of this run "
                        f"({schedule.length}); pass --max-steps above {step} to train on, or a "
                        "new --run-dir to start over")

    def cached(self, folder, prefix, key, names, build):
        """What the frozen VQGAN made of both splits (stage 2's tokens, stage 3's pairs), from
        RUN/folder/ when this very `key` was seen before, else build() -> {"train", "val"},
        saved atomically. `key` holds everything the contents depend on: "vqgan_sha256", the
        settings, and "files" (the datasets' fingerprints). The file is named by the VQGAN and
        the settings, so that a cache of edited files is replaced, not kept beside it; `names`
        ({split: the examples' names}) must match the cached splits' "paths" too."""
        settings = stable_hash(json.dumps({k: v for k, v in key.items() if k != "files"},
                                          sort_keys=True))
        path = self.path(folder, f"{prefix}-{key['vqgan_sha256'][:12]}-{settings:08x}.pt")
        if os.path.exists(path):  # still valid only if the folder holds the same, unedited files
            cache = torch.load(path, map_location="cpu", weights_only=True)
            if cache.get("key") == key and all(cache[s]["paths"] == names[s] for s in names):
                return cache
        cache = {"key": key, **build()}
        atomic_save(cache, path)
        return cache

    def report_outputs(self, stage, described):
        """Print the run's outputs that exist; `described` is [(file name, description)]."""
        present = [text for name, text in described
                   if os.path.exists(os.path.join(self.root, name))]
        print(f"{stage} outputs in {self.root}: {', '.join(present)}")

    def check_resume(self, resume, flags, world_size, frozen=None):
        """Refuse a --resume checkpoint of another stage, data order (DATA_ORDER_FLAGS of the
        run's `flags`; paths as the folders they name), process count or frozen model (`frozen`:
        FROZEN_FLAGS field -> the given file's hash, so that no cache is built behind another);
        warn about the other training flags that differ (the run goes on with the new ones)."""
        path = self.resume_path(resume)
        if resume == "last" and not os.path.exists(path):
            raise UserError(f"--resume: no checkpoint {path} yet; start without --resume")
        checkpoint = load_checkpoint(path, self.kind)
        saved = checkpoint["args"]
        changed = [k for k in DATA_ORDER_FLAGS if not same_flag(k, saved.get(k), flags.get(k))]
        if changed:
            details = ", ".join(f"--{k.replace('_', '-')} was {saved.get(k)!r}" for k in changed)
            raise UserError(f"--resume: {path} was trained with other data settings ({details}); "
                            "an exact resume needs the same ones")
        saved_world_size = checkpoint.get("world_size", 1)
        if saved_world_size != world_size:  # the global batch, so the data order and default lr
            raise UserError(f"--resume: {path} was trained by {saved_world_size} process(es), "
                            f"this run has {world_size}; an exact resume needs the same number "
                            f"(torchrun --nproc_per_node {saved_world_size})")
        behind = [FROZEN_FLAGS[k] for k, sha in (frozen or {}).items()
                  if checkpoint["config"].get(k, sha) != sha]
        if behind:
            files = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in behind)
            raise UserError(f"--resume: {path} was trained behind other frozen models than the "
                            f"files given (their contents differ); resume it with its own: {files}")
        retuned = [k for k in sorted(set(saved) & set(flags)) if k not in UNCHECKED_FLAGS
                   and k not in DATA_ORDER_FLAGS and not (k in FROM_THE_RUN and flags[k] is None)
                   and not same_flag(k, saved[k], flags[k])]
        if retuned:
            print("warning: --resume goes on with other training flags than the run's own: "
                  + ", ".join(f"--{k.replace('_', '-')} {flags[k]!r} (was {saved[k]!r})"
                              for k in retuned), file=sys.stderr)

    def resume(self, resume, config, flags, world_size, **states):
        """Load the checkpoint --resume names into `states` (name -> model, optimizer or
        GradScaler: the checkpoint's entry of that name) and the RNG -> its step; refuse one of
        another model (config) or weight average (data order, processes: check_resume)."""
        path = self.resume_path(resume)
        checkpoint = load_checkpoint(path, self.kind)
        if checkpoint["config"] != config:
            changed = sorted(k for k in set(config) | set(checkpoint["config"])
                             if config.get(k) != checkpoint["config"].get(k))
            raise UserError(f"--resume: {path} holds a model with another architecture "
                            f"(differs in: {', '.join(changed)}); use the flags it was trained "
                            "with, or a new --run-dir")
        saved = checkpoint["args"]
        if saved.get("ema_decay", 0.0) != flags.get("ema_decay", 0.0):  # "ema" in states or not
            raise UserError(f"--resume: {path} was trained with --ema-decay "
                            f"{saved.get('ema_decay', 0.0):g}; an exact resume needs the same")
        for name, state in states.items():
            if name != "scaler" or checkpoint.get(name):  # no or empty scaler: a run without fp16
                state.load_state_dict(checkpoint[name])
        set_rng_state(checkpoint["rng"])
        return checkpoint["step"]

    def save_state(self, step, config, flags, world_size, states, **extra):
        """Write the training checkpoint atomically: `states` (name -> anything with a
        state_dict) and the RNG, for resume(); `extra` plain values for sample.py and others."""
        self.save({"kind": self.kind, "step": step, "config": config, "args": flags,
                   "world_size": world_size, "rng": get_rng_state(),
                   **{name: state.state_dict() for name, state in states.items()}, **extra})

def run_training(train, args):
    """train(args, dist, device) inside the process group when torchrun started us.

    train returns the step at which Ctrl-C stopped it (after saving), or None. A stopped run
    raises Interrupted once every rank has left the loop, so that the command exits with 130.
    An OSError while writing the run's files (disk full, permissions) becomes one line."""
    dist, device = setup_distributed(args.device)
    try:
        stopped_at = train(args, dist, device)
        dist.barrier()  # no rank leaves the group while rank 0 still writes its last files
    except OSError as error:
        raise write_failure(error, args.run_dir) from None
    finally:
        dist.close()
    if stopped_at is not None:
        raise Interrupted(f"stopped at step {stopped_at}; continue with the same command plus "
                          "--resume" if dist.is_main else "")


def write_failure(error, run_dir):
    """The UserError for an OSError while a run writes: the file, why, and what is intact."""
    if error.filename and not os.path.abspath(error.filename).startswith(
            os.path.abspath(run_dir) + os.sep):  # not one of the run's files
        return UserError(f"{error.filename}: {error.strerror or error}")
    checkpoints = (sorted(name for name in os.listdir(run_dir) if name.endswith("_last.pt"))
                   if os.path.isdir(run_dir) else [])
    kept = (f"the last good checkpoint {os.path.join(run_dir, checkpoints[0])} is intact: "
            "free space (or fix the permissions) and continue with --resume" if checkpoints
            else "no checkpoint was written yet: free space (or fix the permissions) and rerun")
    return UserError(f"cannot write {error.filename or 'into ' + run_dir} "
                     f"({error.strerror or error}); {kept}")

