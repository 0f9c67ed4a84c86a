"""Stage 3, super-resolution: a compact ESRGAN-style generator that enlarges the VQGAN's
pictures x2 or x4 and undoes what the VQGAN lost (its pictures are small and soft).

    (B, 3, h, w) VQGAN picture -> conv_first -> RRDB trunk -> trunk_conv (+ skip)
        -> (nearest x2 -> conv -> LeakyReLU) per factor of 2 -> conv_hr -> conv_last
        + bicubic(input) -> (B, 3, s h, s w)

The blocks are ESRGAN's (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative
Adversarial Networks"), with its parameter names (RRDB_trunk.N.RDB1.conv1, upconv1, HRconv,
conv_last): residual-in-residual dense blocks without batch norm, residuals scaled by 0.2, and
nearest-neighbour upsampling followed by a conv (no checkerboard artefacts of transposed convs).
One change: the network adds its output to the bicubic enlargement of its input, so that it
learns only the detail bicubic misses; at a CPU's budget of a few thousand steps that residual
trains much faster than the whole picture does (ESRGAN trains for 400k steps).

This file owns the model, its config (SuperResConfig, the --sr-* flags) and the inference
checkpoint superres.pt (kind "superres"). training_superres.py trains it on pairs of (VQGAN
reconstruction, original); sample.py --superres enlarges samples with it; evaluate.py
--superres scores it against bicubic.
"""
import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import positive_int
from utils import UserError, atomic_save, from_uint8, load_checkpoint, to_uint8

SCALES = (2, 4)


@dataclass
class SuperResConfig:
    scale: int = 2  # output side / input side: 2 or 4
    nf: int = 32  # channels of the trunk
    nb: int = 4  # residual-in-residual dense blocks
    gc: int = 16  # growth channels: what each conv of a dense block adds
    in_size: int = 64  # the side of the pictures it was trained on (the VQGAN's resolution)

    def __post_init__(self):
        if self.scale not in SCALES:
            raise UserError(f"--scale {self.scale}: the generator enlarges x2 or x4")

    @property
    def out_size(self):
        return self.in_size * self.scale


def add_superres_args(parser):
    """The generator's size: one flag per SuperResConfig field except the sizes."""
    group = parser.add_argument_group("super-resolution generator")
    defaults = SuperResConfig()
    group.add_argument("--sr-nf", type=positive_int, default=defaults.nf,
                       help="trunk channels")
    group.add_argument("--sr-nb", type=positive_int, default=defaults.nb,
                       help="residual-in-residual dense blocks")
    group.add_argument("--sr-gc", type=positive_int, default=defaults.gc,
                       help="growth channels of the dense blocks")
    return group


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block's input and every earlier conv's output."""

    def __init__(self, nf, gc):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, padding=1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, padding=1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, padding=1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, padding=1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight, a=0.2)
            conv.weight.data *= 0.1  # ESRGAN's small initialisation: each block starts near identity
            nn.init.zeros_(conv.bias)

    def forward(self, x):  # (B, nf, h, w) -> (B, nf, h, w)
        x1 = self.lrelu(self.conv1(x))  # (B, gc, h, w)
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))  # (B, nf, h, w)
        return x + 0.2 * x5


class RRDB(nn.Module):
    """Residual in residual: three dense blocks, and a scaled skip around all three."""

    def __init__(self, nf, gc):
        super().__init__()
        self.RDB1, self.RDB2, self.RDB3 = (ResidualDenseBlock(nf, gc) for _ in range(3))

    def forward(self, x):  # (B, nf, h, w) -> (B, nf, h, w)
        return x + 0.2 * self.RDB3(self.RDB2(self.RDB1(x)))


class SuperResolution(nn.Module):
    """forward((B, 3, h, w) in [-1, 1]) -> (B, 3, scale h, scale w). Fully convolutional: any h,
    w works (sample.py's tall sliding-window pictures too); in_size is what it was trained on."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        nf = config.nf
        self.conv_first = nn.Conv2d(3, nf, 3, padding=1)
        self.RRDB_trunk = nn.Sequential(*(RRDB(nf, config.gc) for _ in range(config.nb)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.upconv1 = nn.Conv2d(nf, nf, 3, padding=1)
        self.upconv2 = nn.Conv2d(nf, nf, 3, padding=1) if config.scale == 4 else None
        self.HRconv = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, 3, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        nn.init.zeros_(self.conv_last.weight)  # starts as bicubic exactly: the residual is 0
        nn.init.zeros_(self.conv_last.bias)

    def forward(self, x):
        features = self.conv_first(x)  # (B, nf, h, w)
        features = features + self.trunk_conv(self.RRDB_trunk(features))
        for upconv in (self.upconv1, self.upconv2):
            if upconv is not None:  # (B, nf, H, W) -> (B, nf, 2H, 2W)
                features = self.lrelu(upconv(F.interpolate(features, scale_factor=2,
                                                           mode="nearest")))
        detail = self.conv_last(self.lrelu(self.HRconv(features)))  # (B, 3, s h, s w)
        return bicubic(x, self.config.scale) + detail


def bicubic(images, scale):
    """(B, C, h, w) -> (B, C, scale h, scale w), bicubic (a = -0.75, as PIL and OpenCV), the
    baseline the generator is measured against; the result may overshoot [-1, 1] slightly."""
    return F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False)


def downscale(images, scale):
    """(B, C, H, W) -> (B, C, H / scale, W / scale) by averaging scale x scale blocks: the box
    filter the mannequin renderer shrinks its drawings with, so a downscaled 128 px mannequin is
    what the 64 px VQGAN was trained on."""
    return F.avg_pool2d(images, scale)


def save_superres(model, path, vqgan_sha256=None, args=None):
    """Write the inference checkpoint {"kind": "superres", "config", "state_dict",
    "vqgan_sha256": the content hash of the VQGAN whose pictures it learned to enlarge,
    "args": the flags of its training (evaluate.py scores the split of their data)}."""
    atomic_save({"kind": "superres", "config": dataclasses.asdict(model.config),
                 "state_dict": model.state_dict(), "vqgan_sha256": vqgan_sha256,
                 "args": args or {}}, path)


def superres_from_checkpoint_dict(checkpoint):
    """Build the generator a checkpoint's "config" describes and load its weights strictly:
    superres.pt's "state_dict", or a training checkpoint's "model"."""
    config = {k: v for k, v in checkpoint["config"].items() if k != "vqgan_sha256"}
    try:
        model = SuperResolution(SuperResConfig(**config))
        model.load_state_dict(checkpoint.get("state_dict") or checkpoint["model"])
    except (TypeError, RuntimeError) as error:  # unknown config fields, missing or extra weights
        raise UserError("the checkpoint does not fit this code's super-resolution generator: "
                        + " ".join(str(error).split())[:400]) from None
    return model


def load_superres(path, device="cpu"):
    """superres.pt (or a training run's superres_last.pt) -> (SuperResolution in eval mode, the
    content hash of the VQGAN it was trained behind, the flags of its training: {} for a file
    from before superres.pt kept them)."""
    checkpoint = load_checkpoint(path, ("superres", "superres_train"))
    model = superres_from_checkpoint_dict(checkpoint).to(device).eval()
    return (model, checkpoint.get("vqgan_sha256") or checkpoint["config"].get("vqgan_sha256"),
            checkpoint.get("args", {}))


def warn_if_other_vqgan(trained_sha256, vqgan_sha256):
    """One warning line when the generator was trained behind another VQGAN than the one whose
    pictures it is given (a mismatch of sizes is refused where the model is loaded)."""
    if trained_sha256 is not None and vqgan_sha256 != trained_sha256:
        print("warning: the super-resolution model was trained behind another VQGAN (its "
              "content differs); it is given this one's pictures", file=sys.stderr)


@torch.no_grad()
def enlarge(model, images, batch_size=16):
    """Pictures (N, 3, h, w) in [-1, 1] -> (N, 3, s h, s w) in [-1, 1], on the model's device,
    in batches; float32 on the CPU (returns CPU tensors). The pictures are clamped and rounded
    to 8 bits first, as the training pairs were (a decoder overshoots [-1, 1])."""
    images = from_uint8(to_uint8(images))
    device = next(model.parameters()).device
    return torch.cat([model(images[start:start + batch_size].to(device).float()).clamp(-1, 1).cpu()
                      for start in range(0, len(images), batch_size)])
