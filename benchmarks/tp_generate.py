"""One model loaded one way (one device, tensor parallel, or layers split over GPUs), generating with DynamicCache and TinyKVCache.

    python benchmarks/tp_generate.py --model CKPT --mode single --out single.json
    torchrun --nproc-per-node 2 benchmarks/tp_generate.py --model CKPT --mode tp --out tp.json
    python benchmarks/tp_generate.py --model CKPT --mode device_map --out split.json

`bench_multi_gpu.py` launches it (and so does tests/test_distributed.py, on the CPU over gloo). It writes one JSON
(from rank 0): greedy tokens of `model.generate` from a seeded random prompt with each cache, the placement of every
cache layer (device, heads, bytes) on every rank, bytes per device on every rank; with `--logits`, the generated
steps' logits (a .pt file) for comparison across runs; with `--contexts`, decode tokens/s after a prefill of each
context length, and the KV bytes and peak memory on every device.
"""
import argparse, json, os, time, warnings
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from tiny_turboquant.cache import TinyKVCache
from tiny_turboquant.distributed import all_ranks, check_cache_placement, kv_bytes_by_device, tp_local_heads

DTYPES = dict(float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16)
FUSED_CALLS = [0]


def count_fused_calls():
    "Count the fused kernel's launches (`tiny_attention` looks `_launch` up in its module on every decode step)."
    from tiny_turboquant import kernel
    original = kernel._launch
    def counted(*args, **kwargs):
        FUSED_CALLS[0] += 1
        return original(*args, **kwargs)
    kernel._launch = counted


def checkpoint_bytes(path):
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def load(args):
    dtype = DTYPES[args.dtype]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.mode == "tp":
        if world < 2: raise ValueError("--mode tp runs under torchrun with --nproc-per-node >= 2")
        from transformers import AutoConfig
        tp_local_heads(AutoConfig.from_pretrained(args.model), world)  # a clear error before transformers' reshape error
        with warnings.catch_warnings():  # 5.18+ prefers distributed_config=; tp_plan= works from 5.17 to 5.24 at least
            warnings.simplefilter("ignore", FutureWarning)
            model = AutoModelForCausalLM.from_pretrained(args.model, tp_plan="auto", dtype=dtype)
    elif world > 1:
        raise ValueError(f"--mode {args.mode} is one process; under torchrun use --mode tp")
    elif args.mode == "device_map":
        kw = {}
        if args.device == "cuda":  # "auto" fills GPU 0 first: cap it at about half the weights so the layers split
            n = torch.cuda.device_count()
            if n < 2: raise ValueError(f"--mode device_map needs 2 or more GPUs, found {n}")
            half = int(checkpoint_bytes(args.model) * 0.55)
            kw["max_memory"] = {0: half, **{i: torch.cuda.get_device_properties(i).total_memory * 9 // 10 for i in range(1, n)}}
        model = AutoModelForCausalLM.from_pretrained(args.model, device_map="auto", dtype=dtype, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    model.eval()
    if args.attn: model.set_attn_implementation(args.attn)
    return model


def make_cache(model, kind, args):
    if kind == "dynamic": return DynamicCache(config=model.config)
    return TinyKVCache.for_model(model, args.compression, residual_length=args.residual_length, block_size=args.block_size,
                                 fused_attention=None if args.fused == "auto" else args.fused == "on")


def input_device(model):
    return model.get_input_embeddings().weight.device


def gpus_of(model):
    "The CUDA devices this process computes on (a rank touches only its own GPU under tensor parallelism)."
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def synchronize(model):
    for d in gpus_of(model): torch.cuda.synchronize(d)


@torch.no_grad()
def generate(model, kind, args, logits_out):
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(input_device(model))
    cache, calls = make_cache(model, kind, args), FUSED_CALLS[0]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=args.new_tokens,
                         min_new_tokens=args.new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    placement = [vars(p) for p in check_cache_placement(model, cache)]
    if logits_out is not None: logits_out[kind] = torch.stack(out.logits, 1)[0].float().cpu()
    return dict(tokens=out.sequences[0, args.prompt_tokens:].tolist(), placement=all_ranks(placement),
                fused_kernel_calls=all_ranks(FUSED_CALLS[0] - calls),
                kv_bytes_per_rank=all_ranks(kv_bytes_by_device(cache)))


@torch.no_grad()
def decode_speed(model, kind, context, args):
    "Prefill `context` random tokens, then time `args.steps` greedy one-token steps."
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    ids = ids.to(input_device(model))
    cache, calls = make_cache(model, kind, args), FUSED_CALLS[0]
    for d in gpus_of(model): torch.cuda.reset_peak_memory_stats(d)
    logits = model(ids, past_key_values=cache, logits_to_keep=1, use_cache=True).logits
    del ids
    tokens, step = [], logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(args.warmup):
        step = model(step, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(step.item())
    synchronize(model)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step = model(step, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(step.item())  # .item() synchronizes, as a real decode loop must to stop at EOS
    synchronize(model)
    seconds = time.perf_counter() - t0
    row = dict(cache=kind, context=context, steps=args.steps, tokens_per_s=args.steps / seconds,
               ms_per_token=seconds / args.steps * 1e3, decode_tokens=tokens, fused_kernel_calls=all_ranks(FUSED_CALLS[0] - calls),
               kv_bytes_per_rank=all_ranks(kv_bytes_by_device(cache)),  # peak: prefill and decode, transients included
               peak_bytes_per_rank=all_ranks({str(d): torch.cuda.max_memory_allocated(d) for d in gpus_of(model)}))
    del cache
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a local checkpoint folder (safetensors)")
    ap.add_argument("--mode", choices=("single", "tp", "device_map"), required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    ap.add_argument("--attn", default="sdpa", help="attention implementation to start from ('' keeps the model's)")
    ap.add_argument("--compression", default="safe")
    ap.add_argument("--fused", choices=("auto", "on", "off"), default="auto", help="TinyKVCache's fused decode kernel")
    ap.add_argument("--residual-length", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--contexts", default="", help="comma-separated context lengths to time decoding at, e.g. 16384,65536")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--logits", help="write the generated steps' logits here (.pt, from rank 0)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    # past_key_values= is what transformers 5.17 (on the GPU machine) takes; 5.24 renamed it cache= and warns
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    count_fused_calls()
    model = load(args)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    logits = {} if args.logits else None
    result = dict(mode=args.mode, model=args.model, dtype=args.dtype, device=args.device,
                  world_size=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                  attention=model.config._attn_implementation, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                  cache_settings=dict(compression=args.compression, residual_length=args.residual_length,
                                      block_size=args.block_size, fused=args.fused),
                  generate={kind: generate(model, kind, args, logits) for kind in ("dynamic", "tiny")})
    result["decode"] = [decode_speed(model, kind, context, args)
                        for context in (int(c) for c in args.contexts.split(",") if c) for kind in ("dynamic", "tiny")]
    if rank == 0:
        if logits is not None: torch.save(logits, args.logits)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
