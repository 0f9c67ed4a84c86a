"""Stage 1: train the VQGAN (encoder, codebook, decoder) against a patch discriminator.

    python training_vqgan.py                         # small preset, synthetic mannequins, CPU ok
    python training_vqgan.py --dataset-path DIR --preset paper --image-size 256

The objective is the paper's:
    L = L1 + perceptual_weight * LPIPS + codebook loss + lambda * (-mean D(x_hat))
with the adaptive weight lambda = ||grad L_rec|| / (||grad L_G|| + 1e-4) at the decoder's last
layer (times --disc-weight), and a hinge-loss PatchGAN; the GAN term switches on at --disc-start.
Before that step neither the GAN term nor the discriminator runs: an untrained generator gives
the discriminator nothing useful to learn from, and skipping it saves two of its
forward/backward passes per step. Likewise LPIPS joins at --perceptual-start (default 0): L1
alone gets the coarse picture right at a fraction of the cost of a step with VGG16 in it. The
learning rate may warm up (--warmup-steps) and follow a cosine down to --min-lr-ratio of its
peak at the last step (1, constant, is taming-transformers' choice).

One step splits the graph at the reconstruction x_hat: LPIPS and the discriminator are
back-propagated once each, to x_hat only; lambda then needs just the last conv's weight
gradient, and one backward from x_hat trains decoder, codebook and encoder. The usual code
instead runs autograd.grad twice through LPIPS and D and then a full backward (a second pass
through both); see bench.py for the saving.

Outputs go to --run-dir (default runs/vqgan): vqgan_last.pt (everything --resume needs,
written atomically), vqgan.pt (the small inference checkpoint stage 2 loads), metrics.jsonl,
loss_curves.png and reconstruction grids under samples/.
"""
import dataclasses
import os
import time

import torch
from tqdm import tqdm

import utils
from codebook import CodebookStats
from discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
from lpips_loss import LPIPSLoss
from vqgan import VQGAN, add_vqgan_args, config_from_args, save_vqgan


def parse_args(argv=None):
    parser = utils.ArgumentParser(description="Stage 1: train the VQGAN.")
    add_vqgan_args(parser)
    utils.add_data_args(parser)
    utils.add_run_args(parser, default_run_dir=os.path.join("runs", "vqgan"),
                       default_batch_size=8, default_base_lr=5e-5,
                       default_max_steps=1800, default_warmup_steps=0, default_min_lr_ratio=0.1)
    group = parser.add_argument_group("loss")
    group.add_argument("--perceptual-weight", type=utils.non_negative_float, default=1.0)
    group.add_argument("--perceptual-start", type=utils.non_negative_int, default=800,
                       help="optimizer step at which the LPIPS term switches on; before it the "
                            "steps are L1 only and cheaper (LPIPS is a VGG16 forward/backward)")
    group.add_argument("--codebook-weight", type=utils.non_negative_float, default=1.0)
    group.add_argument("--disc-weight", type=utils.non_negative_float, default=0.8,
                       help="multiplies the adaptive lambda of the GAN term")
    group.add_argument("--disc-start", type=utils.non_negative_int, default=10000,
                       help="optimizer step at which the discriminator and GAN term switch on")
    group.add_argument("--disc-loss", choices=("hinge", "vanilla"), default="hinge")
    group.add_argument("--lpips-weights", default=None,
                       help="path of the VGG16 ImageNet weights for LPIPS (default: found "
                            "automatically, see lpips_loss.py)")
    return parser.parse_args(argv)


def adaptive_lambda(x_hat, last_layer, grad_rec, grad_gan, disc_weight, average=None):
    """lambda = ||dL_rec/dw|| / (||dL_G/dw|| + 1e-4) at the last layer w, clamped and detached.

    grad_rec and grad_gan are the two losses' gradients at x_hat; pushing each back through
    the last conv alone gives the weight gradients, without touching LPIPS or D again. Under
    DDP `average` all-reduces these two small tensors, so every rank uses the lambda of the
    global batch (the one a single process with the whole batch would compute).
    """
    rec_w, = torch.autograd.grad(x_hat, last_layer, grad_outputs=grad_rec, retain_graph=True)
    gan_w, = torch.autograd.grad(x_hat, last_layer, grad_outputs=grad_gan, retain_graph=True)
    if average is not None:
        rec_w, gan_w = average(rec_w), average(gan_w)
    weight = rec_w.norm() / (gan_w.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight


def generator_backward(model, lpips, discriminator, images, args, gan_on, scale=1.0,
                       average=None, last_layer=None, perceptual_on=True):
    """Forward the VQGAN, back-propagate its whole loss (times `scale`); return loss terms.

    The discriminator's parameters receive no gradient here: D is only differentiated with
    respect to its input. `model` may be wrapped (DDP, torch.compile); then `last_layer` names
    the bare VQGAN's last weight.
    """
    with utils.autocast_context(images.device):
        x_hat, codebook_loss, indices = model(images)
    # Split the graph: losses are differentiated to this leaf copy of x_hat, once each.
    x_hat_leaf = x_hat.detach().float().requires_grad_(True)
    with utils.autocast_context(images.device):
        rec_loss = l1 = (images - x_hat_leaf).abs().mean()
        if perceptual_on:
            perceptual = lpips(images, x_hat_leaf)
            rec_loss = l1 + args.perceptual_weight * perceptual
    grad_x_hat, = torch.autograd.grad(rec_loss, x_hat_leaf)
    terms = {"rec_loss": l1.detach(), "codebook": codebook_loss.detach()}
    if perceptual_on:
        terms["perceptual"] = perceptual.detach()
    if gan_on:
        with utils.autocast_context(images.device):
            generator_loss = -discriminator(x_hat_leaf).mean()
        grad_gan, = torch.autograd.grad(generator_loss, x_hat_leaf)
        last_layer = model.last_layer if last_layer is None else last_layer
        lam = adaptive_lambda(x_hat, last_layer, grad_x_hat.to(x_hat.dtype),
                              grad_gan.to(x_hat.dtype), args.disc_weight, average)
        grad_x_hat = grad_x_hat + lam * grad_gan
        terms.update(generator=generator_loss.detach(), disc_lambda=lam)
    torch.autograd.backward(
        [x_hat, codebook_loss * args.codebook_weight * scale],
        [(grad_x_hat * scale).to(x_hat.dtype), None])
    return x_hat.detach(), indices, terms


def discriminator_backward(discriminator, images, x_hat, disc_loss_fn, scale=1.0):
    """Hinge (or vanilla) loss on real images and detached reconstructions; D's grads only."""
    with utils.autocast_context(images.device):
        logits_real = discriminator(images)
        logits_fake = discriminator(x_hat.detach())
        loss = disc_loss_fn(logits_real, logits_fake)
    (loss * scale).backward()
    return loss.detach()


@torch.no_grad()
def validate(model, loader, device):
    """Mean L1 and PSNR of reconstructions over the validation split."""
    model.eval()
    total_l1 = total_psnr = count = 0.0
    for batch in loader:
        images = batch["image"].to(device)
        with utils.autocast_context(device):
            x_hat, _, _ = model(images)
        x_hat = x_hat.float()
        total_l1 += (images - x_hat).abs().flatten(1).mean(1).sum().item()
        pictures, reconstructions = utils.denormalize(images), utils.denormalize(x_hat)
        total_psnr += utils.psnr(pictures, reconstructions).sum().item()
        count += images.shape[0]
    model.train()
    return {"val_l1": total_l1 / count, "val_psnr": total_psnr / count}


@torch.no_grad()
def save_reconstructions(model, images, path):
    """Originals on the top row, reconstructions below, de-normalised to real pixel values."""
    model.eval()
    with utils.autocast_context(images.device):
        x_hat, _, _ = model(images)
    model.train()
    utils.save_image_grid([list(images.cpu()), list(x_hat.float().cpu())], path)


def main(argv=None):
    utils.run_training(train, parse_args(argv))


def train(args, dist, device):
    """Train to --max-steps; returns the step at which Ctrl-C stopped it, else None."""
    utils.seed_everything(args.seed)  # the same on every rank: identical initial weights
    config = config_from_args(args)
    run = utils.RunDirectory(args.run_dir, "vqgan_train", "vqgan_last.pt",
                             remove_stale=dist.is_main)
    with dist.main_first():  # rank 0 generates the default data / fetches LPIPS weights first
        train_set, val_set = utils.build_datasets(args, progress=dist.is_main)
        lpips = LPIPSLoss(weights_path=args.lpips_weights).to(device)
    sampler = utils.EpochBatchSampler(len(train_set), args.batch_size, args.seed, args.flip,
                                      dist.rank, dist.world_size)
    loader = utils.make_loader(train_set, sampler, args.num_workers, device)
    # its own generator: drawing a loader's seed must not move the global RNG (exact resume)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size,
                                             generator=torch.Generator())

    model = VQGAN(config).to(device)
    discriminator = NLayerDiscriminator().to(device)  # its BatchNorm sees the global batch
    if device.type == "cuda":  # convolutions run faster in NHWC on tensor cores
        for module in (model, discriminator, lpips):
            module.to(memory_format=torch.channels_last)
    peak_lr = utils.learning_rate(args, dist.world_size)
    fused = device.type == "cuda"
    opt_g = torch.optim.Adam(model.parameters(), lr=peak_lr, betas=(0.5, 0.9), fused=fused)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=peak_lr, betas=(0.5, 0.9),
                             fused=fused)
    scaler = utils.grad_scaler(device)
    disc_loss_fn = hinge_d_loss if args.disc_loss == "hinge" else vanilla_d_loss

    step = 0
    if args.resume:  # every rank loads the same checkpoint
        checkpoint = run.load_for_resume(args.resume, dataclasses.asdict(config), args,
                                         dist.world_size)
        model.load_state_dict(checkpoint["model"])
        discriminator.load_state_dict(checkpoint["discriminator"])
        opt_g.load_state_dict(checkpoint["opt_g"])
        opt_d.load_state_dict(checkpoint["opt_d"])
        scaler.load_state_dict(checkpoint["scaler"])
        utils.set_rng_state(checkpoint["rng"])
        step = checkpoint["step"]
    # DDP all-reduces gradients in backward. The generator loss differentiates D with respect
    # to its input only, through the bare module; D's own step goes through its DDP wrapper.
    ddp_model, ddp_discriminator = utils.wrap_ddp(dist, device, model, discriminator)
    forward_model = torch.compile(ddp_model) if args.compile else ddp_model
    average = dist.mean if dist.enabled else None
    metrics = (utils.MetricsLog(run.path("metrics.jsonl"), resume_step=step if args.resume
                                else None) if dist.is_main else None)
    fixed_images = next(iter(val_loader))["image"][:8].to(device)

    def save_checkpoint():
        run.save({"kind": "vqgan_train", "step": step, "config": dataclasses.asdict(config),
                  "args": utils.plain_args(args), "world_size": dist.world_size,
                  "model": model.state_dict(),
                  "discriminator": discriminator.state_dict(), "opt_g": opt_g.state_dict(),
                  "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict(),
                  "rng": utils.get_rng_state()})
        save_vqgan(model, run.path("vqgan.pt"))
        records = utils.read_jsonl(metrics.path) if os.path.exists(metrics.path) else []
        utils.plot_curves(records, [("losses",
                                     ["rec_loss", "val_l1", "perceptual", "codebook", "generator",
                                      "discriminator"]),
                                    ("validation PSNR (dB)", ["val_psnr"])],
                          run.path("loss_curves.png"), title="stage 1")

    total_steps = utils.total_steps(args, sampler.batches_per_epoch)
    if not run.steps_left(step, total_steps, args):
        return None
    steps_per_epoch = max(1, sampler.batches_per_epoch // args.grad_accum)
    code_stats = CodebookStats(config.n_embed)
    health = utils.FiniteCheck()
    stop = utils.StopRequest()
    progress = tqdm(total=total_steps, initial=step, desc="stage 1", dynamic_ncols=True,
                    disable=not dist.is_main)
    window_start, window_images = time.perf_counter(), 0
    model.train()
    discriminator.train()
    batches = utils.resume_batches(loader, sampler, step * args.grad_accum)
    stopping = False
    try:
        while step < total_steps and not stopping:
            gan_on = step >= args.disc_start
            lr = utils.apply_lr_schedule([opt_g, opt_d], step, peak_lr, total_steps, args)
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            sums = {}
            # Each micro-batch's loss is divided by grad_accum (and scaled for fp16 if needed:
            # scaler.scale also starts the scaler's state that scaler.step checks for).
            scale = scaler.scale(torch.full((), 1.0 / args.grad_accum, device=device))
            for micro in range(args.grad_accum):
                images = next(batches)["image"].to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                # gradients are all-reduced once per step, on its last micro-batch
                with dist.no_sync(ddp_model, ddp_discriminator,
                                  last=micro == args.grad_accum - 1):
                    x_hat, indices, terms = generator_backward(
                        forward_model, lpips, discriminator, images, args, gan_on, scale,
                        average, model.last_layer, step >= args.perceptual_start)
                    if gan_on:
                        terms["discriminator"] = discriminator_backward(
                            ddp_discriminator, images, x_hat, disc_loss_fn, scale)
                code_stats.update(indices)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0) + value / args.grad_accum
                window_images += images.shape[0] * dist.world_size
            for value in sums.values():  # every term: a NaN in D or the GAN term stops it too
                health.add(value)
            scaler.step(opt_g)
            if gan_on:
                scaler.step(opt_d)
            scaler.update()
            step += 1
            progress.update(1)

            log_step = step % args.log_every == 0 or step == total_steps
            save_step = step % args.save_every == 0 or step == total_steps
            stopping = stop.should_stop(dist, log_step)
            if log_step or save_step or stopping:  # never log or save past a NaN
                health.check(step, run.path("vqgan_last.pt"), dist)
            if log_step:
                sums = {key: float(dist.mean(value)) for key, value in sums.items()}
                code_stats.counts = dist.sum(code_stats.counts)  # usage of every rank's codes
                if dist.is_main:
                    elapsed = time.perf_counter() - window_start
                    usage, perplexity = code_stats.usage, code_stats.perplexity
                    metrics.write({"step": step, **sums, "usage": usage,
                                   "perplexity": perplexity, "lr": lr,
                                   "images_per_s": window_images / elapsed})
                    progress.set_postfix(l1=f"{sums['rec_loss']:.4f}", usage=f"{usage:.2f}")
                code_stats.reset()
                window_start, window_images = time.perf_counter(), 0
            if not dist.is_main:
                continue
            # Rank 0 alone validates, draws and saves, with the bare model (no collectives).
            if step % steps_per_epoch == 0 or step == total_steps:
                metrics.write({"step": step, **validate(model, val_loader, device)})
            if step % args.sample_every == 0 or step == total_steps:
                save_reconstructions(model, fixed_images,
                                     run.path("samples", f"reconstructions_{step:06d}.png"))
            if save_step or stopping:
                save_checkpoint()
    finally:  # also on errors (NaN, a second Ctrl-C): in-process callers get Ctrl-C back
        progress.close()
        stop.restore()
    if dist.is_main:
        run.report_outputs("stage 1", [
            ("vqgan.pt", "vqgan.pt (for stage 2)"), ("vqgan_last.pt", "vqgan_last.pt (--resume)"),
            ("metrics.jsonl", "metrics.jsonl"), ("loss_curves.png", "loss_curves.png"),
            ("samples", "samples/")])
    return step if stopping else None


if __name__ == "__main__":
    utils.run_cli(main)
