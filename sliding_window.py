"""Images larger than the training grid: token grids sampled with a sliding attention window,
as the paper samples its high-resolution images (sample.py --grid-size H W).

A stage-2 GPT has only ever seen the h x w token grid of its training images, after the
condition of that whole image. For a grid_h x grid_w grid, token (i, j) is predicted from the
h x w window around it (`window_origin`): the window's condition (`window_condition`: the pose
seen in the window's frame), then the window's tokens before (i, j) in its own raster order. So
every GPT input looks like a training sequence and fits its block size.
"""
import torch

from sampling import guide, sample_next
from utils import UserError


def window_origin(i, j, grid_h, grid_w, h, w):
    """(top, left) of the h x w window for token (i, j) of a grid_h x grid_w grid.

    Centred on (i, j) where it fits, shifted to stay inside the grid at the edges, as in
    taming-transformers' sliding-window sampler.
    """
    top = min(max(i - h // 2, 0), grid_h - h)
    left = min(max(j - w // 2, 0), grid_w - w)
    return top, left


def window_condition(model, top, left, grid_h, grid_w, keypoints=None, part_maps=None,
                     labels=None, batch_size=None):
    """Condition tokens (B, P) of the PoseTransformer `model` for the h x w token window at
    (top, left) of a larger grid.

    The conditions describe the large image: keypoints (B, K, 3) in pixels of its
    (grid_w * f) x (grid_h * f) pixels, f = image_size / token_grid; part maps (B, grid_h * c,
    grid_w * c) for any cell size c. The window sees them in its own frame, as training saw a
    whole image: keypoints shifted by the window's pixel origin (those outside become 'not
    visible'), part maps cropped to it. A class or start token is the same for every window.
    A condition VQGAN's picture of that shifted pose or cropped map is the window's crop of
    the large image's picture (poses.pose_picture draws bones of joints off the picture).
    """
    h = w = model.token_grid
    if keypoints is not None:
        f = model.config["image_size"] / model.token_grid  # pixels per token
        keypoints = keypoints.clone()
        keypoints[..., 0] -= left * f
        keypoints[..., 1] -= top * f
    if part_maps is not None:
        if part_maps.size(1) % grid_h or part_maps.size(2) % grid_w:
            raise UserError(f"part maps of {part_maps.size(1)}x{part_maps.size(2)} do not "
                            f"split into the {grid_h}x{grid_w} token grid")
        ch, cw = part_maps.size(1) // grid_h, part_maps.size(2) // grid_w  # pixels per cell
        part_maps = part_maps[:, top * ch:(top + h) * ch, left * cw:(left + w) * cw]
    return model.condition_tokens(keypoints=keypoints, part_maps=part_maps,
                                  batch_size=batch_size, labels=labels)


@torch.no_grad()
def sample_grid(model, grid_h, grid_w, keypoints=None, part_maps=None, labels=None,
                batch_size=None, top_k=None, top_p=None, temperature=1.0, generator=None,
                guidance=None):
    """Sample a grid_h x grid_w token grid, at least the h x w training grid, with the
    PoseTransformer `model` -> tokens (B, grid_h, grid_w), in raster order.

    Cost: while the window stays put the previous token goes through the KV cache, as in
    PoseTransformer.sample; when the window moves, its condition and context (up to block_size
    tokens) are recomputed, so a large grid costs up to grid_h * grid_w forwards of block_size
    tokens. On the training grid the window never moves, and the result equals sample() exactly
    for the same generator (and guidance: every row then runs twice, PoseTransformer.guided).
    """
    h = w = model.token_grid
    if grid_h < h or grid_w < w:
        raise UserError(f"a {grid_h}x{grid_w} grid is smaller than the {h}x{w} training grid")
    conditions = dict(grid_h=grid_h, grid_w=grid_w, keypoints=keypoints, part_maps=part_maps,
                      labels=labels, batch_size=batch_size)
    P = model.num_condition_tokens
    B = window_condition(model, 0, 0, **conditions).size(0)
    guidance = model.resolve_guidance(guidance)
    passes = 1 if guidance == 1 else 2  # each row twice with guidance
    tokens = torch.zeros(B, grid_h, grid_w, dtype=torch.long, device=model.device)
    last, kv_cache = None, None  # (top, left, k) of the token sampled last; its cache
    for i in range(grid_h):
        for j in range(grid_w):
            top, left = window_origin(i, j, grid_h, grid_w, h, w)
            k = (i - top) * w + (j - left)  # (i, j)'s index in its window, row-major
            if last == (top, left, k - 1):  # the same window, one token further
                r, c = divmod(k - 1, w)
                previous = tokens[:, top + r, left + c, None].repeat(passes, 1)  # (B or 2B, 1)
                logits = model.gpt_forward(previous, kv_cache, start_pos=P + k - 1)[:, -1]
            else:  # a new window: its condition and context from scratch
                cond = model.guided(window_condition(model, top, left, **conditions), guidance)
                context = tokens[:, top:top + h, left:left + w].flatten(1)[:, :k]  # (B, k)
                kv_cache = model.gpt.new_kv_cache(cond.size(0))
                logits = model.gpt_forward(torch.cat([cond, context.repeat(passes, 1)], dim=1),
                                           kv_cache)[:, -1]
            tokens[:, i, j] = sample_next(guide(logits, guidance), generator, top_k, top_p,
                                          temperature)[:, 0]
            last = (top, left, k)
    return tokens
