"""`python vqgan.py convert`: a VQGAN released with the paper (Lightning .ckpt + YAML) -> vqgan.pt.

No released file is downloaded: a tiny VQGAN of ours is written in the released layout. Our
module names are taming-transformers' own, so the renaming is the identity; the release adds
Lightning's wrapping ("state_dict", "epoch", ...) and the training loss's weights (loss.*).
"""
import argparse
import errno
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import mannequins
import sample
import vqgan
from utils import UserError
from vqgan import PRESETS, VQGAN, VQGANConfig, config_from_released, load_vqgan, main, parse_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
TINY = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                   embed_dim=4, n_embed=16, resolution=SIZE, legacy_beta=True)

# The released format (configs/*-project.yaml of the paper's models), shrunk to TINY.
TINY_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 4
    n_embed: 16
    ddconfig:
      double_z: False
      z_channels: 8
      resolution: 16
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1,2]
      num_res_blocks: 1
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_start: 250001  # a comment
        disc_weight: 0.8
        codebook_weight: 1.0
"""

# The paper's ImageNet f16-1024 config as Lightning dumps it: block lists, indented like keys.
PAPER_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 1024
    monitor: val/rec_loss
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult:
      - 1
      - 1
      - 2
      - 2
      - 4
      num_res_blocks: 2
      attn_resolutions:
      - 16
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 12
    train:
      target: taming.data.imagenet.ImageNetTrain
      params:
        config:
          size: 256
"""


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    return VQGAN(TINY).eval()


def released(model, **extra):
    """The model's weights as a released Lightning checkpoint holds them."""
    state_dict = dict(model.state_dict())
    state_dict["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state_dict["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3)
    return {"state_dict": state_dict, "epoch": 3, "global_step": 100,
            "pytorch-lightning_version": "1.0.8", **extra}


@pytest.fixture(scope="module")
def files(original, tmp_path_factory):
    folder = tmp_path_factory.mktemp("released")
    torch.save(released(original), folder / "last.ckpt")
    (folder / "model.yaml").write_text(TINY_YAML)
    return folder


def convert(files, ckpt="last.ckpt", *extra):
    out = str(files / f"{ckpt}.pt")
    main(["convert", "--ckpt", str(files / ckpt), "--config", str(files / "model.yaml"),
          "--out", out, *extra])
    return out


@pytest.fixture(scope="module")
def converted(files):
    return convert(files)


# ---- the config -----------------------------------------------------------------------------


def test_yaml_reader_reads_flow_and_block_lists_scalars_and_comments():
    tiny = parse_yaml(TINY_YAML)
    assert tiny["model"]["params"]["ddconfig"] == dict(
        double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32,
        ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    assert tiny["model"]["base_learning_rate"] == 4.5e-06
    assert tiny["model"]["params"]["lossconfig"]["params"]["disc_start"] == 250001
    paper = parse_yaml(PAPER_YAML)
    assert paper["model"]["params"]["ddconfig"]["ch_mult"] == [1, 1, 2, 2, 4]
    assert paper["model"]["params"]["ddconfig"]["attn_resolutions"] == [16]
    assert paper["model"]["params"]["monitor"] == "val/rec_loss"
    assert paper["data"]["params"]["train"]["params"]["config"]["size"] == 256


def test_yaml_reader_refuses_what_it_does_not_know():
    with pytest.raises(UserError, match="line 2.*pyyaml"):
        parse_yaml("items: 1\n  bad: 2\n")


def test_released_config_is_the_paper_preset_with_legacy_beta():
    config = config_from_released(parse_yaml(PAPER_YAML))
    assert config == VQGANConfig(**{**vars(PRESETS["paper"]), "legacy_beta": True})
    assert (config.beta, config.l2_normalize, config.lookup_dim) == (0.25, False, None)


def test_a_kl_autoencoder_config_is_refused():
    data = parse_yaml(TINY_YAML.replace("double_z: False", "double_z: True"))
    with pytest.raises(UserError, match="double_z"):
        config_from_released(data)


# ---- the weights ----------------------------------------------------------------------------


def test_our_parameter_names_are_the_released_ones(original):
    names = original.state_dict().keys()
    for name in ("encoder.down.0.block.0.norm1.weight", "encoder.mid.attn_1.q.weight",
                 "quant_conv.weight", "quantize.embedding.weight", "post_quant_conv.bias",
                 "decoder.up.1.upsample.conv.weight", "decoder.conv_out.weight"):
        assert name in names


def test_round_trip_gives_identical_outputs(original, files, capsys):
    out = convert(files)
    assert "dropped 2 training-loss entries" in capsys.readouterr().out
    model = load_vqgan(out)
    assert model.config == TINY and model.quantize.legacy_beta
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        for ours, theirs in zip(model(x), original(x)):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("change, named", [
    (lambda sd: sd.pop("decoder.conv_out.bias"), "missing: decoder.conv_out.bias"),
    (lambda sd: sd.update({"quantize.embed.weight": torch.zeros(1)}),
     "unexpected: quantize.embed.weight"),
])
def test_a_missing_or_extra_model_weight_is_named(original, files, change, named):
    checkpoint = released(original)
    change(checkpoint["state_dict"])
    torch.save(checkpoint, files / "changed.ckpt")
    with pytest.raises(UserError, match=named):
        convert(files, "changed.ckpt")


def test_pickled_objects_need_trust_pickle(original, files):
    # Lightning also pickles hyper-parameters and callbacks; a Namespace stands in for them
    torch.save(released(original, hyper_parameters=argparse.Namespace(lr=1e-4)),
               files / "pickled.ckpt")
    with pytest.raises(UserError, match=r"argparse\.Namespace.*--trust-pickle.*executes code"):
        convert(files, "pickled.ckpt")
    out = convert(files, "pickled.ckpt", "--trust-pickle")
    assert torch.equal(load_vqgan(out).quantize.embedding.weight,
                       original.quantize.embedding.weight)


def test_trust_pickle_names_a_module_the_pickled_objects_need(original, files, monkeypatch):
    stand_in = types.ModuleType("lightning_stand_in")  # like pytorch_lightning, not installed
    stand_in.Callback = type("Callback", (), {"__module__": "lightning_stand_in"})
    monkeypatch.setitem(sys.modules, "lightning_stand_in", stand_in)
    torch.save(released(original, callbacks=[stand_in.Callback()]), files / "callbacks.ckpt")
    monkeypatch.delitem(sys.modules, "lightning_stand_in")
    with pytest.raises(UserError, match="module lightning_stand_in, which is not installed"):
        convert(files, "callbacks.ckpt", "--trust-pickle")


def test_command_line_prints_one_error_line_for_a_bad_file(files):
    (files / "bad.ckpt").write_bytes(b"not a checkpoint")
    result = subprocess.run(
        [sys.executable, "vqgan.py", "convert", "--ckpt", str(files / "bad.ckpt"),
         "--config", str(files / "model.yaml"), "--out", str(files / "bad.pt")],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot read checkpoint")
    assert "not a PyTorch or Lightning checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---- stages that use it ---------------------------------------------------------------------


def test_stage_2_and_sampling_accept_a_converted_vqgan(converted, tmp_path,
                                                       train_tiny_transformer):
    data = tmp_path / "mannequins"
    mannequins.write_dataset(str(data), count=24, image_size=SIZE, seed=0, workers=1)
    checkpoint = train_tiny_transformer(data, converted, tmp_path / "run", SIZE,
                                        "--batch-size", "4", "--max-steps", "2",
                                        "--grid-examples", "1")
    sample.main(["--checkpoint", checkpoint,
                 "--out", str(tmp_path / "samples"), "--device", "cpu", "--count", "1",
                 "--num-samples", "1"])
    assert len(os.listdir(tmp_path / "samples")) == 2  # one sample and the grid


@pytest.mark.parametrize("edit, message", [
    (("ch: 32", "ch: abc"), "ch: 'abc'"),
    (("ch_mult: [1,2]", "ch_mult: 12"), "ch_mult: 12"),
    (("target: taming.models.vqgan.VQModel", "target: 5"), "describes a 5"),
])
def test_a_config_value_of_the_wrong_type_is_one_line(edit, message):
    # each was a TypeError or AttributeError traceback
    with pytest.raises(UserError, match=re.escape(message)):
        config_from_released(parse_yaml(TINY_YAML.replace(*edit)))
    assert TINY_YAML.count(edit[0]) == 1


def test_swapped_files_and_a_failed_write_are_one_line(files, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="is not a text YAML file .were --ckpt and --config"):
        main(["convert", "--ckpt", str(files / "model.yaml"), "--config",
              str(files / "last.ckpt"), "--out", str(tmp_path / "x.pt")])

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(vqgan, "save_vqgan", disk_full)
    with pytest.raises(UserError, match="cannot write .*x.pt .No space left on device"):
        main(["convert", "--ckpt", str(files / "last.ckpt"), "--config",
              str(files / "model.yaml"), "--out", str(tmp_path / "x.pt")])
