"""The data layer (data.py, images.py, poses.py): reading folders and COCO files, squaring,
flips, splits, batches.

Every test builds its own tiny dataset in tmp_path, so the expected numbers can be worked out
by hand from the files it writes.
"""
import argparse
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import images
from conditions import keypoint_cells
from data import EpochBatchSampler, PoseImageDataset, is_validation, make_loader, unflipped_batches
from images import open_image
from poses import (COCO17, DENSEPOSE_PARTS, MANNEQUIN_PARTS, NUM_PART_LABELS, OPENPOSE18,
                   PART_NAMES, colorize_parts, flip_example, frame_box, reframe_keypoints,
                   resolve_part_labelling)
from utils import UserError, stable_hash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEFT_LOWER_ARM, RIGHT_LOWER_ARM = PART_NAMES.index("left_lower_arm"), \
    PART_NAMES.index("right_lower_arm")
needs_mannequins = pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "mannequins.py")),
                                      reason="mannequins.py is not written yet")


# ----------------------------------------------------------------------------------------------
# Helpers that write tiny datasets
# ----------------------------------------------------------------------------------------------


def save(path, array_or_image, **save_args):
    """Write an image (PIL image or uint8 array), creating folders; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = (array_or_image if isinstance(array_or_image, Image.Image)
             else Image.fromarray(array_or_image))
    image.save(path, **save_args)
    return path


def noise_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def coco_keypoints(**joints):
    """(17, 3) keypoints, all v=0 except the named joints: coco_keypoints(left_wrist=(x, y))."""
    keypoints = np.zeros((17, 3), np.float32)
    for name, (x, y) in joints.items():
        keypoints[COCO17.joints.index(name)] = (x, y, 2)
    return keypoints


def write_poses(root, poses):
    """poses.json from {name: array or list} (or any JSON value); strings are written as is."""
    if isinstance(poses, dict):
        poses = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in poses.items()}
    text = poses if isinstance(poses, str) else json.dumps(poses)
    with open(os.path.join(root, "poses.json"), "w") as f:
        f.write(text)


def dataset(root, **kwargs):
    kwargs = {"split": "all", "progress": False, **kwargs}
    return PoseImageDataset(str(root), **kwargs)


def arm_example(height=12, width=12):
    """A hand-made picture: only the person's left lower arm, drawn red on the image's right.

    Returns image (H, W, 3), COCO keypoints with the left wrist on the arm, part labels (H, W).
    """
    image = np.full((height, width, 3), 128, np.uint8)
    parts = np.zeros((height, width), np.uint8)
    image[4:7, 8:10] = (255, 0, 0)
    parts[4:7, 8:10] = LEFT_LOWER_ARM
    keypoints = coco_keypoints(left_wrist=(8.5, 5.5))  # inside pixel (row 5, column 8)
    return image, keypoints, parts


def under(keypoint, array):
    """The value of `array` at the pixel that a continuous (x, y) keypoint falls in."""
    return array[int(keypoint[1]), int(keypoint[0])]


def denormalize(image):
    """(3, S, S) float in [-1, 1] -> (S, S, 3) uint8-valued ints."""
    return ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(int)


# ----------------------------------------------------------------------------------------------
# Flips swap left and right
# ----------------------------------------------------------------------------------------------


def test_flipping_twice_gives_back_image_keypoints_and_parts():
    rng = np.random.default_rng(0)
    image = noise_image(6, 8)
    keypoints = np.concatenate([rng.uniform(0, 8, (17, 2)), rng.integers(0, 3, (17, 1))], 1)
    keypoints = keypoints.astype(np.float32)
    parts = rng.integers(0, NUM_PART_LABELS, (6, 8)).astype(np.uint8)
    once = flip_example(image, keypoints, parts, COCO17)
    twice = flip_example(*once, COCO17)
    assert not np.array_equal(once[0], image)
    np.testing.assert_array_equal(twice[0], image)
    np.testing.assert_allclose(twice[1], keypoints, atol=1e-5)
    np.testing.assert_array_equal(twice[2], parts)


@pytest.mark.parametrize("layout", [COCO17, OPENPOSE18], ids=lambda layout: layout.name)
def test_flip_swaps_left_and_right_keypoint_labels(layout):
    width = 10
    keypoints = np.zeros((layout.num_keypoints, 3), np.float32)
    keypoints[:, 0] = np.arange(layout.num_keypoints) * 0.5  # each joint has its own x
    keypoints[:, 1] = np.arange(layout.num_keypoints)
    keypoints[:, 2] = 2
    image = np.zeros((4, width, 3), np.uint8)
    _, flipped, _ = flip_example(image, keypoints, None, layout)
    joint = layout.joints.index
    # After the flip the old left wrist is the right wrist, mirrored: x -> width - x.
    assert flipped[joint("right_wrist")].tolist() == [width - keypoints[joint("left_wrist"), 0],
                                                      keypoints[joint("left_wrist"), 1], 2]
    for name in layout.joints:
        mirror = (name.replace("left_", "right_") if name.startswith("left_")
                  else name.replace("right_", "left_"))
        np.testing.assert_allclose(flipped[joint(mirror), :2],
                                   [width - keypoints[joint(name), 0], keypoints[joint(name), 1]])


def test_flip_moves_a_left_arm_keypoint_onto_right_arm_pixels():
    image, keypoints, parts = arm_example()
    left_wrist, right_wrist = COCO17.joints.index("left_wrist"), COCO17.joints.index("right_wrist")
    assert under(keypoints[left_wrist], parts) == LEFT_LOWER_ARM
    image, keypoints, parts = flip_example(image, keypoints, parts, COCO17)
    assert under(keypoints[right_wrist], parts) == RIGHT_LOWER_ARM
    assert tuple(under(keypoints[right_wrist], image)) == (255, 0, 0)  # the pixels moved too
    assert LEFT_LOWER_ARM not in parts


def test_dataset_items_flipped_by_the_sampler_keep_keypoints_on_their_arm(tmp_path):
    image, keypoints, parts = arm_example()
    save(tmp_path / "person.png", image)
    save(tmp_path / "parts" / "person.png", parts)
    write_poses(tmp_path, {"person.png": keypoints})
    data = dataset(tmp_path, image_size=12)
    left_wrist, right_wrist = COCO17.joints.index("left_wrist"), COCO17.joints.index("right_wrist")
    plain, flipped = data[(0, False)], data[(0, True)]
    assert under(plain["keypoints"][left_wrist], plain["parts"]) == LEFT_LOWER_ARM
    assert under(flipped["keypoints"][right_wrist], flipped["parts"]) == RIGHT_LOWER_ARM
    assert under(flipped["keypoints"][right_wrist], denormalize(flipped["image"])).tolist() == \
        [255, 0, 0]
    assert flipped["keypoints"][left_wrist, 2] == 0  # the right wrist was not labelled
    assert torch.equal(plain["image"], data[0]["image"])  # a bare index means no flip


@needs_mannequins
def test_mannequin_joints_sit_on_their_own_body_parts_before_and_after_a_flip(tmp_path):
    import mannequins
    mannequins.write_dataset(str(tmp_path / "set"), 6, image_size=32, seed=0, workers=1)
    data = dataset(tmp_path / "set", image_size=32)
    checked = 0
    for index in range(len(data)):
        for flip in (False, True):
            item = data[(index, flip)]
            for joint, (x, y, v) in enumerate(item["keypoints"].tolist()):
                # v = 2 promises the joint's pixel shows one of its parts; a joint exactly on a
                # pixel edge (x whole) belongs to the pixel on its right, so leave those out.
                if v == 2 and x != int(x):
                    assert under((x, y), item["parts"]).item() in mannequins.JOINT_LABELS[joint]
                    checked += 1
    assert checked > 50


# ----------------------------------------------------------------------------------------------
# Squaring: pad or crop, then resize; keypoints and part maps follow
# ----------------------------------------------------------------------------------------------


def test_square_box_pads_a_tall_image_and_centre_crops_a_wide_one():
    assert frame_box((40, 80), (64, 64), "pad") == (-20, 0, 80, 80)
    assert frame_box((80, 40), (64, 64), "crop") == (20, 0, 40, 40)


def test_pad_moves_keypoints_right_by_the_padding_then_scales_them():
    # 40 wide x 80 tall, padded 20 px each side to 80 x 80, resized to 64: scale 0.8.
    out = reframe_keypoints(np.array([[10, 20, 2]], np.float32), (-20, 0, 80, 80), (64, 64))
    np.testing.assert_allclose(out, [[(10 + 20) * 0.8, 20 * 0.8, 2]])  # (24, 16)


def test_crop_moves_keypoints_and_hides_those_outside_the_square():
    # 80 wide x 40 tall, centre square x in [20, 60), resized to 64: scale 1.6.
    keypoints = np.array([[30, 10, 2], [5, 10, 2], [61, 10, 1]], np.float32)
    out = reframe_keypoints(keypoints, (20, 0, 40, 40), (64, 64))
    np.testing.assert_allclose(out[0], [16, 16, 2])  # (30 - 20, 10) * 1.6
    assert out[1, 2] == 0 and out[2, 2] == 0  # cropped away: not visible any more


def test_a_joint_on_the_images_edge_stays_visible_and_its_flip_too(tmp_path):
    """poses.json allows 0 <= x <= width; a flip maps x = 0 to x = width: both are on the image."""
    keypoints = np.array([[0, 10, 2], [40, 10, 2], [40.5, 10, 2]], np.float32)
    out = reframe_keypoints(keypoints, (0, 0, 40, 40), (64, 64))
    np.testing.assert_array_equal(out[:, 2], [2, 2, 0])  # the edges on it, beyond them not
    pose = np.zeros((17, 3), np.float32)
    pose[COCO17.joints.index("left_wrist")] = out[0]  # x = 0
    _, flipped, _ = flip_example(np.zeros((64, 64, 3), np.uint8), pose, None, COCO17)
    wrist = COCO17.joints.index("right_wrist")
    assert flipped[wrist, 0] == 64  # now on the right edge, still a keypoint token (y 16: row 8)
    assert keypoint_cells(torch.from_numpy(flipped)[None], 32, 64)[0, wrist] == 8 * 32 + 31


def test_padding_uses_the_border_colour(tmp_path):
    image = np.zeros((80, 40, 3), np.uint8)
    image[:] = (100, 150, 200)
    image[30:50, 10:30] = (0, 0, 0)  # a dark subject that does not touch the border
    save(tmp_path / "tall.png", image)
    item = dataset(tmp_path, image_size=80, resize_mode="pad")[0]
    pixels = denormalize(item["image"])
    assert (pixels[:, :20] == (100, 150, 200)).all() and (pixels[:, 60:] == (100, 150, 200)).all()
    np.testing.assert_array_equal(pixels[:, 20:60], image)


def test_crop_mode_keeps_the_centre_square(tmp_path):
    image = noise_image(40, 80)
    save(tmp_path / "wide.png", image)
    item = dataset(tmp_path, image_size=40, resize_mode="crop")[0]
    np.testing.assert_array_equal(denormalize(item["image"]), image[:, 20:60])


def test_part_maps_are_padded_with_background_and_resized_nearest(tmp_path):
    rng = np.random.default_rng(0)
    coarse = rng.choice(np.array([2, 9], np.uint8), (40, 20))  # blending would make 3..8
    labels = np.kron(coarse, np.ones((2, 2), np.uint8))  # 40 x 80, constant on 2x2 blocks
    save(tmp_path / "tall.png", noise_image(80, 40))
    save(tmp_path / "parts" / "tall.png", labels)
    parts = dataset(tmp_path, image_size=40)[0]["parts"]  # pad to 80 x 80, halve
    assert parts.dtype == torch.long
    assert (parts[:, :10] == 0).all() and (parts[:, 30:] == 0).all()
    np.testing.assert_array_equal(parts[:, 10:30].numpy(), coarse)
    odd_scale = dataset(tmp_path, image_size=27)[0]["parts"]  # 80 -> 27: pixels mix
    assert set(odd_scale.unique().tolist()) <= {0} | set(coarse.flatten().tolist())


# ----------------------------------------------------------------------------------------------
# Image modes, 16-bit, transparency, CMYK, EXIF orientation
# ----------------------------------------------------------------------------------------------


def palette_image():
    image = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    return image


def transparent_palette_image():
    image = palette_image()
    image.info["transparency"] = 1  # palette entry 1 is see-through
    return image


def transparent_colour_image(mode, pixels, see_through):
    """An L or RGB picture whose one colour `see_through` is transparent (PNG's tRNS chunk, as
    optimisers write cut-outs), no alpha channel."""
    image = Image.fromarray(np.array([pixels], np.uint8), mode)
    image.info["transparency"] = see_through
    return image


MODE_CASES = {  # name: (image, file name, expected RGB of the two pixels)
    "L": (lambda: Image.fromarray(np.array([[0, 77]], np.uint8), "L"), "a.png",
          [(0, 0, 0), (77, 77, 77)]),
    "LA": (lambda: Image.fromarray(np.array([[[77, 255], [77, 0]]], np.uint8), "LA"), "a.png",
           [(77, 77, 77), (255, 255, 255)]),
    "P": (palette_image, "a.png", [(10, 20, 30), (200, 100, 50)]),
    "P-transparency": (transparent_palette_image, "a.png", [(10, 20, 30), (255, 255, 255)]),
    "RGB-transparency": (lambda: transparent_colour_image("RGB", [(10, 20, 30), (0, 0, 0)],
                                                          (0, 0, 0)),
                         "a.png", [(10, 20, 30), (255, 255, 255)]),
    "L-transparency": (lambda: transparent_colour_image("L", [77, 0], 0), "a.png",
                       [(77, 77, 77), (255, 255, 255)]),
    "RGBA": (lambda: Image.fromarray(np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], np.uint8),
                                     "RGBA"), "a.png", [(10, 20, 30), (255, 255, 255)]),
    "I;16": (lambda: Image.fromarray(np.array([[257 * 100, 65535]], np.uint16)), "a.png",
             [(100, 100, 100), (255, 255, 255)]),
}


@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_every_image_mode_loads_as_rgb_with_the_right_values(tmp_path, mode):
    make, file_name, expected = MODE_CASES[mode]
    path = save(str(tmp_path / file_name), make())
    if mode == "I;16":
        assert Image.open(path).mode == "I;16"  # really a 16-bit file
    image = open_image(path, images.DEFAULT_MAX_IMAGE_PIXELS)
    assert image.mode == "RGB"
    assert [tuple(p) for p in np.asarray(image)[0]] == expected


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    path = save(str(tmp_path / "cmyk.jpg"), Image.new("CMYK", (16, 16), (0, 255, 255, 0)),
                quality=95)  # no cyan or black, full magenta and yellow: red
    image = open_image(path, images.DEFAULT_MAX_IMAGE_PIXELS)
    assert image.mode == "RGB"
    np.testing.assert_allclose(np.asarray(image)[8, 8], (255, 0, 0), atol=8)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10], pixels[:, 10:] = (255, 0, 0), (0, 0, 255)  # red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise
    path = save(str(tmp_path / "phone.jpg"), pixels, exif=exif, quality=95)
    image = open_image(path, images.DEFAULT_MAX_IMAGE_PIXELS)
    assert image.size == (10, 20)  # width, height: portrait now
    shown = np.asarray(image).astype(int)
    np.testing.assert_allclose(shown[2, 5], (255, 0, 0), atol=8)  # red on top
    np.testing.assert_allclose(shown[17, 5], (0, 0, 255), atol=8)  # blue below


# ----------------------------------------------------------------------------------------------
# Finding files and splitting them
# ----------------------------------------------------------------------------------------------


def test_images_are_found_in_subfolders_with_any_extension_case(tmp_path):
    for name, fmt in [("a.PNG", "PNG"), ("sub/b.Jpeg", "JPEG"), ("sub/deeper/c.webp", "WEBP"),
                      ("d.bmp", "BMP"), ("parts/a.png", "PNG")]:
        save(str(tmp_path / name), noise_image(4, 4), format=fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    assert images.find_images(str(tmp_path)) == ["a.PNG", "d.bmp", "sub/b.Jpeg",
                                                "sub/deeper/c.webp"]


def test_stable_hash_is_32_bit_fnv1a():
    def fnv1a(text):  # written out again from the FNV reference, independently of utils
        value = 0x811C9DC5
        for byte in text.encode("utf-8"):
            value = ((value ^ byte) * 0x01000193) % 2**32
        return value
    assert stable_hash("") == 0x811C9DC5  # published FNV-1a test vectors
    assert stable_hash("a") == 0xE40C292C
    assert stable_hash("foobar") == 0xBF9CF968
    for text in ["images/000001.png", "café/ß.jpg"]:
        assert stable_hash(text) == fnv1a(text)


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    names = [f"img{i:02d}.png" for i in range(24)]
    for i, name in enumerate(names):
        save(str(tmp_path / name), noise_image(4, 4, seed=i))
    common = dict(root=str(tmp_path), image_size=4, val_fraction=0.3, progress=False)
    train = [e.name for e in PoseImageDataset(split="train", **common).examples]
    val = [e.name for e in PoseImageDataset(split="val", **common).examples]
    assert sorted(train + val) == names and not set(train) & set(val)
    assert val == [n for n in names if stable_hash(n) / 2**32 < 0.3]  # fixed by the hash alone
    assert 0 < len(val) < len(names)
    assert [e.name for e in PoseImageDataset(split="val", **common).examples] == val


def test_is_validation_uses_the_fraction_of_hash_space():
    names = [f"folder/{i}.jpg" for i in range(2000)]
    fraction = np.mean([is_validation(n, 0.25) for n in names])
    assert 0.2 < fraction < 0.3
    assert not any(is_validation(n, 0.0) for n in names)


# ----------------------------------------------------------------------------------------------
# COCO person-keypoint files
# ----------------------------------------------------------------------------------------------


def write_coco(tmp_path, annotations, images=None):
    images = images or [{"id": 1, "file_name": "one.png", "width": 100, "height": 80},
                        {"id": 2, "file_name": "two.png", "width": 60, "height": 60}]
    for image in images:
        save(str(tmp_path / image["file_name"]), noise_image(image["height"], image["width"]))
    path = tmp_path / "person_keypoints.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "person"}]}))
    return str(path)


def coco_person(id, image_id, bbox, num_keypoints=5, iscrowd=0, **joints):
    keypoints = coco_keypoints(**joints)
    keypoints[:num_keypoints, 2] = np.maximum(keypoints[:num_keypoints, 2], 1)
    return {"id": id, "image_id": image_id, "bbox": bbox, "iscrowd": iscrowd,
            "num_keypoints": num_keypoints, "keypoints": keypoints.flatten().tolist()}


def test_coco_keeps_single_people_with_enough_keypoints_and_crops_around_them(tmp_path):
    path = write_coco(tmp_path, [
        coco_person(10, 1, [10, 20, 30, 50], left_wrist=(20, 40), nose=(12, 18)),
        coco_person(11, 1, [0, 0, 50, 50], iscrowd=1),  # a crowd region
        coco_person(12, 2, [5, 5, 20, 20], num_keypoints=2)])  # too few labelled joints
    data = dataset(tmp_path, image_size=30, coco_annotations=path)
    assert [e.name for e in data.examples] == ["one.png#person10"]
    # Box: side = 50 * (1 + 2 * 0.1) = 60 around the bbox centre (25, 45) -> x0 = -5, y0 = 15.
    assert data.examples[0].box == (-5, 15, 60)
    keypoints = data[0]["keypoints"]
    # Pixel (20, 40) -> centre (20.5, 40.5) -> minus the box corner (25.5, 25.5) -> * 30 / 60.
    np.testing.assert_allclose(keypoints[COCO17.joints.index("left_wrist")], [12.75, 12.75, 2])
    np.testing.assert_allclose(keypoints[COCO17.joints.index("nose")], [8.75, 1.75, 2])
    assert data.layout is COCO17


def test_a_coco_entry_whose_size_is_not_the_displayed_pictures_is_refused(tmp_path):
    """An EXIF-turned photo annotated in its stored pixels: its keypoints would land elsewhere."""
    path = write_coco(tmp_path, [coco_person(10, 1, [10, 20, 30, 50])])
    with open(path) as f:
        coco = json.load(f)
    coco["images"][0].update(width=80, height=100)  # one.png is 100 x 80 as displayed
    with open(path, "w") as f:
        json.dump(coco, f)
    with pytest.raises(UserError, match=r"one.png is 100x80 as displayed \(EXIF orientation "
                                        r"applied\), but its COCO entry says 80x100"):
        dataset(tmp_path, image_size=30, coco_annotations=path)
    coco["images"][0].update(width="100", height=80.0)  # numbers as some exporters write them
    with open(path, "w") as f:
        json.dump(coco, f)
    assert [e.name for e in dataset(tmp_path, image_size=30, coco_annotations=path).examples] == [
        "one.png#person10"]


def test_coco_people_from_one_picture_stay_in_one_split(tmp_path):
    people = [coco_person(i, 1, [10 + i, 10, 20, 20]) for i in range(30)]
    path = write_coco(tmp_path, people)
    splits = []
    for split in ("train", "val"):
        try:
            splits.append(len(dataset(tmp_path, split=split, val_fraction=0.5,
                                      coco_annotations=path)))
        except UserError:  # this split is empty
            splits.append(0)
    assert sorted(splits) == [0, 30]


def test_an_empty_val_split_says_it_goes_by_file_and_which_fraction_fills_it(tmp_path):
    people = [coco_person(i, 1 + i % 2, [10, 10, 20, 20]) for i in range(6)]
    path = write_coco(tmp_path, people)  # one.png hashes to 0.749, two.png to 0.255
    with pytest.raises(UserError) as error:
        dataset(tmp_path, split="val", val_fraction=0.05, coco_annotations=path)
    message = str(error.value)
    assert "the train/val split goes by image file" in message
    assert "2 image file(s) holding 6 people" in message
    suggested = re.search(r"--val-fraction ([\d.]+) gives it at least one file", message)
    assert suggested and float(suggested.group(1)) == 0.26
    val = dataset(tmp_path, split="val", val_fraction=0.26, coco_annotations=path)
    train = dataset(tmp_path, split="train", val_fraction=0.26, coco_annotations=path)
    assert {e.image_path for e in val.examples} == {str(tmp_path / "two.png")}
    assert {e.image_path for e in train.examples} == {str(tmp_path / "one.png")}


def test_images_without_a_pose_are_reported_once_for_both_splits(tmp_path, capsys):
    for i in range(6):
        save(str(tmp_path / f"{i}.png"), noise_image(4, 4, seed=i))
    write_poses(tmp_path, {"0.png": GOOD})
    args = SimpleNamespace(dataset_path=str(tmp_path), image_size=4, val_fraction=0.7,
                           resize_mode="auto", pose_layout="auto", coco_annotations=None,
                           strict=False, max_image_pixels=10**6)
    data.build_datasets(args, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "no entry in" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 5 image(s) have no entry")


# ----------------------------------------------------------------------------------------------
# Bad input: one UserError naming the file or value
# ----------------------------------------------------------------------------------------------


def test_missing_dataset_path_is_named(tmp_path):
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        dataset(tmp_path / "nowhere")


def test_dataset_path_that_is_a_file_is_named(tmp_path):
    save(str(tmp_path / "a.png"), noise_image(4, 4))
    with pytest.raises(UserError, match="a.png is not a folder"):
        dataset(tmp_path / "a.png")


def test_folder_without_images_is_named(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(UserError, match=f"no images .* found under {tmp_path}"):
        dataset(tmp_path)


def write_bad_images(tmp_path):
    for i in range(3):
        save(str(tmp_path / f"good{i}.png"), noise_image(8, 8, seed=i))
    save(str(tmp_path / "big.png"), noise_image(64, 64))
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "big.png").unlink()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])  # truncated mid-image
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg")


def test_unreadable_images_are_skipped_with_one_summary_warning(tmp_path, capsys):
    write_bad_images(tmp_path)
    data = dataset(tmp_path, image_size=8)
    assert [e.name for e in data.examples] == ["good0.png", "good1.png", "good2.png"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "skipped 2 unreadable" in warnings[0]
    assert "cut.png" in warnings[0] and "junk.jpg" in warnings[0]
    # and why the first one could not be read, not just that it could not
    reason = re.search(f"the first: cannot read image {re.escape(str(tmp_path / 'cut.png'))}: "
                       r"(\w+): ([^;]+);", warnings[0])
    assert reason and reason.group(1) in ("OSError", "SyntaxError") and reason.group(2).strip()


def test_strict_stops_on_the_first_unreadable_image(tmp_path):
    write_bad_images(tmp_path)
    with pytest.raises(UserError, match="cut.png.*--strict"):
        dataset(tmp_path, image_size=8, strict=True)


def test_image_over_the_pixel_limit_is_refused(tmp_path):
    save(str(tmp_path / "a.png"), noise_image(20, 20))
    with pytest.raises(UserError, match="a.png is 20x20 = 400 pixels, over the limit of 100"):
        dataset(tmp_path, max_image_pixels=100)


def png_header_only(width, height):
    """A PNG that declares width x height but holds no pixels (a decompression bomb's header)."""
    def chunk(kind, data):  # length, type, data, CRC of type + data
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_huge_image_is_called_too_large_not_unreadable(tmp_path):
    # 15000 x 15000 is past PIL's own hard limit; our limit, and its message, must win.
    (tmp_path / "bomb.png").write_bytes(png_header_only(15000, 15000))
    with pytest.raises(UserError, match="bomb.png is 15000x15000 .* over the limit"):
        open_image(str(tmp_path / "bomb.png"), images.DEFAULT_MAX_IMAGE_PIXELS)


GOOD = coco_keypoints(nose=(1, 1)).tolist()
BAD_POSES = {  # case: (poses.json text or object, words the message must contain)
    "malformed": ('{\n  "a.png": [[1, 2, 2],\n}', ["poses.json is not valid JSON", "line 3",
                                                      "column"]),
    "not an object": ([GOOD], ["must hold an object", "not a list"]),
    "missing image": ({"a.png": GOOD, "ghost.png": GOOD}, ["ghost.png", "not in"]),
    "escaping key": ({"../a.png": GOOD}, ["'../a.png' points outside"]),
    "absolute key": ({"/etc/a.png": GOOD}, ["'/etc/a.png' points outside"]),
    "different K": ({"a.png": GOOD, "b.png": GOOD[:-1] + [GOOD[0]] * 2},
                    ["'b.png' has 18 keypoints, while 1 other entry has 17"]),
    # the odd entry is named even when it comes first, against the count of the others
    "different K first": ({"a.png": GOOD + [GOOD[0]], "b.png": GOOD, "c.png": GOOD},
                          ["'a.png' has 18 keypoints, while 2 other entries have 17"]),
    "same image twice": ({"a.png": GOOD, "./a.png": GOOD}, ["'a.png' and './a.png' name the same"]),
    "non-numeric": ({"a.png": [["1", 2, 2]] + GOOD[1:]}, ["'a.png', keypoint 0 is ['1', 2, 2]"]),
    "not finite": ('{"a.png": [[NaN, 2, 2]]}', ["'a.png', keypoint 0"]),
    "bad visibility": ({"a.png": GOOD[:3] + [[1, 1, 3]] + GOOD[4:]},
                       ["'a.png', keypoint 3 has visibility 3"]),
    "unknown K": ({"a.png": GOOD[:5]}, ["5 keypoints", "17 (coco17)", "18 (openpose18)"]),
    "empty": ({}, ["has no entries"]),
    # one keypoint rule with sample.py: a joint marked present lies on its image (4 x 4 here)
    "keypoint left of the image": ({"a.png": coco_keypoints(nose=(-1, 2))},
                                   ["'a.png', keypoint 0 at (-1, 2) lies outside its 4x4 image"]),
    "keypoint below the image": ({"a.png": coco_keypoints(left_ankle=(2, 4.5))},
                                 ["'a.png', keypoint 15 at (2, 4.5) lies outside its 4x4 image"]),
}


@pytest.mark.parametrize("case", list(BAD_POSES))
def test_each_flaw_in_poses_json_is_named(tmp_path, case):
    poses, words = BAD_POSES[case]
    for name in ("a.png", "b.png"):
        save(str(tmp_path / name), noise_image(4, 4))
    write_poses(tmp_path, poses)
    with pytest.raises(UserError) as error:
        dataset(tmp_path)
    assert str(tmp_path / "poses.json") in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_pose_layout_flag_must_match_the_number_of_keypoints(tmp_path):
    save(str(tmp_path / "a.png"), noise_image(4, 4))
    write_poses(tmp_path, {"a.png": GOOD})
    with pytest.raises(UserError, match="17 keypoints but --pose-layout openpose18 has 18"):
        dataset(tmp_path, pose_layout="openpose18")


def test_part_map_of_the_wrong_size_is_named(tmp_path):
    save(str(tmp_path / "a.png"), noise_image(8, 6))
    save(str(tmp_path / "parts" / "a.png"), np.zeros((6, 8), np.uint8))
    with pytest.raises(UserError, match=r"part map .*a.png is 8x6 but its image is 6x8"):
        dataset(tmp_path)


def test_colour_part_map_is_refused(tmp_path):
    save(str(tmp_path / "a.png"), noise_image(8, 8))
    save(str(tmp_path / "parts" / "a.png"), noise_image(8, 8))
    with pytest.raises(UserError, match="a.png has 3 channels"):
        dataset(tmp_path)


def test_missing_part_map_is_named_when_parts_folder_exists(tmp_path):
    for name in ("a.png", "sub/b.jpg"):
        save(str(tmp_path / name), noise_image(8, 8))
    save(str(tmp_path / "parts" / "a.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(UserError, match=r"part map .*parts/sub/b.png for image sub/b.jpg"):
        dataset(tmp_path)


def run_mannequins(*args):
    return subprocess.run([sys.executable, "mannequins.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [[], ["bogus"]], ids=["no command", "unknown command"])
def test_command_line_mistakes_print_one_error_line(args):
    result = run_mannequins(*args)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@needs_mannequins
def test_synthetic_command_without_its_arguments_prints_an_error_not_a_traceback():
    result = run_mannequins()  # --out is required
    assert result.returncode != 0
    assert "error:" in result.stderr and "--out" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------
# EpochBatchSampler: reproducible, resumable, split across ranks
# ----------------------------------------------------------------------------------------------


def batches(num_examples=50, batch_size=4, epoch=0, start_batch=0, **kwargs):
    sampler = EpochBatchSampler(num_examples, batch_size, **kwargs)
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


def test_sampler_is_fixed_by_seed_and_epoch():
    first = batches(seed=3, epoch=5, flip=True)
    assert first == batches(seed=3, epoch=5, flip=True)
    assert first != batches(seed=3, epoch=6, flip=True)
    assert first != batches(seed=4, epoch=5, flip=True)
    assert len(first) == 50 // 4 and all(len(batch) == 4 for batch in first)
    indices = [i for batch in first for i, _ in batch]
    assert len(set(indices)) == len(indices)  # no example twice in an epoch


def test_sampler_flips_only_when_asked():
    assert not any(flip for batch in batches(flip=False) for _, flip in batch)
    flips = [flip for batch in batches(flip=True) for _, flip in batch]
    assert 10 < sum(flips) < 38  # about half of 48


def test_resuming_mid_epoch_yields_the_rest_of_the_same_epoch():
    sampler = EpochBatchSampler(50, 4, seed=1, flip=True)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start_batch=5)
    assert len(sampler) == len(whole) - 5
    assert list(sampler) == whole[5:]


def test_two_ranks_together_see_what_one_process_with_double_batch_sees():
    single = batches(batch_size=6, seed=7, epoch=1, flip=True)
    rank0 = batches(batch_size=3, seed=7, epoch=1, flip=True, rank=0, world_size=2)
    rank1 = batches(batch_size=3, seed=7, epoch=1, flip=True, rank=1, world_size=2)
    assert len(rank0) == len(rank1) == len(single)
    assert [a + b for a, b in zip(rank0, rank1)] == single


def test_batch_larger_than_the_data_is_refused():
    with pytest.raises(UserError, match="5 images, fewer than one batch of 8"):
        EpochBatchSampler(5, 4, world_size=2)


# ----------------------------------------------------------------------------------------------
# Part labellings: mannequin, DensePose, your own
# ----------------------------------------------------------------------------------------------

# DensePose's body-part indices, from its documentation ("I" channel; 0 is background).
DENSEPOSE_NAMES = {1: "torso", 2: "torso", 3: "right hand", 4: "left hand", 5: "left foot",
                   6: "right foot", 7: "right upper leg back", 8: "left upper leg back",
                   9: "right upper leg front", 10: "left upper leg front",
                   11: "right lower leg back", 12: "left lower leg back",
                   13: "right lower leg front", 14: "left lower leg front",
                   15: "left upper arm inside", 16: "right upper arm inside",
                   17: "left upper arm outside", 18: "right upper arm outside",
                   19: "left lower arm inside", 20: "right lower arm inside",
                   21: "left lower arm outside", 22: "right lower arm outside",
                   23: "right head", 24: "left head"}


def densepose_mirror(label):
    """The DensePose label of the same part on the other side, by name."""
    if label == 0:
        return 0
    name = DENSEPOSE_NAMES[label]
    other = name.replace("left", "RIGHT").replace("right", "left").replace("RIGHT", "right")
    (mirror,) = [i for i, n in DENSEPOSE_NAMES.items() if n == other and (i == label or
                                                                          other != name)]
    return mirror


def test_densepose_flip_reads_every_left_part_as_its_right_one_and_the_other_way_round():
    image = noise_image(3, 25)
    parts = np.zeros((3, 25), np.uint8)
    parts[1] = np.arange(25)  # every label once, label j in column j
    _, _, flipped = flip_example(image, None, parts, COCO17, DENSEPOSE_PARTS)
    for label in range(25):
        assert flipped[1, 24 - label] == densepose_mirror(label), DENSEPOSE_NAMES.get(label)
    assert flipped[1, 24 - 15] == 16  # left upper arm inside -> right upper arm inside
    # the mannequin table would have left DensePose's limbs alone or swapped torso and hands
    _, _, wrong = flip_example(image, None, parts, COCO17, MANNEQUIN_PARTS)
    assert wrong[1, 24 - 15] == 15 and wrong[1, 24 - 3] == 4 and wrong[1, 24 - 23] == 23


def test_each_densepose_label_is_drawn_in_its_own_colour_and_only_the_background_white():
    picture = np.asarray(colorize_parts(np.arange(25)[None]))[0]  # (25, 3)
    assert len({tuple(colour) for colour in picture}) == 25
    assert [tuple(colour) == (255, 255, 255) for colour in picture] == [True] + [False] * 24


def densepose_folder(root, label=15, count=1):
    """count 8 x 6 images whose part maps are background with one pixel of `label` at row 2,
    column 1 (a left upper arm, inside, by default)."""
    for i in range(count):
        save(str(root / f"person{i}.png"), noise_image(6, 8, seed=i))
        parts = np.zeros((6, 8), np.uint8)
        parts[2, 1] = label
        save(str(root / "parts" / f"person{i}.png"), parts)


def test_a_densepose_dataset_flips_a_left_upper_arm_pixel_into_a_right_upper_arm_one(tmp_path):
    densepose_folder(tmp_path)
    data = dataset(tmp_path, image_size=8, part_labels=DENSEPOSE_PARTS)
    assert data.resize_mode == "pad"  # 8 x 6 padded to 8 x 8: one row above, one below
    assert data[0]["parts"][3, 1] == 15
    flipped = data[(0, True)]["parts"]
    assert flipped[3, 8 - 1 - 1] == 16 and (flipped == 15).sum() == 0


def test_build_datasets_takes_the_labelling_from_the_part_labels_flag(tmp_path):
    densepose_folder(tmp_path, label=24, count=8)
    args = argparse.Namespace(dataset_path=str(tmp_path), image_size=8, val_fraction=0.5,
                              resize_mode="auto", pose_layout="auto", coco_annotations=None,
                              strict=False, max_image_pixels=10**6, part_labels="densepose")
    train_set, val_set = data.build_datasets(args, progress=False)
    assert train_set.part_labels is val_set.part_labels is DENSEPOSE_PARTS


def test_a_label_the_labelling_does_not_know_is_named_with_its_file_when_the_set_is_built(
        tmp_path):
    densepose_folder(tmp_path, label=15)
    with pytest.raises(UserError, match=r"part map .*person0\.png has label 15 \(row 2, column "
                                        r"1\), but --part-labels mannequin has labels 0 \.\. 10"):
        dataset(tmp_path)  # the mannequin labelling, 0 .. 10


def test_your_own_labelling_from_a_json_file(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"num_labels": 6, "flip_pairs": [[1, 4], [2, 3]]}))
    labelling = resolve_part_labelling(str(path))
    assert (labelling.num_labels, labelling.flip_pairs) == (6, ((1, 4), (2, 3)))
    assert labelling.flip_lookup()[:6].tolist() == [0, 4, 3, 2, 1, 5]
    assert labelling.to_dict() == {"name": str(path), "num_labels": 6,
                                   "flip_pairs": [[1, 4], [2, 3]]}
    densepose_folder(tmp_path / "data", label=6)
    with pytest.raises(UserError, match=r"has label 6 .*--part-labels .*labels\.json has labels "
                                        r"0 \.\. 5"):
        dataset(tmp_path / "data", part_labels=labelling)


@pytest.mark.parametrize("content, message", [
    ({"num_labels": 6, "flip_pairs": [[1, 6]]}, r"flip pair \[1, 6\] must be two different "
                                                r"labels in 1 \.\. 5"),
    ({"num_labels": 6, "flip_pairs": [[0, 1]]}, r"flip pair \[0, 1\]"),
    ({"num_labels": 6, "flip_pairs": [[1, 2], [2, 3]]}, r"label 2 is in two flip pairs"),
    ({"num_labels": 300, "flip_pairs": []}, r"must hold exactly .*N at most 256"),
    ({"labels": 6}, r"must hold exactly"),
    ([1, 2], r"must hold exactly"),
])
def test_a_wrong_labelling_file_is_one_error_naming_it(tmp_path, content, message):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*" + message):
        resolve_part_labelling(str(path))


def test_an_unknown_labelling_name_lists_the_choices():
    with pytest.raises(UserError, match=r"--part-labels coco: use one of mannequin, densepose, "
                                        r"or a \.json file"):
        resolve_part_labelling("coco")


# ----------------------------------------------------------------------------------------------
# Items and the DataLoader
# ----------------------------------------------------------------------------------------------


def posed_folder(root, count=4, size=(20, 12)):
    """count images (width x height = size) with poses.json and part maps."""
    width, height = size
    rng = np.random.default_rng(0)
    poses = {}
    for i in range(count):
        save(str(root / f"p{i}.png"), noise_image(height, width, seed=i))
        save(str(root / "parts" / f"p{i}.png"),
             rng.integers(0, NUM_PART_LABELS, (height, width)).astype(np.uint8))
        poses[f"p{i}.png"] = coco_keypoints(nose=(i + 0.5, 3), left_hip=(10, 7))
    write_poses(root, poses)


def test_items_have_documented_shapes_and_types(tmp_path):
    posed_folder(tmp_path)
    item = dataset(tmp_path, image_size=16)[(1, True)]
    assert set(item) == {"image", "keypoints", "parts", "path"}
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["keypoints"].shape == (17, 3) and item["keypoints"].dtype == torch.float32
    assert item["parts"].shape == (16, 16) and item["parts"].dtype == torch.long
    assert item["path"] == "p1.png"


def test_preloading_changes_nothing_about_the_items(tmp_path):
    posed_folder(tmp_path)
    loaded = dataset(tmp_path, image_size=16, preload=True)
    streamed = dataset(tmp_path, image_size=16, preload=False)
    assert loaded.cache is not None and streamed.cache is None
    for item in [0, 3, (2, True)]:
        a, b = loaded[item], streamed[item]
        assert a["path"] == b["path"]
        for key in ("image", "keypoints", "parts"):
            assert torch.equal(a[key], b[key]), key


def test_loader_collates_items_into_batches(tmp_path):
    posed_folder(tmp_path, count=6)
    data = dataset(tmp_path, image_size=16)
    sampler = EpochBatchSampler(len(data), 3, seed=0, flip=True)
    loader = make_loader(data, sampler, num_workers=0, device=torch.device("cpu"))
    seen = list(loader)
    assert len(seen) == 2
    batch = seen[0]
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["keypoints"].shape == (3, 17, 3)
    assert batch["parts"].shape == (3, 16, 16) and batch["parts"].dtype == torch.long
    assert len(batch["path"]) == 3 and all(isinstance(p, str) for p in batch["path"])
    assert sorted(p for b in seen for p in b["path"]) == [f"p{i}.png" for i in range(6)]


def test_a_pass_over_unflipped_batches_leaves_the_global_rng_as_it_was(tmp_path):
    # stage 3 builds its pair cache with it: a pass that drew from the global RNG made a run
    # that found its cache train differently from one that built it
    posed_folder(tmp_path, count=6)
    data = dataset(tmp_path, image_size=16)
    torch.manual_seed(0)
    untouched = torch.rand(3)
    torch.manual_seed(0)
    names = [p for batch in unflipped_batches(data, batch_size=4) for p in batch["path"]]
    assert names == [e.name for e in data.examples]  # every item once, in order
    assert torch.equal(torch.rand(3), untouched)
