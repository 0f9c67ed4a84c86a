"""Stage 2 training end to end on 48 tiny mannequins and an untrained 32 px VQGAN.

No stage-1 training is needed: the transformer only needs *some* frozen VQGAN. Runs are a few
steps of a one-layer GPT; main() is called in-process (it raises UserError for bad input) and
the command line is checked once through a subprocess.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mingpt
import runs
import training_loop
import training_transformer
import utils
from data import PoseImageDataset
from poses import COCO17, DENSEPOSE_PARTS, PART_NAMES, colorize_parts, draw_skeleton
from runs import scheduled_lr
from training_loop import weight_average
from transformer import PoseTransformer, load_transformer
from utils import UserError
from vqgan import VQGAN, load_vqgan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32  # pixels; the VQGAN below makes 16 x 16 tokens of it
STEPS = 5  # the training split holds 39 images: 4 batches of 8 make an epoch



def train_args(data, vqgan_path, run_dir, *extra):
    """Flags of a tiny run; `extra` flags come last, so they override these."""
    return ["--dataset-path", str(data), "--vqgan-checkpoint", str(vqgan_path),
            "--image-size", str(SIZE), "--val-fraction", "0.2", "--run-dir", str(run_dir),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "8",
            "--lr", "1e-3", "--warmup-steps", "2", "--pkeep", "0.5", "--dropout", "0.1",
            "--grid-examples", "2", "--num-workers", "0", "--device", "cpu",
            "--max-steps", str(STEPS), *extra]


def datasets(data):
    common = dict(root=str(data), image_size=SIZE, val_fraction=0.2, progress=False)
    return (PoseImageDataset(split="train", **common),
            PoseImageDataset(split="val", **common))


def read_cache(run_dir):
    (name,) = os.listdir(os.path.join(run_dir, "token_cache"))
    return torch.load(os.path.join(run_dir, "token_cache", name), weights_only=True)


def last_checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, "transformer_last.pt"), weights_only=True)


def count_calls(monkeypatch, owner, name):
    """Wrap owner.name so that calls are counted; returns the list of call arguments."""
    calls, original = [], getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.fixture(scope="module")
def data(mannequin_set):
    return mannequin_set(48, SIZE)


@pytest.fixture(scope="module")
def trained(data, vqgan_path, tmp_path_factory):
    """One keypoint-conditioned run of STEPS steps, watching its VQGAN and optimizer."""
    run_dir = tmp_path_factory.mktemp("trained")
    seen = {}

    def watch_vqgan(*args, **kwargs):
        seen["vqgan"] = load_vqgan(*args, **kwargs)
        return seen["vqgan"]

    configure_optimizer = mingpt.GPT.configure_optimizer

    def watch_optimizer(gpt, *args, **kwargs):
        seen["gpt"], seen["optimizer"] = gpt, configure_optimizer(gpt, *args, **kwargs)
        return seen["optimizer"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training_transformer, "load_vqgan", watch_vqgan)
        patch.setattr(mingpt.GPT, "configure_optimizer", watch_optimizer)
        training_transformer.main(train_args(data, vqgan_path, run_dir))
    return run_dir, seen


def fresh_run_with_cache_of(trained_run_dir, tmp_path):
    """A new run folder that already holds the trained run's token cache."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run_dir / "token_cache", run_dir / "token_cache")
    return run_dir


# ---- the learning-rate schedule ------------------------------------------------------------


def test_lr_rises_linearly_during_warmup_then_follows_a_cosine_down_to_the_floor():
    peak, warmup, total, floor = 1.0, 10, 110, 0.1

    def lr(step):
        return scheduled_lr(step, peak, warmup, total, floor)
    assert lr(0) == pytest.approx(0.1)  # 1 / 10 of the peak
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)  # the cosine starts at the peak
    assert lr(35) == pytest.approx(0.1 + 0.45 * (1 + 0.5**0.5))  # 0.1 + 0.9 (1 + cos(pi/4)) / 2
    assert lr(60) == pytest.approx(0.55)  # half way
    assert lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)  # stays at the floor


def test_no_warmup_and_a_floor_of_one_keep_the_lr_constant():
    assert {scheduled_lr(step, 3e-4, 0, 100, 1.0) for step in (0, 1, 50, 99, 100)} == {3e-4}


# ---- the frozen VQGAN ----------------------------------------------------------------------


def test_vqgan_is_frozen_left_out_of_the_optimizer_and_of_the_checkpoint(trained, vqgan_path):
    run_dir, seen = trained
    vqgan, optimizer = seen["vqgan"], seen["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in seen["gpt"].parameters()}
    assert not optimized & {id(p) for p in vqgan.parameters()}
    on_disk = torch.load(vqgan_path, weights_only=True)["state_dict"]
    after = vqgan.state_dict()
    assert after.keys() == on_disk.keys()
    assert all(torch.equal(after[k], on_disk[k]) for k in on_disk), "training changed the VQGAN"
    keys = last_checkpoint(run_dir)["model"].keys()
    assert keys and all(k.startswith("gpt.") for k in keys), sorted(keys)[:5]


# ---- the token cache -----------------------------------------------------------------------


def test_token_cache_is_read_instead_of_encoding_and_trains_exactly_like_encoding(
        trained, data, vqgan_path, tmp_path, monkeypatch):
    trained_dir, _ = trained
    run_dir = fresh_run_with_cache_of(trained_dir, tmp_path)
    encodes = count_calls(monkeypatch, VQGAN, "encode")
    training_transformer.main(train_args(data, vqgan_path, run_dir))
    assert encodes == []
    # encoding must not use the global RNG that --pkeep and dropout draw from
    cached, encoded = last_checkpoint(run_dir)["model"], last_checkpoint(trained_dir)["model"]
    assert all(torch.equal(cached[k], encoded[k]) for k in encoded)


def test_token_cache_is_rebuilt_when_the_vqgan_file_changes(trained, data, vqgan_path, tmp_path,
                                                            monkeypatch, save_tiny_vqgan):
    run_dir = fresh_run_with_cache_of(trained[0], tmp_path)
    copy = str(tmp_path / "copy_of_vqgan.pt")
    shutil.copy(vqgan_path, copy)
    encodes = count_calls(monkeypatch, VQGAN, "encode")
    args = train_args(data, copy, run_dir, "--max-steps", "1", "--overwrite")
    training_transformer.main(args)
    assert encodes == [], "the same VQGAN content under another name should reuse the cache"
    save_tiny_vqgan(copy, seed=1)  # same file, other weights
    training_transformer.main(args)
    assert encodes


def test_a_token_cache_of_the_format_before_is_rebuilt(trained, data, vqgan_path, tmp_path,
                                                       monkeypatch):
    """Format 2 (NCHW encoding, joints on the image's edge visible): a cache written before holds
    other tokens or keypoints under a key that otherwise still matches."""
    run_dir = fresh_run_with_cache_of(trained[0], tmp_path)
    (path,) = (run_dir / "token_cache").glob("*.pt")
    cache = torch.load(path, weights_only=True)
    key = cache["key"]
    assert key.pop("format") == 2
    path.unlink()  # written as the code before wrote it: named by the key without the format
    settings = utils.stable_hash(json.dumps({k: v for k, v in key.items() if k != "files"},
                                            sort_keys=True))
    torch.save(cache, path.with_name(f"tokens-{key['vqgan_sha256'][:12]}-{settings:08x}.pt"))
    encodes = count_calls(monkeypatch, VQGAN, "encode")
    training_transformer.main(train_args(data, vqgan_path, run_dir, "--max-steps", "1",
                                         "--overwrite"))
    assert encodes


def test_the_vqgan_path_is_stored_absolute_and_resumes_from_another_spelling(
        trained, data, vqgan_path, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    monkeypatch.chdir(os.path.dirname(vqgan_path))
    capsys.readouterr()
    training_transformer.main(train_args(data, "./" + os.path.basename(vqgan_path), run_dir,
                                         "--resume", "--max-steps", str(STEPS + 1)))
    assert "warning" not in capsys.readouterr().err
    assert last_checkpoint(run_dir)["args"]["vqgan_checkpoint"] == os.path.realpath(vqgan_path)


def test_a_resume_behind_another_vqgan_is_refused_before_any_encoding(
        trained, data, vqgan_path, tmp_path, monkeypatch, save_tiny_vqgan):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    other = save_tiny_vqgan(str(tmp_path / "other.pt"), seed=1)  # the same shape, other weights
    encodes = count_calls(monkeypatch, VQGAN, "encode")
    with pytest.raises(UserError, match=r"\(their contents differ\); resume it with its own: "
                                        rf"--vqgan-checkpoint {vqgan_path}$"):
        training_transformer.main(train_args(data, other, run_dir, "--resume"))
    assert encodes == []


def test_token_cache_is_rebuilt_when_the_dataset_gains_an_image(data, vqgan_path, tmp_path,
                                                                monkeypatch):
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    args = train_args(folder, vqgan_path, tmp_path / "run", "--max-steps", "1", "--overwrite")
    training_transformer.main(args)
    for sub in ("images", "parts/images"):
        shutil.copy(folder / sub / "000002.png", folder / sub / "extra.png")
    encodes = count_calls(monkeypatch, VQGAN, "encode")
    training_transformer.main(args)
    assert encodes
    cache = read_cache(tmp_path / "run")
    assert "images/extra.png" in cache["train"]["paths"] + cache["val"]["paths"]


@pytest.fixture
def small_copy(mannequin_set, tmp_path):
    """A copy of 12 mannequins (10 training images) that a test may edit."""
    folder = tmp_path / "data"
    shutil.copytree(mannequin_set(12, SIZE), folder)
    return folder


def edit_pose(folder):
    """Move every joint of poses.json by (2, 1) px; returns the new poses."""
    poses = json.loads((folder / "poses.json").read_text())
    poses = {name: [[x + 2, y + 1, v] for x, y, v in joints] for name, joints in poses.items()}
    (folder / "poses.json").write_text(json.dumps(poses))
    return poses


def edit_part_map(folder):
    """Relabel one part map's torso as head; returns its name."""
    path = folder / "parts" / "images" / "000003.png"
    labels = np.asarray(Image.open(path)).copy()
    labels[labels == PART_NAMES.index("torso")] = PART_NAMES.index("head")
    Image.fromarray(labels).save(path)
    return "images/000003.png"


def edit_image(folder):
    """Invert one image's pixels (same size, same file name); returns its name."""
    path = folder / "images" / "000005.png"
    Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    return "images/000005.png"


def cached_example(cache, name):
    """The cached (unflipped) tokens, keypoints and parts of one example, by name."""
    for split in ("train", "val"):
        if name in cache[split]["paths"]:
            i = cache[split]["paths"].index(name)
            return {key: cache[split][key][i, 0] for key in ("tokens", "keypoints", "parts")}
    raise KeyError(name)


def test_token_cache_is_rebuilt_whenever_a_pose_part_map_or_image_changes_and_only_then(
        small_copy, vqgan_path, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = train_args(small_copy, vqgan_path, run_dir, "--max-steps", "1", "--overwrite")
    training_transformer.main(args)
    encodes = count_calls(monkeypatch, VQGAN, "encode")
    training_transformer.main(args)
    assert encodes == [], "an untouched folder must reuse the cache"
    poses = edit_pose(small_copy)
    training_transformer.main(args)
    assert encodes, "a moved joint must rebuild the cache"
    name = "images/000001.png"
    expected = np.asarray(poses[name], np.float32)[:, :2]  # 32 px images: no rescaling
    np.testing.assert_allclose(cached_example(read_cache(run_dir), name)["keypoints"][:, :2],
                               expected, atol=1e-5)

    encodes.clear()
    name = edit_part_map(small_copy)
    training_transformer.main(args)
    assert encodes, "a relabelled part map must rebuild the cache"
    parts = torch.from_numpy(np.array(Image.open(small_copy / "parts" / name))).long()
    assert torch.equal(cached_example(read_cache(run_dir), name)["parts"].long(), parts)

    encodes.clear()
    name = edit_image(small_copy)
    training_transformer.main(args)
    assert encodes, "new pixels must rebuild the cache"
    everything = PoseImageDataset(str(small_copy), image_size=SIZE, split="all",
                                        progress=False)
    item = everything[[e.name for e in everything.examples].index(name)]
    with torch.no_grad():  # the new pixels were read and encoded
        tokens = load_vqgan(vqgan_path).encode(item["image"][None])[2].flatten()
    assert torch.equal(cached_example(read_cache(run_dir), name)["tokens"], tokens)
    encodes.clear()
    training_transformer.main(args)
    assert encodes == [], "once rebuilt, the cache is reused again"


def write_coco_file(folder, shift=0):
    """person_keypoints.json for the mannequin images of `folder`: one person per image, its
    poses.json joints (moved by `shift` px) as COCO's integer pixel indices."""
    poses = json.loads((folder / "poses.json").read_text())
    images, annotations = [], []
    for i, (name, joints) in enumerate(sorted(poses.items())):
        images.append({"id": i, "file_name": name, "width": SIZE, "height": SIZE})
        keypoints = [[math.floor(x) + shift, math.floor(y), v] for x, y, v in joints]
        annotations.append({"id": i, "image_id": i, "bbox": [4, 4, 24, 24], "iscrowd": 0,
                            "num_keypoints": sum(v > 0 for _, _, v in joints),
                            "keypoints": [n for joint in keypoints for n in joint]})
    path = folder / "person_keypoints.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_token_cache_is_rebuilt_when_the_coco_file_changes(small_copy, vqgan_path, tmp_path,
                                                           monkeypatch):
    coco = write_coco_file(small_copy)
    args = train_args(small_copy, vqgan_path, tmp_path / "run", "--max-steps", "1", "--overwrite",
                      "--coco-annotations", str(coco))
    training_transformer.main(args)
    before = read_cache(tmp_path / "run")
    encodes = count_calls(monkeypatch, VQGAN, "encode")
    training_transformer.main(args)
    assert encodes == [], "an unchanged COCO file must reuse the cache"
    write_coco_file(small_copy, shift=1)  # the same images and people, joints 1 px further
    training_transformer.main(args)
    assert encodes, "moved COCO keypoints must rebuild the cache"
    after = read_cache(tmp_path / "run")
    assert after["train"]["paths"] == before["train"]["paths"]
    old, new = before["train"]["keypoints"][:, 0], after["train"]["keypoints"][:, 0]
    visible = (old[..., 2] > 0) & (new[..., 2] > 0)
    # the 24 px box with 10 % margins is a round(28.8) = 29 px square, resized to 32 px
    torch.testing.assert_close(new[..., 0][visible] - old[..., 0][visible],
                               torch.full((int(visible.sum()),), 32 / 29), rtol=0, atol=1e-4)


def test_cached_tokens_equal_a_direct_encode_and_flipped_tokens_encode_the_mirrored_image(
        trained, data, vqgan_path):
    cache = read_cache(trained[0])
    train_set, val_set = datasets(data)
    vqgan = load_vqgan(vqgan_path)

    def encode(images):
        with torch.no_grad():
            return vqgan.encode(images)[2].flatten(1)  # (B, h * w)
    train_images = torch.stack([train_set[i]["image"] for i in range(len(train_set))])
    val_images = torch.stack([val_set[i]["image"] for i in range(len(val_set))])
    assert cache["train"]["tokens"].shape == (len(train_set), 2, 16 * 16)
    assert torch.equal(cache["train"]["tokens"][:, 0], encode(train_images))
    assert torch.equal(cache["train"]["tokens"][:, 1], encode(train_images.flip(-1)))
    assert torch.equal(cache["val"]["tokens"][:, 0], encode(val_images))


def test_condition_prefixes_of_flipped_examples_come_from_mirrored_keypoints_with_sides_swapped(
        trained, data):
    cache = read_cache(trained[0])
    model, _ = load_transformer(os.path.join(trained[0], "transformer_last.pt"))
    train_set, _ = datasets(data)
    keypoints = torch.stack([train_set[i]["keypoints"] for i in range(len(train_set))])
    # by joint name: left_wrist takes the mirrored right_wrist and so on
    other_side = [COCO17.joints.index(name.replace("left_", "RIGHT_").replace("right_", "left_")
                                      .replace("RIGHT_", "right_")) for name in COCO17.joints]
    mirrored = keypoints.clone()
    mirrored[..., 0] = SIZE - mirrored[..., 0]
    swapped = mirrored[:, other_side]

    prefixes = training_transformer.condition_prefixes(model, cache["train"])  # (N, 2, 17)
    assert torch.equal(prefixes[:, 0], model.condition_tokens(keypoints=keypoints))
    assert torch.equal(prefixes[:, 1], model.condition_tokens(keypoints=swapped))
    assert not torch.equal(prefixes[:, 1], model.condition_tokens(keypoints=mirrored))


# ---- the image size, the part labelling, precision and compile ---------------------------


def test_image_size_is_the_vqgans_resolution_unless_given_and_the_run_says_so(
        trained, data, vqgan_path, tmp_path, capsys):
    run_dir = fresh_run_with_cache_of(trained[0], tmp_path)
    args = train_args(data, vqgan_path, run_dir, "--max-steps", "1")
    del args[args.index("--image-size"):args.index("--image-size") + 2]
    training_transformer.main(args)
    assert last_checkpoint(run_dir)["args"]["image_size"] == SIZE
    printed = capsys.readouterr().out
    assert f"{SIZE} px images -> 16x16 tokens of 32 codes; GPT 1 layers x 2 heads x 32" in printed
    assert "lr 0.001 (--lr)" in printed and "precision fp32" in printed


def test_stage_2_trains_in_bf16_on_a_cpu_with_avx512_bf16_and_its_tokens_keep_stage_1s_rule(
        trained, data, vqgan_path, tmp_path, capsys, monkeypatch):
    zen4 = {**torch.cpu.get_capabilities(), "amx_bf16": False, "avx512_bf16": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: zen4)
    run_dir = fresh_run_with_cache_of(trained[0], tmp_path)  # encoded under stage 1's fp32
    training_transformer.main(train_args(data, vqgan_path, run_dir, "--max-steps", "1"))
    printed = capsys.readouterr().out
    assert "precision bf16" in printed
    assert len(os.listdir(run_dir / "token_cache")) == 1  # found (another key: a second file)


def test_bench_times_stage_2_in_the_precision_its_training_resolves(monkeypatch, capsys):
    """bench.py transformer timed float32 on an AVX512-BF16 CPU where stage 2 trains in bf16."""
    import bench
    zen4 = {**torch.cpu.get_capabilities(), "amx_bf16": False, "avx512_bf16": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: zen4)
    bench.main(["transformer", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-embed",
                "32", "--tokens", "6", "--prefix", "3", "--batch-size", "2", "--warmup", "0",
                "--repeats", "1", "--threads", "1"])
    assert "precision bf16" in capsys.readouterr().out


# DensePose's part indices (its "I" channel) and the one each mirrors into, from its docs.
DENSEPOSE_MIRROR = {0: 0, 1: 1, 2: 2, 3: 4, 4: 3, 5: 6, 6: 5, 7: 8, 8: 7, 9: 10, 10: 9, 11: 12,
                    12: 11, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17, 19: 20, 20: 19,
                    21: 22, 22: 21, 23: 24, 24: 23}
# the mannequins' labels drawn as DensePose ones: head -> right head, left upper arm -> left
# upper arm inside, ..., left upper leg -> left upper leg back, ...
MANNEQUIN_AS_DENSEPOSE = np.array([0, 23, 2, 15, 16, 19, 20, 8, 7, 12, 11], np.uint8)


@pytest.fixture
def densepose_copy(small_copy):
    for path in (small_copy / "parts" / "images").iterdir():
        labels = MANNEQUIN_AS_DENSEPOSE[np.asarray(Image.open(path))]
        Image.fromarray(labels).save(path)
    return small_copy


def test_densepose_part_maps_train_with_their_labelling_and_flip_left_into_right(
        densepose_copy, vqgan_path, tmp_path):
    run_dir = tmp_path / "run"
    training_transformer.main(train_args(densepose_copy, vqgan_path, run_dir, "--max-steps",
                                         "1", "--condition", "parts", "--part-labels",
                                         "densepose"))
    checkpoint = last_checkpoint(run_dir)
    assert checkpoint["config"]["num_part_labels"] == 25
    assert checkpoint["part_labels"] == DENSEPOSE_PARTS.to_dict()
    parts = read_cache(run_dir)["train"]["parts"].long()  # (N, 2, S, S): as is, flipped
    assert {15, 23} <= set(parts[:, 0].unique().tolist())  # left upper arm, right head
    mirror = torch.tensor([DENSEPOSE_MIRROR[label] for label in range(25)])
    assert torch.equal(parts[:, 1], mirror[parts[:, 0].flip(-1)])


def test_part_labels_the_labelling_does_not_know_stop_the_run_before_any_encoding(
        densepose_copy, vqgan_path, tmp_path, monkeypatch):
    encodes = count_calls(monkeypatch, VQGAN, "encode")
    with pytest.raises(UserError, match=r"part map .*parts/images/0000\d\d\.png has label "
                                        r"(1[1-9]|2\d) .*--part-labels mannequin has labels "
                                        r"0 \.\. 10"):
        training_transformer.main(train_args(densepose_copy, vqgan_path, tmp_path / "run",
                                             "--condition", "parts"))
    assert encodes == [] and not (tmp_path / "run" / "token_cache").exists()


@pytest.fixture(scope="module")
def one_step_runs(trained, data, vqgan_path, tmp_path_factory):
    """One step of the tiny GPT in float32 eager, compiled, bf16 and fp16 (the cached tokens
    of `trained`): name -> (checkpoint, the logged loss). No dropout, --pkeep or condition
    dropout: compiled code draws its random numbers differently."""
    runs = {}
    for name, flags in (("fp32", []), ("compiled", ["--compile"]),
                        ("bf16", ["--precision", "bf16"]), ("fp16", ["--precision", "fp16"])):
        run_dir = fresh_run_with_cache_of(trained[0], tmp_path_factory.mktemp(name))
        training_transformer.main(train_args(data, vqgan_path, run_dir, "--max-steps", "1",
                                             "--log-every", "1", "--dropout", "0", "--pkeep",
                                             "1", "--condition-dropout", "0", *flags))
        (record,) = [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                     if "loss" in r]
        runs[name] = last_checkpoint(run_dir), record["loss"]
    return runs


def adam_first_moments(checkpoint):
    return torch.cat([state["exp_avg"].flatten()
                      for state in checkpoint["optimizer"]["state"].values()])


def test_a_compiled_step_is_the_eager_one(one_step_runs):
    (eager, eager_loss), (compiled, compiled_loss) = (one_step_runs[name]
                                                      for name in ("fp32", "compiled"))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    expected, moments = adam_first_moments(eager), adam_first_moments(compiled)
    assert ((moments - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bf16_and_real_fp16_with_a_grad_scaler_take_the_float32_step(one_step_runs,
                                                                      precision):
    """fp16 scales the loss by 2^16 before backward and unscales before clipping and Adam:
    the gradients are the float32 step's up to the precision's noise, not 2^16 times them."""
    (fp32, fp32_loss), (run, loss) = one_step_runs["fp32"], one_step_runs[precision]
    assert loss == pytest.approx(fp32_loss, rel=0.01) and loss != fp32_loss
    if precision == "fp16":
        assert run["scaler"]["scale"] == 2.0**16 and run["scaler"]["_growth_tracker"] == 1
    else:
        assert run["scaler"] == {} == fp32["scaler"]
    expected, moments = adam_first_moments(fp32), adam_first_moments(run)
    assert ((moments - expected).norm() / expected.norm()) < 0.1
    assert F.cosine_similarity(moments, expected, dim=0) > 0.99


# ---- exact resume --------------------------------------------------------------------------


def test_sampling_loads_the_moving_average_of_the_gpts_trained_weights(data, vqgan_path,
                                                                       tmp_path,
                                                                       averaged_weights_seen):
    """--ema-decay d: sample.py and evaluate.py (load_transformer) get e_1 = w_1, e_t = d_t
    e_(t-1) + (1 - d_t) w_t, d_t = min(d, t / (t + 9)), over the GPT's weights after each
    step; --resume the trained ones."""
    trained = averaged_weights_seen
    training_transformer.main(train_args(data, vqgan_path, tmp_path, "--ema-decay", "0.25"))
    assert len(trained) == STEPS
    expected = trained[0]
    for t, weights in enumerate(trained[1:], start=2):
        d = min(0.25, t / (t + 9))
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    loaded = load_transformer(str(tmp_path / "transformer_last.pt"), "cpu")[0].state_dict()
    assert loaded.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(loaded[name], expected[name], rtol=1e-5, atol=1e-6)
    raw = last_checkpoint(tmp_path)["model"]
    assert all(torch.equal(raw[k], trained[-1][k]) for k in raw)
    assert not torch.equal(raw["gpt.lm_head.weight"], loaded["gpt.lm_head.weight"])


def test_a_run_from_before_condition_dropout_and_averaging_resumes_with_its_own_command(
        trained, data, vqgan_path, tmp_path):
    """Their defaults came later: a checkpoint without them keeps neither (it was refused: its
    config has no condition_dropout, its flags no ema_decay)."""
    run_dir = fresh_run_with_cache_of(trained[0], tmp_path)
    old_command = train_args(data, vqgan_path, run_dir, "--max-steps", "2")
    training_transformer.main(old_command + ["--condition-dropout", "0", "--ema-decay", "0"])
    checkpoint = last_checkpoint(run_dir)
    for key in ("condition_dropout", "ema_decay"):
        del checkpoint["args"][key]
    assert "condition_dropout" not in checkpoint["config"]
    torch.save(checkpoint, run_dir / "transformer_last.pt")
    training_transformer.main(old_command[:-2] + ["--max-steps", "3", "--resume"])
    resumed = last_checkpoint(run_dir)
    assert resumed["step"] == 3 and "ema" not in resumed
    assert (resumed["args"]["condition_dropout"], resumed["args"]["ema_decay"]) == (0.0, 0.0)


def test_guidance_a_model_cannot_take_is_refused_before_any_step(data, vqgan_path, tmp_path,
                                                                 monkeypatch):
    """The grids' --guidance was refused at the first grid (step 500 by default), after
    training and before any checkpoint."""
    forwards = count_calls(monkeypatch, PoseTransformer, "forward")
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="--guidance 2 needs a model trained with --condition"):
        training_transformer.main(train_args(data, vqgan_path, run_dir, "--condition-dropout",
                                             "0", "--guidance", "2"))
    assert forwards == []
    assert not run_dir.exists()  # a refused command leaves no empty run folder behind


def test_the_weight_average_shares_the_frozen_vqgan_and_copies_the_gpt(trained):
    model, _ = load_transformer(str(trained[0] / "transformer_last.pt"))
    average = weight_average(model, 0.9).module
    assert average.vqgan is model.vqgan  # not a second copy of the frozen weights
    assert average.gpt is not model.gpt
    assert all(torch.equal(a, b) for a, b in zip(average.parameters(), model.parameters()))


def test_the_token_cache_is_encoded_by_the_vqgan_as_evaluate_and_sample_load_it(
        data, vqgan_path, tmp_path, monkeypatch):
    """channels_last runs other convolution kernels, whose bf16 roundings pick other codes now
    and then: the cache must hold the tokens that evaluate.py and --complete encode (NCHW)."""
    formats, encode = [], training_transformer.load_token_cache

    def recording(run, model, *args, **kwargs):
        formats.append(model.vqgan.encoder.conv_in.weight.is_contiguous())  # NCHW
        return encode(run, model, *args, **kwargs)
    monkeypatch.setattr(training_transformer, "load_token_cache", recording)
    training_transformer.main(train_args(data, vqgan_path, tmp_path / "run", "--channels-last",
                                         "--max-steps", "1"))
    assert formats == [True]
    assert load_vqgan(str(vqgan_path)).encoder.conv_in.weight.is_contiguous()


def test_logged_throughput_counts_the_steps_not_the_grids_and_saves_between_them(
        data, vqgan_path, tmp_path, monkeypatch):
    clock = {"now": 0.0}

    def perf_counter():  # each reading one second later: every step takes exactly one second
        clock["now"] += 1.0
        return clock["now"]
    monkeypatch.setattr(training_loop, "time", SimpleNamespace(perf_counter=perf_counter))
    draw = training_transformer.save_sample_grid

    def slow_grid(*args, **kwargs):
        clock["now"] += 1000.0  # the sample grid, drawn between steps 2 and 3, takes long
        return draw(*args, **kwargs)
    monkeypatch.setattr(training_transformer, "save_sample_grid", slow_grid)
    save = runs.RunDirectory.save_state

    def slow_save(*args, **kwargs):
        clock["now"] += 1000.0  # and the checkpoint, saved after step 3
        return save(*args, **kwargs)
    monkeypatch.setattr(runs.RunDirectory, "save_state", slow_save)
    run_dir = tmp_path / "run"
    training_transformer.main(train_args(data, vqgan_path, run_dir, "--max-steps", "4",
                                         "--log-every", "1", "--sample-every", "2",
                                         "--save-every", "3"))
    logged = [r["tokens_per_s"] for r in utils.read_jsonl(run_dir / "metrics.jsonl")
              if "tokens_per_s" in r]
    assert logged == [8 * 16 * 16] * 4  # a batch of 8 images of 16 x 16 tokens a second


@pytest.fixture(scope="module")
def resumed(data, vqgan_path, tmp_path_factory):
    """Six steps in one run, and the same six stopped by Ctrl-C after four (the command's exit
    status kept) and resumed."""
    whole, split = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("split")
    training_transformer.main(train_args(data, vqgan_path, whole, "--max-steps", "6",
                                         "--log-every", "1"))
    args = train_args(data, vqgan_path, split, "--max-steps", "6", "--log-every", "100")

    def ctrl_c_during_step_4(step, *rest):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return scheduled_lr(step, *rest)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as stop:
        patch.setattr(runs, "scheduled_lr", ctrl_c_during_step_4)
        utils.run_cli(lambda: training_transformer.main(args))
    stopped_at = last_checkpoint(split)["step"]
    training_transformer.main(args + ["--resume"])
    return whole, split, stopped_at, stop.value.code


def test_ctrl_c_exits_130_after_saving_so_that_a_pipeline_stops(resumed):
    *_, status = resumed
    assert status == 130


def test_stopped_and_resumed_run_ends_exactly_like_an_uninterrupted_one(resumed):
    whole_dir, split_dir, stopped_at, _ = resumed
    assert stopped_at == 4
    whole, split = last_checkpoint(whole_dir), last_checkpoint(split_dir)
    assert whole["step"] == split["step"] == 6
    for weights in ("model", "ema"):  # the trained and the averaged weights (on by default)
        assert whole[weights].keys() == split[weights].keys()
        assert all(torch.equal(whole[weights][k], split[weights][k]) for k in whole[weights])
    a, b = whole["optimizer"], split["optimizer"]
    assert a["param_groups"] == b["param_groups"]  # the lr of the last step among them
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        assert all(torch.equal(value, b["state"][index][name]) for name, value in state.items())


def logged_losses(run_dir):
    return {r["step"]: r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
            if "loss" in r}


def test_resumed_run_logs_the_mean_loss_and_lr_of_its_own_steps(resumed):
    whole_dir, split_dir, *_ = resumed
    per_step, last = logged_losses(whole_dir), logged_losses(split_dir)[6]
    assert last["loss"] == pytest.approx((per_step[5]["loss"] + per_step[6]["loss"]) / 2)
    assert last["lr"] == pytest.approx(per_step[6]["lr"])


def test_a_stopped_run_logs_the_steps_before_its_stop_so_that_no_step_goes_unlogged(resumed):
    whole_dir, split_dir, stopped_at, _ = resumed
    per_step, split = logged_losses(whole_dir), logged_losses(split_dir)
    assert sorted(split) == [stopped_at, 6]  # --log-every 100: the stop's row and the last
    assert split[stopped_at]["loss"] == pytest.approx(
        sum(per_step[step]["loss"] for step in range(1, stopped_at + 1)) / stopped_at)
    assert split[stopped_at]["lr"] == pytest.approx(per_step[stopped_at]["lr"])


def test_resuming_a_run_that_reached_its_max_steps_trains_nothing_and_says_so(
        trained, data, vqgan_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    before = (run_dir / "transformer_last.pt").read_bytes()
    capsys.readouterr()
    training_transformer.main(train_args(data, vqgan_path, run_dir, "--resume"))
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"nothing to train: {run_dir / 'transformer_last.pt'} is already at step {STEPS}, the "
        f"end of this run (--max-steps {STEPS}); pass a larger --max-steps to train on")
    assert (run_dir / "transformer_last.pt").read_bytes() == before


def test_resume_from_a_stage1_checkpoint_says_so(trained, data, vqgan_path):
    with pytest.raises(UserError, match="stage-1"):
        training_transformer.main(train_args(data, vqgan_path, trained[0], "--resume",
                                             vqgan_path))


def test_resume_with_another_architecture_names_the_field_that_differs(trained, data,
                                                                       vqgan_path):
    with pytest.raises(UserError, match="n_layer"):
        training_transformer.main(train_args(data, vqgan_path, trained[0], "--n-layer", "2",
                                             "--resume"))


# ---- what a run writes ---------------------------------------------------------------------


def test_temporary_files_that_a_killed_write_left_are_removed_at_the_next_start(
        trained, data, vqgan_path, tmp_path, capsys):
    run_dir = fresh_run_with_cache_of(trained[0], tmp_path)
    stale = [run_dir / ".tmp-k1ll3d.pt", run_dir / "token_cache" / ".tmp-0ld.pt"]
    for path in stale:
        path.write_bytes(b"half a checkpoint" * 1000)
    kept = run_dir / "notes-about-.tmp-files.txt"
    kept.write_text("mine")
    training_transformer.main(train_args(data, vqgan_path, run_dir, "--max-steps", "1"))
    assert not any(path.exists() for path in stale) and kept.exists()
    assert (f"removed 2 temporary file(s) (0.034 MB) that an interrupted write left in {run_dir}"
            in capsys.readouterr().out)


def test_validation_bits_per_token_are_logged_each_epoch_and_equal_the_cross_entropy(
        trained, data):
    run_dir, _ = trained
    records = [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
               if "val_bits_per_token" in r]
    assert [r["step"] for r in records] == [4, STEPS]  # end of epoch 1, end of the run
    model, _ = load_transformer(os.path.join(run_dir, "transformer_last.pt"))
    _, val_set = datasets(data)
    images = torch.stack([val_set[i]["image"] for i in range(len(val_set))])
    keypoints = torch.stack([val_set[i]["keypoints"] for i in range(len(val_set))])
    with torch.no_grad():
        tokens = model.vqgan.encode(images)[2].flatten(1)  # (N, L)
        cond = model.condition_tokens(keypoints=keypoints)  # (N, P)
        logits = model.gpt_forward(torch.cat([cond, tokens[:, :-1]], dim=1))[:, cond.size(1) - 1:]
        nats = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert records[-1]["val_bits_per_token"] == pytest.approx(nats.item() / math.log(2),
                                                              rel=1e-5)


def cell(grid, row, column, side=SIZE, pad=2):
    left, top = pad + column * (side + pad), pad + row * (side + pad)
    return np.asarray(grid.crop((left, top, left + side, top + side)))


def test_sample_grid_rows_are_pose_original_reconstruction_completion_and_two_samples(
        trained, data):
    run_dir, seen = trained
    grid = Image.open(os.path.join(run_dir, "samples", f"samples_{STEPS:06d}.png"))
    examples, pad = 2, 2
    assert grid.size == (6 * (SIZE + pad) + pad, examples * (SIZE + pad) + pad)
    _, val_set = datasets(data)
    tokens = read_cache(run_dir)["val"]["tokens"][:, 0]
    with torch.no_grad():
        reconstructions = seen["vqgan"].decode_indices(tokens[:examples].view(-1, 16, 16))
    for row in range(examples):
        item = val_set[row]
        skeleton = draw_skeleton(item["keypoints"], COCO17, (SIZE, SIZE))
        assert np.array_equal(cell(grid, row, 0), np.asarray(skeleton))
        assert np.array_equal(cell(grid, row, 1), np.asarray(utils.to_uint8_image(item["image"])))
        reconstruction = utils.to_uint8_image(reconstructions[row])
        assert np.array_equal(cell(grid, row, 2), np.asarray(reconstruction))


@pytest.mark.parametrize("condition", ["parts", "none"])
def test_part_map_and_unconditional_models_train_and_draw_their_condition(
        condition, trained, data, vqgan_path, tmp_path):
    run_dir = fresh_run_with_cache_of(trained[0], tmp_path)
    training_transformer.main(train_args(data, vqgan_path, run_dir, "--max-steps", "2",
                                         "--condition", condition))
    checkpoint = last_checkpoint(run_dir)
    assert checkpoint["step"] == 2 and checkpoint["config"]["condition"] == condition
    losses = [r["loss"] for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
              if "loss" in r]
    assert losses and all(math.isfinite(loss) for loss in losses)
    grid = Image.open(os.path.join(run_dir, "samples", "samples_000002.png"))
    _, val_set = datasets(data)
    expected = (colorize_parts(val_set[0]["parts"]) if condition == "parts"
                else Image.new("RGB", (SIZE, SIZE), "white"))
    assert np.array_equal(cell(grid, 0, 0), np.asarray(expected))


def test_condition_keypoints_on_a_folder_without_poses_json_is_a_user_error(
        data, vqgan_path, tmp_path):
    folder = tmp_path / "no_poses"
    shutil.copytree(data / "images", folder / "images")
    with pytest.raises(UserError, match="poses.json"):
        training_transformer.main(train_args(folder, vqgan_path, tmp_path / "run",
                                             "--condition", "keypoints"))


def test_command_line_reports_a_user_error_as_one_line_and_exit_status_2(tmp_path):
    missing = str(tmp_path / "missing.pt")
    result = subprocess.run([sys.executable, "training_transformer.py", "--vqgan-checkpoint",
                             missing, "--run-dir", str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no stage-1 checkpoint at {missing}; run python training_vqgan.py first or pass "
        "--vqgan-checkpoint"]
