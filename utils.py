"""The small pieces every file of the pipeline shares; it imports no other project file.

* errors meant for people (`UserError`) and `run_cli`, which prints them as one line;
* devices, precision (--precision: autocast dtype and GradScaler), memory format and seeding;
* a stable string hash and file hashes (the split, cache keys), JSON-lines records;
* checkpoints written atomically and loaded safely, with a check of their kind;
* PSNR and image grids, always de-normalised from the models' [-1, 1].
"""
import hashlib
import json
import os
import pickle
import random
import secrets
import sys

import numpy as np
import torch
from PIL import Image

class UserError(Exception):
    """A problem with the user's input: printed as one line naming the file or value and the fix."""


class Interrupted(Exception):
    """Ctrl-C stopped a training run after it saved its checkpoint; the message says what next."""


def run_cli(main):
    """Call main() as a command: a UserError becomes one 'error: ...' line on stderr and exit
    status 2; Ctrl-C exits with 130, the shell's convention, so that `stage1 && stage2` stops."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stopped:
        if str(stopped):
            print(stopped, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


def require_file(path, what, expected=""):
    """UserError unless `path` is a file: it is missing, or a folder (naming what it holds)."""
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path)
                        if name.endswith((".pt", ".pth", ".ckpt")))
        hint = f"; it holds {', '.join(inside[:5])}: pass one of those" if inside else ""
        raise UserError(f"{what} {path} is a folder, not a file{hint}{expected}")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist{expected}")


def pick_device(name="auto"):
    """'auto' picks CUDA, then Apple's MPS, then the CPU; any other name is taken as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available here; "
                        "use --device auto or --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise UserError(f"--device {name} was asked for but Apple's MPS is not available here; "
                        "use --device auto or --device cpu")
    return device


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name, device, cpu_bf16="amx_bf16"):
    """--precision -> 'fp32', 'bf16' or 'fp16' on `device`.

    auto: bf16 on a GPU that computes it natively (CUDA compute capability 8.0, Ampere, and
    later), fp16 with a GradScaler on older GPUs (torch.cuda.is_bf16_supported() also says yes
    there, where bf16 is emulated and slow); bf16 on a CPU with the `cpu_bf16` feature of
    torch.cpu.get_capabilities(), fp32 on other CPUs and on MPS. The default, AMX bf16 units
    (Intel Xeon since Sapphire Rapids), is stage 1's rule: its default run took 14.5 min there
    against 20.7 in fp32 at the same PSNR, while with AVX512-BF16 alone (AMD Zen 4) it ran 1.4x
    as fast but ended 0.3-0.8 dB below fp32 on two seeds. Stage 2 and its benchmark pass
    mingpt.TRAINING_CPU_BF16, "avx512_bf16" (which AMX CPUs have too): the GPT trained in bf16
    there as well as in fp32, 1.4x as fast (README "Stage 2"). The others are taken as given:
    any CPU runs bf16 and fp16 autocast, which the tests use.
    """
    if name not in PRECISIONS:
        raise UserError(f"--precision {name}: choose one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
    if device.type == "cpu" and torch.cpu.get_capabilities().get(cpu_bf16, False):
        return "bf16"
    return "fp32"


def autocast_context(device, precision="auto"):
    """Autocast in the resolved precision's dtype on `device`; for fp32 autocast off, also
    inside an outer autocast (VQGAN.image_tokens within a bf16 training step)."""
    precision = resolve_precision(precision, device)
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES.get(precision),
                          enabled=precision != "fp32")


def grad_scaler(device, precision="auto"):
    """A GradScaler, enabled only for fp16 (whose small gradients underflow unless the loss is
    scaled up); bf16 has fp32's range and needs none."""
    enabled = resolve_precision(precision, device) == "fp16"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def use_channels_last(flag, device):
    """--channels-last / --no-channels-last, else NHWC on CUDA, where tensor-core convolutions
    run faster in it, and on x86 CPUs, whose oneDNN convolutions work in it (the default
    stage-1 run in fp32: 20.7 min against 22.4 in NCHW; README "Stage 1")."""
    if flag is not None:
        return flag
    return device.type == "cuda" or (device.type == "cpu" and torch.cpu.get_capabilities().get(
        "architecture") == "x86_64")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state():
    """RNG states as tensors and plain values, so they load with torch.load(weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what get_rng_state took."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def stable_hash(text):
    """A hash of a string that is the same on every machine and run (unlike Python's hash())."""
    value = 2166136261
    for byte in text.encode("utf-8"):  # FNV-1a, 32 bit
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, rename over `path`, fsync the
    folder.

    A crash at any moment leaves either the old file or the new one, never a half-written file;
    the folder's fsync makes the rename itself survive a power cut. The file gets the mode any
    new file gets (0666 less the umask), so that others sharing the run can read it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # not tempfile.mkstemp, which creates mode 0600; O_EXCL: never another file of this name
    tmp_path = os.path.join(folder, f".tmp-{secrets.token_hex(8)}.pt")
    handle = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX; Windows cannot open a folder, nor needs to
        folder_handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder_handle)
        finally:
            os.close(folder_handle)


def file_sha256(path):
    """Content hash of a file (e.g. the VQGAN checkpoint a token cache was encoded with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CHECKPOINT_KINDS = {
    "vqgan": "a stage-1 inference checkpoint (vqgan.pt)",
    "vqgan_train": "a stage-1 training checkpoint (vqgan_last.pt)",
    "transformer_train": "a stage-2 training checkpoint (transformer_last.pt)",
    "pose_detector": "a keypoint detector for PCK (pose_detector.pt)",
    "superres": "a stage-3 super-resolution checkpoint (superres.pt)",
    "superres_train": "a stage-3 training checkpoint (superres_last.pt)",
}


def torch_load_failure(error):
    """Why torch.load(weights_only=True) refused a file, in a few words. torch's own message
    advises retrying with weights_only=False, which runs any code the file holds: never relayed."""
    first_sentence = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        return "it holds no plain tensors that torch.load(weights_only=True) can read"
    return f"{type(error).__name__}: {first_sentence}"


def load_checkpoint(path, expected_kinds):
    """Load a checkpoint of ours with weights_only=True and check its "kind" field.

    `expected_kinds` is a kind or a tuple of kinds from CHECKPOINT_KINDS. Raises UserError with
    one clear line when the file is missing, unreadable or of another kind.
    """
    if isinstance(expected_kinds, str):
        expected_kinds = (expected_kinds,)
    wanted = " or ".join(CHECKPOINT_KINDS[k] for k in expected_kinds)
    require_file(path, "checkpoint", f"; expected {wanted}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file or a pickle that is not plain tensors
        raise UserError(f"{path} is not a checkpoint of this project, or a damaged one "
                        f"({torch_load_failure(error)}); expected {wanted}") from None
    kind = checkpoint.get("kind") if isinstance(checkpoint, dict) else None
    if kind not in expected_kinds:
        found = CHECKPOINT_KINDS.get(kind, "a file that is not a checkpoint of this project")
        raise UserError(f"{path} is {found}, but {wanted} is needed here")
    return checkpoint


def averaged_weights(ema_state):
    """The state_dict of an AveragedModel (training_loop.weight_average) -> its averaged model's."""
    return {k.removeprefix("module."): v for k, v in ema_state.items() if k.startswith("module.")}


def read_jsonl(path):
    """The records of a JSON-lines file (metrics.jsonl), one dict per line."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def denormalize(images):
    """[-1, 1] model space -> [0, 1] picture space, clamped."""
    return ((images.detach().float() + 1) / 2).clamp(0, 1)


def to_uint8(images):
    """Tensors in [-1, 1] -> uint8 pixels, as a saved picture holds them (clamped, rounded)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(pixels):
    """uint8 pixels -> float tensors in [-1, 1], as data.py makes them."""
    return pixels.float().div(127.5).sub(1.0)


def psnr(x, y, max_db=100.0):
    """Peak signal-to-noise ratio per image in dB, for images (B, C, H, W) in [0, 1] -> (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10)))


def to_uint8_image(image):
    """One (3, H, W) tensor in [-1, 1] -> PIL RGB image."""
    array = (denormalize(image).cpu() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def save_image_grid(rows, path, pad=2):
    """Save a grid: `rows` is a list of lists of (3, H, W) tensors in [-1, 1] or PIL images."""
    cells = [[cell if isinstance(cell, Image.Image) else to_uint8_image(cell) for cell in row]
             for row in rows]
    cell_w = max(c.width for row in cells for c in row)
    cell_h = max(c.height for row in cells for c in row)
    columns = max(len(row) for row in cells)
    grid = Image.new("RGB", (columns * (cell_w + pad) + pad, len(cells) * (cell_h + pad) + pad),
                     "white")
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell, (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return grid
