"""Tests for mannequins.py: the figures, their keypoints and part maps, and the folder it writes."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import mannequins
from poses import COCO17, PART_NAMES
from utils import UserError

SIZE = 64
JOINT = {name: index for index, name in enumerate(COCO17.joints)}
LABEL = {name: label for label, name in enumerate(PART_NAMES)}


def render(index, seed=0, size=SIZE):
    return mannequins.render_mannequin(np.random.default_rng([seed, index]), size)


@pytest.fixture(scope="module")
def samples():
    return [render(index) for index in range(100)]


def local_background(pixels, part_map, x, y, radius=8):
    """Median colour of clear background near (x, y): gradients and textures vary across the
    picture, and background pixels touching the figure are blended with it."""
    clear = np.pad(part_map, 1, constant_values=0) == 0
    clear = np.all([clear[1 + dy:1 + dy + SIZE, 1 + dx:1 + dx + SIZE]
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    rows = slice(max(0, y - radius), y + radius + 1)
    columns = slice(max(0, x - radius), x + radius + 1)
    near = pixels[rows, columns][clear[rows, columns]]
    return np.median(near if len(near) else pixels[clear], axis=0)


def test_outputs_have_the_documented_types_and_shapes():
    for size in (SIZE, 96):
        image, keypoints, part_map = render(0, size=size)
        assert image.mode == "RGB" and image.size == (size, size)
        assert keypoints.dtype == np.float32 and keypoints.shape == (17, 3)
        assert part_map.dtype == np.uint8 and part_map.shape == (size, size)
        assert set(np.unique(keypoints[:, 2])) <= {0, 1, 2}


def test_same_seed_gives_identical_figures_and_another_seed_differs():
    image_a, keypoints_a, parts_a = render(7)
    image_b, keypoints_b, parts_b = render(7)
    assert image_a.tobytes() == image_b.tobytes()
    np.testing.assert_array_equal(keypoints_a, keypoints_b)
    np.testing.assert_array_equal(parts_a, parts_b)
    image_c, keypoints_c, _ = render(7, seed=1)
    assert image_a.tobytes() != image_c.tobytes()
    assert not np.array_equal(keypoints_a, keypoints_c)


def test_visible_keypoints_lie_on_their_own_part_of_the_drawn_figure(samples):
    checked = 0
    for image, keypoints, part_map in samples[:50]:
        pixels = np.asarray(image).astype(int)
        for joint, (x, y, v) in zip(COCO17.joints, keypoints):
            if v != 2:
                continue
            column, row = int(x), int(y)
            label = PART_NAMES[part_map[row, column]]
            assert label in mannequins.JOINT_PARTS[joint], (joint, label)
            background = local_background(pixels, part_map, column, row)
            assert np.abs(pixels[row, column] - background).sum() > 30, (joint, pixels[row, column])
            checked += 1
    assert checked > 50 * 17 * 0.6  # most joints are visible


def test_v0_marks_exactly_the_keypoints_outside_the_frame(samples):
    for _, keypoints, _ in samples:
        x, y, v = keypoints.T
        outside = (x < 0) | (x >= SIZE) | (y < 0) | (y >= SIZE)
        np.testing.assert_array_equal(v == 0, outside)


def test_part_map_holds_only_known_labels_and_covers_the_figure(samples):
    for _, _, part_map in samples:
        assert part_map.max() < len(PART_NAMES)
        assert 0.02 < (part_map > 0).mean() < 0.9


def test_a_figure_facing_the_camera_has_its_left_side_on_the_image_right(samples):
    frontal = 0
    for _, keypoints, part_map in samples:
        x, v = keypoints[:, 0], keypoints[:, 2]
        face = [JOINT[name] for name in ("left_eye", "right_eye", "left_ear", "right_ear")]
        # Both ears showing means the figure is turned less than 30 degrees from the camera.
        if not ((v[face] == 2).all() and x[JOINT["left_eye"]] > x[JOINT["right_eye"]]):
            continue
        frontal += 1
        for left, right in (("left_shoulder", "right_shoulder"), ("left_hip", "right_hip")):
            assert x[JOINT[left]] > x[JOINT[right]]
        columns = np.arange(SIZE)[None, :].repeat(SIZE, 0)
        for left, right in (("left_upper_arm", "right_upper_arm"),
                            ("left_upper_leg", "right_upper_leg")):
            left_pixels, right_pixels = part_map == LABEL[left], part_map == LABEL[right]
            if left_pixels.any() and right_pixels.any():
                assert columns[left_pixels].mean() > columns[right_pixels].mean()
        if v[JOINT["left_wrist"]] == 2:
            wrist_x, wrist_y = keypoints[JOINT["left_wrist"], :2].astype(int)
            assert part_map[wrist_y, wrist_x] == LABEL["left_lower_arm"]
    assert frontal >= 10


def test_a_profile_hides_the_eye_on_the_far_side_of_the_head(samples):
    profiles = 0
    for _, keypoints, part_map in samples:
        x, y, v = keypoints.T
        ears_x = x[[JOINT["left_ear"], JOINT["right_ear"]]]
        facing_right = x[JOINT["nose"]] > ears_x.max()  # the nose points where the face looks
        facing_left = x[JOINT["nose"]] < ears_x.min()
        eyes = [JOINT["left_eye"], JOINT["right_eye"]]
        on_head = [part_map[int(y[k]), int(x[k])] == LABEL["head"] if v[k] else False
                   for k in eyes]
        if not (all(on_head) and sorted(v[eyes]) == [1, 2]):
            continue  # not a profile, or an eye is covered by an arm or out of the frame
        profiles += 1
        hidden_eye = eyes[int(np.argmin(v[eyes]))]
        assert facing_right or facing_left
        assert hidden_eye == (JOINT["left_eye"] if facing_right else JOINT["right_eye"])
    assert profiles >= 5


def test_figures_vary_in_occlusion_framing_and_background(samples):
    visibility = np.stack([keypoints[:, 2] for _, keypoints, _ in samples])
    assert (visibility == 1).any(1).sum() >= 10  # some joints hidden behind the body
    assert (visibility == 0).any(1).sum() >= 3  # some figures cut off by the frame
    corners = {tuple(np.asarray(image)[0, 0]) for image, _, _ in samples}
    assert len(corners) > 20
    tops = {tuple(np.median(np.asarray(image)[part_map == LABEL["torso"]], axis=0))
            for image, _, part_map in samples}
    assert len(tops) > 20  # clothes vary


def test_write_dataset_writes_the_documented_files_and_reproduces(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert mannequins.write_dataset(str(first), count=12, image_size=32, seed=3, workers=2)
    assert sorted(os.listdir(tmp_path)) == ["first"]  # the temporary folder was renamed away

    with open(first / "poses.json") as f:
        poses = json.load(f)
    names = [f"images/{index:06d}.png" for index in range(12)]
    assert sorted(poses) == names
    assert sorted(os.listdir(first / "images")) == [name.split("/")[1] for name in names]
    for name in names:
        assert Image.open(first / name).size == (32, 32)
        parts = Image.open(first / "parts" / name)
        assert parts.mode == "L" and parts.size == (32, 32)
        assert len(poses[name]) == 17 and all(isinstance(v, int) for _, _, v in poses[name])
    _, keypoints, part_map = render(5, seed=3, size=32)
    np.testing.assert_allclose(poses[names[5]], keypoints, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(Image.open(first / "parts" / names[5])), part_map)
    with open(first / "mannequins.json") as f:
        assert json.load(f) == {"count": 12, "image_size": 32, "seed": 3, "layout": "coco17",
                                "generator_version": mannequins.GENERATOR_VERSION}

    assert mannequins.write_dataset(str(first), count=12, image_size=32, seed=3) is False
    assert mannequins.write_dataset(str(second), count=12, image_size=32, seed=3, workers=1)
    for name in names + ["poses.json"]:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_write_dataset_refuses_a_folder_that_holds_something_else(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        mannequins.write_dataset(str(other), count=2, image_size=32, workers=1)
    mannequins.write_dataset(str(tmp_path / "set"), count=2, image_size=32, workers=1)
    with pytest.raises(UserError, match="already exists"):
        mannequins.write_dataset(str(tmp_path / "set"), count=3, image_size=32, workers=1)
    assert sorted(os.listdir(tmp_path)) == ["other", "set"]
    assert os.listdir(other) == ["notes.txt"]


def test_main_writes_into_an_empty_folder_and_says_where(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    mannequins.main(["--out", str(out), "--count", "3", "--image-size", "32", "--workers", "1"])
    assert "wrote 3 mannequins" in capsys.readouterr().out
    assert len(os.listdir(out / "images")) == 3


def test_readme_figure_pairs_each_mannequin_with_its_part_map(tmp_path):
    path = tmp_path / "figure.png"
    mannequins.make_readme_figure(str(path), count=8, image_size=32)
    assert Image.open(path).size == (8 * 34 + 2, 2 * 34 + 2)  # 2 rows of 4 pairs, 2 px padding
