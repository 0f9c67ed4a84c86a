"""Sample images from a trained stage-2 transformer: new people for given poses, or completions.

    python sample.py --checkpoint runs/transformer/transformer_last.pt --out samples/
    python sample.py --checkpoint RUN/transformer_last.pt --poses poses.json --out DIR \
        --num-samples 4 --top-k 100 --top-p 0.95 --temperature 1.0 --seed 0
    python sample.py --checkpoint RUN/transformer_last.pt --complete photo.png --poses poses.json
    python sample.py --checkpoint RUN/transformer_last.pt --grid-size 32 16 --poses poses.json
    python sample.py --checkpoint RUN/transformer_last.pt --class NAME    # a class model
    python sample.py --checkpoint RUN/transformer_last.pt --superres runs/superres/superres.pt

Poses use the dataset's poses.json format: {"name.png": [[x, y, v], ...]} with K keypoints in
the pixel coordinates of an image. That image is the file `name.png` next to poses.json when it
exists, else one of --pose-image-size W H (default: the size of the sampled images). A pose is
mapped to the sampled image the way training squared its images (the pose's image padded or
cropped, centred, to the sampled image's aspect ratio as that run was, then scaled), so a pose
drawn on a 300 x 600 photo lands where the photo's person would.

--grid-size H W samples an H x W token grid, larger than the training grid, with a sliding
attention window (sliding_window.sample_grid): images of (W * f) x (H * f) pixels, f pixels per
token. Validation poses (and part maps) are fitted into such an image whole, by padding.

Writes DIR/<pose>_<i>.png for every pose and sample, where <pose> is the pose's relative path
without its extension (a/x.jpg -> DIR/a/x_0.png; a COCO person x.jpg#person7 ->
DIR/x_person7_0.png), so that every pose has files of its own, and DIR/grid.png: one row per
pose, its skeleton first, then the samples. Without --poses it samples for validation-set
poses. --complete finds the image's pose by its path relative to poses.json (else the one entry
of its file name); --pose-key names it where that is ambiguous.

--superres CHECKPOINT (stage 3, training_superres.py) enlarges every sample and completion:
DIR/<pose>_<i>_x<scale>.png beside each DIR/<pose>_<i>.png, and the grid's rows show the
samples at both sizes.
"""
import itertools
import os
import sys
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import cli
import data
import images
import sliding_window
import utils
from poses import (LAYOUTS, condition_picture, frame_box, read_pose_entries,
                   check_keypoints_inside, reframe_keypoints, reframe_picture)
from sampling import add_sampling_args, sampling_options
from superres import enlarge, load_superres, warn_if_other_vqgan
from transformer import POSE_INPUT, load_transformer


class Row(NamedTuple):
    """One row of the output grid: a condition to sample for, and the picture it came from."""

    name: str  # the pose's (or class's) name; the output files are named after it
    keypoints: torch.Tensor = None  # (K, 3) in pixels of the sampled canvas
    parts: torch.Tensor = None  # (H, W) part labels on the canvas
    image: torch.Tensor = None  # (3, S, S) in [-1, 1]: the validation or --complete image
    box: tuple = None  # a COCO person's square (x0, y0, side) in its photo (images.Example.box)


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Sample from a stage-2 transformer.")
    parser.add_argument("--checkpoint", required=True, help="RUN/transformer_last.pt")
    parser.add_argument("--vqgan-checkpoint", default=None,
                        help="the stage-1 vqgan.pt (default: the one recorded in --checkpoint)")
    parser.add_argument("--poses", default=None, help="poses.json (default: validation poses)")
    parser.add_argument("--pose-image-size", type=cli.positive_int, nargs=2,
                        metavar=("W", "H"), default=None,
                        help="size of the images the poses were given for, when those images "
                             "are not beside poses.json")
    parser.add_argument("--count", type=cli.positive_int, default=8,
                        help="how many validation poses to use without --poses")
    parser.add_argument("--complete", default=None, metavar="IMAGE",
                        help="keep the top half of IMAGE and sample the bottom half")
    parser.add_argument("--pose-key", default=None, metavar="KEY",
                        help="with --complete: the entry of --poses (or the validation example) "
                             "that holds IMAGE's pose, when its path relative to poses.json "
                             "(or the dataset) does not tell")
    parser.add_argument("--out", type=cli.output_folder, default="samples")
    parser.add_argument("--num-samples", type=cli.positive_int, default=2)
    parser.add_argument("--grid-size", type=cli.positive_int, nargs=2, metavar=("H", "W"),
                        default=None,
                        help="token grid to sample, at least the training grid; larger grids "
                             "use a sliding attention window (default: the training grid)")
    parser.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                        help="the class to sample, for a class-conditioned model")
    add_sampling_args(parser, int8=True)
    parser.add_argument("--superres", default=None, metavar="CHECKPOINT",
                        help="a stage-3 superres.pt: also write every sample enlarged by it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=cli.positive_int, default=16)
    parser.add_argument("--device", type=cli.device_name, default="auto")
    args = parser.parse_args(argv)
    if args.pose_key is not None and args.complete is None:
        raise utils.UserError("--pose-key names the pose of the --complete image; give "
                              "--complete IMAGE too, or leave --pose-key out")
    return args


def read_pose_file(path, num_keypoints, default_size):
    """poses.json -> [(name, (K, 3) keypoints, (width, height) of the image they refer to)].

    Keys and keypoints obey the rules training applies to a dataset's poses.json
    (poses.read_pose_entries, poses.check_keypoints_inside).
    """
    poses, k = read_pose_entries(path)
    if k != num_keypoints:
        name = next(iter(poses))
        raise utils.UserError(f"{path}: entry {name!r} has {k} keypoints, but the model was "
                              f"trained with {num_keypoints} per pose")
    entries, unreadable = [], []
    for name, keypoints in poses.items():
        image_path = os.path.join(os.path.dirname(path), name)
        size = default_size
        if os.path.isfile(image_path):
            try:
                size = images.displayed_size(image_path)
            except images.UnreadableImage as error:  # skipped, as training skips it
                unreadable.append(str(error))
                continue
        check_keypoints_inside(keypoints, size, name, path,
                               "fix it, set its v to 0, or give --pose-image-size")
        entries.append((name, keypoints, size))
    if unreadable:
        print(f"warning: skipped {len(unreadable)} pose(s) whose image cannot be read, as "
              f"training does; the first: {unreadable[0]}", file=sys.stderr)
    return entries


def output_stems(names):
    """One output path stem per pose, unique and inside --out: the pose's relative path without
    its extension ('a/x.jpg' -> 'a/x', so that a/x.jpg and b/x.jpg stay apart), a COCO person's
    id appended ('x.jpg#person7' -> 'x_person7'); poses whose stems would still clash (x.jpg and
    x.png) keep their extension ('x_jpg', 'x_png'), and any still alike (a.png beside
    a_png.jpg) are numbered ('a_png', 'a_png_2')."""
    def stem(name, keep_extension):
        path = images.image_name(name)
        person = name[len(path) + 1:]  # 'person7', or '' for an image's own pose
        parts = [part for part in path.replace("\\", "/").split("/")
                 if part not in ("", ".", "..")]  # never outside --out
        base, extension = os.path.splitext("/".join(parts) or "sample")
        if extension.lower() not in images.IMAGE_EXTENSIONS:  # a class name such as 'v1.5'
            base, extension = "/".join(parts) or "sample", ""
        if keep_extension and extension:
            base += "_" + extension[1:]
        return base + (f"_{person}" if person else "")

    stems = [stem(name, False) for name in names]
    counts = Counter(stems)
    stems = [stem(name, True) if counts[s] > 1 else s for name, s in zip(names, stems)]
    taken, seen, unique = set(stems), set(), []
    for s in stems:
        if s in seen:  # its first pose keeps it; the next get the first free number
            s = next(f"{s}_{n}" for n in itertools.count(2) if f"{s}_{n}" not in taken)
            taken.add(s)
        seen.add(s)
        unique.append(s)
    return unique


def pose_for_image(rows, image_path, base_folder, pose_key):
    """The Row that holds the pose of the image to complete.

    --pose-key names it; else the row named by the image's path relative to `base_folder` (the
    folder of poses.json, or the dataset's); else the one row of the image's file name. Several
    rows of that name and none at the path is a UserError listing them; no row gives None.
    """
    by_name = {row.name: row for row in rows}
    if pose_key is not None:
        if pose_key not in by_name:
            listed = ", ".join(list(by_name)[:5]) + (", ..." if len(by_name) > 5 else "")
            raise utils.UserError(f"--pose-key {pose_key!r} is not among the poses ({listed})")
        return by_name[pose_key]
    relative = os.path.relpath(os.path.abspath(image_path),
                               os.path.abspath(base_folder)).replace(os.sep, "/")
    if relative in by_name:
        return by_name[relative]
    file_name = os.path.basename(image_path)
    candidates = [name for name in by_name
                  if os.path.basename(images.image_name(name)) == file_name]
    if len(candidates) > 1:
        listed = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
        raise utils.UserError(f"--complete {image_path}: {len(candidates)} poses could be its own "
                              f"({listed}), none at its path {relative} relative to "
                              f"{base_folder}; pass --pose-key with the right one")
    return by_name[candidates[0]] if candidates else None


def to_model_pose(keypoints, size, canvas, resize_mode="pad"):
    """Keypoints on a (width, height) image -> pixels of the (width, height) sampled canvas,
    framed as training framed its images (poses.frame_box); joints off the canvas get v = 0."""
    return reframe_keypoints(keypoints, frame_box(size, canvas, resize_mode), canvas)


def to_canvas_parts(parts, canvas):
    """A square part map (S, S) -> the (width, height) canvas, padded whole like a pose."""
    labels = Image.fromarray(np.asarray(parts, np.uint8))
    framed = reframe_picture(labels, frame_box(labels.size, canvas, "pad"), canvas, 0,
                             Image.NEAREST)
    return torch.from_numpy(np.asarray(framed).astype(np.int64))


def choose_class(args, config):
    """The class index to sample (None for models of another condition), checked."""
    if config["condition"] != "class":
        if args.class_name is not None:
            raise utils.UserError(f"--class needs a class-conditioned model, but this one is "
                                  f"conditioned on {config['condition']}; leave --class out")
        return None
    names = config["class_names"]
    if args.class_name not in names:
        given = "no --class" if args.class_name is None else f"unknown class {args.class_name!r}"
        raise utils.UserError(f"{given}: this model samples one of the classes "
                              f"{', '.join(names)}; pass --class NAME")
    return names.index(args.class_name)


def rows_to_sample(args, model, checkpoint, canvas, sliding):
    """(the Rows of the grid, the folder their names are relative to): the poses of --poses,
    the --class, or the first --count validation examples (fitted whole onto a larger canvas);
    with --complete, the validation examples that may be its own (pose_for_image)."""
    config = model.config
    if args.poses is not None:
        if POSE_INPUT.get(config["condition"]) != "keypoints":
            raise utils.UserError(f"--poses gives keypoints, but this model is conditioned on "
                                  f"{config['condition']}; leave --poses out")
        poses = read_pose_file(args.poses, config["num_keypoints"],
                               tuple(args.pose_image_size or canvas))
        if checkpoint["args"].get("coco_annotations"):
            print("note: this model learned COCO people cropped to a square around their box "
                  "(10 % margin); these poses are framed as whole pictures, so give poses of "
                  "pictures cropped that way for people of the size it learned")
        return [Row(name, torch.from_numpy(to_model_pose(keypoints, size, canvas,
                                                         checkpoint["resize_mode"])))
                for name, keypoints, size in poses], os.path.dirname(args.poses)
    if args.class_name is not None:
        return [Row(args.class_name)], None
    _, val_set = data.build_datasets(checkpoint["args"], progress=False)
    indices = range(min(args.count, len(val_set)))
    if args.complete is not None:  # its own pose may be any validation example's
        wanted = os.path.basename(args.complete)
        indices = [i for i, example in enumerate(val_set.examples) if example.name == args.pose_key
                   or os.path.basename(images.image_name(example.name)) == wanted]
    rows = []
    for i in indices:
        item = val_set[i]
        rows.append(Row(item["path"], item.get("keypoints"), item.get("parts"), item["image"],
                        val_set.examples[i].box))
    if sliding:  # validation conditions are on the training square: pad it to the canvas
        square = (config["image_size"],) * 2
        rows = [row._replace(
            keypoints=None if row.keypoints is None else torch.from_numpy(
                to_model_pose(row.keypoints.numpy(), square, canvas)),
            parts=None if row.parts is None else to_canvas_parts(row.parts, canvas))
            for row in rows]
    return rows, val_set.root


def completion_row(args, model, checkpoint, rows, names_folder):
    """--complete: the image squared as training squared its images, with its own pose (or
    part map) from `rows` -> (its Row, the tokens of its top half (1, L / 2)). A validation
    COCO person's photo is squared on that person's box, as training and the pose were."""
    condition = model.condition
    needs = POSE_INPUT.get(condition)  # keypoints, part maps or nothing
    matching = (pose_for_image(rows, args.complete, names_folder, args.pose_key)
                if needs else None)
    example = images.Example(os.path.basename(args.complete), args.complete,
                             box=matching and matching.box)
    image, _, _ = images.prepare_example(example, model.config["image_size"],
                                         checkpoint["resize_mode"], checkpoint["args"].get(
                                             "max_image_pixels", images.DEFAULT_MAX_IMAGE_PIXELS))
    image = images.to_tensor(image)  # (3, S, S) in [-1, 1]
    if needs == "keypoints" and matching is None:
        raise utils.UserError(f"--complete {args.complete}: this model needs the image's pose; "
                              f"give --poses with an entry for it (its path relative to the "
                              f"file, e.g. {example.name!r}), or name one with --pose-key")
    if needs == "part_maps" and matching is None:
        raise utils.UserError(f"--complete {args.complete}: this model needs the image's part "
                              "map, and only validation images have one here; complete one "
                              "of those")
    row = (matching or Row(example.name))._replace(image=image)
    top_half = model.image_tokens(image[None].to(model.device))
    return row, top_half[:, :model.num_image_tokens // 2]


def load_matching_superres(path, model, checkpoint_path, vqgan_sha256, device):
    """--superres: the stage-3 generator, which must have learned to enlarge pictures of the
    transformer's image size (else None without the flag), behind the transformer's VQGAN
    (`vqgan_sha256`; else a warning)."""
    if path is None:
        return None
    superres, trained_sha256, _ = load_superres(path, device)
    size = model.config["image_size"]
    if superres.config.in_size != size:
        raise utils.UserError(f"--superres {path} enlarges {superres.config.in_size} px pictures "
                              f"x{superres.config.scale}, but {checkpoint_path} samples {size} px "
                              "ones; pass a super-resolution model trained behind its VQGAN")
    warn_if_other_vqgan(trained_sha256, vqgan_sha256)
    return superres


def main(argv=None):
    args = parse_args(argv)
    device = utils.pick_device(args.device)
    model, checkpoint = load_transformer(args.checkpoint, device, args.vqgan_checkpoint)
    model.resolve_guidance(args.guidance)  # a scale it cannot take: refused before any work
    if args.int8:
        model.int8_for_cpu()
    token_grid, condition = model.token_grid, model.condition
    layout = LAYOUTS[checkpoint["layout"]]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    options = dict(sampling_options(args), generator=generator)
    class_index = choose_class(args, model.config)
    grid_h, grid_w = args.grid_size or (token_grid, token_grid)
    if grid_h < token_grid or grid_w < token_grid:
        raise utils.UserError(f"--grid-size {grid_h} {grid_w} is smaller than the model's "
                              f"{token_grid}x{token_grid} token grid")
    sliding = (grid_h, grid_w) != (token_grid, token_grid)
    pixels_per_token = model.config["image_size"] // token_grid
    canvas = (grid_w * pixels_per_token, grid_h * pixels_per_token)  # (width, height) sampled

    superres = load_matching_superres(args.superres, model, args.checkpoint,
                                      checkpoint["config"]["vqgan_sha256"], device)
    rows, names_folder = rows_to_sample(args, model, checkpoint, canvas, sliding)
    prefix = None
    if args.complete is not None:
        if sliding:
            raise utils.UserError("--complete works on the training grid only; leave "
                                  "--grid-size out")
        row, prefix = completion_row(args, model, checkpoint, rows, names_folder)
        rows = [row]

    os.makedirs(args.out, exist_ok=True)
    stems = output_stems([row.name for row in rows])
    grid, n = [], args.num_samples
    for start in tqdm(range(0, len(rows), args.batch_size), desc="sampling"):
        chunk = rows[start:start + args.batch_size]
        conditions = dict(  # one per sample: each row's condition repeated n times
            keypoints=(torch.stack([row.keypoints for row in chunk]).repeat_interleave(n, dim=0)
                       .to(device) if POSE_INPUT.get(condition) == "keypoints" else None),
            part_maps=(torch.stack([row.parts for row in chunk]).repeat_interleave(n, dim=0)
                       .to(device) if POSE_INPUT.get(condition) == "part_maps" else None),
            labels=(torch.full((len(chunk) * n,), class_index, device=device)
                    if class_index is not None else None),
            batch_size=len(chunk) * n)
        # int8 Linear layers take float32 only, also where auto is bf16 (a CPU with AMX)
        with utils.autocast_context(device, "fp32" if args.int8 else "auto"):
            if sliding:
                tokens = sliding_window.sample_grid(model, grid_h, grid_w, **conditions,
                                                    **options)
            else:
                cond = model.condition_tokens(**conditions)  # (b * n, P)
                chunk_prefix = None if prefix is None else prefix.repeat(len(cond), 1)
                tokens = model.sample(cond, prefix_tokens=chunk_prefix, **options)
            pictures = model.decode(tokens).float().cpu()  # (b * n, 3, height, width)
        enlarged = None if superres is None else enlarge(superres, pictures, args.batch_size)
        for index, row in enumerate(chunk):
            stem = os.path.join(args.out, stems[start + index])
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            cells = [condition_picture(condition, row.keypoints, row.parts, layout, canvas)]
            cells += [row.image] if row.image is not None else []
            for i in range(n):
                picture = utils.to_uint8_image(pictures[index * n + i])
                picture.save(f"{stem}_{i}.png")
                cells.append(picture)
            for i in range(n if enlarged is not None else 0):  # then the same, enlarged
                picture = utils.to_uint8_image(enlarged[index * n + i])
                picture.save(f"{stem}_{i}_x{superres.config.scale}.png")
                cells.append(picture)
            grid.append(cells)
    utils.save_image_grid(grid, os.path.join(args.out, "grid.png"))
    written = len(rows) * n
    print(f"wrote {written} sample{'s' if written != 1 else ''}"
          + (f", each also enlarged x{superres.config.scale}," if superres else "")
          + f" and grid.png to {args.out}")


if __name__ == "__main__":
    utils.run_cli(main)
