"""Stage 3, super-resolution: the generator's shapes, the pair cache, exact resume, the
discriminator's own step, sample.py --superres end to end, and every bad input in one line.

Tiny everything on the CPU: 32 px VQGANs (conftest), 64 px mannequins, an RRDB generator of 8
channels and one block.
"""
import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import sample
import superres
import training_superres
import training_vqgan
import utils
from discriminator import NLayerDiscriminator, hinge_d_loss
from superres import SuperResConfig, SuperResolution, bicubic, load_superres, save_superres
from conftest import LPIPS_WEIGHTS, needs_lpips

REPO = Path(__file__).resolve().parents[1]
TINY = dict(nf=8, nb=1, gc=4)


@pytest.fixture(scope="module")
def data64(mannequin_set):
    return mannequin_set(40, 64)


def train(data, vqgan, run_dir, *extra):
    """A tiny stage-3 run: 32 px VQGAN pictures -> 64 px, 32 px crops, batch 4 (7 batches an
    epoch of the 31 training pictures), GAN from step 2; later flags override these."""
    training_superres.main([
        "--dataset-path", str(data), "--vqgan-checkpoint", str(vqgan), "--val-fraction", "0.2",
        "--run-dir", str(run_dir), "--device", "cpu", "--num-workers", "0", "--batch-size", "4",
        "--crop-size", "32", "--sr-nf", "8", "--sr-nb", "1", "--sr-gc", "4", "--disc-start", "2",
        "--lr", "1e-3", "--log-every", "1", "--lpips-weights", str(LPIPS_WEIGHTS), *extra])
    return Path(run_dir)


def counting_reconstructions(monkeypatch):
    calls = []
    real = training_superres.vqgan_reconstruction

    def counted(vqgan, originals, scale):
        calls.append(len(originals))
        return real(vqgan, originals, scale)
    monkeypatch.setattr(training_superres, "vqgan_reconstruction", counted)
    return calls


def random_superres(in_size, scale=2, seed=0):
    """A generator whose last conv is not zero, so that it is not bicubic yet."""
    torch.manual_seed(seed)
    model = SuperResolution(SuperResConfig(scale=scale, in_size=in_size, **TINY))
    torch.nn.init.normal_(model.conv_last.weight, std=0.05)
    return model


# ---- the generator -------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2, 4])
def test_generator_enlarges_any_shape_by_its_scale_and_starts_as_bicubic(scale):
    model = SuperResolution(SuperResConfig(scale=scale, **TINY))
    x = torch.rand(2, 3, 12, 20) * 2 - 1  # not square: sample.py's tall pictures work too
    out = model(x)
    assert out.shape == (2, 3, 12 * scale, 20 * scale)
    torch.testing.assert_close(out, bicubic(x, scale))  # the residual starts at zero
    assert random_superres(12, scale)(x).sub(bicubic(x, scale)).abs().max() > 1e-3


def test_scale_three_is_refused_in_one_line():
    with pytest.raises(utils.UserError, match="x2 or x4"):
        SuperResConfig(scale=3)


def test_downscale_is_the_mean_of_each_block():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert superres.downscale(x, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


# ---- the GAN steps -------------------------------------------------------------------------


@needs_lpips
def test_generator_step_leaves_d_alone_and_d_step_leaves_the_generator_grads_untouched(lpips):
    model, discriminator = random_superres(16), NLayerDiscriminator()
    low, high = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    args = training_superres.parse_args(["--disc-weight", "0.1"])
    scaler = utils.grad_scaler(torch.device("cpu"), "fp32")
    terms = training_superres.generator_backward(model, lpips, discriminator, low, high, args,
                                                 True, True, scaler, "fp32")
    assert "generator" in terms and all(p.grad is None for p in discriminator.parameters())
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert any(g.abs().sum() > 0 for g in grads.values())

    reference = copy.deepcopy(discriminator)
    output = model(low)  # attached to the generator's graph: D's step must not reach it
    loss = training_vqgan.discriminator_backward(discriminator, high, output, hinge_d_loss)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), f"D's step changed {name}'s gradient"
    expected = hinge_d_loss(reference(high), reference(output.detach()))
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for (name, p), q in zip(discriminator.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda text: f"{name}: {text}")


# ---- the pair cache, resume, outputs -------------------------------------------------------


@needs_lpips
def test_pair_cache_is_reused_for_the_same_vqgan_and_rebuilt_for_another(
        data64, save_tiny_vqgan, tmp_path, shared_lpips, monkeypatch):
    first = save_tiny_vqgan(str(tmp_path / "a.pt"), seed=0)
    calls = counting_reconstructions(monkeypatch)
    trained = train(data64, first, tmp_path / "run", "--max-steps", "1")
    assert sum(calls) == 40  # every picture of both splits, once
    (cache_file,) = os.listdir(trained / "pair_cache")
    cache = torch.load(trained / "pair_cache" / cache_file, weights_only=True)
    assert cache["train"]["low"].shape == (31, 3, 32, 32)
    assert cache["val"]["low"].dtype == torch.uint8

    calls.clear()  # the same VQGAN under another name, in a new run: read, not reconstructed
    shutil.copy(first, tmp_path / "copy.pt")
    shutil.copytree(trained / "pair_cache", tmp_path / "second" / "pair_cache")
    train(data64, tmp_path / "copy.pt", tmp_path / "second", "--max-steps", "1")
    assert calls == []
    other = save_tiny_vqgan(str(tmp_path / "b.pt"), seed=1)  # another VQGAN: rebuilt
    calls.clear()  # but a resume behind it is refused before any picture is read
    with monkeypatch.context() as patch:
        patch.setattr(data, "build_datasets", lambda *a, **k: pytest.fail("data read"))
        with pytest.raises(utils.UserError, match="trained behind other frozen models than the "
                           rf"files given \(their contents differ\); resume it with its own: "
                           rf"--vqgan-checkpoint {re.escape(str(tmp_path / 'copy.pt'))}$"):
            train(data64, other, tmp_path / "second", "--max-steps", "2", "--resume")
    assert calls == []
    train(data64, other, tmp_path / "second", "--max-steps", "1", "--overwrite")
    assert sum(calls) == 40
    assert len(os.listdir(tmp_path / "second" / "pair_cache")) == 2  # one per VQGAN


@needs_lpips
def test_a_run_that_finds_its_pair_cache_trains_as_the_run_that_built_it(
        data64, vqgan_path, tmp_path, shared_lpips):
    built = train(data64, vqgan_path, tmp_path / "built", "--max-steps", "3")
    shutil.copytree(built / "pair_cache", tmp_path / "found" / "pair_cache")
    found = train(data64, vqgan_path, tmp_path / "found", "--max-steps", "3")
    a = torch.load(built / "superres_last.pt", weights_only=True)["model"]
    b = torch.load(found / "superres_last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


@needs_lpips
def test_stop_and_resume_gives_the_same_weights_as_one_unbroken_run(data64, vqgan_path, tmp_path,
                                                                    shared_lpips):
    # GAN from step 2, flips, random crops (global RNG) and an epoch boundary (7 steps) inside;
    # a constant lr (a cosine's shape depends on --max-steps)
    constant = ("--min-lr-ratio", "1")
    unbroken = train(data64, vqgan_path, tmp_path / "unbroken", "--max-steps", "10", *constant)
    split = train(data64, vqgan_path, tmp_path / "split", "--max-steps", "5", *constant)
    train(data64, vqgan_path, split, "--max-steps", "10", "--resume", *constant)
    a = torch.load(unbroken / "superres_last.pt", weights_only=True)
    b = torch.load(split / "superres_last.pt", weights_only=True)
    assert a["step"] == b["step"] == 10
    for part in ("model", "discriminator"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert a["opt_g"]["state"][0]["exp_avg"].equal(b["opt_g"]["state"][0]["exp_avg"])

    def losses(run):
        return [(r["step"], r["l1"]) for r in utils.read_jsonl(run / "metrics.jsonl") if "l1" in r]
    assert losses(unbroken) == losses(split)
    records = utils.read_jsonl(unbroken / "metrics.jsonl")
    assert {"generator", "discriminator"} <= records[-2].keys()  # the GAN was on
    assert [r["step"] for r in records if "val_psnr" in r] == [7, 10]  # each epoch and the end
    grid = Image.open(unbroken / "samples" / "superres_000010.png")
    assert grid.size == (4 * 66 + 2, 6 * 66 + 2)  # input | bicubic | ours | original, 64 px
    model, sha, flags = load_superres(str(unbroken / "superres.pt"))
    assert sha == utils.file_sha256(vqgan_path) and model.config.in_size == 32
    assert flags["dataset_path"] == str(data64) and flags["val_fraction"] == 0.2


# ---- sample.py --superres ------------------------------------------------------------------


def test_sample_superres_writes_both_sizes_and_enlarges_with_the_model(
        mannequin_set, vqgan_path, train_tiny_transformer, tmp_path):
    checkpoint = train_tiny_transformer(mannequin_set(48, 32), vqgan_path, tmp_path / "t", 32,
                                        "--batch-size", "8", "--max-steps", "1",
                                        "--grid-examples", "1")
    model = random_superres(32)
    save_superres(model, str(tmp_path / "superres.pt"))
    out = tmp_path / "out"
    sample.main(["--checkpoint", checkpoint, "--count", "2", "--num-samples", "2", "--out",
                 str(out), "--device", "cpu", "--superres", str(tmp_path / "superres.pt")])
    small = sorted(out.rglob("*_0.png"))
    assert len(small) == 2
    for path in small:
        big = Image.open(str(path).replace("_0.png", "_0_x2.png"))
        assert Image.open(path).size == (32, 32) and big.size == (64, 64)
        # the enlargement is the model's of the sample (up to the small file's rounding)
        pixels = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
        expected = superres.enlarge(model, utils.from_uint8(pixels)[None])[0]
        difference = np.abs(np.asarray(big, np.int32)
                            - np.asarray(utils.to_uint8_image(expected), np.int32))
        assert difference.mean() < 1.5 and np.abs(np.asarray(big, np.int32) - np.asarray(
            Image.open(path).resize((64, 64), Image.BICUBIC), np.int32)).mean() > 3
    # each row: pose, original, two samples, the two enlarged: 64 px cells
    assert Image.open(out / "grid.png").size == (6 * 66 + 2, 2 * 66 + 2)


# ---- bad input: one line each --------------------------------------------------------------


def test_superres_checkpoint_refused_as_vqgan_and_transformer_and_the_reverse(
        tmp_path, vqgan_path, data64):
    path = str(tmp_path / "superres.pt")
    save_superres(random_superres(32), path)
    as_sr = re.escape(utils.CHECKPOINT_KINDS["superres"])
    with pytest.raises(utils.UserError, match=f"is {as_sr}, but a stage-1 inference"):
        training_superres.main(["--vqgan-checkpoint", path, "--dataset-path", str(data64),
                                "--run-dir", str(tmp_path / "run")])
    with pytest.raises(utils.UserError, match=f"is {as_sr}, but a stage-2 training"):
        sample.main(["--checkpoint", path, "--out", str(tmp_path / "out")])
    transformer = tmp_path / "transformer_last.pt"
    utils.atomic_save({"kind": "transformer_train"}, str(transformer))
    for other, kind in ((vqgan_path, "vqgan"), (str(transformer), "transformer_train")):
        with pytest.raises(utils.UserError, match=re.escape(
                f"is {utils.CHECKPOINT_KINDS[kind]}, but a stage-3 super-resolution")):
            load_superres(other)


def test_scale_that_does_not_match_the_vqgan_and_the_data_is_one_line(tmp_path, vqgan_path, data64):
    with pytest.raises(utils.UserError, match=r"--image-size 64 is not --scale 4 x the VQGAN's 32"):
        training_superres.main(["--vqgan-checkpoint", vqgan_path, "--dataset-path", str(data64),
                                "--image-size", "64", "--scale", "4",
                                "--run-dir", str(tmp_path / "run")])


def test_sample_superres_for_another_picture_size_is_refused(tmp_path, vqgan_path):
    path = str(tmp_path / "superres.pt")
    save_superres(random_superres(64), path)

    class Transformer:
        config = {"image_size": 32}
    with pytest.raises(utils.UserError, match="enlarges 64 px pictures x2, but t.pt samples 32"):
        sample.load_matching_superres(path, Transformer(), "t.pt", None, "cpu")


def test_images_smaller_than_the_output_are_one_line_naming_the_file(mannequin_set, vqgan_path,
                                                                     tmp_path):
    command = [sys.executable, str(REPO / "training_superres.py"), "--vqgan-checkpoint",
               vqgan_path, "--dataset-path", str(mannequin_set(48, 32)), "--run-dir",
               str(tmp_path / "run"), "--lpips-weights", str(LPIPS_WEIGHTS)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert re.search(r"000000\.png \(32x32\) gives a 32 px square, smaller than the 64 px output",
                     errors[0])


# ---- evaluate.py --superres ----------------------------------------------------------------


def test_evaluate_superres_scores_an_untrained_generator_exactly_as_bicubic(data64, vqgan_path,
                                                                           tmp_path, capsys):
    path = str(tmp_path / "superres.pt")
    save_superres(SuperResolution(SuperResConfig(in_size=32, **TINY)), path)
    results = evaluate.main(["--vqgan-checkpoint", vqgan_path, "--dataset-path", str(data64),
                             "--val-fraction", "0.2", "--no-lpips", "--num-workers", "0",
                             "--device", "cpu", "--superres", path])["superres"]
    assert results["num_images"] == 9 and results["image_size"] == 64
    assert results["ours_psnr_db"] == pytest.approx(results["bicubic_psnr_db"], abs=1e-4)
    # an untrained VQGAN loses nearly everything; bicubic of the downscaled original does not
    assert results["bicubic_of_original_psnr_db"] > results["bicubic_psnr_db"] + 5
    assert 0 < results["bicubic_ssim"] < results["bicubic_of_original_ssim"] <= 1
    assert "bicubic(downscaled original)" in capsys.readouterr().out


@needs_lpips
def test_evaluate_superres_alone_scores_the_data_the_model_was_trained_on(
        data64, vqgan_path, tmp_path, monkeypatch):
    # it scored the default mannequins (writing 4000 of them) unless the data flags were repeated
    run = train(data64, vqgan_path, tmp_path / "run", "--max-steps", "1", "--disc-start", "5")

    def refused(*args, **kwargs):
        raise AssertionError("evaluate.py fell back to the default mannequins")
    monkeypatch.setattr(data.mannequins, "write_dataset", refused)
    for checkpoint in ("superres.pt", "superres_last.pt"):
        results = evaluate.main(["--vqgan-checkpoint", vqgan_path, "--no-lpips", "--device",
                                 "cpu", "--num-workers", "0", "--superres",
                                 str(run / checkpoint)])
        assert results["dataset_path"] == str(data64)
        assert results["superres"]["num_images"] == 9  # --val-fraction 0.2 of 40, as trained


# ---- found by a review: flags it ignored, late refusals, unmatched inputs ---------------------


@pytest.mark.parametrize("flag", [["--grad-accum", "2"], ["--ema-decay", "0.9"], ["--compile"],
                                  ["--channels-last"]])
def test_run_flags_stage_3_does_not_use_are_refused(flag):
    # it took them, then trained without them (and --grad-accum 2 doubled the learning rate)
    with pytest.raises(utils.UserError, match=f"{flag[0]}: stage 3 does not use it"):
        training_superres.parse_args(flag)


def test_a_batch_larger_than_the_data_is_refused_before_the_pair_cache_and_any_folder(
        data64, vqgan_path, tmp_path, monkeypatch):
    calls = counting_reconstructions(monkeypatch)
    with pytest.raises(utils.UserError, match="fewer than one"):
        train(data64, vqgan_path, tmp_path / "run", "--batch-size", "100")
    assert calls == [] and not (tmp_path / "run").exists()


@needs_lpips
def test_lpips_joins_the_l1_at_perceptual_start(data64, vqgan_path, tmp_path, capsys):
    run = train(data64, vqgan_path, tmp_path / "run", "--max-steps", "5",
                "--perceptual-start", "3", "--disc-start", "1000")
    assert "L1 + 1 x LPIPS from step 3," in capsys.readouterr().out
    records = [r for r in utils.read_jsonl(run / "metrics.jsonl") if "l1" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # logged after each step
    assert [r["step"] for r in records if "perceptual" in r] == [4, 5]  # steps 3 and 4, 0-based


@needs_lpips
def test_a_resumed_run_keeps_its_own_lpips_start_and_an_older_run_had_lpips_throughout(
        data64, vqgan_path, tmp_path, capsys):
    def lpips_steps(run):
        return [r["step"] for r in utils.read_jsonl(run / "metrics.jsonl") if "perceptual" in r]
    run = train(data64, vqgan_path, tmp_path / "own", "--max-steps", "2",
                "--perceptual-start", "3", "--disc-start", "1000")
    train(data64, vqgan_path, run, "--max-steps", "5", "--resume", "--disc-start", "1000")
    assert lpips_steps(run) == [4, 5]  # its own 3, not the default 650
    assert "warning" not in capsys.readouterr().err  # not given: no change to warn about
    older = train(data64, vqgan_path, tmp_path / "older", "--max-steps", "2",
                  "--perceptual-start", "100", "--disc-start", "1000")
    checkpoint = torch.load(older / "superres_last.pt", weights_only=True)
    del checkpoint["args"]["perceptual_start"]  # a run from before the flag
    torch.save(checkpoint, older / "superres_last.pt")
    train(data64, vqgan_path, older, "--max-steps", "4", "--resume", "--disc-start", "1000")
    assert lpips_steps(older) == [3, 4]


@needs_lpips
def test_a_gan_that_starts_after_the_last_step_says_so(data64, vqgan_path, tmp_path, capsys):
    train(data64, vqgan_path, tmp_path / "run", "--max-steps", "1", "--disc-start", "1000")
    assert "GAN x 0.05 from step 1000 (after this run's last step)" in capsys.readouterr().out


def test_evaluate_superres_refuses_a_wrong_file_before_any_other_work(data64, vqgan_path,
                                                                      tmp_path, monkeypatch):
    reconstructions = []
    monkeypatch.setattr(evaluate, "evaluate_reconstruction",
                        lambda *a, **k: reconstructions.append(1))
    for path, message in ((vqgan_path, "but a stage-3 super-resolution"),
                          (str(tmp_path / "missing.pt"), "missing.pt")):
        with pytest.raises(utils.UserError, match=message):
            evaluate.main(["--vqgan-checkpoint", vqgan_path, "--dataset-path", str(data64),
                           "--val-fraction", "0.2", "--no-lpips", "--device", "cpu",
                           "--superres", path])
    small = str(tmp_path / "superres.pt")  # a 64 -> 128 model behind a 32 px VQGAN
    save_superres(random_superres(64), small)
    with pytest.raises(utils.UserError, match="enlarges 64 px pictures x2, but the VQGAN"):
        evaluate.main(["--vqgan-checkpoint", vqgan_path, "--dataset-path", str(data64),
                       "--no-lpips", "--device", "cpu", "--superres", small])
    assert reconstructions == []


def test_sample_superres_warns_about_another_vqgan_and_enlarges_clamped_8_bit_pictures(
        tmp_path, capsys):
    path = str(tmp_path / "superres.pt")
    model = random_superres(32)
    save_superres(model, path, vqgan_sha256="a" * 64)

    class Transformer:
        config = {"image_size": 32}
    sample.load_matching_superres(path, Transformer(), "t.pt", "a" * 64, "cpu")
    assert "another VQGAN" not in capsys.readouterr().err
    sample.load_matching_superres(path, Transformer(), "t.pt", "b" * 64, "cpu")
    assert "trained behind another VQGAN" in capsys.readouterr().err
    # a decoder overshoots [-1, 1]; the pairs it learned from were clamped and 8-bit
    overshooting = torch.linspace(-1.4, 1.4, 3 * 32 * 32).reshape(1, 3, 32, 32)
    as_trained = utils.from_uint8(utils.to_uint8(overshooting))
    torch.testing.assert_close(superres.enlarge(model, overshooting),
                               model(as_trained).clamp(-1, 1))
