"""Where things are: fixed Fourier features of places in the image, for every GPT input.

Besides its token and position embeddings, every position of the stage-2 sequence gets
features of two places: where its input lies (a keypoint's cell, a cell of the condition grid,
an image token's cell) and which cell it predicts. The GPT adds a learned projection of them to
its embeddings, so "the joint near the cell I am predicting" is one similarity away for
attention instead of a mapping from unrelated cell ids (1025 with the default 32 x 32 keypoint
grid) to the image positions that it would have to learn from data.
"""
import math

import torch


def fourier_features(x, y, num_frequencies):
    """Points x, y (...) in [0, 1] -> (..., 4 * num_frequencies): sin and cos of pi 2^k x and
    pi 2^k y for k < num_frequencies. Nearby points get similar features at every scale."""
    frequencies = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
    angles = torch.stack([x, y], dim=-1)[..., None] * frequencies  # (..., 2, nf)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def location_features(condition, token_grid, keypoint_grid, vocab_size, n_embed,
                      num_condition_tokens, condition_grid=None):
    """Fixed features saying where in the image each input lies and which cell it predicts.

    Returns (by_id (vocab_size, 2F), by_position (block_size, 2F)); the GPT's features for ids at
    positions are by_id[ids] + by_position[positions]. The first F columns are the content's
    place: a keypoint token's cell on the keypoint grid (by id; 'not visible' has none), cell j of
    the condition grid at condition position j (the part map's token grid, or the
    `condition_grid` of a condition VQGAN's tokens), image token j at position P + j. The last F
    columns are the predicted place: position P - 1 + i predicts image token i.
    """
    h, P, N = token_grid, num_condition_tokens, token_grid * token_grid
    num_frequencies = math.ceil(math.log2(h)) + 1  # the finest period is two cells
    F = 4 * num_frequencies

    def grid_cells(g):  # (g * g, F): the centres of a g x g grid's cells, row-major like tokens
        rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        return fourier_features((cols.flatten() + 0.5) / g, (rows.flatten() + 0.5) / g,
                                num_frequencies)

    cells = grid_cells(h)  # (N, F)
    by_id = torch.zeros(vocab_size, 2 * F)
    if condition == "keypoints":
        by_id[n_embed:n_embed + keypoint_grid ** 2, :F] = grid_cells(keypoint_grid)
    by_position = torch.zeros(P + N - 1, 2 * F)
    if condition in ("parts", "keypoint-vqgan", "parts-vqgan"):
        by_position[:P, :F] = grid_cells(condition_grid or h)
    by_position[P:, :F] = cells[:-1]  # image token j sits at position P + j
    by_position[P - 1:, F:] = cells  # and position P - 1 + i predicts token i
    return by_id, by_position
