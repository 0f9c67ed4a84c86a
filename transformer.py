"""Stage 2: a GPT over VQGAN image tokens, conditioned on a pose given as a prefix of tokens.

One vocabulary for the GPT's input: image codes [0, n_embed), then condition tokens in their own
range [n_embed, n_embed + n_condition_ids). The sequence is

    condition tokens (P) | image tokens 0 .. N-2

and the logit at position P-1+i predicts image token i. The output head has n_embed rows only: the
loss is over image codes and sampling can never emit a condition id as an image token.

Condition modes:
  keypoints  one token per joint: its cell row * G + col on a G x G grid over the image, or the
             extra id G * G when the joint is not visible. Joints labeled occluded (v == 1) count
             as visible: their position is known. Which joint a token is comes from its position.
  parts      the part-label map reduced to the token grid by majority label per cell (ties go to
             the lower label), one token per cell, row-major.
  none       a single start token, id n_embed.

The VQGAN is frozen and not part of this module's parameters or state_dict: a transformer
checkpoint records the VQGAN checkpoint it was trained against instead of copying its weights.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from mingpt import GPT, GPTConfig
from utils import NUM_PART_LABELS, UserError, file_sha256, load_checkpoint
from vqgan import load_vqgan

CONDITION_MODES = ("keypoints", "parts", "none")


def filter_logits(logits, top_k=None, top_p=None, temperature=1.0):
    """logits (B, V) -> logits / temperature with the filtered-out entries set to -inf.

    top_k keeps the k largest; top_p then keeps the smallest set of most likely tokens whose
    probabilities add up to at least top_p. The most likely token is always kept.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no top-k), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for no nucleus), got {top_p}")
    logits = logits / temperature
    if top_k is not None:
        top = logits.topk(min(top_k, logits.size(-1)), dim=-1).indices  # (B, k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely ones before it already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, generator=None, top_k=None, top_p=None, temperature=1.0):
    """logits (B, V) -> sampled ids (B, 1), repeatable with a `generator` on the logits' device."""
    probs = filter_logits(logits, top_k, top_p, temperature).float().softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class PoseTransformer(nn.Module):
    """A frozen VQGAN plus a GPT over its tokens, conditioned on keypoints, part maps or nothing.

    `config` is a plain dict holding every argument, so `from_config(vqgan, config)` rebuilds the
    model for a checkpoint's state_dict.
    """

    def __init__(self, vqgan, condition="keypoints", image_size=256, num_keypoints=17,
                 keypoint_grid=None, num_part_labels=NUM_PART_LABELS,
                 n_layer=8, n_head=8, n_embd=512, dropout=0.0, bias=True):
        super().__init__()
        token_grid = vqgan.token_grid_size
        keypoint_grid = keypoint_grid or 2 * token_grid
        if condition not in CONDITION_MODES:
            raise UserError(f"unknown condition {condition!r}; choose one of {CONDITION_MODES}")
        if condition == "keypoints" and keypoint_grid < token_grid:
            raise UserError(f"keypoint grid {keypoint_grid} is coarser than the VQGAN's token grid "
                            f"{token_grid}; use a keypoint grid of at least {token_grid}")
        self.config = dict(condition=condition, image_size=image_size,
                           num_keypoints=num_keypoints, keypoint_grid=keypoint_grid,
                           num_part_labels=num_part_labels, n_embed=vqgan.config.n_embed,
                           token_grid=token_grid, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                           dropout=dropout, bias=bias)
        self.condition = condition
        self.image_size = image_size
        self.keypoint_grid = keypoint_grid
        self.n_embed = vqgan.config.n_embed
        self.token_grid = token_grid
        self.num_image_tokens = token_grid * token_grid
        # condition tokens per sample (P) and condition ids in the vocabulary
        self.num_condition_tokens, num_condition_ids = {
            "keypoints": (num_keypoints, keypoint_grid * keypoint_grid + 1),  # + "not visible"
            "parts": (self.num_image_tokens, num_part_labels),
            "none": (1, 1),
        }[condition]
        self.num_part_labels = num_part_labels
        # a plain attribute, not a registered submodule: the VQGAN stays out of parameters(),
        # state_dict() and train(); _apply below still moves it with .to(device)
        vqgan.eval().requires_grad_(False)
        object.__setattr__(self, "vqgan", vqgan)
        self.gpt = GPT(GPTConfig(
            vocab_size=self.n_embed + num_condition_ids,
            # the last image token is a target only, never an input
            block_size=self.num_condition_tokens + self.num_image_tokens - 1,
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout, bias=bias,
            output_size=self.n_embed))

    @classmethod
    def from_config(cls, vqgan, config):
        """Rebuild from `model.config`; the VQGAN must match the one it was built for."""
        config = dict(config)
        found_in_vqgan = {"n_embed": vqgan.config.n_embed, "token_grid": vqgan.token_grid_size}
        for key, found in found_in_vqgan.items():
            expected = config.pop(key)
            if expected != found:
                raise UserError(f"the transformer was trained with a VQGAN of {key} {expected}, "
                                f"but the given VQGAN has {key} {found}; pass the VQGAN checkpoint "
                                "it was trained with")
        return cls(vqgan, **config)

    def _apply(self, fn, *args, **kwargs):
        self.vqgan._apply(fn, *args, **kwargs)  # .to() / .cuda() / .half() move the VQGAN too
        return super()._apply(fn, *args, **kwargs)

    # ---- condition and image tokens ------------------------------------------------------------

    def condition_tokens(self, keypoints=None, part_maps=None, batch_size=None):
        """Keypoints (B, K, 3), part maps (B, H, W) or a batch size -> condition tokens (B, P)."""
        if self.condition == "keypoints":
            if keypoints is None:
                raise UserError("this transformer is conditioned on keypoints, but none were given")
            return self.n_embed + self._keypoint_cells(keypoints)
        if self.condition == "parts":
            if part_maps is None:
                raise UserError("this transformer is conditioned on part maps, but none were given")
            return self.n_embed + self._majority_parts(part_maps)
        if batch_size is None:
            raise ValueError("an unconditional transformer needs batch_size for its start tokens")
        return torch.full((batch_size, 1), self.n_embed, dtype=torch.long,
                          device=self.gpt.lm_head.weight.device)

    def _keypoint_cells(self, keypoints):
        """(B, K, 3) x, y, v in pixels -> (B, K) cell row * G + col, or G * G when not visible."""
        if keypoints.size(1) != self.config["num_keypoints"]:
            raise UserError(f"got {keypoints.size(1)} keypoints per pose, but this transformer "
                            f"was trained with {self.config['num_keypoints']}")
        G = self.keypoint_grid
        x, y, v = keypoints.nan_to_num(-1.0).unbind(dim=-1)  # (B, K) each; NaN -> outside
        visible = (v > 0) & (x >= 0) & (x < self.image_size) & (y >= 0) & (y < self.image_size)
        col = (x * G / self.image_size).floor().long().clamp(0, G - 1)
        row = (y * G / self.image_size).floor().long().clamp(0, G - 1)
        return torch.where(visible, row * G + col, G * G)

    def _majority_parts(self, part_maps):
        """(B, H, W) labels -> (B, h * w) most frequent label per token cell, ties to the lower."""
        B, H, W = part_maps.shape
        h = self.token_grid
        if H % h or W % h:
            raise UserError(f"part maps of {H}x{W} do not split into the {h}x{h} token grid")
        if part_maps.min() < 0 or part_maps.max() >= self.num_part_labels:
            raise UserError(f"part labels must lie in [0, {self.num_part_labels}), got "
                            f"[{part_maps.min().item()}, {part_maps.max().item()}]")
        cells = part_maps.reshape(B, h, H // h, h, W // h)
        counts = torch.stack([(cells == label).sum(dim=(2, 4))
                              for label in range(self.num_part_labels)], dim=-1)  # (B, h, h, L)
        return counts.argmax(dim=-1).flatten(1)  # argmax returns the first maximum: lower label

    @torch.no_grad()
    def image_tokens(self, images):
        """images (B, 3, H, W) in [-1, 1] -> VQGAN codes (B, h * w), row-major."""
        _, _, indices = self.vqgan.encode(images)  # (B, h, w)
        return indices.flatten(1)

    @torch.no_grad()
    def decode(self, tokens):
        """tokens (B, h * w) -> images (B, 3, H, W) in [-1, 1]."""
        return self.vqgan.decode_indices(tokens.view(-1, self.token_grid, self.token_grid))

    # ---- training and sampling -----------------------------------------------------------------

    def forward(self, cond, tokens, pkeep=1.0):
        """cond (B, P), tokens (B, N) -> logits (B, N, n_embed) predicting each token, loss.

        In training mode with pkeep < 1 each input image token is replaced by a random code with
        probability 1 - pkeep (taming-transformers' trick against exposure bias); condition tokens
        and the targets are never replaced.
        """
        inputs = tokens[:, :-1]  # (B, N-1)
        if self.training and pkeep < 1.0:
            keep = torch.rand(inputs.shape, device=inputs.device) < pkeep
            inputs = torch.where(keep, inputs, torch.randint_like(inputs, self.n_embed))
        logits = self.gpt(torch.cat([cond, inputs], dim=1))  # (B, P+N-1, n_embed)
        logits = logits[:, cond.size(1) - 1:]  # (B, N, n_embed): image positions only
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def sample(self, cond, num_tokens=None, top_k=None, top_p=None, temperature=1.0,
               generator=None, prefix_tokens=None):
        """cond (B, P) -> image tokens (B, num_tokens), num_tokens defaulting to h * w.

        prefix_tokens (B, M) are given first image tokens to complete; they start the result. The
        condition and prefix go through the GPT in one chunk, then one token per step through
        the KV cache. Call .eval() first when the model has dropout.
        """
        B, P = cond.shape
        num_tokens = num_tokens or self.num_image_tokens
        tokens = torch.empty(B, num_tokens, dtype=torch.long, device=cond.device)
        M = 0
        if prefix_tokens is not None:
            M = prefix_tokens.size(1)
            tokens[:, :M] = prefix_tokens
        if M == num_tokens:
            return tokens
        kv_cache = self.gpt.new_kv_cache(B)
        logits = self.gpt(torch.cat([cond, tokens[:, :M]], dim=1), kv_cache)[:, -1]  # (B, V)
        for i in range(M, num_tokens):
            tokens[:, i:i + 1] = sample_next(logits, generator, top_k, top_p, temperature)
            if i + 1 < num_tokens:
                logits = self.gpt(tokens[:, i:i + 1], kv_cache, start_pos=P + i)[:, -1]
        return tokens


def load_transformer(path, device="cpu", vqgan_path=None):
    """RUN/transformer_last.pt -> (PoseTransformer in eval mode, the checkpoint dict).

    The VQGAN comes from `vqgan_path` or the path the checkpoint recorded; it must be the very
    file the transformer was trained on (same content hash), since its codes are the vocabulary.
    """
    checkpoint = load_checkpoint(path, "transformer_train")
    vqgan_path = vqgan_path or checkpoint["vqgan_checkpoint"]
    if not os.path.exists(vqgan_path):
        raise UserError(f"{path} was trained with the VQGAN {vqgan_path}, which no longer exists; "
                        "pass --vqgan-checkpoint with a copy of it")
    config = dict(checkpoint["config"])  # the model's config plus the VQGAN's content hash
    if file_sha256(vqgan_path) != config.pop("vqgan_sha256"):
        raise UserError(f"{vqgan_path} is not the VQGAN {path} was trained with (its content "
                        "differs); pass the vqgan.pt of the stage-1 run it was trained on")
    vqgan = load_vqgan(vqgan_path, device)
    model = PoseTransformer.from_config(vqgan, config).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint
