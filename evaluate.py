"""Evaluate a trained VQGAN (and optionally its pose transformer) on one split of the data.

    python evaluate.py --vqgan-checkpoint runs/vqgan/vqgan.pt
    python evaluate.py --vqgan-checkpoint runs/vqgan/vqgan.pt \
        --transformer-checkpoint runs/transformer/transformer_last.pt --train-pose-detector

The data flags are the trainers' (data.add_data_args); those not given are the transformer
run's, so that its held-out split is the one scored (without a transformer, the --superres
model's), else the defaults (the synthetic mannequins); --image-size is the VQGAN's resolution.
Prints a table and, with --json OUT, writes the same numbers (keys in `main`) plus a
code-frequency histogram OUT_codes.png (or --histogram PNG, drawn by plots.py). Everything is
seeded: two runs with the same flags, batch size and device give identical numbers. Images
are encoded once, by VQGAN.image_tokens (under the device's automatic precision, as the token
cache and sample.py encode them): the code histogram counts those tokens, the reconstructions
decode them and the transformer scores them. Metrics are computed in float32 without autocast.

Reconstruction: PSNR, SSIM, LPIPS (AlexNet) and L1, and on data with part maps the figure's and
the backdrop's PSNR and colour error (image_metrics.py says how each is computed); codebook
usage and perplexity, with a histogram of code frequencies.

Transformer: negative log-likelihood of the split's image tokens (unflipped) under the model's
own condition prefixes, in bits per token (as training logs val_bits_per_token) and per image.

Pose fidelity (silhouette IoU) and pose accuracy (PCK with the project's keypoint detector)
score samples for the split's poses, each beside a ceiling and a floor (pose_scores.py).
The detector is pose_detector.pt beside the transformer checkpoint (or --pose-detector PATH);
--train-pose-detector trains it first, unless the file already holds one trained on this data
with these settings (about 3.5 CPU minutes on the default mannequins). A file trained on other
data (another folder, image size, layout or split) is refused, never silently reused.
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import pose_detector
import runs
import utils
from codebook import CodebookStats
from data import unflipped_batches
from image_metrics import codebook_summary, region_metrics, ssim
from lpips_loss import LPIPSLoss, fitting
from plots import save_code_histogram
from pose_scores import (SILHOUETTE_THRESHOLD, evaluate_pose_accuracy, evaluate_pose_fidelity,
                         generate_pose_samples, pose_sampling_skip_reason)
from sampling import add_sampling_args, sampling_options
from superres import load_superres
from training_superres import evaluate_superres, superres_split
from transformer import load_transformer
from vqgan import load_vqgan

# ----------------------------------------------------------------------------------------------
# The evaluations
# ----------------------------------------------------------------------------------------------


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
    for batch in tqdm(unflipped_batches(dataset, batch_size, num_workers), desc="reconstruction",
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
        mean = torch.cat(regions[key]).nanmean().item() if regions else math.nan
        metrics[key] = None if math.isnan(mean) else mean  # None: no part maps, or no such pixel
    return metrics, stats.counts.cpu(), torch.cat(tokens)


@torch.no_grad()
def evaluate_transformer(model, dataset, tokens, batch_size, device, num_workers=0):
    """Negative log-likelihood of the split's image tokens (N, L), as evaluate_reconstruction
    encoded them, in bits per token and per image."""
    model.eval()
    total_nats, total_tokens = 0.0, 0
    loader = unflipped_batches(dataset, batch_size, num_workers)
    for start, batch in zip(range(0, len(dataset), batch_size),
                            tqdm(loader, desc="transformer NLL", leave=False)):
        batch_tokens = tokens[start:start + batch_size].to(device)  # (B, L)
        logits, _ = model(model.condition_tokens(batch), batch_tokens)  # (B, L, n_embed)
        total_nats += F.cross_entropy(logits.float().flatten(0, 1), batch_tokens.flatten(),
                                      reduction="sum").item()
        total_tokens += batch_tokens.numel()
    bits_per_token = total_nats / total_tokens / math.log(2)
    return {"condition": model.condition, "tokens_per_image": model.num_image_tokens,
            "bits_per_token": bits_per_token,
            "bits_per_image": bits_per_token * model.num_image_tokens}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Evaluate a VQGAN and its pose transformer.")
    parser.add_argument("--vqgan-checkpoint", required=True, help="stage-1 vqgan.pt")
    parser.add_argument("--transformer-checkpoint", default=None,
                        help="stage-2 transformer_last.pt trained on that VQGAN (optional)")
    data.add_data_args(parser)
    parser.set_defaults(image_size=None)  # the VQGAN's resolution
    defaults = runs.defer_data_flags(parser)  # the scored run's unless given (main)
    parser.add_argument("--superres", default=None, metavar="CHECKPOINT",
                        help="a stage-3 superres.pt trained behind this VQGAN: score it and "
                             "bicubic upscaling at its output size")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--json", type=cli.output_file, default=None,
                        help="write the results to this JSON file")
    parser.add_argument("--histogram", type=cli.output_file, default=None,
                        help="code histogram PNG (default: next to --json as <name>_codes.png)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=16)
    parser.add_argument("--device", type=cli.device_name, default="auto",
                        help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lpips-weights", default=None,
                        help="torchvision AlexNet weights for LPIPS (default: found as "
                             "lpips_loss.find_backbone_weights describes)")
    parser.add_argument("--no-lpips", action="store_true", help="leave LPIPS out")
    group = parser.add_argument_group("pose fidelity")
    group.add_argument("--num-pose-samples", type=cli.positive_int, default=64)
    group.add_argument("--silhouette-threshold", type=cli.positive_float,
                       default=SILHOUETTE_THRESHOLD)
    add_sampling_args(group, int8=True)
    add_pose_accuracy_args(parser)
    args = parser.parse_args(argv)
    check_pose_accuracy_args(args)
    args.data_defaults = defaults  # for runs.take_run_data_flags
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
    group.add_argument("--pck-alpha", type=cli.positive_float,
                       default=pose_detector.DEFAULT_PCK_ALPHA,
                       help="a joint is found within this fraction of the larger side of its "
                            "pose's keypoint bounding box")
    group.add_argument("--pose-detector-steps", type=cli.positive_int, default=defaults.steps)
    group.add_argument("--pose-detector-batch-size", type=cli.positive_int,
                       default=defaults.batch_size)
    group.add_argument("--pose-detector-lr", type=cli.positive_float, default=defaults.lr)
    group.add_argument("--pose-detector-width", type=cli.positive_int,
                       default=pose_detector.DEFAULT_WIDTH,
                       help="channels at the heatmap resolution (a multiple of 8)")
    group.add_argument("--pose-detector-size", type=cli.positive_int,
                       default=pose_detector.DEFAULT_MAX_INPUT_SIZE,
                       help="larger images are shrunk to this side for the detector")


def check_pose_accuracy_args(args):
    if args.pose_detector_size < 16:
        raise utils.UserError(f"--pose-detector-size must be at least 16, got "
                              f"{args.pose_detector_size}")
    if args.pose_detector_width < 8 or args.pose_detector_width % 8:
        raise utils.UserError(f"--pose-detector-width must be a positive multiple of 8 "
                              f"(GroupNorm uses 8 groups), got {args.pose_detector_width}")


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
                                  seed=args.seed, **sampling_options(args))
    fidelity = ({"skipped": no_fidelity} if no_fidelity
                else evaluate_pose_fidelity(poses, args.silhouette_threshold))
    if no_accuracy:
        return fidelity, {"skipped": no_accuracy}
    return fidelity, evaluate_pose_accuracy(detector, poses, dataset.layout, args.pck_alpha,
                                            args.batch_size, device)


def print_table(results):
    def row(name, value, fmt="{:.4f}", suffix=""):
        print(f"  {name:<34}" + ("n/a" if value is None else fmt.format(value) + suffix))

    reconstruction, codes = results["reconstruction"], results["codebook"]
    print(f"reconstruction ({results['split']} split of {results['dataset_path']}, "
          f"{results['num_images']} images)")
    row("PSNR", reconstruction["psnr_db"], "{:.2f}", " dB")
    row("SSIM", reconstruction["ssim"])
    row("LPIPS (AlexNet)", reconstruction["lpips_alex"])
    row("L1 in [-1, 1]", reconstruction["l1"])
    for name, metric, unit in (("PSNR", "psnr_db", " dB"), ("colour dE76", "delta_e", "")):
        values = (reconstruction[f"figure_{metric}"], reconstruction[f"backdrop_{metric}"])
        if values != (None, None):  # data with part maps
            print(f"  {name + ' figure / backdrop':<34}"
                  + " / ".join("n/a" if v is None else f"{v:.2f}" for v in values) + unit)
    print("codebook")
    row("codes used", codes["usage"], "{:.4f}", f" ({codes['codes_used']} / {codes['n_embed']})")
    row("perplexity", codes["perplexity"], "{:.1f}")
    if codes["histogram"]:
        print(f"  {'histogram':<34}{codes['histogram']}")
    superres = results["superres"]
    if "skipped" not in superres:
        print(f"super-resolution x{superres['scale']} ({superres['num_images']} images at "
              f"{superres['image_size']} px, against the originals)")
        print(f"  {'':<34}{'PSNR dB':>8}{'SSIM':>8}{'LPIPS':>8}")
        for name, key in (("ours: SR(reconstruction)", "ours"),
                          ("bicubic(reconstruction)", "bicubic"),
                          ("bicubic(downscaled original)", "bicubic_of_original")):
            print(f"  {name:<34}{superres[key + '_psnr_db']:8.2f}{superres[key + '_ssim']:8.4f}"
                  + (f"{superres[key + '_lpips_alex']:8.4f}" if key + "_lpips_alex" in superres
                     else "     n/a"))
    for section in ("transformer", "pose_fidelity", "pose_accuracy", "superres"):
        if "skipped" in results[section]:
            print(f"{section.replace('_', ' ')}: skipped ({results[section]['skipped']})")
    transformer = results["transformer"]
    if "skipped" not in transformer:
        print(f"transformer ({transformer['condition']} condition"
              f"{', int8 Linear layers' if transformer['int8'] else ''})")
        row("bits / token", transformer["bits_per_token"])
        row("bits / image", transformer["bits_per_image"], "{:.1f}")
    pose = results["pose_fidelity"]
    if "skipped" not in pose:
        print(f"pose fidelity (silhouette IoU, {pose['num_poses']} poses, "
              f"threshold {pose['threshold']})")
        row("samples", pose["sample_iou"])
        row("ceiling: VQGAN reconstructions", pose["ceiling_iou"])
        if pose["other_person_iou"] is not None:
            row("another person, same pose", pose["other_person_iou"])
            row("another person / ceiling", pose["other_person_over_ceiling"], "{:.3f}")
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
        model.resolve_guidance(args.guidance)  # a scale it cannot take: refused before any work
        if args.int8:  # bits per token and the pose samples then measure the int8 GPT
            model.int8_for_cpu()
        vqgan = model.vqgan
    else:
        vqgan = load_vqgan(args.vqgan_checkpoint, device)
    resolution = vqgan.config.resolution
    if args.image_size is None:
        args.image_size = resolution
    elif args.image_size != resolution:
        raise utils.UserError(f"the VQGAN in {args.vqgan_checkpoint} works on {resolution} px "
                              f"images; pass --image-size {resolution} or leave it out")
    sr_model, trained_sha256, sr_flags = (load_superres(args.superres, device) if args.superres
                                          else (None, None, {}))  # its file checked first
    runs.take_run_data_flags(args, checkpoint["args"] if model is not None else sr_flags,
                             args.data_defaults)
    if args.superres:  # its checks before any other work: a wrong size fails in seconds
        sr_dataset = superres_split(sr_model, vqgan, vars(args), args.split,
                                    utils.file_sha256(args.vqgan_checkpoint), trained_sha256)
    is_class_model = model is not None and model.condition == "class"
    train_set, val_set = data.build_datasets(args, class_labels=is_class_model)
    dataset = val_set if args.split == "val" else train_set
    if is_class_model and dataset.class_names != model.class_names:
        raise utils.UserError(f"the transformer knows the classes {model.class_names}, but "
                              f"{dataset.root} has the class folders {dataset.class_names}")

    no_poses = model is not None and pose_sampling_skip_reason(model, args.num_pose_samples,
                                                               dataset)  # no detector is needed
    detector, detector_path, no_detector = ((None, None, no_poses) if no_poses
                                            else find_pose_detector(args, train_set, device))
    lpips = None if args.no_lpips else LPIPSLoss(args.lpips_weights, net="alex").to(device)
    reconstruction, counts, tokens = evaluate_reconstruction(
        vqgan, dataset, args.batch_size, device, fitting(lpips, dataset.image_size),
        args.num_workers)
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
        transformer["int8"] = args.int8
        pose, accuracy = evaluate_poses(model, dataset, detector, no_detector, args, device)
        if "skipped" not in accuracy:
            accuracy["detector"] = detector_path
    superres = {"skipped": "no --superres"}
    if args.superres:
        superres = evaluate_superres(sr_model, vqgan, sr_dataset, args.batch_size, device,
                                     fitting(lpips, sr_dataset.image_size))
    results = {"vqgan_checkpoint": args.vqgan_checkpoint,
               "transformer_checkpoint": args.transformer_checkpoint,
               "dataset_path": dataset.root, "split": args.split, "num_images": len(dataset),
               "image_size": args.image_size, "seed": args.seed,
               "reconstruction": reconstruction, "codebook": codes,
               "transformer": transformer, "pose_fidelity": pose, "pose_accuracy": accuracy,
               "superres": superres}
    print_table(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    utils.run_cli(main)
