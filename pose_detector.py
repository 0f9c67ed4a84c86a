"""The project's own keypoint detector, and PCK: how evaluate.py scores generated people against
the poses they were conditioned on.

Pose-guided person generation papers (PG2, PATN and their successors) run a keypoint detector
on generated images and count the conditioning keypoints it finds close to where they were asked
for. Any data with poses (the mannequins, COCO people, a poses.json) labels its own people, so
instead of downloading a detector the project trains a small one on the training split and
keeps it next to the model it scores (evaluate.py --train-pose-detector; RUN/pose_detector.pt).

The detector: images (B, 3, S, S) in [-1, 1], shrunk to `input_size` (at most 64 px by
default, so it trains in a few CPU minutes at any image size), go through a small U-Net of
GroupNorm convolutions (input_size -> /2 -> /4 -> /8 and back up to /2, with skips) to K
heatmap logits at half the input's resolution: 32 x 32 for 64 px images, twice the finer
grid of the default VQGAN's 16 x 16 tokens. The softmax over a heatmap's cells is that joint's
location distribution. Training: cross-entropy against a Gaussian (sigma one cell) around the
true keypoint, for every labelled joint (v > 0), with the dataset's flips (left/right renamed).
Decoding: the most likely cell, refined to sub-cell precision by a parabola through the log
probabilities of the peak and its two neighbours on each axis (exact for a Gaussian, which is
what training makes the heatmap; Zhang et al. 2020, "DARK"). Argmax rather than soft-argmax:
an image whose left and right arms are confused gives two peaks, and their mean lies between
the arms, on neither.

PCK (Yang and Ramanan 2013): a joint counts as found when the detected point lies within
alpha x the pose's size of where the pose puts it, with the pose's size the larger side of the
bounding box of its labelled keypoints (alpha 0.1 by default, about 4 px for a 64 px mannequin).
That size needs nothing but the keypoints, so it works for every layout and person (PCKh's head
segment does not exist in COCO-17, and a torso size is undefined when a hip or shoulder is not
labelled). Only joints labelled in the pose (v > 0) are counted, whole and per joint group
(`joint_groups`).
"""
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import utils
from runs import Schedule

DEFAULT_MAX_INPUT_SIZE = 64
DEFAULT_WIDTH = 32
DEFAULT_PCK_ALPHA = 0.1
HEATMAP_SIGMA = 1.0  # training target's standard deviation, in heatmap cells

# Joint groups by name, so that any layout's joints fall into them (the neck goes with the head).
GROUP_KEYWORDS = (("head", ("nose", "eye", "ear", "neck")),
                  ("arms", ("shoulder", "elbow", "wrist")),
                  ("legs", ("hip", "knee", "ankle")))


def joint_groups(layout):
    """{group: joint indices} for a poses.KeypointLayout; joints matching no group are 'other'."""
    groups = {name: [] for name, _ in GROUP_KEYWORDS}
    for index, joint in enumerate(layout.joints):
        group = next((name for name, keywords in GROUP_KEYWORDS
                      if any(keyword in joint for keyword in keywords)), "other")
        groups.setdefault(group, []).append(index)
    return {name: indices for name, indices in groups.items() if indices}


# ----------------------------------------------------------------------------------------------
# PCK: pure functions of keypoint tensors
# ----------------------------------------------------------------------------------------------


def pose_size(keypoints):
    """The larger side of the bounding box of each pose's labelled keypoints: (N, K, 3) -> (N,).

    0 for a pose with fewer than two labelled keypoints (it has no size to measure against).
    """
    labelled = keypoints[..., 2] > 0  # (N, K)
    xy = keypoints[..., :2]
    far = torch.finfo(xy.dtype).max
    low = torch.where(labelled[..., None], xy, far).amin(dim=1)  # (N, 2)
    high = torch.where(labelled[..., None], xy, -far).amax(dim=1)
    size = (high - low).amax(dim=1)
    return torch.where(labelled.sum(dim=1) >= 2, size, torch.zeros_like(size))


def pck_hits(detected, poses, alpha=DEFAULT_PCK_ALPHA):
    """Which joints the detector found: detected (N, K, 2), poses (N, K, 3) -> (hits, counted).

    Both (N, K) booleans: counted marks the joints labelled in a pose that has a size, hits those
    of them detected within alpha x pose_size of the pose's point.
    """
    size = pose_size(poses)  # (N,)
    counted = (poses[..., 2] > 0) & (size[:, None] > 0)
    distance = (detected - poses[..., :2]).norm(dim=-1)  # (N, K)
    return counted & (distance <= alpha * size[:, None]), counted


def pck_summary(hits, counted, groups):
    """The fraction of counted joints that were hit, over all joints and per group.

    groups: {name: joint indices}; a group with no counted joint reports None.
    """
    def fraction(columns):
        total = int(counted[:, columns].sum())
        return int(hits[:, columns].sum()) / total if total else None
    summary = {"all": fraction(list(range(hits.shape[1])))}
    summary.update({name: fraction(indices) for name, indices in groups.items()})
    return summary


# ----------------------------------------------------------------------------------------------
# The detector
# ----------------------------------------------------------------------------------------------


@dataclass
class PoseDetectorConfig:
    """The detector's shape; saved with its weights."""

    num_keypoints: int
    input_size: int  # images are resized to this even side before the first convolution
    width: int = DEFAULT_WIDTH  # channels at the heatmap resolution; x2, x4 at coarser levels

    @property
    def heatmap_size(self):
        return self.input_size // 2


def conv_norm_act(c_in, c_out, stride=1, kernel=3):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.GroupNorm(8, c_out), nn.SiLU())


class PoseDetector(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> K heatmap logits at half the input size (module doc)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        w = config.width
        # 2 x 2 pixel blocks as 12 channels: half the resolution, no pixel dropped, and far
        # cheaper than a full-resolution convolution on 3 channels
        self.stem = nn.Sequential(nn.PixelUnshuffle(2), conv_norm_act(12, w), conv_norm_act(w, w))
        self.down1 = nn.Sequential(conv_norm_act(w, 2 * w, stride=2), conv_norm_act(2 * w, 2 * w))
        self.down2 = nn.Sequential(conv_norm_act(2 * w, 4 * w, stride=2),
                                   conv_norm_act(4 * w, 4 * w), conv_norm_act(4 * w, 4 * w))
        # 1 x 1 lateral reductions before each skip is added, as in a feature pyramid
        self.reduce2, self.up2 = conv_norm_act(4 * w, 2 * w, kernel=1), conv_norm_act(2 * w, 2 * w)
        self.reduce1, self.up1 = conv_norm_act(2 * w, w, kernel=1), conv_norm_act(w, w)
        self.head = nn.Conv2d(w, config.num_keypoints, 1)

    def forward(self, images):
        size = self.config.input_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False)
        fine = self.stem(images)  # (B, w, h, h), h = heatmap_size
        middle = self.down1(fine)  # (B, 2w, h/2, h/2)
        coarse = self.down2(middle)  # (B, 4w, h/4, h/4): the whole figure in view
        x = F.interpolate(coarse, size=middle.shape[-2:], mode="nearest")
        x = self.up2(self.reduce2(x) + middle)  # (B, 2w, h/2, h/2)
        x = F.interpolate(x, size=fine.shape[-2:], mode="nearest")
        x = self.up1(self.reduce1(x) + fine)  # (B, w, h, h)
        return self.head(x)  # (B, K, h, h)

    @torch.no_grad()
    def detect(self, images):
        """Keypoints (B, K, 2), x and y in the images' own pixel coordinates."""
        return decode_heatmaps(self(images).float(), images.shape[-1])


def heatmap_targets(keypoints, image_size, heatmap_size, sigma=HEATMAP_SIGMA):
    """Gaussian location distributions (B, K, h, h) summing to 1 over each heatmap.

    Keypoints are in continuous pixel coordinates (pixel j covers [j, j + 1)), so heatmap cell j
    is centred on image x = (j + 0.5) * image_size / heatmap_size.
    """
    cells = keypoints[..., :2] * heatmap_size / image_size - 0.5  # (B, K, 2) in cell indices
    grid = torch.arange(heatmap_size, dtype=torch.float32, device=keypoints.device)
    gx = torch.exp(-(grid - cells[..., 0:1]) ** 2 / (2 * sigma**2))  # (B, K, h)
    gy = torch.exp(-(grid - cells[..., 1:2]) ** 2 / (2 * sigma**2))
    target = gy[..., :, None] * gx[..., None, :]  # (B, K, h, h)
    return target / target.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def heatmap_loss(logits, keypoints, image_size):
    """Cross-entropy of each labelled joint's heatmap softmax against its Gaussian target."""
    target = heatmap_targets(keypoints, image_size, logits.shape[-1])
    log_probs = logits.float().flatten(2).log_softmax(dim=-1)  # (B, K, h*h)
    per_joint = -(target.flatten(2) * log_probs).sum(dim=-1)  # (B, K)
    labelled = keypoints[..., 2] > 0
    return (per_joint * labelled).sum() / labelled.sum().clamp_min(1)


def decode_heatmaps(logits, image_size):
    """Heatmap logits (B, K, h, h) -> keypoints (B, K, 2) in pixels of an image_size image.

    The argmax cell, shifted on each axis by the vertex of the parabola through the log
    probabilities of it and its two neighbours (no shift at the border or on a flat top).
    """
    B, K, h, _ = logits.shape
    log_probs = logits.flatten(2).log_softmax(dim=-1)  # (B, K, h*h)
    peak = log_probs.argmax(dim=-1)  # (B, K)
    row, column = peak // h, peak % h

    def at(r, c):  # log probabilities at cells (r, c), each (B, K)
        return log_probs.gather(-1, (r * h + c)[..., None]).squeeze(-1)

    def offset(index, before, centre, after):
        curvature = before - 2 * centre + after  # < 0 at a proper maximum
        inside = (index > 0) & (index < h - 1) & (curvature < 0)
        shift = 0.5 * (before - after) / torch.where(inside, curvature, -torch.ones_like(curvature))
        return torch.where(inside, shift.clamp(-0.5, 0.5), torch.zeros_like(shift))

    centre = at(row, column)
    left, right = at(row, (column - 1).clamp_min(0)), at(row, (column + 1).clamp_max(h - 1))
    up, down = at((row - 1).clamp_min(0), column), at((row + 1).clamp_max(h - 1), column)
    x = column.float() + offset(column, left, centre, right)
    y = row.float() + offset(row, up, centre, down)
    return (torch.stack([x, y], dim=-1) + 0.5) * image_size / h  # (B, K, 2)


@torch.no_grad()
def detect_keypoints(detector, images, batch_size, device):
    """Run the detector over images (N, 3, S, S) in batches -> keypoints (N, K, 2) on the CPU."""
    detector.eval()
    return torch.cat([detector.detect(images[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


# ----------------------------------------------------------------------------------------------
# Training and the cached detector file
# ----------------------------------------------------------------------------------------------


@dataclass
class DetectorTraining:
    """The default: about 3.5 minutes of one CPU core on the 3786 default training mannequins,
    which then finds 0.98 of the validation mannequins' joints at PCK@0.1."""

    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    seed: int = 0


def data_key(dataset):
    """What identifies the data a detector learnt from: the folder, its training examples and
    their keypoints (the annotation file's content), the image size, the pose layout and how
    images were squared."""
    names = "\n".join(example.name for example in dataset.examples)
    annotations = dataset.annotation_path and utils.file_sha256(dataset.annotation_path)
    return {"dataset_path": os.path.abspath(dataset.root), "image_size": dataset.image_size,
            "layout": dataset.layout.name, "resize_mode": dataset.resize_mode,
            "num_examples": len(dataset.examples), "examples_hash": utils.stable_hash(names),
            "annotations_sha256": annotations}


def train_pose_detector(train_set, config, training, device, num_workers=0, progress=True):
    """Train a detector on the keypoints of `train_set` (random flips swap left and right)."""
    if len(train_set) < training.batch_size:
        raise utils.UserError(f"the training split has {len(train_set)} images, fewer than one "
                              f"pose-detector batch of {training.batch_size}; lower "
                              "--pose-detector-batch-size")
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        torch.default_generator.manual_seed(training.seed)  # initial weights, drawn on the CPU
        detector = PoseDetector(config).to(device)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=training.lr,
                                  weight_decay=training.weight_decay)
    sampler = data.EpochBatchSampler(len(train_set), training.batch_size, training.seed,
                                     flip=True)
    loader = data.make_loader(train_set, sampler, num_workers, device)
    batches = data.resume_batches(loader, sampler, 0)
    schedule = Schedule(training.lr, training.steps, training.warmup_steps, training.min_lr_ratio)
    detector.train()
    bar = tqdm(range(training.steps), desc="pose detector", disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        schedule.apply([optimizer], step)
        batch = next(batches)
        images = batch["image"].to(device)  # (B, 3, S, S)
        loss = heatmap_loss(detector(images), batch["keypoints"].to(device), images.shape[-1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == training.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return detector.eval()


def save_pose_detector(detector, path, key, training):
    utils.atomic_save({"kind": "pose_detector", "config": asdict(detector.config), "data": key,
                       "training": asdict(training), "model": detector.state_dict()}, path)


def read_pose_detector(path):
    """The checkpoint dict of a saved detector (kind-checked, weights_only)."""
    return utils.load_checkpoint(path, "pose_detector")


def detector_from_checkpoint(checkpoint, device):
    detector = PoseDetector(PoseDetectorConfig(**checkpoint["config"]))
    detector.load_state_dict(checkpoint["model"])
    return detector.to(device).eval()


def data_differences(checkpoint, key):
    """The data fields in which a saved detector's training data differs from `key`."""
    return sorted(k for k in set(key) | set(checkpoint["data"])
                  if key.get(k) != checkpoint["data"].get(k))


def obtain_pose_detector(path, train_set, config, training, device, train, num_workers=0,
                         progress=True):
    """The detector saved at `path` when it was trained on this data (and, with train=True, with
    these settings); else, with train=True, a new one trained and saved there; else None when
    there is no file. A file trained on other data is refused (UserError) unless train=True."""
    key = data_key(train_set)
    if os.path.exists(path):
        checkpoint = read_pose_detector(path)
        differs = data_differences(checkpoint, key)
        same_settings = (checkpoint["config"] == asdict(config)
                         and checkpoint["training"] == asdict(training))
        if not differs and (same_settings or not train):
            if not same_settings:  # the --pose-detector-* flags train a detector, not read one
                saved = {**checkpoint["config"], **checkpoint["training"]}
                other = sorted(k for k, v in {**asdict(config), **asdict(training)}.items()
                               if saved.get(k) != v)
                print(f"warning: {path} was trained with other settings ({', '.join(other)}) "
                      "than these; it is used as it is (--train-pose-detector retrains it)",
                      file=sys.stderr)
            return detector_from_checkpoint(checkpoint, device)
        if not train:
            raise utils.UserError(f"the pose detector {path} was trained on other data "
                                  f"(differs in: {', '.join(differs)}); pass "
                                  "--train-pose-detector to train one for this data there, or "
                                  "--pose-detector another file")
    elif not train:
        return None
    start = time.perf_counter()
    detector = train_pose_detector(train_set, config, training, device, num_workers, progress)
    save_pose_detector(detector, path, key, training)
    print(f"trained a pose detector on {len(train_set)} images in "
          f"{time.perf_counter() - start:.0f} s; saved it to {path}")
    return detector


def detector_input_size(image_size, max_input_size=DEFAULT_MAX_INPUT_SIZE):
    """The detector's input side for images of image_size: at most max_input_size, even."""
    return min(image_size, max_input_size) // 2 * 2
