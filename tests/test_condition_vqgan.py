"""The paper's pose-to-image model: pose pictures, condition VQGANs (training_vqgan.py --content)
and stage 2 conditioned on their codes (--condition keypoint-vqgan | parts-vqgan), end to end on
48 tiny mannequins at 32 px, with condition VQGANs trained for a few steps."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
import sample
import training_transformer
import training_vqgan
from conditions import Content
from data import PoseImageDataset
from location_features import fourier_features
from poses import COCO17, OPENPOSE18, bone_colours, flip_example, pose_picture
from sliding_window import window_condition
from transformer import PoseTransformer, load_transformer
from utils import UserError
from vqgan import VQGAN, config_from_args, load_vqgan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
GRID_FACTOR = {"keypoint-images": 4, "part-maps": 8}  # the contents' default downsampling


def mirror_bones(layout):
    """Index array m: bone m[i] is bone i's mirror (its joints' left and right swapped)."""
    perm = layout.flip_permutation()
    index = {frozenset(bone): i for i, bone in enumerate(layout.bones)}
    return np.array([index[frozenset((perm[a], perm[b]))] for a, b in layout.bones])


@pytest.fixture(scope="module")
def data(mannequin_set):
    return mannequin_set(48, SIZE)


@pytest.fixture(scope="module")
def val_set(data):
    return PoseImageDataset(str(data), image_size=SIZE, split="val", val_fraction=0.2,
                            progress=False)


@pytest.fixture(scope="module")
def condition_vqgans(data, tmp_path_factory):
    """content -> vqgan.pt of a condition VQGAN trained for 3 steps with the contents' default
    grids (keypoint pictures f4: 8 x 8 codes at 32 px; part maps f8: 4 x 4)."""
    made = {}
    for content in ("keypoint-images", "part-maps"):
        run_dir = tmp_path_factory.mktemp(content)
        training_vqgan.main(["--content", content, "--dataset-path", str(data), "--image-size",
                             str(SIZE), "--val-fraction", "0.2", "--batch-size", "4",
                             "--max-steps", "3", "--num-workers", "0", "--device", "cpu",
                             "--run-dir", str(run_dir), "--ch", "16", "--z-channels", "16",
                             "--embed-dim", "16", "--n-embed", "24"])
        made[content] = str(run_dir / "vqgan.pt")
    return made


def test_condition_grids_stay_16_and_8_codes_across_at_64_x_2_to_the_k_px():
    """Each doubling above 64 px adds a halving level to the contents' defaults: at the paper
    preset's 256 px a pose picture is 16 x 16 codes (it was 64 x 64, a 4096-token prefix), with
    the attention on that grid, at any size (at 32 and 96 px it was at 16 x 16 features, not on
    the 8 x 8 or 24 x 24 grid)."""
    for preset, size, grids in (("small", 64, (16, 8)), ("small", 128, (16, 8)),
                                ("paper", 256, (16, 8)), ("small", 32, (8, 4)),
                                ("small", 96, (24, 12))):
        for content, grid in zip(("keypoint-images", "part-maps"), grids):
            config = config_from_args(training_vqgan.parse_args(
                ["--preset", preset, "--image-size", str(size), "--content", content]))
            assert config.resolution // 2 ** (len(config.ch_mult) - 1) == grid
            assert config.attn_resolutions == (grid,)


def test_condition_vqgans_train_without_a_gan_and_print_their_own_loss(capsys):
    """The README says no LPIPS and no GAN; the small preset's GAN (from step 10000) came along
    for runs longer than that, and the start-up line named the photos' loss."""
    for content, loss in (("keypoint-images", "L1 balanced between drawn and white pixels"),
                          ("part-maps", "cross-entropy of the part labels")):
        args = training_vqgan.parse_args(["--content", content, "--max-steps", "20000"])
        assert args.disc_weight == 0 and args.perceptual_weight == 0
        config = config_from_args(args)
        training_vqgan.describe_run(args, config, VQGAN(config), Content(content), "fp32", False,
                                    SimpleNamespace(total=20000, peak=1e-3), 1)
        printed = capsys.readouterr().out
        assert f"; {loss}, LPIPS x 0" in printed and printed.rstrip().count("no GAN") == 1
    photos = training_vqgan.parse_args(["--max-steps", "20000"])
    assert photos.disc_weight == 0.8  # the image VQGAN keeps its preset's


# ---- pose pictures ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [COCO17, OPENPOSE18])
def test_pose_picture_of_a_flipped_pose_is_the_flipped_picture_with_left_right_colours_swapped(
        layout):
    generator = np.random.default_rng(0)
    keypoints = np.concatenate([generator.uniform(2, 30, (layout.num_keypoints, 2)),
                                generator.integers(0, 3, (layout.num_keypoints, 1))], 1)
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    _, flipped, _ = flip_example(image, keypoints.astype(np.float32), None, layout)
    colours = bone_colours(layout)
    picture_of_flipped = pose_picture(flipped, layout, (SIZE, SIZE))
    swapped = pose_picture(keypoints, layout, (SIZE, SIZE), colours=colours[mirror_bones(layout)])
    np.testing.assert_allclose(picture_of_flipped, swapped[:, ::-1], atol=1e-5)
    # left and right differ: without the swap the mirrored picture is another one
    assert np.abs(picture_of_flipped - pose_picture(keypoints, layout,
                                                    (SIZE, SIZE))[:, ::-1]).max() > 0.3


def test_pose_picture_draws_visible_bones_in_their_colour_and_leaves_invisible_joints_out():
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[[5, 7]] = [[8.5, 8.5, 2], [24.5, 8.5, 1]]  # pixel centres; occluded counts
    keypoints[9] = [24, 24, 0]  # the left wrist is not visible: no forearm, no dot
    picture = pose_picture(keypoints, COCO17, (SIZE, SIZE))
    bone = COCO17.bones.index((5, 7))
    np.testing.assert_allclose(picture[8, 16], bone_colours(COCO17)[bone], atol=1e-6)
    assert picture[8, 8].max() < 0.05  # a joint: a black dot
    assert (picture[16:, :] == 1).all()  # nothing below: the wrist and its bone are absent


def test_part_map_content_is_the_one_hot_map_and_pictures_colour_it_back(val_set):
    content = Content("part-maps", num_labels=11)
    parts = torch.stack([val_set[i]["parts"] for i in range(2)])
    one_hot = content.inputs({"parts": parts})
    assert one_hot.shape == (2, 11, SIZE, SIZE) and set(one_hot.unique().tolist()) == {-1, 1}
    assert torch.equal(one_hot.argmax(1), parts)
    assert content.loss(one_hot, one_hot * 50) < 1e-6  # confident logits of the true labels


# ---- stage 1: --content, and checkpoints that know their content -----------------------------


def test_a_condition_vqgan_stores_its_content_and_reconstructs_in_its_channels(
        condition_vqgans):
    for content, channels in (("keypoint-images", 3), ("part-maps", 11)):
        path = condition_vqgans[content]
        assert torch.load(path, weights_only=True)["content"] == content
        model = load_vqgan(path, content=content)
        assert (model.config.in_channels, model.config.out_ch) == (channels, channels)
        assert model.token_grid_size == SIZE // GRID_FACTOR[content]
        records = [json.loads(line) for line in open(os.path.join(os.path.dirname(path),
                                                                  "metrics.jsonl"))]
        score = "val_psnr" if content == "keypoint-images" else "val_pixel_accuracy"
        assert any(score in record for record in records)


def test_a_condition_vqgan_where_an_image_vqgan_is_expected_and_the_reverse_are_refused(
        condition_vqgans, vqgan_path, data, tmp_path):
    kp, parts = condition_vqgans["keypoint-images"], condition_vqgans["part-maps"]
    result = subprocess.run([sys.executable, "training_transformer.py", "--dataset-path",
                             str(data), "--run-dir", str(tmp_path / "run"), "--vqgan-checkpoint",
                             kp], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {kp} is a condition VQGAN of keypoint-images (training_vqgan.py --content "
        "keypoint-images), but an image VQGAN (of photos) is needed here"]
    common = ["--dataset-path", str(data), "--run-dir", str(tmp_path / "run"),
              "--vqgan-checkpoint", str(vqgan_path), "--device", "cpu"]
    with pytest.raises(UserError) as refused:
        training_transformer.main(common + ["--condition", "keypoint-vqgan",
                                            "--condition-vqgan", str(vqgan_path)])
    assert str(refused.value) == (
        f"{vqgan_path} is an image VQGAN (of photos), but a condition VQGAN of keypoint-images "
        "(training_vqgan.py --content keypoint-images) is needed here")
    with pytest.raises(UserError, match=f"{kp} is a condition VQGAN of keypoint-images .* but a "
                                        "condition VQGAN of part-maps"):
        training_transformer.main(common + ["--condition", "parts-vqgan",
                                            "--condition-vqgan", kp])
    with pytest.raises(UserError, match="of part-maps .*, but an image VQGAN"):
        evaluate.main(["--vqgan-checkpoint", parts, "--dataset-path", str(data)])


# ---- stage 2 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(data, vqgan_path, condition_vqgans, tmp_path_factory, train_tiny_transformer):
    """condition -> transformer_last.pt of a 3-step run conditioned on a condition VQGAN."""
    return {condition: train_tiny_transformer(
        data, vqgan_path, tmp_path_factory.mktemp(condition), SIZE, "--condition", condition,
        "--condition-vqgan", condition_vqgans[content], "--max-steps", "3", "--batch-size", "8",
        "--grid-examples", "1")
        for condition, content in (("keypoint-vqgan", "keypoint-images"),
                                   ("parts-vqgan", "part-maps"))}


def test_condition_ids_never_collide_with_image_ids_or_other_condition_ranges(trained,
                                                                               val_set):
    batch = {key: torch.stack([val_set[i][key] for i in range(4)])
             for key in ("image", "keypoints", "parts")}
    for condition, path in trained.items():
        model, _ = load_transformer(path)
        vocab = model.gpt.config.vocab_size
        n_embed, n_condition = model.n_embed, model.condition_vqgan.config.n_embed
        assert vocab == n_embed + n_condition  # image codes, then this condition's codes only
        assert model.gpt.config.output_size == n_embed  # sampling can only emit image codes
        cond = model.condition_tokens(batch)
        assert cond.shape == (4, (SIZE // GRID_FACTOR[model.content.kind]) ** 2)
        assert ((cond >= n_embed) & (cond < vocab)).all()
        assert torch.equal(cond - n_embed, model.condition_vqgan.image_tokens(
            model.content.inputs(batch)).flatten(1))
        assert (model.image_tokens(batch["image"]) < n_embed).all()


def test_the_empty_pose_of_a_condition_vqgan_is_its_codes_of_a_blank_picture(trained):
    """Condition dropout, on by default for pose conditions, trains these models on the empty
    pose too: a white pose picture, or a part map all background (one-hot in {-1, 1})."""
    background = -torch.ones(2, 11, SIZE, SIZE)
    background[:, 0] = 1
    blank = {"keypoint-vqgan": torch.ones(2, 3, SIZE, SIZE), "parts-vqgan": background}
    for condition, path in trained.items():
        model, _ = load_transformer(path)
        assert model.condition_dropout == 0.1
        codes = model.condition_vqgan.image_tokens(blank[condition]).flatten(1)
        assert torch.equal(model.null_condition(2), model.n_embed + codes)


def test_each_condition_token_gets_the_features_of_its_cell_on_the_condition_grid(trained):
    model, _ = load_transformer(trained["keypoint-vqgan"])
    g, h = model.config["condition_grid"], model.token_grid
    num_frequencies = math.ceil(math.log2(h)) + 1
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    cells = fourier_features((cols.flatten() + 0.5) / g, (rows.flatten() + 0.5) / g,
                             num_frequencies)  # (g * g, F): the condition grid's cell centres
    torch.testing.assert_close(model.features_by_position[:g * g, :cells.size(1)], cells)


def test_the_condition_cache_is_rebuilt_when_the_condition_vqgan_changes(
        data, vqgan_path, condition_vqgans, tmp_path, train_tiny_transformer, monkeypatch):
    encoded = []
    original = training_transformer.condition_prefixes
    monkeypatch.setattr(training_transformer, "condition_prefixes",
                        lambda model, split, **kw: encoded.append(1) or original(model, split))
    run_dir = tmp_path / "run"

    def train(condition_vqgan):
        train_tiny_transformer(data, vqgan_path, run_dir, SIZE, "--condition", "keypoint-vqgan",
                               "--condition-vqgan", condition_vqgan, "--max-steps", "1",
                               "--batch-size", "8", "--sample-every", "100", "--overwrite")
    first = condition_vqgans["keypoint-images"]
    train(first)
    assert len(encoded) == 2  # both splits, once
    train(first)
    assert len(encoded) == 2  # the same condition VQGAN: read from the cache
    other = tmp_path / "other.pt"
    checkpoint = torch.load(first, weights_only=True)
    checkpoint["state_dict"]["quantize.embedding.weight"].add_(0.5)
    torch.save(checkpoint, other)
    train(str(other))
    assert len(encoded) == 4  # another condition VQGAN: encoded again
    names = sorted(os.listdir(run_dir / "token_cache"))
    assert len([n for n in names if n.startswith("tokens-")]) == 1  # the image tokens: once


def test_flipped_training_poses_are_encoded_from_the_flipped_picture(trained, data):
    model, _ = load_transformer(trained["keypoint-vqgan"])
    run_dir = os.path.dirname(trained["keypoint-vqgan"])
    (name,) = [n for n in os.listdir(os.path.join(run_dir, "token_cache"))
               if n.startswith("conditions-")]
    cached = torch.load(os.path.join(run_dir, "token_cache", name), weights_only=True)
    train_set = PoseImageDataset(str(data), image_size=SIZE, split="train", val_fraction=0.2,
                                 progress=False)
    item = train_set[(0, True)]  # flipped: keypoints mirrored with left and right swapped
    expected = model.condition_tokens({"keypoints": item["keypoints"][None],
                                       "parts": item["parts"][None]})
    assert torch.equal(cached["train"][0, 1], expected[0])


@pytest.mark.parametrize("condition", ["keypoint-vqgan", "parts-vqgan"])
def test_a_tiny_run_of_each_new_mode_samples_for_given_poses_and_evaluates(
        condition, trained, data, vqgan_path, tmp_path):
    checkpoint = trained[condition]
    out = tmp_path / "samples"
    poses = []
    if condition == "keypoint-vqgan":  # two given poses, on pictures of the training size
        entries = json.load(open(data / "poses.json"))
        kept = {name: entries[name] for name in sorted(entries)[:2]}
        (tmp_path / "poses.json").write_text(json.dumps(kept))
        poses = ["--poses", str(tmp_path / "poses.json"), "--pose-image-size", "32", "32"]
    sample.main(["--checkpoint", checkpoint, "--out", str(out), "--device", "cpu",
                 "--count", "2", "--num-samples", "1", *poses])
    assert len([name for _, _, names in os.walk(out) for name in names
                if name.endswith("_0.png")]) == 2
    json_path = tmp_path / "eval.json"
    evaluate.main(["--vqgan-checkpoint", str(vqgan_path), "--transformer-checkpoint",
                   checkpoint, "--dataset-path", str(data), "--val-fraction", "0.2", "--json",
                   str(json_path), "--batch-size", "4", "--num-pose-samples", "4",
                   "--num-workers", "0", "--device", "cpu", "--no-lpips",
                   "--train-pose-detector", "--pose-detector-steps", "2",
                   "--pose-detector-batch-size", "4"])
    results = json.load(open(json_path))
    assert results["transformer"]["condition"] == condition
    assert results["transformer"]["bits_per_token"] > 0
    assert 0 <= results["pose_fidelity"]["sample_iou"] <= 1
    assert 0 <= results["pose_accuracy"]["samples"]["all"] <= 1


def test_the_sliding_window_crops_the_condition_picture_with_the_image_window(trained, val_set):
    model, _ = load_transformer(trained["keypoint-vqgan"])
    keypoints = val_set[0]["keypoints"][None].clone()
    keypoints[..., 0] += 8  # the pose on a 48 x 32 picture: 16 x 24 tokens of 2 x 2 px
    f = SIZE // model.token_grid
    large = model.content.inputs({"keypoints": keypoints}, size=(48, 32))  # (1, 3, 32, 48)
    for left in (0, 4, 8):  # token columns
        window = window_condition(model, 0, left, 16, 24, keypoints=keypoints)
        crop = large[..., :, left * f:left * f + SIZE]
        assert torch.equal(window, model.n_embed + model.condition_vqgan.image_tokens(crop)
                           .flatten(1))


def test_condition_vqgan_modes_need_their_vqgan_and_refuse_one_elsewhere(
        data, vqgan_path, condition_vqgans, tmp_path):
    common = ["--dataset-path", str(data), "--vqgan-checkpoint", str(vqgan_path),
              "--run-dir", str(tmp_path / "run")]
    with pytest.raises(UserError, match="needs --condition-vqgan PATH"):
        training_transformer.main(common + ["--condition", "parts-vqgan"])
    with pytest.raises(UserError, match="--condition-vqgan is for --condition"):
        training_transformer.main(common + ["--condition", "keypoints", "--condition-vqgan",
                                            condition_vqgans["keypoint-images"]])
    with pytest.raises(UserError, match="needed for, and only for"):
        PoseTransformer(load_vqgan(str(vqgan_path)), condition="keypoint-vqgan", image_size=SIZE)
    with pytest.raises(UserError, match="part maps of 11 labels, the data's have 12"):
        PoseTransformer(load_vqgan(str(vqgan_path)), condition="parts-vqgan", image_size=SIZE,
                        condition_vqgan=load_vqgan(condition_vqgans["part-maps"],
                                                   content="part-maps"),
                        num_part_labels=12)  # another labelling than the condition VQGAN's
