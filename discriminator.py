"""Stage-1 adversary: a PatchGAN discriminator that scores overlapping patches as real or fake.

The stage-1 training script feeds it real images and VQGAN reconstructions (B, 3, H, W) in
[-1, 1] and gets one logit per patch (B, 1, h, w); the GAN term of the VQGAN loss and the
discriminator's own loss (hinge_d_loss or vanilla_d_loss) are built from those logits.
NLayerDiscriminator and weights_init are the pix2pix ones that CompVis taming-transformers uses,
with the same parameter names (main.0.weight, ...). Its BatchNorm layers are GlobalBatchNorm2d:
plain BatchNorm2d in one process, batch statistics over every process under DDP.
"""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
import torch.nn as nn
import torch.nn.functional as F


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of a DDP job.

    torch's SyncBatchNorm only runs on CUDA; this one all-reduces per-channel sums with an
    autograd-aware all_reduce, so it works with gloo (CPU) and NCCL alike, and W processes with
    batch B normalise exactly as one process with batch W * B. Same parameters and buffers as
    BatchNorm2d; in one process (or in eval mode) it is BatchNorm2d.
    """

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        C = x.size(1)
        # statistics in float32 at least: under autocast x is bf16 or fp16, too coarse for sums
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                           xf.new_full((1,), x.numel() / C)])  # (2C + 1,) sums and count
        total = dist_functional.all_reduce(local)  # summed over ranks, differentiable
        count = total[-1]
        mean = total[:C] / count
        var = total[C:2 * C] / count - mean * mean  # biased, as BatchNorm normalises with
        with torch.no_grad():  # running statistics keep the unbiased variance, as BatchNorm2d
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)  # (C,)
        shift = self.bias - mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def weights_init(module):
    """DCGAN initialisation: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """n_layers stride-2 convs (64, 128, 256, ... channels, at most 8 * ndf), one stride-1 conv,
    then a 1-channel conv: each output logit sees a 70x70 patch for n_layers=3."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        # convs followed by BatchNorm need no bias
        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev_mult, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev_mult, ndf * mult, 4, stride, padding=1, bias=False),
                       GlobalBatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x):
        # (B, 3, H, W) -> (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2), e.g. 256 px -> 30x30
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    """Push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real, logits_fake):
    """Binary cross-entropy with real = 1, fake = 0, written with softplus."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
