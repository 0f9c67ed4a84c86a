"""Stage-1 vector quantizer: every latent vector becomes its nearest codebook entry, and its index
is the token that stage 2 models.

VQGAN.encode calls Codebook between quant_conv and post_quant_conv; VQGAN.decode_indices calls
Codebook.lookup to turn stage-2 tokens back into latents. Three small options fight codebook
collapse (few codes used), each off by default:
  l2_normalize        cosine-similarity codes (ViT-VQGAN, Yu et al. 2021)
  lookup_dim          factorised codes: look up in a low-dimensional space (ViT-VQGAN)
  restart_dead_codes  re-initialise codes unused for dead_code_window optimizer steps from
                      encoder outputs (Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021,
                      SoundStream); the trainer calls count_step() after each optimizer step
CodebookStats measures the collapse: usage fraction and perplexity over a window of batches.
The training-time bookkeeping has no data-dependent shapes (no boolean indexing, no bincount),
so it never waits for the GPU.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _distributed():
    return dist.is_available() and dist.is_initialized()


class Codebook(nn.Module):
    """forward(z (B, embed_dim, H, W)) -> z_q (same shape), loss (scalar), indices (B, H, W)."""

    def __init__(self, n_embed, embed_dim, beta=0.25, legacy_beta=False, l2_normalize=False,
                 lookup_dim=None, restart_dead_codes=False, dead_code_window=100):
        super().__init__()
        self.n_embed = n_embed
        self.beta = beta
        self.legacy_beta = legacy_beta
        self.l2_normalize = l2_normalize
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_window = dead_code_window
        if lookup_dim:  # factorised codes: the codebook lives in lookup_dim << embed_dim
            self.project_in = nn.Linear(embed_dim, lookup_dim)
            self.project_out = nn.Linear(lookup_dim, embed_dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.embedding = nn.Embedding(n_embed, lookup_dim or embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        if restart_dead_codes:
            # optimizer steps since each code was last chosen (saved, so a resumed run keeps it)
            self.register_buffer("steps_unused", torch.zeros(n_embed, dtype=torch.long))
            # chosen by a micro-batch of the step in progress (empty again after count_step)
            self.register_buffer("used_this_step", torch.zeros(n_embed, dtype=torch.bool),
                                 persistent=False)

    def codes(self):
        """The codebook as the lookup sees it: (n_embed, code_dim), unit rows with l2_normalize."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=1) if self.l2_normalize else weight

    @torch.no_grad()
    def nearest(self, z):
        """Index of the nearest code for each row of z (N, code_dim) -> (N,)."""
        codes = self.codes()
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2: one matmul, never an (N, n_embed, dim) tensor
        distances = z.pow(2).sum(1, keepdim=True) - 2 * z @ codes.t() + codes.pow(2).sum(1)
        return distances.argmin(1)

    def forward(self, z):
        B, C, H, W = z.shape
        # distances and losses in the codebook's own precision (float32), not autocast's bf16,
        # which would pick wrong nearest codes
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(self.embedding.weight.dtype).permute(0, 2, 3, 1).reshape(-1, C)  # (B*H*W, C)
            z = self.project_in(z)  # (B*H*W, code_dim)
            if self.l2_normalize:
                z = F.normalize(z, dim=1)
            if self.training and self.restart_dead_codes:
                self._restart_dead_codes(z.detach())
            indices = self.nearest(z)  # (B*H*W,)
            z_q = F.embedding(indices, self.codes())  # (B*H*W, code_dim)

            codebook_loss = F.mse_loss(z_q, z.detach())  # ||sg[z] - e||^2 moves the codes
            commitment_loss = F.mse_loss(z, z_q.detach())  # ||z - sg[e]||^2 moves the encoder
            if self.legacy_beta:
                # the original taming-transformers release put beta on the codebook term instead
                loss = self.beta * codebook_loss + commitment_loss
            else:
                loss = codebook_loss + self.beta * commitment_loss  # as in the VQ-VAE paper

            z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient reaches z
            z_q = self.project_out(z_q).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
            if self.training and self.restart_dead_codes:
                self._note_usage(indices)
        return z_q, loss, indices.reshape(B, H, W)

    def lookup(self, indices):
        """Token ids (B, h, w) -> quantized latents (B, embed_dim, h, w), as forward gives them."""
        z_q = self.project_out(F.embedding(indices, self.codes()))  # (B, h, w, embed_dim)
        return z_q.permute(0, 3, 1, 2)

    @torch.no_grad()
    def _restart_dead_codes(self, z):
        """Codes unused for dead_code_window optimizer steps get random rows of this batch's z
        (the first micro-batch's of a step: a restart sets the code's count back to 0).

        Runs before the lookup, so no autograd graph holds the weights being overwritten.
        """
        dead = self.steps_unused >= self.dead_code_window  # (n_embed,)
        # A candidate for every code, used where dead: no data-dependent shapes, so no
        # host-device synchronisation in the training step.
        new_codes = z[torch.randint(0, z.shape[0], (self.n_embed,), device=z.device)]
        if _distributed():
            dist.broadcast(new_codes, src=0)  # every rank takes rank 0's choice
        weight = self.embedding.weight
        weight.copy_(torch.where(dead[:, None], new_codes.to(weight.dtype), weight))
        self.steps_unused.masked_fill_(dead, 0)

    @torch.no_grad()
    def _note_usage(self, indices):
        """Mark the codes a micro-batch chose (indices (N,)); count_step ages the others."""
        self.used_this_step.index_fill_(0, indices, True)

    @torch.no_grad()
    def count_step(self):
        """One optimizer step is done: codes that none of its micro-batches chose age by one
        step, the others start again from 0. A no-op without restart_dead_codes."""
        if not self.restart_dead_codes:
            return
        used = self.used_this_step
        if _distributed():  # all ranks agree on which codes are dead
            used = used.to(torch.int32)
            dist.all_reduce(used)
            used = used > 0
        self.steps_unused.add_(1).masked_fill_(used, 0)
        self.used_this_step.zero_()


class CodebookStats:
    """A histogram of chosen codes over a window of batches: update() per batch, read `usage` and
    `perplexity`, reset() to start the next window."""

    def __init__(self, n_embed):
        self.counts = torch.zeros(n_embed, dtype=torch.long)

    def update(self, indices):
        indices = indices.flatten()
        # index_add_ rather than bincount, whose output size (the largest index) needs a sync
        self.counts = self.counts.to(indices.device).index_add_(
            0, indices, torch.ones_like(indices))  # stays on the device

    def reset(self):
        self.counts = torch.zeros_like(self.counts)

    @property
    def usage(self):
        """Fraction of the codes chosen at least once in the window."""
        return (self.counts > 0).float().mean().item()

    @property
    def perplexity(self):
        """exp(entropy) of the window's code distribution: n_embed when uniform, 1 for one code."""
        p = self.counts[self.counts > 0].cpu().double()  # (Apple's MPS has no float64)
        p = p / p.sum()
        return torch.exp(-(p * p.log()).sum()).item()
