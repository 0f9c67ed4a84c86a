"""Stage-1 decoder: quantized latent grid (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

The mirror of encoder.py, built from the same blocks plus Upsample, the decoder's own. As in
CompVis taming-transformers, `up` is indexed by resolution level (up.0 is the highest
resolution) although it runs from the lowest level up, each level has num_res_blocks + 1
ResnetBlocks, and the parameter names match the released checkpoints
(decoder.up.1.upsample.conv, decoder.mid.attn_1.q, ...).
"""
import torch.nn as nn
import torch.nn.functional as F

from encoder import AttnBlock, Normalize, ResnetBlock


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Decoder(nn.Module):
    """conv_in, the middle block, then per level (lowest resolution first) num_res_blocks + 1
    ResnetBlocks (+ attention at attn_resolutions) and an Upsample (not after the highest level),
    then norm, swish, conv_out."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution,
                 out_ch=3, dropout=0.0, norm_groups=32):
        super().__init__()
        block_in = ch * ch_mult[-1]
        current_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_groups)

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if current_res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in, norm_groups))
            if level == 0:
                up.upsample = nn.Identity()
            else:
                up.upsample = Upsample(block_in)
                current_res *= 2
            self.up.insert(0, up)  # keep up[level] indexed by level, as the checkpoints are

        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        return self.conv_out(self.last_input(z))  # (B, out_ch, h*f, w*f)

    def last_input(self, z):
        """Everything before conv_out: (B, z_channels, h, w) -> (B, ch * ch_mult[0], h*f, w*f)."""
        h = self.conv_in(z)  # (B, ch * ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            h = up.upsample(h)
        return F.silu(self.norm_out(h))  # (B, ch * ch_mult[0], h*f, w*f)
