"""Tests of the pose transformer: token layout, conditions, loss, sampling, the frozen VQGAN."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sampling import DEFAULT_GUIDANCE, filter_logits, sample_next
from location_features import fourier_features, location_features
from transformer import PoseTransformer
from utils import UserError

N_EMBED = 16
GRID = 4  # token grid h == w
IMAGE = 16


class FakeVQGAN(nn.Module):
    """A stand-in with vqgan.py's interface: a strided conv encoder and a nearest-code lookup."""

    def __init__(self, n_embed=N_EMBED, grid=GRID, image_size=IMAGE):
        super().__init__()
        self.config = SimpleNamespace(n_embed=n_embed)
        self.token_grid_size = grid
        stride = image_size // grid
        self.encoder = nn.Conv2d(3, 8, kernel_size=stride, stride=stride)
        self.codebook = nn.Embedding(n_embed, 8)
        self.decoder = nn.ConvTranspose2d(8, 3, kernel_size=stride, stride=stride)

    def encode(self, x):
        z = self.encoder(x).permute(0, 2, 3, 1)  # (B, h, w, 8)
        indices = torch.cdist(z.flatten(1, 2), self.codebook.weight).argmin(-1)  # (B, h*w)
        indices = indices.view(z.shape[:3])
        z_q = self.codebook(indices)
        return z_q.permute(0, 3, 1, 2), F.mse_loss(z_q, z), indices

    def image_tokens(self, x):
        return self.encode(x)[2]

    def decode_indices(self, indices):
        return self.decoder(self.codebook(indices).permute(0, 3, 1, 2)).tanh()


def make_model(condition="keypoints", **kwargs):
    torch.manual_seed(0)
    settings = dict(image_size=IMAGE, n_layer=2, n_head=2, n_embd=32)
    settings.update(kwargs)
    return PoseTransformer(FakeVQGAN(), condition, **settings).eval()


def random_keypoints(batch, k=17, image_size=IMAGE):
    xy = torch.rand(batch, k, 2) * image_size
    v = torch.randint(0, 3, (batch, k, 1)).float()
    return torch.cat([xy, v], dim=-1)


def naive_generate(model, cond, num_tokens, prefix_tokens):
    """Greedy decoding recomputing the whole sequence at every step: the reference for the cache."""
    tokens = prefix_tokens
    while tokens.size(1) < num_tokens:
        logits = model.gpt_forward(torch.cat([cond, tokens], dim=1))[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


# ---- filtering and sampling ----------------------------------------------------------------------

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = PROBS.log()
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_p=1.0)) == [True, True, True, True]
    assert kept(filter_logits(logits, top_p=1e-6)) == [True, False, False, False]


def test_top_p_one_keeps_every_token_of_a_large_vocabulary():
    # float32's running sum reaches 1.0 before the last of 2048 tokens: p = 1 must still keep all
    logits = torch.randn(64, 2048, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_top_p_works_on_unsorted_logits():
    logits = PROBS[:, [2, 0, 3, 1]].log()
    assert kept(filter_logits(logits, top_p=0.8)) == [False, True, False, True]


def test_top_k_keeps_exactly_k_and_temperature_divides_first():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert kept(filter_logits(logits, top_k=2)) == [False, True, True, False]
    assert kept(filter_logits(logits, top_k=10)) == [True] * 4
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)
    # at temperature 0.5 the probabilities sharpen to about [0.00, 0.86, 0.12, 0.02]
    assert kept(filter_logits(logits, top_p=0.9, temperature=0.5)) == [False, True, True, False]
    assert kept(filter_logits(logits, top_p=0.9)) == [False, True, True, True]


def test_filters_work_in_float32_on_the_bf16_logits_of_autocast():
    """Unguided sampling under bf16 autocast hands the GPT's bf16 logits on as they are: the
    temperature and the nucleus must be those of their float32 values."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(64, 2048)).bfloat16()
    filtered = filter_logits(logits, top_p=0.9, temperature=0.7)
    assert filtered.dtype == torch.float32
    assert torch.equal(filtered, filter_logits(logits.float(), top_p=0.9, temperature=0.7))


def test_top_k_one_is_greedy():
    logits = torch.randn(8, 30)
    generator = torch.Generator().manual_seed(0)
    sampled = sample_next(logits, generator, top_k=1)
    assert torch.equal(sampled[:, 0], logits.argmax(-1))


@pytest.mark.parametrize("settings", [dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                      dict(temperature=0.0), dict(temperature=-1.0)])
def test_bad_sampling_settings_raise(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        filter_logits(torch.randn(1, 5), **settings)


def test_sampling_is_deterministic_for_a_seed():
    model = make_model()
    cond = model.condition_tokens(keypoints=random_keypoints(2))

    def draw(seed):
        return model.sample(cond, top_k=8, top_p=0.9, temperature=1.5,
                            generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("prefix_length", [0, 1, 5])
def test_cached_greedy_sampling_matches_full_recompute(prefix_length):
    model = make_model()
    cond = model.condition_tokens(keypoints=random_keypoints(3))
    prefix = torch.randint(0, N_EMBED, (3, prefix_length))
    cached = model.sample(cond, top_k=1, prefix_tokens=prefix)
    assert cached.shape == (3, GRID * GRID)
    assert torch.equal(cached[:, :prefix_length], prefix)
    with torch.no_grad():
        assert torch.equal(cached, naive_generate(model, cond, GRID * GRID, prefix))


def test_sampled_tokens_are_codes_even_when_condition_ids_dominate():
    # Make every condition id's embedding huge: the head still has no rows for condition ids,
    # so logits and samples live in [0, n_embed).
    model = make_model()
    with torch.no_grad():
        model.gpt.transformer.wte.weight[N_EMBED:] = 100.0
    cond = model.condition_tokens(keypoints=random_keypoints(4))
    logits, _ = model(cond, torch.randint(0, N_EMBED, (4, GRID * GRID)))
    assert logits.size(-1) == N_EMBED
    tokens = model.sample(cond, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert tokens.min() >= 0 and tokens.max() < N_EMBED


# ---- condition tokens --------------------------------------------------------------------------


def test_keypoint_tokens_hand_worked():
    model = make_model(image_size=64, keypoint_grid=32, num_keypoints=7)
    keypoints = torch.tensor([[[10.0, 20.0, 2.0],   # col 10*32/64 = 5, row 20*32/64 = 10
                               [10.0, 20.0, 1.0],   # labeled but occluded: still placed
                               [10.0, 20.0, 0.0],   # not visible
                               [63.9, 0.0, 2.0],    # row 0, last column
                               [64.0, 5.0, 2.0],    # the right edge (x = 0 flipped): row 2, last
                               [64.5, 5.0, 2.0],    # right of the image: not visible
                               [-0.5, 5.0, 2.0]]])  # left of the image: not visible
    not_visible = N_EMBED + 32 * 32
    expected = [N_EMBED + 10 * 32 + 5, N_EMBED + 10 * 32 + 5, not_visible,
                N_EMBED + 31, N_EMBED + 2 * 32 + 31, not_visible, not_visible]
    assert model.condition_tokens(keypoints=keypoints).tolist() == [expected]


def test_keypoint_grid_defaults_to_twice_the_token_grid_and_may_not_be_coarser():
    assert make_model().keypoint_grid == 2 * GRID
    with pytest.raises(UserError, match="keypoint grid"):
        make_model(keypoint_grid=GRID - 1)


def test_wrong_number_of_keypoints_is_a_user_error():
    model = make_model(num_keypoints=18)
    with pytest.raises(UserError, match="18"):
        model.condition_tokens(keypoints=random_keypoints(1, k=17))


def test_part_tokens_take_the_majority_label_per_cell_with_ties_to_the_lower():
    model = make_model("parts", num_part_labels=5)
    part_map = torch.zeros(1, 16, 16, dtype=torch.long)  # 4x4 pixels per token cell
    part_map[0, 0:4, 0:4] = 3                # cell (0, 0): all 3
    part_map[0, 0:3, 4:8] = 2                # cell (0, 1): 12 of 16 are 2
    part_map[0, 4:6, 0:4] = 4                # cell (1, 0): 8 of 4, 8 of 0 -> tie -> 0
    part_map[0, 4:6, 4:8] = 4                # cell (1, 1): 8 of 4, 8 of 1 -> tie -> 1
    part_map[0, 6:8, 4:8] = 1
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[0, 1], expected[1, 1] = 3, 2, 1
    tokens = model.condition_tokens(part_maps=part_map)
    assert tokens.tolist() == [(N_EMBED + expected.flatten()).tolist()]


def test_part_labels_out_of_range_are_a_user_error():
    model = make_model("parts", num_part_labels=5)
    with pytest.raises(UserError, match="part labels"):
        model.condition_tokens(part_maps=torch.full((1, 16, 16), 5))


@pytest.mark.parametrize("condition", ["keypoints", "parts", "none"])
def test_condition_ids_never_collide_with_image_codes(condition):
    model = make_model(condition)
    cond = model.condition_tokens(keypoints=random_keypoints(8),
                                  part_maps=torch.randint(0, 11, (8, 16, 16)), batch_size=8)
    assert cond.shape == (8, model.num_condition_tokens)
    assert cond.min() >= N_EMBED
    assert cond.max() < model.gpt.config.vocab_size


def test_unconditional_start_token_is_n_embed_not_code_zero():
    model = make_model("none")
    assert model.condition_tokens(batch_size=2).tolist() == [[N_EMBED], [N_EMBED]]


# ---- image tokens, loss, pkeep -----------------------------------------------------------------


def test_image_tokens_are_the_vqgan_indices_row_major_and_decode_back():
    model = make_model()
    images = torch.rand(2, 3, IMAGE, IMAGE) * 2 - 1
    _, _, indices = model.vqgan.encode(images)
    tokens = model.image_tokens(images)
    assert tokens.shape == (2, GRID * GRID)
    assert tokens[1, 1 * GRID + 2] == indices[1, 1, 2]
    torch.testing.assert_close(model.decode(tokens), model.vqgan.decode_indices(indices))


def test_loss_is_cross_entropy_over_image_positions_only():
    model = make_model()
    cond = model.condition_tokens(keypoints=random_keypoints(2))
    tokens = torch.randint(0, N_EMBED, (2, GRID * GRID))
    logits, loss = model(cond, tokens)
    assert logits.shape == (2, GRID * GRID, N_EMBED)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), tokens.flatten()))

    # garbage logits at the condition positions (all but the last) leave the loss unchanged
    P = cond.size(1)

    def scramble_prefix(module, inputs, output):
        output = output.clone()
        output[:, :P - 1] = torch.randn_like(output[:, :P - 1]) * 100
        return output

    handle = model.gpt.register_forward_hook(scramble_prefix)
    _, scrambled_loss = model(cond, tokens)
    handle.remove()
    torch.testing.assert_close(scrambled_loss, loss, atol=0, rtol=0)

    changed = tokens.clone()
    changed[:, -1] = (tokens[:, -1] + 1) % N_EMBED  # a target only, never an input
    assert model(cond, changed)[1] != loss


def test_logit_i_sees_the_condition_and_image_tokens_before_i_only():
    model = make_model()
    cond = model.condition_tokens(keypoints=random_keypoints(2))
    tokens = torch.randint(0, N_EMBED, (2, GRID * GRID))
    changed = tokens.clone()
    changed[:, 6] = (tokens[:, 6] + 1) % N_EMBED
    before, after = model(cond, tokens)[0], model(cond, changed)[0]
    torch.testing.assert_close(before[:, :7], after[:, :7], atol=0, rtol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])

    other_cond = cond.clone()
    other_cond[:, 0] = N_EMBED + (cond[:, 0] - N_EMBED + 1) % (2 * GRID) ** 2
    assert not torch.allclose(model(other_cond, tokens)[0][:, 0], before[:, 0])


def gpt_inputs(model, cond, tokens, pkeep):
    seen = []
    handle = model.gpt.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(cond, tokens, pkeep=pkeep)
    handle.remove()
    return seen[0]


def test_pkeep_one_leaves_inputs_unchanged():
    model = make_model().train()
    cond = model.condition_tokens(keypoints=random_keypoints(4))
    tokens = torch.randint(0, N_EMBED, (4, GRID * GRID))
    assert torch.equal(gpt_inputs(model, cond, tokens, 1.0), torch.cat([cond, tokens[:, :-1]], 1))


def test_pkeep_replaces_image_inputs_with_codes_but_never_condition_tokens():
    model = make_model().train()
    cond = model.condition_tokens(keypoints=random_keypoints(4))
    tokens = torch.randint(0, N_EMBED, (4, GRID * GRID))
    torch.manual_seed(0)
    inputs = gpt_inputs(model, cond, tokens, 0.0)
    P = cond.size(1)
    assert torch.equal(inputs[:, :P], cond)
    assert inputs[:, P:].max() < N_EMBED
    assert not torch.equal(inputs[:, P:], tokens[:, :-1])
    # in eval mode pkeep is ignored, so validation losses are comparable
    unchanged = torch.cat([cond, tokens[:, :-1]], 1)
    assert torch.equal(gpt_inputs(model.eval(), cond, tokens, 0.0), unchanged)


# ---- condition dropout and classifier-free guidance -------------------------------------------


def test_the_empty_pose_is_every_joint_invisible_or_every_cell_background():
    keypoints, parts = make_model(), make_model("parts")
    invisible = N_EMBED + (2 * GRID) ** 2  # the keypoint grid's "not visible" id
    assert torch.equal(keypoints.null_condition(3), torch.full((3, 17), invisible))
    assert torch.equal(parts.null_condition(2), torch.full((2, GRID * GRID), N_EMBED))
    for condition, extra in (("none", {}), ("class", dict(class_names=["a", "b"]))):
        with pytest.raises(UserError, match="pose condition"):
            make_model(condition, **extra).null_condition(1)
        with pytest.raises(UserError, match="needs a pose condition"):
            make_model(condition, condition_dropout=0.1, **extra)


def test_condition_dropout_puts_the_empty_pose_in_place_of_that_share_of_training_poses():
    model = make_model(condition_dropout=0.25).train()
    assert model.config["condition_dropout"] == 0.25
    assert "condition_dropout" not in make_model().config  # configs of older runs stay equal
    cond = model.condition_tokens(keypoints=random_keypoints(400))
    tokens = torch.randint(0, N_EMBED, (400, GRID * GRID))
    torch.manual_seed(0)
    prefixes = gpt_inputs(model, cond, tokens, 1.0)[:, :17]
    dropped = (prefixes == model.null_condition(1)).all(dim=1)
    assert 0.18 < dropped.float().mean() < 0.32  # 0.25 +- 3 standard deviations
    assert torch.equal(prefixes[~dropped], cond[~dropped])
    assert torch.equal(gpt_inputs(model.eval(), cond, tokens, 1.0)[:, :17], cond)


@pytest.mark.parametrize("prefix_length", [0, 5])
def test_guided_greedy_samples_follow_empty_plus_scale_times_the_difference(prefix_length):
    """Independent of the cache: each sampled token is the argmax of the teacher-forced logits
    after the empty pose plus 3 x (those after the pose - those after the empty pose)."""
    model = make_model(condition_dropout=0.1)
    cond = model.condition_tokens(keypoints=random_keypoints(3))
    prefix = torch.randint(0, N_EMBED, (3, prefix_length))
    tokens = model.sample(cond, top_k=1, prefix_tokens=prefix, guidance=3.0)
    with torch.no_grad():
        posed, _ = model(cond, tokens)
        empty, _ = model(model.null_condition(3), tokens)
    guided = empty + 3.0 * (posed - empty)
    assert torch.equal(tokens[:, :prefix_length], prefix)
    assert torch.equal(tokens[:, prefix_length:], guided.argmax(-1)[:, prefix_length:])
    assert not torch.allclose(guided, posed)  # the empty pose's logits do count


def test_a_model_trained_with_condition_dropout_samples_guided_by_default_and_others_refuse():
    guided = make_model(condition_dropout=0.1)
    cond = guided.condition_tokens(keypoints=random_keypoints(2))

    def draw(model, **options):
        return model.sample(cond, generator=torch.Generator().manual_seed(0), **options)
    assert guided.resolve_guidance() == DEFAULT_GUIDANCE > 1
    assert torch.equal(draw(guided), draw(guided, guidance=DEFAULT_GUIDANCE))
    assert not torch.equal(draw(guided), draw(guided, guidance=1))
    plain = make_model()
    assert torch.equal(draw(plain), draw(plain, guidance=1))
    with pytest.raises(UserError, match="--guidance 2 needs a model trained with --condition-"):
        draw(plain, guidance=2)
    assert plain.resolve_guidance() == 1


# ---- the frozen VQGAN --------------------------------------------------------------------------


def test_vqgan_is_frozen_and_outside_parameters_and_state_dict():
    model = make_model()
    vqgan_params = {id(p) for p in model.vqgan.parameters()}
    assert not vqgan_params & {id(p) for p in model.parameters()}
    assert all(key.startswith("gpt.") for key in model.state_dict())
    assert not any(p.requires_grad for p in model.vqgan.parameters())
    model.train()
    assert model.gpt.training and not model.vqgan.training


def test_optimizer_step_leaves_vqgan_weights_unchanged():
    model = make_model().train()
    before = {k: v.clone() for k, v in model.vqgan.state_dict().items()}
    gpt_before = model.gpt.lm_head.weight.clone()
    optimizer = model.gpt.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cpu")
    images = torch.rand(2, 3, IMAGE, IMAGE) * 2 - 1
    cond = model.condition_tokens(keypoints=random_keypoints(2))
    _, loss = model(cond, model.image_tokens(images), pkeep=0.5)
    loss.backward()
    optimizer.step()
    for key, value in model.vqgan.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.gpt.lm_head.weight, gpt_before)


def test_to_moves_the_vqgan_too():
    model = make_model().to(torch.float64)
    assert model.vqgan.codebook.weight.dtype == torch.float64
    assert model.gpt.lm_head.weight.dtype == torch.float64


def test_config_rebuilds_the_model_and_checks_the_vqgan():
    model = make_model("parts", num_part_labels=7)
    rebuilt = PoseTransformer.from_config(FakeVQGAN(), model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
    with pytest.raises(UserError, match="n_embed"):
        PoseTransformer.from_config(FakeVQGAN(n_embed=32), model.config)


# ---- location features --------------------------------------------------------------------


def test_fourier_features_of_a_hand_worked_point():
    # x = 0.5, y = 0.25, frequencies pi and 2 pi: sin then cos, x's block then y's
    r = 0.5 ** 0.5
    expected = torch.tensor([1.0, 0.0, 0.0, -1.0, r, 1.0, r, 0.0])
    torch.testing.assert_close(fourier_features(torch.tensor(0.5), torch.tensor(0.25), 2),
                               expected, atol=1e-6, rtol=0)


def test_a_keypoint_has_the_place_of_the_image_token_whose_cell_it_lies_in():
    P, N = 17, GRID * GRID
    by_id, by_position = location_features("keypoints", GRID, GRID, N_EMBED + N + 1, N_EMBED, P)
    F2 = by_id.size(1) // 2
    for cell in range(N - 1):  # image token `cell` is an input at position P + cell
        torch.testing.assert_close(by_id[N_EMBED + cell, :F2], by_position[P + cell, :F2])
    assert by_id[:N_EMBED].abs().sum() == 0  # image codes: their place comes from the position
    assert by_id[N_EMBED + N].abs().sum() == 0  # 'not visible' has no place
    assert by_id[:, F2:].abs().sum() == 0  # ids never say what is predicted
    distinct = {tuple(row.tolist()) for row in by_id[N_EMBED:N_EMBED + N, :F2]}
    assert len(distinct) == N  # every cell has its own features


def test_each_position_predicts_the_place_the_next_position_holds():
    P, N = GRID * GRID, GRID * GRID  # parts: one condition token per cell
    _, by_position = location_features("parts", GRID, GRID, N_EMBED + 8, N_EMBED, P)
    F2 = by_position.size(1) // 2
    assert by_position.shape == (P + N - 1, 2 * F2)
    assert by_position[:P - 1, F2:].abs().sum() == 0  # condition positions predict nothing
    for i in range(N - 1):  # position P - 1 + i predicts token i, which position P + i holds
        torch.testing.assert_close(by_position[P - 1 + i, F2:], by_position[P + i, :F2])
    for j in range(N - 1):  # part-map cell j has the place of image token j
        torch.testing.assert_close(by_position[j, :F2], by_position[P + j, :F2])


def test_the_model_uses_the_location_features():
    model = make_model()
    cond = model.condition_tokens(keypoints=random_keypoints(2))
    tokens = torch.randint(0, N_EMBED, (2, GRID * GRID))
    before = model(cond, tokens)[0]
    model.features_by_position.zero_()
    assert not torch.allclose(model(cond, tokens)[0], before)
