"""How well samples follow the poses they were conditioned on: evaluate.py's pose fidelity and
pose accuracy, both scored on one set of samples (`generate_pose_samples`).

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
  another person in the same pose (keypoint-conditioned models on a mannequin set): the
           renderer draws each pose again with another build, clothes and backdrop (the same
           keypoints), through the VQGAN like the ceiling: what a sampler that follows the
           keypoints exactly scores with one random person, below the ceiling since keypoints
           do not fix how wide a body or a skirt is.
A pose-following model has samples/ceiling near 1 and samples/floor well above 1.

Real photographs have no part maps and busy backgrounds, so pose fidelity is skipped there (with
a note), and also on data whose part maps come with busy backgrounds (e.g. photos with DensePose
part maps): there the real images' own silhouettes miss their part maps (real IoU below
MIN_REAL_IOU) and every score would be noise. Pose accuracy needs only keypoints:

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
"""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import images
import mannequins
import pose_detector
import utils
from data import unflipped_batches
from transformer import POSE_INPUT

SILHOUETTE_THRESHOLD = 0.2  # RGB distance in [0, 1] units from the border's median colour
MIN_REAL_IOU = 0.5  # real mannequins score 0.80 at 32 px; photos on busy backdrops about 0.1


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
    other_person: torch.Tensor = None  # (N, 3, S, S): another person in each pose, through tokens
    # and decoder too (keypoint conditions on mannequin sets only, else None)


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
                          top_p=None, temperature=1.0, guidance=None):
    """Sample one image for each of the first `num_poses` poses of `dataset` (seeded; guidance
    None: the model's default, PoseTransformer.resolve_guidance)."""
    count = min(num_poses, len(dataset))
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    pictures = {"samples": [], "reconstructions": [], "other_person": [], "real": [],
                "keypoints": [], "parts": []}
    for batch in tqdm(unflipped_batches(dataset, batch_size, count=count), desc="pose samples",
                      leave=False):
        images = batch["image"].to(device)
        tokens = model.sample(model.condition_tokens(batch), top_k=top_k, top_p=top_p,
                              temperature=temperature, generator=generator, guidance=guidance)
        drawn = {"samples": tokens, "reconstructions": model.image_tokens(images)}
        others = (other_people(dataset, batch, seed)
                  if POSE_INPUT.get(model.condition) == "keypoints" else None)
        if others is not None:
            drawn["other_person"] = model.image_tokens(others.to(device))
        # clamped, as a picture and the reconstruction metrics are; the reconstructions through
        # tokens like the samples, so that all are drawn by the very same decoder path
        for key, codes in drawn.items():
            pictures[key].append(model.decode(codes).float().clamp(-1, 1).cpu())
        pictures["real"].append(batch["image"])
        for key in ("keypoints", "parts"):
            if key in batch:
                pictures[key].append(batch[key])
    stacked = {key: torch.cat(chunks) if chunks and len(chunks) == len(pictures["samples"])
               else None for key, chunks in pictures.items()}
    return PoseSamples(condition=model.condition, **stacked,
                       partner=derangement(count, torch.Generator().manual_seed(seed)),
                       sampling={"top_k": top_k, "top_p": top_p, "temperature": temperature,
                                 "guidance": model.resolve_guidance(guidance), "seed": seed})


def other_people(dataset, batch, seed):
    """(N, 3, S, S) in [-1, 1]: the batch's mannequins, each drawn as another person in the
    same pose (mannequins.same_pose_other_people), or None for other data: anything but a
    mannequin set read at its own size, with the very keypoints of the batch."""
    drawn = mannequins.same_pose_other_people(dataset.root, batch["path"], dataset.image_size,
                                              seed)
    if drawn is None:
        return None
    joints = torch.from_numpy(np.stack([keypoints[:, :2] for _, keypoints in drawn]))
    given = batch["keypoints"][..., :2].float()
    if joints.shape != given.shape or not torch.allclose(joints, given, atol=0.01):
        return None  # a renamed or edited set, or its poses.json in another layout
    return torch.stack([images.to_tensor(image) for image, _ in drawn])


def evaluate_pose_fidelity(poses, threshold=SILHOUETTE_THRESHOLD):
    """Silhouette IoU of the samples against the rendered silhouettes of their poses (part maps),
    with the reconstruction ceiling and the deranged-pose floor (see the module docstring), or
    {"skipped": why} where the real images' own silhouettes do not match their part maps."""
    samples, reconstructions, real = (silhouette(utils.denormalize(pictures), threshold)
                                      for pictures in (poses.samples, poses.reconstructions,
                                                       poses.real))
    truth = poses.parts > 0
    real_iou = iou(real, truth).mean().item()
    if real_iou < MIN_REAL_IOU:
        return {"skipped": f"the real images' silhouettes match their part maps with IoU "
                           f"{real_iou:.2f} only (below {MIN_REAL_IOU}): their backgrounds "
                           f"are not plain; see the pose accuracy (PCK) instead"}
    sample_iou = iou(samples, truth).mean().item()
    ceiling_iou = iou(reconstructions, truth).mean().item()
    floor_iou = iou(samples, truth[poses.partner]).mean().item()
    other_iou = (None if poses.other_person is None else iou(
        silhouette(utils.denormalize(poses.other_person), threshold), truth).mean().item())
    return {"condition": poses.condition, "num_poses": len(samples), "threshold": threshold,
            "sample_iou": sample_iou, "ceiling_iou": ceiling_iou, "floor_iou": floor_iou,
            "real_iou": real_iou, "other_person_iou": other_iou,
            "other_person_over_ceiling": (other_iou / ceiling_iou if other_iou is not None
                                          and ceiling_iou > 0 else None),
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
