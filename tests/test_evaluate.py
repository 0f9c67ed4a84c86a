"""evaluate.py: each metric against an independent computation on constructed inputs, pose
fidelity with a model that redraws the real images, and the script end to end on a tiny VQGAN
and a 2-step transformer (JSON keys and ranges, bits/token as training computed it, determinism).
"""
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import evaluate
import image_metrics
import mannequins
import plots
import pose_scores
import runs
import utils
import vqgan as vqgan_module
from data import PoseImageDataset, unflipped_batches
from transformer import PoseTransformer, load_transformer
from vqgan import VQGAN, VQGANConfig, save_vqgan

REPO = Path(__file__).resolve().parents[1]
ALEXNET_WEIGHTS = REPO.parent / "shared" / "weights" / "alexnet_features.pth"
TINY_CONFIG = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          z_channels=32, embed_dim=16, n_embed=32, resolution=32)
VAL_FRACTION = "0.25"  # about 10 of the 40 images: enough poses, still fast


# ---- image metrics --------------------------------------------------------------------------


def test_psnr_of_a_constant_offset_is_10_log10_of_one_over_d_squared():
    x = torch.rand(2, 3, 8, 8) * 0.5
    for d in (0.01, 0.1, 0.25):
        assert torch.allclose(utils.psnr(x, x + d), torch.full((2,), 10 * math.log10(1 / d**2)),
                              atol=1e-4)


def test_psnr_of_identical_images_is_capped_not_infinite():
    x = torch.rand(1, 3, 8, 8)
    assert utils.psnr(x, x).item() == pytest.approx(100.0)


def naive_ssim(x, y, size=11, sigma=1.5, c1=0.01**2, c2=0.03**2):
    """SSIM of two (C, H, W) numpy arrays with explicit loops over channels and windows."""
    offsets = np.arange(size) - (size - 1) / 2
    weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    values = []
    for channel in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a, b = x[channel, i:i + size, j:j + size], y[channel, i:i + size, j:j + size]
                mu_a, mu_b = (weights * a).sum(), (weights * b).sum()
                var_a = (weights * (a - mu_a) ** 2).sum()
                var_b = (weights * (b - mu_b) ** 2).sum()
                cov = (weights * (a - mu_a) * (b - mu_b)).sum()
                values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                              / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_naive_loop_over_windows():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 13, 15, generator=generator)
    y = (x + 0.2 * torch.randn(2, 3, 13, 15, generator=generator)).clamp(0, 1)
    expected = [naive_ssim(x[b].double().numpy(), y[b].double().numpy()) for b in range(2)]
    assert image_metrics.ssim(x, y).tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple's MPS")
def test_the_metrics_run_on_apples_mps_which_has_no_float64():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 2, 3, 16, 16, generator=generator)
    figure = torch.rand(2, 16, 16, generator=generator) > 0.5
    on_mps = image_metrics.region_metrics(x.to("mps"), y.to("mps"), figure.to("mps"))
    for key, value in image_metrics.region_metrics(x, y, figure).items():
        assert on_mps[key].tolist() == pytest.approx(value.tolist(), rel=1e-6)
    assert image_metrics.ssim(x.to("mps"), y.to("mps")).tolist() == pytest.approx(
        image_metrics.ssim(x, y).tolist(), rel=1e-6)
    stats = image_metrics.CodebookStats(8)
    stats.update(torch.tensor([0, 1, 1, 2], device="mps"))
    assert stats.perplexity == pytest.approx(2 ** 1.5)


def test_ssim_of_identical_images_is_one():
    x = torch.rand(3, 3, 16, 16)
    assert torch.allclose(image_metrics.ssim(x, x), torch.ones(3))


def test_ssim_of_two_constant_images_has_the_closed_form():
    # no variance: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.3, 0.6, 0.01**2
    x, y = torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b)
    assert image_metrics.ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1),
                                                       rel=1e-5)


def test_ssim_decreases_as_noise_grows():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 4, 4, generator=generator)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear")  # a smooth picture
    noise = torch.randn(x.shape, generator=generator)
    scores = [image_metrics.ssim(x, (x + sigma * noise).clamp(0, 1)).item()
              for sigma in (0.0, 0.02, 0.05, 0.1, 0.3)]
    assert scores[0] == pytest.approx(1.0)
    assert all(later < earlier for earlier, later in zip(scores, scores[1:]))


# sRGB -> CIELAB (D65) reference values as published (e.g. Lindbloom's calculator, EasyRGB)
LAB_REFERENCES = {(255, 0, 0): (53.2408, 80.0925, 67.2032),
                  (0, 255, 0): (87.7347, -86.1827, 83.1793),
                  (0, 0, 255): (32.2970, 79.1875, -107.8602),
                  (255, 255, 0): (97.1393, -21.5537, 94.4780),
                  (128, 128, 128): (53.5850, 0.0, 0.0),
                  (255, 255, 255): (100.0, 0.0, 0.0),
                  (0, 0, 0): (0.0, 0.0, 0.0)}


def test_srgb_to_lab_matches_published_values():
    rgb = torch.tensor(list(LAB_REFERENCES), dtype=torch.float64).T[None, :, :, None] / 255
    lab = image_metrics.srgb_to_lab(rgb)[0, :, :, 0].T  # (7, 3)
    assert torch.allclose(lab, torch.tensor(list(LAB_REFERENCES.values()), dtype=torch.float64),
                          atol=2e-3)


def test_region_metrics_separate_the_figure_from_the_backdrop():
    # an 8 x 8 grey picture whose 2 x 4 "figure" is red; the copy gets the figure green instead
    x = torch.full((1, 3, 8, 8), 128 / 255, dtype=torch.float64)
    figure = torch.zeros(1, 8, 8, dtype=torch.bool)
    figure[0, 2:4, 2:6] = True
    x[0, :, 2:4, 2:6] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    y = x.clone()
    y[0, :, 2:4, 2:6] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    y[0, :, 0, 0] += 0.1  # one backdrop pixel slightly lighter
    out = image_metrics.region_metrics(x, y, figure)
    red, green = np.array(LAB_REFERENCES[255, 0, 0]), np.array(LAB_REFERENCES[0, 255, 0])
    assert out["figure_delta_e"].item() == pytest.approx(np.linalg.norm(red - green), rel=1e-4)
    assert out["figure_psnr_db"].item() == pytest.approx(10 * math.log10(1 / (2 / 3)), rel=1e-4)
    assert out["backdrop_psnr_db"].item() == pytest.approx(10 * math.log10(56 / 0.01), rel=1e-4)
    grey_plus = image_metrics.srgb_to_lab(torch.full((1, 3, 1, 1), 128 / 255 + 0.1))
    grey = image_metrics.srgb_to_lab(torch.full((1, 3, 1, 1), 128 / 255))
    assert out["backdrop_delta_e"].item() == pytest.approx(
        (grey_plus - grey).norm().item() / 56, rel=1e-4)
    # a picture with no figure pixels has no figure numbers (NaN), not zeros
    empty = image_metrics.region_metrics(x, x, torch.zeros_like(figure))
    assert math.isnan(empty["figure_delta_e"].item()) and empty["backdrop_delta_e"].item() == 0


def test_a_split_without_figure_pixels_reports_no_figure_numbers(capsys):
    # part maps that are all background: the figure's numbers are None in the JSON (strict JSON,
    # no NaN) and "n/a" in the table, while the backdrop's are still scored
    torch.manual_seed(0)
    items = [{"image": torch.rand(3, 32, 32) * 2 - 1, "parts": torch.zeros(32, 32, dtype=torch.long)}
             for _ in range(3)]
    metrics, _, _ = evaluate.evaluate_reconstruction(VQGAN(TINY_CONFIG), items, 2,
                                                     torch.device("cpu"))
    assert metrics["figure_psnr_db"] is None and metrics["figure_delta_e"] is None
    assert 0 < metrics["backdrop_psnr_db"] < 100 and 0 < metrics["backdrop_delta_e"] < 200
    json.dumps(metrics, allow_nan=False)
    codes = {"usage": 0.5, "codes_used": 16, "n_embed": 32, "perplexity": 9.0, "histogram": None}
    evaluate.print_table({"split": "val", "dataset_path": "DIR", "num_images": 3,
                          "reconstruction": metrics, "codebook": codes,
                          **{key: {"skipped": "not asked"} for key in
                             ("superres", "transformer", "pose_fidelity", "pose_accuracy")}})
    table = capsys.readouterr().out
    assert f"n/a / {metrics['backdrop_psnr_db']:.2f} dB" in table
    assert f"n/a / {metrics['backdrop_delta_e']:.2f}\n" in table


def test_codebook_summary_of_uniform_use_of_4_of_8_codes():
    counts = torch.tensor([5, 0, 5, 0, 5, 0, 5, 0])
    summary = image_metrics.codebook_summary(counts)
    assert summary["usage"] == 0.5 and summary["codes_used"] == 4 and summary["n_embed"] == 8
    assert summary["perplexity"] == pytest.approx(4.0)


# ---- silhouettes and IoU --------------------------------------------------------------------


def test_iou_of_hand_worked_masks():
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = torch.zeros(4, 4, dtype=torch.bool)
    a[0:2, 0:2] = True  # 4 pixels
    b[1:3, 1:3] = True  # 4 pixels, 1 shared: IoU 1 / 7
    empty = torch.zeros(4, 4, dtype=torch.bool)
    batch = pose_scores.iou(torch.stack([a, a, a, empty]), torch.stack([b, a, empty, empty]))
    assert batch.tolist() == pytest.approx([1 / 7, 1.0, 0.0, 1.0])


def test_silhouette_of_a_rectangle_on_a_plain_background():
    picture = Image.new("RGB", (20, 16), (240, 235, 230))
    ImageDraw.Draw(picture).rectangle([5, 3, 12, 9], fill=(40, 90, 200))  # x 5..12, y 3..9
    image = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255
    expected = torch.zeros(16, 20, dtype=torch.bool)
    expected[3:10, 5:13] = True
    assert torch.equal(pose_scores.silhouette(image), expected)
    faint = Image.new("RGB", (20, 16), (240, 235, 230))
    ImageDraw.Draw(faint).rectangle([5, 3, 12, 9], fill=(230, 225, 220))  # distance 0.068 < 0.2
    faint = torch.from_numpy(np.asarray(faint).copy()).permute(2, 0, 1).float() / 255
    assert not pose_scores.silhouette(faint).any()
    assert torch.equal(pose_scores.silhouette(faint, threshold=0.05), expected)
    # a figure cut by the frame covers a third of the border: the median still finds the backdrop
    cut = Image.new("RGB", (20, 16), (240, 235, 230))
    ImageDraw.Draw(cut).rectangle([0, 3, 12, 15], fill=(40, 90, 200))
    cut = torch.from_numpy(np.asarray(cut).copy()).permute(2, 0, 1).float() / 255
    expected = torch.zeros(16, 20, dtype=torch.bool)
    expected[3:, :13] = True
    assert torch.equal(pose_scores.silhouette(cut), expected)


def test_derangement_moves_every_index_and_depends_only_on_the_seed():
    for n in (2, 3, 10):
        partner = pose_scores.derangement(n, torch.Generator().manual_seed(n))
        assert sorted(partner.tolist()) == list(range(n))
        assert (partner != torch.arange(n)).all()
        assert torch.equal(partner, pose_scores.derangement(n, torch.Generator().manual_seed(n)))


def test_histogram_draws_one_bar_per_used_code_tallest_first(tmp_path):
    path = tmp_path / "codes.png"
    plots.save_code_histogram(torch.tensor([0, 5, 0, 10, 0, 0, 1, 0]), str(path))
    image = np.asarray(Image.open(path).convert("RGB"))
    bar = np.all(image == plots.BAR_COLOUR, axis=-1)  # (H, W)
    columns = bar.any(axis=0)
    starts = np.flatnonzero(columns & ~np.r_[False, columns[:-1]])
    assert len(starts) == 3  # three used codes, drawn next to each other
    heights = [bar[:, start + 5].sum() for start in starts]
    assert heights[0] > heights[1] > heights[2]
    assert heights[1] / heights[0] == pytest.approx(0.5, abs=0.02)
    assert heights[2] / heights[0] == pytest.approx(0.1, abs=0.02)


# ---- pose fidelity with stand-in models -----------------------------------------------------


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mannequins") / "set"
    mannequins.write_dataset(str(folder), count=40, image_size=32, seed=0, workers=1)
    return folder


@pytest.fixture(scope="module")
def val_set(dataset_dir):
    return PoseImageDataset(str(dataset_dir), image_size=32, split="val",
                                  val_fraction=float(VAL_FRACTION), progress=False)


class RedrawingModel:
    """A 'perfect' part-conditioned model: its sample for a pose is the real image of that pose.

    Its tokens are the image's index repeated, and decoding a token row gives that image back.
    """

    condition = "parts"

    def resolve_guidance(self, guidance=None):
        return 1.0

    def __init__(self, dataset):
        self.images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        self.parts = torch.stack([dataset[i]["parts"] for i in range(len(dataset))])

    def eval(self):
        return self

    def condition_tokens(self, batch):
        return batch["parts"].flatten(1)

    def _index(self, rows, table):
        return torch.tensor([next(i for i, known in enumerate(table) if torch.equal(row, known))
                             for row in rows])

    def sample(self, cond, generator=None, **options):
        return self._index(cond, self.parts.flatten(1))[:, None].repeat(1, 4)

    def image_tokens(self, images):  # a picture it has not seen (another person) joins its table
        for image in images:
            if not any(torch.equal(image, known) for known in self.images):
                self.images = torch.cat([self.images, image[None]])
        return self._index(images, self.images)[:, None].repeat(1, 4)

    def decode(self, tokens):
        return self.images[tokens[:, 0]]


def test_silhouettes_of_real_mannequins_match_their_part_maps(val_set):
    images = torch.stack([val_set[i]["image"] for i in range(len(val_set))])
    truth = torch.stack([val_set[i]["parts"] for i in range(len(val_set))]) > 0
    scores = pose_scores.iou(pose_scores.silhouette(utils.denormalize(images)), truth)
    assert scores.min() > 0.65 and scores.mean() > 0.75  # edges only: see the module docstring


def test_a_model_that_redraws_the_real_image_scores_the_ceiling_far_above_the_floor(val_set):
    poses = pose_scores.generate_pose_samples(RedrawingModel(val_set), val_set, num_poses=8,
                                           batch_size=3, device=torch.device("cpu"))
    result = pose_scores.evaluate_pose_fidelity(poses)
    assert result["num_poses"] == 8
    assert result["sample_iou"] == result["ceiling_iou"] == result["real_iou"]
    assert result["sample_over_ceiling"] == 1.0
    assert result["floor_iou"] < 0.6 * result["sample_iou"]
    assert result["sample_over_floor"] == pytest.approx(result["sample_iou"] / result["floor_iou"])


def test_pose_fidelity_is_skipped_where_the_real_images_have_busy_backgrounds(val_set):
    """Photos with part maps (e.g. DensePose's) have no plain backdrop: the border-median
    silhouette then takes the whole picture, and a pose-ignoring sampler would score as well
    as a perfect one. The real images' own IoU shows it, and the section is skipped."""
    poses = pose_scores.generate_pose_samples(RedrawingModel(val_set), val_set, num_poses=8,
                                              batch_size=3, device=torch.device("cpu"))
    assert "skipped" not in pose_scores.evaluate_pose_fidelity(poses)  # plain backdrops
    texture = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    backdrop = torch.nn.functional.interpolate(texture, size=32, mode="bicubic").clamp(-1, 1)
    poses.real = torch.where(poses.parts[:, None] > 0, poses.real, backdrop)
    poses.samples = poses.reconstructions = poses.real
    result = pose_scores.evaluate_pose_fidelity(poses)
    assert "backgrounds are not plain" in result["skipped"]


def test_another_person_in_the_same_pose_is_scored_as_the_best_a_sampler_can_do(val_set):
    """Mannequin sets are redrawn as other people in each pose (another build, clothes and
    backdrop at the same keypoints); through a perfect tokenizer they score what the renderer's
    own pictures of them score, a little below the real images (bodies differ in width)."""
    class KeypointModel(RedrawingModel):
        condition = "keypoints"  # a part map fixes the silhouette: no other person for "parts"

    poses = pose_scores.generate_pose_samples(KeypointModel(val_set), val_set, num_poses=8,
                                              batch_size=3, device=torch.device("cpu"), seed=1)
    result = pose_scores.evaluate_pose_fidelity(poses)
    truth = torch.stack([val_set[i]["parts"] for i in range(8)]) > 0
    redrawn = []
    for i in range(8):
        index = int(os.path.splitext(os.path.basename(val_set.examples[i].name))[0])
        image, keypoints, _ = mannequins.render_mannequin(
            np.random.default_rng([0, index]), 32, restyle=np.random.default_rng([1, 1, index]))
        # the very joints of the pose it stands in
        np.testing.assert_allclose(keypoints[:, :2], val_set[i]["keypoints"][:, :2], atol=0.01)
        redrawn.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert not torch.equal(utils.from_uint8(torch.stack(redrawn)), poses.real[:8])
    expected = pose_scores.iou(pose_scores.silhouette(torch.stack(redrawn) / 255), truth).mean()
    assert result["other_person_iou"] == pytest.approx(expected.item(), abs=1e-6)
    assert 0.8 * result["real_iou"] < result["other_person_iou"] < result["real_iou"]
    assert result["other_person_over_ceiling"] == pytest.approx(
        result["other_person_iou"] / result["ceiling_iou"])
    parts_model = pose_scores.generate_pose_samples(RedrawingModel(val_set), val_set, 4, 4, "cpu")
    assert parts_model.other_person is None
    batch = next(iter(unflipped_batches(val_set, 4)))
    assert pose_scores.other_people(val_set, batch, 0) is not None
    assert pose_scores.other_people(val_set, batch, -1) is not None  # evaluate.py --seed -1
    converted = dict(batch, keypoints=torch.cat([batch["keypoints"]] * 2, dim=1))
    assert pose_scores.other_people(val_set, converted, 0) is None  # poses in another layout
    batch["keypoints"][0, 0, 0] += 1  # a set whose poses were edited: no longer the renderer's
    assert pose_scores.other_people(val_set, batch, 0) is None


def test_pose_samples_and_reconstructions_are_clamped_to_the_pictures_range(val_set):
    """A decoder can overshoot [-1, 1]: the detector and the silhouettes score the picture a
    user gets, clamped, as the reconstruction metrics do (they saw the raw values)."""
    class Overshooting(RedrawingModel):
        def decode(self, tokens):
            return 1.5 * super().decode(tokens)

    poses = pose_scores.generate_pose_samples(Overshooting(val_set), val_set, num_poses=4,
                                              batch_size=4, device=torch.device("cpu"))
    assert (1.5 * poses.real).max() > 1.2  # the light backdrops overshoot
    for pictures in (poses.samples, poses.reconstructions):
        torch.testing.assert_close(pictures, (1.5 * poses.real).clamp(-1, 1))


def test_pose_samples_are_skipped_without_a_pose_or_two_poses(val_set):
    unconditional = SimpleNamespace(condition="none")
    assert "no pose" in pose_scores.pose_sampling_skip_reason(unconditional, 4, val_set)
    assert "at least 2" in pose_scores.pose_sampling_skip_reason(RedrawingModel(val_set), 1,
                                                                 val_set)
    assert pose_scores.pose_sampling_skip_reason(RedrawingModel(val_set), 4, val_set) is None


# ---- the script end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(dataset_dir, tmp_path_factory, train_tiny_transformer):
    """A tiny untrained VQGAN and a keypoint transformer trained for 2 steps on it."""
    folder = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    vqgan_path = folder / "vqgan.pt"
    save_vqgan(VQGAN(TINY_CONFIG), str(vqgan_path))
    run_dir = folder / "transformer"
    train_tiny_transformer(dataset_dir, vqgan_path, run_dir, 32, "--val-fraction", VAL_FRACTION,
                           "--batch-size", "8", "--max-steps", "2", "--warmup-steps", "1",
                           "--grid-examples", "1")
    return SimpleNamespace(vqgan=vqgan_path, transformer=run_dir / "transformer_last.pt",
                           metrics=run_dir / "metrics.jsonl", folder=folder)


def evaluate_args(trained, dataset_dir, json_path):
    lpips = (["--lpips-weights", str(ALEXNET_WEIGHTS)] if ALEXNET_WEIGHTS.is_file()
             else ["--no-lpips"])
    return ["--vqgan-checkpoint", str(trained.vqgan),
            "--transformer-checkpoint", str(trained.transformer),
            "--dataset-path", str(dataset_dir), "--val-fraction", VAL_FRACTION,
            "--json", str(json_path), "--batch-size", "4", "--num-pose-samples", "4",
            "--num-workers", "0", "--device", "cpu", "--seed", "3", *lpips]


@pytest.fixture(scope="module")
def report(trained, dataset_dir):
    json_path = trained.folder / "eval" / "eval.json"
    evaluate.main(evaluate_args(trained, dataset_dir, json_path))
    return json_path


@pytest.mark.skipif(not ALEXNET_WEIGHTS.is_file(), reason="needs ../shared/weights")
def test_pictures_too_small_for_alexnet_are_scored_without_lpips(mannequin_set, tmp_path,
                                                                capsys):
    """AlexNet's pools shrink pictures under 31 px to nothing; stage 1 (VGG16) trains there."""
    config = vqgan_module.VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                      attn_resolutions=(), z_channels=32, embed_dim=16,
                                      n_embed=32, resolution=24)
    save_vqgan(VQGAN(config), str(tmp_path / "vqgan.pt"))
    results = evaluate.main(["--vqgan-checkpoint", str(tmp_path / "vqgan.pt"), "--dataset-path",
                             str(mannequin_set(40, 24)), "--lpips-weights", str(ALEXNET_WEIGHTS),
                             "--num-workers", "0", "--device", "cpu"])
    assert results["reconstruction"]["lpips_alex"] is None
    assert 0 < results["reconstruction"]["psnr_db"] < 100
    assert "LPIPS (alex) needs pictures of at least 31 px; left out at 24 px" in (
        capsys.readouterr().err)


def test_json_has_the_documented_keys_in_sane_ranges(report, val_set):
    results = json.loads(report.read_text())
    assert results["split"] == "val" and results["num_images"] == len(val_set)
    assert results["image_size"] == 32  # taken from the VQGAN
    rec = results["reconstruction"]
    assert set(rec) == {"psnr_db", "ssim", "lpips_alex", "l1", "figure_psnr_db",
                        "backdrop_psnr_db", "figure_delta_e", "backdrop_delta_e"}
    assert 0 < rec["figure_psnr_db"] < 100 and 0 < rec["backdrop_psnr_db"] < 100
    assert 0 < rec["figure_delta_e"] < 100 and 0 < rec["backdrop_delta_e"] < 100
    assert 0 < rec["psnr_db"] < 100 and -1 < rec["ssim"] <= 1 and 0 < rec["l1"] <= 2
    if ALEXNET_WEIGHTS.is_file():
        assert 0 < rec["lpips_alex"] < 2
    codes = results["codebook"]
    assert len(codes["counts"]) == codes["n_embed"] == 32
    assert sum(codes["counts"]) == len(val_set) * 16 * 16
    assert codes["codes_used"] == sum(c > 0 for c in codes["counts"])
    assert codes["usage"] == codes["codes_used"] / 32
    assert 1 <= codes["perplexity"] <= codes["codes_used"]
    assert Path(codes["histogram"]) == report.parent / "eval_codes.png"
    assert Image.open(codes["histogram"]).size == (720, 360)
    transformer = results["transformer"]
    assert transformer["condition"] == "keypoints" and transformer["tokens_per_image"] == 256
    assert 0 < transformer["bits_per_token"] < 10  # log2(32) = 5 for a uniform guess
    assert transformer["bits_per_image"] == pytest.approx(256 * transformer["bits_per_token"])
    pose = results["pose_fidelity"]
    assert pose["num_poses"] == 4 and pose["threshold"] == pose_scores.SILHOUETTE_THRESHOLD
    for key in ("sample_iou", "ceiling_iou", "floor_iou", "real_iou"):
        assert 0 <= pose[key] <= 1
    assert pose["real_iou"] > 0.7 and 0 < pose["other_person_iou"] <= 1  # a mannequin set
    assert pose["sample_over_ceiling"] == pytest.approx(pose["sample_iou"] / pose["ceiling_iou"])


def test_reported_numbers_equal_a_direct_computation(report, trained, val_set):
    results = json.loads(report.read_text())
    model, _ = load_transformer(str(trained.transformer), "cpu", str(trained.vqgan))
    images = torch.stack([val_set[i]["image"] for i in range(len(val_set))])
    keypoints = torch.stack([val_set[i]["keypoints"] for i in range(len(val_set))])
    with torch.no_grad():
        reconstructions, _, indices = model.vqgan(images)
        tokens = indices.flatten(1)
        cond = model.condition_tokens(keypoints=keypoints)
        P = cond.shape[1]
        logits = model.gpt_forward(torch.cat([cond, tokens[:, :-1]], dim=1))[:, P - 1:]
    nats = -logits.log_softmax(-1).gather(-1, tokens[..., None]).mean().item()
    assert results["transformer"]["bits_per_token"] == pytest.approx(nats / math.log(2), rel=1e-5)
    # ... and training's own validation of the same checkpoint
    logged = [r["val_bits_per_token"] for r in utils.read_jsonl(trained.metrics)
              if "val_bits_per_token" in r]
    assert results["transformer"]["bits_per_token"] == pytest.approx(logged[-1], rel=1e-5)
    assert results["codebook"]["counts"] == torch.bincount(tokens.flatten(), minlength=32).tolist()
    x = images.numpy().astype(np.float64)
    y = reconstructions.clamp(-1, 1).numpy().astype(np.float64)
    mse = (((x + 1) / 2 - (y + 1) / 2) ** 2).reshape(len(x), -1).mean(axis=1)
    rec = results["reconstruction"]
    assert rec["psnr_db"] == pytest.approx(np.mean(10 * np.log10(1 / mse)), rel=1e-4)
    assert rec["l1"] == pytest.approx(np.abs(x - y).mean(), rel=1e-4)
    parts = torch.stack([val_set[i]["parts"] for i in range(len(val_set))]).numpy()
    figure = parts > 0  # (N, H, W)
    per_pixel_mse = (((x + 1) / 2 - (y + 1) / 2) ** 2).mean(axis=1)  # (N, H, W)
    figure_psnr = [10 * np.log10(1 / m[f].mean()) for m, f in zip(per_pixel_mse, figure)]
    backdrop_psnr = [10 * np.log10(1 / m[~f].mean()) for m, f in zip(per_pixel_mse, figure)]
    assert rec["figure_psnr_db"] == pytest.approx(np.mean(figure_psnr), rel=1e-4)
    assert rec["backdrop_psnr_db"] == pytest.approx(np.mean(backdrop_psnr), rel=1e-4)


def test_one_encoding_gives_the_histogram_the_reconstructions_and_the_bits_per_token(
        trained, dataset_dir, val_set, tmp_path, monkeypatch):
    """On a GPU the encoder runs under autocast, which can pick other codes than float32: the
    histogram must count the very tokens whose likelihood is reported. A bf16 automatic
    precision for VQGAN.image_tokens plays that GPU here; each image is encoded once."""
    encoded, scored = [], []
    real_tokens, real_forward = VQGAN.image_tokens, PoseTransformer.forward

    def bf16_tokens(vqgan, images):
        tokens = real_tokens(vqgan, images)
        encoded.append(tokens.flatten(1))
        return tokens

    def watched_forward(model, cond, tokens, *args, **kwargs):
        scored.append(tokens)
        return real_forward(model, cond, tokens, *args, **kwargs)

    monkeypatch.setattr(VQGAN, "image_tokens", bf16_tokens)
    monkeypatch.setattr(vqgan_module, "autocast_context",
                        lambda device: torch.autocast(device.type, dtype=torch.bfloat16))
    monkeypatch.setattr(PoseTransformer, "forward", watched_forward)
    results = evaluate.main(evaluate_args(trained, dataset_dir, tmp_path / "eval.json")
                            + ["--num-pose-samples", "1"])
    tokens = torch.cat(encoded)  # (N, 256)
    assert len(tokens) == len(val_set) == results["num_images"]  # each image once
    assert torch.equal(torch.cat(scored), tokens)
    assert results["codebook"]["counts"] == torch.bincount(tokens.flatten(),
                                                           minlength=32).tolist()
    images = torch.stack([val_set[i]["image"] for i in range(len(val_set))])
    vqgan = load_transformer(str(trained.transformer), "cpu", str(trained.vqgan))[0].vqgan
    with torch.no_grad():
        float32_tokens = vqgan.encode(images)[2].flatten(1)
    assert not torch.equal(float32_tokens, tokens), "bf16 should pick some other codes here"


def test_data_flags_not_given_are_the_transformer_runs_own(trained, dataset_dir, val_set,
                                                           tmp_path, capsys):
    """The run held out --val-fraction 0.25 of dataset_dir: without data flags evaluate.py
    scores that very split (it scored the default 5 % of the default mannequins)."""
    argv = evaluate_args(trained, dataset_dir, tmp_path / "eval.json")
    for flag in ("--dataset-path", "--val-fraction"):
        del argv[argv.index(flag):argv.index(flag) + 2]
    results = evaluate.main(argv + ["--num-pose-samples", "1"])
    assert results["dataset_path"] == str(dataset_dir) and results["num_images"] == len(val_set)
    assert "warning" not in capsys.readouterr().err


def test_given_data_flags_win_with_a_warning_where_they_differ_from_the_runs(capsys):
    args = evaluate.parse_args(["--vqgan-checkpoint", "v.pt", "--val-fraction", "0.5",
                                "--resize-mode", "crop"])
    runs.take_run_data_flags(args, {"dataset_path": "D", "val_fraction": 0.25,
                                    "resize_mode": "crop"}, args.data_defaults)
    assert (args.dataset_path, args.val_fraction, args.resize_mode) == ("D", 0.5, "crop")
    assert (args.pose_layout, args.part_labels) == ("auto", "mannequin")  # the defaults
    warning = capsys.readouterr().err
    assert "trained with --val-fraction 0.25;" in warning and "resize" not in warning


def test_two_runs_write_identical_json(report, trained, dataset_dir):
    first = report.read_text()
    evaluate.main(evaluate_args(trained, dataset_dir, report))
    assert report.read_text() == first


def test_bad_checkpoints_stop_with_one_line(trained, tmp_path, capsys):
    for argv, expected in (
            (["--vqgan-checkpoint", str(tmp_path / "missing.pt")], "does not exist"),
            (["--vqgan-checkpoint", str(trained.transformer)], "stage-2 training checkpoint"),
            (["--vqgan-checkpoint", str(trained.vqgan), "--transformer-checkpoint",
              str(trained.vqgan)], "stage-1 inference checkpoint")):
        with pytest.raises(SystemExit) as stopped:
            utils.run_cli(lambda: evaluate.main(argv))
        assert stopped.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


def test_an_image_size_other_than_the_vqgans_is_refused(trained):
    with pytest.raises(utils.UserError, match="--image-size 32"):
        evaluate.main(["--vqgan-checkpoint", str(trained.vqgan), "--image-size", "64"])
