"""Sampling token grids larger than the training grid (sliding attention window), and class
conditioning p(s | c) on folder-per-class data.

Models are tiny and untrained (sliding window) or trained for a few hundred steps on in-memory
tokens of an untrained 16 px VQGAN (classes): the tests check exact behaviour, plus one
statistical check that the class token steers the samples.
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mannequins
import sample
from data import PoseImageDataset
from poses import frame_box, reframe_keypoints
import sliding_window
from sliding_window import sample_grid, window_condition, window_origin
from transformer import PoseTransformer, load_transformer
from utils import UserError
from vqgan import VQGAN, VQGANConfig, save_vqgan

SIZE = 16  # pixels; f = 4 pixels per token: a 4 x 4 token grid


def tiny_vqgan(resolution=SIZE, attn_resolutions=()):
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=16,
                             attn_resolutions=attn_resolutions, embed_dim=16, n_embed=16,
                             resolution=resolution)).eval()


def make_model(condition="keypoints", resolution=SIZE, **kwargs):
    vqgan = tiny_vqgan(resolution)
    torch.manual_seed(0)
    return PoseTransformer(vqgan, condition, image_size=resolution, n_layer=1, n_head=2,
                           n_embd=32, **kwargs).eval()


def random_keypoints(batch, width, height, k=17):
    xy = torch.rand(batch, k, 2) * torch.tensor([width, height])
    return torch.cat([xy, torch.randint(0, 3, (batch, k, 1)).float()], dim=-1)


# ---- the sliding window --------------------------------------------------------------------


def test_the_window_is_centred_on_the_token_and_clamped_to_the_grid():
    # a 4 x 4 window on a 10 x 7 grid
    assert window_origin(0, 0, 10, 7, 4, 4) == (0, 0)
    assert window_origin(5, 3, 10, 7, 4, 4) == (3, 1)  # centred: 5 - 2, 3 - 2
    assert window_origin(2, 5, 10, 7, 4, 4) == (0, 3)  # top edge; right edge (7 - 4)
    assert window_origin(9, 6, 10, 7, 4, 4) == (6, 3)  # bottom right corner


CONDITIONS = {  # condition -> (model settings, sample_grid arguments for 3 samples)
    "keypoints": ({}, lambda: dict(keypoints=random_keypoints(3, SIZE, SIZE))),
    "parts": ({}, lambda: dict(part_maps=torch.randint(0, 11, (3, SIZE, SIZE)))),
    "class": (dict(class_names=["a", "b", "c"]), lambda: dict(labels=torch.tensor([2, 0, 1]))),
    "none": ({}, lambda: dict(batch_size=3)),
}


@pytest.mark.parametrize("condition", sorted(CONDITIONS))
@pytest.mark.parametrize("settings", [dict(), dict(top_k=5, top_p=0.9, temperature=1.5)])
def test_sample_grid_on_the_training_grid_equals_sample_exactly(condition, settings):
    extra, conditions = CONDITIONS[condition]
    model = make_model(condition, **extra)
    given = conditions()
    cond = model.condition_tokens(**given)
    expected = model.sample(cond, generator=torch.Generator().manual_seed(7), **settings)
    tokens = sample_grid(model, 4, 4, generator=torch.Generator().manual_seed(7), **given,
                         **settings)
    assert tokens.shape == (3, 4, 4)
    assert torch.equal(tokens.flatten(1), expected)


def test_guided_sample_grid_on_the_training_grid_equals_guided_sample_exactly():
    model = make_model(condition_dropout=0.1)
    keypoints = random_keypoints(3, SIZE, SIZE)
    expected = model.sample(model.condition_tokens(keypoints=keypoints), guidance=2.5,
                            generator=torch.Generator().manual_seed(7))
    tokens = sample_grid(model, 4, 4, keypoints=keypoints, guidance=2.5,
                         generator=torch.Generator().manual_seed(7))
    assert torch.equal(tokens.flatten(1), expected)
    assert not torch.equal(expected, model.sample(model.condition_tokens(keypoints=keypoints),
                                                  generator=torch.Generator().manual_seed(7),
                                                  guidance=1))


@pytest.mark.parametrize("grid", [(24, 20), (8, 32)])
def test_every_gpt_input_of_a_larger_grid_fits_the_block_size(grid, monkeypatch):
    model = make_model(resolution=32)  # an 8 x 8 training grid
    block_size = model.gpt.config.block_size  # 17 keypoints + 63 image tokens
    spans, forward = [], model.gpt.forward

    def spy(idx, kv_cache=None, start_pos=0, features=None):
        spans.append((start_pos, idx.size(1)))
        return forward(idx, kv_cache, start_pos, features)
    monkeypatch.setattr(model.gpt, "forward", spy)
    grid_h, grid_w = grid
    keypoints = random_keypoints(2, 4 * grid_w, 4 * grid_h)  # pixels of the large image
    tokens = sample_grid(model, grid_h, grid_w, keypoints=keypoints,
                         generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, grid_h, grid_w)
    assert 0 <= tokens.min() and tokens.max() < model.n_embed
    ends = [start + length for start, length in spans]
    assert max(ends) == block_size  # full windows are used ...
    assert len(spans) == grid_h * grid_w  # ... one forward per token, none past the block size
    from_scratch = sum(start == 0 for start, _ in spans)
    assert 1 < from_scratch < grid_h * grid_w  # the KV cache serves windows that stay put


def test_each_token_of_a_larger_grid_is_the_greedy_choice_given_its_window():
    """The definition, recomputed from the finished grid: condition of the window, then the
    window's tokens before (i, j) in its raster order."""
    model = make_model()
    grid_h, grid_w = 7, 6
    keypoints = random_keypoints(2, 4 * grid_w, 4 * grid_h)
    tokens = sample_grid(model, grid_h, grid_w, keypoints=keypoints, top_k=1)
    for i in range(grid_h):
        for j in range(grid_w):
            top, left = window_origin(i, j, grid_h, grid_w, 4, 4)
            k = (i - top) * 4 + (j - left)
            cond = window_condition(model, top, left, grid_h, grid_w, keypoints=keypoints)
            context = tokens[:, top:top + 4, left:left + 4].flatten(1)[:, :k]
            with torch.no_grad():
                logits = model.gpt_forward(torch.cat([cond, context], dim=1))[:, -1]
            assert torch.equal(tokens[:, i, j], logits.argmax(-1)), (i, j)


def test_window_condition_sees_keypoints_in_the_window_frame_and_the_cropped_part_map():
    model = make_model(keypoint_grid=8, num_keypoints=2)  # cells of 2 px on the 16 px window
    not_visible = model.n_embed + 8 * 8
    # a 32 x 32 px image (8 x 8 tokens); a visible joint at x 20, y 6 and an invisible one
    keypoints = torch.tensor([[[20.0, 6.0, 2.0], [20.0, 6.0, 0.0]]])
    right = window_condition(model, 0, 4, 8, 8, keypoints=keypoints)  # pixels x 16..32, y 0..16
    assert right.tolist() == [[model.n_embed + 3 * 8 + 2, not_visible]]  # (4, 6): row 3, col 2
    left = window_condition(model, 0, 0, 8, 8, keypoints=keypoints)  # x 0..16: the joint is out
    assert left.tolist() == [[not_visible, not_visible]]

    parts_model = make_model("parts")
    part_map = torch.randint(0, 11, (1, 32, 32))  # 4 px per token of an 8 x 8 grid
    window = window_condition(parts_model, 2, 4, 8, 8, part_maps=part_map)
    assert torch.equal(window, parts_model.condition_tokens(part_maps=part_map[:, 8:24, 16:32]))


def test_decode_takes_a_non_square_token_grid():
    vqgan = tiny_vqgan(attn_resolutions=(4,))  # attention in the decoder, on any grid size
    model = PoseTransformer(vqgan, "none", image_size=SIZE, n_layer=1, n_head=2, n_embd=32)
    images = model.decode(torch.randint(0, 16, (2, 5, 3)))
    assert images.shape == (2, 3, 20, 12)
    assert torch.isfinite(images).all()


def test_pose_maps_onto_a_non_square_canvas_like_training_squared_images():
    centre = np.array([[50, 25, 2], [99, 0, 2], [0, 49, 1]], np.float32)
    # 100 x 50 padded onto 20 x 24: a 100 x 120 region from y = -35, scaled by 1 / 5
    padded = sample.to_model_pose(centre, (100, 50), (20, 24), "pad")
    np.testing.assert_allclose(padded, [[10, 12, 2], [19.8, 7, 2], [0, 16.8, 1]], rtol=1e-6)
    # cropped: the 42 x 50 region from x = 29; the corner joints fall outside
    cropped = sample.to_model_pose(centre, (100, 50), (20, 24), "crop")
    assert cropped[0].tolist() == pytest.approx([10, 12, 2])
    assert cropped[1:, 2].tolist() == [0, 0]
    # on a square canvas it is exactly how training squared images
    rng = np.random.default_rng(0)
    for size in [(63, 40), (31, 80), (50, 50)]:
        keypoints = np.concatenate([rng.uniform(0, 1, (17, 2)) * size, np.full((17, 1), 2)], 1)
        for mode in ("pad", "crop"):
            # training keeps the centred square of side max (pad) or min (crop) of the image's
            # width and height, at integer pixels, and scales it to 32 px
            side = max(size) if mode == "pad" else min(size)
            origin = np.array([(size[0] - side) // 2, (size[1] - side) // 2])
            expected = keypoints.copy()
            expected[:, :2] = (keypoints[:, :2] - origin) * (32 / side)
            outside = ((expected[:, :2] < 0) | (expected[:, :2] >= 32)).any(1)
            expected[outside, 2] = 0
            assert sample.to_model_pose(keypoints, size, (32, 32), mode) == pytest.approx(
                expected, abs=1e-4)
            assert np.array_equal(  # and it is what data.py does to a training image's pose
                sample.to_model_pose(keypoints, size, (32, 32), mode),
                reframe_keypoints(keypoints, frame_box(size, (32, 32), mode), (32, 32)))


def test_square_part_map_is_padded_whole_onto_a_wide_canvas():
    parts = torch.arange(16).view(4, 4) % 11
    placed = sample.to_canvas_parts(parts, (8, 4))  # 8 wide, 4 high
    assert placed.shape == (4, 8)
    assert torch.equal(placed[:, 2:6], parts)
    assert placed[:, :2].eq(0).all() and placed[:, 6:].eq(0).all()


# ---- sample.py --grid-size ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mannequin_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mannequins") / "set"
    mannequins.write_dataset(str(root), count=48, image_size=SIZE, seed=0, workers=1)
    return root


@pytest.fixture(scope="module")
def vqgan_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vqgan") / "vqgan.pt")
    save_vqgan(tiny_vqgan(), path)
    return path


@pytest.fixture(scope="module")
def train(train_tiny_transformer):
    """train(data, vqgan_path, run_dir, *flags) -> checkpoint of a run at SIZE px, batch 32."""
    return lambda data, vqgan_path, run_dir, *flags: train_tiny_transformer(
        data, vqgan_path, run_dir, SIZE, "--batch-size", "32", "--grid-examples", "2",
        "--log-every", "100", *flags)


@pytest.fixture(scope="module")
def checkpoint_of_keypoints(train, mannequin_root, vqgan_path, tmp_path_factory):
    return train(mannequin_root, vqgan_path, tmp_path_factory.mktemp("keypoints"),
                 "--max-steps", "1")


def test_sample_py_grid_size_samples_larger_images_for_poses_on_the_large_canvas(
        checkpoint_of_keypoints, tmp_path, monkeypatch):
    checkpoint = checkpoint_of_keypoints
    calls, original = [], sliding_window.sample_grid

    def spy(model, grid_h, grid_w, **kwargs):
        calls.append(dict(grid=(grid_h, grid_w), **kwargs))
        return original(model, grid_h, grid_w, **kwargs)
    monkeypatch.setattr(sliding_window, "sample_grid", spy)
    keypoints = [[0, 0, 0]] * 17
    keypoints[0], keypoints[15] = [10, 3, 2], [17, 22, 2]  # nose, left ankle on a 20 x 24 image
    (tmp_path / "poses.json").write_text(json.dumps({"tall.png": keypoints}))
    out = tmp_path / "out"
    sample.main(["--checkpoint", checkpoint, "--out", str(out), "--device", "cpu",
                 "--poses", str(tmp_path / "poses.json"), "--grid-size", "6", "5"])
    assert sorted(os.listdir(out)) == ["grid.png", "tall_0.png", "tall_1.png"]
    assert Image.open(out / "tall_0.png").size == (20, 24)  # 5 x 6 tokens of 4 px
    (call,) = calls
    assert call["grid"] == (6, 5)  # without a picture, poses refer to the sampled image itself
    assert torch.equal(call["keypoints"], torch.tensor([keypoints] * 2, dtype=torch.float32))

    with pytest.raises(UserError, match="smaller than"):
        sample.main(["--checkpoint", checkpoint, "--out", str(out), "--device", "cpu",
                     "--grid-size", "3", "8"])


# ---- class conditioning --------------------------------------------------------------------


@pytest.fixture(scope="module")
def class_root(mannequin_root, tmp_path_factory):
    """The mannequins in two class folders: 'inverted' (negative colours) and 'plain'."""
    root = tmp_path_factory.mktemp("classes")
    names = sorted(os.listdir(mannequin_root / "images"))
    for index, name in enumerate(names):
        pixels = np.asarray(Image.open(mannequin_root / "images" / name).convert("RGB"))
        label = "inverted" if index % 2 else "plain"
        os.makedirs(root / label, exist_ok=True)
        Image.fromarray(255 - pixels if label == "inverted" else pixels).save(root / label / name)
    return root


def test_class_folders_give_sorted_class_names_and_labels(class_root, tmp_path):
    dataset = PoseImageDataset(str(class_root), SIZE, "all", progress=False,
                                     class_labels=True)
    assert dataset.class_names == ["inverted", "plain"]
    for index in (0, 1, len(dataset) - 1):
        item = dataset[index]
        assert item["label"].item() == dataset.class_names.index(item["path"].split("/")[0])
    assert "label" not in PoseImageDataset(str(class_root), SIZE, "all",
                                                 progress=False)[0]

    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "loose.png")
    with pytest.raises(UserError, match="directly in it"):
        PoseImageDataset(str(tmp_path), SIZE, "all", progress=False, class_labels=True)
    one_class = tmp_path / "one"
    (one_class / "cats").mkdir(parents=True)
    Image.new("RGB", (SIZE, SIZE)).save(one_class / "cats" / "a.png")
    with pytest.raises(UserError, match="at least two class folders"):
        PoseImageDataset(str(one_class), SIZE, "all", progress=False, class_labels=True)


def test_class_token_is_one_id_per_class_after_the_codes():
    model = make_model("class", class_names=["a", "b"])
    assert model.condition_tokens(labels=torch.tensor([1, 0])).tolist() == [[17], [16]]
    assert model.gpt.config.vocab_size == 16 + 2
    with pytest.raises(UserError, match="class labels"):
        model.condition_tokens(labels=torch.tensor([2]))
    with pytest.raises(UserError, match="class_names"):
        make_model("class")


@pytest.fixture(scope="module")
def class_run(train, class_root, vqgan_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("class_run")
    checkpoint = train(class_root, vqgan_path, run_dir, "--condition", "class",
                       "--max-steps", "500", "--lr", "3e-3", "--warmup-steps", "10")
    return run_dir, checkpoint


def test_class_token_steers_samples_to_their_class_token_statistics(class_run):
    """Per position, the distribution of codes: the class's own data vs the samples for it.

    An untrained VQGAN maps both classes to similar overall code histograms, but to different
    codes position by position, so the statistic is the mean total-variation distance between
    per-position code distributions.
    """
    run_dir, checkpoint = class_run
    model, _ = load_transformer(checkpoint)
    assert model.config["class_names"] == ["inverted", "plain"]
    (name,) = os.listdir(run_dir / "token_cache")
    cache = torch.load(run_dir / "token_cache" / name, weights_only=True)["train"]
    tokens, labels = cache["tokens"], cache["labels"][:, 0]  # (N, 2 flips, 16), (N,)

    def per_position(t):  # (n, 16) -> (16, n_embed) code frequencies per position
        return F.one_hot(t, model.n_embed).float().mean(0)

    def distance(a, b):
        return 0.5 * (a - b).abs().sum(-1).mean().item()
    data = [per_position(tokens[labels == c].flatten(0, 1)) for c in range(2)]
    assert distance(*data) > 0.25  # the classes differ
    generator = torch.Generator().manual_seed(0)
    for c in range(2):
        cond = model.condition_tokens(labels=torch.full((256,), c))
        drawn = per_position(model.sample(cond, generator=generator))
        own, other = distance(drawn, data[c]), distance(drawn, data[1 - c])
        assert own + 0.1 < other, (c, own, other)


def test_sample_py_class_names_the_class_and_checks_it(class_run, checkpoint_of_keypoints,
                                                       tmp_path):
    _, checkpoint = class_run
    out = tmp_path / "out"
    sample.main(["--checkpoint", checkpoint, "--out", str(out), "--device", "cpu",
                 "--class", "plain", "--num-samples", "3"])
    assert sorted(os.listdir(out)) == ["grid.png", "plain_0.png", "plain_1.png", "plain_2.png"]
    with pytest.raises(UserError, match="unknown class 'cats'.*inverted, plain"):
        sample.main(["--checkpoint", checkpoint, "--out", str(out), "--device", "cpu",
                     "--class", "cats"])
    with pytest.raises(UserError, match="no --class.*inverted, plain"):
        sample.main(["--checkpoint", checkpoint, "--out", str(out), "--device", "cpu"])
    with pytest.raises(UserError, match="leave --class out"):
        sample.main(["--checkpoint", checkpoint_of_keypoints, "--out", str(out),
                     "--device", "cpu", "--class", "plain"])
