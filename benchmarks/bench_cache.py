"""Decode speed and bytes held: TinyKVCache against DynamicCache, in one run, at several contexts.

    python benchmarks/bench_cache.py [--model M] [--device cpu|cuda] [--dtype float32|float16|bfloat16]
                                     [--contexts 512,1024,2048,4096] [--steps 32] [--compression safe]

Writes benchmarks/results/cache_<device>.json. Each context is prefilled once per cache, then `--steps` single-token
decode steps are timed (median ms per step; CUDA synchronized around each step). Bytes held come from
`memory_report`, which counts the storage of every tensor either cache holds.
"""
import argparse, json, platform, statistics, time, warnings
from pathlib import Path
import torch, transformers
from transformers import DynamicCache
from tqdm import tqdm
from tiny_turboquant.cache import TinyKVCache, PRESETS, memory_report
from tiny_turboquant.models import cache_kwargs, load_model, sample_text


def time_decode(model, ids, cache, steps):
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    out = model(ids, **cache_kwargs(model, cache))
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        sync(); t0 = time.perf_counter()
        nxt = model(nxt, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        sync(); times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--contexts", default="512,1024,2048,4096")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--compression", default="safe", choices=list(PRESETS))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    warnings.simplefilter("ignore", FutureWarning)
    torch.set_grad_enabled(False)
    model, tok = load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    ids_all = tok(sample_text(), return_tensors="pt")["input_ids"].to(a.device)
    rows = []
    for ctx in tqdm([int(c) for c in a.contexts.split(",")], desc="contexts", file=None):
        ids = ids_all[:, :ctx]
        dyn, tiny = DynamicCache(config=model.config), TinyKVCache.for_model(model, a.compression)
        ms_dyn, ms_tiny = time_decode(model, ids, dyn, a.steps), time_decode(model, ids, tiny, a.steps)
        dyn_bytes, tiny_bytes = memory_report(dyn).held_bytes, memory_report(tiny).held_bytes
        rows.append(dict(context=ctx, dynamic_ms_per_token=ms_dyn, tiny_ms_per_token=ms_tiny, time_ratio=ms_tiny / ms_dyn,
                         dynamic_bytes=dyn_bytes, tiny_bytes=tiny_bytes, memory_ratio=dyn_bytes / tiny_bytes))
        tqdm.write(f"{ctx:6d} tokens: DynamicCache {ms_dyn:7.2f} ms/token, TinyKVCache {ms_tiny:7.2f} ms/token "
                   f"({ms_tiny / ms_dyn:.2f}x); bytes {rows[-1]['memory_ratio']:.2f}x fewer")
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or platform.machine()
    res = dict(model=a.model or "SmolLM2-135M-Instruct (embedded)", compression=a.compression, dtype=a.dtype, device=a.device,
               device_name=device_name, cpu_threads=torch.get_num_threads(), steps=a.steps,
               versions=dict(torch=torch.__version__, transformers=transformers.__version__), rows=rows)
    out = Path(a.out or Path(__file__).parent / "results" / f"cache_{a.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
