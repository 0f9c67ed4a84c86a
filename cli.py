"""Command lines: the argument parser whose refusals are one line, and the argument types that
check each flag's value when it is parsed (sizes >= 1, finite rates, writable folders, ...).

Every script builds its parser from these, so a bad value stops the command at once with
`error: --batch-size must be >= 1, got 0` (exit status 2, see utils.run_cli) instead of a
traceback later in the run.
"""
import argparse
import math
import os
import re

import torch

from utils import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals are UserErrors, so that run_cli prints them as one line
    ('error: --batch-size must be >= 1, got 0', exit status 2) instead of usage and message."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse reads '-1e-3' as an option (it knows '-1' and '-0.5'), so '--lr -1e-3' would
        # be 'expected one argument' instead of the value's own message
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        prefix, separator, problem = message.partition(": ")
        if prefix.startswith("argument ") and problem.startswith("must"):  # our argument types
            raise UserError(f"{prefix[len('argument '):]} {problem}")
        raise UserError(f"{message} (see --help)")


# Argument types: each checks one kind of value when the command line is parsed, so a bad value
# stops the command at once with one line instead of a traceback later in the run.


def _number(text, kind, accepts, requirement):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not (math.isfinite(value) and accepts(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def positive_int(text):
    """Sizes, counts, steps, intervals: an integer >= 1."""
    return _number(text, int, lambda value: value >= 1, ">= 1")


def non_negative_int(text):
    """Where 0 means something (start at step 0, no warm-up, no workers): an integer >= 0."""
    return _number(text, int, lambda value: value >= 0, ">= 0")


def positive_float(text):
    """Learning rates, temperatures, thresholds: a finite number > 0."""
    return _number(text, float, lambda value: value > 0, "a finite number > 0")


def non_negative_float(text):
    """Loss weights, weight decay (0 switches the term off): a finite number >= 0."""
    return _number(text, float, lambda value: value >= 0, "a finite number >= 0")


def unit_fraction(text):
    """Fractions and probabilities: a number in [0, 1]."""
    return _number(text, float, lambda value: 0 <= value <= 1, "between 0 and 1")


def nucleus_mass(text):
    """top-p: a probability mass in (0, 1]."""
    return _number(text, float, lambda value: 0 < value <= 1, "in (0, 1]")


def sampling_scale(text):
    """Temperature and guidance: a number in [1e-3, 1e3] (beyond, the logits overflow to inf or
    vanish to nan in float32; a temperature of 1e-3 is already greedy)."""
    value = positive_float(text)
    if not 1e-3 <= value <= 1e3:
        raise argparse.ArgumentTypeError(f"must be between 0.001 and 1000, got {text}")
    return value


def comma_ints(text):
    """'1,2,2' -> (1, 2, 2); '' -> (); an argument type: each entry an integer >= 1."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = None
    if values is None or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, got {text!r}")
    return values


def device_name(text):
    """'auto', or a device this code runs on: cpu, cuda, cuda:N, mps (availability is checked
    by pick_device)."""
    try:
        known = text == "auto" or torch.device(text).type in ("cpu", "cuda", "mps")
    except (RuntimeError, ValueError):  # not a device string at all
        known = False
    if not known:
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def _unwritable_folder(path):
    """Why files cannot be written into folder `path` (existing or to be created), else None."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest existing folder decides
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return (f"{path} is a file" if existing == os.path.abspath(path)
                else f"{existing} in that path is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable (permission denied)"
    return None


def output_folder(text):
    """A folder to write into: existing, or creatable below a writable one (nothing is created
    here)."""
    problem = _unwritable_folder(text)
    if problem:
        raise argparse.ArgumentTypeError(f"must be a folder you can write to, but {problem}; "
                                         "choose another one")
    return text


def output_file(text):
    """A file to write: not a folder, in a folder that exists or can be created and written."""
    problem = (f"{text} is a folder" if os.path.isdir(text)
               else _unwritable_folder(os.path.dirname(text) or "."))
    if problem:
        raise argparse.ArgumentTypeError(f"must be a file you can write, but {problem}; "
                                         "choose another path")
    return text


# Flags that name files or folders: a run stores them absolute (runs.plain_args), so that
# sample.py and evaluate.py find its data from any folder, and compares them as the places
# they name
PATH_FLAGS = ("dataset_path", "coco_annotations", "part_labels", "vqgan_checkpoint",
              "condition_vqgan", "lpips_weights")


def absolute_path(flag, value):
    """A PATH_FLAGS value made absolute (a part labelling's name, not a .json file, stays)."""
    if flag in PATH_FLAGS and isinstance(value, str) and value and (
            flag != "part_labels" or value.endswith(".json")):
        return os.path.realpath(value)
    return value


def same_flag(flag, a, b):
    """Whether two values of a flag are the same (paths: the same place)."""
    return absolute_path(flag, a) == absolute_path(flag, b)
