"""The data: a folder of images (with optional poses.json and part maps) or a COCO person-keypoint
file -> the train and validation splits, batches in a resumable order, and the data flags.

The pipeline starts here: `build_datasets` turns the data flags into two `PoseImageDataset`s
(each example decoded and squared once by images.prepare_example, poses re-framed and flipped
by poses.py); `EpochBatchSampler` and `make_loader` batch them for stage 1, the token cache of
stage 2 and the pose detector. Without --dataset-path the synthetic mannequins (mannequins.py)
are written on first use (4000 at the image size) and read like any other folder.
"""
import argparse
import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

import mannequins
from cli import non_negative_int, positive_int, unit_fraction
from images import (DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, PARTS_FOLDER, Example,
                    UnreadableImage, find_images, prepare_example, to_tensor)
from poses import (COCO17, LAYOUTS, MANNEQUIN_PARTS, flip_example, part_labels_value,
                   read_poses_json, resolve_layout, resolve_part_labelling)
from utils import UserError, file_sha256, stable_hash

# The data flags that decide which images fall in which split (and how they are squared): a
# token cache is keyed by them, evaluate.py warns when a model was trained on others, and
# a resumed run must keep them (runs.DATA_ORDER_FLAGS).
SPLIT_FLAGS = ("dataset_path", "image_size", "val_fraction", "resize_mode", "pose_layout",
               "coco_annotations")


def is_validation(name, val_fraction):
    """Deterministic split by a hash of the relative path: stable across runs and machines."""
    return stable_hash(name) / 2**32 < val_fraction


def empty_split_message(split, root, files, val_fraction, coco):
    """Why a split came out empty: the split goes by image file (a hash of its path, see
    is_validation), how many files there are, and a --val-fraction that fixes it."""
    positions = sorted({stable_hash(file) / 2**32 for file in files})  # val: below the fraction
    count = (f"{len(positions)} image file(s)" + (f" holding {len(files)} people, each photo's "
                                                    "people kept together" if coco else ""))
    reason = (f"the train/val split goes by image file and {root} has {count}; "
              f"--val-fraction {val_fraction} puts {'none' if split == 'val' else 'all'} of them "
              "in the validation split")
    if len(positions) < 2:
        return f"the {split} split is empty: {reason}; both splits need a file: add images"
    if split == "val":  # the smallest fraction, in as few decimals as do, that passes one file
        decimals = next((d for d in range(2, 10)
                         if math.floor(positions[0] * 10**d + 1) / 10**d <= positions[-1]), 10)
        suggestion = math.floor(positions[0] * 10**decimals + 1) / 10**decimals
        return (f"the val split is empty: {reason}; --val-fraction {suggestion:.{decimals}f} "
                "gives it at least one file")
    decimals = next((d for d in range(2, 10)
                     if math.floor(positions[-1] * 10**d) / 10**d > positions[0]), 10)
    suggestion = math.floor(positions[-1] * 10**decimals) / 10**decimals
    return (f"the train split is empty: {reason}; --val-fraction {suggestion:.{decimals}f} "
            "leaves at least one file for training")


def read_coco_annotations(path, root, min_keypoints, margin):
    """COCO person_keypoints_*.json -> one Example per annotated person (square crop with margin)."""
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
        images = {image["id"]: image for image in coco["images"]}
        annotations = coco["annotations"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"cannot read COCO annotations {path} ({type(error).__name__}: {error}); "
                        "expected a person_keypoints_*.json file with 'images' and "
                        "'annotations'") from None
    examples = []
    for annotation in annotations:
        try:
            if annotation.get("iscrowd", 0) or annotation["num_keypoints"] < min_keypoints:
                continue
            image = images[annotation["image_id"]]
            size = tuple(float(image[k]) for k in ("width", "height")) if "width" in image else None
            x, y, w, h = (float(n) for n in annotation["bbox"])
            keypoints = np.asarray(annotation["keypoints"], dtype=np.float32).reshape(-1, 3)
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path}: annotation {annotation.get('id')!r} is malformed "
                            f"({type(error).__name__}: {error})") from None
        if w <= 0 or h <= 0:
            continue
        # COCO keypoints use integer pixel indices; +0.5 puts them at pixel centres.
        keypoints[:, :2] += 0.5 * (keypoints[:, 2:3] > 0)
        side = int(round(max(w, h) * (1 + 2 * margin)))
        box = (int(round(x + w / 2 - side / 2)), int(round(y + h / 2 - side / 2)), side)
        image_path = os.path.join(root, image["file_name"])
        examples.append(Example(name=f"{image['file_name']}#person{annotation.get('id')}",
                                image_path=image_path, keypoints=keypoints, box=box,
                                annotated_size=size))
    if not examples:
        raise UserError(f"{path} has no person with at least {min_keypoints} labelled keypoints")
    missing = sorted({e.image_path for e in examples if not os.path.isfile(e.image_path)})
    if missing:
        raise UserError(f"{path} refers to {len(missing)} image(s) missing below {root} "
                        f"(first: {', '.join(missing[:3])})")
    return examples


def class_folders(root, examples):
    """Sorted class names of a folder-per-class dataset: the first folders of the image paths."""
    loose = [e.name for e in examples if "/" not in e.name]
    if loose:
        raise UserError(f"class labels come from the sub-folders of {root}, but {len(loose)} "
                        f"image(s) lie directly in it (first: {', '.join(loose[:3])}); put every "
                        "image in its class's folder")
    names = sorted({e.name.split("/")[0] for e in examples})
    if len(names) < 2:
        raise UserError(f"class labels need at least two class folders in {root}, found "
                        f"{names}; arrange the images as {root}/<class>/<image>")
    return names


class PoseImageDataset(torch.utils.data.Dataset):
    """Images of one split, squared and resized, with their keypoints and part maps if present.

    An item is an index, or (index, flip) as EpochBatchSampler yields. It returns a dict:
      image      (3, S, S) float in [-1, 1]
      keypoints  (K, 3) float: x, y in output pixels, v (only when the data has poses)
      parts      (S, S) long part labels (only when the data has part maps)
      label      () long class index into `class_names` (only with class_labels=True)
      path       the example's relative path
    With class_labels=True the data is folder-per-class: an image's class is its first folder
    below root (DIR/<class>/.../image.png), and `class_names` lists the folders, sorted.
    Every file is decoded once when the dataset is built, so a corrupt image (or a part label
    that `part_labels` does not know) is found before training starts; small datasets keep those
    decoded pixels in memory (`preload`).
    """

    def __init__(self, root, image_size=64, split="train", val_fraction=0.05, resize_mode="auto",
                 pose_layout="auto", coco_annotations=None, coco_min_keypoints=5,
                 coco_margin=0.1, strict=False, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                 preload="auto", progress=True, class_labels=False, part_labels=MANNEQUIN_PARTS):
        if not os.path.exists(root):
            raise UserError(f"dataset path {root} does not exist; pass --dataset-path DIR with "
                            "your images, or leave it out to use the synthetic mannequins")
        if not os.path.isdir(root):
            raise UserError(f"dataset path {root} is not a folder; pass the folder that holds "
                            "the images")
        self.root, self.image_size, self.max_image_pixels = root, image_size, max_image_pixels
        self.part_labels = part_labels
        self.layout = None
        self.annotation_path = coco_annotations  # or poses.json, found by _scan_folder
        if coco_annotations:
            examples = read_coco_annotations(coco_annotations, root, coco_min_keypoints,
                                             coco_margin)
            self.layout = resolve_layout(examples[0].keypoints.shape[0], pose_layout,
                                         coco_annotations)
        else:
            # both splits scan the same folder: one of them warns about it
            examples = self._scan_folder(root, pose_layout, warn=split != "val")
        # from every example before the split, so that both splits number the classes alike
        self.class_names = class_folders(root, examples) if class_labels else None
        self.has_keypoints = self.layout is not None
        self.has_parts = any(e.part_path for e in examples)
        if resize_mode == "auto":  # pad keeps whole people; crop suits pictures without poses
            resize_mode = "pad" if self.has_keypoints or self.has_parts else "crop"
        self.resize_mode = resize_mode
        if split != "all":  # split by image file, so people from one COCO picture stay together
            files = [os.path.relpath(e.image_path, root).replace(os.sep, "/") for e in examples]
            examples = [e for e, file in zip(examples, files)
                        if (split == "val") == is_validation(file, val_fraction)]
            if not examples:
                raise UserError(empty_split_message(split, root, files, val_fraction,
                                                    coco=bool(coco_annotations)))
        self.examples, self.cache = self._check_all(examples, strict, preload, progress, split)

    def _scan_folder(self, root, pose_layout, warn):
        names = find_images(root)
        if not names:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        poses = {}
        poses_path = os.path.join(root, "poses.json")
        if os.path.exists(poses_path):
            self.annotation_path = poses_path
            poses, self.layout = read_poses_json(poses_path, root, names, pose_layout)
            unposed = [n for n in names if n not in poses]
            if unposed and warn:
                print(f"warning: {len(unposed)} image(s) have no entry in {poses_path} (first: "
                      f"{', '.join(unposed[:3])}); their keypoints count as not visible",
                      file=sys.stderr)
        parts_root = os.path.join(root, PARTS_FOLDER)
        examples = []
        for name in names:
            part_path = None
            if os.path.isdir(parts_root):
                part_path = os.path.join(parts_root, os.path.splitext(name)[0] + ".png")
                if not os.path.isfile(part_path):
                    raise UserError(f"part map {part_path} for image {name} is missing; every "
                                    f"image needs one when {parts_root} exists")
            keypoints = poses.get(name)
            if self.layout is not None and keypoints is None:
                keypoints = np.zeros((self.layout.num_keypoints, 3), np.float32)
            examples.append(Example(name, os.path.join(root, name), keypoints, part_path,
                                    pose_source=poses_path if name in poses else None))
        return examples

    def _check_all(self, examples, strict, preload, progress, split):
        """Decode every example once; drop (or, with strict, refuse) unreadable images."""
        if preload == "auto":
            preload = len(examples) * self.image_size**2 * 3 <= 2**30
        results, bad = [], []

        def attempt(example):
            try:
                return self.prepare(example), None
            except UnreadableImage as error:  # other UserErrors (bombs, bad part maps) stop
                return None, str(error)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for example, (prepared, error) in zip(examples, tqdm(
                    pool.map(attempt, examples), total=len(examples), disable=not progress,
                    desc=f"checking {split} images", leave=False)):
                if error is None:  # without preload, keep no pixels: big sets would not fit
                    results.append((example, prepared if preload else None))
                elif strict:
                    raise UserError(f"{error} (--strict is on; remove or fix the file)")
                else:
                    bad.append((example.image_path, error))
        if bad:
            others = ", ".join(path for path, _ in bad[1:3]) + (", ..." if len(bad) > 3 else "")
            print(f"warning: skipped {len(bad)} unreadable image(s); the first: {bad[0][1]}"
                  f"{f' (also: {others})' if others else ''}; use --strict to stop on them "
                  "instead", file=sys.stderr)
        if not results:
            raise UserError(f"none of the images under {self.root} could be read")
        kept = [example for example, _ in results]
        return kept, ([prepared for _, prepared in results] if preload else None)

    def prepare(self, example):
        return prepare_example(example, self.image_size, self.resize_mode, self.max_image_pixels,
                               self.part_labels)

    def fingerprint(self):
        """A SHA-256 hex digest of the files the items are made of, to key caches of them: the
        content of the annotation file (poses.json or the COCO file), and the path, size and
        modification time of every image and part map. Those are a stat, not a read, so a large
        set costs nothing extra; any edit changes the time (a copy with cp -p, shutil.copy2 or
        rsync -a keeps it, and then the file is the same as well)."""
        digest = hashlib.sha256()
        if self.annotation_path is not None:
            digest.update(file_sha256(self.annotation_path).encode())
        for example in self.examples:
            for path in (example.image_path, example.part_path):
                if path is not None:
                    info = os.stat(path)
                    digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, item):
        index, flip = item if isinstance(item, tuple) else (item, False)
        example = self.examples[index]
        image, keypoints, parts = (self.cache[index] if self.cache is not None
                                   else self.prepare(example))
        if flip:
            image, keypoints, parts = flip_example(image, keypoints, parts, self.layout or COCO17,
                                                   self.part_labels)
        out = {"image": to_tensor(image), "path": example.name}  # (3, S, S) in [-1, 1]
        if keypoints is not None:
            out["keypoints"] = torch.from_numpy(keypoints.copy())  # (K, 3)
        if parts is not None:
            out["parts"] = torch.from_numpy(parts.astype(np.int64))  # (S, S)
        if self.class_names is not None:
            out["label"] = torch.tensor(self.class_names.index(example.name.split("/")[0]))
        return out


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, flip) pairs: a fresh permutation and flip draw each epoch.

    Everything follows from (seed, epoch), so a resumed run sees exactly the batches it would
    have seen, and flips do not depend on worker processes. With world_size > 1, global batch j
    is perm[j*B*W:(j+1)*B*W] and rank r takes its r-th slice of B, so W processes with batch B
    see the same data as one process with batch W*B. The incomplete last batch is dropped.
    """

    def __init__(self, num_examples, batch_size, seed=0, flip=False, rank=0, world_size=1):
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.flip, self.rank, self.world_size = seed, flip, rank, world_size
        self.batches_per_epoch = num_examples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise UserError(f"the training split has {num_examples} images, fewer than one "
                            f"batch of {batch_size * world_size}; lower --batch-size")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        flips = (torch.rand(self.num_examples, generator=generator) < 0.5).tolist()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * global_batch + self.rank * self.batch_size
            indices = order[start:start + self.batch_size]
            yield [(i, self.flip and flips[i]) for i in indices]


def make_loader(dataset, sampler, num_workers, device):
    """DataLoader over a batch sampler; workers persist across epochs, memory pinned for CUDA.

    A preloaded dataset is read in the main process: handing its ready batches between
    processes would cost more than the indexing itself.
    """
    if dataset.cache is not None:
        num_workers = 0
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=device.type == "cuda",
                                       persistent_workers=num_workers > 0)


def resume_batches(loader, sampler, micro_batches_done):
    """Endless batches, starting where a run that had seen `micro_batches_done` stopped.

    Each epoch's iterator draws a worker seed from the global torch RNG; forking the RNG for
    that draw keeps the global stream (which the model uses) the same in a resumed run.
    """
    epoch, start = divmod(micro_batches_done, sampler.batches_per_epoch)
    while True:
        sampler.set_epoch(epoch, start)
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        yield from batches
        epoch, start = epoch + 1, 0


def unflipped_batches(dataset, batch_size, num_workers=0, count=None):
    """Unflipped items of `dataset` in order (the first `count` of them), batched. Its own
    generator: a pass leaves the global torch RNG (the training's) as it found it."""
    items = range(len(dataset) if count is None else min(count, len(dataset)))
    subset = torch.utils.data.Subset(dataset, list(items))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers, generator=torch.Generator())


def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset-path", default=None,
                       help="folder of images (+ optional poses.json, parts/); default: the "
                            "synthetic mannequins, generated on first use under data/")
    group.add_argument("--image-size", type=positive_int, default=64)
    group.add_argument("--val-fraction", type=unit_fraction, default=0.05)
    group.add_argument("--resize-mode", choices=("auto", "pad", "crop"), default="auto",
                       help="pad to square with the border colour, or centre-crop; auto pads "
                            "when poses or part maps are present")
    group.add_argument("--pose-layout", choices=("auto",) + tuple(LAYOUTS), default="auto",
                       help="keypoint order in poses.json; auto picks it from K (17 or 18)")
    group.add_argument("--part-labels", type=part_labels_value, default="mannequin",
                       help="what the part maps' labels mean: mannequin (0-10), densepose (the "
                            "24 DensePose body-part indices, 0 background), or a .json file "
                            '{"num_labels": N, "flip_pairs": [[left, right], ...]}')
    group.add_argument("--coco-annotations", default=None,
                       help="a COCO person_keypoints_*.json; its images are read below "
                            "--dataset-path")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                       help="random horizontal flips (keypoints and part labels swap sides)")
    group.add_argument("--strict", action="store_true",
                       help="stop on an unreadable image instead of skipping it")
    group.add_argument("--max-image-pixels", type=positive_int,
                       default=DEFAULT_MAX_IMAGE_PIXELS)
    group.add_argument("--num-workers", type=non_negative_int,
                       default=min(2, os.cpu_count() or 1))
    return group


def build_datasets(flags, progress=True, class_labels=False):
    """(train, val) datasets from the data flags, as parsed (a namespace of add_data_args) or as
    a checkpoint saved them (a dict); generates the default mannequins if needed.

    class_labels: the data is folder-per-class and items carry a "label" (PoseImageDataset).
    """
    flags = flags if isinstance(flags, dict) else vars(flags)
    root, image_size = flags["dataset_path"], flags["image_size"]
    if root is None:
        root, count = os.path.join("data", f"mannequins-{image_size}"), 4000
        if mannequins.write_dataset(root, count, image_size=image_size, seed=0):
            print(f"wrote {count} synthetic mannequins to {root} (first run "
                  "only; pass --dataset-path for your own images)")
    common = dict(root=root, image_size=image_size, val_fraction=flags["val_fraction"],
                  resize_mode=flags["resize_mode"], pose_layout=flags["pose_layout"],
                  coco_annotations=flags["coco_annotations"], strict=flags["strict"],
                  max_image_pixels=flags["max_image_pixels"], progress=progress,
                  class_labels=class_labels,
                  part_labels=resolve_part_labelling(flags.get("part_labels", "mannequin")))
    return PoseImageDataset(split="train", **common), PoseImageDataset(split="val", **common)
