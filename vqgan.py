"""Stage 1, the VQGAN: images (B, 3, H, W) <-> grids of codebook tokens (B, H/f, W/f).

encoder -> quant_conv -> quantize (Codebook) -> post_quant_conv -> decoder, with the module names
of CompVis taming-transformers so that its released checkpoints load. This file also owns the
config (VQGANConfig, PRESETS, the --preset and override flags) and the inference checkpoint
vqgan.pt (kind "vqgan"). The stage-1 training script adds the losses (lpips_loss.py,
discriminator.py); stage 2 reads tokens from VQGAN.encode and turns sampled tokens back into
pictures with VQGAN.decode_indices.
"""
import argparse
import dataclasses
from dataclasses import dataclass

import torch.nn as nn

from codebook import Codebook
from decoder import Decoder
from encoder import Encoder
from utils import UserError, atomic_save, load_checkpoint


@dataclass
class VQGANConfig:
    ch: int  # channels at full resolution; level i has ch * ch_mult[i]
    ch_mult: tuple  # one entry per resolution level: downsampling factor f = 2**(len - 1)
    num_res_blocks: int
    attn_resolutions: tuple  # feature-map sizes that get self-attention, e.g. (16,)
    z_channels: int  # encoder output and decoder input channels
    embed_dim: int  # size of a codebook vector
    n_embed: int  # number of codes: the vocabulary of stage 2
    resolution: int  # image side in pixels
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    beta: float = 0.25  # commitment weight
    legacy_beta: bool = False  # beta on the codebook term, as the original release did
    l2_normalize: bool = False  # cosine-similarity codes
    lookup_dim: int | None = None  # factorised codes: look up in this many dimensions (0 = off)
    restart_dead_codes: bool = False
    dead_code_window: int = 100  # training steps a code may go unused before it is restarted

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)  # checkpoints store lists
        self.attn_resolutions = tuple(self.attn_resolutions)
        self.lookup_dim = self.lookup_dim or None
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.resolution % factor:
            raise UserError(f"resolution {self.resolution} is not divisible by the downsampling "
                            f"factor {factor} that ch_mult {self.ch_mult} gives")
        if any(self.ch * mult % 32 for mult in self.ch_mult):
            raise UserError(f"ch {self.ch} times each of ch_mult {self.ch_mult} must be a multiple "
                            "of 32 (GroupNorm uses 32 groups)")


PRESETS = {
    # the paper's f16 model for 256 px images: 16x16 tokens, 72M parameters
    "paper": VQGANConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                         attn_resolutions=(16,), z_channels=256, embed_dim=256, n_embed=1024,
                         resolution=256),
    # f4 for 64 px images: 16x16 tokens, small enough to train on two CPU cores
    "small": VQGANConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                         z_channels=64, embed_dim=64, n_embed=512, resolution=64,
                         l2_normalize=True, lookup_dim=16, restart_dead_codes=True),
}


def comma_ints(text):
    """'1,2,2' -> (1, 2, 2); '' -> ()."""
    return tuple(int(part) for part in text.split(",") if part.strip())


def add_vqgan_args(parser):
    """--preset, plus one flag per VQGANConfig field that overrides the preset's value."""
    group = parser.add_argument_group("VQGAN architecture (each flag overrides the preset)")
    group.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for field in dataclasses.fields(VQGANConfig):
        if field.name == "resolution":  # the image size comes from --image-size
            continue
        flag = "--" + field.name.replace("_", "-")
        values = "; ".join(f"{name}: {getattr(preset, field.name)}"
                           for name, preset in PRESETS.items())
        if field.type is bool:  # --l2-normalize / --no-l2-normalize
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=values)
        elif field.type is tuple:
            group.add_argument(flag, type=comma_ints, default=None, metavar="N,N,...",
                               help=f"comma-separated ({values})")
        else:  # int, float, and lookup_dim's int | None (0 = off)
            group.add_argument(flag, type=float if field.type is float else int, default=None,
                               metavar="N", help=values)


def config_from_args(args):
    """The preset, with every flag that was given and the resolution from --image-size."""
    overrides = {field.name: getattr(args, field.name) for field in dataclasses.fields(VQGANConfig)
                 if getattr(args, field.name, None) is not None}
    overrides["resolution"] = args.image_size
    return dataclasses.replace(PRESETS[args.preset], **overrides)


class VQGAN(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        shape = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                     attn_resolutions=config.attn_resolutions, z_channels=config.z_channels,
                     resolution=config.resolution, dropout=config.dropout)
        self.encoder = Encoder(**shape, in_channels=config.in_channels)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = Codebook(config.n_embed, config.embed_dim, beta=config.beta,
                                 legacy_beta=config.legacy_beta,
                                 l2_normalize=config.l2_normalize, lookup_dim=config.lookup_dim,
                                 restart_dead_codes=config.restart_dead_codes,
                                 dead_code_window=config.dead_code_window)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(**shape, out_ch=config.out_ch)

    @property
    def token_grid_size(self):
        """Side of the token grid: resolution / f."""
        return self.config.resolution // 2 ** (len(self.config.ch_mult) - 1)

    @property
    def last_layer(self):
        """The decoder's last weight: the adaptive GAN weight compares gradients here."""
        return self.decoder.conv_out.weight

    def encode(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> z_q (B, embed_dim, h, w), loss, tokens (B, h, w)."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q):
        """(B, embed_dim, h, w) -> images (B, out_ch, H, W)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices):
        """Tokens (B, h, w) -> images (B, out_ch, H, W)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x):
        z_q, codebook_loss, indices = self.encode(x)
        return self.decode(z_q), codebook_loss, indices


def save_vqgan(model, path):
    """Write the inference checkpoint {"kind": "vqgan", "config", "state_dict"} atomically."""
    config = {name: list(value) if isinstance(value, tuple) else value
              for name, value in dataclasses.asdict(model.config).items()}  # weights_only-safe
    atomic_save({"kind": "vqgan", "config": config, "state_dict": model.state_dict()}, path)


def vqgan_from_checkpoint_dict(checkpoint):
    """Build the VQGAN a checkpoint's "config" describes and load its "state_dict" strictly."""
    try:
        model = VQGAN(VQGANConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as error:  # unknown config fields, missing or extra weights
        raise UserError("the checkpoint does not fit this code's VQGAN: "
                        + " ".join(str(error).split())[:400]) from None
    return model


def load_vqgan(path, device="cpu"):
    """vqgan.pt -> VQGAN in eval mode on `device`."""
    model = vqgan_from_checkpoint_dict(load_checkpoint(path, "vqgan"))
    return model.to(device).eval()
