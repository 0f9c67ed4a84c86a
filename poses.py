"""Poses: keypoint layouts, part labellings, poses.json, re-framing, flips and pictures of both.

What a pose means travels with the data from disk to a sample: `data.py` reads poses.json and
part maps through this file, re-frames them with their image onto the training square
(`frame_box`, `reframe_keypoints`, `reframe_picture`) and flips them with left and right swapped
(`flip_example`); `mannequins.py` draws its figures in the COCO17 layout and the mannequin
labelling; `sample.py` places a given pose on the sampled canvas with the same functions;
the trainers and sample.py draw skeletons and part maps beside the pictures.
"""
import argparse
import collections
import colorsys
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from utils import UserError

# ----------------------------------------------------------------------------------------------
# Keypoint layouts and part labellings
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
# poses.json: one rule for training and sample.py
# ----------------------------------------------------------------------------------------------


def read_json(path):
    """Parse a JSON file; an unreadable file or bad JSON is a UserError naming line and column."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a Windows editor's BOM too
            return json.load(f)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column "
                        f"{error.colno}; fix the file") from None


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


# ----------------------------------------------------------------------------------------------
# Re-framing: a region of an image onto a canvas, keypoints and pictures alike
# ----------------------------------------------------------------------------------------------


def frame_box(size, canvas, mode):
    """(x0, y0, width, height): the region of a `size` (width, height) image that fills a
    `canvas` (width, height). It is centred, has the canvas's aspect ratio, and holds the whole
    image ('pad') or lies inside it ('crop'); on a square canvas it is the square training keeps.
    """
    (width, height), (canvas_w, canvas_h) = size, canvas
    fit = max if mode == "pad" else min
    ratio = fit(width / canvas_w, height / canvas_h)  # image pixels per canvas pixel
    box_w, box_h = round(canvas_w * ratio), round(canvas_h * ratio)
    return (width - box_w) // 2, (height - box_h) // 2, box_w, box_h


def reframe_keypoints(keypoints, box, canvas):
    """Move (K, 3) keypoints from an image's pixels onto a `canvas` (width, height) that shows
    the image's region `box` (x0, y0, width, height), as training and sample.py place poses.

    Coordinates are continuous: pixel column j covers [j, j + 1). Keypoints that land outside
    the canvas, [0, width] x [0, height] with its edges (as check_keypoints_inside: a flip maps
    x = 0 to x = width), become invisible (v = 0).
    """
    (x0, y0, box_w, box_h), (canvas_w, canvas_h) = box, canvas
    out = keypoints.astype(np.float32).copy()
    out[:, 0] = (keypoints[:, 0] - x0) * (canvas_w / box_w)
    out[:, 1] = (keypoints[:, 1] - y0) * (canvas_h / box_h)
    outside = (out[:, 0] < 0) | (out[:, 0] > canvas_w) | (out[:, 1] < 0) | (out[:, 1] > canvas_h)
    out[outside, 2] = 0
    return out


def reframe_picture(picture, box, canvas, fill, resample):
    """The same for a PIL picture (an image, or a part map in mode L): its region `box`, where
    it reaches outside the picture filled with `fill`, resized to `canvas` (width, height)."""
    x0, y0, box_w, box_h = box
    framed = Image.new(picture.mode, (box_w, box_h), fill)
    framed.paste(picture, (-x0, -y0))
    return framed if (box_w, box_h) == tuple(canvas) else framed.resize(canvas, resample)


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


# ----------------------------------------------------------------------------------------------
# Pictures of poses: skeletons and coloured part maps
# ----------------------------------------------------------------------------------------------


def bone_colours(layout):
    """One RGB colour in [0, 1] per bone of `layout`, (num_bones, 3): hues a golden angle
    apart, so that neighbouring bones, and a left bone and its right mirror, differ."""
    return np.array([colorsys.hsv_to_rgb(index * 0.618034 % 1, 0.9, 0.85)
                     for index in range(len(layout.bones))])


def pose_picture(keypoints, layout, size, line_width=None, colours=None):
    """A (K, 3) pose (x, y, v in pixels of a `size` (width, height) image) as a float picture
    (H, W, 3) in [0, 1]: on white, each bone whose two joints have v > 0 a line `line_width`
    pixels wide (default: the larger side / 32) in its colour (`colours`, default
    bone_colours), each joint with v > 0 a black dot; the rest absent.

    Drawn at the pixel centres with a pixel of antialiasing and composed in no order (each
    channel keeps its darkest ink), so a mirrored pose gives the mirrored picture with mirror
    bones' colours swapped; a joint off the picture still draws its bones' part on it."""
    width, height = size
    line_width = line_width or max(width, height) / 32
    colours = bone_colours(layout) if colours is None else np.asarray(colours)
    points = np.asarray(keypoints, dtype=np.float64)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres (H, W)

    def coverage(distance, radius):  # 1 inside, 0 a pixel outside, linear between
        return np.clip(radius + 0.5 - distance, 0.0, 1.0)[..., None]  # (H, W, 1)

    drawn = [i for i, (a, b) in enumerate(layout.bones) if points[a, 2] > 0 and points[b, 2] > 0]
    ends = np.array(layout.bones, np.int64)[drawn].reshape(-1, 2)  # (n, 2) joint indices
    a, b = (points[ends[:, end], :2][:, None, None] for end in (0, 1))  # (n, 1, 1, 2)
    ab, ap = b - a, np.stack([xs, ys], axis=-1) - a  # (n, 1, 1, 2), (n, H, W, 2)
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)  # (n, H, W)
    distance = np.linalg.norm(ap - t[..., None] * ab, axis=-1)
    ink = (coverage(distance, line_width / 2) * (1 - colours[drawn])[:, None, None]).max(
        axis=0, initial=0.0)  # (H, W, 3)
    joints = points[points[:, 2] > 0]
    dots = coverage(np.hypot(xs - joints[:, :1, None], ys - joints[:, 1:2, None]),
                    0.75 * line_width)  # (k, H, W, 1)
    picture = (1 - ink) * (1 - dots).prod(axis=0)
    return picture.astype(np.float32)


def draw_skeleton(keypoints, layout, size, background=None):
    """pose_picture as a PIL picture, drawn over `background` (a PIL image) or white."""
    picture = pose_picture(keypoints, layout, size)
    if background is not None:
        picture = picture * np.asarray(background.convert("RGB").resize(size), np.float32) / 255
    return Image.fromarray(np.round(picture * 255).astype(np.uint8))


def condition_picture(condition, keypoints, parts, layout, size):
    """What a sample was conditioned on, as a picture of `size` (width, height): the skeleton,
    the coloured part map, or blank (class or no condition)."""
    if condition in ("keypoints", "keypoint-vqgan"):
        return draw_skeleton(np.asarray(keypoints), layout, size)
    if condition in ("parts", "parts-vqgan"):
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
