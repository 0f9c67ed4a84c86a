"""Shared pieces of the VQGAN + pose-transformer pipeline.

Data flows one way: images -> this module's loader -> stage 1 (VQGAN) -> cached tokens
-> stage 2 (pose-conditioned GPT) -> samples. Everything that more than one script needs lives
here:

* pose layouts (COCO-17, OpenPose-18) and part labellings (mannequin, DensePose, your own JSON),
  with their left/right swaps;
* errors meant for people (`UserError`), the `run_cli` wrapper that prints them as one line, and
  the argument types every script's flags use, so that a bad value is refused when parsed;
* devices, precision (--precision: autocast dtype and GradScaler) and memory format, seeding, RNG
  state, atomic checkpoints and checkpoint loading with a kind check;
* metrics logging, loss-curve plots, image grids (always de-normalised from [-1, 1]) and skeleton
  drawing;
* the dataset: user folders with optional poses.json / part maps, COCO person-keypoint files,
  preprocessing, flips that swap left and right, a stable train/validation split;
* the command line entry `python utils.py synthetic ...` that writes the synthetic mannequins.
"""
import argparse
import collections
import colorsys
import contextlib
import json
import math
import os
import pickle
import random
import re
import secrets
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Pose layouts and part labels
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeypointLayout:
    """Names of the K joints in order, which pairs swap under a horizontal flip, bones to draw."""

    name: str
    joints: tuple
    flip_pairs: tuple  # ((left_index, right_index), ...)
    bones: tuple  # ((joint_a, joint_b), ...) for drawing

    @property
    def num_keypoints(self):
        return len(self.joints)

    def flip_permutation(self):
        """Index array p such that flipped[k] = original[p[k]] (left and right swapped)."""
        perm = list(range(self.num_keypoints))
        for left, right in self.flip_pairs:
            perm[left], perm[right] = right, left
        return perm


COCO17 = KeypointLayout(
    name="coco17",
    joints=("nose", "left_eye", "right_eye", "left_ear", "right_ear",
            "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
            "left_wrist", "right_wrist", "left_hip", "right_hip",
            "left_knee", "right_knee", "left_ankle", "right_ankle"),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    bones=((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
           (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4)),
)

# OpenPose's COCO-18 order: a neck joint is added and the order differs from COCO-17.
OPENPOSE18 = KeypointLayout(
    name="openpose18",
    joints=("nose", "neck", "right_shoulder", "right_elbow", "right_wrist",
            "left_shoulder", "left_elbow", "left_wrist", "right_hip", "right_knee",
            "right_ankle", "left_hip", "left_knee", "left_ankle",
            "right_eye", "left_eye", "right_ear", "left_ear"),
    flip_pairs=((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17)),
    bones=((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
           (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)),
)

LAYOUTS = {layout.name: layout for layout in (COCO17, OPENPOSE18)}
LAYOUT_BY_K = {layout.num_keypoints: layout for layout in (COCO17, OPENPOSE18)}


@dataclass(frozen=True)
class PartLabelling:
    """What the integer labels of a part map mean: labels 0 .. num_labels - 1 (0 background),
    and which pairs are the left and right of one body part, swapped under a horizontal flip."""

    name: str
    num_labels: int
    flip_pairs: tuple  # ((label, its mirror label), ...)

    def flip_lookup(self):
        """Table (256,) mapping each uint8 label to its mirror label (unpaired ones to
        themselves)."""
        table = np.arange(256, dtype=np.uint8)
        for left, right in self.flip_pairs:
            table[left], table[right] = right, left
        return table

    def to_dict(self):
        """Plain values for a checkpoint (loads with weights_only=True)."""
        return {"name": self.name, "num_labels": self.num_labels,
                "flip_pairs": [list(pair) for pair in self.flip_pairs]}


# The mannequins' labels (mannequins.py draws them): 0 is background; limbs are split into upper
# and lower segments.
PART_NAMES = ("background", "head", "torso",
              "left_upper_arm", "right_upper_arm", "left_lower_arm", "right_lower_arm",
              "left_upper_leg", "right_upper_leg", "left_lower_leg", "right_lower_leg")
NUM_PART_LABELS = len(PART_NAMES)
MANNEQUIN_PARTS = PartLabelling("mannequin", NUM_PART_LABELS,
                               ((3, 4), (5, 6), (7, 8), (9, 10)))

# DensePose's 24 body-part indices (its "I" channel; 0 is background): 1, 2 torso; 3 right hand,
# 4 left hand; 5 left foot, 6 right foot; 7 / 9 right upper leg back / front, 8 / 10 left; 11 / 13
# right lower leg back / front, 12 / 14 left; 15 / 17 left upper arm inside / outside, 16 / 18
# right; 19 / 21 left lower arm inside / outside, 20 / 22 right; 23 right head, 24 left head.
DENSEPOSE_PARTS = PartLabelling("densepose", 25, ((3, 4), (5, 6), (7, 8), (9, 10), (11, 12),
                                                  (13, 14), (15, 16), (17, 18), (19, 20),
                                                  (21, 22), (23, 24)))

PART_LABELLINGS = {labelling.name: labelling for labelling in (MANNEQUIN_PARTS, DENSEPOSE_PARTS)}


def resolve_part_labelling(value):
    """--part-labels: a named labelling, or a JSON file {"num_labels": N, "flip_pairs": [[left,
    right], ...]} of your own, checked: pairs of two different labels in 1 .. N - 1, none twice."""
    if value in PART_LABELLINGS:
        return PART_LABELLINGS[value]
    usage = ('{"num_labels": N, "flip_pairs": [[left, right], ...]} (labels 0 .. N - 1, 0 the '
             'background, N at most 256)')
    if not value.lower().endswith(".json"):
        raise UserError(f"--part-labels {value}: use one of {', '.join(PART_LABELLINGS)}, or a "
                        f".json file holding {usage}")
    spec = read_json(value)
    num_labels, pairs = (spec.get("num_labels"), spec.get("flip_pairs")) if isinstance(
        spec, dict) else (None, None)

    def is_label(n):
        return isinstance(n, int) and not isinstance(n, bool) and 0 < n < num_labels
    if (not isinstance(num_labels, int) or isinstance(num_labels, bool)
            or not 2 <= num_labels <= 256 or not isinstance(pairs, list)
            or set(spec) != {"num_labels", "flip_pairs"}):
        raise UserError(f"{value} must hold exactly {usage}")
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(map(is_label, pair))
                and pair[0] != pair[1]):
            raise UserError(f"{value}: flip pair {pair!r} must be two different labels in "
                            f"1 .. {num_labels - 1}")
    labels = [label for pair in pairs for label in pair]
    if len(set(labels)) < len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise UserError(f"{value}: label {twice} is in two flip pairs; each label has one mirror")
    return PartLabelling(value, num_labels, tuple(tuple(pair) for pair in pairs))


def part_labels_value(text):
    """The argument type of --part-labels: a named labelling, or a .json file of your own that
    resolve_part_labelling accepts (read and checked when parsed, before any data is read)."""
    if text in PART_LABELLINGS:
        return text
    if not text.lower().endswith(".json"):
        raise argparse.ArgumentTypeError(f"must be {', '.join(PART_LABELLINGS)} or a .json file "
                                         f"of your own labelling, got {text!r}")
    try:
        resolve_part_labelling(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(f"must be a labelling file this project reads, but "
                                         f"{error}") from None
    return text


# ----------------------------------------------------------------------------------------------
# Errors for people, the command-line wrapper that prints them, and argument types
# ----------------------------------------------------------------------------------------------


class UserError(Exception):
    """A problem with the user's input: printed as one line naming the file or value and the fix."""


class UnreadableImage(UserError):
    """An image file that cannot be decoded: skipped with a warning unless --strict."""


class Interrupted(Exception):
    """Ctrl-C stopped a training run after it saved its checkpoint; the message says what next."""


def run_cli(main):
    """Call main() as a command: a UserError becomes one 'error: ...' line on stderr and exit
    status 2; Ctrl-C exits with 130, the shell's convention, so that `stage1 && stage2` stops."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stopped:
        if str(stopped):
            print(stopped, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


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


def require_file(path, what, expected=""):
    """UserError unless `path` is a file: it is missing, or a folder (naming what it holds)."""
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path)
                        if name.endswith((".pt", ".pth", ".ckpt")))
        hint = f"; it holds {', '.join(inside[:5])}: pass one of those" if inside else ""
        raise UserError(f"{what} {path} is a folder, not a file{hint}{expected}")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist{expected}")


# ----------------------------------------------------------------------------------------------
# Devices, seeding and RNG state
# ----------------------------------------------------------------------------------------------


def pick_device(name="auto"):
    """'auto' picks CUDA, then Apple's MPS, then the CPU; any other name is taken as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available here; "
                        "use --device auto or --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise UserError(f"--device {name} was asked for but Apple's MPS is not available here; "
                        "use --device auto or --device cpu")
    return device


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name, device):
    """--precision -> 'fp32', 'bf16' or 'fp16' on `device`.

    auto: bf16 on a GPU that computes it natively (CUDA compute capability 8.0, Ampere, and
    later), fp16 with a GradScaler on older GPUs (torch.cuda.is_bf16_supported() also says yes
    there, where bf16 is emulated and slow), fp32 on the CPU and MPS. The others are taken as
    given: the CPU runs bf16 and fp16 autocast too (slowly), which the tests use.
    """
    if name not in PRECISIONS:
        raise UserError(f"--precision {name}: choose one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
    return "fp32"


def autocast_context(device, precision="auto"):
    """Autocast in the resolved precision's dtype on `device`; no autocast for fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device, precision="auto"):
    """A GradScaler, enabled only for fp16 (whose small gradients underflow unless the loss is
    scaled up); bf16 has fp32's range and needs none."""
    enabled = resolve_precision(precision, device) == "fp16"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def use_channels_last(flag, device):
    """--channels-last / --no-channels-last, else NHWC on CUDA, where tensor-core convolutions
    run faster in it."""
    return device.type == "cuda" if flag is None else flag


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state():
    """RNG states as tensors and plain values, so they load with torch.load(weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def stable_hash(text):
    """A hash of a string that is the same on every machine and run (unlike Python's hash())."""
    value = 2166136261
    for byte in text.encode("utf-8"):  # FNV-1a, 32 bit
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


# ----------------------------------------------------------------------------------------------
# Checkpoints: written atomically, loaded safely, checked for their kind
# ----------------------------------------------------------------------------------------------


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, rename over `path`, fsync the
    folder.

    A crash at any moment leaves either the old file or the new one, never a half-written file;
    the folder's fsync makes the rename itself survive a power cut. The file gets the mode any
    new file gets (0666 less the umask), so that others sharing the run can read it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # not tempfile.mkstemp, which creates mode 0600; O_EXCL: never another file of this name
    tmp_path = os.path.join(folder, f".tmp-{secrets.token_hex(8)}.pt")
    handle = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX; Windows cannot open a folder, nor needs to
        folder_handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder_handle)
        finally:
            os.close(folder_handle)


def file_sha256(path):
    """Content hash of a file (e.g. the VQGAN checkpoint a token cache was encoded with)."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CHECKPOINT_KINDS = {
    "vqgan": "a stage-1 inference checkpoint (vqgan.pt)",
    "vqgan_train": "a stage-1 training checkpoint (vqgan_last.pt)",
    "transformer_train": "a stage-2 training checkpoint (transformer_last.pt)",
    "pose_detector": "a keypoint detector for PCK (pose_detector.pt)",
}


def torch_load_failure(error):
    """Why torch.load(weights_only=True) refused a file, in a few words. torch's own message
    advises retrying with weights_only=False, which runs any code the file holds: never relayed."""
    first_sentence = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        return "it holds no plain tensors that torch.load(weights_only=True) can read"
    return f"{type(error).__name__}: {first_sentence}"


def load_checkpoint(path, expected_kinds):
    """Load a checkpoint of ours with weights_only=True and check its "kind" field.

    `expected_kinds` is a kind or a tuple of kinds from CHECKPOINT_KINDS. Raises UserError with
    one clear line when the file is missing, unreadable or of another kind.
    """
    if isinstance(expected_kinds, str):
        expected_kinds = (expected_kinds,)
    wanted = " or ".join(CHECKPOINT_KINDS[k] for k in expected_kinds)
    require_file(path, "checkpoint", f"; expected {wanted}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file or a pickle that is not plain tensors
        raise UserError(f"{path} is not a checkpoint of this project, or a damaged one "
                        f"({torch_load_failure(error)}); expected {wanted}") from None
    kind = checkpoint.get("kind") if isinstance(checkpoint, dict) else None
    if kind not in expected_kinds:
        found = CHECKPOINT_KINDS.get(kind, "a file that is not a checkpoint of this project")
        raise UserError(f"{path} is {found}, but {wanted} is needed here")
    return checkpoint


# ----------------------------------------------------------------------------------------------
# Metrics, loss curves, image grids, pose drawing
# ----------------------------------------------------------------------------------------------


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


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records, panels, path, title=""):
    """Plot metrics against `step` into a PNG: one panel per (panel title, keys), e.g. training
    losses beside validation metrics.

    Made to read alike for a 30-step and a 30,000-step run: whole-number step ticks, a marker
    on every point while a curve has few of them (a single point still shows), and a log y axis
    where a panel's values span more than 100x.
    """
    from matplotlib.figure import Figure  # no pyplot: no window, no global figure state
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    width, gap = 4.8 * len(panels), 0.75  # inches; margins fixed (a layout engine would double
    # the time of a plot that is redrawn at every checkpoint)
    figure = Figure(figsize=(width, 4.2), dpi=100)
    figure.subplots_adjust(left=gap / width, right=1 - 0.2 / width, bottom=0.12, top=0.86,
                           wspace=gap / (4.8 - gap))
    figure.suptitle(title)
    for axes, (panel_title, keys) in zip(figure.subplots(1, len(panels), squeeze=False)[0],
                                         panels):
        values = []
        for key in keys:
            points = [(r["step"], r[key]) for r in records
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                steps, ys = zip(*points)
                axes.plot(steps, ys, label=key, linewidth=1.2, markersize=3,
                          marker="o" if len(points) <= 50 else None)
                values += ys
        if values:
            if min(values) > 0 and max(values) / min(values) > 100:
                axes.set_yscale("log")
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "no data yet", ha="center", va="center",
                      transform=axes.transAxes)
        axes.set_title(panel_title, fontsize=10)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda step, _: f"{step:,.0f}"))
        axes.grid(alpha=0.3)
    figure.savefig(path)


def denormalize(images):
    """[-1, 1] model space -> [0, 1] picture space, clamped."""
    return ((images.detach().float() + 1) / 2).clamp(0, 1)


def psnr(x, y, max_db=100.0):
    """Peak signal-to-noise ratio per image in dB, for images (B, C, H, W) in [0, 1] -> (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10)))


def to_uint8_image(image):
    """One (3, H, W) tensor in [-1, 1] -> PIL RGB image."""
    array = (denormalize(image).cpu() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def save_image_grid(rows, path, pad=2):
    """Save a grid: `rows` is a list of lists of (3, H, W) tensors in [-1, 1] or PIL images."""
    cells = [[cell if isinstance(cell, Image.Image) else to_uint8_image(cell) for cell in row]
             for row in rows]
    cell_w = max(c.width for row in cells for c in row)
    cell_h = max(c.height for row in cells for c in row)
    columns = max(len(row) for row in cells)
    grid = Image.new("RGB", (columns * (cell_w + pad) + pad, len(cells) * (cell_h + pad) + pad),
                     "white")
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell, (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return grid


BONE_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


def draw_skeleton(keypoints, layout, size, background=None, scale=4):
    """Draw a (K, 3) keypoint array (x, y, v in pixels of a `size` image) as a skeleton picture.

    Drawn `scale` times larger and downsampled, over `background` (a PIL image) or white.
    Occluded joints (v == 1) are hollow; invisible ones (v == 0) are left out.
    """
    width, height = size
    canvas = (background.convert("RGB").resize((width * scale, height * scale), Image.NEAREST)
              if background is not None else Image.new("RGB", (width * scale, height * scale),
                                                       "white"))
    draw = ImageDraw.Draw(canvas)
    points = np.asarray(keypoints, dtype=np.float64)
    line_width = max(1, scale * max(width, height) // 96)
    for index, (a, b) in enumerate(layout.bones):
        if points[a, 2] > 0 and points[b, 2] > 0:
            draw.line([(points[a, 0] * scale, points[a, 1] * scale),
                       (points[b, 0] * scale, points[b, 1] * scale)],
                      fill=BONE_COLOURS[index % len(BONE_COLOURS)], width=line_width)
    radius = line_width * 1.2
    for x, y, v in points:
        if v > 0:
            box = [x * scale - radius, y * scale - radius, x * scale + radius, y * scale + radius]
            draw.ellipse(box, fill="black" if v >= 2 else None, outline="black")
    return canvas.resize((width, height), Image.LANCZOS)


def condition_picture(condition, keypoints, parts, layout, size):
    """What a sample was conditioned on, as a picture of `size` (width, height): the skeleton,
    the coloured part map, or blank (class or no condition)."""
    if condition == "keypoints":
        return draw_skeleton(np.asarray(keypoints), layout, size)
    if condition == "parts":
        return colorize_parts(parts)
    return Image.new("RGB", size, "white")


# one colour per label 0 .. 255: the mannequins' 11 (0, the background, white), then hues a
# golden angle apart for the labels of other labellings (DensePose's 11 .. 24, your own)
PART_COLOURS = np.array([(255, 255, 255), (230, 190, 140), (220, 40, 40), (40, 110, 220),
                         (40, 200, 220), (20, 60, 150), (20, 140, 160), (60, 170, 60),
                         (240, 200, 30), (20, 100, 20), (180, 130, 10)] + [
    tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i * 0.381966 % 1, 0.7, 0.85))
    for i in range(256 - NUM_PART_LABELS)], dtype=np.uint8)


def colorize_parts(part_map):
    """(H, W) integer labels in 0 .. 255 -> PIL RGB picture with one colour per label."""
    return Image.fromarray(PART_COLOURS[np.asarray(part_map, dtype=np.int64)])


# ----------------------------------------------------------------------------------------------
# The dataset: user folders, poses.json, part maps, COCO person keypoints
# ----------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PARTS_FOLDER = "parts"  # DIR/parts/<relative image path with .png> holds the part label maps
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # decompression-bomb guard; --max-image-pixels raises it
# open_image enforces --max-image-pixels itself. PIL's fixed guard would override that flag and
# report a huge file as 'unreadable' (skipped) instead of 'too large', so it is switched off.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class Example:
    """One training example: which file, and which square of it becomes the training image."""

    name: str  # relative path (plus '#person<id>' for COCO people), for messages and outputs
    image_path: str
    keypoints: np.ndarray = None  # (K, 3) x, y, v in the displayed image's pixel coordinates
    part_path: str = None
    box: tuple = None  # (x0, y0, side): the square region (may reach outside the image)
    pose_source: str = None  # the poses.json its keypoints come from, checked against the image


def square_box(width, height, mode):
    """The square (x0, y0, side) that 'pad' (whole image, padded) or 'crop' (centre) keeps."""
    side = max(width, height) if mode == "pad" else min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def transform_keypoints(keypoints, box, size):
    """Move (K, 3) keypoints from original pixels into a size x size crop of `box`.

    Coordinates are continuous: pixel column j covers [j, j + 1). Keypoints that land outside
    the output square become invisible (v = 0).
    """
    x0, y0, side = box
    out = keypoints.astype(np.float32).copy()
    scale = size / side
    out[:, 0] = (keypoints[:, 0] - x0) * scale
    out[:, 1] = (keypoints[:, 1] - y0) * scale
    outside = (out[:, 0] < 0) | (out[:, 0] >= size) | (out[:, 1] < 0) | (out[:, 1] >= size)
    out[outside, 2] = 0
    return out


def flip_example(image, keypoints, parts, layout, part_labels=MANNEQUIN_PARTS):
    """Mirror left-right: image (H, W, 3), keypoints (K, 3) and parts (H, W), swapping sides.

    Swapping matters: after a flip the person's left arm is where the right arm was, so the
    'left_wrist' keypoint and the 'left_lower_arm' label must be renamed to 'right_*' (the
    pairs of `layout` and of the PartLabelling `part_labels`).
    """
    width = image.shape[1]
    image = image[:, ::-1].copy()
    if keypoints is not None:
        keypoints = keypoints[layout.flip_permutation()].copy()
        keypoints[:, 0] = width - keypoints[:, 0]
    if parts is not None:
        parts = part_labels.flip_lookup()[parts[:, ::-1]]
    return image, keypoints, parts


def to_rgb(image):
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK, ...) -> RGB; transparency over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or array.max() > 255:
            array = array / 257.0  # 16-bit range -> 8-bit range
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def border_colour(image):
    """Median colour of the outermost pixels: the fill used when padding to a square."""
    array = np.asarray(image)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return tuple(int(c) for c in np.median(border, axis=0))


def open_image(path, max_pixels):
    """Open, check size, decode, apply EXIF orientation and convert to RGB; errors -> UserError."""
    from PIL import ImageOps
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UserError(f"image {path} is {width}x{height} = {width * height} pixels, "
                                f"over the limit of {max_pixels}; shrink it or raise "
                                "--max-image-pixels if the file is genuine")
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except UserError:
        raise
    except Exception as error:  # truncated, corrupt or not an image at all
        raise UnreadableImage(f"cannot read image {path}: {type(error).__name__}: {error}") from None


def read_part_map(path):
    """A single-channel label image (mode L, P or I;16) -> (H, W) int64 labels."""
    try:
        with Image.open(path) as part_image:
            labels = np.asarray(part_image).astype(np.int64)
    except Exception as error:
        raise UserError(f"cannot read part map {path}: {type(error).__name__}: {error}") from None
    if labels.ndim != 2:
        raise UserError(f"part map {path} has {labels.shape[2]} channels; save the labels as a "
                        "single-channel (mode L or P) PNG")
    return labels


def find_images(root):
    """Relative posix paths of all images below root (any case of extension), sorted.

    The parts/ folder is skipped: it holds label maps, not training images.
    """
    found = []
    for folder, subfolders, files in os.walk(root):
        if folder == root and PARTS_FOLDER in subfolders:
            subfolders.remove(PARTS_FOLDER)
        subfolders.sort()
        for file in files:
            if file.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, file), root).replace(os.sep, "/"))
    return sorted(found)


def is_validation(name, val_fraction):
    """Deterministic split by a hash of the relative path: stable across runs and machines."""
    return stable_hash(name) / 2**32 < val_fraction


def empty_split_message(split, root, files, val_fraction, coco):
    """Why a split came out empty: the split goes by image file (a hash of its path, see
    is_validation), how many files there are, and a --val-fraction that fixes it."""
    positions = sorted({stable_hash(file) / 2**32 for file in files})  # val: below the fraction
    count = (f"{len(positions)} image file(s)" + (f" holding {len(files)} people, each photo's "
                                                    "people kept together" if coco else ""))
    reason = (f"the train/val split goes by image file and {root} has {count}; "
              f"--val-fraction {val_fraction} puts {'none' if split == 'val' else 'all'} of them "
              "in the validation split")
    if len(positions) < 2:
        return f"the {split} split is empty: {reason}; both splits need a file: add images"
    if split == "val":  # the smallest fraction, in as few decimals as do, that passes one file
        decimals = next((d for d in range(2, 10)
                         if math.floor(positions[0] * 10**d + 1) / 10**d <= positions[-1]), 10)
        suggestion = math.floor(positions[0] * 10**decimals + 1) / 10**decimals
        return (f"the val split is empty: {reason}; --val-fraction {suggestion:.{decimals}f} "
                "gives it at least one file")
    decimals = next((d for d in range(2, 10)
                     if math.floor(positions[-1] * 10**d) / 10**d > positions[0]), 10)
    suggestion = math.floor(positions[-1] * 10**decimals) / 10**decimals
    return (f"the train split is empty: {reason}; --val-fraction {suggestion:.{decimals}f} "
            "leaves at least one file for training")


def resolve_layout(num_keypoints, layout_name, source):
    if layout_name not in (None, "auto"):
        layout = LAYOUTS[layout_name]
        if layout.num_keypoints != num_keypoints:
            raise UserError(f"{source}: entries have {num_keypoints} keypoints but --pose-layout "
                            f"{layout_name} has {layout.num_keypoints}")
        return layout
    if num_keypoints not in LAYOUT_BY_K:
        known = ", ".join(f"{k} ({l.name})" for k, l in LAYOUT_BY_K.items())
        raise UserError(f"{source}: entries have {num_keypoints} keypoints; known layouts are "
                        f"{known}; convert the file to one of them")
    return LAYOUT_BY_K[num_keypoints]


def parse_keypoints(value, key, source):
    """Check one poses.json entry: a list of K [x, y, v] triples of finite numbers, v in 0/1/2."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{source}: entry {key!r} must be a list of [x, y, v] triples")
    for index, triple in enumerate(value):
        if (not isinstance(triple, list) or len(triple) != 3
                or not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in triple)
                or not all(math.isfinite(n) for n in triple)):
            raise UserError(f"{source}: entry {key!r}, keypoint {index} is {triple!r}; "
                            "expected [x, y, v] with finite numbers")
        if triple[2] not in (0, 1, 2):
            raise UserError(f"{source}: entry {key!r}, keypoint {index} has visibility "
                            f"{triple[2]!r}; use 0 (not visible), 1 (occluded) or 2 (visible)")
    return np.asarray(value, dtype=np.float32)


def read_json(path):
    """Parse a JSON file; an unreadable file or bad JSON is a UserError naming line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column "
                        f"{error.colno}; fix the file") from None


def read_pose_entries(path):
    """A poses.json file -> ({normalised relative path: (K, 3) keypoints}, K), for training and
    sample.py alike: keys are paths inside the file's folder, naming one image each, and every
    entry has the same K (an odd one out is named against the count of the others)."""
    poses = read_json(path)
    if not isinstance(poses, dict):
        raise UserError(f"{path} must hold an object {{\"relative/image.png\": [[x, y, v], ...]}}, "
                        f"not a {type(poses).__name__}")
    if not poses:
        raise UserError(f"{path} has no entries; remove it or add poses")
    folder = os.path.dirname(path) or "."
    parsed, keys = {}, {}
    for key, value in poses.items():
        normal = os.path.normpath(key).replace(os.sep, "/")
        if os.path.isabs(key) or normal == ".." or normal.startswith("../"):
            raise UserError(f"{path}: key {key!r} points outside the folder {folder}; keys must "
                            "be paths relative to it")
        if normal in keys:
            raise UserError(f"{path}: keys {keys[normal]!r} and {key!r} name the same image; "
                            "keep one of them")
        parsed[normal], keys[normal] = parse_keypoints(value, key, path), key
    counts = collections.Counter(len(keypoints) for keypoints in parsed.values())
    k, agreeing = counts.most_common(1)[0]
    for normal, keypoints in parsed.items():
        if len(keypoints) != k:
            raise UserError(f"{path}: entry {keys[normal]!r} has {len(keypoints)} keypoints, while "
                            f"{agreeing} other entr{'y has' if agreeing == 1 else 'ies have'} "
                            f"{k}; every entry needs the same number")
    return parsed, k


def check_keypoints_inside(keypoints, size, key, source, fix="fix it or set its v to 0"):
    """The keypoint rule of training and sample.py alike: a joint marked present (v > 0) lies
    on its (width, height) image, 0 <= x <= width and 0 <= y <= height (continuous pixels)."""
    width, height = size
    for index, (x, y, v) in enumerate(keypoints):
        if v > 0 and not (0 <= x <= width and 0 <= y <= height):
            raise UserError(f"{source}: entry {key!r}, keypoint {index} at ({x:g}, {y:g}) lies "
                            f"outside its {width}x{height} image; {fix}")


def read_poses_json(path, root, image_names, layout_name):
    """poses.json -> ({relative path: (K, 3) array}, layout), with a clear error for each flaw."""
    parsed, k = read_pose_entries(path)
    known = set(image_names)
    missing = sorted(key for key in parsed if key not in known)
    if missing:
        raise UserError(f"{path} names {len(missing)} image(s) that are not in {root} "
                        f"(first: {', '.join(missing[:3])}); fix the keys or add the images")
    return parsed, resolve_layout(k, layout_name, path)


def read_coco_annotations(path, root, min_keypoints, margin):
    """COCO person_keypoints_*.json -> one Example per annotated person (square crop with margin)."""
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
        images = {image["id"]: image for image in coco["images"]}
        annotations = coco["annotations"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"cannot read COCO annotations {path} ({type(error).__name__}: {error}); "
                        "expected a person_keypoints_*.json file with 'images' and "
                        "'annotations'") from None
    examples = []
    for annotation in annotations:
        try:
            if annotation.get("iscrowd", 0) or annotation["num_keypoints"] < min_keypoints:
                continue
            image = images[annotation["image_id"]]
            x, y, w, h = (float(n) for n in annotation["bbox"])
            keypoints = np.asarray(annotation["keypoints"], dtype=np.float32).reshape(-1, 3)
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path}: annotation {annotation.get('id')!r} is malformed "
                            f"({type(error).__name__}: {error})") from None
        if w <= 0 or h <= 0:
            continue
        # COCO keypoints use integer pixel indices; +0.5 puts them at pixel centres.
        keypoints[:, :2] += 0.5 * (keypoints[:, 2:3] > 0)
        side = int(round(max(w, h) * (1 + 2 * margin)))
        box = (int(round(x + w / 2 - side / 2)), int(round(y + h / 2 - side / 2)), side)
        image_path = os.path.join(root, image["file_name"])
        examples.append(Example(name=f"{image['file_name']}#person{annotation.get('id')}",
                                image_path=image_path, keypoints=keypoints, box=box))
    if not examples:
        raise UserError(f"{path} has no person with at least {min_keypoints} labelled keypoints")
    missing = sorted({e.image_path for e in examples if not os.path.isfile(e.image_path)})
    if missing:
        raise UserError(f"{path} refers to {len(missing)} image(s) missing below {root} "
                        f"(first: {', '.join(missing[:3])})")
    return examples


def class_folders(root, examples):
    """Sorted class names of a folder-per-class dataset: the first folders of the image paths."""
    loose = [e.name for e in examples if "/" not in e.name]
    if loose:
        raise UserError(f"class labels come from the sub-folders of {root}, but {len(loose)} "
                        f"image(s) lie directly in it (first: {', '.join(loose[:3])}); put every "
                        "image in its class's folder")
    names = sorted({e.name.split("/")[0] for e in examples})
    if len(names) < 2:
        raise UserError(f"class labels need at least two class folders in {root}, found "
                        f"{names}; arrange the images as {root}/<class>/<image>")
    return names


def prepare_example(example, size, resize_mode, max_pixels, part_labels=MANNEQUIN_PARTS):
    """Decode and square one example: uint8 image (S, S, 3), keypoints (K, 3), uint8 parts (S, S).

    The kept square is the example's box (COCO people) or the 'pad'/'crop' square of the image;
    parts of it outside the image are filled with the border colour (image) and 0 (part labels).
    Every label of the part map must be one of the PartLabelling `part_labels`.
    """
    image = open_image(example.image_path, max_pixels)
    width, height = image.size
    if example.pose_source is not None:
        check_keypoints_inside(example.keypoints, (width, height), example.name,
                               example.pose_source)
    box = example.box or square_box(width, height, resize_mode)
    x0, y0, side = box
    canvas = Image.new("RGB", (side, side), border_colour(image))
    canvas.paste(image, (-x0, -y0))
    image_array = np.array(canvas.resize((size, size), Image.LANCZOS)  # writable, for torch
                           if side != size else canvas)
    keypoints = parts = None
    if example.keypoints is not None:
        keypoints = transform_keypoints(example.keypoints, box, size)
    if example.part_path is not None:
        labels = read_part_map(example.part_path)
        if labels.shape != (height, width):
            raise UserError(f"part map {example.part_path} is {labels.shape[1]}x"
                            f"{labels.shape[0]} but its image is {width}x{height}; part "
                            "maps must have the image's size")
        outside = (labels < 0) | (labels >= part_labels.num_labels)
        if outside.any():
            row, column = np.argwhere(outside)[0]
            raise UserError(f"part map {example.part_path} has label {labels[row, column]} (row "
                            f"{row}, column {column}), but --part-labels {part_labels.name} has "
                            f"labels 0 .. {part_labels.num_labels - 1}; pass the labelling the "
                            f"maps use ({', '.join(PART_LABELLINGS)} or a .json file)")
        part_canvas = Image.new("L", (side, side), 0)
        part_canvas.paste(Image.fromarray(labels.astype(np.uint8)), (-x0, -y0))
        parts = np.asarray(part_canvas.resize((size, size), Image.NEAREST))
    return image_array, keypoints, parts


class PoseImageDataset(torch.utils.data.Dataset):
    """Images of one split, squared and resized, with their keypoints and part maps if present.

    An item is an index, or (index, flip) as EpochBatchSampler yields. It returns a dict:
      image      (3, S, S) float in [-1, 1]
      keypoints  (K, 3) float: x, y in output pixels, v (only when the data has poses)
      parts      (S, S) long part labels (only when the data has part maps)
      label      () long class index into `class_names` (only with class_labels=True)
      path       the example's relative path
    With class_labels=True the data is folder-per-class: an image's class is its first folder
    below root (DIR/<class>/.../image.png), and `class_names` lists the folders, sorted.
    Every file is decoded once when the dataset is built, so a corrupt image (or a part label
    that `part_labels` does not know) is found before training starts; small datasets keep those
    decoded pixels in memory (`preload`).
    """

    def __init__(self, root, image_size=64, split="train", val_fraction=0.05, resize_mode="auto",
                 pose_layout="auto", coco_annotations=None, coco_min_keypoints=5,
                 coco_margin=0.1, strict=False, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                 preload="auto", progress=True, class_labels=False, part_labels=MANNEQUIN_PARTS):
        if not os.path.exists(root):
            raise UserError(f"dataset path {root} does not exist; pass --dataset-path DIR with "
                            "your images, or leave it out to use the synthetic mannequins")
        if not os.path.isdir(root):
            raise UserError(f"dataset path {root} is not a folder; pass the folder that holds "
                            "the images")
        self.root, self.image_size, self.max_image_pixels = root, image_size, max_image_pixels
        self.part_labels = part_labels
        self.layout = None
        self.annotation_path = coco_annotations  # or poses.json, found by _scan_folder
        if coco_annotations:
            examples = read_coco_annotations(coco_annotations, root, coco_min_keypoints,
                                             coco_margin)
            self.layout = resolve_layout(examples[0].keypoints.shape[0], pose_layout,
                                         coco_annotations)
        else:
            # both splits scan the same folder: one of them warns about it
            examples = self._scan_folder(root, pose_layout, warn=split != "val")
        # from every example before the split, so that both splits number the classes alike
        self.class_names = class_folders(root, examples) if class_labels else None
        self.has_keypoints = self.layout is not None
        self.has_parts = any(e.part_path for e in examples)
        if resize_mode == "auto":  # pad keeps whole people; crop suits pictures without poses
            resize_mode = "pad" if self.has_keypoints or self.has_parts else "crop"
        self.resize_mode = resize_mode
        if split != "all":  # split by image file, so people from one COCO picture stay together
            files = [os.path.relpath(e.image_path, root).replace(os.sep, "/") for e in examples]
            examples = [e for e, file in zip(examples, files)
                        if (split == "val") == is_validation(file, val_fraction)]
            if not examples:
                raise UserError(empty_split_message(split, root, files, val_fraction,
                                                    coco=bool(coco_annotations)))
        self.examples, self.cache = self._check_all(examples, strict, preload, progress, split)

    def _scan_folder(self, root, pose_layout, warn):
        names = find_images(root)
        if not names:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        poses = {}
        poses_path = os.path.join(root, "poses.json")
        if os.path.exists(poses_path):
            self.annotation_path = poses_path
            poses, self.layout = read_poses_json(poses_path, root, names, pose_layout)
            unposed = [n for n in names if n not in poses]
            if unposed and warn:
                print(f"warning: {len(unposed)} image(s) have no entry in {poses_path} (first: "
                      f"{', '.join(unposed[:3])}); their keypoints count as not visible",
                      file=sys.stderr)
        parts_root = os.path.join(root, PARTS_FOLDER)
        examples = []
        for name in names:
            part_path = None
            if os.path.isdir(parts_root):
                part_path = os.path.join(parts_root, os.path.splitext(name)[0] + ".png")
                if not os.path.isfile(part_path):
                    raise UserError(f"part map {part_path} for image {name} is missing; every "
                                    f"image needs one when {parts_root} exists")
            keypoints = poses.get(name)
            if self.layout is not None and keypoints is None:
                keypoints = np.zeros((self.layout.num_keypoints, 3), np.float32)
            examples.append(Example(name, os.path.join(root, name), keypoints, part_path,
                                    pose_source=poses_path if name in poses else None))
        return examples

    def _check_all(self, examples, strict, preload, progress, split):
        """Decode every example once; drop (or, with strict, refuse) unreadable images."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm
        if preload == "auto":
            preload = len(examples) * self.image_size**2 * 3 <= 2**30
        results, bad = [], []

        def attempt(example):
            try:
                return self.prepare(example), None
            except UnreadableImage as error:  # other UserErrors (bombs, bad part maps) stop
                return None, str(error)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for example, (prepared, error) in zip(examples, tqdm(
                    pool.map(attempt, examples), total=len(examples), disable=not progress,
                    desc=f"checking {split} images", leave=False)):
                if error is None:  # without preload, keep no pixels: big sets would not fit
                    results.append((example, prepared if preload else None))
                elif strict:
                    raise UserError(f"{error} (--strict is on; remove or fix the file)")
                else:
                    bad.append((example.image_path, error))
        if bad:
            others = ", ".join(path for path, _ in bad[1:3]) + (", ..." if len(bad) > 3 else "")
            print(f"warning: skipped {len(bad)} unreadable image(s); the first: {bad[0][1]}"
                  f"{f' (also: {others})' if others else ''}; use --strict to stop on them "
                  "instead", file=sys.stderr)
        if not results:
            raise UserError(f"none of the images under {self.root} could be read")
        kept = [example for example, _ in results]
        return kept, ([prepared for _, prepared in results] if preload else None)

    def prepare(self, example):
        return prepare_example(example, self.image_size, self.resize_mode, self.max_image_pixels,
                               self.part_labels)

    def fingerprint(self):
        """A SHA-256 hex digest of the files the items are made of, to key caches of them: the
        content of the annotation file (poses.json or the COCO file), and the path, size and
        modification time of every image and part map. Those are a stat, not a read, so a large
        set costs nothing extra; any edit changes the time (a copy with cp -p, shutil.copy2 or
        rsync -a keeps it, and then the file is the same as well)."""
        import hashlib
        digest = hashlib.sha256()
        if self.annotation_path is not None:
            digest.update(file_sha256(self.annotation_path).encode())
        for example in self.examples:
            for path in (example.image_path, example.part_path):
                if path is not None:
                    info = os.stat(path)
                    digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, item):
        index, flip = item if isinstance(item, tuple) else (item, False)
        example = self.examples[index]
        image, keypoints, parts = (self.cache[index] if self.cache is not None
                                   else self.prepare(example))
        if flip:
            image, keypoints, parts = flip_example(image, keypoints, parts, self.layout or COCO17,
                                                   self.part_labels)
        out = {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
               .float().div(127.5).sub(1.0),  # (3, S, S) in [-1, 1]
               "path": example.name}
        if keypoints is not None:
            out["keypoints"] = torch.from_numpy(keypoints.copy())  # (K, 3)
        if parts is not None:
            out["parts"] = torch.from_numpy(parts.astype(np.int64))  # (S, S)
        if self.class_names is not None:
            out["label"] = torch.tensor(self.class_names.index(example.name.split("/")[0]))
        return out


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, flip) pairs: a fresh permutation and flip draw each epoch.

    Everything follows from (seed, epoch), so a resumed run sees exactly the batches it would
    have seen, and flips do not depend on worker processes. With world_size > 1, global batch j
    is perm[j*B*W:(j+1)*B*W] and rank r takes its r-th slice of B, so W processes with batch B
    see the same data as one process with batch W*B. The incomplete last batch is dropped.
    """

    def __init__(self, num_examples, batch_size, seed=0, flip=False, rank=0, world_size=1):
        self.num_examples, self.batch_size, self.seed, self.flip = (num_examples, batch_size,
                                                                    seed, flip)
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_examples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise UserError(f"the training split has {num_examples} images, fewer than one "
                            f"batch of {batch_size * world_size}; lower --batch-size")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        flips = (torch.rand(self.num_examples, generator=generator) < 0.5).tolist()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * global_batch + self.rank * self.batch_size
            indices = order[start:start + self.batch_size]
            yield [(i, self.flip and flips[i]) for i in indices]


def make_loader(dataset, sampler, num_workers, device):
    """DataLoader over a batch sampler; workers persist across epochs, memory pinned for CUDA.

    A preloaded dataset is read in the main process: handing its ready batches between
    processes would cost more than the indexing itself.
    """
    if dataset.cache is not None:
        num_workers = 0
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=device.type == "cuda",
                                       persistent_workers=num_workers > 0)


# ----------------------------------------------------------------------------------------------
# Training runs: shared flags, run directories, resume, stopping, health checks
# ----------------------------------------------------------------------------------------------


def add_run_args(parser, default_run_dir, default_batch_size, default_base_lr, default_max_steps,
                 default_warmup_steps, default_min_lr_ratio):
    """Flags both trainers share: where the run lives, how long, how fast, on what device."""
    group = parser.add_argument_group("run")
    group.add_argument("--run-dir", type=output_folder, default=default_run_dir)
    group.add_argument("--resume", nargs="?", const="last", default=None,
                       help="continue a run: alone, from RUN_DIR's last checkpoint; or a path")
    group.add_argument("--device", type=device_name, default="auto",
                       help="auto, cpu, cuda, cuda:1, mps")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--batch-size", type=positive_int, default=default_batch_size)
    group.add_argument("--grad-accum", type=positive_int, default=1,
                       help="micro-batches per optimizer step")
    group.add_argument("--lr", type=positive_float, default=None,
                       help="learning rate; default: --base-lr x effective batch size")
    group.add_argument("--base-lr", type=positive_float, default=default_base_lr)
    group.add_argument("--warmup-steps", type=non_negative_int, default=default_warmup_steps,
                       help="linear learning-rate warm-up over this many steps")
    group.add_argument("--min-lr-ratio", type=unit_fraction, default=default_min_lr_ratio,
                       help="after the warm-up the learning rate follows a cosine down to this "
                            "fraction of its peak at the last step; 1 keeps it constant")
    group.add_argument("--max-steps", type=positive_int, default=None,
                       help="total optimizer steps of the run, a resumed run continuing to it "
                            f"(default: {default_max_steps}, or --epochs when given)")
    group.add_argument("--epochs", type=positive_int, default=None,
                       help="total epochs, when --max-steps is not given")
    parser.set_defaults(default_max_steps=default_max_steps)
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="autocast dtype: auto is bf16 on GPUs with native bf16 (compute "
                            "capability 8.0+), fp16 with a GradScaler on older GPUs, fp32 on "
                            "the CPU")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory format for the convolutions (default: on with CUDA)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--log-every", type=positive_int, default=50)
    group.add_argument("--save-every", type=positive_int, default=500)
    group.add_argument("--sample-every", type=positive_int, default=500)
    return group


# Flags that decide which batches a run sees: a resumed run must keep them.
DATA_ORDER_FLAGS = ("dataset_path", "image_size", "val_fraction", "resize_mode", "pose_layout",
                    "coco_annotations", "flip", "seed", "batch_size", "grad_accum")


def learning_rate(args, world_size=1):
    """The peak learning rate: --lr, else --base-lr x the global batch."""
    return args.lr if args.lr is not None else (
        args.base_lr * args.batch_size * args.grad_accum * world_size)


def scheduled_lr(step, peak, warmup, total, min_ratio):
    """Linear warm-up to `peak`, then a cosine down to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def apply_lr_schedule(optimizers, step, peak, total, args):
    """Set every optimizer's lr to the --warmup-steps / --min-lr-ratio schedule at `step`."""
    lr = scheduled_lr(step, peak, args.warmup_steps, total, args.min_lr_ratio)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
    return lr


def total_steps(args, batches_per_epoch):
    """--max-steps, else --epochs worth of optimizer steps."""
    if args.max_steps is not None:
        return args.max_steps
    if args.epochs is not None:
        return args.epochs * batches_per_epoch // args.grad_accum
    return args.default_max_steps


def plain_args(args):
    """argparse namespace -> dict of plain values (loads with weights_only=True)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def resume_batches(loader, sampler, micro_batches_done):
    """Endless batches, starting where a run that had seen `micro_batches_done` stopped.

    Each epoch's iterator draws a worker seed from the global torch RNG; forking the RNG for
    that draw keeps the global stream (which the model uses) the same in a resumed run.
    """
    epoch, start = divmod(micro_batches_done, sampler.batches_per_epoch)
    while True:
        sampler.set_epoch(epoch, start)
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        yield from batches
        epoch, start = epoch + 1, 0


class RunDirectory:
    """A run's folder: its training checkpoint (atomic), and checks before resuming it.

    Opened when a run starts: the folder must take a file (checked by writing one, so that a
    read-only or full folder stops the run before any training), and `remove_stale` (rank 0)
    deletes the temporary files (.tmp-*.pt, see atomic_save) that a write killed midway left.
    """

    def __init__(self, root, kind, last_name, remove_stale=True):
        self.root, self.kind, self.last_name = root, kind, last_name
        try:
            os.makedirs(root, exist_ok=True)
            with tempfile.TemporaryFile(dir=root):
                pass
        except OSError as error:
            raise UserError(f"cannot write into the run directory {root} ({error.strerror}); "
                            "choose another --run-dir, or fix its permissions or free space"
                            ) from None
        if remove_stale:
            self.remove_stale_temporaries()

    def remove_stale_temporaries(self):
        stale = [os.path.join(folder, name) for folder, _, names in os.walk(self.root)
                 for name in names if name.startswith(".tmp-") and name.endswith(".pt")]
        if stale:
            size = sum(os.path.getsize(path) for path in stale)
            for path in stale:
                os.remove(path)
            print(f"removed {len(stale)} temporary file(s) ({size / 1e6:.3g} MB) that an "
                  f"interrupted write left in {self.root}")

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

    def steps_left(self, step, total, args):
        """Whether the loop has a step to take. A resumed run already at its end says so in one
        line (False); one past its end, or a run of no step at all, is a UserError."""
        if step < total:
            return True
        if not args.resume:  # only --epochs can come to no optimizer step
            raise UserError(f"--epochs {args.epochs} makes no optimizer step of --grad-accum "
                            f"{args.grad_accum} micro-batches; raise --epochs or lower "
                            "--grad-accum")
        length = (f"--max-steps {args.max_steps}" if args.max_steps is not None
                  else f"{total} steps")
        checkpoint = self.resume_path(args.resume)
        if step == total:
            print(f"nothing to train: {checkpoint} is already at step {step}, the end of this "
                  f"run ({length}); pass a larger --max-steps to train on")
            return False
        raise UserError(f"{checkpoint} is already at step {step}, past the end of this run "
                        f"({length}); pass --max-steps above {step} to train on, or a new "
                        "--run-dir to start over")

    def report_outputs(self, stage, described):
        """Print the run's outputs that exist; `described` is [(file name, description)]."""
        present = [text for name, text in described
                   if os.path.exists(os.path.join(self.root, name))]
        print(f"{stage} outputs in {self.root}: {', '.join(present)}")

    def load_for_resume(self, resume, config, args, world_size=1):
        """Load the checkpoint to resume; refuse one of another stage, model or data order."""
        path = self.resume_path(resume)
        if resume == "last" and not os.path.exists(path):
            raise UserError(f"--resume: no checkpoint {path} yet; start without --resume")
        checkpoint = load_checkpoint(path, self.kind)
        if checkpoint["config"] != config:
            changed = sorted(k for k in set(config) | set(checkpoint["config"])
                             if config.get(k) != checkpoint["config"].get(k))
            raise UserError(f"--resume: {path} holds a model with another architecture "
                            f"(differs in: {', '.join(changed)}); use the flags it was trained "
                            "with, or a new --run-dir")
        saved = checkpoint["args"]
        changed = [k for k in DATA_ORDER_FLAGS if saved.get(k) != getattr(args, k, None)]
        if changed:
            details = ", ".join(f"--{k.replace('_', '-')} was {saved.get(k)!r}" for k in changed)
            raise UserError(f"--resume: {path} was trained with other data settings ({details}); "
                            "an exact resume needs the same ones")
        # the global batch (and so the data order and default lr) depends on the process count
        saved_world_size = checkpoint.get("world_size", 1)
        if saved_world_size != world_size:
            raise UserError(f"--resume: {path} was trained by {saved_world_size} process(es), "
                            f"this run has {world_size}; an exact resume needs the same number "
                            f"(torchrun --nproc_per_node {saved_world_size})")
        return checkpoint


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
        import signal
        self.requested = False
        self._signal = signal
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
        self._signal.signal(self._signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------------------------
# Distributed training: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them, one process
# ----------------------------------------------------------------------------------------------


@dataclass
class Distributed:
    """Where this process stands in a (possibly one-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = None  # this process's device (set by setup_distributed)

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        """Rank 0 alone writes checkpoints, grids, metrics and progress bars."""
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, tensor):
        """Sum a tensor over all processes (a no-op for one)."""
        if self.enabled:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
        return tensor

    def mean(self, tensor):
        """Average a tensor over all processes (a no-op for one)."""
        return self.sum(tensor) / self.world_size if self.enabled else tensor

    def any(self, flag):
        """True on every rank when `flag` is true on any rank (a collective: all must call it)."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(tensor)
        return bool(tensor.item())

    def no_sync(self, *ddp_modules, last):
        """DDP's no_sync on every micro-batch but a step's last: one all-reduce per step."""
        stack = contextlib.ExitStack()
        if self.enabled and not last:
            for module in ddp_modules:
                stack.enter_context(module.no_sync())
        return stack

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. writes a dataset or cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self):
        if self.enabled:
            torch.distributed.destroy_process_group()


def run_training(train, args):
    """train(args, dist, device) inside the process group when torchrun started us.

    train returns the step at which Ctrl-C stopped it (after saving), or None. A stopped run
    raises Interrupted once every rank has left the loop, so that the command exits with 130.
    An OSError while writing the run's files (disk full, permissions) becomes one line.
    """
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


def wrap_ddp(dist, device, *modules):
    """Each module in DistributedDataParallel when distributed, else the module itself."""
    if not dist.enabled:
        return modules
    device_ids = [device.index] if device.type == "cuda" else None
    return tuple(torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
                 for module in modules)


def setup_distributed(device_name):
    """(Distributed, device): joins the process group when launched by torchrun.

    NCCL between CUDA devices (one per local rank), gloo on the CPU.
    """
    if torch.cuda.is_available():  # TF32 tensor-core matmuls and convolutions (Ampere and later)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        info = Distributed(device=pick_device(device_name))
        return info, info.device
    info = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                       int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info.device = device
    return info, device


# ----------------------------------------------------------------------------------------------
# Command-line pieces shared by the scripts
# ----------------------------------------------------------------------------------------------

DEFAULT_MANNEQUIN_COUNT = 4000


def default_dataset_path(image_size):
    return os.path.join("data", f"mannequins-{image_size}")


def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset-path", default=None,
                       help="folder of images (+ optional poses.json, parts/); default: the "
                            "synthetic mannequins, generated on first use under data/")
    group.add_argument("--image-size", type=positive_int, default=64)
    group.add_argument("--val-fraction", type=unit_fraction, default=0.05)
    group.add_argument("--resize-mode", choices=("auto", "pad", "crop"), default="auto",
                       help="pad to square with the border colour, or centre-crop; auto pads "
                            "when poses or part maps are present")
    group.add_argument("--pose-layout", choices=("auto",) + tuple(LAYOUTS), default="auto",
                       help="keypoint order in poses.json; auto picks it from K (17 or 18)")
    group.add_argument("--part-labels", type=part_labels_value, default="mannequin",
                       help="what the part maps' labels mean: mannequin (0-10), densepose (the "
                            "24 DensePose body-part indices, 0 background), or a .json file "
                            '{"num_labels": N, "flip_pairs": [[left, right], ...]}')
    group.add_argument("--coco-annotations", default=None,
                       help="a COCO person_keypoints_*.json; its images are read below "
                            "--dataset-path")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                       help="random horizontal flips (keypoints and part labels swap sides)")
    group.add_argument("--strict", action="store_true",
                       help="stop on an unreadable image instead of skipping it")
    group.add_argument("--max-image-pixels", type=positive_int,
                       default=DEFAULT_MAX_IMAGE_PIXELS)
    group.add_argument("--num-workers", type=non_negative_int,
                       default=min(2, os.cpu_count() or 1))
    return group


def build_datasets(args, progress=True, class_labels=False):
    """(train, val) datasets from the data flags; generates the default mannequins if needed.

    class_labels: the data is folder-per-class and items carry a "label" (PoseImageDataset).
    """
    root = args.dataset_path
    if root is None:
        import mannequins
        root = default_dataset_path(args.image_size)
        if mannequins.write_dataset(root, DEFAULT_MANNEQUIN_COUNT, image_size=args.image_size,
                                    seed=0):
            print(f"wrote {DEFAULT_MANNEQUIN_COUNT} synthetic mannequins to {root} (first run "
                  "only; pass --dataset-path for your own images)")
    common = dict(root=root, image_size=args.image_size, val_fraction=args.val_fraction,
                  resize_mode=args.resize_mode, pose_layout=args.pose_layout,
                  coco_annotations=args.coco_annotations, strict=args.strict,
                  max_image_pixels=args.max_image_pixels, progress=progress,
                  class_labels=class_labels,
                  part_labels=resolve_part_labelling(getattr(args, "part_labels", "mannequin")))
    return PoseImageDataset(split="train", **common), PoseImageDataset(split="val", **common)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"synthetic": "write the synthetic mannequin dataset (see mannequins.py --help)"}
    if not argv or argv[0] not in commands:
        listing = "; ".join(f"{name}: {text}" for name, text in commands.items())
        raise UserError(f"usage: python utils.py COMMAND [options]; commands are {listing}")
    import mannequins
    mannequins.main(argv[1:])


if __name__ == "__main__":
    # Run through the imported module: errors raised as utils.UserError by other modules must
    # be the same class that run_cli catches, not a copy defined in __main__.
    import utils
    utils.run_cli(utils.main)
