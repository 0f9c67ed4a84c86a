"""Image files: reading any picture as RGB, part maps, finding the images of a folder,
turning one example into the training square (`prepare_example`) and a picture into the
models' tensor (`to_tensor`), and checking that the squares are large enough
(`require_resolution`, stage 3).

The first step of the pipeline: data.py lists a dataset's examples and calls prepare_example
for each; sample.py reads the image it completes the same way. Keypoints and part maps are
re-framed with their image by poses.py.
"""
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from poses import (MANNEQUIN_PARTS, PART_LABELLINGS, check_keypoints_inside, frame_box,
                   reframe_keypoints, reframe_picture)
from utils import UserError, from_uint8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PARTS_FOLDER = "parts"  # DIR/parts/<relative image path with .png> holds the part label maps
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # decompression-bomb guard; --max-image-pixels raises it
# open_image enforces --max-image-pixels itself. PIL's fixed guard would override that flag and
# report a huge file as 'unreadable' (skipped) instead of 'too large', so it is switched off.
Image.MAX_IMAGE_PIXELS = None


class UnreadableImage(UserError):
    """An image file that cannot be decoded: skipped with a warning unless --strict."""


@dataclass
class Example:
    """One training example: which file, and which square of it becomes the training image."""

    name: str  # relative path (plus '#person<id>' for COCO people), for messages and outputs
    image_path: str
    keypoints: np.ndarray = None  # (K, 3) x, y, v in the displayed image's pixel coordinates
    part_path: str = None
    box: tuple = None  # (x0, y0, side): the square region (may reach outside the image)
    pose_source: str = None  # the poses.json its keypoints come from, checked against the image
    annotated_size: tuple = None  # (width, height) its COCO entry gives, checked likewise


def image_name(example_name):
    """An Example.name -> the relative path of its image: a COCO person's '#person<id>' cut off
    (a '#' of the file's own name stays)."""
    person = re.fullmatch(r"(.*)#person(-?\d+|None)", example_name)
    return person[1] if person else example_name


def to_rgb(image):
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK, ...) -> RGB; transparency over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or array.max() > 255:
            array = array / 257.0  # 16-bit range -> 8-bit range
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
    if "transparency" in image.info:  # a palette entry or (L, RGB) one colour marked transparent
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


def displayed_size(path):
    """(width, height) of the image at `path` as open_image gives it (EXIF orientation applied),
    read from its header only; UnreadableImage when it cannot be read."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientations turned 90
    except Exception as error:
        raise UnreadableImage(f"cannot read image {path}: {type(error).__name__}: "
                              f"{error}") from None
    return (height, width) if turned else (width, height)


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
    annotated = example.annotated_size
    if annotated is not None and annotated != (width, height):
        raise UserError(f"{example.image_path} is {width}x{height} as displayed (EXIF orientation "
                        f"applied), but its COCO entry says {annotated[0]:g}x{annotated[1]:g}, so "
                        "its keypoints would land elsewhere; correct the entry's width and "
                        "height, or the file's orientation")
    square = (size, size)
    box = (example.box + example.box[2:] if example.box  # (x0, y0, side, side)
           else frame_box((width, height), square, resize_mode))
    image_array = np.array(reframe_picture(image, box, square, border_colour(image),  # writable
                                           Image.LANCZOS))
    keypoints = parts = None
    if example.keypoints is not None:
        keypoints = reframe_keypoints(example.keypoints, box, square)
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
        labels = Image.fromarray(labels.astype(np.uint8))
        parts = np.asarray(reframe_picture(labels, box, square, 0, Image.NEAREST))
    return image_array, keypoints, parts


def to_tensor(picture):
    """A picture (uint8 (H, W, 3) array or PIL image) -> (3, H, W) float tensor in [-1, 1]."""
    return from_uint8(torch.from_numpy(np.array(picture)).permute(2, 0, 1))


def require_resolution(examples, size, resize_mode):
    """UserError unless every example's square (the one prepare_example keeps) holds at least
    `size` pixels across: stage 3 learns from high-resolution originals, not enlarged ones."""
    for example in examples:
        if example.box is not None:  # a COCO person's square
            side, where = example.box[2], f"the square around {example.name}"
        else:
            with Image.open(example.image_path) as image:  # reads the header only
                width, height = image.size
            side = frame_box((width, height), (size, size), resize_mode)[2]
            where = f"{example.image_path} ({width}x{height})"
        if side < size:
            raise UserError(f"{where} gives a {side} px square, smaller than the {size} px "
                            "output: super-resolution is trained and scored on originals of "
                            "at least its output size; remove such images, or pass a "
                            "--dataset-path of larger ones")
