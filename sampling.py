"""Sampling one token at a time: the top-k / top-p / temperature filters over the GPT's logits,
and the flags that set them in every script that samples (training grids, sample.py,
evaluate.py), and classifier-free guidance (`guide`). PoseTransformer.sample and
sliding_window.sample_grid draw each image token with sample_next.
"""
import torch

from cli import nucleus_mass, positive_int, sampling_scale

# guidance when sampling a model trained with --condition-dropout (README, Results: measured)
DEFAULT_GUIDANCE = 2.0


def add_sampling_args(parser, int8=False):
    """--top-k, --top-p and --temperature (filter_logits) for every script that samples; with
    `int8`, --int8 too (PoseTransformer.int8_for_cpu), for the scripts that load a model."""
    parser.add_argument("--top-k", type=positive_int, default=None)
    parser.add_argument("--top-p", type=nucleus_mass, default=None)
    # 0.7: the default GPT spreads some mass over 2048 codes' unlikely tail; sampled at 1 its
    # people come apart more often (README, Results: PCK 0.75 at 1, 0.84 at 0.7 of the real's)
    parser.add_argument("--temperature", type=sampling_scale, default=0.7)
    parser.add_argument("--guidance", type=sampling_scale, default=None,
                        help="classifier-free guidance scale (default: %g for a model trained "
                             "with --condition-dropout, else 1, none)" % DEFAULT_GUIDANCE)
    if int8:
        parser.add_argument("--int8", action="store_true",
                            help="CPU: the GPT's Linear layers in int8, faster from about 256 "
                                 "wide (bench.py sample); logits move by about 1 %%")


def sampling_options(args):
    """The sampling flags of add_sampling_args as PoseTransformer.sample's keywords."""
    return dict(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                guidance=args.guidance)


def filter_logits(logits, top_k=None, top_p=None, temperature=1.0):
    """logits (B, V) -> float32 logits / temperature with the filtered-out entries set to -inf
    (in float32 whatever autocast gave: bf16's 8 bits would move the nucleus and temperature).

    top_k keeps the k largest; top_p then keeps the smallest set of most likely tokens whose
    probabilities add up to at least top_p. The most likely token is always kept.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no top-k), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for no nucleus), got {top_p}")
    logits = logits.float() / temperature
    if top_k is not None:
        top = logits.topk(min(top_k, logits.size(-1)), dim=-1).indices  # (B, k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1:  # at 1 float32's cumsum can reach 1 early: keep all
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely ones before it already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, generator=None, top_k=None, top_p=None, temperature=1.0):
    """logits (B, V) -> sampled ids (B, 1), repeatable with a `generator` on the logits' device."""
    probs = filter_logits(logits, top_k, top_p, temperature).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def guide(logits, guidance=1.0):
    """Classifier-free guidance: logits (2B, V) of the sequences after their poses, then after
    the empty pose (PoseTransformer.guided) -> empty + guidance x (posed - empty), (B, V); at
    guidance 1 the logits (B, V) as they are. Above 1 it follows the pose more closely
    than the model's own p(image | pose) does, at the cost of variety."""
    if guidance == 1:
        return logits
    posed, empty = logits.float().chunk(2)
    return empty + guidance * (posed - empty)
