"""Fixtures shared by the test files: one torch thread, and synthetic mannequin sets made once."""
import pytest
import torch

import mannequins


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests use tiny tensors: on two shared cores more threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
