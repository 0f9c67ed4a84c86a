"""Stage 1, the VQGAN: images (B, 3, H, W) <-> grids of codebook tokens (B, H/f, W/f).

encoder -> quant_conv -> quantize (Codebook) -> post_quant_conv -> decoder, with the module names
of CompVis taming-transformers so that its released checkpoints load. This file also owns the
config (VQGANConfig, PRESETS, the --preset and override flags) and the inference checkpoint
vqgan.pt (kind "vqgan"), and `python vqgan.py convert`, which turns a VQGAN released with the
paper (Lightning .ckpt + YAML config) into such a vqgan.pt. The stage-1 training script adds the
losses (lpips_loss.py, discriminator.py); stage 2 reads tokens from VQGAN.encode and turns sampled
tokens back into pictures with VQGAN.decode_indices.
"""
import argparse
import dataclasses
import pickle
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from codebook import Codebook
from decoder import Decoder
from encoder import Encoder
from cli import (ArgumentParser, comma_ints, non_negative_float, non_negative_int, output_file,
                 positive_int, unit_fraction)
from utils import UserError, atomic_save, autocast_context, load_checkpoint, require_file, run_cli


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
    # GroupNorm groups in every block. Each group is normalised per image, which removes its mean:
    # with one channel per group (the small model's 32 channels at full resolution) the final
    # norm before conv_out is InstanceNorm, and the decoder loses each picture's colour offsets
    # (backdrop tint, clothes' hues). The paper's 32 suits its 128 channels; released
    # checkpoints need 32.
    norm_groups: int = 32

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)  # checkpoints store lists
        self.attn_resolutions = tuple(self.attn_resolutions)
        self.lookup_dim = self.lookup_dim or None
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.resolution % factor:
            raise UserError(f"resolution {self.resolution} is not divisible by the downsampling "
                            f"factor {factor} that ch_mult {self.ch_mult} gives")
        if any(self.ch * mult % self.norm_groups for mult in self.ch_mult):
            raise UserError(f"ch {self.ch} times each of ch_mult {self.ch_mult} must be a multiple "
                            f"of {self.norm_groups} (--norm-groups, the GroupNorm groups)")


PRESETS = {
    # the paper's f16 model for 256 px images: 16x16 tokens, 72M parameters
    "paper": VQGANConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                         attn_resolutions=(16,), z_channels=256, embed_dim=256, n_embed=1024,
                         resolution=256),
    # f4 for 64 px images: 16x16 tokens, small enough to train on two CPU cores; 8 GroupNorm
    # groups (4 channels each at 32 channels) instead of InstanceNorm-like 32 (README: +1.2 dB);
    # 2048 codes: with 512 the quantizer held the figures' colours back (README, "Then the
    # codebook": +0.6 dB, -1.5 colour error in the default run)
    "small": VQGANConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                         z_channels=64, embed_dim=64, n_embed=2048, resolution=64,
                         l2_normalize=True, lookup_dim=16, restart_dead_codes=True,
                         norm_groups=8),
}


# the argument type of each number field; the others are integers >= 1
FIELD_TYPES = {"lookup_dim": non_negative_int, "dropout": unit_fraction, "beta": non_negative_float}


def add_vqgan_args(parser):
    """--preset, plus one flag per VQGANConfig field that overrides the preset's value."""
    group = parser.add_argument_group("VQGAN architecture (each flag overrides the preset)")
    group.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for field in dataclasses.fields(VQGANConfig):
        if field.name == "resolution":  # the preset's, or --image-size
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
            group.add_argument(flag, type=FIELD_TYPES.get(field.name, positive_int), default=None,
                               metavar="N", help=values)
    return group


def config_from_args(args):
    """The preset, with every flag that was given; the resolution is --image-size when given,
    else the preset's (256 px for paper, 64 px for small). At their own sizes both presets attend
    on their token grid: where the preset's attention size is no feature-map size of the model
    (small's 16 at 128 px), attention moves to the token grid; a given one is kept, warned."""
    overrides = {field.name: getattr(args, field.name) for field in dataclasses.fields(VQGANConfig)
                 if getattr(args, field.name, None) is not None}
    if getattr(args, "image_size", None) is not None:
        overrides["resolution"] = args.image_size
    config = dataclasses.replace(PRESETS[args.preset], **overrides)
    sizes = [config.resolution >> level for level in range(len(config.ch_mult))]  # to the grid
    if set(config.attn_resolutions) <= set(sizes):
        return config
    if "attn_resolutions" in overrides:
        print(f"warning: --attn-resolutions {','.join(map(str, config.attn_resolutions))}: this "
              f"model's feature maps are {', '.join(map(str, sizes))} px, so it adds no attention "
              "there", file=sys.stderr)
        return config
    return dataclasses.replace(config, attn_resolutions=(sizes[-1],))


class VQGAN(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        shape = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                     attn_resolutions=config.attn_resolutions, z_channels=config.z_channels,
                     resolution=config.resolution, dropout=config.dropout,
                     norm_groups=config.norm_groups)
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

    @torch.no_grad()
    def image_tokens(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> tokens (B, h, w), always under the device's automatic
        precision (utils.autocast_context), so that the token cache, completions and evaluation
        encode an image to the same tokens."""
        with autocast_context(images.device):
            return self.encode(images)[2]

    def decode(self, z_q):
        """(B, embed_dim, h, w) -> images (B, out_ch, H, W)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices):
        """Tokens (B, h, w) -> images (B, out_ch, H, W)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x, return_last_input=False):
        """Images (B, 3, H, W) -> reconstructions (B, out_ch, H, W), codebook loss, tokens
        (B, h, w). With return_last_input, also the (detached) input of decoder.conv_out
        (B, ch * ch_mult[0], H, W): training gets that conv's weight gradient from it directly
        (training_vqgan.adaptive_lambda), without a backward pass through the model."""
        z_q, codebook_loss, indices = self.encode(x)
        if not return_last_input:
            return self.decode(z_q), codebook_loss, indices
        last_input = self.decoder.last_input(self.post_quant_conv(z_q))
        return self.decoder.conv_out(last_input), codebook_loss, indices, last_input.detach()


def save_vqgan(model, path, content="photos"):
    """Write the inference checkpoint {"kind": "vqgan", "content", "config", "state_dict"}
    atomically; `content` is what the VQGAN encodes (conditions.CONTENTS)."""
    config = {name: list(value) if isinstance(value, tuple) else value
              for name, value in dataclasses.asdict(model.config).items()}  # weights_only-safe
    atomic_save({"kind": "vqgan", "content": content, "config": config,
                 "state_dict": model.state_dict()}, path)


def vqgan_from_checkpoint_dict(checkpoint):
    """Build the VQGAN a checkpoint's "config" describes and load its "state_dict" strictly."""
    try:
        model = VQGAN(VQGANConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as error:  # unknown config fields, missing or extra weights
        raise UserError("the checkpoint does not fit this code's VQGAN: "
                        + " ".join(str(error).split())[:400]) from None
    return model


def describe_content(content):
    return ("an image VQGAN (of photos)" if content == "photos" else
            f"a condition VQGAN of {content} (training_vqgan.py --content {content})")


def load_vqgan(path, device="cpu", content="photos"):
    """vqgan.pt -> VQGAN in eval mode on `device`; one that encodes other pictures than
    `content` (photos: checkpoints from before condition VQGANs) is refused."""
    checkpoint = load_checkpoint(path, "vqgan")
    found = checkpoint.get("content", "photos")
    if found != content:
        raise UserError(f"{path} is {describe_content(found)}, but {describe_content(content)} "
                        "is needed here")
    return vqgan_from_checkpoint_dict(checkpoint).to(device).eval()


# ----------------------------------------------------------------------------------------------
# Released checkpoints: python vqgan.py convert --ckpt model.ckpt --config model.yaml --out vqgan.pt
# ----------------------------------------------------------------------------------------------


def parse_yaml(text, name="the YAML file"):
    """A released config's text -> its mappings, lists and scalars, read by PyYAML (safe_load:
    plain data only); malformed YAML is a UserError naming the line."""
    try:
        import yaml
    except ImportError:  # a requirement, but only this converter needs it
        raise UserError("converting a released config needs PyYAML: pip install pyyaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{name}{where}: not YAML that pyyaml can read "
                        f"({getattr(error, 'problem', None) or error})") from None


def read_yaml(path):
    """The YAML config file at `path` (parse_yaml)."""
    try:
        with open(path) as f:
            return parse_yaml(f.read(), path)
    except OSError as error:
        raise UserError(f"cannot read the config {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text YAML file (were --ckpt and --config swapped?)"
                        ) from None


RELEASED_DDCONFIG = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels",
                     "resolution", "in_channels", "out_ch", "dropout")


def released_value_fits(key, value):
    """Whether a released config's value has the type VQGANConfig needs."""
    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if key == "dropout":
        return integer(value) or isinstance(value, float)
    if key in ("ch_mult", "attn_resolutions"):
        return isinstance(value, list) and all(map(integer, value))
    return integer(value)


def config_from_released(data, name="the config"):
    """A taming-transformers VQModel config (model: params: embed_dim, n_embed, ddconfig) ->
    VQGANConfig with their quantizer's loss: beta 0.25 on the codebook term (legacy_beta)."""
    model = data.get("model", data) if isinstance(data, dict) else None
    params = model.get("params", model) if isinstance(model, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
        raise UserError(f"{name} has no model.params.ddconfig: not a taming-transformers "
                        "VQGAN config")
    target = model.get("target", "taming.models.vqgan.VQModel")
    if not isinstance(target, str) or target.rsplit(".", 1)[-1] != "VQModel":
        raise UserError(f"{name} describes a {target}; only taming.models.vqgan.VQModel "
                        "(the plain VQGAN) can be converted")
    ddconfig = params["ddconfig"]
    if ddconfig.get("double_z", False):
        raise UserError(f"{name} has double_z: True (a KL autoencoder's config), not a VQGAN's")
    missing = [f"ddconfig.{k}" for k in RELEASED_DDCONFIG if k not in ddconfig]
    missing += [k for k in ("embed_dim", "n_embed") if k not in params]
    if missing:
        raise UserError(f"{name} lacks {', '.join(missing)}")
    values = {**{k: ddconfig[k] for k in RELEASED_DDCONFIG},
              "embed_dim": params["embed_dim"], "n_embed": params["n_embed"]}
    wrong = [k for k, v in values.items() if not released_value_fits(k, v)]
    if wrong:
        raise UserError(f"{name}: " + ", ".join(f"{k}: {values[k]!r}" for k in wrong)
                        + " (ddconfig's ch_mult and attn_resolutions are lists of integers, "
                        "dropout a number, the others integers)")
    return VQGANConfig(**values, beta=0.25, legacy_beta=True, l2_normalize=False,
                       lookup_dim=None, restart_dead_codes=False)


def pickled_objects(path):
    """The Python classes and functions a torch.save file pickles beyond plain tensors (what
    weights_only=True refuses), as module.name; [] when there are none or it is no such file."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip file torch.save wrote
        return []


def read_released_state_dict(path, trust_pickle=False):
    """The weights of a Lightning .ckpt (its "state_dict") or of a bare state dict.

    weights_only=True first; a file that also pickles Python objects (Lightning callbacks,
    hyper-parameters) needs trust_pickle, which runs whatever code the file names.
    """
    require_file(path, "checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except ModuleNotFoundError as error:  # --trust-pickle: the pickled classes' module is missing
        raise UserError(f"{path} pickles objects of the module {error.name}, which is not "
                        "installed here (pip install pytorch-lightning, for Lightning's "
                        "callbacks)") from None
    except pickle.UnpicklingError:  # pickled Python objects, or not a torch.save file at all
        unsafe = [] if trust_pickle else pickled_objects(path)
        if unsafe:
            raise UserError(f"{path} holds pickled Python objects beyond tensors "
                            f"({', '.join(unsafe[:3])}), which weights_only=True refuses to "
                            "load; if you trust where the file came from, re-run with "
                            "--trust-pickle, which executes code from the file") from None
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch or Lightning "
                        "checkpoint, or a damaged one") from None
    except Exception as error:  # a corrupt or truncated file
        raise UserError(f"cannot read checkpoint {path} ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} holds no state dict of tensors (a Lightning .ckpt has one "
                        "under 'state_dict')")
    return state_dict


def vqgan_from_released(state_dict, config):
    """Load a released state dict strictly -> (VQGAN in eval mode, the dropped loss.* keys)."""
    dropped = sorted(k for k in state_dict if k.startswith("loss."))  # LPIPS and discriminator
    weights = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    model = VQGAN(config)
    expected = model.state_dict().keys()
    missing, extra = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or extra:
        def listed(keys):
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        problems = ([f"{len(missing)} missing: {listed(missing)}"] if missing else []) + (
            [f"{len(extra)} unexpected: {listed(extra)}"] if extra else [])
        raise UserError(f"the checkpoint's weights do not fit the config's VQGAN "
                        f"({'; '.join(problems)})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # shapes that differ from the config's
        raise UserError("the checkpoint's weights do not fit the config's VQGAN: "
                        + " ".join(str(error).split())[:400]) from None
    return model.eval(), dropped


def main(argv=None):
    parser = ArgumentParser(description="VQGAN checkpoint tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert", help="a released taming-transformers VQGAN (.ckpt + .yaml) -> our vqgan.pt")
    convert.add_argument("--ckpt", required=True, help="the released Lightning checkpoint")
    convert.add_argument("--config", required=True, help="its YAML config (model.params)")
    convert.add_argument("--out", type=output_file, required=True,
                         help="the inference checkpoint to write")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="load with weights_only=False: executes code from the file, so "
                              "only for files from a source you trust")
    args = parser.parse_args(argv)

    config = config_from_released(read_yaml(args.config), args.config)
    state_dict = read_released_state_dict(args.ckpt, args.trust_pickle)
    model, dropped = vqgan_from_released(state_dict, config)
    if dropped:
        print(f"dropped {len(dropped)} training-loss entries (LPIPS, discriminator): "
              + ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else ""))
    try:
        save_vqgan(model, args.out)
    except OSError as error:
        raise UserError(f"cannot write {args.out} ({error.strerror}); choose another --out"
                        ) from None
    grid = model.token_grid_size
    print(f"wrote {args.out}: {config.resolution} px images <-> {grid} x {grid} tokens of "
          f"{config.n_embed} codes (legacy beta)")


if __name__ == "__main__":
    run_cli(main)
