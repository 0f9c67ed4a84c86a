"""Evaluate a trained VQGAN (and optionally its pose transformer) on one split of the data.

    python evaluate.py --vqgan-checkpoint runs/vqgan/vqgan.pt
    python evaluate.py --vqgan-checkpoint runs/vqgan/vqgan.pt \
        --transformer-checkpoint runs/transformer/transformer_last.pt --json runs/eval.json

The data flags are the trainers' (utils.add_data_args): without --dataset-path it reads the
synthetic mannequins; --image-size defaults to the VQGAN's resolution. Prints a table and, with
--json OUT, writes the same numbers (keys in `main`) plus a code-frequency histogram
OUT_codes.png (or --histogram PNG). Everything is seeded: two runs with the same flags, batch
size and device give identical numbers. Images are encoded once, by VQGAN.image_tokens (under the
device's automatic precision, as the token cache and sample.py encode them): the code histogram
counts those tokens, the reconstructions decode them and the transformer scores them. Metrics
are computed in float32 without autocast.

Reconstruction (images through encoder -> codebook -> decoder, clamped to [-1, 1] like a saved
picture), averaged over the images of the split:
  PSNR   10 log10(1 / MSE) per image in [0, 1] space (MSE floored at 1e-10, i.e. at most 100 dB);
  SSIM   Wang et al. 2004: 11 x 11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range 1,
         over every position where the window fits ('valid', no padding), per channel, averaged;
         (their reference script also downsamples images above 256 px first; we do not);
  LPIPS  Zhang et al. 2018 v0.1 with the AlexNet trunk, the usual choice for reporting (the
         training loss uses VGG16); --no-lpips leaves it out;
  L1     mean absolute difference in [-1, 1] space.
On data with part maps (the mannequins) the same numbers are also split by region, because a
figure covers only about a tenth of a mannequin picture and a whole-image mean hides what
happens to the person: the figure is every pixel with a part label > 0, the backdrop the rest.
  figure / backdrop PSNR     the PSNR of the MSE over that region's pixels of each image;
  figure / backdrop colour   CIE76 colour difference: the mean over the region's pixels of the
                             Euclidean distance in CIELAB (sRGB, D65 white) between picture and
                             reconstruction. About 2.3 is a just-noticeable difference; above
                             about 10 two colours read as different colours.
Codebook: the fraction of codes used on the split and the perplexity exp(entropy) of their
frequencies (codebook.CodebookStats); the histogram draws code frequencies sorted from the most
to the least used, so collapse shows as a short head and a long flat tail.

Transformer: negative log-likelihood of the split's image tokens (unflipped) under the model's
own condition prefixes (keypoints, part maps or the start token), in bits per token (the number
training logs as val_bits_per_token) and per image (bits per token x tokens per image).

Pose fidelity (keypoint- or part-conditioned transformers, data with part maps): for each of the
first --num-pose-samples poses P of the split, sample an image for P and compare its silhouette
with the one the renderer drew for P (part map > 0) by IoU. A silhouette is every pixel whose
RGB colour lies more than --silhouette-threshold (default 0.2, Euclidean distance in [0, 1] RGB,
about 30/255 per channel) from the background colour, estimated as the median of the image's
border pixels. On 300 mannequins at 64 px, 0.2 misses no body pixel (9 of 38,000 at 32 px);
what it adds are antialiased edge pixels that the part map gives to the background, so even the
real images score below 1 (about 0.80 at 32 px, 0.85 at 64 px; reported as `real_iou`). Beside
the samples' IoU:
  ceiling  the VQGAN reconstruction of the real image, scored the same way: a sample cannot be
           expected to follow the pose better than the tokenizer can draw it;
  floor    the same samples scored against an unrelated pose's silhouette (a fixed, seeded
           derangement of the poses): what any person-shaped picture gets by chance.
A pose-following model has samples/ceiling near 1 and samples/floor well above 1.

Real photographs have no part maps and busy backgrounds, so pose fidelity is skipped there (with
a note). Pose accuracy needs only keypoints:

Pose accuracy (PCK, as pose-guided person generation papers report it; data with keypoints and
a keypoint- or part-conditioned transformer): the project's own keypoint detector
(pose_detector.py, trained on the training split) runs on the very samples the pose fidelity
scores, and a joint of the conditioning pose counts as found when the detection lies within
--pck-alpha (default 0.1) x the larger side of the pose's keypoint bounding box: about 4 px for
a 64 px mannequin. That size needs nothing but the pose itself, so it works for any layout
(COCO-17 has no head segment for PCKh, and a torso size is undefined when a hip is not
labelled). Reported over all labelled joints and per group (head, arms, legs), beside:
  ceiling          the detector on the real images of those poses: how well it can read a pose;
  reconstructions  the detector on their VQGAN reconstructions: what the tokenizer keeps;
  floor            the samples scored against the deranged poses the silhouette floor uses.
The detector is pose_detector.pt beside the transformer checkpoint (or --pose-detector PATH);
--train-pose-detector trains it first, unless the file already holds one trained on this data
with these settings (about 3.5 CPU minutes on the default mannequins). A file trained on other
data (another folder, image size, layout or split) is refused, never silently reused.

    python evaluate.py --vqgan-checkpoint runs/vqgan/vqgan.pt \
        --transformer-checkpoint runs/transformer/transformer_last.pt --train-pose-detector
"""
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import pose_detector
import utils
from codebook import CodebookStats
from lpips_loss import LPIPSLoss
from transformer import load_transformer
from vqgan import load_vqgan

SILHOUETTE_THRESHOLD = 0.2  # RGB distance in [0, 1] units from the border's median colour
BAR_COLOUR = (31, 119, 180)  # the histogram's bars: the blue of the loss curves' first line


# ----------------------------------------------------------------------------------------------
# Image metrics: pure functions of image batches (B, C, H, W) in [0, 1]
# ----------------------------------------------------------------------------------------------


def gaussian_window(size=11, sigma=1.5):
    """(size, size) Gaussian weights summing to 1."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-offsets**2 / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x, y, data_range=1.0, window_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity (Wang et al. 2004) per image, (B, C, H, W) -> (B,).

    Local means, variances and covariance come from a Gaussian window at every position where it
    fits inside the image; the SSIM map is averaged over positions and channels.
    """
    B, C, H, W = x.shape
    if min(H, W) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size} px, got {H}x{W}")
    x, y = x.double(), y.double()
    window = gaussian_window(window_size, sigma).to(x.device).expand(C, 1, -1, -1)

    def local_mean(t):  # depthwise: each channel filtered on its own
        return F.conv2d(t, window, groups=C)  # (B, C, H - ws + 1, W - ws + 1)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
                / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))
    return ssim_map.flatten(1).mean(dim=1).float()


# sRGB (D65) -> CIE XYZ, IEC 61966-2-1; XYZ of the D65 white point with Y = 1
SRGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def srgb_to_lab(images):
    """CIELAB (L*, a*, b*) of sRGB pictures: (B, 3, H, W) in [0, 1] -> (B, 3, H, W), float64."""
    rgb = images.double().clamp(0, 1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,bjhw->bihw", SRGB_TO_XYZ.to(rgb.device), linear)
    t = xyz / D65_WHITE.to(rgb.device)[:, None, None]
    epsilon = (6 / 29) ** 3  # below it the cube root is replaced by its tangent line
    f = torch.where(t > epsilon, t.clamp_min(epsilon) ** (1 / 3), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]),
                        200 * (f[:, 1] - f[:, 2])], dim=1)


def region_metrics(x, y, figure):
    """PSNR and mean CIE76 difference over the figure's and the backdrop's pixels of each image.

    x, y (B, 3, H, W) in [0, 1]; figure (B, H, W) bool. -> dict of (B,) tensors; an image whose
    region is empty gets NaN there (callers average with nanmean).
    """
    delta_e = (srgb_to_lab(x) - srgb_to_lab(y)).norm(dim=1)  # (B, H, W)
    squared = (x.double() - y.double()).pow(2).mean(dim=1)  # (B, H, W), per-pixel MSE
    out = {}
    for name, mask in (("figure", figure), ("backdrop", ~figure)):
        pixels = mask.flatten(1).sum(1).double()  # (B,)
        empty = pixels == 0
        pixels = pixels.clamp_min(1)
        mse = (squared * mask).flatten(1).sum(1) / pixels
        psnr = 10 * torch.log10(1 / mse.clamp_min(1e-10))
        colour = (delta_e * mask).flatten(1).sum(1) / pixels
        out[f"{name}_psnr_db"] = torch.where(empty, torch.nan, psnr).float()
        out[f"{name}_delta_e"] = torch.where(empty, torch.nan, colour).float()
    return out


def codebook_summary(counts):
    """A histogram of code indices (n_embed,) -> codes used, usage and perplexity."""
    stats = CodebookStats(len(counts))
    stats.counts = counts.cpu().long()
    return {"n_embed": len(counts), "codes_used": int((stats.counts > 0).sum()),
            "usage": stats.usage, "perplexity": stats.perplexity}


def silhouette(images, threshold=SILHOUETTE_THRESHOLD):
    """Foreground masks of pictures on a plain background: (..., 3, H, W) in [0, 1] -> (..., H, W).

    The background colour is the per-channel median of the border pixels; a pixel is foreground
    when its RGB distance to it is above `threshold`.
    """
    border = torch.cat([images[..., 0, :], images[..., -1, :],
                        images[..., :, 0], images[..., :, -1]], dim=-1)  # (..., 3, 4S)
    background = border.median(dim=-1).values  # (..., 3)
    distance = (images - background[..., None, None]).norm(dim=-3)  # (..., H, W)
    return distance > threshold


def iou(mask_a, mask_b):
    """Intersection over union of boolean masks (..., H, W) -> (...); two empty masks score 1."""
    intersection = (mask_a & mask_b).sum(dim=(-2, -1)).float()
    union = (mask_a | mask_b).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def derangement(n, generator):
    """A random permutation with no fixed point (one n-cycle), n >= 2: partner[i] != i."""
    order = torch.randperm(n, generator=generator)
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)  # order[i] -> order[i + 1], around the cycle
    return partner


def save_code_histogram(counts, path, title="", size=(720, 360)):
    """Bar chart PNG of code frequencies, sorted from the most to the least used code."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    frequencies = counts.double() / max(1, int(counts.sum()))
    frequencies = frequencies.sort(descending=True).values.tolist()
    peak = max(max(frequencies), 1e-12)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / len(frequencies)
    gap = 1 if bar_w >= 3 else 0  # wide bars stand apart; a thousand codes fill the plot
    for i, frequency in enumerate(frequencies):
        if frequency == 0:
            break  # sorted: the rest are unused
        x0 = left + i * bar_w
        x1 = max(x0, x0 + bar_w - 1 - gap)
        y0 = height - bottom - frequency / peak * plot_h
        draw.rectangle([x0, y0, x1, height - bottom], fill=BAR_COLOUR)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for fraction in (0.0, 0.5, 1.0):
        y = height - bottom - fraction * plot_h
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{fraction * peak:.3g}", fill="black")
    draw.text((left, height - bottom + 8), f"{len(frequencies)} codes, most used first "
              "(y: fraction of tokens)", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)


# ----------------------------------------------------------------------------------------------
# The evaluations
# ----------------------------------------------------------------------------------------------


def batches(dataset, batch_size, num_workers=0, count=None):
    """Unflipped items of `dataset` in order (the first `count` of them), batched."""
    items = range(len(dataset) if count is None else min(count, len(dataset)))
    subset = torch.utils.data.Subset(dataset, list(items))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers)


@torch.no_grad()
def evaluate_reconstruction(vqgan, dataset, batch_size, device, lpips=None, num_workers=0):
    """PSNR, SSIM, LPIPS (when `lpips` is given) and L1 of VQGAN reconstructions, the figure's
    and the backdrop's PSNR and colour error (data with part maps), and the histogram of codes
    the split's images are encoded with. Returns (metrics dict, counts, tokens (N, h * w) of the
    split's images in order, for evaluate_transformer)."""
    vqgan.eval()
    sums = {"psnr_db": 0.0, "ssim": 0.0, "lpips_alex": 0.0, "l1": 0.0}
    regions = {}  # region metric -> list of (B,) tensors
    stats = CodebookStats(vqgan.config.n_embed)
    tokens = []
    for batch in tqdm(batches(dataset, batch_size, num_workers), desc="reconstruction",
                      leave=False):
        images = batch["image"].to(device)  # (B, 3, H, W) in [-1, 1]
        indices = vqgan.image_tokens(images)  # (B, h, w): the one encoding
        reconstructions = vqgan.decode_indices(indices).float().clamp(-1, 1)  # float32
        stats.update(indices)
        tokens.append(indices.flatten(1).cpu())
        x, y = utils.denormalize(images), utils.denormalize(reconstructions)
        sums["psnr_db"] += utils.psnr(x, y).sum().item()
        sums["ssim"] += ssim(x, y).sum().item()
        sums["l1"] += (images - reconstructions).abs().flatten(1).mean(dim=1).sum().item()
        if lpips is not None:
            sums["lpips_alex"] += lpips(images, reconstructions, per_sample=True).sum().item()
        if "parts" in batch:
            for key, values in region_metrics(x, y, batch["parts"].to(device) > 0).items():
                regions.setdefault(key, []).append(values.cpu())
    metrics = {key: value / len(dataset) for key, value in sums.items()}
    if lpips is None:
        metrics["lpips_alex"] = None
    for key in ("figure_psnr_db", "backdrop_psnr_db", "figure_delta_e", "backdrop_delta_e"):
        metrics[key] = torch.cat(regions[key]).nanmean().item() if regions else None
    return metrics, stats.counts.cpu(), torch.cat(tokens)


@torch.no_grad()
def condition_of(model, batch, device):
    """The model's condition prefix (B, P) for a batch of dataset items."""
    keypoints, parts, labels = batch.get("keypoints"), batch.get("parts"), batch.get("label")
    return model.condition_tokens(
        keypoints=None if keypoints is None else keypoints.to(device),
        part_maps=None if parts is None else parts.to(device),
        labels=None if labels is None else labels.to(device),
        batch_size=len(batch["image"]))


@torch.no_grad()
def evaluate_transformer(model, dataset, tokens, batch_size, device, num_workers=0):
    """Negative log-likelihood of the split's image tokens (N, L), as evaluate_reconstruction
    encoded them, in bits per token and per image."""
    model.eval()
    total_nats, total_tokens = 0.0, 0
    for start, batch in zip(range(0, len(dataset), batch_size), tqdm(
            batches(dataset, batch_size, num_workers), desc="transformer NLL", leave=False)):
        batch_tokens = tokens[start:start + batch_size].to(device)  # (B, L)
        logits, _ = model(condition_of(model, batch, device), batch_tokens)  # (B, L, n_embed)
        total_nats += F.cross_entropy(logits.float().flatten(0, 1), batch_tokens.flatten(),
                                      reduction="sum").item()
        total_tokens += batch_tokens.numel()
    bits_per_token = total_nats / total_tokens / math.log(2)
    return {"condition": model.condition, "tokens_per_image": model.num_image_tokens,
            "bits_per_token": bits_per_token,
            "bits_per_image": bits_per_token * model.num_image_tokens}


@dataclass
class PoseSamples:
    """One sample for each of the first N poses of a split, and what it is scored against; the
    silhouette IoU and the PCK both score this one set."""

    condition: str
    samples: torch.Tensor  # (N, 3, S, S) in [-1, 1]
    reconstructions: torch.Tensor  # (N, 3, S, S): the real images through tokens and decoder
    real: torch.Tensor  # (N, 3, S, S)
    keypoints: torch.Tensor  # (N, K, 3), or None when the data has no poses
    parts: torch.Tensor  # (N, S, S) part labels, or None when the data has no part maps
    partner: torch.Tensor  # (N,) a derangement: the unrelated pose each sample is floored with
    sampling: dict


def pose_sampling_skip_reason(model, num_poses, dataset):
    """Why samples for the split's poses cannot be scored, or None when they can."""
    if model.condition in ("none", "class"):
        return f"the transformer is conditioned on {model.condition}; there is no pose to follow"
    count = min(num_poses, len(dataset))
    if count < 2:
        return f"needs at least 2 poses for the floor, got {count}"
    return None


@torch.no_grad()
def generate_pose_samples(model, dataset, num_poses, batch_size, device, seed=0, top_k=None,
                          top_p=None, temperature=1.0):
    """Sample one image for each of the first `num_poses` poses of `dataset` (seeded)."""
    count = min(num_poses, len(dataset))
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    pictures = {"samples": [], "reconstructions": [], "real": [], "keypoints": [], "parts": []}
    for batch in tqdm(batches(dataset, batch_size, count=count), desc="pose samples",
                      leave=False):
        images = batch["image"].to(device)
        tokens = model.sample(condition_of(model, batch, device), top_k=top_k, top_p=top_p,
                              temperature=temperature, generator=generator)
        pictures["samples"].append(model.decode(tokens).float().cpu())
        # through tokens like the samples, so that both are drawn by the very same decoder path
        pictures["reconstructions"].append(model.decode(model.image_tokens(images)).float().cpu())
        pictures["real"].append(batch["image"])
        for key in ("keypoints", "parts"):
            if key in batch:
                pictures[key].append(batch[key])
    stacked = {key: torch.cat(chunks) if chunks else None for key, chunks in pictures.items()}
    return PoseSamples(condition=model.condition, **stacked,
                       partner=derangement(count, torch.Generator().manual_seed(seed)),
                       sampling={"top_k": top_k, "top_p": top_p, "temperature": temperature,
                                 "seed": seed})


def evaluate_pose_fidelity(poses, threshold=SILHOUETTE_THRESHOLD):
    """Silhouette IoU of the samples against the rendered silhouettes of their poses (part maps),
    with the reconstruction ceiling and the deranged-pose floor (see the module docstring)."""
    samples, reconstructions, real = (silhouette(utils.denormalize(pictures), threshold)
                                      for pictures in (poses.samples, poses.reconstructions,
                                                       poses.real))
    truth = poses.parts > 0
    sample_iou = iou(samples, truth).mean().item()
    ceiling_iou = iou(reconstructions, truth).mean().item()
    floor_iou = iou(samples, truth[poses.partner]).mean().item()
    return {"condition": poses.condition, "num_poses": len(samples), "threshold": threshold,
            "sample_iou": sample_iou, "ceiling_iou": ceiling_iou, "floor_iou": floor_iou,
            "real_iou": iou(real, truth).mean().item(),
            "sample_over_ceiling": sample_iou / ceiling_iou if ceiling_iou > 0 else None,
            "sample_over_floor": sample_iou / floor_iou if floor_iou > 0 else None,
            "sampling": poses.sampling}


def evaluate_pose_accuracy(detector, poses, layout, alpha, batch_size, device):
    """PCK of the samples against their conditioning poses, found by the project's own detector
    (pose_detector.py), per joint group; beside the detector on the real images (the ceiling)
    and on the reconstructions, and the samples against unrelated poses (the floor)."""
    groups = pose_detector.joint_groups(layout)

    def pck(images, truth):
        detected = pose_detector.detect_keypoints(detector, images, batch_size, device)
        return pose_detector.pck_summary(*pose_detector.pck_hits(detected, truth, alpha), groups)

    samples = pck(poses.samples, poses.keypoints)
    ceiling = pck(poses.real, poses.keypoints)
    floor = pck(poses.samples, poses.keypoints[poses.partner])

    def ratio(a, b):
        return a / b if a is not None and b else None
    return {"condition": poses.condition, "num_poses": len(poses.samples), "alpha": alpha,
            "groups": {name: [layout.joints[i] for i in indices]
                       for name, indices in groups.items()},
            "samples": samples, "ceiling": ceiling,
            "reconstructions": pck(poses.reconstructions, poses.keypoints), "floor": floor,
            "sample_over_ceiling": ratio(samples["all"], ceiling["all"]),
            "sample_over_floor": ratio(samples["all"], floor["all"]),
            "sampling": poses.sampling}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = utils.ArgumentParser(description="Evaluate a VQGAN and its pose transformer.")
    parser.add_argument("--vqgan-checkpoint", required=True, help="stage-1 vqgan.pt")
    parser.add_argument("--transformer-checkpoint", default=None,
                        help="stage-2 transformer_last.pt trained on that VQGAN (optional)")
    utils.add_data_args(parser)
    parser.set_defaults(image_size=None)  # the VQGAN's resolution unless given
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--json", type=utils.output_file, default=None,
                        help="write the results to this JSON file")
    parser.add_argument("--histogram", type=utils.output_file, default=None,
                        help="code histogram PNG (default: next to --json as <name>_codes.png)")
    parser.add_argument("--batch-size", type=utils.positive_int, default=16)
    parser.add_argument("--device", type=utils.device_name, default="auto",
                        help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lpips-weights", default=None,
                        help="torchvision AlexNet weights for LPIPS (default: found as "
                             "lpips_loss.find_backbone_weights describes)")
    parser.add_argument("--no-lpips", action="store_true", help="leave LPIPS out")
    group = parser.add_argument_group("pose fidelity")
    group.add_argument("--num-pose-samples", type=utils.positive_int, default=64)
    group.add_argument("--silhouette-threshold", type=utils.positive_float,
                       default=SILHOUETTE_THRESHOLD)
    group.add_argument("--top-k", type=utils.positive_int, default=None)
    group.add_argument("--top-p", type=utils.nucleus_mass, default=None)
    group.add_argument("--temperature", type=utils.positive_float, default=1.0)
    add_pose_accuracy_args(parser)
    args = parser.parse_args(argv)
    check_pose_accuracy_args(args)
    return args


def add_pose_accuracy_args(parser):
    defaults = pose_detector.DetectorTraining()
    group = parser.add_argument_group("pose accuracy (PCK with the project's keypoint detector)")
    group.add_argument("--pose-detector", default=None,
                       help="the detector file (default: pose_detector.pt beside "
                            "--transformer-checkpoint)")
    group.add_argument("--train-pose-detector", action="store_true",
                       help="train the detector on the training split and save it there, "
                            "unless the file already holds one trained on this data with "
                            "these settings")
    group.add_argument("--pck-alpha", type=utils.positive_float, default=pose_detector.DEFAULT_PCK_ALPHA,
                       help="a joint is found within this fraction of the larger side of its "
                            "pose's keypoint bounding box")
    group.add_argument("--pose-detector-steps", type=utils.positive_int, default=defaults.steps)
    group.add_argument("--pose-detector-batch-size", type=utils.positive_int,
                       default=defaults.batch_size)
    group.add_argument("--pose-detector-lr", type=utils.positive_float, default=defaults.lr)
    group.add_argument("--pose-detector-width", type=utils.positive_int, default=pose_detector.DEFAULT_WIDTH,
                       help="channels at the heatmap resolution (a multiple of 8)")
    group.add_argument("--pose-detector-size", type=utils.positive_int,
                       default=pose_detector.DEFAULT_MAX_INPUT_SIZE,
                       help="larger images are shrunk to this side for the detector")


def check_pose_accuracy_args(args):
    if args.pose_detector_size < 16:
        raise utils.UserError(f"--pose-detector-size must be at least 16, got "
                              f"{args.pose_detector_size}")
    if args.pose_detector_width < 8 or args.pose_detector_width % 8:
        raise utils.UserError(f"--pose-detector-width must be a positive multiple of 8 "
                              f"(GroupNorm uses 8 groups), got {args.pose_detector_width}")


# Data flags that decide which images fall in which split: a transformer evaluated on other
# settings may be scored on images it was trained on.
SPLIT_FLAGS = ("dataset_path", "image_size", "val_fraction", "resize_mode", "pose_layout",
               "coco_annotations")


def warn_if_other_split(train_args, args):
    changed = [k for k in SPLIT_FLAGS if train_args.get(k) != getattr(args, k)]
    if changed:
        details = ", ".join(f"--{k.replace('_', '-')} {train_args.get(k)!r}" for k in changed)
        print(f"warning: the transformer was trained with {details}; with other data settings "
              "the evaluated split may hold its training images", file=sys.stderr)


def find_pose_detector(args, train_set, device):
    """(detector, its path, None), or (None, None, why there is none): the --pose-detector file
    (default: beside the transformer), trained first with --train-pose-detector."""
    path = args.pose_detector
    if path is None and args.transformer_checkpoint:
        path = os.path.join(os.path.dirname(args.transformer_checkpoint), "pose_detector.pt")
    if path is None:  # and no transformer: the pose sections are skipped anyway
        if args.train_pose_detector:
            raise utils.UserError("--train-pose-detector needs a place for the detector: "
                                  "--pose-detector PATH, or --transformer-checkpoint to keep it "
                                  "beside")
        return None, None, "no --transformer-checkpoint"
    if not train_set.has_keypoints:
        if args.train_pose_detector:
            raise utils.UserError(f"--train-pose-detector: {train_set.root} has no keypoints "
                                  "(poses.json) to train a detector on")
        return None, None, "the data has no keypoints to score"
    config = pose_detector.PoseDetectorConfig(
        num_keypoints=train_set.layout.num_keypoints, width=args.pose_detector_width,
        input_size=pose_detector.detector_input_size(train_set.image_size,
                                                     args.pose_detector_size))
    # its own seed, not --seed: another sampling seed is no reason to train another detector
    training = pose_detector.DetectorTraining(
        steps=args.pose_detector_steps, batch_size=args.pose_detector_batch_size,
        lr=args.pose_detector_lr)
    detector = pose_detector.obtain_pose_detector(path, train_set, config, training, device,
                                                  train=args.train_pose_detector,
                                                  num_workers=args.num_workers)
    if detector is None:
        return None, None, (f"no pose detector at {path}; pass --train-pose-detector to train "
                            "one (a few CPU minutes on the default data)")
    return detector, path, None


def evaluate_poses(model, dataset, detector, no_detector, args, device):
    """(pose fidelity, pose accuracy), both from one set of samples, or each {"skipped": why}."""
    no_samples = pose_sampling_skip_reason(model, args.num_pose_samples, dataset)
    no_fidelity = no_samples or (None if dataset.has_parts else
                                 "the data has no part maps, so the pose's true silhouette is "
                                 "unknown (pose accuracy, PCK, needs only keypoints)")
    no_accuracy = no_samples or no_detector or (None if dataset.has_keypoints
                                                else "the data has no keypoints to score")
    if no_fidelity and no_accuracy:
        return {"skipped": no_fidelity}, {"skipped": no_accuracy}
    poses = generate_pose_samples(model, dataset, args.num_pose_samples, args.batch_size, device,
                                  seed=args.seed, top_k=args.top_k, top_p=args.top_p,
                                  temperature=args.temperature)
    fidelity = ({"skipped": no_fidelity} if no_fidelity
                else evaluate_pose_fidelity(poses, args.silhouette_threshold))
    if no_accuracy:
        return fidelity, {"skipped": no_accuracy}
    return fidelity, evaluate_pose_accuracy(detector, poses, dataset.layout, args.pck_alpha,
                                            args.batch_size, device)


def print_table(results):
    def row(name, value, fmt="{:.4f}", suffix=""):
        text = "n/a" if value is None else fmt.format(value) + suffix
        print(f"  {name:<34}{text}")

    reconstruction, codes = results["reconstruction"], results["codebook"]
    print(f"reconstruction ({results['split']} split, {results['num_images']} images)")
    row("PSNR", reconstruction["psnr_db"], "{:.2f}", " dB")
    row("SSIM", reconstruction["ssim"])
    row("LPIPS (AlexNet)", reconstruction["lpips_alex"])
    row("L1 in [-1, 1]", reconstruction["l1"])
    if reconstruction["figure_psnr_db"] is not None:
        row("PSNR figure / backdrop", reconstruction["figure_psnr_db"], "{:.2f}",
            f" / {reconstruction['backdrop_psnr_db']:.2f} dB")
        row("colour dE76 figure / backdrop", reconstruction["figure_delta_e"],
            "{:.2f}", f" / {reconstruction['backdrop_delta_e']:.2f}")
    print("codebook")
    row("codes used", codes["usage"], "{:.4f}", f" ({codes['codes_used']} / {codes['n_embed']})")
    row("perplexity", codes["perplexity"], "{:.1f}")
    if codes["histogram"]:
        print(f"  {'histogram':<34}{codes['histogram']}")
    for section in ("transformer", "pose_fidelity", "pose_accuracy"):
        if "skipped" in results[section]:
            print(f"{section.replace('_', ' ')}: skipped ({results[section]['skipped']})")
    transformer = results["transformer"]
    if "skipped" not in transformer:
        print(f"transformer ({transformer['condition']} condition)")
        row("bits / token", transformer["bits_per_token"])
        row("bits / image", transformer["bits_per_image"], "{:.1f}")
    pose = results["pose_fidelity"]
    if "skipped" not in pose:
        print(f"pose fidelity (silhouette IoU, {pose['num_poses']} poses, "
              f"threshold {pose['threshold']})")
        row("samples", pose["sample_iou"])
        row("ceiling: VQGAN reconstructions", pose["ceiling_iou"])
        row("floor: samples vs other poses", pose["floor_iou"])
        row("real images (measurement check)", pose["real_iou"])
        row("samples / ceiling", pose["sample_over_ceiling"], "{:.3f}")
        row("samples / floor", pose["sample_over_floor"], "{:.3f}")
    accuracy = results["pose_accuracy"]
    if "skipped" not in accuracy:
        columns = ["all", *accuracy["groups"]]
        print(f"pose accuracy (PCK@{accuracy['alpha']} of the pose's size, "
              f"{accuracy['num_poses']} poses, {accuracy['detector']})")
        print(f"  {'':<34}" + "".join(f"{name:>8}" for name in columns))
        for name, key in (("samples", "samples"), ("ceiling: real images", "ceiling"),
                          ("VQGAN reconstructions", "reconstructions"),
                          ("floor: samples vs other poses", "floor")):
            print(f"  {name:<34}" + "".join("     n/a" if accuracy[key][column] is None
                                            else f"{accuracy[key][column]:8.3f}"
                                            for column in columns))
        row("samples / ceiling", accuracy["sample_over_ceiling"], "{:.3f}")
        row("samples / floor", accuracy["sample_over_floor"], "{:.3f}")


def main(argv=None):
    args = parse_args(argv)
    device = utils.pick_device(args.device)
    utils.seed_everything(args.seed)
    model = None
    if args.transformer_checkpoint:  # loads and checks the VQGAN too: it must be the very file
        model, checkpoint = load_transformer(args.transformer_checkpoint, device,
                                             args.vqgan_checkpoint)
        vqgan = model.vqgan
    else:
        vqgan = load_vqgan(args.vqgan_checkpoint, device)
    resolution = vqgan.config.resolution
    if args.image_size is None:
        args.image_size = resolution
    elif args.image_size != resolution:
        raise utils.UserError(f"the VQGAN in {args.vqgan_checkpoint} works on {resolution} px "
                              f"images; pass --image-size {resolution} or leave it out")
    if model is not None:
        warn_if_other_split(checkpoint["args"], args)
    is_class_model = model is not None and model.condition == "class"
    train_set, val_set = utils.build_datasets(args, class_labels=is_class_model)
    dataset = val_set if args.split == "val" else train_set
    if is_class_model and dataset.class_names != model.class_names:
        raise utils.UserError(f"the transformer knows the classes {model.class_names}, but "
                              f"{dataset.root} has the class folders {dataset.class_names}")

    detector, detector_path, no_detector = find_pose_detector(args, train_set, device)
    lpips = None
    if not args.no_lpips:
        lpips = LPIPSLoss(weights_path=args.lpips_weights, net="alex").to(device)
    reconstruction, counts, tokens = evaluate_reconstruction(vqgan, dataset, args.batch_size,
                                                             device, lpips, args.num_workers)
    codes = codebook_summary(counts)
    histogram = args.histogram or (os.path.splitext(args.json)[0] + "_codes.png"
                                   if args.json else None)
    if histogram:
        save_code_histogram(counts, histogram, title=f"code frequencies on the {args.split} "
                            f"split: {codes['codes_used']} of {codes['n_embed']} used, "
                            f"perplexity {codes['perplexity']:.1f}")
    codes.update(histogram=histogram, histogram_order="most used first",
                 counts=counts.tolist())

    if model is None:
        transformer = pose = accuracy = {"skipped": "no --transformer-checkpoint"}
    else:
        transformer = evaluate_transformer(model, dataset, tokens, args.batch_size, device,
                                           args.num_workers)
        pose, accuracy = evaluate_poses(model, dataset, detector, no_detector, args, device)
        if "skipped" not in accuracy:
            accuracy["detector"] = detector_path
    results = {"vqgan_checkpoint": args.vqgan_checkpoint,
               "transformer_checkpoint": args.transformer_checkpoint,
               "dataset_path": dataset.root, "split": args.split, "num_images": len(dataset),
               "image_size": args.image_size, "seed": args.seed,
               "reconstruction": reconstruction, "codebook": codes,
               "transformer": transformer, "pose_fidelity": pose, "pose_accuracy": accuracy}
    print_table(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    utils.run_cli(main)
