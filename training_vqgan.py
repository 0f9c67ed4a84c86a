"""Stage 1: train the VQGAN (encoder, codebook, decoder) against a patch discriminator.

    python training_vqgan.py                         # small preset, synthetic mannequins, CPU ok
    python training_vqgan.py --dataset-path DIR --preset paper   # 256 px, the paper's settings

The objective is the paper's, L = L1 + perceptual_weight * LPIPS + codebook loss + lambda *
(-mean D(x_hat)), lambda = ||grad L_rec|| / (||grad L_G|| + 1e-4) at the decoder's last layer
(times --disc-weight), a hinge-loss PatchGAN from --disc-start; `small`'s pixel loss is the
squared error of luma and 5 x chroma, which brings the figures' colours back (Content.loss).
Before --disc-start neither the GAN term nor D runs (an untrained generator gives D nothing to
learn), before --perceptual-start no LPIPS: the pixel loss alone gets the coarse picture right
at a fraction of the cost. The learning rate may warm up and follow a cosine down to
--min-lr-ratio of its peak (1, constant, is taming-transformers' choice). Each --preset brings
its own defaults (PRESET_DEFAULTS); the run prints the resolved configuration.

One step splits the graph at the reconstruction x_hat: LPIPS and the discriminator are
back-propagated once each, to x_hat only, and one backward from x_hat trains decoder, codebook
and encoder (the usual code runs autograd.grad twice through LPIPS and D, then a full backward:
see bench.py). lambda needs just the last conv's weight gradients, which come from its input and
output gradients directly (adaptive_lambda), so a torch.compile'd model too runs one backward.

--content keypoint-images|part-maps trains a condition VQGAN on pose pictures or one-hot part
maps (conditions.py). --precision picks the autocast dtype (utils.resolve_precision; fp16
scales every loss), --channels-last the memory format, --ema-decay averages the weights.
Outputs in --run-dir (default runs/vqgan): vqgan_last.pt (all --resume needs, atomic),
vqgan.pt (the inference weights stage 2 loads), metrics.jsonl, loss_curves.png, samples/.
"""
import dataclasses
import os

import torch

import cli
import data
import runs
import utils
from codebook import CodebookStats
from conditions import CONTENTS, Content, content_defaults
from distributed import wrap_ddp
from discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
from lpips_loss import LPIPSLoss
from plots import plot_curves
from poses import resolve_part_labelling
from training_loop import TrainingLoop, weight_average
from vqgan import PRESETS, VQGAN, add_vqgan_args, config_from_args, save_vqgan


# Training defaults of each preset; a flag given on the command line wins over them. small:
# measured on the mannequins on 2 CPU cores (README, "Results on the embedded default"). paper:
# taming-transformers' configs/imagenet_vqgan.yaml (base_learning_rate 4.5e-6, which their
# main.py multiplies by batch x GPUs x accumulation as runs.learning_rate does, batch_size 3,
# disc_start 250001, ...) and VQLPIPSWithDiscriminator's L1 + 1.0 x LPIPS from the first step.
PRESET_DEFAULTS = {
    "small": dict(batch_size=8, base_lr=5e-5, warmup_steps=0, min_lr_ratio=0.1,
                  pixel_loss="mse", chroma_weight=5.0, perceptual_weight=1.0, perceptual_start=800,
                  codebook_weight=1.0, disc_weight=0.8, disc_start=10000),
    "paper": dict(batch_size=3, base_lr=4.5e-6, warmup_steps=0, min_lr_ratio=1.0,
                  pixel_loss="l1", chroma_weight=0.0, perceptual_weight=1.0, perceptual_start=0,
                  codebook_weight=1.0, disc_weight=0.8, disc_start=250001),
}
ADAM_BETAS = (0.5, 0.9)  # of both optimizers, as taming-transformers' (bench.py times the same)


def parse_args(argv=None):
    """The flags, with the preset's defaults (PRESET_DEFAULTS, and its resolution unless
    --image-size is given) filled in for the ones not given."""
    presets = "; ".join(f"{name}: {PRESETS[name].resolution} px, " + ", ".join(
        f"--{key.replace('_', '-')} {value}" for key, value in defaults.items())
        for name, defaults in PRESET_DEFAULTS.items())
    parser = cli.ArgumentParser(
        description="Stage 1: train the VQGAN.",
        epilog=f"Preset defaults, each overridden by its flag: {presets}.")
    group = add_vqgan_args(parser)
    group.add_argument("--content", choices=CONTENTS, default="photos", help="what it encodes "
                       "(conditions.py; others than photos: f4 or f8, 256 codes, no LPIPS)")
    data.add_data_args(parser)
    runs.add_run_args(parser)
    # None: the preset's (PRESET_DEFAULTS), and its resolution, unless given
    parser.set_defaults(run_dir=os.path.join("runs", "vqgan"), default_max_steps=1800,
                        image_size=None, batch_size=None, base_lr=None, warmup_steps=None,
                        min_lr_ratio=None)
    group = parser.add_argument_group("loss (defaults: the preset's, see below)")
    group.add_argument("--perceptual-weight", type=cli.non_negative_float, default=None)
    group.add_argument("--perceptual-start", type=cli.non_negative_int, default=None,
                       help="optimizer step at which LPIPS switches on; the steps before have "
                            "the pixel loss only and are cheaper (no VGG16 pass)")
    group.add_argument("--pixel-loss", choices=("l1", "mse"), default=None,
                       help="photos: mean absolute (taming's) or squared error per pixel")
    group.add_argument("--chroma-weight", type=cli.non_negative_float, default=None,
                       help="photos: luma and W x chroma (BT.601) instead of R, G, B (0)")
    group.add_argument("--codebook-weight", type=cli.non_negative_float, default=None)
    group.add_argument("--disc-weight", type=cli.non_negative_float, default=None,
                       help="multiplies the adaptive lambda of the GAN term")
    group.add_argument("--disc-start", type=cli.non_negative_int, default=None,
                       help="optimizer step at which the discriminator and GAN term switch on")
    group.add_argument("--disc-loss", choices=("hinge", "vanilla"), default="hinge")
    group.add_argument("--lpips-weights", default=None, help="VGG16 ImageNet weights for "
                       "LPIPS (default: found automatically, see lpips_loss.py)")
    args = parser.parse_args(argv)
    if args.content != "photos" and (args.pixel_loss, args.chroma_weight) != (None, None):
        raise utils.UserError("--pixel-loss, --chroma-weight: photos only; --content "
                              f"{args.content} has its own loss (conditions.Content.loss)")
    defaults = {**PRESET_DEFAULTS[args.preset], **content_defaults(  # part maps: label channels
        args.content, resolve_part_labelling(args.part_labels).num_labels,
        args.image_size or PRESETS[args.preset].resolution, args.ch_mult)}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.content == "part-maps" and args.perceptual_weight > 0:
        raise utils.UserError("--perceptual-weight: LPIPS compares photos, not part maps")
    args.image_size = args.image_size or PRESETS[args.preset].resolution
    return args


def describe_run(args, config, model, content, precision, channels_last, schedule, world_size):
    """The resolved configuration, printed when a run starts."""
    grid, total = model.token_grid_size, schedule.total
    pictures = "images" if args.content == "photos" else args.content
    lines = [
        f"stage 1: preset {args.preset}, {config.resolution} px {pictures} -> {grid}x{grid} "
        f"tokens of {config.n_embed} codes, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
        "  architecture: " + ", ".join(f"{field.name} {getattr(config, field.name)}"
                                        for field in dataclasses.fields(config)),
        f"  lr {schedule.peak:.3g} (--base-lr {args.base_lr:g} x batch "
        f"{args.batch_size} x --grad-accum {args.grad_accum} x {world_size} process(es))"
        if args.lr is None else f"  lr {args.lr:g} (--lr)",
        f"  {total} steps, warm-up {args.warmup_steps}, min-lr-ratio {args.min_lr_ratio:g}; "
        f"{content.loss_name}, LPIPS x {args.perceptual_weight:g} from step "
        f"{args.perceptual_start}, codebook x {args.codebook_weight:g}, " + (
            f"GAN x {args.disc_weight:g} lambda from step {args.disc_start}" + (
                " (after this run's last step)" if args.disc_start >= total else "")
            if args.disc_weight else "no GAN"),
        f"  precision {precision}, channels_last {'on' if channels_last else 'off'}, compile "
        f"{'on' if args.compile else 'off'}, " + (f"weights averaged with decay {args.ema_decay:g}"
                                                  if args.ema_decay else "no weight averaging"),
    ]
    print("\n".join(lines))


@dataclasses.dataclass
class LossWeights:
    """Generator loss = pixel + perceptual x LPIPS + codebook x VQ loss + disc x lambda x GAN."""

    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    disc_weight: float = 0.8


def adaptive_lambda(last_input, last_conv, grad_rec, grad_gan, disc_weight, average=None):
    """lambda = ||dL_rec/dw|| / (||dL_G/dw|| + 1e-4) at the last conv's weight w, clamped.

    grad_rec and grad_gan are the two losses' gradients at the conv's output x_hat, last_input
    its input (B, C, H, W). The weight gradient of a convolution is a correlation of the two,
    torch.nn.grad.conv2d_weight, so it costs no backward pass through the model: under
    torch.compile, autograd.grad to the weight would run the whole compiled backward. It is
    computed in float32 whatever the autocast dtype, so fp16 cannot underflow it. Under DDP
    `average` all-reduces the two small weight gradients, so every rank uses the lambda of the
    global batch (the one a single process with the whole batch would compute).
    """
    inputs = last_input.detach().float()

    def weight_grad(grad_output):  # (out_ch, C, k, k)
        return torch.nn.grad.conv2d_weight(
            inputs, last_conv.weight.shape, grad_output.float(), stride=last_conv.stride,
            padding=last_conv.padding, dilation=last_conv.dilation, groups=last_conv.groups)
    rec_w, gan_w = weight_grad(grad_rec), weight_grad(grad_gan)
    if average is not None:
        rec_w, gan_w = average(rec_w), average(gan_w)
    weight = rec_w.norm() / (gan_w.norm() + 1e-4)  # NaN, not 0 or 1e4, after an fp16 overflow:
    finite = rec_w.isfinite().all() & gan_w.isfinite().all()  # the loop leaves that step out
    return torch.where(finite, weight.clamp(0.0, 1e4), torch.nan).detach() * disc_weight


def generator_backward(model, lpips, discriminator, images, weights, gan_on, scale=1.0,
                       average=None, last_conv=None, perceptual_on=True, precision="auto",
                       content=Content()):
    """Forward the VQGAN, back-propagate its whole loss (LossWeights `weights`, times `scale`);
    return loss terms. `images` are the `content`'s pictures, which set the reconstruction loss
    (Content.loss: L1, or cross-entropy for part maps).

    The discriminator's parameters receive no gradient here: D is only differentiated with
    respect to its input. `model` may be wrapped (DDP, torch.compile); then `last_conv` names
    the bare VQGAN's decoder.conv_out. `scale` is 1 / --grad-accum times the GradScaler's
    factor under fp16: the losses are scaled before any backward pass (also the ones through
    LPIPS and D to x_hat), so that no fp16 gradient underflows; lambda is taken unscaled.
    """
    with utils.autocast_context(images.device, precision):
        x_hat, codebook_loss, indices, last_input = model(images, return_last_input=True)
    # Split the graph: losses are differentiated to this leaf copy of x_hat, once each.
    x_hat_leaf = x_hat.detach().float().requires_grad_(True)
    with utils.autocast_context(images.device, precision):
        rec_loss = pixel = content.loss(images, x_hat_leaf)
        if perceptual_on:
            perceptual = lpips(images, x_hat_leaf)
            rec_loss = pixel + weights.perceptual_weight * perceptual
    grad_x_hat, = torch.autograd.grad(rec_loss * scale, x_hat_leaf)  # (B, 3, H, W), scaled
    terms = {"rec_loss": pixel.detach(), "codebook": codebook_loss.detach()}
    if perceptual_on:
        terms["perceptual"] = perceptual.detach()
    if gan_on:
        with utils.autocast_context(images.device, precision):
            generator_loss = -discriminator(x_hat_leaf).mean()
        grad_gan, = torch.autograd.grad(generator_loss * scale, x_hat_leaf)
        last_conv = model.decoder.conv_out if last_conv is None else last_conv
        lam = adaptive_lambda(last_input, last_conv, grad_x_hat / scale, grad_gan / scale,
                              weights.disc_weight, average)
        grad_x_hat = grad_x_hat + lam * grad_gan
        terms.update(generator=generator_loss.detach(), disc_lambda=lam)
    torch.autograd.backward([x_hat, codebook_loss * weights.codebook_weight * scale],
                            [grad_x_hat.to(x_hat.dtype), None])
    return x_hat.detach(), indices, terms


def discriminator_backward(discriminator, images, x_hat, disc_loss_fn, scale=1.0, precision="auto"):
    """Hinge (or vanilla) loss on real images and detached reconstructions; D's grads only."""
    with utils.autocast_context(images.device, precision):
        logits_real = discriminator(images)
        logits_fake = discriminator(x_hat.detach())
        loss = disc_loss_fn(logits_real, logits_fake)
    (loss * scale).backward()
    return loss.detach()


@torch.no_grad()
def validate(model, loader, device, precision="auto", content=Content()):
    """Means of the `content`'s validation scores over the split (Content.scores: L1 and PSNR
    of pictures, cross-entropy and pixel accuracy of part maps)."""
    model.eval()
    totals, count = {}, 0
    for batch in loader:
        images = content.inputs(batch).to(device)
        with utils.autocast_context(device, precision):
            x_hat, _, _ = model(images)
        for name, values in content.scores(images, x_hat.float()).items():
            totals[name] = totals.get(name, 0.0) + values.sum().item()
        count += images.shape[0]
    model.train()
    return {name: total / count for name, total in totals.items()}


@torch.no_grad()
def save_reconstructions(model, images, path, precision="auto", content=Content()):
    """Originals on the top row, reconstructions below, de-normalised to real pixel values (part
    maps in their colours)."""
    model.eval()
    with utils.autocast_context(images.device, precision):
        x_hat, _, _ = model(images)
    model.train()
    utils.save_image_grid([list(content.pictures(images).cpu()),
                           list(content.pictures(x_hat.float()).cpu())], path)


def main(argv=None):
    runs.run_training(train, parse_args(argv))


def train(args, dist, device):
    """Train to --max-steps; returns the step at which Ctrl-C stopped it, else None."""
    utils.seed_everything(args.seed)  # the same on every rank: identical initial weights
    config = config_from_args(args)
    run = runs.RunDirectory(args.run_dir, "vqgan_train", "vqgan_last.pt", runs.plain_args(args),
                            dist.world_size, is_main=dist.is_main)
    with dist.main_first():  # rank 0 generates the default data / fetches LPIPS weights first
        train_set, val_set = data.build_datasets(args, progress=dist.is_main)
        lpips = (LPIPSLoss(weights_path=args.lpips_weights).to(device)
                 if args.perceptual_weight > 0 else None)  # condition VQGANs go without
    content = Content.of_data(args.content, train_set, f"--content {args.content}",
                              pixel_loss=args.pixel_loss, chroma_weight=args.chroma_weight)
    sampler = data.EpochBatchSampler(len(train_set), args.batch_size, args.seed, args.flip,
                                     dist.rank, dist.world_size)
    loader = data.make_loader(train_set, sampler, args.num_workers, device)
    # its own generator: drawing a loader's seed must not move the global RNG (exact resume)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size,
                                             generator=torch.Generator())
    schedule = runs.Schedule.from_flags(args, sampler.batches_per_epoch, dist.world_size)

    model = VQGAN(config).to(device)
    discriminator = NLayerDiscriminator(content.channels).to(device)  # BatchNorm: global batch
    precision = utils.resolve_precision(args.precision, device)
    channels_last = utils.use_channels_last(args.channels_last, device)
    if channels_last:
        for module in filter(None, (model, discriminator, lpips)):
            module.to(memory_format=torch.channels_last)
    adam = dict(lr=schedule.peak, betas=ADAM_BETAS, fused=device.type == "cuda")
    opt_g, opt_d = (torch.optim.Adam(net.parameters(), **adam) for net in (model, discriminator))
    scaler = utils.grad_scaler(device, precision)
    disc_loss_fn = hinge_d_loss if args.disc_loss == "hinge" else vanilla_d_loss
    weights = LossWeights(args.perceptual_weight, args.codebook_weight, args.disc_weight)

    ema = weight_average(model, args.ema_decay)  # validated, drawn and saved if on
    inference = ema.module if ema else model
    states = dict(model=model, discriminator=discriminator, opt_g=opt_g, opt_d=opt_d,
                  scaler=scaler, **({"ema": ema} if ema else {}))
    flags = runs.plain_args(args)
    run_config = dict(dataclasses.asdict(config),  # and its content, unless photos (old runs)
                      **({} if args.content == "photos" else {"content": args.content}))
    step = 0
    if args.resume:  # every rank loads the same checkpoint
        step = run.resume(args.resume, run_config, flags, dist.world_size, **states)
    # DDP all-reduces gradients in backward. The generator loss differentiates D with respect
    # to its input only, through the bare module; D's own step goes through its DDP wrapper.
    ddp_model, ddp_discriminator = wrap_ddp(dist, device, model, discriminator)
    forward_model = torch.compile(ddp_model) if args.compile else ddp_model
    average = dist.mean if dist.enabled else None
    fixed_images = content.inputs(next(iter(val_loader)))[:8].to(device)
    if not run.steps_left(step, schedule, args.resume):
        return None
    if dist.is_main:
        describe_run(args, config, model, content, precision, channels_last, schedule,
                     dist.world_size)
    code_stats = CodebookStats(config.n_embed)
    # the window since the last log line: sums of each loss term over its steps, and how many
    # steps had the term (the GAN and LPIPS terms start within a window)
    window_images, window_sums, window_steps = 0, {}, {}
    model.train()
    discriminator.train()
    batches = data.resume_batches(loader, sampler, step * args.grad_accum)
    with TrainingLoop(run, dist, step, schedule.total,
                      max(1, sampler.batches_per_epoch // args.grad_accum), args.log_every,
                      args.save_every, args.sample_every, args.resume, "stage 1") as loop:
        while loop.running():
            gan_on = args.disc_weight > 0 and loop.step >= args.disc_start
            perceptual_on = lpips is not None and loop.step >= args.perceptual_start
            lr = schedule.apply([opt_g, opt_d], loop.step)
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            sums = {}
            # Each micro-batch's loss is divided by grad_accum (and scaled for fp16 if needed:
            # scaler.scale also starts the scaler's state that scaler.step checks for).
            scale = scaler.scale(torch.full((), 1.0 / args.grad_accum, device=device))
            for micro in range(args.grad_accum):
                images = content.inputs(next(batches)).to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # gradients are all-reduced once per step, on its last micro-batch
                with dist.no_sync(ddp_model, ddp_discriminator, last=micro == args.grad_accum - 1):
                    x_hat, indices, terms = generator_backward(
                        forward_model, lpips, discriminator, images, weights, gan_on, scale,
                        average, model.decoder.conv_out, perceptual_on, precision, content)
                    if gan_on:
                        terms["discriminator"] = discriminator_backward(
                            ddp_discriminator, images, x_hat, disc_loss_fn, scale, precision)
                code_stats.update(indices)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0) + value / args.grad_accum
                window_images += images.shape[0] * dist.world_size
            model.quantize.count_step()  # the dead-code window counts optimizer steps
            for key, value in sums.items():  # a NaN in D or the GAN term stops the run too;
                counted = 1  # under fp16 a non-finite lambda is a scaled gradient that
                if key == "disc_lambda" and scaler.is_enabled():  # overflowed: the scaler
                    counted = torch.isfinite(value)  # skips that step, the window's mean too
                    value = torch.where(counted, value, 0.0)
                loop.health.add(value)
                window_sums[key] = window_sums.get(key, 0) + value
                window_steps[key] = window_steps.get(key, 0) + counted
            scaler.step(opt_g)
            if ema:
                ema.update_parameters(model)
            if gan_on:
                scaler.step(opt_d)
            scaler.update()

            due = loop.end_step()
            if due.log:  # window means of the loss terms, like usage and perplexity
                means = {key: float(dist.mean(value)) / float(window_steps[key])
                         for key, value in window_sums.items() if window_steps[key]}
                code_stats.counts = dist.sum(code_stats.counts)  # usage of every rank's codes
                usage, perplexity = code_stats.usage, code_stats.perplexity
                loop.log({**means, "usage": usage, "perplexity": perplexity, "lr": lr},
                         dict(rec=f"{means['rec_loss']:.4f}", usage=f"{usage:.2f}"),
                         images_per_s=window_images)
                code_stats.reset()
                window_images, window_sums, window_steps = 0, {}, {}
            # Rank 0 alone validates, draws and saves, with the bare model (no collectives).
            if due.validate:
                loop.write(validate(inference, val_loader, device, precision, content))
            if due.sample:
                save_reconstructions(inference, fixed_images, run.path(
                    "samples", f"reconstructions_{loop.step:06d}.png"), precision, content)
            if due.save:
                run.save_state(loop.step, run_config, flags, dist.world_size, states,
                               part_labels=train_set.part_labels.to_dict())
                save_vqgan(inference, run.path("vqgan.pt"), args.content)
                plot_curves(loop.records(), [("losses", [
                    "rec_loss", "val_l1", "val_cross_entropy", "perceptual", "codebook",
                    "generator", "discriminator"]),
                                             ("validation", ["val_psnr", "val_pixel_accuracy"])],
                            run.path("loss_curves.png"), title=f"stage 1 ({args.content})")
    if dist.is_main:
        run.report_outputs("stage 1", [
            ("vqgan.pt", "vqgan.pt (for stage 2)"), ("vqgan_last.pt", "vqgan_last.pt (--resume)"),
            ("metrics.jsonl", "metrics.jsonl"), ("loss_curves.png", "loss_curves.png"),
            ("samples", "samples/")])
    return loop.stopped_at


if __name__ == "__main__":
    utils.run_cli(main)
