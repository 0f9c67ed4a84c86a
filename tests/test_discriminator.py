"""PatchGAN discriminator: the original layout and initialisation, patch logits, the D losses."""
import torch
import torch.nn as nn

from discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss


def test_initialisation_statistics():
    torch.manual_seed(0)
    model = NLayerDiscriminator()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 5 and len(norms) == 3
    weights = torch.cat([conv.weight.flatten() for conv in convs])
    assert abs(weights.mean()) < 1e-3 and abs(weights.std() - 0.02) < 1e-3
    bn_weights = torch.cat([norm.weight for norm in norms])
    assert abs(bn_weights.mean() - 1.0) < 5e-3 and abs(bn_weights.std() - 0.02) < 5e-3
    assert all(torch.all(norm.bias == 0) for norm in norms)
    # convs followed by BatchNorm have no bias; the first and last have one
    assert [conv.bias is not None for conv in convs] == [True, False, False, False, True]


def test_parameter_names_match_the_original():
    keys = set(NLayerDiscriminator().state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight", "main.3.running_mean",
            "main.8.weight", "main.9.bias", "main.11.weight", "main.11.bias"} <= keys


def test_one_logit_per_patch():
    model = NLayerDiscriminator()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_hinge_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # hinge terms 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0])  # hinge terms 0, 1
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 0.5)))


def test_vanilla_loss_is_binary_cross_entropy():
    real, fake = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    bce = nn.functional.binary_cross_entropy_with_logits
    expected = 0.5 * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
    assert torch.isclose(vanilla_d_loss(real, fake), expected)
