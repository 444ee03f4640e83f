"Helpers shared by the GPU tests (not collected: no tests here)."
import torch
from tiny_turboquant.models import cache_kwargs


@torch.no_grad()
def forced_logits(model, cache, tokens, prompt):
    "The next-token logits `[B, steps, vocab]` after each of `tokens[:, prompt - 1:-1]`, one decode step at a time."
    logits = [model(tokens[:, :prompt], **cache_kwargs(model, cache)).logits[:, -1]]
    for t in range(prompt, tokens.shape[1] - 1):
        logits.append(model(tokens[:, t:t + 1], **cache_kwargs(model, cache)).logits[:, -1])
    return torch.stack(logits, 1).float()
