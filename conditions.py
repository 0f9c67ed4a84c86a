"""What a pose becomes before the GPT: the keypoints' cells, the part map's majority labels, or
a condition picture that a second VQGAN encodes (the paper's pose-to-image model).

`keypoint_cells` and `majority_parts` make the prefixes of --condition keypoints and parts
(transformer.py). `training_vqgan.py --content` says what a VQGAN learns to encode:
  photos           the images themselves: the image VQGAN, a pixel loss (L1 of R, G, B, or the
                   squared error of luma and weighted chroma: Content.loss) (+ LPIPS, + GAN)
  keypoint-images  the pose drawn as a picture (poses.pose_picture: each bone a line in its own
                   colour, left and right apart, joints as dots, invisible joints absent), L1
                   balanced between the drawn and the white pixels (Content.loss)
  part-maps        the part map one-hot, one channel per label in {-1, 1}; the decoder gives a
                   logit per label, trained with cross-entropy, as the paper's segmentation VQGAN
`Content` makes that input from a batch, scores a reconstruction of it and draws it for grids;
the stage-2 transformer (`--condition keypoint-vqgan|parts-vqgan`) encodes its condition
pictures with the same `Content.inputs`, so stage 1 and stage 2 see the very same pictures.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from poses import COCO17, NUM_PART_LABELS, PART_COLOURS, KeypointLayout, pose_picture
from utils import UserError, denormalize, psnr


def keypoint_cells(keypoints, grid, image_size):
    """(B, K, 3) x, y, v in pixels of an image_size square -> (B, K) cell row * G + col on the
    G x G grid (G = `grid`), or G * G when not visible (v == 0, off the image or NaN). The image
    is [0, size] in x and y, its edges included (poses.reframe_keypoints)."""
    G, size = grid, image_size
    x, y, v = keypoints.nan_to_num(-1.0).unbind(dim=-1)  # (B, K) each; NaN -> outside
    visible = (v > 0) & (x >= 0) & (x <= size) & (y >= 0) & (y <= size)
    col = (x * G / size).floor().long().clamp(0, G - 1)
    row = (y * G / size).floor().long().clamp(0, G - 1)
    return torch.where(visible, row * G + col, G * G)


def majority_parts(part_maps, grid, num_labels):
    """(B, H, W) labels -> (B, grid * grid) the most frequent label of each cell of the grid x
    grid token grid, ties to the lower label."""
    B, H, W = part_maps.shape
    h = grid
    if H % h or W % h:
        raise UserError(f"part maps of {H}x{W} do not split into the {h}x{h} token grid")
    cells = part_maps.reshape(B, h, H // h, h, W // h)
    counts = torch.stack([(cells == label).sum(dim=(2, 4))
                          for label in range(num_labels)], dim=-1)  # (B, h, h, L)
    return counts.argmax(dim=-1).flatten(1)  # argmax returns the first maximum: lower label

CONTENTS = ("photos", "keypoint-images", "part-maps")
# the stage-2 conditions that encode a condition picture, and the content of their VQGAN
CONDITION_CONTENT = {"keypoint-vqgan": "keypoint-images", "parts-vqgan": "part-maps"}


def content_defaults(kind, num_labels, resolution=64, ch_mult=None):
    """A condition VQGAN's defaults over the preset's (README, "Condition VQGANs"), chosen by
    measurement: pose pictures on an f4 grid (16 x 16 tokens at 64 px; f8 smeared the arms and
    cost stage 2 a quarter of its PCK), part maps on an f8 grid (8 x 8 tokens) in and out with a
    channel per label; 256 codes, attention on the grid only, no LPIPS, no GAN. Each doubling of the
    `resolution` above 64 px adds a halving level, so the grids stay 16 x 16 and 8 x 8 at 64 x 2^k
    px (at 256 px f4 would make a 4096-token prefix); other sizes get the factor of the largest
    such size at or below them (96 px: 24 x 24 and 12 x 12). A given `ch_mult` (--ch-mult) sets
    the grid that the attention is on instead. Photos keep the preset's."""
    if kind == "photos":
        return {}
    extra_levels = (1,) * max(0, (resolution // 64).bit_length() - 1)
    defaults = dict(ch_mult=extra_levels + (1, 2, 4), n_embed=256, perceptual_weight=0.0,
                    disc_weight=0.0, pixel_loss="l1", chroma_weight=0.0)
    if kind == "part-maps":
        defaults.update(ch_mult=extra_levels + (1, 2, 2, 4), in_channels=num_labels,
                        out_ch=num_labels)
    grid = resolution // 2 ** (len(ch_mult or defaults["ch_mult"]) - 1)
    return dict(defaults, attn_resolutions=(grid,))


# BT.601 RGB -> luma Y and the two colour differences Cb (blue - Y), Cr (red - Y), each in
# [-0.5, 0.5] for RGB in [0, 1] (the matrix of JPEG's YCbCr without its offsets)
RGB_TO_LUMA_CHROMA = torch.tensor([[0.299, 0.587, 0.114],
                                   [-0.168736, -0.331264, 0.5],
                                   [0.5, -0.418688, -0.081312]])


@dataclass(frozen=True)
class Content:
    """What one VQGAN encodes (`kind`, one of CONTENTS), with what its pictures need: the
    keypoint layout (bones to draw), the number of part labels, and the training image size,
    which sets the width of the pose pictures' lines (size / 32) on any canvas; and how photos
    are compared in training (`pixel_loss` l1 or mse, `chroma_weight`: see Content.loss)."""

    kind: str = "photos"
    layout: KeypointLayout = COCO17
    num_labels: int = NUM_PART_LABELS
    image_size: int = 64
    pixel_loss: str = "l1"
    chroma_weight: float = 0.0

    @classmethod
    def of_data(cls, kind, dataset, who, **photo_loss):
        """The content `kind` of a PoseImageDataset's pictures; `who` (a flag) needs its poses
        or part maps, and data without them is a UserError naming it. `photo_loss`: the
        pixel_loss and chroma_weight fields."""
        needs = {"keypoint-images": ("poses (poses.json)", dataset.has_keypoints),
                 "part-maps": ("part maps (parts/)", dataset.has_parts)}
        if kind in needs and not needs[kind][1]:
            raise UserError(f"{who} needs {needs[kind][0]} in {dataset.root}")
        return cls(kind, dataset.layout or COCO17, dataset.part_labels.num_labels,
                   dataset.image_size, **photo_loss)

    @property
    def channels(self):
        return self.num_labels if self.kind == "part-maps" else 3

    def inputs(self, batch, size=None):
        """A batch (PoseImageDataset items: "image", "keypoints" or "parts") -> the VQGAN's input
        (B, C, H, W) in [-1, 1]: the images, the poses drawn on a `size` (width, height) canvas
        (default: the training square), or the one-hot part maps."""
        if self.kind == "photos":
            return batch["image"]
        if self.kind == "keypoint-images":
            keypoints = batch["keypoints"]
            size = size or (self.image_size, self.image_size)
            pictures = np.stack([pose_picture(pose, self.layout, size, self.image_size / 32)
                                 for pose in keypoints.cpu().numpy()])  # (B, H, W, 3)
            return torch.from_numpy(pictures).to(keypoints.device).permute(0, 3, 1, 2) * 2 - 1
        one_hot = F.one_hot(batch["parts"].long(), self.num_labels)  # (B, H, W, L)
        return one_hot.permute(0, 3, 1, 2).float() * 2 - 1

    @property
    def loss_name(self):
        """What `loss` computes, in a few words for the start-up line."""
        if self.kind != "photos":
            return {"part-maps": "cross-entropy of the part labels",
                    "keypoint-images": "L1 balanced between drawn and white pixels"}[self.kind]
        return f"{self.pixel_loss} of " + (f"luma and {self.chroma_weight:g} x chroma"
                                           if self.chroma_weight else "RGB")

    def loss(self, target, reconstruction):
        """The reconstruction loss: cross-entropy of the label logits; of pose pictures, the
        mean of the L1 over the drawn pixels and the L1 over the white ones (a pose picture is
        about 95 % white, and a plain L1 is won by drawing nothing: measured, every
        reconstruction blank at step 300 of 600; balanced, the lines count as much as the rest).

        Of photos, the mean absolute (l1) or squared (mse) error of the RGB channels, or with a
        chroma_weight W > 0 of the error's luma and W x its two chroma channels
        (RGB_TO_LUMA_CHROMA). In RGB the chroma is a small part of the error (its spread is a
        fifth of the luma's over the mannequins' pixels), and hue is learned last: the default
        run came back with grey or wrongly coloured clothes (README, "Why the figures lose their
        colours")."""
        if self.kind == "part-maps":
            return F.cross_entropy(reconstruction.float(), target.argmax(dim=1))
        if self.kind == "photos":
            difference = reconstruction.float() - target.float()  # (B, 3, H, W)
            if self.chroma_weight:
                to_luma_chroma = RGB_TO_LUMA_CHROMA.to(difference)[:, :, None, None]
                # (3, 3, 1, 1) x (B, 1, 3, H, W) summed over R, G, B: elementwise, so that it
                # stays float32 under autocast (which runs a matmul or einsum in fp16 / bf16)
                difference = (to_luma_chroma * difference[:, None]).sum(2)  # (B, Y Cb Cr, H, W)
                difference[:, 1:] *= self.chroma_weight
            return (difference.pow(2) if self.pixel_loss == "mse" else difference.abs()).mean()
        error = (target - reconstruction).abs()
        ink = (target < 1 - 1e-3).any(dim=1, keepdim=True).float()  # (B, 1, H, W) drawn pixels
        share = ink.mean().clamp(1e-3, 1 - 1e-3)
        return 0.5 * ((ink / share + (1 - ink) / (1 - share)) * error).mean()

    def scores(self, target, reconstruction):
        """Per-picture validation scores (name -> (B,)): L1 and PSNR of pictures; the
        cross-entropy and the fraction of pixels whose label comes back, of part maps."""
        if self.kind == "part-maps":
            labels = target.argmax(dim=1)
            return {"val_cross_entropy": F.cross_entropy(reconstruction.float(), labels,
                                                         reduction="none").flatten(1).mean(1),
                    "val_pixel_accuracy": (reconstruction.argmax(dim=1) == labels)
                    .flatten(1).float().mean(1)}
        return {"val_l1": (target - reconstruction).abs().flatten(1).mean(1),
                "val_psnr": psnr(denormalize(target), denormalize(reconstruction))}

    def pictures(self, x):
        """VQGAN inputs or outputs (B, C, H, W) -> RGB pictures (B, 3, H, W) in [-1, 1] for
        grids: part maps coloured by their most likely label (poses.PART_COLOURS)."""
        if self.kind != "part-maps":
            return x
        colours = torch.from_numpy(PART_COLOURS).to(x.device).float() / 127.5 - 1
        return colours[x.argmax(dim=1)].permute(0, 3, 1, 2)
