"""Run the fused kernel on one shape a few times, for a profiler (`ncu`) to look at; prints its time. `--breakdown`
instead times each of the two kernels of a call (torch's profiler, CUPTI) over several shapes, next to a whole call
replayed from a CUDA graph and the floor of any two-kernel call (two empty kernels in a graph), and writes JSON.

    ncu --clock-control none --set full -k regex:quantized_kernel -c 1 python benchmarks/profile_kernel.py --batch 8 --context 65536
    python benchmarks/profile_kernel.py --breakdown     # writes benchmarks/results/kernel_h200_breakdown.json
"""
import argparse, json, re
from pathlib import Path
import torch
from tiny_turboquant.kernel import fused_decode_attention, build_kernel
from bench_kernel import SHAPES, random_history, median_us, graph_us

BREAKDOWN_SHAPES = [("llama3-8b", 1, 4096), ("llama3-8b", 1, 16384), ("llama3-8b", 1, 65536), ("qwen2.5-7b", 1, 16384),
                    ("llama3-8b", 8, 16384), ("llama3-8b", 8, 65536), ("llama3-8b", 32, 16384), ("llama3-8b", 32, 65536)]


def short_name(kernel):
    "'quantized_kernel' from 'void (anonymous namespace)::quantized_kernel<128, 4, 4>(DecodeParams)'."
    kernel = kernel.replace("(anonymous namespace)::", "").removeprefix("void ")
    m = re.match(r"\s*([A-Za-z_][\w:]*)", kernel)
    return (m.group(1) if m else kernel).split("::")[-1]


def kernel_us(f, reps):
    "Median GPU time of each kernel `f` launches, by kernel name (short), from torch's profiler."
    from torch.profiler import profile, ProfilerActivity
    for _ in range(3): f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps): f()
        torch.cuda.synchronize()
    times = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = short_name(e.name)
            times.setdefault(name, []).append(e.device_time if hasattr(e, "device_time") else e.cuda_time)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def breakdown(reps, defines, out):
    build_kernel(defines=defines)
    x = torch.zeros(1, device="cuda")
    floor = graph_us(lambda: (x.add_(1), x.add_(1)), reps)  # two tiny kernels: what any split + combine call costs at least
    rows = []
    for shape, B, ctx in BREAKDOWN_SHAPES:
        Hq, Hkv, D = SHAPES[shape]
        h = random_history(B, Hkv, D, ctx, 4, 4)
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
        f = lambda: fused_decode_attention(q, h, defines=defines)
        row = dict(shape=shape, batch=B, context=ctx, graph_us=graph_us(f, reps), kernels_us=kernel_us(f, reps))
        print(row, flush=True)
        rows.append(row)
        del h
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, defines=list(defines),
                  two_empty_kernels_graph_us=floor, rows=rows)
    print("two empty kernels in a graph:", floor, "us")
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--bits", default="4/4")
    ap.add_argument("--define", action="append", default=[], help="kernel variant macro, e.g. TT_STAGES=4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true", help="per-kernel times over several shapes, written as JSON")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_h200_breakdown.json"))
    args = ap.parse_args()
    if args.breakdown:
        breakdown(max(args.reps, 20), tuple(args.define), args.out)
    else:
        Hq, Hkv, D = SHAPES[args.shape]
        h = random_history(args.batch, Hkv, D, args.context, *map(int, args.bits.split("/")))
        q = torch.randn(args.batch, Hq, 1, D, device="cuda", dtype=torch.float16)
        t = median_us(lambda: fused_decode_attention(q, h, defines=tuple(args.define)), args.reps)
        print(f"{args.shape} B={args.batch} ctx={args.context} K/V {args.bits} {args.define}: {t:.1f} us")
