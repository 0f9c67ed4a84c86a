"""Stage-1 training: the split-graph loss equals the textbook one, the GAN switches on at
--disc-start, grids are real pixels, runs resume exactly, checkpoints survive crashes, NaN and
Ctrl-C stop cleanly, wrong --resume files are refused, and a tiny run learns.

Everything runs on the CPU with 32 px mannequins and a tiny VQGAN (ch 32, ch_mult 1,2).
"""
import copy
import errno
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import plots
import runs
import training_vqgan
import utils
from codebook import Codebook
from discriminator import NLayerDiscriminator, hinge_d_loss
from vqgan import VQGAN, VQGANConfig, config_from_args, load_vqgan
from conftest import LPIPS_WEIGHTS, needs_lpips

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          z_channels=32, embed_dim=32, n_embed=32, resolution=32)


@pytest.fixture(scope="module")
def dataset(mannequin_set):
    return mannequin_set(64, 32)


def run_args(dataset, run_dir, *extra):
    """Flags of a tiny CPU run: the small preset shrunk to ch 32, ch_mult 1,2, 32 codes, the
    full loss from the first step and a constant learning rate (later flags override these).

    --val-fraction 0.5 leaves 31 training images: 7 batches of 4 per epoch, so a few steps
    cross an epoch boundary.
    """
    return ["--dataset-path", str(dataset), "--image-size", "32", "--val-fraction", "0.5",
            "--run-dir", str(run_dir), "--device", "cpu", "--num-workers", "0",
            "--batch-size", "4", "--preset", "small", "--ch", "32", "--ch-mult", "1,2",
            "--num-res-blocks", "1", "--attn-resolutions", "", "--z-channels", "32",
            "--embed-dim", "32", "--n-embed", "32", "--lr", "1e-3", "--perceptual-start", "0",
            "--min-lr-ratio", "1", "--lpips-weights", str(LPIPS_WEIGHTS), *extra]


def train(dataset, run_dir, *extra):
    training_vqgan.main(run_args(dataset, run_dir, *extra))
    return run_dir


def load_last(run_dir):
    return utils.load_checkpoint(str(run_dir / "vqgan_last.pt"), "vqgan_train")


def counting_restarts(restart, counts):
    """Codebook._restart_dead_codes, also appending how many codes it changed to `counts`."""
    def counting_restart(codebook, z):
        before = codebook.embedding.weight.detach().clone()
        restart(codebook, z)
        counts.append(int((codebook.embedding.weight != before).any(dim=1).sum()))
    return counting_restart


def assert_identical(a, b, where="checkpoint"):
    """Nested dicts/lists of tensors and plain values are bit-for-bit equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ----------------------------------------------------------------------------------------------
# One step: the generator loss and the discriminator loss
# ----------------------------------------------------------------------------------------------

LOSS_WEIGHTS = training_vqgan.LossWeights(perceptual_weight=0.7, codebook_weight=1.3,
                                           disc_weight=0.8)


def reference_generator_backward(model, lpips, discriminator, images, args):
    """taming-transformers' way: two autograd.grad calls at the last layer, one full backward."""
    x_hat, codebook_loss, _ = model(images)
    rec_loss = (images - x_hat).abs().mean() + args.perceptual_weight * lpips(images, x_hat)
    g_loss = -discriminator(x_hat).mean()
    rec_grad, = torch.autograd.grad(rec_loss, model.last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, model.last_layer, retain_graph=True)
    lam = (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * args.disc_weight
    total = rec_loss + lam * g_loss + args.codebook_weight * codebook_loss
    total.backward()
    return lam


def tiny_models(seed=0):
    torch.manual_seed(seed)
    return VQGAN(TINY_CONFIG).train(), NLayerDiscriminator().train()


def test_split_graph_generator_step_matches_the_two_autograd_grad_reference(lpips):
    model, discriminator = tiny_models()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    # same weights; copies keep BatchNorm running stats and code-usage counters apart
    ref_model, ref_disc = copy.deepcopy(model), copy.deepcopy(discriminator)
    expected_lambda = reference_generator_backward(ref_model, lpips, ref_disc, images,
                                                   LOSS_WEIGHTS)

    _, _, terms = training_vqgan.generator_backward(model, lpips, discriminator, images,
                                                    LOSS_WEIGHTS, gan_on=True)

    assert 1e-3 < expected_lambda < 1e3  # a real balance, not the clamp
    torch.testing.assert_close(terms["disc_lambda"], expected_lambda, rtol=1e-5, atol=0)
    for (name, param), ref_param in zip(model.named_parameters(), ref_model.parameters()):
        # float32 sums in another order; some biases before a GroupNorm have a zero gradient
        error = (param.grad - ref_param.grad).norm()
        assert error <= 1e-4 * ref_param.grad.norm() + 1e-6, f"{name}: error {error:.2e}"


def test_generator_step_differentiates_to_x_hat_only_and_never_to_a_model_weight(lpips,
                                                                               monkeypatch):
    """Under torch.compile, autograd.grad to the last conv's weight would run the model's whole
    compiled backward: lambda's weight gradients come from conv2d_weight instead, and the only
    backward through the model is the one that trains it."""
    model, discriminator = tiny_models()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    inputs_of_grad_calls, real_grad = [], torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        inputs_of_grad_calls.append(inputs)
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    _, _, terms = training_vqgan.generator_backward(model, lpips, discriminator, images,
                                                    LOSS_WEIGHTS, gan_on=True)
    weights = {id(p) for p in model.parameters()}
    assert "disc_lambda" in terms and len(inputs_of_grad_calls) == 2  # L_rec and L_G, to x_hat
    for inputs in inputs_of_grad_calls:
        for tensor in (inputs if isinstance(inputs, (list, tuple)) else [inputs]):
            assert id(tensor) not in weights and tensor.shape == images.shape


def test_lambda_comes_from_float32_weight_gradients_where_fp16_ones_underflow():
    """At 256 px the GAN term's gradient at x_hat is of order 1e-8 per pixel, below half of fp16's
    smallest subnormal (6e-8): an fp16 gradient is all zeros there, while summed over the image
    the weight gradient is well above lambda's 1e-4 floor. lambda must then equal the float64
    computation, also under fp16 autocast."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 3, 3, padding=1)
    last_input = F.silu(torch.randn(2, 8, 128, 128))  # as the decoder's norm + swish give it
    grad_rec = torch.randn(2, 3, 128, 128) * 3e-6
    grad_gan = torch.full((2, 3, 128, 128), 2e-8)
    with torch.autocast("cpu", dtype=torch.float16):
        x_hat = conv(last_input)  # (2, 3, 128, 128) in fp16
        lam = training_vqgan.adaptive_lambda(last_input, conv, grad_rec, grad_gan, 0.8)
    underflowed, = torch.autograd.grad(x_hat, conv.weight, grad_gan.to(x_hat.dtype))
    assert not underflowed.any(), "the setup should be where fp16 gradients vanish"

    conv64, input64 = copy.deepcopy(conv).double(), last_input.double()
    output64 = conv64(input64)
    rec_w, = torch.autograd.grad(output64, conv64.weight, grad_rec.double(), retain_graph=True)
    gan_w, = torch.autograd.grad(output64, conv64.weight, grad_gan.double())
    assert gan_w.norm() > 10 * 1e-4  # far above the floor: the GAN gradient matters
    expected = (rec_w.norm() / (gan_w.norm() + 1e-4)).clamp(0, 1e4) * 0.8
    assert lam.dtype == torch.float32
    assert lam.item() == pytest.approx(expected.item(), rel=1e-5)


def test_generator_step_leaves_discriminator_grads_none(lpips):
    model, discriminator = tiny_models()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    training_vqgan.generator_backward(model, lpips, discriminator, images, LOSS_WEIGHTS,
                                      gan_on=True)
    assert all(p.grad is None for p in discriminator.parameters())


def test_discriminator_step_leaves_generator_grads_untouched_and_is_the_hinge_loss():
    model, discriminator = tiny_models()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    x_hat, _, _ = model(images)  # still attached to the generator's graph
    ref_disc = copy.deepcopy(discriminator)

    loss = training_vqgan.discriminator_backward(discriminator, images, x_hat, hinge_d_loss,
                                                 scale=0.5)

    assert all(p.grad is None for p in model.parameters())
    expected = 0.5 * (F.relu(1 - ref_disc(images)).mean()
                      + F.relu(1 + ref_disc(x_hat.detach())).mean())
    torch.testing.assert_close(loss, expected.detach())  # reported unscaled
    expected.backward()
    for (name, param), ref_param in zip(discriminator.named_parameters(), ref_disc.parameters()):
        torch.testing.assert_close(param.grad, 0.5 * ref_param.grad,
                                   msg=lambda text: f"{name}: {text}")


@needs_lpips
def test_no_discriminator_forward_or_lambda_before_disc_start(dataset, tmp_path, monkeypatch,
                                                              shared_lpips, capsys):
    calls = {"discriminator": 0, "lambda": 0}

    class CountingDiscriminator(NLayerDiscriminator):
        def forward(self, x):
            calls["discriminator"] += 1
            return super().forward(x)

    real_lambda = training_vqgan.adaptive_lambda

    def counting_lambda(*args, **kwargs):
        calls["lambda"] += 1
        return real_lambda(*args, **kwargs)

    monkeypatch.setattr(training_vqgan, "NLayerDiscriminator", CountingDiscriminator)
    monkeypatch.setattr(training_vqgan, "adaptive_lambda", counting_lambda)
    train(dataset, tmp_path, "--max-steps", "4", "--disc-start", "2", "--log-every", "1")

    # steps 3 and 4 only: one D pass for the GAN term, two for D's own loss
    assert calls == {"discriminator": 2 * 3, "lambda": 2}
    records = [r for r in utils.read_jsonl(tmp_path / "metrics.jsonl") if "rec_loss" in r]
    gan_keys = {"generator", "discriminator", "disc_lambda"}
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [bool(gan_keys & r.keys()) for r in records] == [False, False, True, True]
    assert all(gan_keys <= r.keys() for r in records[2:])
    # the resolved configuration, printed as the run starts
    printed = capsys.readouterr().out
    assert "stage 1: preset small, 32 px images -> 16x16 tokens of 32 codes" in printed
    assert "ch 32, ch_mult (1, 2), num_res_blocks 1," in printed
    assert "lr 0.001 (--lr)" in printed
    assert "GAN x 0.8 lambda from step 2" in printed
    channels_last = "on" if utils.use_channels_last(None, torch.device("cpu")) else "off"
    assert f"precision fp32, channels_last {channels_last}, compile off" in printed


def test_lambda_of_an_overflowed_gradient_is_nan_not_zero_or_the_clamp():
    """An fp16 gradient that overflowed to inf is no lambda: 0 (inf in the GAN term's) or 1e4
    (in the reconstruction's) would be averaged into the logged lambda as real values."""
    torch.manual_seed(0)
    conv, last_input = torch.nn.Conv2d(8, 3, 3, padding=1), torch.randn(2, 8, 16, 16)
    grad_rec, grad_gan = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    assert training_vqgan.adaptive_lambda(last_input, conv, grad_rec, grad_gan, 0.8).isfinite()
    for overflowed in (grad_rec, grad_gan):
        overflowed[0, 0, 0, 0] = float("inf")
        assert training_vqgan.adaptive_lambda(last_input, conv, grad_rec, grad_gan, 0.8).isnan()
        overflowed[0, 0, 0, 0] = 1.0


def test_an_fp16_step_whose_lambda_overflowed_is_left_out_of_the_logged_mean(
        dataset, tmp_path, monkeypatch, shared_lpips):
    """Under fp16 the GradScaler skips a step whose scaled gradients overflowed, lambda's too;
    that step's NaN made the window's logged lambda NaN, which is not JSON."""
    returned, real_lambda = [], training_vqgan.adaptive_lambda

    def overflowing_lambda(*args, **kwargs):  # the first GAN step's gradients overflow
        weight = real_lambda(*args, **kwargs)
        returned.append(float("nan") if not returned else float(weight))
        return torch.full_like(weight, returned[-1])
    monkeypatch.setattr(training_vqgan, "adaptive_lambda", overflowing_lambda)
    train(dataset, tmp_path, "--max-steps", "4", "--disc-start", "0", "--log-every", "2",
          "--precision", "fp16")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
               for line in lines]
    lambdas = {r["step"]: r["disc_lambda"] for r in records if "disc_lambda" in r}
    assert len(returned) == 4 and lambdas[2] == pytest.approx(returned[1])  # not NaN
    assert lambdas[4] == pytest.approx((returned[2] + returned[3]) / 2)


def test_disc_weight_zero_never_runs_the_discriminator_and_says_no_gan(dataset, tmp_path,
                                                                      monkeypatch, shared_lpips,
                                                                      capsys):
    calls = []

    class CountingDiscriminator(NLayerDiscriminator):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    monkeypatch.setattr(training_vqgan, "NLayerDiscriminator", CountingDiscriminator)
    train(dataset, tmp_path, "--max-steps", "2", "--disc-start", "0", "--disc-weight", "0")
    assert calls == []  # it trained D on every step for a GAN term weighted 0
    assert "codebook x 1, no GAN" in capsys.readouterr().out


def test_a_run_directory_holding_a_run_is_not_overwritten_without_resume_or_overwrite(
        dataset, tmp_path, shared_lpips):
    train(dataset, tmp_path, "--max-steps", "1")
    before = (tmp_path / "vqgan_last.pt").read_bytes()
    with pytest.raises(utils.UserError, match="already holds a run .vqgan_last.pt.: pass "
                                              "--resume to continue it, --overwrite"):
        train(dataset, tmp_path, "--max-steps", "1", "--seed", "1")
    assert (tmp_path / "vqgan_last.pt").read_bytes() == before
    train(dataset, tmp_path, "--max-steps", "1", "--seed", "1", "--overwrite")
    assert (tmp_path / "vqgan_last.pt").read_bytes() != before


def test_overwrite_removes_the_previous_runs_files_once_the_new_run_starts(dataset, tmp_path,
                                                                           shared_lpips,
                                                                           monkeypatch):
    train(dataset, tmp_path, "--max-steps", "4", "--sample-every", "2")
    assert sorted(os.listdir(tmp_path / "samples")) == ["reconstructions_000002.png",
                                                        "reconstructions_000004.png"]
    train(dataset, tmp_path, "--max-steps", "2", "--sample-every", "2", "--overwrite")
    assert os.listdir(tmp_path / "samples") == ["reconstructions_000002.png"]  # not the old 4
    assert load_last(tmp_path)["step"] == 2

    # a command refused before training leaves the run it would have replaced whole (it was
    # deleted before the data was even read)
    files = sorted(os.listdir(tmp_path))
    with pytest.raises(utils.UserError, match="--val-fraction"):
        train(dataset, tmp_path, "--max-steps", "2", "--overwrite", "--val-fraction", "0.001")
    assert sorted(os.listdir(tmp_path)) == files and load_last(tmp_path)["step"] == 2

    def stopped(*args, **kwargs):  # Ctrl-C in the new run's first step, before its checkpoint
        raise KeyboardInterrupt
    monkeypatch.setattr(training_vqgan.runs.Schedule, "apply", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(dataset, tmp_path, "--max-steps", "2", "--overwrite")
    assert os.listdir(tmp_path) == []  # no old checkpoint for --resume to continue


def test_a_resume_with_other_data_is_refused_before_the_data_is_read(dataset, tmp_path,
                                                                     shared_lpips, monkeypatch):
    train(dataset, tmp_path, "--max-steps", "1")
    reads = []
    monkeypatch.setattr(training_vqgan.data, "build_datasets",
                        lambda *a, **k: reads.append(1))  # (encoding, on stage 2: minutes)
    with pytest.raises(utils.UserError, match="--val-fraction was 0.5"):
        train(dataset, tmp_path, "--max-steps", "2", "--val-fraction", "0.3", "--resume")
    assert reads == []


def test_a_relative_dataset_path_is_stored_absolute_and_resumes_from_another_spelling(
        dataset, tmp_path, shared_lpips, monkeypatch, capsys):
    monkeypatch.chdir(os.path.dirname(dataset))
    relative = os.path.basename(dataset)
    training_vqgan.main(run_args(relative, tmp_path, "--max-steps", "1"))
    assert load_last(tmp_path)["args"]["dataset_path"] == os.path.realpath(dataset)
    # the same folder, written absolute with a trailing slash: the same data, no warning;
    # another learning rate goes on with a warning naming it
    training_vqgan.main(run_args(str(dataset) + os.sep, tmp_path, "--max-steps", "2",
                                 "--lr", "5e-4", "--resume"))
    assert load_last(tmp_path)["step"] == 2
    warning = capsys.readouterr().err
    assert "--lr 0.0005 (was 0.001)" in warning and "dataset" not in warning


def test_each_preset_brings_its_own_resolution_and_hyperparameters_unless_a_flag_is_given():
    paper = training_vqgan.parse_args(["--preset", "paper"])
    # taming-transformers' configs/imagenet_vqgan.yaml: 256 px, base lr 4.5e-6 x batch, ...
    assert paper.image_size == 256 and config_from_args(paper).resolution == 256
    assert (paper.batch_size, paper.base_lr, paper.disc_start, paper.disc_weight,
            paper.codebook_weight, paper.perceptual_weight, paper.perceptual_start,
            paper.warmup_steps, paper.min_lr_ratio) == (3, 4.5e-6, 250001, 0.8, 1.0, 1.0, 0, 0,
                                                        1.0)
    assert runs.learning_rate(paper, world_size=2) == pytest.approx(4.5e-6 * 3 * 2)
    small = training_vqgan.parse_args([])
    assert (small.image_size, small.batch_size, small.base_lr, small.disc_start,
            small.perceptual_start, small.min_lr_ratio) == (64, 8, 5e-5, 10000, 800, 0.1)
    given = training_vqgan.parse_args(["--preset", "paper", "--image-size", "128",
                                       "--disc-start", "5", "--base-lr", "1e-5",
                                       "--min-lr-ratio", "0.5"])
    assert (given.image_size, given.disc_start, given.base_lr, given.min_lr_ratio,
            given.batch_size) == (128, 5, 1e-5, 0.5, 3)
    assert config_from_args(given).resolution == 128 and config_from_args(given).ch == 128


@needs_lpips
def test_logged_loss_terms_are_means_over_the_logging_window(dataset, tmp_path, shared_lpips):
    """Like usage and perplexity (and stage 2's loss): one line per window of --log-every steps
    holds each term's mean over the steps of the window that had it."""
    flags = ["--max-steps", "3", "--disc-start", "1", "--perceptual-start", "1"]
    train(dataset, tmp_path / "every", *flags, "--log-every", "1")
    train(dataset, tmp_path / "window", *flags, "--log-every", "3")
    per_step = [r for r in utils.read_jsonl(tmp_path / "every" / "metrics.jsonl")
                if "rec_loss" in r]
    (window,) = [r for r in utils.read_jsonl(tmp_path / "window" / "metrics.jsonl")
                 if "rec_loss" in r]
    assert window["step"] == 3
    for key in ("rec_loss", "codebook"):  # every step
        assert window[key] == pytest.approx(np.mean([r[key] for r in per_step]), rel=1e-6)
    for key in ("perceptual", "generator", "discriminator", "disc_lambda"):  # steps 2 and 3
        assert "perceptual" not in per_step[0] and key in per_step[1]
        assert window[key] == pytest.approx(np.mean([r[key] for r in per_step[1:]]), rel=1e-6)


@needs_lpips
def test_the_dead_code_window_counts_optimizer_steps_under_grad_accumulation(dataset, tmp_path,
                                                                             shared_lpips,
                                                                             monkeypatch):
    """4 steps of 2 micro-batches with --dead-code-window 3: codes that no micro-batch of steps
    1-3 chose are restarted in step 4's first micro-batch, not after 3 micro-batches."""
    dead_at_each_forward = []
    monkeypatch.setattr(Codebook, "_restart_dead_codes",
                        counting_restarts(Codebook._restart_dead_codes, dead_at_each_forward))

    train(dataset, tmp_path, "--max-steps", "4", "--grad-accum", "2", "--restart-dead-codes",
          "--dead-code-window", "3", "--disc-start", "10", "--perceptual-start", "10")
    assert len(dead_at_each_forward) == 8
    assert dead_at_each_forward[:6] == [0] * 6 and dead_at_each_forward[7] == 0
    assert dead_at_each_forward[6] > 0, "some of the 32 codes went unused for 3 steps"
    steps_unused = load_last(tmp_path)["model"]["quantize.steps_unused"]
    assert steps_unused.max() <= 3, steps_unused.tolist()


def test_before_perceptual_start_the_step_is_l1_and_codebook_only(lpips):
    model = tiny_models()[0]
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    ref_model = copy.deepcopy(model)
    x_hat, codebook_loss, _ = ref_model(images)
    ((images - x_hat).abs().mean() + LOSS_WEIGHTS.codebook_weight * codebook_loss).backward()

    _, _, terms = training_vqgan.generator_backward(model, lpips, None, images, LOSS_WEIGHTS,
                                                    gan_on=False, perceptual_on=False)

    assert "perceptual" not in terms
    for (name, param), ref_param in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(param.grad, ref_param.grad, msg=lambda text: f"{name}: {text}")


@needs_lpips
def test_lpips_from_perceptual_start_on_and_the_lr_follows_the_schedule(dataset, tmp_path,
                                                                        monkeypatch, shared_lpips):
    calls, real_forward = [], shared_lpips.forward
    monkeypatch.setattr(shared_lpips, "forward",
                        lambda *images: calls.append(1) or real_forward(*images))
    train(dataset, tmp_path, "--max-steps", "4", "--perceptual-start", "2", "--log-every", "1",
          "--warmup-steps", "1", "--min-lr-ratio", "0.1")

    assert len(calls) == 2  # steps 3 and 4
    records = [r for r in utils.read_jsonl(tmp_path / "metrics.jsonl") if "rec_loss" in r]
    assert ["perceptual" in r for r in records] == [False, False, True, True]
    # warm-up step, then the cosine from the peak 1e-3 towards 1e-4 at step 4
    assert [r["lr"] for r in records] == pytest.approx(
        [1e-3, 1e-3, 1e-4 + 9e-4 * 0.75, 1e-4 + 9e-4 * 0.25])


# ----------------------------------------------------------------------------------------------
# Pictures are saved as real pixels
# ----------------------------------------------------------------------------------------------


def test_image_grid_maps_minus_one_to_0_zero_to_128_and_one_to_255(tmp_path):
    image = torch.zeros(3, 2, 3)
    image[:, :, 0], image[:, :, 1], image[:, :, 2] = -1.0, 0.0, 1.0
    image[:, 1, :] = torch.tensor([-5.0, 0.5, 5.0])  # out of range clamps; 0.5 -> 191.25
    utils.save_image_grid([[image]], tmp_path / "grid.png", pad=0)
    pixels = np.asarray(Image.open(tmp_path / "grid.png"))
    assert pixels.shape == (2, 3, 3)
    assert pixels[0, :, 0].tolist() == [0, 128, 255]
    assert pixels[1, :, 0].tolist() == [0, 191, 255]


def test_reconstruction_grid_shows_originals_over_reconstructions_in_pixels(tmp_path):
    class Constant(torch.nn.Module):  # "reconstructs" every image as mid-grey
        def forward(self, images):
            return torch.zeros_like(images), torch.tensor(0.0), None

    model = Constant().train()
    images = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])
    training_vqgan.save_reconstructions(model, images, tmp_path / "r.png")
    grid = np.asarray(Image.open(tmp_path / "r.png"))  # 2 rows x 2 columns, pad 2
    assert grid.shape == (2 * 6 + 2, 2 * 6 + 2, 3)
    assert (grid[2:6, 2:6] == 0).all() and (grid[2:6, 8:12] == 255).all()
    assert (grid[8:12, 2:6] == 128).all() and (grid[8:12, 8:12] == 128).all()
    assert model.training  # put back into training mode


# ----------------------------------------------------------------------------------------------
# Resume, checkpoints, NaN, Ctrl-C
# ----------------------------------------------------------------------------------------------


@needs_lpips
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_stop_and_resume_gives_the_same_weights_as_one_unbroken_run(dataset, tmp_path, grad_accum,
                                                                    shared_lpips, monkeypatch):
    # GAN on from step 2, flips on, codes restarted from random batch rows every step (RNG),
    # and an epoch boundary inside the resumed part
    common = ["--disc-start", "2", "--flip", "--restart-dead-codes", "--dead-code-window", "1",
              "--grad-accum", str(grad_accum), "--log-every", "1"]
    restarted = []  # codes restarted per training forward, in both runs
    monkeypatch.setattr(Codebook, "_restart_dead_codes",
                        counting_restarts(Codebook._restart_dead_codes, restarted))
    train(dataset, tmp_path / "unbroken", *common, "--max-steps", "8")
    unbroken_restarts, restarted[:] = list(restarted), []
    train(dataset, tmp_path / "split", *common, "--max-steps", "4")
    train(dataset, tmp_path / "split", *common, "--max-steps", "8", "--resume")
    # restarts happened (in the resumed part too), and at the same calls as in the unbroken run
    assert sum(restarted[4 * grad_accum:]) > 0
    assert restarted == unbroken_restarts

    unbroken, resumed = load_last(tmp_path / "unbroken"), load_last(tmp_path / "split")
    assert unbroken["step"] == resumed["step"] == 8  # --max-steps counts the run's total
    for key in ("model", "discriminator", "opt_g", "opt_d", "scaler", "rng"):
        assert_identical(unbroken[key], resumed[key], key)

    def training_records(run_dir):
        return [{k: v for k, v in r.items() if k != "images_per_s"}
                for r in utils.read_jsonl(run_dir / "metrics.jsonl") if "rec_loss" in r]

    assert training_records(tmp_path / "unbroken") == training_records(tmp_path / "split")


@needs_lpips
def test_vqgan_pt_holds_the_moving_average_of_the_trained_weights(dataset, tmp_path,
                                                                 shared_lpips,
                                                                 averaged_weights_seen):
    """--ema-decay d: vqgan.pt is e_1 = w_1, e_t = d_t e_(t-1) + (1 - d_t) w_t, d_t = min(d,
    t / (t + 9)), over the weights w_t after each optimizer step, computed here from the
    weights the trainer trained."""
    trained = averaged_weights_seen  # the model's parameters after each optimizer step
    train(dataset, tmp_path, "--ema-decay", "0.2", "--max-steps", "3", "--disc-start", "1")
    assert len(trained) == 3
    last = load_last(tmp_path)["model"]
    assert_identical(trained[-1], {name: last[name] for name in trained[-1]})
    expected = trained[0]
    for d, weights in zip((2 / 11, 0.2), trained[1:]):  # min(0.2, t / (t + 9)), t = 2, 3
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    saved = torch.load(tmp_path / "vqgan.pt", weights_only=True)["state_dict"]
    for name in expected:
        torch.testing.assert_close(saved[name], expected[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(saved["decoder.conv_out.weight"], last["decoder.conv_out.weight"])


@needs_lpips
def test_a_resume_with_another_lpips_start_warns_like_any_other_changed_loss_flag(
        dataset, tmp_path, shared_lpips, capsys):
    train(dataset, tmp_path, "--max-steps", "1")  # run_args: --perceptual-start 0
    capsys.readouterr()
    train(dataset, tmp_path, "--max-steps", "2", "--resume")
    assert "warning" not in capsys.readouterr().err
    train(dataset, tmp_path, "--max-steps", "3", "--resume", "--perceptual-start", "800")
    assert ("warning: --resume goes on with other training flags than the run's own: "
            "--perceptual-start 800 (was 0)") in capsys.readouterr().err


@needs_lpips
def test_resume_keeps_the_moving_average_and_refuses_another_decay(dataset, tmp_path,
                                                                  shared_lpips):
    common = ["--ema-decay", "0.7", "--disc-start", "2"]
    train(dataset, tmp_path / "unbroken", *common, "--max-steps", "4")
    train(dataset, tmp_path / "split", *common, "--max-steps", "2")
    train(dataset, tmp_path / "split", *common, "--max-steps", "4", "--resume")
    assert_identical(load_last(tmp_path / "unbroken")["ema"], load_last(tmp_path / "split")["ema"])
    assert_identical(*(torch.load(tmp_path / run / "vqgan.pt", weights_only=True)["state_dict"]
                       for run in ("unbroken", "split")))
    for decay in ("0", "0.9"):
        with pytest.raises(utils.UserError, match=r"trained with --ema-decay 0.7; an exact"):
            train(dataset, tmp_path / "split", "--ema-decay", decay, "--max-steps", "5",
                  "--resume")


def test_auto_precision_is_bf16_only_where_the_hardware_has_it_natively(monkeypatch):
    """torch.cuda.is_bf16_supported() is true on pre-Ampere GPUs too, where bf16 is emulated:
    the compute capability decides, and fp16 there comes with an enabled GradScaler. On the CPU
    the AMX bf16 units decide (elsewhere bf16 is emulated; AVX512-BF16 alone, measured on an
    AMD Zen 4, ran faster but ended a stage-1 run 0.8 dB lower)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    for capability, expected in (((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
        assert utils.resolve_precision("auto", cuda) == expected
    capabilities = torch.cpu.get_capabilities()
    for amx, avx512, expected, stage_2 in ((False, False, "fp32", "fp32"),
                                           (True, True, "bf16", "bf16"),
                                           (False, True, "fp32", "bf16")):  # AMD Zen 4
        monkeypatch.setattr(torch.cpu, "get_capabilities",
                            lambda: {**capabilities, "amx_bf16": amx, "avx512_bf16": avx512})
        assert utils.resolve_precision("auto", cpu) == expected
        assert utils.resolve_precision("auto", cpu, cpu_bf16="avx512_bf16") == stage_2
    assert utils.resolve_precision("bf16", cpu) == "bf16"  # as given: the CPU tests use it
    assert utils.resolve_precision("fp32", cpu) == "fp32"
    assert utils.grad_scaler(cpu, "fp16").is_enabled()
    assert not utils.grad_scaler(cpu, "bf16").is_enabled()
    assert not utils.grad_scaler(cpu, "auto").is_enabled()
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 turns an outer autocast off
        with utils.autocast_context(cpu, "fp32"):
            assert (a @ a).dtype == torch.float32
        assert (a @ a).dtype == torch.bfloat16
    with utils.autocast_context(cpu, "fp16"):
        assert torch.get_autocast_dtype("cpu") == torch.float16
        assert torch.is_autocast_enabled("cpu")


def test_channels_last_by_default_on_cuda_and_x86_cpus_and_the_flag_wins(monkeypatch):
    capabilities = torch.cpu.get_capabilities()
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    for architecture, expected in (("x86_64", True), ("aarch64", False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities",
                            lambda: {**capabilities, "architecture": architecture})
        assert utils.use_channels_last(None, cpu) is expected
        assert utils.use_channels_last(None, cuda) is True
        assert utils.use_channels_last(None, mps) is False
        for flag in (True, False):
            assert utils.use_channels_last(flag, cpu) is flag
            assert utils.use_channels_last(flag, cuda) is flag


@pytest.fixture(scope="module")
def small_dataset(mannequin_set):
    """16 px mannequins: CPU kernels for fp16 convolution gradients are about 100x slower than
    fp32 ones, so the real-fp16 run is kept this small."""
    return mannequin_set(24, 16)


def adam_first_moments(checkpoint, optimizer):
    return torch.cat([state["exp_avg"].flatten()
                      for state in checkpoint[optimizer]["state"].values()])


def assert_same_gradients(moments, expected):
    """Adam's first moments after one step are (1 - beta1) x the gradients: equal up to the
    noise that another precision (and with it other code choices) brings, not off by a loss
    scale."""
    assert not torch.equal(moments, expected)  # really computed in another precision
    assert (moments.norm() / expected.norm()).item() == pytest.approx(1.0, rel=0.2)
    assert F.cosine_similarity(moments, expected, dim=0) > 0.8


class OneConvGenerator(torch.nn.Module):
    """A stand-in for the VQGAN in generator_backward: x_hat = decoder.conv_out(silu(1x1 conv of
    the image)). fp16 convolution gradients are slow on the CPU, and two small convs keep a
    real-fp16 step fast."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 32, 1)
        self.decoder = torch.nn.Module()
        self.decoder.conv_out = torch.nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, images, return_last_input=False):
        last_input = F.silu(self.features(images))
        x_hat = self.decoder.conv_out(last_input)
        codebook_loss = 0.1 * (x_hat.float() - images).pow(2).mean()
        return x_hat, codebook_loss, None, last_input.detach()


@needs_lpips
def test_a_real_fp16_gan_step_with_a_grad_scaler_gives_the_float32_gradients(lpips):
    """Under fp16 autocast every loss is scaled before its first backward pass (LPIPS and D to
    x_hat, the model, D's own loss); after unscaling, the generator's and D's gradients and
    lambda are the float32 step's up to fp16's precision."""
    torch.manual_seed(0)
    generator, discriminator = OneConvGenerator(), NLayerDiscriminator()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    results = {}
    for precision in ("fp32", "fp16"):
        g, d = copy.deepcopy(generator), copy.deepcopy(discriminator)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=precision == "fp16")
        scale = scaler.scale(torch.full((), 0.5))  # --grad-accum 2
        x_hat, _, terms = training_vqgan.generator_backward(
            g, lpips, d, images, LOSS_WEIGHTS, gan_on=True, scale=scale, precision=precision)
        training_vqgan.discriminator_backward(d, images, x_hat, hinge_d_loss, scale, precision)
        assert x_hat.dtype == (torch.float16 if precision == "fp16" else torch.float32)
        unscale = scaler.get_scale() if scaler.is_enabled() else 1.0
        results[precision] = (terms["disc_lambda"],
                              *(torch.cat([p.grad.flatten() for p in m.parameters()]) / unscale
                                for m in (g, d)))
    (lam32, g32, d32), (lam16, g16, d16) = results["fp32"], results["fp16"]
    assert lam16.item() == pytest.approx(lam32.item(), rel=0.03)
    for fp16_grads, fp32_grads in ((g16, g32), (d16, d32)):
        assert torch.isfinite(fp16_grads).all()
        assert ((fp16_grads - fp32_grads).norm() / fp32_grads.norm()) < 0.05


@needs_lpips
def test_real_fp16_with_the_grad_scaler_takes_the_float32_step(small_dataset, tmp_path,
                                                                shared_lpips):
    """--precision fp16 on the CPU runs fp16 autocast with an enabled GradScaler (scale 2^16):
    the scaled gradients are unscaled before Adam sees them. L1 of RGB only: at 2^16 the LPIPS
    package's feature normalisation overflows fp16, and so do the fp16 gradients of the
    `small` preset's squared luma/chroma error on an untrained model's first step; the scaler
    would (rightly) skip the step and halve its scale."""
    flags = ["--image-size", "16", "--batch-size", "2", "--max-steps", "1",
             "--disc-start", "10", "--perceptual-start", "10", "--pixel-loss", "l1",
             "--chroma-weight", "0"]
    train(small_dataset, tmp_path / "fp32", *flags)
    train(small_dataset, tmp_path / "fp16", *flags, "--precision", "fp16")
    fp32, fp16 = load_last(tmp_path / "fp32"), load_last(tmp_path / "fp16")
    assert fp32["scaler"] == {} and fp16["scaler"]["scale"] == 2.0**16
    assert fp16["scaler"]["_growth_tracker"] == 1  # the step was taken, not skipped
    assert_same_gradients(adam_first_moments(fp16, "opt_g"), adam_first_moments(fp32, "opt_g"))


@needs_lpips
def test_channels_last_compile_and_bf16_run_on_the_cpu(dataset, tmp_path, shared_lpips,
                                                       monkeypatch):
    """The accelerator settings, on the CPU, for one GAN step. A torch.compile'd VQGAN in NHWC
    takes the eager float32 step (to float32 rounding); bf16 autocast (eager) takes it up to
    bf16's precision: 8 bits, enough to move some latents to other codes, hence loose bounds."""
    compiled, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or
                        real_compile(model, **kw))
    dtypes, real_step = [], training_vqgan.generator_backward

    def watch_step(*args, **kwargs):
        x_hat, indices, terms = real_step(*args, **kwargs)
        dtypes.append(x_hat.dtype)
        return x_hat, indices, terms

    monkeypatch.setattr(training_vqgan, "generator_backward", watch_step)
    flags = ["--max-steps", "1", "--disc-start", "0"]
    train(dataset, tmp_path / "fp32", *flags)
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    train(dataset, tmp_path / "compiled", *flags, "--channels-last", "--compile")
    assert len(compiled) == 1 and torch._dynamo.utils.counters["frames"]["ok"] > frames_before
    train(dataset, tmp_path / "bf16", *flags, "--precision", "bf16")
    assert dtypes == [torch.float32, torch.float32, torch.bfloat16]

    runs = {name: load_last(tmp_path / name) for name in ("fp32", "compiled", "bf16")}
    logged = {name: [r for r in utils.read_jsonl(tmp_path / name / "metrics.jsonl")
                     if "rec_loss" in r][0] for name in runs}
    weight = runs["compiled"]["model"]["decoder.conv_out.weight"]  # (3, 32, 3, 3)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    for key in ("rec_loss", "perceptual", "codebook", "generator", "disc_lambda",
                "discriminator"):
        assert logged["compiled"][key] == pytest.approx(logged["fp32"][key], rel=1e-3), key
        assert logged["bf16"][key] == pytest.approx(logged["fp32"][key], rel=0.15, abs=0.02), key
    for optimizer in ("opt_g", "opt_d"):
        expected = adam_first_moments(runs["fp32"], optimizer)
        same = adam_first_moments(runs["compiled"], optimizer)
        assert ((same - expected).norm() / expected.norm()) < 1e-3, optimizer
        bf16 = adam_first_moments(runs["bf16"], optimizer)
        assert not torch.equal(bf16, expected)
        assert (bf16.norm() / expected.norm()).item() == pytest.approx(1.0, rel=0.2)
        assert F.cosine_similarity(bf16, expected, dim=0) > 0.5, optimizer


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "vqgan_last.pt"
    utils.atomic_save({"kind": "vqgan_train", "step": 1, "weight": torch.ones(3)}, str(path))
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        utils.atomic_save({"kind": "vqgan_train", "step": 2, "weight": torch.zeros(3)},
                          str(path))
    monkeypatch.setattr(torch, "save", real_save)

    checkpoint = utils.load_checkpoint(str(path), "vqgan_train")
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weight"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["vqgan_last.pt"]  # no temporary files left


def test_the_temporary_file_of_a_killed_checkpoint_write_is_removed_at_the_next_start(
        tmp_path, monkeypatch, capsys):
    """A kill -9 mid-write runs no clean-up: what atomic_save names its temporary file is what
    RunDirectory's stale-file clean-up looks for."""
    utils.atomic_save({"kind": "vqgan_train", "step": 1, "args": {}},
                      str(tmp_path / "vqgan_last.pt"))

    def killed_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_midway)
    monkeypatch.setattr(os, "remove", lambda path: None)  # a killed process removes nothing
    with pytest.raises(KeyboardInterrupt):
        utils.atomic_save({"kind": "vqgan_train", "step": 2}, str(tmp_path / "vqgan_last.pt"))
    monkeypatch.undo()
    left = [name for name in os.listdir(tmp_path) if name != "vqgan_last.pt"]
    assert len(left) == 1 and left[0].startswith(".tmp-")  # what the kill leaves

    runs.RunDirectory(str(tmp_path), "vqgan_train", "vqgan_last.pt", {"resume": "last"})
    assert os.listdir(tmp_path) == ["vqgan_last.pt"]
    assert "removed 1 temporary file(s)" in capsys.readouterr().out
    assert utils.load_checkpoint(str(tmp_path / "vqgan_last.pt"), "vqgan_train")["step"] == 1


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoints_get_the_umasks_mode_and_the_rename_is_fsynced(tmp_path, monkeypatch, umask):
    """Others sharing a run (a group, a container) can read its checkpoints as they can any file
    made there; and the folder is fsynced after the rename, so that the rename survives a crash."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def watch_fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watch_fsync)
    monkeypatch.setattr(os, "replace", lambda *a: events.append("rename") or real_replace(*a))
    previous = os.umask(umask)
    try:
        utils.atomic_save({"step": 1}, str(tmp_path / "last.pt"))
        (tmp_path / "plain.txt").write_text("a file made the ordinary way")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "last.pt").st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert events == ["fsync file", "rename", "fsync folder"]
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"step": 1}


@needs_lpips
@pytest.mark.parametrize("source", ["perceptual", "discriminator"])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch,
                                                                   shared_lpips, source):
    calls = {"n": 0}

    def nan_from_step_4(real_forward, calls_per_step):
        def forward(*args, **kwargs):
            out = real_forward(*args, **kwargs)
            calls["n"] += 1
            return out * math.nan if calls["n"] > 3 * calls_per_step else out
        return forward

    if source == "perceptual":  # one LPIPS call per step
        monkeypatch.setattr(shared_lpips, "forward", nan_from_step_4(shared_lpips.forward, 1))
    else:  # D's outputs only: the reconstruction losses of step 4 stay finite
        def nan_discriminator(*args, **kwargs):
            model = NLayerDiscriminator(*args, **kwargs)
            model.forward = nan_from_step_4(model.forward, 3)  # three D calls per step
            return model

        monkeypatch.setattr(training_vqgan, "NLayerDiscriminator", nan_discriminator)
    handler_before = signal.getsignal(signal.SIGINT)

    # step 4 is a checkpoint step: the check must come before that save
    with pytest.raises(utils.UserError, match=r"by step 4.*last good checkpoint .* is intact"):
        train(dataset, tmp_path, "--max-steps", "6", "--disc-start", "0", "--save-every", "2",
              "--log-every", "10")

    assert signal.getsignal(signal.SIGINT) is handler_before  # Ctrl-C works again afterwards
    checkpoint = load_last(tmp_path)
    assert checkpoint["step"] == 2
    for part in ("model", "discriminator"):
        assert all(torch.isfinite(t).all() for t in checkpoint[part].values()
                   if t.is_floating_point()), part
    inference = load_vqgan(str(tmp_path / "vqgan.pt"))
    assert all(torch.isfinite(p).all() for p in inference.parameters())


@needs_lpips
def test_ctrl_c_saves_at_the_current_step_and_exits_130_saying_how_to_resume(
        dataset, tmp_path, monkeypatch, shared_lpips, capsys):
    real_step = training_vqgan.generator_backward
    calls = {"n": 0}

    def press_ctrl_c_in_step_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)  # what the terminal sends
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training_vqgan, "generator_backward", press_ctrl_c_in_step_2)
    handler_before = signal.getsignal(signal.SIGINT)
    # default --log-every 50: the stop writes the only metrics line, for its two steps
    with pytest.raises(SystemExit) as stop:  # as the command line ends
        utils.run_cli(lambda: train(dataset, tmp_path, "--max-steps", "20"))

    assert stop.value.code == 130  # the shell's convention: `stage1 && stage2` stops here
    assert calls["n"] == 2
    assert load_last(tmp_path)["step"] == 2
    assert load_vqgan(str(tmp_path / "vqgan.pt")).config.n_embed == 32
    assert [r["step"] for r in utils.read_jsonl(tmp_path / "metrics.jsonl")] == [2]
    printed = capsys.readouterr()
    assert printed.err.strip().splitlines()[-1] == (
        "stopped at step 2; continue with the same command plus --resume")
    # only the outputs that exist: no grid was drawn by step 2
    assert printed.out.strip().splitlines()[-1] == (
        f"stage 1 outputs in {tmp_path}: vqgan.pt (for stage 2), vqgan_last.pt (--resume), "
        "metrics.jsonl, loss_curves.png")
    assert signal.getsignal(signal.SIGINT) is handler_before


@needs_lpips
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_good_checkpoint(
        dataset, tmp_path, monkeypatch, shared_lpips, capsys):
    real_save, calls = torch.save, {"n": 0}

    def disk_full_at_the_second_checkpoint(obj, f, *args, **kwargs):
        calls["n"] += 1  # two files a checkpoint: vqgan_last.pt, then vqgan.pt
        if calls["n"] == 3:
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_the_second_checkpoint)
    flags = ["--max-steps", "4", "--save-every", "2", "--log-every", "1",
             "--perceptual-start", "100"]  # L1 only: LPIPS plays no part here
    with pytest.raises(SystemExit) as stop:
        utils.run_cli(lambda: train(dataset, tmp_path, *flags))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write {tmp_path / 'vqgan_last.pt'} (No space left on device); the last "
        f"good checkpoint {tmp_path / 'vqgan_last.pt'} is intact: free space (or fix the "
        "permissions) and continue with --resume")
    assert load_last(tmp_path)["step"] == 2
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]

    monkeypatch.setattr(torch, "save", real_save)  # space again: the resumed run ends the job
    train(dataset, tmp_path, *flags, "--resume")
    assert load_last(tmp_path)["step"] == 4
    logged = [r["step"] for r in utils.read_jsonl(tmp_path / "metrics.jsonl") if "rec_loss" in r]
    assert logged == [1, 2, 3, 4]  # steps 3 and 4 of the failed run are not kept twice


@needs_lpips
def test_resuming_a_run_at_or_past_its_max_steps_says_so_in_one_line(
        dataset, tmp_path, shared_lpips, capsys):
    train(dataset, tmp_path, "--max-steps", "2", "--perceptual-start", "100")
    before = {name: (tmp_path / name).read_bytes() for name in ("vqgan_last.pt", "vqgan.pt")}
    capsys.readouterr()

    train(dataset, tmp_path, "--max-steps", "2", "--perceptual-start", "100", "--resume")
    assert capsys.readouterr().out.strip().splitlines() == [
        f"nothing to train: {tmp_path / 'vqgan_last.pt'} is already at step 2, the end of this "
        "run (--max-steps 2); pass a larger --max-steps to train on"]
    with pytest.raises(utils.UserError, match=r"already at step 2, past the end of this run "
                                              r"\(--max-steps 1\); pass --max-steps above 2"):
        train(dataset, tmp_path, "--max-steps", "1", "--perceptual-start", "100",
              "--resume")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


# ----------------------------------------------------------------------------------------------
# Refusing checkpoints that cannot be resumed
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["random bytes", "a pickled object"])
def test_a_file_that_is_no_checkpoint_is_called_so_without_torchs_unsafe_advice(tmp_path,
                                                                                content):
    path = tmp_path / "vqgan_last.pt"
    if content == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:  # loading it with weights_only=False would run the pickle's code
        torch.save({"kind": "vqgan_train", "args": SimpleNamespace(lr=1e-3)}, path)
    with pytest.raises(utils.UserError) as error:
        utils.load_checkpoint(str(path), "vqgan_train")
    assert str(error.value) == (
        f"{path} is not a checkpoint of this project, or a damaged one (it holds no plain "
        "tensors that torch.load(weights_only=True) can read); expected a stage-1 training "
        "checkpoint (vqgan_last.pt)")


def test_a_folder_given_as_a_checkpoint_is_called_a_folder_and_its_checkpoints_named(tmp_path):
    utils.atomic_save({"kind": "vqgan"}, str(tmp_path / "vqgan.pt"))
    with pytest.raises(utils.UserError) as error:
        utils.load_checkpoint(str(tmp_path), "vqgan")
    assert str(error.value) == (
        f"checkpoint {tmp_path} is a folder, not a file; it holds vqgan.pt: pass one of those; "
        "expected a stage-1 inference checkpoint (vqgan.pt)")


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory, lpips):
    """A one-step run: its vqgan_last.pt and vqgan.pt (32 codes)."""
    run_dir = tmp_path_factory.mktemp("finished")
    patch = pytest.MonkeyPatch()
    patch.setattr(training_vqgan, "LPIPSLoss", lambda weights_path=None: lpips)
    try:
        train(dataset, run_dir, "--max-steps", "1")
    finally:
        patch.undo()
    return run_dir


@needs_lpips
def test_resume_with_another_architecture_names_the_differing_field(dataset, finished_run,
                                                                    tmp_path, shared_lpips):
    with pytest.raises(utils.UserError, match=r"another architecture \(differs in: n_embed\)"):
        train(dataset, tmp_path, "--max-steps", "2", "--n-embed", "64",
              "--resume", str(finished_run / "vqgan_last.pt"))


@needs_lpips
@pytest.mark.parametrize("kind", ["vqgan", "transformer_train"])
def test_resume_from_an_inference_or_stage_2_checkpoint_says_which_kind_it_is(
        dataset, finished_run, tmp_path, shared_lpips, kind):
    if kind == "vqgan":
        path = finished_run / "vqgan.pt"
    else:  # only its kind matters
        path = tmp_path / "transformer_last.pt"
        utils.atomic_save({"kind": kind, "step": 1}, str(path))
    expected = re.escape(f"is {utils.CHECKPOINT_KINDS[kind]}, but a stage-1 training")
    with pytest.raises(utils.UserError, match=expected):
        train(dataset, tmp_path, "--max-steps", "2", "--resume", str(path))


@needs_lpips
def test_command_line_prints_one_error_line_for_a_wrong_resume_file(dataset, finished_run,
                                                                     tmp_path):
    command = [sys.executable, str(REPO / "training_vqgan.py"),
               *run_args(dataset, tmp_path, "--max-steps", "2",
                         "--resume", str(finished_run / "vqgan.pt"))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage-1 inference checkpoint (vqgan.pt)" in errors[0]


# ----------------------------------------------------------------------------------------------
# A tiny run learns and writes its outputs
# ----------------------------------------------------------------------------------------------


def plotted_figures(monkeypatch):
    """The matplotlib figures that plots.plot_curves saves, in order."""
    from matplotlib.figure import Figure
    figures, real_savefig = [], Figure.savefig

    def keep(figure, *args, **kwargs):
        figures.append(figure)
        return real_savefig(figure, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def curves(axes):
    """{label: (steps, values)} of the lines in one panel, and its visible x tick labels."""
    lines = {line.get_label(): tuple(map(list, line.get_data())) for line in axes.get_lines()}
    low, high = axes.get_xlim()
    ticks = [label.get_text() for tick, label in zip(axes.get_xticks(), axes.get_xticklabels())
             if low <= tick <= high]
    return lines, ticks


def test_curves_read_well_for_a_single_point_and_for_thirty_thousand_steps(tmp_path,
                                                                           monkeypatch):
    figures = plotted_figures(monkeypatch)
    panels = [("losses", ["rec_loss"]), ("validation PSNR (dB)", ["val_psnr"])]
    plots.plot_curves([{"step": 30, "rec_loss": 0.3}, {"step": 30, "val_psnr": 18.0}], panels,
                      tmp_path / "short.png")
    long_run = ([{"step": s, "rec_loss": 0.5 * 0.9997**s} for s in range(50, 30001, 50)]
                + [{"step": s, "val_psnr": 15 + s / 3000} for s in range(2000, 30001, 2000)])
    plots.plot_curves(long_run, panels, tmp_path / "long.png")

    (short_losses, short_psnr), (long_losses, long_psnr) = [f.axes for f in figures]
    for axes, key, value in ((short_losses, "rec_loss", 0.3), (short_psnr, "val_psnr", 18.0)):
        lines, ticks = curves(axes)
        assert lines[key] == ([30], [value]) and axes.get_lines()[0].get_marker() == "o"
        assert "30" in ticks and len(set(ticks)) == len(ticks)  # not "30 30 30 31 31"
    lines, ticks = curves(long_losses)
    assert len(lines["rec_loss"][0]) == 600 and long_losses.get_yscale() == "log"
    assert 3 <= len(ticks) <= 8 and len(set(ticks)) == len(ticks) and "30,000" in ticks
    assert len(curves(long_psnr)[0]["val_psnr"][0]) == 15


@needs_lpips
def test_tiny_run_lowers_the_reconstruction_loss_and_writes_every_output(dataset, tmp_path,
                                                                         monkeypatch):
    figures = plotted_figures(monkeypatch)
    train(dataset, tmp_path, "--max-steps", "30", "--disc-start", "20", "--log-every", "1",
          "--sample-every", "15")

    records = utils.read_jsonl(tmp_path / "metrics.jsonl")
    training = [r for r in records if "rec_loss" in r]
    validation = [r for r in records if "val_l1" in r]
    assert [r["step"] for r in training] == list(range(1, 31))
    base_keys = {"step", "rec_loss", "perceptual", "codebook", "usage", "perplexity", "lr",
                 "images_per_s"}
    assert all(r.keys() == base_keys for r in training[:20])
    assert all(r.keys() == base_keys | {"generator", "discriminator", "disc_lambda"}
               for r in training[20:])
    assert all(r.keys() == {"step", "val_l1", "val_psnr"} for r in validation)
    assert validation[-1]["step"] == 30
    # L1 + LPIPS lower the loss; the GAN term then pulls away from L1 in so short a run at
    # lr 1e-3 (the loss rises again with either norm_groups), so the window is the one before it
    first = np.mean([r["rec_loss"] for r in training[:5]])
    before_gan = np.mean([r["rec_loss"] for r in training[15:20]])
    assert before_gan < 0.8 * first
    assert all(np.isfinite([r["generator"], r["discriminator"]]).all() for r in training[20:])

    model = load_vqgan(str(tmp_path / "vqgan.pt"))
    assert model.config.n_embed == 32 and model.config.resolution == 32
    # the curves: losses (with validation L1) beside validation PSNR, every point of this short
    # run shown, and step ticks that are distinct whole numbers
    assert Image.open(tmp_path / "loss_curves.png").size == (960, 420)
    losses, psnr = figures[-1].axes
    (loss_lines, loss_ticks), (psnr_lines, psnr_ticks) = curves(losses), curves(psnr)
    assert loss_lines["rec_loss"][0] == list(range(1, 31))
    assert loss_lines["val_l1"] == ([r["step"] for r in validation],
                                    [r["val_l1"] for r in validation])
    assert psnr_lines["val_psnr"] == ([r["step"] for r in validation],
                                      [r["val_psnr"] for r in validation])
    for ticks in (loss_ticks, psnr_ticks):
        assert len(ticks) >= 3 and len(set(ticks)) == len(ticks)
        assert all(text.isdigit() for text in ticks)
    grids = sorted(os.listdir(tmp_path / "samples"))
    assert grids == ["reconstructions_000015.png", "reconstructions_000030.png"]
    # the first validation batch (4 images) over its reconstructions, 32 px cells, 2 px padding
    assert Image.open(tmp_path / "samples" / grids[-1]).size == (4 * 34 + 2, 2 * 34 + 2)
    checkpoint = load_last(tmp_path)
    assert checkpoint["step"] == 30
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_luma_chroma_matrix_is_pils_ycbcr_without_its_offsets():
    """Independent reference: Pillow's RGB -> YCbCr (JPEG's BT.601 matrix, chroma offset 128)."""
    from conditions import RGB_TO_LUMA_CHROMA
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(rgb).convert("YCbCr"), dtype=np.float64)
    ours = rgb.astype(np.float64) @ RGB_TO_LUMA_CHROMA.double().numpy().T + [0, 128, 128]
    assert np.abs(ours - pil).max() < 1.01  # Pillow truncates to integers


@pytest.mark.parametrize("pixel_loss, power", [("l1", 1), ("mse", 2)])
def test_chroma_weight_scales_only_the_colour_part_of_a_photos_error(pixel_loss, power):
    from conditions import Content
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    grey_shift = torch.full_like(target, 0.3)  # the same change in R, G and B: luma only
    rgb = Content(pixel_loss=pixel_loss)  # chroma_weight 0: the RGB channels, taming's loss
    assert rgb.loss(target, target + grey_shift) == pytest.approx(0.3 ** power)
    for weight in (1.0, 5.0):  # a grey error has no chroma: Y = 0.3, Cb = Cr = 0 at any weight
        content = Content(pixel_loss=pixel_loss, chroma_weight=weight)
        assert content.loss(target, target + grey_shift) == pytest.approx(0.3 ** power / 3)
    colour_shift = torch.zeros_like(target)
    colour_shift[:, 0] = 0.4  # more red: Y changes by 0.299 x 0.4, Cb and Cr by -0.169 / 0.5 x 0.4
    luma, cb, cr = 0.299 * 0.4, -0.168736 * 0.4, 0.5 * 0.4
    for weight in (1.0, 5.0):
        content = Content(pixel_loss=pixel_loss, chroma_weight=weight)
        expected = (abs(luma) ** power + abs(weight * cb) ** power + abs(weight * cr) ** power) / 3
        assert content.loss(target, target + colour_shift) == pytest.approx(expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_photo_loss_is_float32_under_autocast(dtype):
    from conditions import Content
    target, reconstruction = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    content = Content(pixel_loss="mse", chroma_weight=5.0)
    with torch.autocast("cpu", dtype=dtype):
        loss = content.loss(target, reconstruction)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(content.loss(target, reconstruction).item(), rel=1e-6)


def test_small_preset_compares_luma_and_weighted_chroma_and_paper_keeps_tamings_l1():
    small, paper = training_vqgan.parse_args([]), training_vqgan.parse_args(["--preset", "paper"])
    assert (small.pixel_loss, small.chroma_weight) == ("mse", 5.0)
    assert (paper.pixel_loss, paper.chroma_weight) == ("l1", 0.0)
    given = training_vqgan.parse_args(["--pixel-loss", "l1", "--chroma-weight", "0"])
    assert (given.pixel_loss, given.chroma_weight) == ("l1", 0.0)
    condition = training_vqgan.parse_args(["--content", "keypoint-images"])
    assert (condition.pixel_loss, condition.chroma_weight) == ("l1", 0.0)


def test_a_photo_loss_flag_with_a_condition_content_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "training_vqgan.py", "--content", "part-maps",
                             "--chroma-weight", "5", "--run-dir", str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    assert result.stderr.strip().splitlines() == [
        "error: --pixel-loss, --chroma-weight: photos only; --content part-maps has its own loss "
        "(conditions.Content.loss)"]


@needs_lpips
def test_bench_times_the_trainers_model_and_its_optimizer_steps(monkeypatch, capsys):
    """bench.py vqgan at 128 px: the small preset's attention on the 32 x 32 token grid, as
    training builds it, and each timed step ends with both Adam steps, as training's do."""
    import argparse
    import bench
    steps = []
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step",
                        lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    bench.main(["vqgan", "--image-size", "128", "--batch-size", "1", "--warmup", "0",
                "--repeats", "1", "--device", "cpu", "--threads", "2", "--precision", "fp32",
                "--lpips-weights", str(LPIPS_WEIGHTS)])
    trained = VQGAN(config_from_args(argparse.Namespace(preset="small", image_size=128)))
    millions = sum(p.numel() for p in trained.parameters()) / 1e6
    assert f"vqgan preset small ({millions:.1f}M params), 128 px" in capsys.readouterr().out
    assert len(steps) == 4  # generator and discriminator, in ours and in the conventional step
