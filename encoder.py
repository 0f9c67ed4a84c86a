"""Stage-1 encoder: image (B, 3, H, W) -> latent grid (B, z_channels, H/f, W/f), f = 2**(levels-1).

Also the building blocks the decoder reuses (Normalize, ResnetBlock, AttnBlock).
Architecture and parameter names follow CompVis taming-transformers
(taming/modules/diffusionmodules/model.py), so the released VQGAN checkpoints load as they are:
encoder.down.{level}.block.{i}.norm1, encoder.mid.attn_1.q, ...
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """nn.GroupNorm computed in float32 under any autocast (same parameters and names).

    CUDA's autocast runs group_norm in float32 by itself; the CPU's runs it in bf16, and bf16
    statistics cost the default stage-1 run about 1 dB (README, "Stage 1", precision)."""

    def forward(self, x):  # (B, C, H, W) in any dtype -> float32
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def Normalize(channels, groups=32):
    # The paper uses 32 groups. Each group is normalised per image, so a group's mean colour
    # offset is lost: with one channel per group (32 channels) that is InstanceNorm, which
    # drops each image's colour statistics (see VQGANConfig.norm_groups).
    return GroupNorm32(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv, twice, plus a shortcut (a 1x1 conv when the channel count changes)."""

    def __init__(self, in_channels, out_channels, dropout=0.0, norm_groups=32):
        super().__init__()
        self.norm1 = Normalize(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv matches the channel counts of the shortcut (Identity has no parameters)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels, norm_groups=32):
        super().__init__()
        self.norm = Normalize(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose tokens are the positions
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1)
                   for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, fused kernel
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv; the zero padding is asymmetric (right and bottom)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


class Encoder(nn.Module):
    """conv_in, then per level num_res_blocks ResnetBlocks (+ attention at attn_resolutions) and a
    Downsample (not after the last level), then the middle block, then norm, swish, conv_out."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution,
                 in_channels=3, dropout=0.0, norm_groups=32):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        current_res = resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if current_res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in, norm_groups))
            if level == len(ch_mult) - 1:
                down.downsample = nn.Identity()
            else:
                down.downsample = Downsample(block_in)
                current_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_groups)

        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, H, W)
        for down in self.down:
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            h = down.downsample(h)
        # h: (B, ch * ch_mult[-1], H/f, W/f)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)
