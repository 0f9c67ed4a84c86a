"""Benchmarks that print figures: one stage-1 training step, sampling speed, stage-2 training.

    python bench.py vqgan --preset paper --batch-size 4 --image-size 64
    python bench.py vqgan --compile          # small preset, eager and compiled side by side
    python bench.py sample --n-layer 8 --n-head 8 --n-embd 512 --batch-size 4 --tokens 256
    python bench.py transformer --n-layer 6 --n-head 8 --n-embd 256 --batch-size 32
    python bench.py superres --batch-size 16       # the stage-3 generator's forward, x2 of 64 px

`vqgan` times a full training step (generator with the preset's pixel loss, LPIPS and the
adaptive GAN weight, then the discriminator, then both Adam steps) of the model that
training_vqgan.py builds, and beside it the usual formulation that calls autograd.grad twice
through the full graph and then back-propagates everything again.
With --compile, `vqgan` and `transformer` time each step eager and torch.compile'd side by
side: through a compiled model, autograd.grad to the last layer runs the whole compiled backward,
which the graph split avoids. --preset sets the VQGAN, its resolution (unless --image-size) and
its loss weights; --precision and --channels-last are the trainers' flags.
`sample` times generation of --tokens tokens with the KV cache (on the CPU also with int8 Linear
layers, mingpt.int8_for_cpu) and, as the baseline, by re-running the whole sequence for every new
token (what samplers without a cache do, e.g. dome272/VQGAN-pytorch's), all in one run.
`transformer` times stage-2 optimizer steps on random tokens (training reads cached tokens, so
this is the whole step). `superres` times the stage-3 generator's forward (inference, as
sample.py enlarges) at its default size, or the --sr-* flags'. Random weights: speed does not
depend on training.
"""
import argparse
import resource
import time

import torch

import cli
import utils
from mingpt import GPT, TRAINING_CPU_BF16, GPTConfig, int8_for_cpu
from superres import add_superres_args
from vqgan import PRESETS


def timed(function, warmup, repeats, device):
    """Seconds per call of function(), after `warmup` untimed calls."""
    for _ in range(warmup):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU peak"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB process peak RSS"


def variants(model, args):
    """[("eager", model)], plus ("compiled", torch.compile(model)) with --compile: the two are
    timed side by side."""
    return [("eager", model)] + ([("compiled", torch.compile(model))] if args.compile else [])


def warmup_calls(args, name):
    """A compiled variant compiles its forward and backward in its first calls: never time them."""
    return max(args.warmup, 2) if name == "compiled" else args.warmup


def bench_vqgan(args, device):
    from discriminator import NLayerDiscriminator, hinge_d_loss
    from lpips_loss import LPIPSLoss
    from conditions import Content
    from training_vqgan import (ADAM_BETAS, PRESET_DEFAULTS, LossWeights,
                                discriminator_backward, generator_backward)
    from vqgan import VQGAN, config_from_args
    # the trainer's model: the preset at its resolution unless --image-size is given (bench's
    # --n-embed is stage 2's)
    config = config_from_args(argparse.Namespace(preset=args.preset, image_size=args.image_size))
    model = VQGAN(config).to(device).train()
    discriminator = NLayerDiscriminator().to(device).train()
    optimizers = [torch.optim.Adam(net.parameters(), betas=ADAM_BETAS, fused=device.type == "cuda")
                  for net in (model, discriminator)]  # as training_vqgan.train makes them
    preset = PRESET_DEFAULTS[args.preset]
    content = Content(pixel_loss=preset["pixel_loss"], chroma_weight=preset["chroma_weight"])
    lpips = LPIPSLoss(weights_path=args.lpips_weights).to(device)
    precision = utils.resolve_precision(args.precision, device)
    channels_last = utils.use_channels_last(args.channels_last, device)
    if channels_last:
        for module in (model, discriminator, lpips):
            module.to(memory_format=torch.channels_last)
    size = config.resolution
    images = torch.rand(args.batch_size, 3, size, size, device=device) * 2 - 1
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    loss_args = LossWeights(**{k: preset[k] for k in (
        "perceptual_weight", "codebook_weight", "disc_weight")})

    def optimizer_steps():
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def ours(forward_model):
        x_hat, _, _ = generator_backward(forward_model, lpips, discriminator, images, loss_args,
                                         gan_on=True, last_conv=model.decoder.conv_out,
                                         precision=precision, content=content)
        discriminator_backward(discriminator, images, x_hat, hinge_d_loss, precision=precision)
        optimizer_steps()

    def conventional(forward_model):  # autograd.grad twice through LPIPS and D, then backward
        with utils.autocast_context(device, precision):
            x_hat, codebook_loss, _ = forward_model(images)
            rec_loss = (content.loss(images, x_hat)
                        + loss_args.perceptual_weight * lpips(images, x_hat))
            generator_loss = -discriminator(x_hat).mean()
        last = model.last_layer
        rec_grad, = torch.autograd.grad(rec_loss, last, retain_graph=True)
        gan_grad, = torch.autograd.grad(generator_loss, last, retain_graph=True)
        lam = (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()
        (rec_loss + lam * loss_args.disc_weight * generator_loss
         + loss_args.codebook_weight * codebook_loss).backward()
        discriminator_backward(discriminator, images, x_hat, hinge_d_loss, precision=precision)
        optimizer_steps()

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"vqgan preset {args.preset} ({params:.1f}M params), {size} px, batch "
          f"{args.batch_size}, device {device_name(device)}, precision {precision}, "
          f"channels_last {'on' if channels_last else 'off'}; seconds per training step:")
    models = variants(model, args)
    print(f"  {'':<48}" + "".join(f"{name:>12}" for name, _ in models))
    for name, step in (("ours (graph split at x_hat)", ours),
                       ("conventional (2x autograd.grad + full backward)", conventional)):
        seconds = [timed(lambda: step(forward_model), warmup_calls(args, variant),
                         args.repeats, device) for variant, forward_model in models]
        print(f"  {name:<48}" + "".join(f"{t:10.3f} s" for t in seconds)
              + f"   ({args.batch_size / seconds[0]:.2f} images/s eager)")
    print(f"  memory: {peak_memory(device)}")


def random_prefix_model(args, device):
    """A GPT the size of a pose transformer: codes + keypoint-cell tokens, a --prefix of
    condition tokens (17 keypoints; 64 or 256 codes of an f8 or f4 condition VQGAN at 64 px;
    256 parts)."""
    prefix = args.prefix
    config = GPTConfig(vocab_size=args.n_embed + 33 * 33, block_size=prefix + args.tokens - 1,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       output_size=args.n_embed)
    model = GPT(config).to(device).eval()
    cond = torch.randint(args.n_embed, config.vocab_size, (args.batch_size, prefix), device=device)
    return model, cond


@torch.no_grad()
def bench_sample(args, device):
    from sampling import sample_next
    model, cond = random_prefix_model(args, device)
    generator = torch.Generator(device=device)
    P = cond.shape[1]

    def cached(gpt):  # the prompt once, then one token per step through the KV cache
        generator.manual_seed(0)
        cache = gpt.new_kv_cache(args.batch_size)
        logits = gpt(cond, cache)[:, -1]
        tokens = []
        for i in range(args.tokens):
            tokens.append(sample_next(logits, generator, top_k=100))
            if i + 1 < args.tokens:
                logits = gpt(tokens[-1], cache, start_pos=P + i)[:, -1]
        return torch.cat(tokens, 1)

    def recompute(gpt):  # the whole sequence again for each new token, as samplers without a cache
        generator.manual_seed(0)
        sequence = cond
        for _ in range(args.tokens):
            logits = gpt(sequence)[:, -1]
            sequence = torch.cat([sequence, sample_next(logits, generator, top_k=100)], 1)
        return sequence[:, P:]

    precision = utils.resolve_precision(args.precision, device)
    quantized = int8_for_cpu(model) if device.type == "cpu" else None
    runs = [("KV cache", cached, model, precision), ("full recompute", recompute, model, precision)]
    if quantized is not None:  # int8 Linear layers take float32 only (as sample.py --int8)
        runs.insert(1, ("KV cache, int8", cached, quantized, "fp32"))
    print(f"sampling {args.tokens} tokens after {P} condition tokens, GPT {args.n_layer} layers "
          f"x {args.n_head} heads x {args.n_embd} wide ({model.num_params() / 1e6:.1f}M params), "
          f"batch {args.batch_size}, device {device_name(device)}, precision {precision}, "
          f"{torch.get_num_threads()} threads")
    speeds, tokens = {}, {}
    for name, run, gpt, run_precision in runs:
        def call():  # keeps the tokens of the last timed call
            with utils.autocast_context(device, run_precision):
                tokens[name] = run(gpt)
        speeds[name] = args.batch_size * args.tokens / timed(call, args.warmup, args.repeats,
                                                             device)
    for name, *_ in runs:
        print(f"  {name:<16} {args.batch_size * args.tokens / speeds[name]:8.2f} s "
              f"{speeds[name]:9.1f} tokens/s  "
              f"{speeds[name] / speeds['full recompute']:5.1f}x the full recompute")
    print(f"  KV cache and full recompute sample identical tokens: "
          f"{torch.equal(tokens['KV cache'], tokens['full recompute'])}")
    if quantized is not None:
        exact, approximate = model(cond), quantized(cond)  # float32 logits over the prompt
        error = (approximate - exact).abs().mean() / exact.std()
        same = (tokens["KV cache, int8"] == tokens["KV cache"]).float().mean()
        print(f"  int8: logits off by {100 * error:.1f} % of float32's spread; {100 * same:.0f} % "
              f"of the sampled tokens equal the {precision} model's")


def bench_transformer(args, device):
    model, cond = random_prefix_model(args, device)
    model.train()
    optimizer = model.configure_optimizer(0.01, 3e-4, (0.9, 0.95), device.type)
    precision = utils.resolve_precision(args.precision, device, cpu_bf16=TRAINING_CPU_BF16)
    tokens = torch.randint(0, args.n_embed, (args.batch_size, args.tokens), device=device)
    sequence = torch.cat([cond, tokens[:, :-1]], 1)

    def step(forward_model):
        with utils.autocast_context(device, precision):
            logits = forward_model(sequence)[:, cond.shape[1] - 1:]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                     tokens.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(f"stage-2 training, GPT {args.n_layer}x{args.n_head}x{args.n_embd} "
          f"({model.num_params() / 1e6:.1f}M params), batch {args.batch_size} x {args.tokens} "
          f"tokens after {args.prefix} condition tokens, device {device_name(device)}, precision "
          f"{precision}")
    for name, forward_model in variants(model, args):
        seconds = timed(lambda: step(forward_model), warmup_calls(args, name), args.repeats,
                        device)
        print(f"  {name:<9} {seconds:7.3f} s/step  {1 / seconds:6.2f} steps/s  "
              f"{args.batch_size * args.tokens / seconds:8.0f} tokens/s")
    print(f"  memory: {peak_memory(device)}")


@torch.no_grad()
def bench_superres(args, device):
    from superres import SuperResConfig, SuperResolution
    config = SuperResConfig(scale=args.scale, nf=args.sr_nf, nb=args.sr_nb, gc=args.sr_gc,
                            in_size=args.image_size or 64)
    model = SuperResolution(config).to(device).eval()
    images = torch.rand(args.batch_size, 3, config.in_size, config.in_size, device=device) * 2 - 1
    precision = utils.resolve_precision(args.precision, device)
    print(f"super-resolution x{config.scale}, {config.in_size} -> {config.out_size} px, RRDB nf "
          f"{config.nf} x {config.nb} blocks, gc {config.gc} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), batch "
          f"{args.batch_size}, device {device_name(device)}, precision {precision}, "
          f"{torch.get_num_threads()} thread(s)")
    with utils.autocast_context(device, precision):
        seconds = timed(lambda: model(images), args.warmup, args.repeats, device)
    print(f"  forward {seconds:.3f} s per batch, {args.batch_size / seconds:.1f} images/s")
    print(f"  memory: {peak_memory(device)}")


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def main(argv=None):
    parser = cli.ArgumentParser(description="Speed benchmarks.")
    parser.add_argument("what", choices=("vqgan", "sample", "transformer", "superres"))
    parser.add_argument("--device", type=cli.device_name, default="auto")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="CPU threads (torch)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=4)
    parser.add_argument("--warmup", type=cli.non_negative_int, default=1)
    parser.add_argument("--repeats", type=cli.positive_int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="vqgan, transformer: time torch.compile'd steps beside eager ones")
    parser.add_argument("--precision", choices=utils.PRECISIONS, default="auto",
                        help="autocast dtype, as the trainers' --precision")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="vqgan: NHWC memory format (default: on with CUDA and x86 CPUs)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="vqgan: VQGAN preset (its loss weights too)")
    parser.add_argument("--image-size", type=cli.positive_int, default=None,
                        help="vqgan: image side (default: the preset's resolution); superres: "
                             "the input side (default 64)")
    parser.add_argument("--lpips-weights", default=None, help="vqgan: VGG16 weights for LPIPS")
    parser.add_argument("--n-layer", type=cli.positive_int, default=8)
    parser.add_argument("--n-head", type=cli.positive_int, default=8)
    parser.add_argument("--n-embd", type=cli.positive_int, default=512)
    parser.add_argument("--n-embed", type=cli.positive_int, default=1024,
                        help="codebook size (vocabulary)")
    parser.add_argument("--tokens", type=cli.positive_int, default=256,
                        help="image tokens per sequence")
    parser.add_argument("--scale", type=cli.positive_int, choices=(2, 4), default=2,
                        help="superres: x2 or x4")
    add_superres_args(parser)
    parser.add_argument("--prefix", type=cli.positive_int, default=17,
                        help="sample, transformer: condition tokens before them (17 keypoints, "
                             "64 or 256 codes of a condition VQGAN, 256 part cells)")
    args = parser.parse_args(argv)
    if args.n_embd % args.n_head:
        raise utils.UserError(f"--n-embd {args.n_embd} must be a multiple of --n-head "
                              f"{args.n_head}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = utils.pick_device(args.device)
    {"vqgan": bench_vqgan, "sample": bench_sample, "transformer": bench_transformer,
     "superres": bench_superres}[args.what](args, device)


if __name__ == "__main__":
    utils.run_cli(main)
