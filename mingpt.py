"""A small GPT in the spirit of nanoGPT, with a key/value cache for generation.

Pre-LayerNorm blocks, causal self-attention through F.scaled_dot_product_attention, a 4x GELU MLP,
learned position embeddings, and optionally continuous per-position features (`n_features`,
projected by a Linear and added to the embeddings: the pose transformer passes where in the image
each position's token lies). `forward(idx, kv_cache, start_pos, features)` processes a chunk of
tokens at positions [start_pos, start_pos + T); with a KVCache the keys and values of earlier
chunks are kept, so a prompt is processed once and then one token per step.

No weight tying: the input vocabulary (image codes followed by condition tokens) and the output
vocabulary (image codes only, `output_size`) are different, so the two tables cannot be shared.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The CPU feature under which --precision auto trains a GPT in bf16 (utils.resolve_precision):
# bf16 dot products alone suffice, as the default GPT trained as well in bf16 as in fp32 on them.
TRAINING_CPU_BF16 = "avx512_bf16"


@dataclass
class GPTConfig:
    vocab_size: int  # input token ids
    block_size: int  # longest sequence
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    output_size: int | None = None  # logits per position; None means vocab_size
    n_features: int = 0  # size of the optional continuous features added to each position

    def __post_init__(self):
        if self.output_size is None:
            self.output_size = self.vocab_size
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")


class KVCache:
    """Keys and values of every layer for positions [0, block_size), preallocated, filled in place.

    k and v are (n_layer, B, n_head, block_size, head_dim). Which positions are valid is the
    caller's bookkeeping: it passes start_pos to GPT.forward.
    """

    def __init__(self, config, batch_size, device=None, dtype=None):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size,
                 config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer, start_pos, k, v):
        """Store k, v (B, nh, T, hs) at [start_pos, start_pos + T); return keys, values so far."""
        end = start_pos + k.size(2)
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer  # index into the KVCache
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, start_pos=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, start_pos, k, v)  # (B, nh, start_pos + T, hs)
        # Query i sits at position start_pos + i and may see keys 0 .. start_pos + i. SDPA's
        # is_causal aligns the mask to the top left, which is right only when start_pos == 0.
        mask, is_causal = None, False
        if start_pos == 0:
            is_causal = True
        elif T > 1:
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device)
            mask = mask.tril(diagonal=start_pos)  # (T, start_pos + T)
        # T == 1 with a cache: the one new query sees every cached key, no mask needed.
        dtype = q.dtype
        # On the CPU attention computes in float32 under any autocast: its bf16 kernel ran at
        # half the float32 one's speed (the default GPT's bf16 training step: 0.48 s, 0.40 with
        # float32 attention; bench.py transformer). CUDA's bf16 kernel is fast and keeps bf16.
        if q.device.type == "cpu":
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False):  # CUDA's autocast stays as it is
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.to(dtype).transpose(1, 2).contiguous().view(B, T, C)  # heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, start_pos=0):
        x = x + self.attn(self.ln_1(x), kv_cache, start_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.n_features:
            self.transformer["wfe"] = nn.Linear(config.n_features, config.n_embd, bias=False)
        self.lm_head = nn.Linear(config.n_embd, config.output_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, batch_size):
        """An empty KVCache on this model's device, in the dtype the keys will have.

        Under autocast the keys come out of a Linear in the autocast dtype; a cache in that dtype
        avoids casting the whole cache back at every step.
        """
        # the token table: never quantized, so it still says where and in what the model computes
        device = self.transformer.wte.weight.device
        dtype = self.transformer.wte.weight.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        return KVCache(self.config, batch_size, device, dtype)

    def forward(self, idx, kv_cache=None, start_pos=0, features=None):
        """idx (B, T) at positions [start_pos, start_pos + T) -> logits (B, T, output_size).

        Without a cache the chunk must start at 0; with one, positions before start_pos must have
        been processed into it already. features (B or 1, T, n_features) are required when the
        config has n_features.
        """
        B, T = idx.size()
        if start_pos + T > self.config.block_size:
            raise ValueError(f"positions up to {start_pos + T} do not fit block_size "
                             f"{self.config.block_size}")
        if kv_cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs the kv_cache holding the earlier positions")
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = tok_emb + pos_emb
        if self.config.n_features:
            x = x + self.transformer.wfe(features.to(x.dtype))  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache, start_pos)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, output_size)

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW decaying Linear weights only.

        Biases, LayerNorm weights and the token and position embeddings are not decayed: pulling
        them to zero shrinks a scale or an identity rather than regularising a mapping.
        """
        decay, no_decay = [], []
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                is_linear_weight = isinstance(module, nn.Linear) and name == "weight"
                (decay if is_linear_weight else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # the fused CUDA kernel does the whole update in one launch
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=device_type == "cuda")


def int8_for_cpu(gpt):
    """A copy of `gpt` whose Linear layers compute in int8 on the CPU, for sampling.

    One new token at a small batch multiplies a few rows by every weight matrix, so the step is
    bound by reading weights; int8 weights (per output channel) are a quarter of float32's, and
    the activations are quantized on the fly per batch (dynamic quantization). The logits move
    by about 1 % of their spread, so sampled sequences part from float32's after some tokens
    (bench.py sample prints both; evaluate.py --int8 the bits per token). PyTorch's eager int8
    kernels (torch.ao.quantization, which warns that it is deprecated in favour of torchao,
    whose CPU kernels need torch.compile and ran slower eager) are the fast path here.
    """
    import warnings
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        return quantize_dynamic(gpt, {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8, inplace=False)
