"""One decode step of attention, one layer: the fused kernel against fp16 SDPA and dequantize + SDPA, on a CUDA GPU.

    python benchmarks/bench_kernel.py                      # writes benchmarks/results/kernel_h200.json and .png

Shapes: Llama-3-8B (32 query / 8 KV heads) and Qwen2.5-7B (28 / 4), head_dim 128; batch 1, 8, 32; contexts 4k, 16k,
64k, 128k. The cache is filled with random codes, scales and a full window (random data: timing does not depend on
values). A layer-step is timed as a decode step meets it: `layers` calls, each over its own layer's data (at least 2 GB
in all, so no layer finds its data in L2), captured back to back in one CUDA graph; the time per call is the graph's
time over `layers` (GPU time without the host's launch overhead, and without the graph's own launch latency, 11-19 us,
on each call; `ours_eager_us` is one eager call, host included). In the same run: the device-to-device copy bandwidth
(bytes read + written), torch SDPA over fp16 K/V
(with enable_gqa, and with the query heads of a KV head packed as queries; the faster is the fp16 floor), dequantize
+ SDPA (what a quantized cache without a kernel does each step, timed eagerly), and, where quanto is installed,
transformers' QuantizedCache (quanto int4: append one token, attend; on the rows that time dequantize + SDPA). Each time is the median of `--reps` calls timed with CUDA events after warm-up.

    python benchmarks/bench_kernel.py --variant old=TT_KEY_INPLACE=0,TT_FOLD=0 --variant s4=TT_STAGES=4
    python benchmarks/bench_kernel.py --batches 8 --contexts 16384,65536 --bits 4/4   # a subset

also times other builds of the kernel (comma-separated macros) on the same data in the same run, with their error
against the float64 reference where it is computed; they land in each row's `variants`.
"""
import argparse, datetime, json, platform
from pathlib import Path
import torch
import torch.nn.functional as F
from tiny_turboquant.window import CompressedKV
from tiny_turboquant.kernel import fused_decode_attention, reference_decode_attention, build_kernel
from tiny_turboquant.eval import peer_unavailable

SHAPES = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}
SHAPES_BY_HEADS = {(hq, d): hkv for hq, hkv, d in SHAPES.values()}
QUANTO_ERRORS = []  # why quanto's QuantizedCache could not be timed, where it could not


def median_us(f, reps):
    for _ in range(3): f()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def graph_us(f, reps):
    "Median time of one replay of `f` captured in a CUDA graph: GPU time without the host's launch overhead."
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2): f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): f()
    return median_us(g.replay, reps)


def layer_count(bytes_per_layer):
    "How many layers to time back to back: at least 2 GB of distinct data (L2 holds 50-60 MB), 2 to 32 layers."
    return int(min(32, max(2, -(-2**31 // bytes_per_layer))))


def per_layer_us(calls, reps):
    "Median time per call of `calls` (one per layer) replayed back to back from one CUDA graph."
    return graph_us(lambda: [f() for f in calls], reps) / len(calls)


def copy_GBps(reps):
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
    t = median_us(lambda: y.copy_(x), reps)
    return 2 * x.numel() / t / 1e3


def random_history(B, Hkv, D, tokens, key_bits, value_bits, dtype=torch.float16, window=128):
    "A CompressedKV of `tokens` tokens (whole blocks quantized, `window` in full precision) filled with random data."
    h = CompressedKV(key_bits, value_bits)
    n = (tokens - window) // 128 * 128
    dev = "cuda"
    h.key_codes = torch.randint(0, 256, (B, Hkv, n, D * key_bits // 8), dtype=torch.uint8, device=dev)
    h.value_codes = torch.randint(0, 256, (B, Hkv, n, D * value_bits // 8), dtype=torch.uint8, device=dev)
    h.key_scale = (torch.rand(B, Hkv, n // 128, D, device=dev) * 0.2 + 0.01).to(dtype)
    h.key_zero = (torch.randn(B, Hkv, n // 128, D, device=dev) - 1).to(dtype)
    h.value_scale = (torch.rand(B, Hkv, n, 1, device=dev) * 0.2 + 0.01).to(dtype)
    h.value_zero = (torch.randn(B, Hkv, n, 1, device=dev) - 1).to(dtype)
    h.window_keys = torch.randn(B, Hkv, tokens - n, D, device=dev, dtype=dtype)
    h.window_values = torch.randn(B, Hkv, tokens - n, D, device=dev, dtype=dtype)
    return h


def quanto_layer_step(q, context, device="cuda"):
    "One decode layer-step through transformers' QuantizedCache (quanto, int4) holding `context` fp16 tokens: append, attend."
    from types import SimpleNamespace
    from transformers import LlamaConfig
    from tiny_turboquant.eval import parse_method
    B, Hq, _, D = q.shape
    Hkv = SHAPES_BY_HEADS[(Hq, D)]
    cfg = LlamaConfig(num_hidden_layers=1, num_attention_heads=Hq, num_key_value_heads=Hkv, hidden_size=Hq * D)
    cache = parse_method("quanto:4").make(SimpleNamespace(config=cfg))
    k = torch.randn(B, Hkv, context, D, device=device, dtype=q.dtype)
    cache.update(k, torch.randn_like(k), 0)
    del k
    k1, v1 = torch.randn(B, Hkv, 1, D, device=device, dtype=q.dtype), torch.randn(B, Hkv, 1, D, device=device, dtype=q.dtype)
    def step():
        kk, vv = cache.update(k1, v1, 0)
        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
    return step


def bench_one(shape, B, context, bits, reps, copy_bw, with_dequant, defines=(), variants=()):
    Hq, Hkv, D = SHAPES[shape]
    G = Hq // Hkv
    h = random_history(B, Hkv, D, context, *bits)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
    layers = [h] + [random_history(B, Hkv, D, context, *bits) for _ in range(layer_count(h.nbytes()) - 1)]
    attend = lambda: fused_decode_attention(q, h, defines=defines)
    attend_all = lambda defs: [lambda hl=hl: fused_decode_attention(q, hl, defines=defs) for hl in layers]
    out = attend()
    err = ref = None
    rel_err = lambda o: ((o.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    if B * Hkv * context <= 8 * 8 * 16384:  # the float64 reference needs memory; check the smaller shapes
        ref = reference_decode_attention(q, h)
        err = rel_err(out)
    t_ours_eager = median_us(attend, reps)
    t_ours = per_layer_us(attend_all(defines), reps)
    ours_bytes = h.nbytes() + 2 * q.numel() * q.element_size()
    timed_variants = {}
    for name, vdefs in variants:
        f = lambda: fused_decode_attention(q, h, defines=vdefs)
        t = per_layer_us(attend_all(vdefs), reps)
        timed_variants[name] = dict(defines=list(vdefs), us=t, GBps=ours_bytes / t / 1e3, fraction_of_copy=ours_bytes / t / 1e3 / copy_bw,
                                    max_rel_error=rel_err(f()) if ref is not None else None)
    ref = None
    n_layers = len(layers)
    del layers, attend_all
    torch.cuda.empty_cache()
    kv_bytes = 2 * B * Hkv * context * D * 2
    kvs = [(torch.randn(B, Hkv, context, D, device="cuda", dtype=torch.float16),
            torch.randn(B, Hkv, context, D, device="cuda", dtype=torch.float16)) for _ in range(layer_count(kv_bytes))]
    t_gqa = per_layer_us([lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for k, v in kvs], reps)
    qp = q.reshape(B, Hkv, G, D)
    t_packed = per_layer_us([lambda k=k, v=v: F.scaled_dot_product_attention(qp, k, v) for k, v in kvs], reps)
    sdpa_layers = len(kvs)
    del kvs
    torch.cuda.empty_cache()
    t_deq = None
    if with_dequant:
        def dequant_sdpa():
            kk, vv = h.dequantized()
            return F.scaled_dot_product_attention(qp, kk, vv)
        t_deq = median_us(dequant_sdpa, max(5, reps // 4))
    t_quanto = None
    if with_dequant and peer_unavailable("quanto") is None:
        try: t_quanto = median_us(quanto_layer_step(q, context), max(5, reps // 4))
        except Exception as e: QUANTO_ERRORS.append(f"{type(e).__name__}: {e}"[:300])  # a peer's failure ends no run
        torch.cuda.empty_cache()
    t_sdpa = min(t_gqa, t_packed)
    for v in timed_variants.values(): v["speedup_vs_sdpa"] = t_sdpa / v["us"]
    fp16_bytes = 2 * B * Hkv * context * D * 2 + 2 * q.numel() * q.element_size()
    row = dict(shape=shape, batch=B, context=context, bits=f"K{bits[0]}/V{bits[1]}", heads=f"{Hq}/{Hkv}", head_dim=D,
               layers=n_layers, sdpa_layers=sdpa_layers,
               ours_us=t_ours, ours_eager_us=t_ours_eager, sdpa_us=t_sdpa, sdpa_gqa_us=t_gqa, sdpa_packed_us=t_packed, dequant_sdpa_us=t_deq, quanto_us=t_quanto,
               speedup_vs_sdpa=t_sdpa / t_ours, ours_bytes=ours_bytes, fp16_bytes=fp16_bytes,
               ours_GBps=ours_bytes / t_ours / 1e3, sdpa_GBps=fp16_bytes / t_sdpa / 1e3,
               fraction_of_copy=ours_bytes / t_ours / 1e3 / copy_bw, sdpa_fraction_of_copy=fp16_bytes / t_sdpa / 1e3 / copy_bw,
               max_rel_error=err,
               variants=timed_variants)
    del h
    torch.cuda.empty_cache()
    return row


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for shape, style in (("llama3-8b", "-"), ("qwen2.5-7b", "--")):
        for B, color in ((1, "C0"), (8, "C1"), (32, "C2")):
            rows = sorted((r for r in result["attention"] if r["shape"] == shape and r["batch"] == B and r["bits"] == "K4/V4"),
                          key=lambda r: r["context"])
            if not rows: continue
            ctx = [r["context"] // 1024 for r in rows]
            axes[0].plot(ctx, [r["speedup_vs_sdpa"] for r in rows], style, color=color, marker="o", label=f"{shape} B={B}")
            axes[1].plot(ctx, [r["fraction_of_copy"] for r in rows], style, color=color, marker="o", label=f"{shape} B={B}")
    axes[0].axhline(2.5, color="gray", lw=0.8, ls=":"); axes[1].axhline(0.6, color="gray", lw=0.8, ls=":")
    for ax, title in zip(axes, ("speed-up of the 4-bit kernel over fp16 SDPA", "kernel bandwidth / measured copy bandwidth")):
        ax.set_xscale("log", base=2); ax.set_xlabel("context (k tokens)"); ax.set_title(title); ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"one attention layer-step, {result['device']}")
    fig.tight_layout(); fig.savefig(path, dpi=120)


def prepare_run(defines, variant_specs, reps):
    "Build the kernel and each variant (`NAME=MACRO,MACRO`), then measure the copy bandwidth: (variants, GB/s)."
    variants = [(v.split("=", 1)[0], tuple(d for d in v.split("=", 1)[1].split(",") if d)) for v in variant_specs]
    build_kernel(defines=defines)
    for _, vdefs in variants: build_kernel(defines=vdefs)
    copy_bw = copy_GBps(reps)
    print(f"device-to-device copy: {copy_bw:.0f} GB/s", flush=True)
    return variants, copy_bw


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_h200.json"))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--batches", default=None, help="only these batch sizes, e.g. 1,8")
    ap.add_argument("--contexts", default=None, help="only these contexts, e.g. 16384,65536")
    ap.add_argument("--bits", default=None, help="only these key/value bits, e.g. 4/4,4/2")
    ap.add_argument("--kernel-only", action="store_true", help="no dequantize + SDPA or quanto rows (SDPA fp16 still)")
    ap.add_argument("--define", action="append", default=[], help="kernel variant macro, e.g. TT_STAGES=4")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=MACROS",
                    help="also time this build on the same data, e.g. old=TT_KEY_INPLACE=0,TT_FOLD=0 or mt4=TT_MT=4,TT_STAGES=2")
    args = ap.parse_args()
    variants, copy_bw = prepare_run(args.define, args.variant, args.reps)
    configs = [(s, B, c, (4, 4)) for s in SHAPES for B in (1, 8, 32) for c in (4096, 16384, 65536, 131072)]
    configs += [("llama3-8b", 8, c, bits) for c in (16384, 65536) for bits in ((4, 2), (3, 3), (2, 2), (4, 3))]
    if args.quick: configs = [c for c in configs if c[1] == 8 and c[2] in (16384, 65536)]
    keep = lambda arg, value: arg is None or value in arg.split(",")
    configs = [c for c in configs if keep(args.batches, str(c[1])) and keep(args.contexts, str(c[2]))
               and keep(args.bits, f"{c[3][0]}/{c[3][1]}")]
    rows = []
    for shape, B, ctx, bits in configs:
        with_dequant = B * ctx <= 8 * 65536 and not (args.quick or args.kernel_only)
        r = bench_one(shape, B, ctx, bits, args.reps, copy_bw, with_dequant=with_dequant, defines=args.define,
                      variants=variants)
        rows.append(r)
        print(f"{shape:11} B={B:2} ctx={ctx:6} K{bits[0]}/V{bits[1]}: ours {r['ours_us']:8.1f} us ({r['ours_GBps']:5.0f} GB/s, "
              f"{r['fraction_of_copy']:.2f} of copy; eager {r['ours_eager_us']:6.1f}), SDPA fp16 {r['sdpa_us']:8.1f} us -> {r['speedup_vs_sdpa']:.2f}x"
              + (f", dequant+SDPA {r['dequant_sdpa_us']:8.1f} us" if r["dequant_sdpa_us"] else "")
              + (f", quanto QuantizedCache {r['quanto_us']:8.1f} us" if r["quanto_us"] else "")
              + (f", err {r['max_rel_error']:.1e}" if r["max_rel_error"] is not None else "")
              + "".join(f"; {n} {v['us']:.1f} us ({v['fraction_of_copy']:.2f})" for n, v in r["variants"].items()), flush=True)
        write(args, copy_bw, rows)  # after every shape, so a run cut short keeps what it measured
    write(args, copy_bw, rows, plot_it=True)


def write(args, copy_bw, rows, plot_it=False):
    quanto_missing = peer_unavailable("quanto")
    result = dict(
        device=torch.cuda.get_device_name(0), sms=torch.cuda.get_device_properties(0).multi_processor_count,
        torch=torch.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node(),
        copy_GBps=copy_bw, reps=args.reps, kernel_defines=args.define, variants=args.variant, attention=rows,
        quantized_cache=("quanto_us: transformers' QuantizedCache (quanto int4) appending one token and attending, on the "
                         "rows that also time dequantize + SDPA" + (f"; failed: {sorted(set(QUANTO_ERRORS))}" if QUANTO_ERRORS else "")
                         if not quanto_missing else
                         f"not measured: {quanto_missing}; dequant_sdpa_us is the same strategy (dequantize the history, "
                         "then SDPA) without quanto's own kernels"),
        notes="ours_bytes: codes + scales + zeros + window + query + output; fp16_bytes: K + V + query + output (one "
              "layer). Times per layer-step: `layers` (SDPA: `sdpa_layers`) calls over distinct data, back to back in one "
              "CUDA graph, divided by their number.")
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if plot_it:
        plot(result, out.with_suffix(".png"))
        print("wrote", out)


if __name__ == "__main__":
    main()
