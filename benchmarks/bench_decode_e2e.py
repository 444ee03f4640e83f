"""Whole decode steps of an 8-layer random-weight model with Llama-3-8B shapes, bf16, batch 8 (or --batch): TinyKVCache against DynamicCache.

    python benchmarks/bench_decode_e2e.py        # writes benchmarks/results/kernel_e2e_h200.json
    python benchmarks/bench_decode_e2e.py --batch 1 --out benchmarks/results/kernel_e2e_h200_b1.json

Each cache is filled with `context` random keys and values per layer (a prefill of 64k x 8 tokens would only add
time), then after 5 untimed steps (and, once per process, a discarded 4k run of every cache) `--steps` greedy decode
steps are timed: wall time (host clock, synchronized), GPU time between CUDA
events around the loop, and the sum of the GPU kernels' own durations from the torch profiler (busy time, which
excludes the gaps where the GPU waits for Python). Peak memory is torch's peak allocation during the decode steps,
transient buffers included. TinyKVCache runs with the fused kernel (the default on CUDA) and without it (its
PyTorch path: dequantize, then SDPA), and with its steps replayed from CUDA graphs (`tiny-graph`, 12_cuda_graph:
`--graph-steps` steps, so that the wall time includes the capture each 128-token period pays).
transformers' QuantizedCache (quanto) is timed if quanto is installed.
"""
import argparse, datetime, json, time
from pathlib import Path
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from tiny_turboquant.cache import TinyKVCache, memory_report
from tiny_turboquant.eval import parse_method, peer_unavailable
from tiny_turboquant import kernel
from tiny_turboquant.kernel import build_kernel
from tiny_turboquant.graphs import GraphDecoder

B, LAYERS = 8, 8
FUSED = ("tiny-fused", "tiny-graph")  # the kinds that decode through the fused kernel
GRAPH_STEPS = 256  # two periods of 128 steps, so the graph row's wall time includes its captures


def make_model():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=LAYERS, vocab_size=128256, max_position_embeddings=131072 + 1024,
                      rope_theta=500000.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.eval()
    model.set_attn_implementation("sdpa")
    return model


def filled_cache(model, kind, context):
    torch.manual_seed(0)
    if kind == "dynamic": cache = DynamicCache()
    elif kind == "quanto": cache = parse_method("quanto:4").make(model)  # transformers' QuantizedCache, int4
    else: cache = TinyKVCache.for_model(model, fused_attention=kind in FUSED)
    if kind not in FUSED: model.set_attn_implementation("sdpa")
    for i in range(LAYERS):
        k = torch.randn(B, 8, context, 128, device="cuda", dtype=torch.bfloat16)
        cache.update(k, torch.randn_like(k), i)
        del k
    return cache


@torch.no_grad()
def run(model, kind, context, steps):
    cache = filled_cache(model, kind, context)
    ids = torch.randint(0, model.config.vocab_size, (B, 1), device="cuda")
    def step(ids):
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    if kind == "tiny-graph":
        for layer in cache.layers: layer.history.reserve(context + 2 * GRAPH_STEPS)  # as generate() would, after prefill
        decoder = GraphDecoder(model, cache)
        steps = max(steps, GRAPH_STEPS)
        def decode(ids, n): return decoder.decode(ids, n)[:, -1:]
    else:
        def decode(ids, n):
            for _ in range(n): ids = step(ids)
            return ids
    ids = decode(ids, 5)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter(); a.record()
    ids = decode(ids, steps)
    b.record(); torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    gpu = a.elapsed_time(b) / steps
    peak = torch.cuda.max_memory_allocated()
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ids = decode(ids, 16)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 16 / 1e3
    held = memory_report(cache).held_bytes
    row = dict(cache=kind, context=context, batch=B, layers=LAYERS, steps=steps, wall_ms_per_token=wall,
               gpu_ms_per_token=gpu, gpu_busy_ms_per_token=busy, kv_bytes=held, peak_bytes=peak,
               resident_before_decode_bytes=base, transient_peak_bytes=peak - base,
               **({"graph_captures": decoder.captures} if kind == "tiny-graph" else {}))
    del cache
    torch.cuda.empty_cache()
    return row


def quanto_note(runs, error):
    "What the JSON says of transformers' QuantizedCache: timed (where it ran) and why it was not (where it was not)."
    if any(r["cache"] == "quanto" for r in runs):
        return "timed: transformers' QuantizedCache, quanto int4 (runs of cache 'quanto')" + (f"; failed {error}" if error else "")
    return f"not measured: {error}; tiny-pytorch is the dequantize-then-SDPA strategy"


def main():
    global GRAPH_STEPS, B
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_e2e_h200.json"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=B)
    ap.add_argument("--graph-steps", type=int, default=GRAPH_STEPS, help="steps of the tiny-graph row (captures included)")
    ap.add_argument("--contexts", default="16384,65536")
    ap.add_argument("--define", action="append", default=[], help="kernel variant macro, e.g. TT_STAGES=4")
    args = ap.parse_args()
    kernel.KERNEL_DEFINES = tuple(args.define)
    build_kernel(defines=args.define)
    model = make_model()
    runs = []
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    quanto_missing = peer_unavailable("quanto")
    GRAPH_STEPS, B = args.graph_steps, args.batch
    kinds = ("dynamic", "tiny-fused", "tiny-graph", "tiny-pytorch") + (() if quanto_missing else ("quanto",))
    quanto_error = None
    for kind in kinds:  # warm-up, discarded: a process's first runs pay one-time costs (quanto builds its kernels)
        try: run(model, kind, 4096, 3)
        except Exception as e:
            if kind != "quanto": raise
            quanto_error = f"{type(e).__name__}: {e}"[:300]  # a peer's failure ends no run
            torch.cuda.empty_cache()
    if quanto_error: kinds = kinds[:-1]
    for context in map(int, args.contexts.split(",")):
        for kind in kinds:
            try: r = run(model, kind, context, args.steps)
            except Exception as e:
                if kind != "quanto": raise
                quanto_error = f"at {context} tokens: {type(e).__name__}: {e}"[:300]
                torch.cuda.empty_cache()
                continue
            runs.append(r)
            out.with_suffix(".partial.json").write_text(json.dumps(runs, indent=1))
            print(f"ctx {context:6} {kind:13}: wall {r['wall_ms_per_token']:8.2f} ms/token, GPU {r['gpu_ms_per_token']:8.2f}, "
                  f"busy {r['gpu_busy_ms_per_token']:8.2f}, KV {r['kv_bytes'] / 2**30:6.2f} GiB, "
                  f"peak {r['peak_bytes'] / 2**30:6.2f} GiB (transient {r['transient_peak_bytes'] / 2**30:5.2f})", flush=True)
    summary = []
    for context in map(int, args.contexts.split(",")):
        by = {r["cache"]: r for r in runs if r["context"] == context}
        d, t = by["dynamic"], by["tiny-fused"]
        summary.append(dict(context=context, wall_speedup_vs_dynamic=d["wall_ms_per_token"] / t["wall_ms_per_token"],
                            gpu_busy_speedup_vs_dynamic=d["gpu_busy_ms_per_token"] / t["gpu_busy_ms_per_token"],
                            kv_ratio_vs_dynamic=d["kv_bytes"] / t["kv_bytes"], peak_ratio_vs_dynamic=d["peak_bytes"] / t["peak_bytes"],
                            fused_speedup_vs_pytorch_path=by["tiny-pytorch"]["wall_ms_per_token"] / t["wall_ms_per_token"],
                            graph_wall_speedup_vs_dynamic=d["wall_ms_per_token"] / by["tiny-graph"]["wall_ms_per_token"],
                            graph_wall_speedup_vs_eager=t["wall_ms_per_token"] / by["tiny-graph"]["wall_ms_per_token"],
                            **({} if "quanto" not in by else dict(
                                wall_speedup_vs_quanto=by["quanto"]["wall_ms_per_token"] / t["wall_ms_per_token"],
                                gpu_busy_speedup_vs_quanto=by["quanto"]["gpu_busy_ms_per_token"] / t["gpu_busy_ms_per_token"],
                                graph_wall_speedup_vs_quanto=by["quanto"]["wall_ms_per_token"] / by["tiny-graph"]["wall_ms_per_token"]))))
        print(summary[-1])
    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  model="LlamaForCausalLM, Llama-3-8B shapes (4096 hidden, 32/8 heads, head_dim 128), 8 layers, random weights, bf16",
                  kernel_defines=args.define, runs=runs, summary=summary,
                  cuda_graph=f"tiny-graph: GraphDecoder (12_cuda_graph), {GRAPH_STEPS} steps per timed run, captures included",
                  quantized_cache=quanto_note(runs, quanto_missing or quanto_error))
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".partial.json").unlink()
    print("wrote", out)


if __name__ == "__main__":
    main()
