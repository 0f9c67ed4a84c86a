"""Stage 3: train the super-resolution generator (superres.py) to undo the VQGAN's losses while
it enlarges its pictures.

    python training_superres.py       # 128 px mannequins, the default runs/vqgan/vqgan.pt, x2
    python training_superres.py --vqgan-checkpoint RUN/vqgan.pt --dataset-path DIR --scale 4

Pairs are made from the user's images: the original at the output size (--image-size, default
--scale x the VQGAN's resolution) is the target, the input the frozen stage-1 VQGAN's
reconstruction of its downscaled copy (superres.downscale, a box filter), computed once into
RUN/pair_cache/ keyed like stage 2's tokens (runs.RunDirectory.cached: the VQGAN's content
hash, the data flags, the scale, the files). Both halves of a pair flip together.

Training takes --crop-size crops of the output (ESRGAN trains on crops too): each centred near
a random visible keypoint where the data has poses (a mannequin fills a tenth of its picture;
the backdrop is what bicubic already gets right), else anywhere. The loss is
    L = L1 + perceptual_weight * LPIPS (VGG16) + disc_weight * (-mean D(SR))
with LPIPS from --perceptual-start on (L1 alone first, as ESRGAN pre-trains for PSNR) and the
PatchGAN of stage 1 (discriminator.py) with its hinge loss from --disc-start on, at a fixed
weight (ESRGAN's choice): the generator starts as bicubic, so there is no untrained decoder
to balance against D with stage 1's adaptive weight.

Validation (each epoch and at the end) scores SR and bicubic against whole originals. Outputs
in --run-dir: superres_last.pt (--resume), superres.pt (sample.py / evaluate.py --superres),
metrics.jsonl, loss_curves.png, grids in samples/: input | bicubic | ours | original.
"""
import dataclasses
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import runs
import utils
from discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
from image_metrics import ssim
from lpips_loss import LPIPSLoss
from plots import plot_curves
from images import require_resolution
from superres import (SCALES, SuperResConfig, SuperResolution, add_superres_args, bicubic,
                      downscale, save_superres, warn_if_other_vqgan)
from training_loop import TrainingLoop
from training_vqgan import discriminator_backward
from vqgan import load_vqgan


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Stage 3: train the super-resolution generator.")
    parser.add_argument("--vqgan-checkpoint", default=os.path.join("runs", "vqgan", "vqgan.pt"),
                        help="stage-1 inference checkpoint (vqgan.pt) whose pictures to enlarge")
    parser.add_argument("--scale", type=cli.positive_int, choices=SCALES, default=2,
                        help="output side / the VQGAN's resolution")
    add_superres_args(parser)
    data.add_data_args(parser)
    runs.add_run_args(parser)
    # lr 1e-3 at batch 16 (5x ESRGAN's 2e-4: a CPU budget is a few hundred steps), cosine to a
    # tenth; 650 steps of L1, then 100 with LPIPS: about 10 minutes on 2 CPU cores (README)
    parser.set_defaults(run_dir=os.path.join("runs", "superres"), batch_size=16,
                        base_lr=6.25e-5, default_max_steps=750, warmup_steps=0,
                        min_lr_ratio=0.1, image_size=None)  # image size: --scale x the VQGAN's
    group = parser.add_argument_group("loss")
    group.add_argument("--crop-size", type=cli.non_negative_int, default=64,
                       help="side of the training crops of the output, a multiple of --scale; "
                            "0 trains on whole pictures")
    group.add_argument("--perceptual-weight", type=cli.non_negative_float, default=1.0)
    group.add_argument("--perceptual-start", type=cli.non_negative_int, default=None,
                       help="step at which LPIPS joins the L1 (default 650; resumed: the run's)")
    group.add_argument("--disc-weight", type=cli.non_negative_float, default=0.05,
                       help="weight of the generator's GAN term (fixed, not adaptive)")
    group.add_argument("--disc-start", type=cli.non_negative_int, default=1000,
                       help="optimizer step at which the discriminator and GAN term switch on "
                            "(default: after the default run's last step; 500 runs it)")
    group.add_argument("--disc-loss", choices=("hinge", "vanilla"), default="hinge")
    group.add_argument("--lpips-weights", default=None,
                       help="path of the VGG16 ImageNet weights for LPIPS (see lpips_loss.py)")
    group.add_argument("--grid-examples", type=cli.positive_int, default=6)
    args = parser.parse_args(argv)
    for flag, off in (("grad_accum", 1), ("ema_decay", 0), ("compile", False),
                      ("channels_last", None)):  # flags of stages 1 and 2 only
        if getattr(args, flag) != off:
            raise utils.UserError(f"--{flag.replace('_', '-')}: stage 3 does not use it (a flag "
                                  "of stages 1 and 2); leave it out")
    return args


def check_sizes(args, vqgan_resolution):
    """--image-size is --scale x the VQGAN's resolution (the default), and the crops fit it."""
    expected = vqgan_resolution * args.scale
    if args.image_size is None:
        args.image_size = expected
    elif args.image_size != expected:
        raise utils.UserError(f"--image-size {args.image_size} is not --scale {args.scale} x the "
                              f"VQGAN's {vqgan_resolution} px; pass --image-size {expected}, or "
                              "another --scale or VQGAN")
    crop = args.crop_size or args.image_size
    if crop > args.image_size or crop % args.scale or crop // args.scale < 8:
        raise utils.UserError(f"--crop-size {args.crop_size} must be a multiple of --scale "
                              f"{args.scale}, at least {8 * args.scale} and at most --image-size "
                              f"{args.image_size} (0: whole pictures)")


# ---- the pairs -----------------------------------------------------------------------------


@torch.no_grad()
def vqgan_reconstruction(vqgan, originals, scale):
    """Originals (B, 3, H, W) in [-1, 1] -> the VQGAN's reconstruction of their downscaled copy
    (B, 3, H / scale, W / scale): the generator's input. Encoded as the token cache encodes
    (VQGAN.image_tokens), decoded in float32."""
    tokens = vqgan.image_tokens(downscale(originals, scale))
    return vqgan.decode_indices(tokens).float().clamp(-1, 1)


@torch.no_grad()
def make_pairs(dataset, vqgan=None, scale=2, batch_size=16, desc="pairs"):
    """One split's pairs, unflipped, in order: {"high": uint8 originals (N, 3, H, W),
    "low": uint8 reconstructions (N, 3, H / s, W / s) (with a VQGAN), "keypoints": (N, K, 3) or
    None, "paths"}."""
    device = next(vqgan.parameters()).device if vqgan is not None else None
    high, low, keypoints = [], [], []
    for batch in tqdm(data.unflipped_batches(dataset, batch_size), desc=desc, leave=False,
                      disable=vqgan is None):
        high.append(utils.to_uint8(batch["image"]))
        if vqgan is not None:
            low.append(utils.to_uint8(vqgan_reconstruction(vqgan, batch["image"].to(device),
                                                           scale)).cpu())
        if "keypoints" in batch:
            keypoints.append(batch["keypoints"])
    return {"high": torch.cat(high), "low": torch.cat(low) if low else None,
            "keypoints": torch.cat(keypoints) if keypoints else None,
            "paths": [e.name for e in dataset.examples]}


def load_pairs(run, vqgan, train_set, val_set, args, vqgan_sha256, device):
    """Both splits' pairs; the reconstructions come from RUN/pair_cache/ when this VQGAN, data
    and scale were seen before (the originals are the datasets', in memory)."""
    key = {"vqgan_sha256": vqgan_sha256, "scale": args.scale,
           **{k: getattr(args, k) for k in data.SPLIT_FLAGS},
           "encoding_precision": utils.resolve_precision("auto", device),  # VQGAN.image_tokens
           "files": {"train": train_set.fingerprint(), "val": val_set.fingerprint()}}
    sets = {"train": train_set, "val": val_set}

    def build():
        return {split: {k: v for k, v in make_pairs(
            dataset, vqgan, args.scale, args.batch_size, f"reconstructing the {split} split"
        ).items() if k in ("low", "paths")} for split, dataset in sets.items()}

    names = {split: [e.name for e in dataset.examples] for split, dataset in sets.items()}
    cache = run.cached("pair_cache", "pairs", key, names, build)
    return {split: {**make_pairs(dataset), "low": cache[split]["low"]}
            for split, dataset in sets.items()}


def crop_corner(keypoints, size, crop, scale):
    """(top, left) of a crop x crop square in a size x size picture, on the input's grid
    (multiples of scale): centred near a random visible keypoint (jittered by up to a quarter
    crop), else anywhere. Draws from the global torch RNG (resumed exactly)."""
    visible = keypoints[keypoints[:, 2] > 0] if keypoints is not None else keypoints
    if visible is None or len(visible) == 0:
        centre = torch.rand(2) * size
    else:
        point = visible[torch.randint(len(visible), ()), :2].flip(0)  # (y, x)
        centre = point + (torch.rand(2) - 0.5) * (crop / 2)
    corner = (centre - crop / 2).clamp(0, size - crop)
    return [int(value) // scale * scale for value in corner]


def training_batch(pairs, items, crop, scale, device):
    """(low (B, 3, c / s, c / s), high (B, 3, c, c)) in [-1, 1] for EpochBatchSampler's
    (index, flip) items: a crop of each pair, both halves flipped together."""
    lows, highs = [], []
    size = pairs["high"].shape[-1]
    for index, flip in items:
        keypoints = pairs["keypoints"][index] if pairs["keypoints"] is not None else None
        top, left = crop_corner(keypoints, size, crop, scale)
        high = pairs["high"][index, :, top:top + crop, left:left + crop]
        low = pairs["low"][index, :, top // scale:(top + crop) // scale,
                           left // scale:(left + crop) // scale]
        lows.append(low.flip(-1) if flip else low)
        highs.append(high.flip(-1) if flip else high)
    return (utils.from_uint8(torch.stack(lows)).to(device, non_blocking=True),
            utils.from_uint8(torch.stack(highs)).to(device, non_blocking=True))


# ---- scores and pictures -------------------------------------------------------------------


@torch.no_grad()
def score_upscalers(model, pairs, scale, batch_size, device, lpips=None, with_ssim=False,
                    perfect_vqgan=False):
    """Mean PSNR (and SSIM, LPIPS) against the originals of: "ours", SR(reconstruction) (with a
    model); "bicubic", bicubic(reconstruction); with perfect_vqgan also "bicubic_of_original",
    bicubic(downscaled original), what a VQGAN that lost nothing would give bicubic."""
    sums, count = {}, len(pairs["high"])
    for start in range(0, count, batch_size):
        high = utils.from_uint8(pairs["high"][start:start + batch_size]).to(device)
        low = utils.from_uint8(pairs["low"][start:start + batch_size]).to(device)
        outputs = {"bicubic": bicubic(low, scale)}
        if model is not None:
            outputs["ours"] = model.eval()(low)
        if perfect_vqgan:
            outputs["bicubic_of_original"] = bicubic(downscale(high, scale), scale)
        for name, output in outputs.items():
            output = output.float().clamp(-1, 1)
            x, y = utils.denormalize(high), utils.denormalize(output)
            scores = {"psnr_db": utils.psnr(x, y)}
            if with_ssim:
                scores["ssim"] = ssim(x, y)
            if lpips is not None:
                scores["lpips_alex"] = lpips(high, output, per_sample=True)
            for metric, values in scores.items():
                key = f"{name}_{metric}"
                sums[key] = sums.get(key, 0.0) + values.sum().item()
    if model is not None:
        model.train()
    return {key: value / count for key, value in sums.items()}


def superres_split(superres, vqgan, flags, split, vqgan_sha256=None, trained_sha256=None):
    """evaluate.py --superres, before any other work: the `split` of the data flags' images at
    the output size (data/mannequins-128 by default); refuses a wrong VQGAN size or pictures."""
    config = superres.config
    if config.in_size != vqgan.config.resolution:
        raise utils.UserError(f"the super-resolution model enlarges {config.in_size} px "
                              f"pictures x{config.scale}, but the VQGAN makes "
                              f"{vqgan.config.resolution} px ones; pass the VQGAN it was "
                              "trained behind")
    warn_if_other_vqgan(trained_sha256, vqgan_sha256)
    train_set, val_set = data.build_datasets({**flags, "image_size": config.out_size},
                                             progress=False)
    dataset = val_set if split == "val" else train_set
    require_resolution(dataset.examples, config.out_size, dataset.resize_mode)
    return dataset


def evaluate_superres(superres, vqgan, dataset, batch_size, device, lpips=None):
    """PSNR, SSIM, LPIPS against `dataset`'s originals (superres_split) of SR(reconstruction),
    bicubic(reconstruction) and bicubic(downscaled original)."""
    config = superres.config
    pairs = make_pairs(dataset, vqgan, config.scale, batch_size, "super-resolution pairs")
    scores = score_upscalers(superres, pairs, config.scale, batch_size, device, lpips,
                             with_ssim=True, perfect_vqgan=True)
    return {"scale": config.scale, "image_size": config.out_size, "num_images": len(dataset),
            **scores}


@torch.no_grad()
def save_comparison_grid(model, pairs, scale, path, count):
    """One row per validation picture: input (nearest-upscaled) | bicubic | ours | original."""
    model.eval()
    low = utils.from_uint8(pairs["low"][:count]).to(next(model.parameters()).device)
    columns = [F.interpolate(low, scale_factor=scale, mode="nearest"), bicubic(low, scale),
               model(low), utils.from_uint8(pairs["high"][:count])]
    model.train()
    utils.save_image_grid([[column[i].float().clamp(-1, 1).cpu() for column in columns]
                           for i in range(len(low))], path)


# ---- training ------------------------------------------------------------------------------


def main(argv=None):
    runs.run_training(train, parse_args(argv))


def train(args, dist, device):
    """Train to --max-steps; returns the step at which Ctrl-C stopped it, else None."""
    if dist.enabled:
        raise utils.UserError("stage 3 trains in one process; run it without torchrun")
    utils.seed_everything(args.seed)
    if not os.path.exists(args.vqgan_checkpoint):
        raise utils.UserError(f"no stage-1 checkpoint at {args.vqgan_checkpoint}; run "
                              "python training_vqgan.py first or pass --vqgan-checkpoint")
    vqgan = load_vqgan(args.vqgan_checkpoint, device)
    vqgan_sha256 = utils.file_sha256(args.vqgan_checkpoint)
    check_sizes(args, vqgan.config.resolution)
    run = runs.RunDirectory(args.run_dir, "superres_train", "superres_last.pt",  # no folder yet
                            runs.plain_args(args), frozen={"vqgan_sha256": vqgan_sha256})
    train_set, val_set = data.build_datasets(args)
    for dataset in (train_set, val_set):
        require_resolution(dataset.examples, args.image_size, dataset.resize_mode)
    sampler = data.EpochBatchSampler(len(train_set), args.batch_size, args.seed, args.flip)
    lpips = LPIPSLoss(weights_path=args.lpips_weights).to(device)
    if args.perceptual_start is None:  # a resumed run keeps its own (runs from before it: 0)
        args.perceptual_start = run.trained_flags(args.resume).get("perceptual_start",
                                                                   0 if args.resume else 650)
    pairs = load_pairs(run, vqgan, train_set, val_set, args, vqgan_sha256, device)
    del vqgan  # frozen and done: the pairs hold what it made

    config = SuperResConfig(scale=args.scale, nf=args.sr_nf, nb=args.sr_nb, gc=args.sr_gc,
                            in_size=args.image_size // args.scale)
    model = SuperResolution(config).to(device).train()
    discriminator = NLayerDiscriminator().to(device).train()
    schedule = runs.Schedule.from_flags(args, sampler.batches_per_epoch)
    opt_g = torch.optim.Adam(model.parameters(), lr=schedule.peak, betas=(0.9, 0.99))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=schedule.peak, betas=(0.9, 0.99))
    precision = utils.resolve_precision(args.precision, device)
    scaler = utils.grad_scaler(device, precision)
    disc_loss_fn = hinge_d_loss if args.disc_loss == "hinge" else vanilla_d_loss
    states = dict(model=model, discriminator=discriminator, opt_g=opt_g, opt_d=opt_d, scaler=scaler)
    run_config = dict(dataclasses.asdict(config), vqgan_sha256=vqgan_sha256)
    flags = runs.plain_args(args)
    step = run.resume(args.resume, run_config, flags, 1, **states) if args.resume else 0
    if not run.steps_left(step, schedule, args.resume):
        return None
    crop = args.crop_size or args.image_size
    print(f"stage 3: {config.in_size} px VQGAN pictures -> {args.image_size} px (x{args.scale}), "
          f"RRDB generator nf {config.nf}, {config.nb} blocks, gc {config.gc} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters); "
          f"{len(train_set)} training pictures, {crop} px crops, batch {args.batch_size}\n"
          f"  {schedule.total} steps, lr {schedule.peak:.3g} with a cosine to "
          f"{args.min_lr_ratio:g} of it; L1 + {args.perceptual_weight:g} x LPIPS from step "
          f"{args.perceptual_start}, GAN x {args.disc_weight:g} from step {args.disc_start}"
          + (" (after this run's last step)" if args.disc_start >= schedule.total else "")
          + f"; precision {precision}")
    bicubic_scores = score_upscalers(None, pairs["val"], args.scale, args.batch_size, device)
    window_images, window_sums, window_steps = 0, {}, {}
    batches = data.resume_batches(sampler, sampler, step)
    with TrainingLoop(run, dist, step, schedule.total, sampler.batches_per_epoch,
                      args.log_every, args.save_every, args.sample_every, args.resume,
                      "stage 3") as loop:
        while loop.running():
            gan_on = loop.step >= args.disc_start
            perceptual_on = args.perceptual_weight > 0 and loop.step >= args.perceptual_start
            lr = schedule.apply([opt_g, opt_d], loop.step)
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            low, high = training_batch(pairs["train"], next(batches), crop, args.scale, device)
            terms = generator_backward(model, lpips, discriminator, low, high, args,
                                       perceptual_on, gan_on, scaler, precision)
            if gan_on:
                terms["discriminator"] = discriminator_backward(
                    discriminator, high, terms.pop("output"), disc_loss_fn,
                    scaler.scale(torch.ones((), device=device)), precision)
            terms.pop("output", None)
            for key, value in terms.items():
                loop.health.add(value)
                window_sums[key] = window_sums.get(key, 0) + value
                window_steps[key] = window_steps.get(key, 0) + 1
            window_images += len(low)
            scaler.step(opt_g)
            if gan_on:
                scaler.step(opt_d)
            scaler.update()

            due = loop.end_step()
            if due.log:
                means = {key: float(value) / window_steps[key]
                         for key, value in window_sums.items()}
                loop.log({**means, "lr": lr}, dict(l1=f"{means['l1']:.4f}"),
                         images_per_s=window_images)
                window_images, window_sums, window_steps = 0, {}, {}
            if due.validate:
                scores = score_upscalers(model, pairs["val"], args.scale, args.batch_size, device)
                loop.write({"val_psnr": scores["ours_psnr_db"],
                            "val_psnr_bicubic": bicubic_scores["bicubic_psnr_db"]})
            if due.sample:
                save_comparison_grid(model, pairs["val"], args.scale, run.path(
                    "samples", f"superres_{loop.step:06d}.png"), args.grid_examples)
            if due.save:
                run.save_state(loop.step, run_config, flags, 1, states,
                               vqgan_checkpoint=os.path.abspath(args.vqgan_checkpoint))
                save_superres(model, run.path("superres.pt"), vqgan_sha256, flags)
                plot_curves(loop.records(), [
                    ("losses", ["l1", "perceptual", "generator", "discriminator"]),
                    ("validation PSNR (dB)", ["val_psnr", "val_psnr_bicubic"])],
                    run.path("loss_curves.png"), title="stage 3")
    run.report_outputs("stage 3", [
        ("superres.pt", "superres.pt (sample.py / evaluate.py --superres)"),
        ("superres_last.pt", "superres_last.pt (--resume)"), ("metrics.jsonl", "metrics.jsonl"),
        ("loss_curves.png", "loss_curves.png"), ("samples", "samples/")])
    return loop.stopped_at


def generator_backward(model, lpips, discriminator, low, high, args, perceptual_on, gan_on,
                       scaler, precision):
    """Forward the generator and back-propagate L1 + LPIPS (+ the GAN term) into its
    parameters only: backward(inputs=...) leaves the discriminator's gradients as they were,
    so D's own step sees its loss alone. Returns the loss terms and the (detached) output."""
    with utils.autocast_context(low.device, precision):
        output = model(low)  # (B, 3, c, c)
        l1 = (output.float() - high).abs().mean()
        loss = l1
        terms = {"l1": l1.detach()}
        if perceptual_on:
            perceptual = lpips(high, output.float())
            loss = loss + args.perceptual_weight * perceptual
            terms["perceptual"] = perceptual.detach()
        if gan_on:
            generator = -discriminator(output).float().mean()
            loss = loss + args.disc_weight * generator
            terms["generator"] = generator.detach()
    scaler.scale(loss).backward(inputs=list(model.parameters()))
    return {**terms, "output": output.detach()}


if __name__ == "__main__":
    utils.run_cli(main)
