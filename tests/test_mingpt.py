"""Tests of the GPT: the KV cache against full recomputation, causality, the optimizer groups."""
import pytest
import torch
import torch.nn as nn

from mingpt import GPT, GPTConfig, int8_for_cpu


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    settings = dict(vocab_size=50, block_size=24, n_layer=2, n_head=2, n_embd=32, output_size=40)
    settings.update(overrides)
    return GPT(GPTConfig(**settings)).eval()


def test_logits_have_output_size_columns():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (3, 10))
    assert model(idx).shape == (3, 10, 40)


def test_kv_cache_chunks_match_full_recompute():
    # chunks of 5, 3, then single tokens: the 3-token chunk needs the offset causal mask
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        kv_cache = model.new_kv_cache(batch_size=2)
        bounds = [0, 5, 8] + list(range(9, 25))
        for start, end in zip(bounds[:-1], bounds[1:]):
            chunk = model(idx[:, start:end], kv_cache, start_pos=start)
            torch.testing.assert_close(chunk, full[:, start:end], atol=1e-5, rtol=0)


def test_int8_copy_stores_int8_weights_and_keeps_the_logits_within_a_few_percent():
    model = tiny_gpt(n_embd=64)
    idx = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        exact = model(idx)
        quantized = int8_for_cpu(model)
        approximate = quantized(idx)
        # the copy's Linear layers hold int8 weights; the float model is left as it was
        linears = [m for m in quantized.modules() if type(m).__name__ == "Linear"
                   and m.__module__.startswith("torch.ao.nn.quantized")]
        assert len(linears) == 2 * 4 + 1  # four per block, and the head
        assert all(m.weight().dtype == torch.qint8 for m in linears)
        assert isinstance(model.lm_head, nn.Linear) and torch.equal(model(idx), exact)
        error = (approximate - exact).abs().mean() / exact.std()
        assert 0 < error < 0.05
        # it samples through the KV cache like the float model: the prompt once, then a token
        kv_cache = quantized.new_kv_cache(batch_size=2)
        assert kv_cache.k.dtype == torch.float32
        first = quantized(idx[:, :23], kv_cache)[:, -1]
        last = quantized(idx[:, 23:], kv_cache, start_pos=23)[:, -1]
        # (activations are quantized per call, so a chunk's logits differ a little from the
        # whole sequence's)
        assert (first - exact[:, 22]).abs().mean() < 0.05 * exact.std()
        assert (last - exact[:, 23]).abs().mean() < 0.05 * exact.std()


def test_attention_computes_in_float32_under_the_cpus_bf16_autocast(monkeypatch):
    """The CPU's bf16 attention kernel ran at half the speed of its float32 one (the default
    GPT's training step 0.48 s against 0.40 s with float32 attention): on the CPU, SDPA gets
    float32 queries, keys and values under bf16 autocast, with and without the KV cache, and
    autocast does not cast them back to bf16."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dtypes = []

    def spy(q, k, v, **options):
        y = sdpa(q, k, v, **options)
        dtypes.append({q.dtype, k.dtype, v.dtype, y.dtype})
        return y

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        exact = model(idx)
    dtypes.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        kv_cache = model.new_kv_cache(batch_size=2)
        model(idx[:, :9], kv_cache)
        model(idx[:, 9:], kv_cache, start_pos=9)
    assert len(dtypes) == 3 * 2 and all(seen == {torch.float32} for seen in dtypes)
    assert logits.dtype == torch.bfloat16  # the Linear layers still compute in bf16
    assert (logits.float() - exact).abs().mean() < 0.05 * exact.std()


def test_changing_a_later_token_leaves_earlier_logits_unchanged():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 50
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], atol=0, rtol=0)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_sequences_past_block_size_are_rejected():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="kv_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=3)


def test_optimizer_decays_linear_weights_only_and_covers_every_param_once():
    model = tiny_gpt()
    optimizer = model.configure_optimizer(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95),
                                          device_type="cpu")
    decay_group, no_decay_group = optimizer.param_groups
    assert decay_group["weight_decay"] == 0.1 and no_decay_group["weight_decay"] == 0.0
    decay = {id(p) for p in decay_group["params"]}
    no_decay = {id(p) for p in no_decay_group["params"]}
    assert not decay & no_decay
    assert decay | no_decay == {id(p) for p in model.parameters()}
    assert len(decay) + len(no_decay) == len(list(model.parameters()))

    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert decay == linear_weights
    for name, param in model.named_parameters():
        if name.endswith("bias") or ".ln_" in name or "wte" in name or "wpe" in name:
            assert id(param) in no_decay, name


def test_num_params_counts_every_parameter():
    model = tiny_gpt(bias=False)
    C, V, O, T, L = 32, 50, 40, 24, 2
    per_block = 2 * C + 3 * C * C + C * C + 2 * 4 * C * C  # two LayerNorms, attention, MLP
    assert model.num_params() == V * C + T * C + L * per_block + C + C * O
