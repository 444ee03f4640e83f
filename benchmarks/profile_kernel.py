"""Run the fused kernel on one shape a few times, for a profiler (`ncu`) to look at; prints its time.

    ncu --clock-control none --set full -k regex:quantized_kernel -c 1 python benchmarks/profile_kernel.py --batch 8 --context 65536
"""
import argparse
import torch
from tiny_turboquant.kernel import fused_decode_attention
from bench_kernel import SHAPES, random_history, median_us

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--context", type=int, default=65536)
ap.add_argument("--bits", default="4/4")
ap.add_argument("--define", action="append", default=[], help="kernel variant macro, e.g. TT_STAGES=4")
ap.add_argument("--reps", type=int, default=3)
args = ap.parse_args()
Hq, Hkv, D = SHAPES[args.shape]
h = random_history(args.batch, Hkv, D, args.context, *map(int, args.bits.split("/")))
q = torch.randn(args.batch, Hq, 1, D, device="cuda", dtype=torch.float16)
t = median_us(lambda: fused_decode_attention(q, h, defines=tuple(args.define)), args.reps)
print(f"{args.shape} B={args.batch} ctx={args.context} K/V {args.bits} {args.define}: {t:.1f} us")
