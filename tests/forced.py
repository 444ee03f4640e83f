"Helpers shared by the GPU tests (not collected: no tests here)."
import contextlib
import torch
from tiny_turboquant import kernel
from tiny_turboquant.cache import TinyKVCache
from tiny_turboquant.demo import first_divergence
from tiny_turboquant.models import cache_kwargs, sample_text


@torch.no_grad()
def forced_logits(model, cache, tokens, prompt):
    "The next-token logits `[B, steps, vocab]` after each of `tokens[:, prompt - 1:-1]`, one decode step at a time."
    logits = [model(tokens[:, :prompt], **cache_kwargs(model, cache)).logits[:, -1]]
    for t in range(prompt, tokens.shape[1] - 1):
        logits.append(model(tokens[:, t:t + 1], **cache_kwargs(model, cache)).logits[:, -1])
    return torch.stack(logits, 1).float()


def greedy(model, ids, cache, steps):
    "Greedy tokens `[B, prompt + steps]` (every row takes exactly `steps`) and their logits `[B, steps, vocab]`."
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), do_sample=False,
                         max_new_tokens=steps, min_new_tokens=steps, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1).float()


@contextlib.contextmanager
def counted_launches():
    "Count the fused kernel's launches inside the block (`tiny_attention` looks `_launch` up in its module each call)."
    count, original = [0], kernel._launch
    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)
    kernel._launch = counted
    try: yield count
    finally: kernel._launch = original


def check_fused_generation(model, ids, steps):
    """Fed the same tokens, decode steps through the kernel give the PyTorch path's logits to fp16 noise; generating
    freely, every decode step of every compressed layer goes through the kernel, and the two choose the same greedy
    tokens up to a step where the PyTorch path's top two logits are closer than that noise (a tie the rounding may
    break either way; after it the sequences differ). Returns what it measured."""
    prompt = ids.shape[1]
    t_plain, s_plain = greedy(model, ids, TinyKVCache.for_model(model, fused_attention=False), steps)
    s_forced = forced_logits(model, TinyKVCache.for_model(model, fused_attention=True), t_plain, prompt)
    finite = s_plain.isfinite()  # (min_new_tokens masks the end-of-text token)
    noise, scale = (s_forced[finite] - s_plain[finite]).abs().max().item(), s_plain[finite].abs().max().item()
    assert noise < 2e-2 * scale, (noise, scale)
    cache = TinyKVCache.for_model(model, fused_attention=True)
    with counted_launches() as launches: t_fused, _ = greedy(model, ids, cache, steps)
    fused_layers = sum(getattr(layer, "fused", False) for layer in cache.layers)
    assert fused_layers and launches[0] == (steps - 1) * fused_layers, (launches[0], steps, fused_layers)
    top2 = s_plain.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]  # [B, steps]
    first_differences = []  # per row: (step, the PyTorch path's top-two margin there), or None
    for b in range(len(ids)):
        step = first_divergence(t_fused[b, prompt:], t_plain[b, prompt:])
        first_differences.append((step, margin[b, step].item()) if step < steps else None)
        if step < steps: assert margin[b, step] <= 2 * noise, (b, first_differences[-1], noise)
    no_ties = (margin > 2 * noise).float().mean().item()
    assert no_ties > 0.9  # the check above has teeth: most steps are no ties
    return dict(noise=noise, scale=scale, launches=launches[0], fused_layers=fused_layers,
                first_differences=first_differences, no_ties=no_ties)


def text_prompts(tokenizer, batch, tokens):
    "`[batch, tokens]` ids of real text (the pydoc topics, on every machine): each row its own stretch of it."
    text = sample_text()
    ids = [tokenizer(text[i * 10 * tokens:(i + 1) * 10 * tokens], return_tensors="pt").input_ids[0, :tokens] for i in range(batch)]
    assert all(len(row) == tokens for row in ids), "the text is too short for that many tokens"
    return torch.stack(ids)
