"""sample.py end to end on a two-step transformer over an untrained 32 px VQGAN.

The samples are noise, which is fine: these tests check which files appear, where a pose lands
on the model's square, that a seed repeats itself, that a completion keeps the given top half,
and that every bad input stops with one clear UserError.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import images
import sample
import sampling
from data import PoseImageDataset
from transformer import PoseTransformer
import utils
from utils import UserError
from vqgan import load_vqgan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
HALF = 16 * 16 // 2  # tokens in the top half of the 16 x 16 grid
NOSE, LEFT_ANKLE = 0, 15



def pose(*visible):
    """17 COCO keypoints: the given (index, x, y, v) ones, every other joint not visible."""
    keypoints = [[0, 0, 0] for _ in range(17)]
    for index, x, y, v in visible:
        keypoints[index] = [x, y, v]
    return keypoints


def write_json(path, value):
    path.write_text(json.dumps(value))
    return str(path)


@pytest.fixture(scope="module")
def data(mannequin_set):
    return mannequin_set(48, SIZE)


@pytest.fixture(scope="module")
def train(train_tiny_transformer):
    """train(data, vqgan_path, run_dir, *flags) -> checkpoint of a 2-step run at SIZE px."""
    return lambda data, vqgan_path, run_dir, *flags: train_tiny_transformer(
        data, vqgan_path, run_dir, SIZE, "--batch-size", "8", "--max-steps", "2",
        "--grid-examples", "1", *flags)


@pytest.fixture(scope="module")
def checkpoint(train, data, vqgan_path, tmp_path_factory):
    """A keypoint-conditioned model (the mannequins' poses, padded to squares)."""
    return train(data, vqgan_path, tmp_path_factory.mktemp("keypoints"))


@pytest.fixture(scope="module")
def parts_checkpoint(train, data, vqgan_path, tmp_path_factory):
    return train(data, vqgan_path, tmp_path_factory.mktemp("parts"), "--condition", "parts")


@pytest.fixture
def sampled(monkeypatch):
    """Record what PoseTransformer.sample is given and returns, call by call."""
    calls, original = [], PoseTransformer.sample

    def spy(model, cond, **kwargs):
        tokens = original(model, cond, **kwargs)
        calls.append(dict(model=model, cond=cond, tokens=tokens, **kwargs))
        return tokens
    monkeypatch.setattr(PoseTransformer, "sample", spy)
    return calls


def run(checkpoint, out, *extra):
    sample.main(["--checkpoint", checkpoint, "--out", str(out), "--device", "cpu", *extra])


def png_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def files_below(folder):
    """Relative paths of every file below `folder`, sorted."""
    return sorted(os.path.relpath(os.path.join(where, name), folder).replace(os.sep, "/")
                  for where, _, names in os.walk(folder) for name in names)


@pytest.fixture
def pose_file(tmp_path):
    """poses.json for 'photo.png' (a 64 x 32 picture beside it) and 'drawn.png' (no picture)."""
    Image.new("RGB", (64, 32), "gray").save(tmp_path / "photo.png")
    return write_json(tmp_path / "poses.json", {
        "photo.png": pose((NOSE, 20, 4, 2), (LEFT_ANKLE, 40, 30, 1)),
        "drawn.png": pose((NOSE, 50, 25, 2), (LEFT_ANKLE, 25, 0, 2))})


# ---- what sample.py writes -----------------------------------------------------------------


def test_validation_poses_give_one_file_per_pose_and_sample_and_a_grid(checkpoint, data,
                                                                      tmp_path):
    out = tmp_path / "out"
    run(checkpoint, out, "--count", "2", "--num-samples", "2")
    val_set = PoseImageDataset(str(data), SIZE, "val", 0.2, progress=False)
    stems = [os.path.splitext(e.name)[0] for e in val_set.examples[:2]]  # images/000123
    assert files_below(out) == sorted(
        [f"{stem}_{i}.png" for stem in stems for i in range(2)] + ["grid.png"])
    assert Image.open(out / f"{stems[0]}_0.png").size == (SIZE, SIZE)
    # rows: pose | original | sample 0 | sample 1, cells of 32 px with 2 px gaps
    assert Image.open(out / "grid.png").size == (4 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)


def test_pose_coordinates_map_onto_the_model_square_as_training_squared_images():
    keypoints = np.array(pose((NOSE, 20, 4, 2), (LEFT_ANKLE, 40, 30, 1)), np.float32)
    # 64 x 32 padded: a 64 px square from y = -16, halved
    padded = sample.to_model_pose(keypoints, (64, 32), (SIZE, SIZE), "pad")
    assert padded[NOSE].tolist() == [10, 10, 2] and padded[LEFT_ANKLE].tolist() == [20, 23, 1]
    # 64 x 32 cropped: the 32 px square from x = 16, unscaled
    cropped = sample.to_model_pose(keypoints, (64, 32), (SIZE, SIZE), "crop")
    assert cropped[NOSE].tolist() == [4, 4, 2] and cropped[LEFT_ANKLE].tolist() == [24, 30, 1]
    # 100 x 50 padded: a 100 px square from y = -25, scaled by 0.32
    drawn = np.array(pose((NOSE, 50, 25, 2), (LEFT_ANKLE, 25, 0, 2)), np.float32)
    padded = sample.to_model_pose(drawn, (100, 50), (SIZE, SIZE), "pad")
    assert padded[NOSE].tolist() == pytest.approx([16, 16, 2])
    assert padded[LEFT_ANKLE].tolist() == pytest.approx([8, 8, 2])


def test_pose_file_uses_the_picture_beside_it_else_pose_image_size(checkpoint, pose_file,
                                                                   tmp_path, sampled):
    out = tmp_path / "out"
    run(checkpoint, out, "--poses", pose_file, "--pose-image-size", "100", "50")
    assert sorted(os.listdir(out)) == ["drawn_0.png", "drawn_1.png", "grid.png", "photo_0.png",
                                       "photo_1.png"]
    # worked out by hand in the test above: photo.png is 64 x 32, drawn.png 100 x 50
    expected = torch.tensor([pose((NOSE, 10, 10, 2), (LEFT_ANKLE, 20, 23, 1)),
                             pose((NOSE, 16, 16, 2), (LEFT_ANKLE, 8, 8, 2))], dtype=torch.float32)
    (call,) = sampled
    cond = call["model"].condition_tokens(keypoints=expected)
    assert torch.equal(call["cond"], cond.repeat_interleave(2, dim=0))  # 2 samples per pose


def test_pose_file_follows_a_run_trained_on_centre_crops(train, data, vqgan_path, pose_file,
                                                         tmp_path, sampled):
    cropped = train(data, vqgan_path, tmp_path / "run", "--resize-mode", "crop",
                    "--max-steps", "1")
    sampled.clear()  # training drew its sample grid
    run(cropped, tmp_path / "out", "--poses", pose_file, "--pose-image-size", "100", "50",
        "--num-samples", "1")
    # 100 x 50 cropped: the 50 px square from x = 25, scaled by 0.64
    expected = torch.tensor([pose((NOSE, 4, 4, 2), (LEFT_ANKLE, 24, 30, 1)),
                             pose((NOSE, 16, 16, 2), (LEFT_ANKLE, 0, 0, 2))], dtype=torch.float32)
    (call,) = sampled
    assert torch.equal(call["cond"], call["model"].condition_tokens(keypoints=expected))


def test_int8_samples_with_int8_linear_layers_and_tokens_near_the_float_ones(checkpoint,
                                                                          pose_file, tmp_path,
                                                                          sampled):
    for name, extra in (("float", []), ("int8", ["--int8"])):
        run(checkpoint, tmp_path / name, "--poses", pose_file, "--pose-image-size", "100", "50",
            *extra)
    exact, quantized = sampled
    head = quantized["model"].gpt.lm_head
    assert isinstance(exact["model"].gpt.lm_head, torch.nn.Linear)
    assert head.__module__.startswith("torch.ao.nn.quantized") and head.weight().dtype == torch.qint8
    assert sorted(png_bytes(tmp_path / "float")) == sorted(png_bytes(tmp_path / "int8"))
    # same seed: most tokens agree (int8 logits move by about 1 %), and they are codes
    assert (exact["tokens"] == quantized["tokens"]).float().mean() > 0.5
    assert 0 <= quantized["tokens"].min() and quantized["tokens"].max() < exact["model"].n_embed


def test_int8_samples_where_auto_precision_is_bf16(checkpoint, pose_file, tmp_path,
                                                  monkeypatch):
    """On a CPU with AMX the automatic precision is bf16, whose tensors int8 Linear layers
    refuse (it crashed): the int8 GPT samples in float32 there, as everywhere."""
    capabilities = torch.cpu.get_capabilities()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**capabilities, "amx_bf16": True})
    assert utils.resolve_precision("auto", torch.device("cpu")) == "bf16"
    for name, extra in (("bf16", []), ("int8", ["--int8"])):
        run(checkpoint, tmp_path / name, "--poses", pose_file, "--pose-image-size", "100", "50",
            *extra)
    assert list(png_bytes(tmp_path / "int8")) == list(png_bytes(tmp_path / "bf16"))
    assert "grid.png" in png_bytes(tmp_path / "int8")


def test_bench_sample_times_int8_in_float32_where_auto_precision_is_bf16(monkeypatch, capsys):
    """bench.py sample crashed like sample.py --int8 on a CPU with AMX: its int8 run must be
    timed in float32 beside the bf16 ones, and compared with them."""
    import bench
    capabilities = torch.cpu.get_capabilities()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**capabilities, "amx_bf16": True})
    bench.main(["sample", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-embed", "32",
                "--tokens", "6", "--prefix", "3", "--batch-size", "2", "--warmup", "0",
                "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "precision bf16" in out and "KV cache, int8" in out
    assert "of the sampled tokens equal the bf16 model's" in out


def test_same_seed_repeats_the_same_files_and_another_seed_does_not(checkpoint, pose_file,
                                                                    tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run(checkpoint, tmp_path / name, "--poses", pose_file, "--pose-image-size", "100", "50",
            "--seed", seed)
    assert png_bytes(tmp_path / "a") == png_bytes(tmp_path / "b")
    differ = [name for name, content in png_bytes(tmp_path / "a").items()
              if png_bytes(tmp_path / "c")[name] != content]
    assert "photo_0.png" in differ and "drawn_1.png" in differ


def test_completion_keeps_the_top_half_tokens_of_the_image(checkpoint, data, vqgan_path,
                                                           tmp_path, sampled):
    image = Image.open(data / "images" / "000002.png")
    image.save(tmp_path / "person.png")
    with open(data / "poses.json") as f:
        keypoints = json.load(f)["images/000002.png"]
    poses = write_json(tmp_path / "poses.json", {"person.png": keypoints})
    out = tmp_path / "out"
    run(checkpoint, out, "--complete", str(tmp_path / "person.png"), "--poses", poses)
    assert sorted(os.listdir(out)) == ["grid.png", "person_0.png", "person_1.png"]

    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1)
    with torch.no_grad():
        own = load_vqgan(vqgan_path).encode(pixels.permute(2, 0, 1)[None])[2].flatten(1)
    (call,) = sampled
    assert call["tokens"].shape == (2, 2 * HALF)
    assert torch.equal(call["tokens"][:, :HALF], own[:, :HALF].expand(2, -1))
    assert not torch.equal(call["tokens"], own.expand(2, -1))  # the bottom half is sampled


def test_poses_of_the_same_file_name_in_two_folders_write_files_of_their_own(
        checkpoint, tmp_path, capsys):
    poses = write_json(tmp_path / "poses.json", {
        "a/person.png": pose((NOSE, 10, 4, 2)), "b/person.png": pose((NOSE, 20, 30, 2))})
    run(checkpoint, tmp_path / "out", "--poses", poses, "--num-samples", "2")
    assert files_below(tmp_path / "out") == ["a/person_0.png", "a/person_1.png",
                                             "b/person_0.png", "b/person_1.png", "grid.png"]
    assert "wrote 4 samples" in capsys.readouterr().out


def test_output_names_are_unique_per_pose_and_stay_inside_the_output_folder():
    names = ["img.jpg#person7", "img.jpg#person8", "x.jpg", "x.png", "a/y.png", "b/y.png",
             "../../up.png"]
    assert sample.output_stems(names) == ["img_person7", "img_person8", "x_jpg", "x_png",
                                          "a/y", "b/y", "up"]
    # still alike after keeping the extensions: numbered, past any name already in use
    assert sample.output_stems(["a.jpg", "a.png", "a_png.jpg", "a_png_2.png"]) == [
        "a_jpg", "a_png", "a_png_3", "a_png_2"]
    # a '#' in a file's own name is no COCO person
    assert sample.output_stems(["shot#1.jpg", "p#personal.jpg#person3", "p#person.jpg"]) == [
        "shot#1", "p#personal_person3", "p#person"]
    # class names keep their dots: only an image's extension is cut
    assert sample.output_stems(["v1.5", "cat.small", "cat.large", "a/x.JPG"]) == [
        "v1.5", "cat.small", "cat.large", "a/x"]


def test_complete_finds_the_pose_of_an_image_with_a_hash_in_its_file_name(tmp_path):
    rows = [sample.Row("dir/shot#1.jpg"), sample.Row("dir/shot.jpg"),
            sample.Row("dir/team.jpg#person4")]
    elsewhere = tmp_path / "copies"  # not below the data folder: matched by the file name
    found = {name: sample.pose_for_image(rows, str(elsewhere / name), str(tmp_path / "data"),
                                         None) for name in ("shot#1.jpg", "team.jpg")}
    assert found == {"shot#1.jpg": rows[0], "team.jpg": rows[2]}


@pytest.fixture
def two_people_of_one_name(tmp_path):
    """poses.json for a/person.png and b/person.png, each picture beside it, and their poses."""
    poses = {"a/person.png": pose((NOSE, 5, 5, 2)), "b/person.png": pose((NOSE, 25, 25, 2))}
    for name in poses:
        (tmp_path / name).parent.mkdir()
        Image.new("RGB", (SIZE, SIZE), "gray").save(tmp_path / name)
    return write_json(tmp_path / "poses.json", poses), poses


def test_completion_takes_the_pose_at_the_images_path_relative_to_the_pose_file(
        checkpoint, two_people_of_one_name, tmp_path, sampled):
    poses_path, poses = two_people_of_one_name
    run(checkpoint, tmp_path / "out", "--complete", str(tmp_path / "b" / "person.png"),
        "--poses", poses_path, "--num-samples", "1")
    (call,) = sampled
    own = call["model"].condition_tokens(
        keypoints=torch.tensor([poses["b/person.png"]], dtype=torch.float32))
    assert torch.equal(call["cond"], own)


def test_completion_of_an_image_elsewhere_with_two_candidate_poses_needs_pose_key(
        checkpoint, two_people_of_one_name, tmp_path, sampled):
    poses_path, poses = two_people_of_one_name
    elsewhere = tmp_path / "elsewhere" / "person.png"
    elsewhere.parent.mkdir()
    Image.new("RGB", (SIZE, SIZE), "gray").save(elsewhere)
    with pytest.raises(UserError, match=r"2 poses could be its own \(a/person.png, "
                                        r"b/person.png\).*--pose-key"):
        run(checkpoint, tmp_path / "out", "--complete", str(elsewhere), "--poses", poses_path)
    run(checkpoint, tmp_path / "out", "--complete", str(elsewhere), "--poses", poses_path,
        "--pose-key", "a/person.png", "--num-samples", "1")
    (call,) = sampled
    chosen = call["model"].condition_tokens(
        keypoints=torch.tensor([poses["a/person.png"]], dtype=torch.float32))
    assert torch.equal(call["cond"], chosen)


@pytest.fixture
def coco_checkpoint(checkpoint, tmp_path):
    """The keypoint model's checkpoint, re-pointed at COCO people: a person in the lower right
    of each of four 96 x 64 photos, cropped to a square around the box as training crops them."""
    photos = [f"photo{i}.png" for i in range(4)]
    people = []
    for i, name in enumerate(photos):
        picture = np.full((64, 96, 3), 200, np.uint8)
        picture[30:60, 60:90] = (40 * i, 90, 160)  # the person's box (x 60-90, y 30-60)
        picture[30:45, 70:80] = (220, 30, 30)
        Image.fromarray(picture).save(tmp_path / name)
        keypoints = pose((NOSE, 75, 32, 2), (5, 70, 40, 2), (6, 80, 40, 2), (LEFT_ANKLE, 72, 58, 2),
                         (16, 78, 58, 2))
        people.append({"id": i, "image_id": i, "bbox": [60, 30, 30, 30], "iscrowd": 0,
                       "num_keypoints": 5, "keypoints": sum(keypoints, [])})
    annotations = write_json(tmp_path / "people.json", {
        "images": [{"id": i, "file_name": name, "width": 96, "height": 64}
                   for i, name in enumerate(photos)],
        "annotations": people, "categories": [{"id": 1, "name": "person"}]})
    saved = torch.load(checkpoint, weights_only=True)
    saved["args"].update(dataset_path=str(tmp_path), coco_annotations=annotations,
                         val_fraction=0.2)  # photo2, photo3 in validation
    torch.save(saved, tmp_path / "coco.pt")
    return str(tmp_path / "coco.pt")


def test_completion_of_a_coco_person_squares_the_photo_on_that_persons_box(
        coco_checkpoint, vqgan_path, tmp_path, sampled):
    """Training squared each COCO person's box, and the validation pose is in that square: the
    image to complete must be the same square, not the whole photo padded (it was)."""
    _, val_set = sample.data.build_datasets(torch.load(coco_checkpoint, weights_only=True)["args"],
                                            progress=False)
    person = val_set[0]
    photo = val_set.examples[0].image_path
    run(coco_checkpoint, tmp_path / "out", "--complete", photo, "--num-samples", "1")
    (call,) = sampled
    with torch.no_grad():
        crop = load_vqgan(vqgan_path).encode(person["image"][None])[2].flatten(1)
    assert torch.equal(call["tokens"][:, :HALF], crop[:, :HALF])
    assert torch.equal(call["cond"], call["model"].condition_tokens(
        keypoints=person["keypoints"][None]))


def test_completion_finds_the_pose_of_any_validation_image_not_only_the_first_count(
        checkpoint, parts_checkpoint, tmp_path, sampled):
    """Only the first --count (8) validation examples were searched for the image's pose or
    part map: past them a validation image was refused as having none."""
    for model_path, key in ((checkpoint, "keypoints"), (parts_checkpoint, "parts")):
        _, val_set = sample.data.build_datasets(
            torch.load(model_path, weights_only=True)["args"], progress=False)
        last = len(val_set) - 1
        assert last >= 1  # beyond --count 1
        del sampled[:]
        run(model_path, tmp_path / key, "--complete", val_set.examples[last].image_path,
            "--count", "1", "--num-samples", "1")
        (call,) = sampled
        assert torch.equal(call["cond"],
                           call["model"].condition_tokens({key: val_set[last][key][None]}))


def test_completion_for_a_part_map_model_needs_an_image_with_a_part_map(parts_checkpoint,
                                                                        data, tmp_path):
    outside_validation = str(data / "images" / "000002.png")
    with pytest.raises(UserError, match="part map"):
        run(parts_checkpoint, tmp_path / "out", "--complete", outside_validation)


def test_a_model_trained_with_condition_dropout_samples_guided_unless_told_otherwise(
        train, data, vqgan_path, tmp_path, sampled):
    checkpoint = train(data, vqgan_path, tmp_path / "run", "--condition-dropout", "0.5")
    del sampled[:]  # the training run's own sample grid
    for name, extra in (("default", []), ("unguided", ["--guidance", "1"])):
        run(checkpoint, tmp_path / name, "--count", "2", "--num-samples", "1", *extra)
    assert [call["guidance"] for call in sampled] == [None, 1.0]
    assert sampled[0]["model"].resolve_guidance() == sampling.DEFAULT_GUIDANCE
    assert (tmp_path / "default" / "grid.png").read_bytes() != (
        tmp_path / "unguided" / "grid.png").read_bytes()


# ---- bad input: one clear UserError each ---------------------------------------------------


BAD_POSE_FILES = {
    "18 keypoints": ([[1, 1, 2]] * 18, "18 keypoints.*17"),
    "outside the image": (pose((NOSE, 40, 4, 2)), r"outside its 32x32 image"),
    "NaN": ("[" + ", ".join(["[NaN, 1, 2]"] + ["[1, 1, 2]"] * 16) + "]", "finite numbers"),
    "a string": (pose((NOSE, "10", 4, 2)), "finite numbers"),
    "v = 3": (pose((NOSE, 10, 4, 3)), "visibility 3"),
}


@pytest.mark.parametrize("flaw", sorted(BAD_POSE_FILES))
def test_flawed_pose_file_is_a_user_error(flaw, checkpoint, tmp_path):
    keypoints, message = BAD_POSE_FILES[flaw]
    text = keypoints if isinstance(keypoints, str) else json.dumps(keypoints)
    path = tmp_path / "poses.json"
    path.write_text('{"person.png": ' + text + "}")
    with pytest.raises(UserError, match=message):
        run(checkpoint, tmp_path / "out", "--poses", str(path))


@pytest.mark.parametrize("key", ["../person.png", "/abs/person.png"])
def test_pose_key_outside_the_pose_files_folder_is_refused_as_in_training(key, checkpoint,
                                                                           tmp_path):
    poses = write_json(tmp_path / "poses.json", {key: pose((NOSE, 10, 4, 2))})
    with pytest.raises(UserError, match=f"key '{key}' points outside the folder"):
        run(checkpoint, tmp_path / "out", "--poses", poses, "--pose-image-size", "32", "32")


def test_pose_file_that_is_not_json_is_a_user_error(checkpoint, tmp_path):
    path = tmp_path / "poses.json"
    path.write_text('{"person.png": [[1, 2, 2],')
    with pytest.raises(UserError, match="not valid JSON"):
        run(checkpoint, tmp_path / "out", "--poses", str(path))


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "0"], "--top-k"), (["--temperature", "0"], "--temperature")])
def test_sampling_option_out_of_range_is_a_user_error(flags, message, checkpoint, tmp_path):
    with pytest.raises(UserError, match=message):
        run(checkpoint, tmp_path / "out", *flags)


def test_stage1_checkpoint_given_as_checkpoint_is_a_user_error(vqgan_path, tmp_path):
    with pytest.raises(UserError, match="stage-1"):
        run(vqgan_path, tmp_path / "out")


def test_vqgan_other_than_the_one_trained_with_is_a_user_error(checkpoint, tmp_path,
                                                               save_tiny_vqgan):
    other = save_tiny_vqgan(str(tmp_path / "other.pt"), seed=1)  # same shape, other weights
    with pytest.raises(UserError, match="not the VQGAN"):
        run(checkpoint, tmp_path / "out", "--vqgan-checkpoint", other)


def test_poses_for_a_part_map_model_is_a_user_error(parts_checkpoint, pose_file, tmp_path):
    with pytest.raises(UserError, match="conditioned on parts"):
        run(parts_checkpoint, tmp_path / "out", "--poses", pose_file)


def test_command_line_reports_a_user_error_as_one_line_and_exit_status_2(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", "--checkpoint", "unused.pt",
                             "--top-k", "0"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --top-k must be >= 1, got 0"]


# ---- found by a second breakage hunt ---------------------------------------------------------


def test_a_pose_whose_image_cannot_be_read_is_skipped_with_one_warning(pose_file, tmp_path,
                                                                       capsys):
    (tmp_path / "drawn.png").write_bytes(b"not a picture")  # training skips such an image
    entries = sample.read_pose_file(pose_file, 17, (100, 50))
    assert [name for name, _, _ in entries] == ["photo.png"] and entries[0][2] == (64, 32)
    warning = capsys.readouterr().err
    assert "skipped 1 pose(s) whose image cannot be read" in warning and "drawn.png" in warning


def test_the_size_of_an_exif_turned_photo_is_read_from_its_header_as_training_shows_it(tmp_path):
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees: a 40 x 20 file is a 20 x 40 picture
    Image.new("RGB", (40, 20), "gray").save(path, exif=exif)
    assert images.displayed_size(str(path)) == (20, 40) == images.open_image(str(path), 10**6).size
    write_json(tmp_path / "poses.json", {"turned.jpg": pose((NOSE, 15, 35, 2))})
    # the nose at y = 35 lies inside the 40 px tall picture, outside the file's 20 px
    assert sample.read_pose_file(str(tmp_path / "poses.json"), 17, None)[0][2] == (20, 40)


def test_a_poses_file_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "poses.json"
    path.write_text(json.dumps({"a.png": pose((NOSE, 5, 5, 2))}), encoding="utf-8-sig")
    assert sample.read_pose_file(str(path), 17, (32, 32))[0][0] == "a.png"


@pytest.mark.parametrize("flag", [["--temperature", "1e-40"], ["--guidance", "1e39"]])
def test_temperatures_and_guidance_that_overflow_the_logits_are_refused(flag, tmp_path):
    # they passed as positive numbers and then stopped sampling with a RuntimeError traceback
    with pytest.raises(UserError, match=f"{flag[0]} must be between 0.001 and 1000"):
        sample.parse_args(["--checkpoint", "t.pt", "--out", str(tmp_path), *flag])
