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
  keypoint-vqgan, parts-vqgan  the paper's pose-to-image model: the pose as a picture, or the
             one-hot part map (conditions.py), encoded by a second, frozen VQGAN trained
             on such pictures; its g x g codes, row-major, are ids n_embed + code.
  class      a single token, n_embed + the image's class (folder-per-class data), for p(s | c).
  none       a single start token, id n_embed.

Where things are: every position also gets Fourier features of where its input lies and which
cell it predicts (location_features.py).

Sampling draws one token at a time through a KV cache, filtered by top-k, top-p and temperature
(sampling.py), optionally with classifier-free guidance against the empty pose (`guided`);
sliding_window.py samples grids larger than the training grid with the same model.

The VQGANs are frozen and not part of this module's parameters or state_dict: a transformer
checkpoint records the VQGAN checkpoints it was trained against instead of copying their weights.
"""
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from conditions import CONDITION_CONTENT, Content, keypoint_cells, majority_parts
from location_features import location_features
from mingpt import GPT, GPTConfig, int8_for_cpu
from poses import LAYOUTS, NUM_PART_LABELS
from sampling import DEFAULT_GUIDANCE, guide, sample_next
from utils import UserError, averaged_weights, file_sha256, load_checkpoint, require_file
from vqgan import load_vqgan

CONDITION_MODES = ("keypoints", "parts", "keypoint-vqgan", "parts-vqgan", "class", "none")
# what each pose condition is made from: keypoints or part maps
POSE_INPUT = {"keypoints": "keypoints", "keypoint-vqgan": "keypoints", "parts": "part_maps",
              "parts-vqgan": "part_maps"}


class PoseTransformer(nn.Module):
    """A frozen VQGAN plus a GPT over its tokens, conditioned on keypoints, part maps, their
    tokens from a frozen `condition_vqgan`, a class or nothing.

    `config` is a plain dict holding every argument, so `from_config(vqgan, config, ...)`
    rebuilds the model for a checkpoint's state_dict; the hyperparameters are read from it.
    """

    def __init__(self, vqgan, condition="keypoints", image_size=256, num_keypoints=17,
                 keypoint_grid=None, num_part_labels=NUM_PART_LABELS, class_names=None,
                 n_layer=8, n_head=8, n_embd=512, dropout=0.0, bias=True, condition_vqgan=None,
                 pose_layout="coco17", condition_dropout=0.0):
        super().__init__()
        token_grid = vqgan.token_grid_size
        if (condition in CONDITION_CONTENT) != (condition_vqgan is not None):
            raise UserError(f"a condition VQGAN is needed for, and only for, the conditions "
                            f"{', '.join(CONDITION_CONTENT)} (got condition {condition!r})")
        if condition_vqgan and condition_vqgan.config.resolution != image_size:
            raise UserError(f"the condition VQGAN is for {condition_vqgan.config.resolution} px, "
                            f"the images are {image_size} px")
        if condition == "parts-vqgan" and condition_vqgan.config.in_channels != num_part_labels:
            raise UserError(f"the condition VQGAN encodes part maps of "
                            f"{condition_vqgan.config.in_channels} labels, the data's have "
                            f"{num_part_labels}; train one on these part maps (--part-labels)")
        keypoint_grid = keypoint_grid or 2 * token_grid
        if condition not in CONDITION_MODES:
            raise UserError(f"unknown condition {condition!r}; choose one of {CONDITION_MODES}")
        if condition == "keypoints" and keypoint_grid < token_grid:
            raise UserError(f"keypoint grid {keypoint_grid} is coarser than the VQGAN's token grid "
                            f"{token_grid}; use a keypoint grid of at least {token_grid}")
        if (condition == "class") != bool(class_names):
            raise UserError("class_names are needed for, and only for, condition 'class'")
        if condition_dropout and condition not in POSE_INPUT:
            raise UserError(f"condition dropout (for guided sampling) needs a pose condition, "
                            f"not {condition!r}: there is no empty pose to replace it with")
        self.config = dict(condition=condition, image_size=image_size,
                           num_keypoints=num_keypoints, keypoint_grid=keypoint_grid,
                           num_part_labels=num_part_labels, n_embed=vqgan.config.n_embed,
                           token_grid=token_grid, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                           dropout=dropout, bias=bias)
        if condition == "class":  # only then: configs of the other modes stay as they were
            self.config["class_names"] = list(class_names)
        if condition_dropout:  # likewise
            self.config["condition_dropout"] = condition_dropout
        condition_grid = None
        if condition_vqgan is not None:
            condition_grid = condition_vqgan.token_grid_size
            self.config.update(n_condition_embed=condition_vqgan.config.n_embed,
                               condition_grid=condition_grid, pose_layout=pose_layout)
            self.content = Content(CONDITION_CONTENT[condition], LAYOUTS[pose_layout],
                                   num_part_labels, image_size)
        self.num_image_tokens = token_grid * token_grid
        # condition tokens per sample (P) and condition ids in the vocabulary
        self.num_condition_tokens, num_condition_ids = {
            "keypoints": (num_keypoints, keypoint_grid * keypoint_grid + 1),  # + "not visible"
            "parts": (self.num_image_tokens, num_part_labels),
            "class": (1, len(class_names or ())),
            "none": (1, 1),
            **{mode: ((condition_grid or 0) ** 2, self.config.get("n_condition_embed"))
               for mode in CONDITION_CONTENT},
        }[condition]
        vocab_size = self.n_embed + num_condition_ids
        by_id, by_position = location_features(condition, token_grid, keypoint_grid, vocab_size,
                                               self.n_embed, self.num_condition_tokens,
                                               condition_grid)
        # derived from the config, so not saved: persistent=False
        self.register_buffer("features_by_id", by_id, persistent=False)
        self.register_buffer("features_by_position", by_position, persistent=False)
        # plain attributes, not registered submodules: the VQGANs stay out of parameters(),
        # state_dict() and train(); _apply below still moves them with .to(device)
        for name, frozen in (("vqgan", vqgan), ("condition_vqgan", condition_vqgan)):
            object.__setattr__(self, name, frozen and frozen.eval().requires_grad_(False))
        self.gpt = GPT(GPTConfig(
            vocab_size=vocab_size,
            # the last image token is a target only, never an input
            block_size=self.num_condition_tokens + self.num_image_tokens - 1,
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout, bias=bias,
            output_size=self.n_embed, n_features=by_id.size(1)))

    @classmethod
    def from_config(cls, vqgan, config, condition_vqgan=None):
        """Rebuild from `model.config`; the VQGANs must match the ones it was built for."""
        config = dict(config)
        found_in_vqgans = {"n_embed": vqgan.config.n_embed, "token_grid": vqgan.token_grid_size}
        if condition_vqgan is not None:
            found_in_vqgans.update(n_condition_embed=condition_vqgan.config.n_embed,
                                   condition_grid=condition_vqgan.token_grid_size)
        for key, found in found_in_vqgans.items():
            expected = config.pop(key)
            if expected != found:
                raise UserError(f"the transformer was trained with a VQGAN of {key} {expected}, "
                                f"but the given VQGAN has {key} {found}; pass the VQGAN checkpoint "
                                "it was trained with")
        return cls(vqgan, **config, condition_vqgan=condition_vqgan)

    # the hyperparameters, read from the config
    condition = property(lambda self: self.config["condition"])
    n_embed = property(lambda self: self.config["n_embed"])
    token_grid = property(lambda self: self.config["token_grid"])
    keypoint_grid = property(lambda self: self.config["keypoint_grid"])
    class_names = property(lambda self: self.config.get("class_names"))
    condition_dropout = property(lambda self: self.config.get("condition_dropout", 0.0))
    # where the model computes: the token table's device (an int8 GPT has no Linear weights)
    device = property(lambda self: self.gpt.transformer.wte.weight.device)

    def _apply(self, fn, *args, **kwargs):
        for frozen in filter(None, (self.vqgan, self.condition_vqgan)):
            frozen._apply(fn, *args, **kwargs)  # .to() / .cuda() / .half() move the VQGANs too
        return super()._apply(fn, *args, **kwargs)

    def __deepcopy__(self, memo):
        """A copy with its own GPT and the same frozen VQGANs (the weight average's copy)."""
        for frozen in filter(None, (self.vqgan, self.condition_vqgan)):
            memo[id(frozen)] = frozen  # deepcopy hands out what memo holds as it is
        copied = memo[id(self)] = self.__class__.__new__(self.__class__)
        for name, value in self.__dict__.items():
            object.__setattr__(copied, name, copy.deepcopy(value, memo))
        return copied

    # ---- condition and image tokens ------------------------------------------------------------

    def condition_tokens(self, batch=None, *, keypoints=None, part_maps=None, labels=None,
                         batch_size=None):
        """Condition tokens (B, P) of a batch as PoseImageDataset's items batch up (a dict with
        "keypoints" (B, K, 3), "parts" (B, H, W) or "label" (B,) by the condition), or of the
        conditions given one by one; the start token of condition 'none' needs only the batch
        size (of `batch`: its first tensor's)."""
        if batch is not None:
            device = self.device
            keypoints, part_maps, labels = (None if batch.get(key) is None else
                                            batch[key].to(device) for key in
                                            ("keypoints", "parts", "label"))
            part_maps = None if part_maps is None else part_maps.long()
            batch_size = batch_size or len(next(v for v in batch.values() if torch.is_tensor(v)))
        if self.condition in POSE_INPUT:  # the pose it needs: given, and of the trained kind
            name, K, L = (POSE_INPUT[self.condition], self.config["num_keypoints"],
                          self.config["num_part_labels"])
            pose = keypoints if name == "keypoints" else part_maps
            if pose is None:
                raise UserError(f"this transformer is conditioned on {self.condition}, but no "
                                f"{name.replace('_', ' ')} were given")
            if name == "keypoints" and pose.size(1) != K:
                raise UserError(f"got {pose.size(1)} keypoints per pose, but this transformer "
                                f"was trained with {K}")
            if name == "part_maps" and (pose.min() < 0 or pose.max() >= L):
                raise UserError(f"part labels must lie in [0, {L}), got [{pose.min().item()}, "
                                f"{pose.max().item()}]")
        if self.condition == "keypoints":
            return self.n_embed + keypoint_cells(keypoints, self.keypoint_grid,
                                                 self.config["image_size"])
        if self.condition == "parts":
            return self.n_embed + majority_parts(part_maps, self.token_grid,
                                                 self.config["num_part_labels"])
        if self.condition in CONDITION_CONTENT:
            return self._picture_tokens(self.content.inputs({"keypoints": keypoints,
                                                             "parts": part_maps}))
        if self.condition == "class":
            if labels is None:
                raise UserError("this transformer is conditioned on a class, but none was given")
            if labels.min() < 0 or labels.max() >= len(self.class_names):
                raise UserError(f"class labels must lie in [0, {len(self.class_names)}), got "
                                f"[{labels.min().item()}, {labels.max().item()}]")
            return self.n_embed + labels.long().view(-1, 1)
        if batch_size is None:
            raise ValueError("an unconditional transformer needs batch_size for its start tokens")
        return torch.full((batch_size, 1), self.n_embed, dtype=torch.long, device=self.device)

    def _picture_tokens(self, pictures):
        """Condition pictures (B, C, S, S) -> condition ids (B, g * g): n_embed + the condition
        VQGAN's codes, a range of their own after the image codes."""
        size = self.config["image_size"]
        if pictures.shape[-2:] != (size, size):
            raise UserError(f"condition pictures of {pictures.size(-2)}x{pictures.size(-1)} px "
                            f"are not the {size}x{size} px the condition VQGAN encodes")
        return self.n_embed + self.condition_vqgan.image_tokens(pictures).flatten(1)

    def null_condition(self, batch_size):
        """The prefix (B, P) of an empty pose, no joint visible or every part background: what
        training with condition dropout puts in place of some poses, so that the GPT also learns
        p(image) and classifier-free guidance can sample against it."""
        if self.condition not in POSE_INPUT:
            raise UserError(f"guided sampling needs a pose condition, not {self.condition!r}")
        size, K = self.config["image_size"], self.config["num_keypoints"]
        return self.condition_tokens(
            keypoints=torch.zeros(batch_size, K, 3, device=self.device),
            part_maps=torch.zeros(batch_size, size, size, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def image_tokens(self, images):
        """images (B, 3, H, W) in [-1, 1] -> VQGAN codes (B, h * w), row-major, encoded as
        VQGAN.image_tokens encodes them for every use."""
        return self.vqgan.image_tokens(images).flatten(1)

    @torch.no_grad()
    def decode(self, tokens):
        """tokens (B, h * w), or a token grid (B, H, W) of any size -> images in [-1, 1].

        The VQGAN decoder is convolutional (its attention takes any number of positions), so a
        grid_h x grid_w grid decodes to (B, 3, grid_h * f, grid_w * f), f pixels per token.
        """
        if tokens.dim() == 2:
            tokens = tokens.view(-1, self.token_grid, self.token_grid)
        return self.vqgan.decode_indices(tokens)

    # ---- training and sampling -----------------------------------------------------------------

    def int8_for_cpu(self):
        """Sample with int8 Linear layers in the GPT (mingpt.int8_for_cpu); CPU only."""
        if self.device.type != "cpu":
            raise UserError(f"--int8 is a CPU path and the model is on {self.device}; leave it "
                            "out (on a GPU, bf16 autocast is the fast path)")
        self.gpt = int8_for_cpu(self.gpt)
        return self

    def gpt_forward(self, idx, kv_cache=None, start_pos=0):
        """The GPT on sequence ids (B, T) at positions [start_pos, start_pos + T), with their
        location features -> logits (B, T, n_embed)."""
        features = (self.features_by_id[idx]
                    + self.features_by_position[start_pos:start_pos + idx.size(1)])  # (B, T, 2F)
        return self.gpt(idx, kv_cache, start_pos, features)

    def forward(self, cond, tokens, pkeep=1.0):
        """cond (B, P), tokens (B, N) -> logits (B, N, n_embed) predicting each token, loss.

        In training mode each sequence's condition is replaced by the empty pose with probability
        condition_dropout (null_condition), and with pkeep < 1 each input image token by a
        random code with probability 1 - pkeep (taming-transformers' trick against exposure
        bias); the targets are never replaced.
        """
        inputs = tokens[:, :-1]  # (B, N-1)
        if self.training and self.condition_dropout:  # some poses replaced by the empty one
            dropped = torch.rand(cond.size(0), 1, device=cond.device) < self.condition_dropout
            cond = torch.where(dropped, self.null_condition(1), cond)
        if self.training and pkeep < 1.0:
            keep = torch.rand(inputs.shape, device=inputs.device) < pkeep
            inputs = torch.where(keep, inputs, torch.randint_like(inputs, self.n_embed))
        logits = self.gpt_forward(torch.cat([cond, inputs], dim=1))  # (B, P+N-1, n_embed)
        logits = logits[:, cond.size(1) - 1:]  # (B, N, n_embed): image positions only
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens.reshape(-1))
        return logits, loss

    def resolve_guidance(self, guidance=None):
        """--guidance -> the classifier-free guidance scale to sample with: None is
        sampling.DEFAULT_GUIDANCE for a model trained with condition dropout, else 1 (none). Only
        such a model has learned what follows the empty pose, so others refuse any other scale."""
        if guidance is None:
            return DEFAULT_GUIDANCE if self.condition_dropout else 1.0
        if guidance != 1 and not self.condition_dropout:
            raise UserError(f"--guidance {guidance:g} needs a model trained with "
                            "--condition-dropout; this one was not: leave --guidance out")
        return guidance

    def guided(self, cond, guidance):
        """Classifier-free guidance (Ho and Salimans 2022) at a resolved scale: cond (B, P) ->
        the prefixes to run, (B, P) at guidance 1, else (2B, P), each sequence again after the
        empty pose (null_condition), whose logits sampling.guide combines."""
        return cond if guidance == 1 else torch.cat([cond, self.null_condition(cond.size(0))])

    @torch.no_grad()
    def sample(self, cond, num_tokens=None, top_k=None, top_p=None, temperature=1.0,
               generator=None, prefix_tokens=None, guidance=None):
        """cond (B, P) -> image tokens (B, num_tokens), num_tokens defaulting to h * w.

        prefix_tokens (B, M) are given first image tokens to complete; they start the result. The
        condition and prefix go through the GPT in one chunk, then one token per step through
        the KV cache; with `guidance` (see guided) every row runs twice. Call .eval() first when
        the model has dropout.
        """
        B, P = cond.shape
        num_tokens = num_tokens or self.num_image_tokens
        guidance = self.resolve_guidance(guidance)
        tokens = torch.empty(B, num_tokens, dtype=torch.long, device=cond.device)
        M = 0
        if prefix_tokens is not None:
            M = prefix_tokens.size(1)
            tokens[:, :M] = prefix_tokens
        if M == num_tokens:
            return tokens
        cond = self.guided(cond, guidance)  # (B or 2B, P)
        passes = cond.size(0) // B  # each row once, or twice with guidance
        kv_cache = self.gpt.new_kv_cache(cond.size(0))
        prompt = torch.cat([cond, tokens[:, :M].repeat(passes, 1)], dim=1)  # (B or 2B, P + M)
        logits = self.gpt_forward(prompt, kv_cache)[:, -1]  # (B or 2B, V)
        for i in range(M, num_tokens):
            tokens[:, i:i + 1] = sample_next(guide(logits, guidance), generator, top_k, top_p,
                                             temperature)
            if i + 1 < num_tokens:
                logits = self.gpt_forward(tokens[:, i:i + 1].repeat(passes, 1), kv_cache,
                                          start_pos=P + i)[:, -1]
        return tokens

def load_frozen_vqgan(path, sha256, trained_by, content="photos", device="cpu"):
    """A VQGAN that the transformer checkpoint `trained_by` recorded: the very file it was trained
    with (same content hash, since its codes are the vocabulary), encoding `content`."""
    if not os.path.exists(path):
        raise UserError(f"{trained_by} was trained with the VQGAN {path}, which no longer exists; "
                        "put a copy of it there (or pass --vqgan-checkpoint for the image VQGAN)")
    require_file(path, "the VQGAN checkpoint")
    if file_sha256(path) != sha256:
        raise UserError(f"{path} is not the VQGAN {trained_by} was trained with (its content "
                        "differs); pass the vqgan.pt of the stage-1 run it was trained on")
    return load_vqgan(path, device, content)


def load_transformer(path, device="cpu", vqgan_path=None):
    """RUN/transformer_last.pt -> (PoseTransformer in eval mode, with the averaged weights where
    the run kept them (--ema-decay), the checkpoint dict). The VQGAN comes from `vqgan_path` or
    the path the checkpoint recorded, a condition VQGAN from the path recorded; each must be
    the very file the transformer was trained with."""
    checkpoint = load_checkpoint(path, "transformer_train")
    config = dict(checkpoint["config"])  # the model's config plus the VQGANs' content hashes
    vqgan = load_frozen_vqgan(vqgan_path or checkpoint["vqgan_checkpoint"],
                              config.pop("vqgan_sha256"), path, device=device)
    condition_vqgan = None
    if config["condition"] in CONDITION_CONTENT:
        condition_vqgan = load_frozen_vqgan(
            checkpoint["condition_vqgan_checkpoint"], config.pop("condition_vqgan_sha256"), path,
            CONDITION_CONTENT[config["condition"]], device)
    model = PoseTransformer.from_config(vqgan, config, condition_vqgan).to(device)
    model.load_state_dict(averaged_weights(checkpoint["ema"]) if "ema" in checkpoint
                          else checkpoint["model"])
    return model.eval(), checkpoint
