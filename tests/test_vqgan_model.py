"""VQGAN: the released checkpoints' parameter names, attention, shapes, flags, checkpoints."""
import argparse
import dataclasses

import pytest
import torch

from encoder import AttnBlock
import utils
from utils import UserError, atomic_save
from vqgan import (PRESETS, VQGAN, VQGANConfig, add_vqgan_args, config_from_args, load_vqgan,
                   save_vqgan)

# two levels (f2), channels 32 -> 64, attention at the 8x8 level
TINY = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8,
                   embed_dim=4, n_embed=16, resolution=16)


def test_parameter_names_match_the_released_checkpoints():
    keys = set(VQGAN(TINY).state_dict())
    expected = {
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight", "encoder.down.0.block.0.conv1.weight",
        "encoder.down.0.block.0.norm2.bias", "encoder.down.0.block.0.conv2.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",  # 32 -> 64 channels
        "encoder.down.1.attn.0.norm.weight", "encoder.down.1.attn.0.q.weight",
        "encoder.down.1.attn.0.k.weight", "encoder.down.1.attn.0.v.weight",
        "encoder.down.1.attn.0.proj_out.weight",
        "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.q.weight",
        "encoder.mid.block_2.conv2.weight", "encoder.norm_out.weight", "encoder.conv_out.weight",
        "quant_conv.weight", "quantize.embedding.weight", "post_quant_conv.weight",
        "decoder.conv_in.weight", "decoder.mid.block_1.norm1.weight", "decoder.mid.attn_1.v.weight",
        "decoder.up.1.block.1.conv2.weight",  # num_res_blocks + 1 blocks per level
        "decoder.up.1.attn.1.proj_out.weight",
        "decoder.up.1.upsample.conv.weight",  # up.1 is the low-resolution level
        "decoder.up.0.block.0.nin_shortcut.weight",  # 64 -> 32 channels
        "decoder.norm_out.weight", "decoder.conv_out.weight",
    }
    assert expected <= keys, sorted(expected - keys)
    absent = {"encoder.down.0.block.0.nin_shortcut.weight", "encoder.down.1.downsample.conv.weight",
              "decoder.up.0.upsample.conv.weight", "decoder.up.1.block.2.conv1.weight",
              "encoder.down.0.attn.0.q.weight"}
    assert not absent & keys
    prefixes = ("encoder.", "quant_conv.", "quantize.", "post_quant_conv.", "decoder.")
    assert all(key.startswith(prefixes) for key in keys)


def test_attention_block_equals_naive_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 3, 4)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, HW)
    weights = torch.softmax(q.transpose(1, 2) @ k / 32 ** 0.5, dim=-1)  # (B, HW, HW)
    out = (v @ weights.transpose(1, 2)).reshape(2, 32, 3, 4)
    expected = x + block.proj_out(out)
    assert torch.allclose(block(x), expected, atol=1e-5)


@pytest.mark.parametrize("ch_mult, grid", [((1, 2, 2), 4), ((1, 1, 1, 1, 2), 2)])  # f4, f16
def test_shapes_through_encode_and_decode(ch_mult, grid):
    resolution = 16 if len(ch_mult) == 3 else 32
    config = dataclasses.replace(TINY, ch_mult=ch_mult, resolution=resolution, attn_resolutions=())
    model = VQGAN(config)
    x = torch.randn(2, 3, resolution, resolution)
    x_hat, loss, indices = model(x)
    assert model.token_grid_size == grid
    assert x_hat.shape == x.shape and loss.ndim == 0
    assert indices.shape == (2, grid, grid) and indices.dtype == torch.long
    assert model.encode(x)[0].shape == (2, config.embed_dim, grid, grid)
    assert model.decode_indices(indices).shape == x.shape
    assert model.last_layer is model.decoder.conv_out.weight


def test_decode_indices_reproduces_forward_in_eval_mode():
    torch.manual_seed(0)
    model = VQGAN(TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        x_hat, _, indices = model(x)
        assert torch.allclose(model.decode_indices(indices), x_hat, atol=1e-5)


def test_flags_override_the_preset():
    parser = argparse.ArgumentParser()
    add_vqgan_args(parser)
    parser.add_argument("--image-size", type=int, default=64)  # the trainers' data flag
    args = parser.parse_args(["--preset", "small", "--ch-mult", "1,2", "--attn-resolutions", "",
                              "--no-l2-normalize", "--lookup-dim", "0", "--beta", "0.5"])
    config = config_from_args(args)
    assert config == dataclasses.replace(PRESETS["small"], ch_mult=(1, 2), attn_resolutions=(),
                                         l2_normalize=False, lookup_dim=None, beta=0.5)
    paper = config_from_args(parser.parse_args(["--preset", "paper", "--image-size", "256"]))
    assert paper == PRESETS["paper"]
    # the resolution always follows --image-size; there is no separate --resolution flag
    assert config_from_args(parser.parse_args(["--image-size", "32"])).resolution == 32
    with pytest.raises(SystemExit):
        parser.parse_args(["--resolution", "32"])


def test_attention_stays_on_a_feature_map_that_exists_at_every_image_size(capsys):
    parser = argparse.ArgumentParser()
    add_vqgan_args(parser)
    parser.add_argument("--image-size", type=int, default=None)

    def attention_blocks(*flags):  # self-attention layers outside the middle blocks
        model = VQGAN(config_from_args(parser.parse_args(list(flags))))
        return sum(isinstance(m, AttnBlock) for m in model.modules()) - 2, model.token_grid_size

    assert attention_blocks("--preset", "small") == (3, 16)  # 1 encoder + 2 decoder, 16 x 16
    # small at 128 px has no 16 x 16 feature map: its attention moves to the 32 x 32 token grid
    assert attention_blocks("--preset", "small", "--image-size", "128") == (3, 32)
    assert config_from_args(parser.parse_args(["--image-size", "128"])).attn_resolutions == (32,)
    # where the preset's size exists, it stays (the paper's 16 at 128 px: a level above the grid)
    assert config_from_args(parser.parse_args(["--preset", "paper", "--image-size", "128"])
                            ).attn_resolutions == (16,)
    assert attention_blocks("--preset", "small", "--image-size", "32") == (3, 8)
    # given, it is kept (a run trained with it resumes with it), and said to add nothing
    given = config_from_args(parser.parse_args(["--image-size", "128", "--attn-resolutions", "16"]))
    assert given.attn_resolutions == (16,)
    assert ("warning: --attn-resolutions 16: this model's feature maps are 128, 64, 32 px, so it "
            "adds no attention there") in capsys.readouterr().err


def test_a_condition_vqgan_attends_on_the_grid_of_the_ch_mult_it_is_given():
    import training_vqgan
    for content, ch_mult, grid in (("keypoint-images", None, 16), ("keypoint-images", "1,2", 32),
                                   ("part-maps", None, 8), ("part-maps", "1,2,4", 16)):
        flags = ["--content", content] + (["--ch-mult", ch_mult] if ch_mult else [])
        config = config_from_args(training_vqgan.parse_args(flags))
        assert config.attn_resolutions == (grid,) == (VQGAN(config).token_grid_size,), flags


def test_a_config_that_cannot_work_is_a_user_error():
    with pytest.raises(UserError, match="divisible"):
        dataclasses.replace(TINY, resolution=15)
    with pytest.raises(UserError, match="multiple of 32"):
        dataclasses.replace(TINY, ch=16)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, l2_normalize=True, lookup_dim=2, restart_dead_codes=True)
    model = VQGAN(config).eval()
    path = tmp_path / "vqgan.pt"
    save_vqgan(model, path)
    loaded = load_vqgan(path)
    assert not loaded.training and loaded.config == config
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected, actual = model(x), loaded(x)
    for a, b in zip(expected, actual):
        assert torch.equal(a, b)


def test_loading_another_kind_of_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "vqgan_last.pt"
    atomic_save({"kind": "vqgan_train", "state_dict": {}}, path)
    with pytest.raises(UserError, match="stage-1 inference checkpoint"):
        load_vqgan(path)


def test_a_checkpoint_with_missing_weights_is_a_user_error(tmp_path):
    model = VQGAN(TINY)
    path = tmp_path / "vqgan.pt"
    save_vqgan(model, path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["quantize.embedding.weight"]
    atomic_save(checkpoint, path)
    with pytest.raises(UserError, match="quantize.embedding.weight"):
        load_vqgan(path)


@pytest.mark.parametrize("preset", ["small"])
def test_the_default_decoder_can_shift_a_pictures_colour(preset):
    """A constant added to one channel of the features before the decoder's last norm (a colour
    offset over the whole picture) must reach the output. With one channel per GroupNorm group
    (32 groups over 32 channels) that norm is InstanceNorm and removes it: the default model then
    drew every figure grey and every backdrop the same tint."""
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS[preset], resolution=32)
    decoder = VQGAN(config).decoder.eval()
    z = torch.randn(1, config.z_channels, 8, 8)

    def shift_channel_0(module, inputs):
        h, = inputs
        return h + torch.eye(h.shape[1])[0][None, :, None, None] * 3.0

    with torch.no_grad():
        plain = decoder(z)
        handle = decoder.norm_out.register_forward_pre_hook(shift_channel_0)
        shifted = decoder(z)
        handle.remove()
    assert (shifted - plain).abs().max() > 1e-3


def test_norm_groups_sets_every_groupnorm_and_the_paper_keeps_32():
    model = VQGAN(dataclasses.replace(TINY, norm_groups=8))
    groups = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8}
    assert PRESETS["paper"].norm_groups == 32  # what the released checkpoints were trained with
    with pytest.raises(UserError, match="--norm-groups"):
        VQGANConfig(**{**dataclasses.asdict(TINY), "norm_groups": 24})


def test_groupnorm_runs_in_float32_under_the_cpus_bf16_autocast():
    """CUDA's autocast computes group_norm in float32; the CPU's would run it in bf16 on a bf16
    conv output (measured: the default stage-1 run about 1 dB worse). Every norm of the VQGAN
    takes the float32 statistics of its bf16 input, with the parameters and names of
    nn.GroupNorm."""
    torch.manual_seed(0)
    model = VQGAN(dataclasses.replace(TINY, norm_groups=8))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(set(dict(m.named_parameters())) == {"weight", "bias"} for m in norms)
    for norm in norms:
        torch.nn.init.normal_(norm.weight)
        x = (3 + torch.randn(2, norm.num_channels, 8, 8)).to(torch.bfloat16)  # far from mean 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
        expected = torch.nn.functional.group_norm(x.float(), norm.num_groups, norm.weight,
                                                  norm.bias, norm.eps)
        assert y.dtype == torch.float32 and torch.allclose(y, expected, atol=1e-5)


def test_image_tokens_are_the_same_inside_a_training_steps_autocast():
    """A condition VQGAN encodes the empty pose inside stage 2's bf16 step; sample.py and
    evaluate.py encode it outside any autocast: both must give the same tokens."""
    torch.manual_seed(0)
    model, cpu = VQGAN(TINY).eval(), torch.device("cpu")
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = model.image_tokens(images)
    outside = model.image_tokens(images)
    if utils.resolve_precision("auto", cpu) == "fp32":  # else both bf16: equal either way
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not torch.equal(model.encode(images)[2], outside)  # bf16 would differ here
    assert torch.equal(inside, outside)
