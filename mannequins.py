"""Synthetic mannequins: the project's built-in dataset of posed human figures.

Every picture is a flat-coloured figure on a light, mostly plain backdrop, like a shop's product
photo, drawn with Pillow and numpy only, so the whole pipeline can be trained and tested without
downloading anything. `write_dataset` writes a folder that data.py reads like any user dataset
(`python mannequins.py --out DIR --count N --image-size S --seed K`):

    DIR/images/000000.png          the RGB picture
    DIR/parts/images/000000.png    body-part labels, an 'L' PNG holding poses.PART_NAMES indices
    DIR/poses.json                 {"images/000000.png": [[x, y, v], ... 17 in COCO17 order]}
    DIR/mannequins.json            the settings, so that a finished set is recognised and reused

How one figure is made: sample body proportions, clothes and joint angles; build the skeleton in
3D; turn it about the vertical axis (frontal, three-quarter or profile view) and project it
orthographically; place it in the frame; draw each body part as polygons, back to front, into
the picture and into the label map at 4x size; shrink the picture with a box filter and the
labels by majority vote, so that the two line up pixel for pixel.

Keypoint conventions (the same as poses.draw_skeleton):
* x, y are continuous pixel coordinates: pixel (row i, column j) covers x in [j, j + 1) and
  y in [i, i + 1), so its centre is (j + 0.5, i + 0.5). They are rounded to 0.01 px, the
  precision poses.json keeps, and still given when the joint is outside the frame.
* v = 0: outside the frame, i.e. x or y not in [0, size).
  v = 2: the part-map label at pixel (floor(y), floor(x)) is one of the parts the joint belongs
  to (JOINT_PARTS), and the joint is not on the side of the head or body turned away from the
  camera (a profile hides the far eye and ear behind the head itself).
  v = 1: inside the frame but hidden (covered by another body part, or on the far side).
* "left" is the person's left: on a figure that faces the camera it is on the image's right.

Image i of a set is drawn from np.random.default_rng([seed, i]), so a set is reproducible and
its first n images do not depend on how many were asked for.
"""
import colorsys
import contextlib
import functools
import json
import os
import shutil
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import cli
import utils
from poses import COCO17, NUM_PART_LABELS, PART_NAMES, colorize_parts, draw_skeleton
from utils import UserError

GENERATOR_VERSION = 1  # bump when the pictures change, so old sets on disk are not mistaken for new
SUPERSAMPLE = 4  # draw at 4x, then shrink: antialiased edges from Pillow's aliased polygons
MIN_RADIUS_PX = 1.0  # limbs at least 2 px wide, so a joint on a limb's axis lands on its label

PART = {name: label for label, name in enumerate(PART_NAMES)}

# The parts a joint may be seen on: a shoulder shows either on the torso or on its upper arm.
JOINT_PARTS = {
    "nose": ("head",), "left_eye": ("head",), "right_eye": ("head",),
    "left_ear": ("head",), "right_ear": ("head",),
    "left_shoulder": ("torso", "left_upper_arm"), "right_shoulder": ("torso", "right_upper_arm"),
    "left_elbow": ("left_upper_arm", "left_lower_arm"),
    "right_elbow": ("right_upper_arm", "right_lower_arm"),
    "left_wrist": ("left_lower_arm",), "right_wrist": ("right_lower_arm",),
    "left_hip": ("torso", "left_upper_leg"), "right_hip": ("torso", "right_upper_leg"),
    "left_knee": ("left_upper_leg", "left_lower_leg"),
    "right_knee": ("right_upper_leg", "right_lower_leg"),
    "left_ankle": ("left_lower_leg",), "right_ankle": ("right_lower_leg",),
}
JOINT_LABELS = [frozenset(PART[part] for part in JOINT_PARTS[joint]) for joint in COCO17.joints]

# A flat label map cannot tell the front of the head from its back, so joints on the surface of
# the head or torso are hidden once the body turns that side away by more than these angles.
FAR_SIDE_HIDDEN_AFTER_YAW = {"eye": 70, "ear": 30, "shoulder": 60, "hip": 60}

SKIN_TONES = ((255, 224, 196), (241, 194, 167), (224, 172, 138), (198, 134, 103),
              (161, 102, 72), (120, 75, 50), (87, 55, 38))
HAIR_COLOURS = ((25, 20, 20), (60, 40, 30), (110, 75, 45), (200, 160, 90), (160, 70, 35),
                (150, 150, 150))
EYE_COLOUR = (35, 25, 25)

# ----------------------------------------------------------------------------------------------
# Colours and backgrounds
# ----------------------------------------------------------------------------------------------


def jittered(rng, colour, amount=10):
    return tuple(int(c) for c in np.clip(np.add(colour, rng.integers(-amount, amount + 1, 3)),
                                         0, 255))


def hsv_colour(hue, saturation, value):
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def palette_colour(palette):
    """A sampler of colours near those of a palette (skin tones, hair colours)."""
    return lambda rng: jittered(rng, palette[rng.integers(len(palette))])


def clothing_colour(rng):
    saturation = rng.uniform(0.0, 0.15) if rng.random() < 0.3 else rng.uniform(0.3, 0.9)
    return hsv_colour(rng.random(), saturation, rng.uniform(0.15, 0.95))


def shoe_colour(rng):
    if rng.random() < 0.7:  # most shoes are black, brown or grey
        return hsv_colour(rng.uniform(0.02, 0.1), rng.uniform(0, 0.6), rng.uniform(0.1, 0.45))
    return clothing_colour(rng)


def light_colour(rng):
    if rng.random() < 0.6:  # near-white, barely warm or cool
        return jittered(rng, np.full(3, rng.integers(236, 256)), amount=3)
    return hsv_colour(rng.random(), rng.uniform(0.03, 0.12), rng.uniform(0.9, 1.0))


def contrasting(rng, sample, backdrop, min_distance=90):
    """Draw colours with sample(rng) until one stands out from every backdrop colour."""
    for _ in range(50):
        colour = sample(rng)
        if all(np.abs(np.subtract(colour, b)).sum() >= min_distance for b in backdrop):
            return colour
    return tuple(c // 2 for c in colour)  # backdrops are light, so a darker shade always stands out


def sample_background(rng, size):
    """(size, size, 3) uint8 backdrop, plus its main colours so the figure can avoid them.

    Four in five are one plain light colour; the rest are a soft gradient or a light texture.
    """
    style = rng.random()
    if style < 0.8:
        colour = light_colour(rng)
        return np.full((size, size, 3), colour, dtype=np.uint8), [colour]
    if style < 0.9:
        start, end = light_colour(rng), light_colour(rng)
        angle = rng.uniform(0, 2 * np.pi)
        rows, columns = np.mgrid[0:size, 0:size] / size
        along = columns * np.cos(angle) + rows * np.sin(angle)
        along = (along - along.min()) / (along.max() - along.min())
        pixels = np.add(start, along[..., None] * np.subtract(end, start))
        return pixels.round().astype(np.uint8), [start, end]
    base = light_colour(rng)
    blotches = Image.fromarray(rng.normal(0, 5, (6, 6)).astype(np.float32)).resize(
        (size, size), Image.BICUBIC)
    grain = rng.normal(0, 2, (size, size))
    pixels = np.add(base, (np.asarray(blotches) + grain)[..., None])
    return np.clip(pixels, 0, 255).round().astype(np.uint8), [base]


# ----------------------------------------------------------------------------------------------
# Body, clothes and pose
# ----------------------------------------------------------------------------------------------


def sample_body(rng):
    """Proportions in body units: a standing figure is about 1 tall."""
    build = rng.uniform(0.85, 1.25)  # thin to stocky: scales every thickness
    return {
        "head_radius": rng.uniform(0.058, 0.072), "neck": rng.uniform(0.02, 0.04),
        "torso": rng.uniform(0.27, 0.32), "shoulder_half": rng.uniform(0.09, 0.115),
        "waist": rng.uniform(0.7, 0.9), "hip_half": rng.uniform(0.05, 0.065),
        "upper_arm": rng.uniform(0.16, 0.19), "lower_arm": rng.uniform(0.135, 0.16),
        "upper_leg": rng.uniform(0.22, 0.26), "lower_leg": rng.uniform(0.22, 0.26),
        "arm_radius": 0.025 * build, "forearm_radius": 0.02 * build,
        "thigh_radius": 0.042 * build, "shin_radius": 0.031 * build,
        "torso_depth": 0.06 * build,  # half the chest's front-to-back thickness
    }


# the keys of sample_body that build_skeleton reads: they fix where the joints are
SKELETON_LENGTHS = ("head_radius", "neck", "torso", "shoulder_half", "hip_half", "upper_arm",
                    "lower_arm", "upper_leg", "lower_leg")


def sample_outfit(rng, backdrop, legs):
    """Colours of skin, hair and clothes, and the cut of the clothes."""
    skin = contrasting(rng, palette_colour(SKIN_TONES), backdrop)
    clothes_backdrop = backdrop + [skin]  # clothes that look like skin would read as bare
    top = contrasting(rng, clothing_colour, clothes_backdrop)
    bottom_style = ("trousers", "shorts", "skirt")[rng.choice(3, p=(0.6, 0.15, 0.25))]
    if bottom_style == "skirt" and legs == "sitting":  # a skirt hides the thighs; not modelled
        bottom_style = "trousers"
    dress = bottom_style == "skirt" and rng.random() < 0.4
    bare_legs = rng.random() < 0.6
    return {
        "skin": skin,
        "hair": contrasting(rng, palette_colour(HAIR_COLOURS), backdrop),
        "long_hair": rng.random() < 0.4,
        "top": top,
        "top_length": rng.uniform(0.72, 0.95),  # where the top ends, 1 = at the hip joints
        "sleeves": ("none", "short", "long")[rng.choice(3, p=(0.2, 0.35, 0.45))],
        "bottom_style": bottom_style,
        "bottom": top if dress else contrasting(rng, clothing_colour, clothes_backdrop),
        "skirt_length": rng.uniform(0.45, 0.8),  # fraction of the thigh it covers
        "legwear": skin if bare_legs else contrasting(rng, clothing_colour, backdrop),
        "shoes": contrasting(rng, shoe_colour, backdrop),
    }


def arm_angles(rng, style, swing=0.0):
    """(upper abduction, upper flexion, lower abduction, lower flexion) in degrees.

    Abduction lifts the limb sideways (90 = horizontal, 180 = straight up; negative points
    across the body), flexion swings it forward (90 = pointing at the camera when frontal).
    """
    u = rng.uniform
    if style == "down":
        a, f = u(4, 20), swing + u(-8, 10)
        return a, f, a + u(-3, 8), f + u(0, 30)
    if style == "raised":
        a, f = u(110, 175), u(-10, 25)
        return a, f, a + u(-15, 10), f + u(0, 25)
    if style == "waving":
        return u(50, 95), u(-5, 20), u(150, 180), u(-5, 20)
    if style == "out":
        a, f = u(70, 100), u(-10, 20)
        return a, f, a + u(-10, 20), f + u(0, 40)
    if style == "hands_front":
        return u(0, 20), u(15, 45), -u(35, 80), u(35, 80)
    if style == "hands_on_hips":
        return u(35, 60), u(-25, -5), -u(30, 55), u(-20, 0)
    raise ValueError(style)


def sample_pose(rng):
    """Joint angles for each limb, the view (yaw), forward lean and sideways tilt, in degrees."""
    legs = ("standing", "walking", "sitting")[rng.choice(3, p=(0.45, 0.35, 0.2))]
    arms = ("down", "raised", "waving", "out", "hands_front", "hands_on_hips")[
        rng.choice(6, p=(0.3, 0.17, 0.12, 0.1, 0.16, 0.15))]
    stride, leading_side = rng.uniform(12, 30), rng.choice((1, -1))
    # Some arm poses are often struck with one arm only: the other then hangs down.
    one_side = rng.choice((1, -1))
    both_arms = rng.random() < {"raised": 0.6, "waving": 0.0, "hands_on_hips": 0.5}.get(arms, 1.0)
    limbs = {}
    for name, side in (("left", 1), ("right", -1)):
        if legs == "standing":
            a, f = rng.uniform(0, 9), rng.uniform(-5, 5)
            leg = a, f, a - rng.uniform(0, 4), f - rng.uniform(0, 8)
        elif legs == "walking":  # the back leg trails with a bent knee
            forward = side == leading_side
            a, f = rng.uniform(0, 5), stride if forward else -0.8 * stride
            leg = a, f, a, f - (rng.uniform(0, 10) if forward else rng.uniform(15, 45))
        else:  # sitting: thighs forward, shins down
            a = rng.uniform(3, 18)
            leg = a, rng.uniform(65, 95), 0.3 * a, rng.uniform(-15, 10)
        style = arms if both_arms or side == one_side else "down"
        swing = -0.8 * leg[1] if legs == "walking" else 0.0  # arms swing against the legs
        arm = arm_angles(rng, style, swing)
        limbs[f"{name}_leg"] = np.add(leg, rng.normal(0, 3, 4))
        limbs[f"{name}_arm"] = np.add(arm, rng.normal(0, 3, 4))
    view = rng.choice(3, p=(0.2, 0.4, 0.4) if legs == "sitting" else (0.45, 0.3, 0.25))
    low, high = ((0, 20), (25, 60), (65, 90))[view]  # frontal, three-quarter, profile
    return {
        "limbs": limbs, "legs": legs,
        "yaw": rng.uniform(low, high) * rng.choice((1, -1)),  # > 0: turned to face image right
        "lean": rng.uniform(0, 15) if legs == "sitting" else rng.uniform(-3, 6),
        "roll": rng.uniform(-4, 4),
    }


# ----------------------------------------------------------------------------------------------
# Skeleton in 3D, projection and framing
# ----------------------------------------------------------------------------------------------

LEFT, DOWN, FORWARD = np.eye(3)  # the body's own frame: x to its left, y down, z forward


def limb_direction(abduction, flexion, side):
    """Unit vector of a limb: pointing down, lifted sideways by abduction, forward by flexion."""
    a, f = np.radians(abduction), np.radians(flexion)
    return np.array([side * np.sin(a) * np.cos(f), np.cos(a) * np.cos(f), np.sin(f)])


def build_skeleton(body, pose):
    """3D points in body units: the 17 COCO joints plus the extra points the drawing needs."""
    lean = np.radians(pose["lean"])
    up = np.array([0.0, -np.cos(lean), np.sin(lean)])  # the torso's axis, leaning forward
    r = body["head_radius"]
    pelvis = np.zeros(3)
    neck = pelvis + body["torso"] * up
    head = neck + (body["neck"] + r) * up
    # Face points lie within 0.8 r of the head's centre, so they project inside the head drawing.
    points = {
        "pelvis": pelvis, "neck": neck, "head": head,
        "nose": head + r * (0.75 * FORWARD + 0.12 * DOWN),
        "face": head + r * (0.07 * FORWARD + 0.08 * DOWN),
        "hair": head + r * (-0.15 * FORWARD - 0.14 * DOWN),
        "hair_nape": head + r * (-0.35 * FORWARD + 0.3 * DOWN),
        "hair_end": head + r * (-0.5 * FORWARD + 2.0 * DOWN),
    }
    limbs = pose["limbs"]
    for name, side in (("left", 1), ("right", -1)):
        points[f"{name}_eye"] = head + r * (side * 0.3 * LEFT - 0.12 * DOWN + 0.68 * FORWARD)
        points[f"{name}_ear"] = head + r * (side * 0.72 * LEFT - 0.15 * FORWARD)
        shoulder = neck - 0.035 * up + side * body["shoulder_half"] * LEFT
        upper_a, upper_f, lower_a, lower_f = limbs[f"{name}_arm"]
        elbow = shoulder + body["upper_arm"] * limb_direction(upper_a, upper_f, side)
        forearm = limb_direction(lower_a, lower_f, side)
        wrist = elbow + body["lower_arm"] * forearm
        points.update({f"{name}_shoulder": shoulder, f"{name}_elbow": elbow,
                       f"{name}_wrist": wrist, f"{name}_hand": wrist + 0.065 * forearm})
        hip = pelvis + side * body["hip_half"] * LEFT
        upper_a, upper_f, lower_a, lower_f = limbs[f"{name}_leg"]
        knee = hip + body["upper_leg"] * limb_direction(upper_a, upper_f, side)
        shin = limb_direction(lower_a, lower_f, side)
        ankle = knee + body["lower_leg"] * shin
        heel = ankle + 0.03 * shin
        toe = heel + 0.085 * limb_direction(lower_a, lower_f + 90, side)  # foot square to shin
        points.update({f"{name}_hip": hip, f"{name}_knee": knee, f"{name}_ankle": ankle,
                       f"{name}_heel": heel, f"{name}_toe": toe})
    return points


def project(points, yaw, roll):
    """Orthographic camera: turn the body by yaw about the vertical, tilt it by roll in the
    picture plane. (N, 3) points -> (N, 2) x, y and (N,) depth (larger is nearer the camera)."""
    yaw, roll = np.radians(yaw), np.radians(roll)
    x = points[:, 0] * np.cos(yaw) + points[:, 2] * np.sin(yaw)
    depth = -points[:, 0] * np.sin(yaw) + points[:, 2] * np.cos(yaw)
    y = points[:, 1]
    xy = np.stack([x * np.cos(roll) - y * np.sin(roll), x * np.sin(roll) + y * np.cos(roll)], 1)
    return xy, depth


def frame(rng, xy, margins, size):
    """Scale (pixels per body unit) and pixel positions that place the figure in the frame.

    Usually the whole figure fits with room to spare; about one in eight is zoomed in and
    pushed over an edge of the frame (mostly the bottom, cutting off the feet).
    """
    low, high = (xy - margins[:, None]).min(0), (xy + margins[:, None]).max(0)
    extent = high - low
    scale = min(rng.uniform(0.6, 0.92) * size / extent[1], 0.94 * size / extent[0])
    cropped = rng.random() < 0.12
    if cropped:
        scale *= rng.uniform(1.0, 1.4)
    free = size - extent * scale  # room left around the figure, negative when it is too big
    offset = free * rng.uniform(0.1, 0.9, 2)
    if cropped:
        edge = rng.choice(4, p=(0.5, 0.2, 0.2, 0.1))  # bottom, left, right, top
        axis = 1 if edge in (0, 3) else 0
        overhang = extent[axis] * scale * rng.uniform(0.08, 0.3)
        offset[axis] = free[axis] + overhang if edge in (0, 2) else -overhang
    return scale, (xy - low) * scale + offset


# ----------------------------------------------------------------------------------------------
# Drawing: body parts as polygons, painted back to front
# ----------------------------------------------------------------------------------------------


def ellipse(centre, radius_x, radius_y, angle=0.0, corners=24):
    t = np.linspace(0, 2 * np.pi, corners, endpoint=False)
    x, y = radius_x * np.cos(t), radius_y * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([x * c - y * s, x * s + y * c], 1) + centre


def capsule(start, end, start_radius, end_radius, corners=8):
    """A limb: a (tapered) bar from start to end with round ends."""
    along = end - start
    length = np.hypot(*along)
    if length < 1e-6:  # seen end-on
        return ellipse(start, max(start_radius, end_radius), max(start_radius, end_radius))
    angle = np.arctan2(along[1], along[0])
    around_end = angle + np.linspace(-np.pi / 2, np.pi / 2, corners + 1)
    around_start = around_end + np.pi
    return np.concatenate([
        end + end_radius * np.stack([np.cos(around_end), np.sin(around_end)], 1),
        start + start_radius * np.stack([np.cos(around_start), np.sin(around_start)], 1)])


# Torso cross-sections from the neck (t = 0) to just below the hip joints (t = 1.12).
TORSO_T = (0.0, 0.1, 0.45, 0.75, 1.0, 1.12)


def torso_outline(neck, pelvis, widths, depths, t_values, yaw, scale):
    """Polygon around the torso's axis. At each t the body's cross-section is an ellipse of
    half-width w and half-depth d; turned by yaw, it shows sqrt((w cos)^2 + (d sin)^2) wide."""
    axis = pelvis - neck
    normal = np.array([-axis[1], axis[0]]) / np.hypot(*axis)
    yaw = np.radians(yaw)
    extents = scale * np.hypot(np.multiply(widths, np.cos(yaw)), np.multiply(depths, np.sin(yaw)))
    centres = neck + np.outer(t_values, axis)
    return np.concatenate([centres + np.outer(extents, normal),
                           (centres - np.outer(extents, normal))[::-1]])


def shade(colour, depth):
    """Parts further back are a little darker, so overlapping limbs of one colour stay apart."""
    factor = np.clip(1 + depth, 0.8, 1.0)
    return tuple(int(c) for c in np.clip(np.multiply(colour, factor), 0, 255))


def body_parts(p, z, body, outfit, yaw, roll, scale, hidden):
    """Every part as (depth, label, [(polygon in pixels, colour), ...]); `p` and `z` map point
    names to pixel positions and depths. Pieces of a part are drawn in the order given."""
    parts = []

    def add(depth, name, pieces):
        parts.append((depth, PART[name], [(polygon, shade(colour, depth))
                                          for polygon, colour in pieces]))

    def bar(a, b, radius_a, radius_b):
        return capsule(p[a], p[b], max(radius_a * scale, MIN_RADIUS_PX),
                       max(radius_b * scale, MIN_RADIUS_PX))

    # Torso: the whole outline in the bottom's colour, then the top over it down to its hem.
    torso_depth = (z["neck"] + z["pelvis"]) / 2 - 0.02  # limbs at its sides are drawn over it
    shoulders = body["shoulder_half"]
    hips = body["hip_half"] + 0.9 * body["thigh_radius"]  # the thighs' outer edge
    widths = (0.55 * shoulders, shoulders + 0.4 * body["arm_radius"], 0.95 * shoulders,
              body["waist"] * shoulders, hips, 0.75 * hips)
    depths = np.multiply(body["torso_depth"], (0.75, 1.0, 1.05, 0.9, 1.0, 0.85))
    hem = outfit["top_length"]
    top_t = [t for t in TORSO_T if t < hem] + [hem]
    outline = functools.partial(torso_outline, p["neck"], p["pelvis"], yaw=yaw, scale=scale)
    add(torso_depth, "torso", [
        (outline(widths, depths, TORSO_T), outfit["bottom"]),
        (outline(np.interp(top_t, TORSO_T, widths), np.interp(top_t, TORSO_T, depths), top_t),
         outfit["top"])])

    # Head: long hair falls behind the torso; neck, then hair cap, face and eyes in front.
    r = body["head_radius"] * scale
    tilt = np.radians(roll)
    if outfit["long_hair"]:
        add(torso_depth - 0.04, "head",
            [(capsule(p["hair_nape"], p["hair_end"], 0.95 * r, 0.85 * r), outfit["hair"])])
    add(z["head"] + 0.005, "head", [(bar("neck", "head", 0.42 * body["head_radius"],
                                         0.42 * body["head_radius"]), outfit["skin"])])
    eyes = [(ellipse(p[eye], max(0.1 * r, 0.4), max(0.1 * r, 0.4)), EYE_COLOUR)
            for eye in ("left_eye", "right_eye") if not hidden[COCO17.joints.index(eye)]]
    add(z["head"] + 0.01, "head", [(ellipse(p["hair"], 1.06 * r, 1.12 * r, tilt), outfit["hair"]),
                                   (ellipse(p["face"], 0.93 * r, 1.07 * r, tilt), outfit["skin"])]
        + eyes)

    # Limbs: arms sit on the body's surface, so they win ties with the torso and legs.
    sleeves, bottom_style = outfit["sleeves"], outfit["bottom_style"]
    upper_arm = outfit["top"] if sleeves != "none" else outfit["skin"]
    lower_arm = outfit["top"] if sleeves == "long" else outfit["skin"]
    upper_leg = outfit["bottom"] if bottom_style != "skirt" else outfit["legwear"]
    lower_leg = outfit["bottom"] if bottom_style == "trousers" else outfit["legwear"]

    def between(a, b):
        return (z[a] + z[b]) / 2

    thigh_depths = []
    for side in ("left", "right"):
        shoulder, elbow, wrist, hand, hip, knee, ankle, heel, toe = (
            f"{side}_{point}" for point in ("shoulder", "elbow", "wrist", "hand", "hip", "knee",
                                            "ankle", "heel", "toe"))
        add(between(shoulder, elbow) + 0.03, f"{side}_upper_arm",
            [(bar(shoulder, elbow, body["arm_radius"], 0.9 * body["arm_radius"]), upper_arm)])
        add(between(elbow, wrist) + 0.03, f"{side}_lower_arm",
            [(bar(elbow, wrist, body["forearm_radius"], 0.85 * body["forearm_radius"]), lower_arm),
             (bar(wrist, hand, 0.022, 0.02), outfit["skin"])])
        thigh_depths.append(between(hip, knee))
        add(thigh_depths[-1], f"{side}_upper_leg",
            [(bar(hip, knee, body["thigh_radius"], 0.78 * body["thigh_radius"]), upper_leg)])
        add(between(knee, ankle), f"{side}_lower_leg",
            [(bar(knee, ankle, body["shin_radius"], 0.7 * body["shin_radius"]), lower_leg),
             (bar(heel, toe, 0.024, 0.02), outfit["shoes"])])

    # A skirt hangs from the waist over both thighs; it belongs to the torso's label.
    if bottom_style == "skirt":
        waist = outline(widths[3:4], depths[3:4], TORSO_T[3:4])
        waist = waist[np.argsort(waist[:, 0])]
        hems = np.array([p[f"{side}_hip"] + outfit["skirt_length"]
                         * (p[f"{side}_knee"] - p[f"{side}_hip"]) for side in ("left", "right")])
        flare = 1.4 * body["thigh_radius"] * scale
        hem_y = hems[:, 1].max()
        skirt = np.array([waist[0], waist[1], (hems[:, 0].max() + flare, hem_y),
                          (hems[:, 0].min() - flare, hem_y)])
        add(max(torso_depth, *thigh_depths) + 0.01, "torso", [(skirt, outfit["bottom"])])
    return parts


def majority_downsample(labels, factor):
    """Shrink a label map by `factor`: each pixel takes the label most of its block shows."""
    height, width = labels.shape[0] // factor, labels.shape[1] // factor
    blocks = labels.reshape(height, factor, width, factor).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(height * width, factor * factor)
    # One bincount over (block, label) pairs counts every label of every block at once.
    pairs = np.arange(height * width)[:, None] * NUM_PART_LABELS + blocks
    counts = np.bincount(pairs.ravel(), minlength=height * width * NUM_PART_LABELS)
    return counts.reshape(height, width, NUM_PART_LABELS).argmax(-1).astype(np.uint8)


def paint(parts, background):
    """Draw the parts back to front at SUPERSAMPLE x size; return the picture and label map."""
    big = np.repeat(np.repeat(background, SUPERSAMPLE, 0), SUPERSAMPLE, 1)
    picture = Image.fromarray(big)
    labels = Image.new("L", picture.size, 0)
    draw_picture, draw_labels = ImageDraw.Draw(picture), ImageDraw.Draw(labels)
    for _, label, pieces in sorted(parts, key=lambda part: part[0]):  # stable: ties keep order
        for polygon, colour in pieces:
            # Pillow puts integer coordinates at pixel centres; ours put them at pixel corners.
            corners = (polygon * SUPERSAMPLE - 0.5).ravel().tolist()
            draw_picture.polygon(corners, fill=colour, outline=tuple(c * 3 // 4 for c in colour),
                                 width=SUPERSAMPLE // 2)
            draw_labels.polygon(corners, fill=label)
    return picture.reduce(SUPERSAMPLE), majority_downsample(np.asarray(labels), SUPERSAMPLE)


def far_side_hidden(yaw):
    """Per COCO joint: is it on the side of the head or body turned away from the camera?"""
    hidden = []
    for joint in COCO17.joints:
        side, _, kind = joint.partition("_")
        limit = FAR_SIDE_HIDDEN_AFTER_YAW.get(kind)
        turned_away = yaw if side == "left" else -yaw  # yaw > 0 turns the left side away
        hidden.append(limit is not None and turned_away > limit)
    return hidden


def render_mannequin(rng, image_size=64, restyle=None):
    """One random figure: (PIL RGB image, keypoints float32 (17, 3), part map uint8 (H, W)).

    See the module docstring for the keypoint and label conventions. restyle: a second
    generator that draws another person (build, clothes, colours, backdrop) in the very pose,
    limb lengths and place in the frame that `rng` gives, so at the same keypoints: what a
    sampler that follows the pose perfectly could draw (evaluate.py's pose fidelity).
    """
    body = sample_body(rng)
    pose = sample_pose(rng)
    background, backdrop = sample_background(rng, image_size)
    outfit = sample_outfit(rng, backdrop, pose["legs"])
    skeleton = build_skeleton(body, pose)
    names = list(skeleton)
    xy, depth = project(np.stack([skeleton[name] for name in names]), pose["yaw"], pose["roll"])
    margins = np.array([1.2 * body["head_radius"] if name == "hair" else body["thigh_radius"]
                        for name in names])
    scale, xy = frame(rng, xy, margins, image_size)
    if restyle is not None:  # the joints are placed; keep the sizes drawn around them
        body = {**sample_body(restyle), **{key: body[key] for key in SKELETON_LENGTHS}}
        background, backdrop = sample_background(restyle, image_size)
        outfit = sample_outfit(restyle, backdrop, pose["legs"])
    points, depths = dict(zip(names, xy)), dict(zip(names, depth))
    hidden = far_side_hidden(pose["yaw"])
    parts = body_parts(points, depths, body, outfit, pose["yaw"], pose["roll"], scale, hidden)
    image, part_map = paint(parts, background)

    keypoints = np.zeros((COCO17.num_keypoints, 3), dtype=np.float32)
    keypoints[:, :2] = np.round([points[joint] for joint in COCO17.joints], 2)
    for k, (x, y, _) in enumerate(keypoints):
        if not (0 <= x < image_size and 0 <= y < image_size):
            keypoints[k, 2] = 0
        elif part_map[int(y), int(x)] in JOINT_LABELS[k] and not hidden[k]:
            keypoints[k, 2] = 2
        else:
            keypoints[k, 2] = 1
    return image, keypoints, part_map


# ----------------------------------------------------------------------------------------------
# Writing a dataset folder
# ----------------------------------------------------------------------------------------------


def render_set_image(seed, index, image_size, restyle=None):
    """Image `index` of the set of `seed`, drawn from np.random.default_rng([seed, index]) (the
    module docstring): render_mannequin's (image, keypoints, part map)."""
    return render_mannequin(np.random.default_rng([seed, index]), image_size, restyle)


def write_one(folder, image_size, seed, digits, index):
    """Render image `index` and save its picture and part map; return its poses.json entry."""
    image, keypoints, part_map = render_set_image(seed, index, image_size)
    name = f"images/{index:0{digits}d}.png"
    image.save(os.path.join(folder, name))
    Image.fromarray(part_map).save(os.path.join(folder, "parts", name))
    return name, [[round(float(x), 2), round(float(y), 2), int(v)] for x, y, v in keypoints]


def same_pose_other_people(folder, names, image_size, seed=0):
    """Pictures `names` (images/NNNNNN.png) of the mannequin set in `folder`, each drawn as
    another person in the same pose (render_mannequin's restyle; seeded by `seed` and the
    index): [(PIL image, keypoints (17, 3))], or None when `folder` holds no set of this
    generator at `image_size`."""
    settings = written_settings(folder)
    stems = [os.path.splitext(os.path.basename(name))[0] for name in names]
    if (settings is None or settings.get("generator_version") != GENERATOR_VERSION
            or settings["image_size"] != image_size or not all(map(str.isdigit, stems))):
        return None
    restyle = [np.random.default_rng([seed % 2**32, 1, int(stem)]) for stem in stems]
    return [render_set_image(settings["seed"], int(stem), image_size, style)[:2]
            for stem, style in zip(stems, restyle)]


def written_settings(folder):
    """The settings in folder's mannequins.json, or None where there is none."""
    try:
        with open(os.path.join(folder, "mannequins.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_finished_set(folder, settings):
    """Does folder hold a complete set made with these settings? (Sets appear whole, by rename.)"""
    written = written_settings(folder)
    return (written == settings and os.path.isfile(os.path.join(folder, "poses.json"))
            and len(os.listdir(os.path.join(folder, "images"))) == settings["count"])


def write_dataset(out_dir, count, image_size=64, seed=0, workers=None):
    """Write `count` mannequins to out_dir (layout in the module docstring).

    All or nothing: the set is written to the sibling folder out_dir.tmp-<pid> and renamed into
    place when complete. Returns False without writing when out_dir already holds this very set;
    raises UserError when out_dir holds anything else.
    """
    if count < 1 or image_size < 16:
        raise UserError(f"need count >= 1 and image size >= 16, got {count} and {image_size}")
    out_dir = os.path.normpath(out_dir)
    settings = {"count": count, "image_size": image_size, "seed": seed,
                "layout": COCO17.name, "generator_version": GENERATOR_VERSION}
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        if is_finished_set(out_dir, settings):
            return False
        raise UserError(f"{out_dir} already exists and is not a mannequin set with count={count}, "
                        f"image_size={image_size}, seed={seed}; pick another folder or remove it")
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(os.path.join(tmp_dir, "parts", "images"))
    os.makedirs(os.path.join(tmp_dir, "images"))
    digits = max(6, len(str(count - 1)))
    draw = functools.partial(write_one, tmp_dir, image_size, seed, digits)
    workers = workers or os.cpu_count() or 1
    try:
        with Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
            indices = range(count)
            results = pool.imap(draw, indices, chunksize=32) if pool else map(draw, indices)
            poses = dict(tqdm(results, total=count, desc="mannequins", unit="img"))
        with open(os.path.join(tmp_dir, "poses.json"), "w") as f:
            json.dump(poses, f)
        with open(os.path.join(tmp_dir, "mannequins.json"), "w") as f:
            json.dump(settings, f, indent=2)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above); a folder cannot be renamed over on Windows
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return True


def make_readme_figure(path, count=16, image_size=128, seed=0):
    """Save a grid of [mannequin with its skeleton, coloured part map] pairs, four a row."""
    rows = []
    for index in range(count):
        image, keypoints, part_map = render_set_image(seed, index, image_size)
        if index % 4 == 0:
            rows.append([])
        rows[-1] += [draw_skeleton(keypoints, COCO17, image.size, background=image),
                     colorize_parts(part_map)]
    utils.save_image_grid(rows, path)


def main(argv=None):
    parser = cli.ArgumentParser(description="Write the synthetic mannequin dataset.")
    parser.add_argument("--out", type=cli.output_folder, required=True,
                        help="folder to create")
    parser.add_argument("--count", type=cli.positive_int, default=4000)
    parser.add_argument("--image-size", type=cli.positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=cli.positive_int, default=None,
                        help="processes (default: all cores)")
    args = parser.parse_args(argv)
    start = time.time()
    if write_dataset(args.out, args.count, args.image_size, args.seed, args.workers):
        print(f"wrote {args.count} mannequins of {args.image_size} px to {args.out} "
              f"in {time.time() - start:.1f} s")
    else:
        print(f"{args.out} already holds these {args.count} mannequins; nothing to do")


if __name__ == "__main__":
    utils.run_cli(main)
