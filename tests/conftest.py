"""Fixtures shared by the test files: one torch thread, float32 as the automatic CPU precision,
synthetic mannequin sets made once, a tiny VQGAN, tiny stage-2 runs, and one frozen LPIPS."""
from pathlib import Path

import pytest
import torch

import mannequins

# the VGG16 backbone of LPIPS for the trainers' tests: ../shared/weights beside the repository
LPIPS_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "vgg16_features.pth"
needs_lpips = pytest.mark.skipif(not LPIPS_WEIGHTS.is_file(),
                                 reason=f"LPIPS backbone weights missing: {LPIPS_WEIGHTS}")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests use tiny tensors: on two shared cores more threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MACHINE_CPU = torch.cpu.get_capabilities()  # what this machine has, as a subprocess sees it


@pytest.fixture(scope="session", autouse=True)
def cpu_without_amx():
    """--precision auto is bf16 on CPUs with AMX, and for stage 2 with AVX512-BF16 too
    (utils.resolve_precision). The tests compare float32 figures at tight tolerances, so they
    see the CPU of most laptops, where auto is fp32, whatever this machine has: the bf16 tests
    ask for bf16 by name, the rule itself is tested with both answers, and the torchrun tests
    pass --precision fp32 (their subprocesses see MACHINE_CPU)."""
    capabilities = {**MACHINE_CPU, "amx_bf16": False, "avx512_bf16": False}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
        yield


@pytest.fixture(scope="session")
def mannequin_set(tmp_path_factory):
    """mannequin_set(count, size) -> folder of that synthetic set (seed 0), written once."""
    made = {}

    def make(count, size):
        if (count, size) not in made:
            root = tmp_path_factory.mktemp(f"mannequins-{count}-{size}") / "set"
            mannequins.write_dataset(str(root), count=count, image_size=size, seed=0, workers=1)
            made[count, size] = root
        return made[count, size]
    return make


@pytest.fixture(scope="session")
def save_tiny_vqgan():
    """save_tiny_vqgan(path, seed) -> path: an untrained 32 px VQGAN (16 x 16 tokens, 32 codes)."""
    from vqgan import VQGAN, VQGANConfig, save_vqgan
    config = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                         z_channels=32, embed_dim=16, n_embed=32, resolution=32)

    def save(path, seed):
        torch.manual_seed(seed)
        save_vqgan(VQGAN(config), path)
        return path
    return save


@pytest.fixture(scope="session")
def vqgan_path(save_tiny_vqgan, tmp_path_factory):
    return save_tiny_vqgan(str(tmp_path_factory.mktemp("vqgan") / "vqgan.pt"), seed=0)


@pytest.fixture(scope="session")
def train_tiny_transformer():
    """train_tiny_transformer(data, vqgan_path, run_dir, image_size, *flags) -> the run's
    transformer_last.pt: a 1-layer, 32-wide GPT trained on the CPU; later flags override these."""
    import training_transformer

    def train(data, vqgan_path, run_dir, image_size, *flags):
        training_transformer.main([
            "--dataset-path", str(data), "--vqgan-checkpoint", str(vqgan_path),
            "--image-size", str(image_size), "--val-fraction", "0.2", "--run-dir", str(run_dir),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--num-workers", "0",
            "--device", "cpu", *flags])
        return str(Path(run_dir) / "transformer_last.pt")
    return train


@pytest.fixture(scope="session")
def lpips():
    """The VGG16 LPIPS of the trainers, built once (the weights: /work/shared/weights or the
    repository's ../shared/weights); skips the test where they are missing."""
    from lpips_loss import LPIPSLoss
    if not LPIPS_WEIGHTS.is_file():
        pytest.skip(f"LPIPS backbone weights missing: {LPIPS_WEIGHTS}")
    return LPIPSLoss(weights_path=str(LPIPS_WEIGHTS))


@pytest.fixture
def shared_lpips(monkeypatch, lpips):
    """In-process runs of either trainer (stage 1, stage 3) reuse one frozen LPIPS instead of
    building VGG16 each time."""
    import training_superres
    import training_vqgan
    for trainer in (training_vqgan, training_superres):
        monkeypatch.setattr(trainer, "LPIPSLoss", lambda weights_path=None: lpips)
    return lpips


@pytest.fixture
def averaged_weights_seen(monkeypatch):
    """The parameters each AveragedModel.update_parameters (training_loop.weight_average) is
    given, in order: the weights a trainer trained, after each optimizer step."""
    seen, update = [], torch.optim.swa_utils.AveragedModel.update_parameters

    def recording_update(ema, model):
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        update(ema, model)
    monkeypatch.setattr(torch.optim.swa_utils.AveragedModel, "update_parameters",
                        recording_update)
    return seen
