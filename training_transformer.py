"""Stage 2: train the pose-conditioned GPT over the frozen VQGAN's tokens.

    python training_transformer.py          # mannequins, the default stage-1 run's vqgan.pt
    python training_transformer.py --vqgan-checkpoint RUN/vqgan.pt --dataset-path DIR

The VQGAN is frozen, so every image has fixed tokens: the training and validation sets are
encoded once (both flips when flipping is on) and cached in RUN/token_cache/, keyed by
everything the cache's contents depend on: the VQGAN checkpoint's content hash, the data flags,
the part labelling (flips swap its labels), the precision tokens are encoded in, and the files
(PoseImageDataset.fingerprint: a content hash of poses.json or the COCO file, and the path,
size and modification time of every image and part map). Later epochs, resumed runs and new
runs on unchanged data read the cache and never run the encoder again; the training loop only
indexes tensors already in memory.

The image size is the VQGAN's resolution unless --image-size says otherwise (which is refused
when it differs). --precision sets the GPT's autocast dtype, with a GradScaler under fp16
(utils.resolve_precision), and the resolved configuration is printed when a run starts.

Each sequence is [condition prefix | image tokens]; the condition comes from the data
(--condition auto picks keypoints, else part maps, else none; --condition class reads
folder-per-class data, DIR/<class>/.../image.png, and keeps the class names in the model's
config). --condition keypoint-vqgan|parts-vqgan --condition-vqgan PATH conditions on the codes
of a condition VQGAN (training_vqgan.py --content keypoint-images|part-maps) for the pose's
picture or one-hot part map: they are encoded once from the cached poses (flipped with them)
into RUN/token_cache/conditions-*.pt, keyed by the image tokens' key and that VQGAN's hash.

Outputs in --run-dir (default runs/transformer): transformer_last.pt (atomic, --resume and
sample.py read it), metrics.jsonl, loss_curves.png, and sample grids under samples/ with one
row per validation example: pose | original | reconstruction | completion of the bottom half |
two new samples.
"""
import math
import os

import torch
from tqdm import tqdm

import cli
import data
import runs
import utils
from conditions import CONDITION_CONTENT, Content
from distributed import wrap_ddp
from mingpt import TRAINING_CPU_BF16
from plots import plot_curves
from poses import COCO17, condition_picture
from sampling import add_sampling_args, sampling_options
from training_loop import TrainingLoop, weight_average
from transformer import CONDITION_MODES, POSE_INPUT, PoseTransformer
from vqgan import load_vqgan


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Stage 2: train the pose-conditioned GPT.")
    parser.add_argument("--vqgan-checkpoint", default=os.path.join("runs", "vqgan", "vqgan.pt"),
                        help="stage-1 inference checkpoint (vqgan.pt)")
    data.add_data_args(parser)
    runs.add_run_args(parser)
    # lr 3e-3 at batch 16, measured for the default 1.9M GPT (1e-3 / 2e-3 / 5e-3 ended at
    # 3.96 / 3.79 / 3.72 bits per token, 3e-3 at 3.63: README, "What each change was worth");
    # a wider GPT wants less
    parser.set_defaults(run_dir=os.path.join("runs", "transformer"), batch_size=16,
                        base_lr=1.875e-4, default_max_steps=2300, warmup_steps=100,
                        min_lr_ratio=0.1, ema_decay=None, image_size=None)  # size: the VQGAN's
    group = parser.add_argument_group("model")
    group.add_argument("--condition", choices=("auto",) + CONDITION_MODES, default="auto",
                       help="class: one class token, the image's first folder below "
                            "--dataset-path (DIR/<class>/...); keypoint-vqgan, parts-vqgan: the "
                            "codes of --condition-vqgan for the pose's picture or part map")
    group.add_argument("--condition-vqgan", default=None, metavar="PATH",
                       help="the condition VQGAN (vqgan.pt of training_vqgan.py --content "
                            "keypoint-images or part-maps) of --condition *-vqgan")
    group.add_argument("--keypoint-grid", type=cli.positive_int, default=None,
                       help="G of the G x G keypoint grid (default: twice the token grid)")
    # The defaults train on two CPU cores in about 14 minutes (1.5M parameters); for a GPU
    # the paper's stage 2 is far larger (e.g. --n-layer 24 --n-head 16 --n-embd 1024).
    group.add_argument("--n-layer", type=cli.positive_int, default=6)
    group.add_argument("--n-head", type=cli.positive_int, default=4)
    group.add_argument("--n-embd", type=cli.positive_int, default=128,
                       help="width of the GPT, a multiple of --n-head")
    group.add_argument("--dropout", type=cli.unit_fraction, default=0.0)
    group.add_argument("--pkeep", type=cli.unit_fraction, default=1.0,
                       help="keep each input image token with this probability (else random)")
    group.add_argument("--condition-dropout", type=cli.unit_fraction, default=None,
                       help="replace each pose with the empty one with this probability, so that "
                            "samples can be guided (--guidance; default: 0.1 with a pose "
                            "condition, else 0)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--weight-decay", type=cli.non_negative_float, default=0.01)
    group.add_argument("--grad-clip", type=cli.positive_float, default=1.0)
    group = parser.add_argument_group("sample grids")
    group.add_argument("--grid-examples", type=cli.positive_int, default=6)
    add_sampling_args(group)
    args = parser.parse_args(argv)
    if args.condition in CONDITION_CONTENT and args.condition_vqgan is None:
        raise utils.UserError(f"--condition {args.condition} needs --condition-vqgan PATH, the "
                              f"vqgan.pt of training_vqgan.py --content "
                              f"{CONDITION_CONTENT[args.condition]}")
    if args.condition_vqgan is not None and args.condition not in CONDITION_CONTENT:
        raise utils.UserError(f"--condition-vqgan is for --condition "
                              f"{' or '.join(CONDITION_CONTENT)}; leave it out")
    if args.n_embd % args.n_head:
        raise utils.UserError(f"--n-embd {args.n_embd} must be a multiple of --n-head "
                              f"{args.n_head}, so that every head gets as many channels")
    return args


# ---- the token cache -----------------------------------------------------------------------


@torch.no_grad()
def encode_split(model, dataset, flips, batch_size, device, num_workers, desc):
    """Encode every (image, flip) of a dataset once: tokens (N, F, L) and poses, on the CPU."""
    items = [(index, flip) for index in range(len(dataset)) for flip in flips]
    # its own generator: drawing worker seeds from the global RNG would make a run that finds
    # the cache train differently from one that encodes
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=items,
                                         num_workers=num_workers, generator=torch.Generator())
    tokens, keypoints, parts, labels = [], [], [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        tokens.append(model.image_tokens(batch["image"].to(device)).cpu())  # (B, L)
        if "keypoints" in batch:
            keypoints.append(batch["keypoints"])  # (B, K, 3)
        if "parts" in batch:
            parts.append(batch["parts"].to(torch.uint8))  # (B, S, S)
        if "label" in batch:
            labels.append(batch["label"])  # (B,)

    def per_example(chunks):  # (N * F, ...) -> (N, F, ...)
        return torch.cat(chunks).unflatten(0, (len(dataset), len(flips))) if chunks else None

    return {"tokens": per_example(tokens), "keypoints": per_example(keypoints),
            "parts": per_example(parts), "labels": per_example(labels),
            "paths": [e.name for e in dataset.examples]}


def load_token_cache(run, model, train_set, val_set, args, vqgan_sha256, device):
    """Tokens of both splits, from RUN/token_cache/ when this VQGAN and data were seen before."""
    # format 2: encoded by the NCHW VQGAN as evaluate.py encodes, joints on the edge visible
    key = {"vqgan_sha256": vqgan_sha256, "flip": args.flip, "format": 2,
           **{k: getattr(args, k) for k in data.SPLIT_FLAGS},
           "part_labels": train_set.part_labels.to_dict(),
           "encoding_precision": utils.resolve_precision("auto", device),  # VQGAN.image_tokens
           "files": {"train": train_set.fingerprint(), "val": val_set.fingerprint()}}
    if train_set.class_names:  # only then: caches of runs without classes keep their names
        key["class_names"] = train_set.class_names
    names = {"train": [e.name for e in train_set.examples],
             "val": [e.name for e in val_set.examples]}
    flips = (False, True) if args.flip else (False,)
    return run.cached("token_cache", "tokens", key, names, lambda: {
        "train": encode_split(model, train_set, flips, args.batch_size, device, args.num_workers,
                              "encoding train split"),
        "val": encode_split(model, val_set, (False,), args.batch_size, device, args.num_workers,
                            "encoding val split")})


def load_condition_cache(run, model, cache, condition_vqgan_sha256):
    """Prefixes (N, F, P) of both splits' cached poses from the condition VQGAN, encoded once:
    from RUN/token_cache/ when these image tokens and this condition VQGAN were seen before."""
    image_key = cache["key"]
    key = {"vqgan_sha256": condition_vqgan_sha256,  # names the file, with the image settings
           "image_tokens": {k: v for k, v in image_key.items() if k != "files"},
           "files": image_key["files"]}
    return run.cached("token_cache", "conditions", key, {},
                      lambda: {split: condition_prefixes(model, cache[split])
                               for split in ("train", "val")})


def condition_prefixes(model, split, chunk=256):
    """Condition prefixes (N, F, P) for every cached example, computed once before training."""
    N, F = split["tokens"].shape[:2]
    flat = {key: split[cached].flatten(0, 1)  # (N, F, ...) -> (N * F, ...), a batch of items
            for key, cached in (("keypoints", "keypoints"), ("parts", "parts"), ("label", "labels"))
            if split.get(cached) is not None}
    prefixes = [model.condition_tokens({key: value[start:start + chunk]
                                        for key, value in flat.items()},
                                       batch_size=min(chunk, N * F - start)).cpu()
                for start in tqdm(range(0, N * F, chunk), desc="condition prefixes", leave=False)]
    return torch.cat(prefixes).unflatten(0, (N, F))


# ---- training ------------------------------------------------------------------------------


@torch.no_grad()
def validation_bits(model, tokens, prefixes, batch_size, device, precision="auto"):
    """Mean negative log-likelihood of validation image tokens, in bits per token."""
    model.eval()
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        batch_tokens = tokens[start:start + batch_size].to(device)
        with utils.autocast_context(device, precision):
            _, loss = model(prefixes[start:start + batch_size].to(device), batch_tokens)
        total += loss.float().item() * len(batch_tokens)
    model.train()
    return total / len(tokens) / math.log(2)


@torch.no_grad()
def save_sample_grid(model, val_set, val_split, prefixes, args, device, path, precision="auto"):
    """Rows: pose | original | reconstruction | completion from the top half | two samples."""
    model.eval()
    count = min(args.grid_examples, len(val_set))
    tokens = val_split["tokens"][:count, 0].to(device)  # (n, L)
    cond = prefixes[:count].to(device)  # (n, P)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    options = dict(sampling_options(args), generator=generator)
    half = tokens.shape[1] // 2
    with utils.autocast_context(device, precision):
        completion = model.sample(cond, prefix_tokens=tokens[:, :half], **options)
        samples = model.sample(cond.repeat(2, 1), **options)  # (2n, L)
        pictures = model.decode(torch.cat([tokens, completion, samples])).float().cpu()
    model.train()
    reconstruction, completion, first, second = pictures[:count], pictures[count:2 * count], \
        pictures[2 * count:3 * count], pictures[3 * count:]
    layout = val_set.layout or COCO17
    rows = []
    for i in range(count):
        keypoints, parts = (None if val_split[key] is None else val_split[key][i, 0]
                            for key in ("keypoints", "parts"))  # cached, unflipped
        rows.append([condition_picture(model.condition, keypoints, parts, layout,
                                       (args.image_size, args.image_size)),
                     val_set[i]["image"], reconstruction[i], completion[i], first[i], second[i]])
    utils.save_image_grid(rows, path)


def choose_condition(requested, dataset):
    if requested != "auto":
        if requested == "keypoints" and not dataset.has_keypoints:
            raise utils.UserError(f"--condition keypoints needs a poses.json (or COCO file) in "
                                  f"{dataset.root}")
        if requested == "parts" and not dataset.has_parts:
            raise utils.UserError(f"--condition parts needs part maps in {dataset.root}/parts/")
        if requested in CONDITION_CONTENT:  # a condition VQGAN of that content, for that data
            Content.of_data(CONDITION_CONTENT[requested], dataset, f"--condition {requested}")
        # --condition class: build_datasets has read the class folders (or said what is wrong)
        return requested
    return "keypoints" if dataset.has_keypoints else "parts" if dataset.has_parts else "none"


def main(argv=None):
    runs.run_training(train, parse_args(argv))


def train(args, dist, device):
    """Train to --max-steps; returns the step at which Ctrl-C stopped it, else None."""
    utils.seed_everything(args.seed)  # the same on every rank: identical initial weights
    if not os.path.exists(args.vqgan_checkpoint):
        raise utils.UserError(f"no stage-1 checkpoint at {args.vqgan_checkpoint}; run "
                              "python training_vqgan.py first or pass --vqgan-checkpoint")
    vqgan = load_vqgan(args.vqgan_checkpoint, device)
    frozen = {"vqgan_sha256": utils.file_sha256(args.vqgan_checkpoint)}  # the content hashes
    condition_vqgan = None
    if args.condition_vqgan is not None:  # frozen like the image VQGAN, and of the right content
        condition_vqgan = load_vqgan(args.condition_vqgan, device,
                                     CONDITION_CONTENT[args.condition])
        frozen["condition_vqgan_sha256"] = utils.file_sha256(args.condition_vqgan)
    if args.image_size is None:
        args.image_size = vqgan.config.resolution
    elif vqgan.config.resolution != args.image_size:
        raise utils.UserError(f"the VQGAN in {args.vqgan_checkpoint} was trained on "
                              f"{vqgan.config.resolution} px images; pass --image-size "
                              f"{vqgan.config.resolution} or leave it out")
    precision = utils.resolve_precision(args.precision, device, cpu_bf16=TRAINING_CPU_BF16)
    run = runs.RunDirectory(args.run_dir, "transformer_train", "transformer_last.pt",
                            runs.plain_args(args), dist.world_size, dist.is_main, frozen)
    with dist.main_first():  # rank 0 generates the default data before the others read it
        train_set, val_set = data.build_datasets(args, progress=dist.is_main,
                                                 class_labels=args.condition == "class")
    condition = choose_condition(args.condition, train_set)
    # defaults measured on the default run (README, Results); a resumed run keeps its own (runs
    # from before they existed had neither: 0)
    trained = run.trained_flags(args.resume)
    if args.ema_decay is None:
        args.ema_decay = trained.get("ema_decay", 0.0) if args.resume else 0.995
    if args.condition_dropout is None:
        args.condition_dropout = (trained.get("condition_dropout", 0.0) if args.resume else
                                  0.1 if condition in POSE_INPUT else 0.0)
    layout = train_set.layout or COCO17
    model = PoseTransformer(vqgan, condition=condition, image_size=args.image_size,
                            num_keypoints=layout.num_keypoints, keypoint_grid=args.keypoint_grid,
                            num_part_labels=train_set.part_labels.num_labels,
                            class_names=train_set.class_names, n_layer=args.n_layer,
                            n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                            condition_dropout=args.condition_dropout,
                            condition_vqgan=condition_vqgan, pose_layout=layout.name).to(device)
    guidance = model.resolve_guidance(args.guidance)  # of the grids: refused now, not at step 500
    with dist.main_first():  # rank 0 encodes and writes the caches; the others then read them
        cache = load_token_cache(run, model, train_set, val_set, args, frozen["vqgan_sha256"],
                                 device)
        prefixes = (load_condition_cache(run, model, cache, frozen.get("condition_vqgan_sha256"))
                    if condition_vqgan else {split: condition_prefixes(model, cache[split])
                                             for split in ("train", "val")})
    channels_last = utils.use_channels_last(args.channels_last, device)
    if channels_last:  # the grids' decoding only: the cache was encoded as evaluate.py encodes
        vqgan.to(memory_format=torch.channels_last)
    train_tokens, val_tokens = cache["train"]["tokens"], cache["val"]["tokens"][:, 0]
    train_prefixes, val_prefixes = prefixes["train"], prefixes["val"][:, 0]  # (N, F, P), (N, P)

    sampler = data.EpochBatchSampler(len(train_tokens), args.batch_size, args.seed, args.flip,
                                     dist.rank, dist.world_size)
    schedule = runs.Schedule.from_flags(args, sampler.batches_per_epoch, dist.world_size)
    optimizer = model.gpt.configure_optimizer(args.weight_decay, schedule.peak, (0.9, 0.95),
                                              device.type)
    scaler = utils.grad_scaler(device, precision)
    config = dict(model.config, **frozen)  # flat: --resume names the field
    ema = weight_average(model, args.ema_decay)  # of the GPT: validated, sampled, saved
    inference = ema.module if ema else model
    states = dict(model=model, optimizer=optimizer, scaler=scaler, **({"ema": ema} if ema else {}))
    flags = runs.plain_args(args)
    step = 0
    if args.resume:  # every rank loads the same checkpoint
        step = run.resume(args.resume, config, flags, dist.world_size, **states)
    if not run.steps_left(step, schedule, args.resume):
        return None
    ddp_model, = wrap_ddp(dist, device, model)
    forward_model = torch.compile(ddp_model) if args.compile else ddp_model
    if dist.is_main:
        grid = model.token_grid
        lr_source = "--lr" if args.lr is not None else (
            f"--base-lr {args.base_lr:g} x batch {args.batch_size} x --grad-accum "
            f"{args.grad_accum} x {dist.world_size} process(es)")
        print(f"stage 2: {condition} conditioning, {model.gpt.num_params() / 1e6:.2f}M "
              f"parameters, {len(train_tokens)} training images, {schedule.total} steps\n"
              f"  {args.image_size} px images -> {grid}x{grid} tokens of "
              f"{vqgan.config.n_embed} codes; GPT {args.n_layer} layers x {args.n_head} heads x "
              f"{args.n_embd}, batch {args.batch_size}, lr {schedule.peak:.3g} ({lr_source}), "
              f"warm-up {args.warmup_steps}, min-lr-ratio {args.min_lr_ratio:g}, "
              + (f"weights averaged with decay {args.ema_decay:g}" if args.ema_decay else
                 "no weight averaging") + f"; condition dropout {args.condition_dropout:g}, "
              f"sampled with guidance {guidance:g}\n"
              f"  precision {precision}, channels_last {'on' if channels_last else 'off'} (the "
              f"VQGAN's), compile {'on' if args.compile else 'off'}")
    window_step, window_tokens, loss_sum = step, 0, 0.0
    batches = data.resume_batches(sampler, sampler, step * args.grad_accum)
    model.train()
    with TrainingLoop(run, dist, step, schedule.total,
                      max(1, sampler.batches_per_epoch // args.grad_accum), args.log_every,
                      args.save_every, args.sample_every, args.resume, "stage 2") as loop:
        while loop.running():
            lr = schedule.apply([optimizer], loop.step)
            optimizer.zero_grad(set_to_none=True)
            for micro in range(args.grad_accum):
                pairs = next(batches)
                index = torch.tensor([i for i, _ in pairs])
                flip = torch.tensor([int(f) for _, f in pairs])
                tokens = train_tokens[index, flip].to(device, non_blocking=True)  # (B, L)
                prefixes = train_prefixes[index, flip].to(device, non_blocking=True)  # (B, P)
                # gradients are all-reduced once per step, on its last micro-batch
                with dist.no_sync(ddp_model, last=micro == args.grad_accum - 1):
                    with utils.autocast_context(device, precision):
                        _, loss = forward_model(prefixes, tokens, pkeep=args.pkeep)
                    scaler.scale(loss / args.grad_accum).backward()  # scaled for fp16 only
                loss_sum = loss_sum + loss.detach() / args.grad_accum
                loop.health.add(loss)
                window_tokens += tokens.numel() * dist.world_size
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(model.gpt.parameters(), args.grad_clip)
            scaler.step(optimizer)  # skipped when fp16 gradients overflowed
            scaler.update()
            if ema:
                ema.update_parameters(model)

            due = loop.end_step()
            if due.log:
                mean_loss = (float(dist.mean(torch.as_tensor(loss_sum)))
                             / (loop.step - window_step))
                loop.log({"loss": mean_loss, "train_bits_per_token": mean_loss / math.log(2),
                          "lr": lr}, dict(loss=f"{mean_loss:.3f}"), tokens_per_s=window_tokens)
                window_step, window_tokens, loss_sum = loop.step, 0, 0.0
            # Rank 0 alone validates, samples and saves, with the bare model (no collectives).
            if due.validate:
                bits = validation_bits(inference, val_tokens, val_prefixes, args.batch_size, device,
                                       precision)
                loop.write({"val_bits_per_token": bits})
                loop.progress.write(f"step {loop.step}: validation {bits:.3f} bits/token")
            if due.sample:
                save_sample_grid(inference, val_set, cache["val"], val_prefixes, args, device,
                                 run.path("samples", f"samples_{loop.step:06d}.png"), precision)
            if due.save:
                run.save_state(loop.step, config, flags, dist.world_size, states,
                               vqgan_checkpoint=os.path.abspath(args.vqgan_checkpoint),
                               condition_vqgan_checkpoint=args.condition_vqgan and
                               os.path.abspath(args.condition_vqgan),
                               layout=layout.name, resize_mode=train_set.resize_mode,
                               part_labels=train_set.part_labels.to_dict())
                plot_curves(loop.records(), [("bits per image token",
                                              ["train_bits_per_token", "val_bits_per_token"])],
                            run.path("loss_curves.png"), title="stage 2")
    if dist.is_main:
        run.report_outputs("stage 2", [
            ("transformer_last.pt", "transformer_last.pt (sample.py --checkpoint)"),
            ("metrics.jsonl", "metrics.jsonl"), ("loss_curves.png", "loss_curves.png"),
            ("samples", "samples/")])
    return loop.stopped_at


if __name__ == "__main__":
    utils.run_cli(main)
