"""Codebook: nearest-code lookup, the VQ loss terms, the anti-collapse options, usage statistics."""
import math

import pytest
import torch
import torch.nn.functional as F

from codebook import Codebook, CodebookStats


def naive_nearest(z_rows, codes):
    """Loop over rows: index of the code with the smallest squared distance."""
    return torch.stack([((codes - row) ** 2).sum(1).argmin() for row in z_rows])


def rows(z):
    """(B, C, H, W) -> (B*H*W, C) in the order the codebook's indices use."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def test_nearest_code_matches_naive_loop():
    torch.manual_seed(0)
    codebook = Codebook(n_embed=32, embed_dim=6).double()
    codebook.embedding.weight.data.normal_()
    z = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    z_q, _, indices = codebook(z)
    assert indices.shape == (3, 4, 5)
    expected = naive_nearest(rows(z), codebook.embedding.weight)
    assert torch.equal(indices.flatten(), expected)
    assert torch.allclose(rows(z_q), codebook.embedding.weight[expected])


def test_straight_through_gradient_reaches_z_unchanged():
    torch.manual_seed(0)
    codebook = Codebook(n_embed=16, embed_dim=4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = codebook(z)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()  # the loss term is left out: only the straight-through path
    assert torch.equal(z.grad, upstream)


@pytest.mark.parametrize("legacy_beta", [False, True])
def test_loss_terms_match_hand_computation(legacy_beta):
    torch.manual_seed(0)
    beta = 0.3
    codebook = Codebook(n_embed=8, embed_dim=3, beta=beta, legacy_beta=legacy_beta).double()
    codebook.embedding.weight.data.normal_()
    z = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    _, loss, indices = codebook(z)
    loss.backward()

    e = codebook.embedding.weight.detach()[indices.flatten()]  # (N, C)
    z_rows = rows(z.detach())
    mse = ((z_rows - e) ** 2).mean()
    # paper: ||sg[z] - e||^2 + beta ||z - sg[e]||^2; legacy release: beta on the codebook term
    codebook_weight, commitment_weight = (beta, 1.0) if legacy_beta else (1.0, beta)
    assert torch.allclose(loss, (codebook_weight + commitment_weight) * mse)
    # d/dz of the commitment term only, and d/de of the codebook term only
    expected_z_grad = commitment_weight * 2 * (z_rows - e) / z_rows.numel()
    assert torch.allclose(rows(z.grad), expected_z_grad)
    expected_code_grad = torch.zeros_like(codebook.embedding.weight)
    expected_code_grad.index_add_(0, indices.flatten(),
                                  codebook_weight * 2 * (e - z_rows) / z_rows.numel())
    assert torch.allclose(codebook.embedding.weight.grad, expected_code_grad)


def test_lookup_gives_the_forward_latents():
    torch.manual_seed(0)
    codebook = Codebook(n_embed=16, embed_dim=4)
    z = torch.randn(2, 4, 3, 3)
    z_q, _, indices = codebook(z)
    assert torch.allclose(codebook.lookup(indices), z_q, atol=1e-6)


def test_l2_normalized_codes_pick_the_most_similar_direction():
    torch.manual_seed(0)
    codebook = Codebook(n_embed=16, embed_dim=4, l2_normalize=True).double()
    codebook.embedding.weight.data.normal_()
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z_q, _, indices = codebook(z)
    cosine = F.normalize(rows(z), dim=1) @ F.normalize(codebook.embedding.weight, dim=1).t()
    assert torch.equal(indices.flatten(), cosine.argmax(1))
    assert torch.allclose(rows(z_q).norm(dim=1), torch.ones(18, dtype=torch.float64))


def test_low_dimensional_lookup_projects_down_and_back_up():
    torch.manual_seed(0)
    codebook = Codebook(n_embed=16, embed_dim=8, lookup_dim=2).double()
    codebook.embedding.weight.data.normal_()
    assert codebook.embedding.weight.shape == (16, 2)
    assert {"project_in.weight", "project_out.weight"} <= set(codebook.state_dict())
    z = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    z_q, loss, indices = codebook(z)
    assert z_q.shape == z.shape and loss.ndim == 0 and indices.shape == (2, 3, 3)
    low = codebook.project_in(rows(z))  # (N, 2)
    expected = naive_nearest(low, codebook.embedding.weight)
    assert torch.equal(indices.flatten(), expected)
    assert torch.allclose(rows(z_q), codebook.project_out(codebook.embedding.weight[expected]))
    assert torch.allclose(codebook.lookup(indices), z_q)


def test_dead_code_is_restarted_from_this_batchs_encoder_outputs():
    torch.manual_seed(0)
    codebook = Codebook(n_embed=4, embed_dim=2, restart_dead_codes=True, dead_code_window=2)
    # codes 0..2 near the data, code 3 far away: never chosen
    codebook.embedding.weight.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0],
                                                   [50.0, 50.0]])
    codebook.train()
    for _ in range(2):  # two steps unused: code 3 is now dead
        _, _, indices = codebook(torch.rand(2, 2, 2, 2))
        codebook.count_step()
        assert not (indices == 3).any()
    assert codebook.steps_unused[3] == 2
    z = torch.rand(2, 2, 2, 2)
    _, loss, indices = codebook(z)
    loss.backward()  # the in-place restart happened before the graph was built
    new_code = codebook.embedding.weight[3].detach()
    assert (rows(z) == new_code).all(1).any(), "the restarted code is one of the batch's vectors"
    codebook.count_step()
    assert (indices == 3).any() and codebook.steps_unused[3] == 0
    assert torch.equal(codebook.embedding.weight[:3].detach(),
                       torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))


def test_restarts_are_deterministic_given_the_torch_seed():
    def run():
        torch.manual_seed(1)
        codebook = Codebook(n_embed=64, embed_dim=3, restart_dead_codes=True, dead_code_window=1)
        initial = codebook.embedding.weight.detach().clone()
        for _ in range(3):
            codebook(torch.randn(2, 3, 4, 4))
            codebook.count_step()
        return initial, codebook.embedding.weight.detach()

    (initial, first), (_, second) = run(), run()
    # 32 vectors per step cannot use all 64 codes: restarts happened, and they repeat exactly
    restarted = (first != initial).any(dim=1)
    assert restarted.sum() >= 32, f"only {int(restarted.sum())} of 64 codes were restarted"
    assert torch.equal(first, second)


def test_the_dead_code_window_counts_optimizer_steps_not_micro_batches():
    """dead_code_window 2 with 3 micro-batches per step: a code unused by every micro-batch is
    restarted in the third step's first micro-batch, after 2 steps, not after 2 micro-batches."""
    codebook = Codebook(n_embed=4, embed_dim=2, restart_dead_codes=True, dead_code_window=2)
    codebook.embedding.weight.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0],
                                                   [50.0, 50.0]])  # code 3 is never chosen
    codebook.train()
    far_code = codebook.embedding.weight[3].detach().clone()
    for step in range(2):
        for _ in range(3):  # micro-batches
            codebook(torch.rand(2, 2, 2, 2))
            assert torch.equal(codebook.embedding.weight[3], far_code), f"restarted in step {step}"
        codebook.count_step()
        assert codebook.steps_unused[3] == step + 1
        assert codebook.steps_unused[:3].tolist() == [0, 0, 0]  # used in some micro-batch
    z = torch.rand(2, 2, 2, 2)
    codebook(z)  # step 3, micro-batch 1
    assert (rows(z) == codebook.embedding.weight[3].detach()).all(1).any()


def test_usage_bookkeeping_has_no_data_dependent_shapes_so_never_waits_for_the_gpu():
    """On the meta device tensors have shapes but no values: an op whose output shape depends
    on values (boolean indexing, bincount, nonzero) cannot run there, and on a GPU it would make
    the host wait for the device. A training step's bookkeeping runs there."""
    meta = torch.device("meta")
    codebook = Codebook(n_embed=8, embed_dim=2, restart_dead_codes=True,
                        dead_code_window=1).to(meta).train()
    stats = CodebookStats(n_embed=8)
    indices = torch.zeros(6, dtype=torch.long, device=meta)
    codebook._restart_dead_codes(torch.zeros(6, 2, device=meta))
    codebook._note_usage(indices)
    codebook.count_step()
    stats.update(indices.view(2, 3))
    assert codebook.steps_unused.device == stats.counts.device == meta


def test_dead_codes_are_left_alone_in_eval_mode():
    codebook = Codebook(n_embed=4, embed_dim=2, restart_dead_codes=True, dead_code_window=1).eval()
    before = codebook.embedding.weight.detach().clone()
    for _ in range(3):
        codebook(torch.rand(1, 2, 2, 2))
    assert torch.equal(codebook.embedding.weight, before)
    assert codebook.steps_unused.sum() == 0


def test_usage_and_perplexity_of_a_known_histogram():
    stats = CodebookStats(n_embed=8)
    stats.update(torch.tensor([[0, 1], [2, 3]]))
    stats.update(torch.tensor([[3, 2], [1, 0]]))  # uniform over 4 of the 8 codes
    assert stats.usage == 0.5
    assert math.isclose(stats.perplexity, 4.0)
    stats.reset()
    stats.update(torch.full((2, 4, 4), 5))
    assert stats.usage == 1 / 8 and math.isclose(stats.perplexity, 1.0)
