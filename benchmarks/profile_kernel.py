"""Run the fused kernel on one shape a few times, for a profiler (`ncu`) to look at; prints its time. `--breakdown`
instead times each of the two kernels of a call (torch's profiler, CUPTI) over several shapes, next to a whole call
replayed from a CUDA graph and the floor of any two-kernel call (two empty kernels in a graph), and writes JSON.

    ncu --clock-control none --set full -k regex:quantized_kernel -c 1 python benchmarks/profile_kernel.py --batch 8 --context 65536
    python benchmarks/profile_kernel.py --breakdown     # writes benchmarks/results/kernel_h200_breakdown.json

`--summarize RAW SASS` condenses what `ncu --import prof.ncu-rep --page raw --csv` and `--page source --csv
--print-source sass` print (no GPU needed) into a small JSON: why the warps stalled, per issued instruction, and how
many instructions ran per 32-token chunk in each part of the kernel (the parts told apart by how often they ran).
"""
import argparse, collections, csv, json, re
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


def ncu_number(x):
    x = x.replace(",", "")
    try: return float(x)
    except ValueError: return 0.0


def summarize_ncu(raw_csv, sass_csv, chunks):
    "Stall reasons and executed instructions of one profiled launch (ncu CSV exports), per 32-token chunk of `chunks`."
    raw = list(csv.reader(open(raw_csv)))
    metrics, units = dict(zip(raw[0], raw[2])), dict(zip(raw[0], raw[1]))
    prefix = "smsp__average_warps_issue_stalled_"
    stalls = {k[len(prefix):].removesuffix("_per_issue_active.ratio"): ncu_number(v) for k, v in metrics.items()
              if k.startswith(prefix) and k.endswith("_per_issue_active.ratio") and ncu_number(v) >= 0.01}
    rows = list(csv.reader(open(sass_csv)))
    header = rows[1]
    col = {h: i for i, h in enumerate(header)}
    runs = collections.Counter()  # instructions per execution count: each part of the kernel runs a fixed number of times
    for r in rows[2:]:
        if len(r) == len(header): runs[ncu_number(r[col["Instructions Executed"]])] += 1
    parts = [dict(executions=int(e), instructions=n, per_chunk=round(e * n / chunks, 1))
             for e, n in sorted(runs.items(), key=lambda kv: -kv[0] * kv[1])[:6]]
    pick = lambda name: ncu_number(metrics.get(name, "0"))
    return dict(stalled_warps_per_issued_instruction=dict(sorted(stalls.items(), key=lambda kv: -kv[1])),
                warps_per_scheduler=pick("smsp__warps_active.avg.per_cycle_active"),
                issue_slots_busy_pct=pick("smsp__issue_active.avg.pct_of_peak_sustained_active"),
                dram_read=f"{metrics.get('dram__bytes_read.sum.per_second')} {units.get('dram__bytes_read.sum.per_second')}",
                instructions_per_chunk=round(pick("smsp__inst_executed.sum") / chunks, 1), parts_by_executions=parts)


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
    ap.add_argument("--summarize", nargs=2, metavar=("RAW_CSV", "SASS_CSV"), help="condense ncu's CSV exports of one launch")
    args = ap.parse_args()
    if args.summarize:
        Hq, Hkv, D = SHAPES[args.shape]
        summary = dict(shape=args.shape, batch=args.batch, context=args.context, bits=args.bits,
                       **summarize_ncu(*args.summarize, chunks=args.batch * Hkv * args.context // 32))
        print(json.dumps(summary, indent=1))
        if args.out != ap.get_default("out"): Path(args.out).write_text(json.dumps(summary, indent=1))
    elif args.breakdown:
        breakdown(max(args.reps, 20), tuple(args.define), args.out)
    else:
        Hq, Hkv, D = SHAPES[args.shape]
        h = random_history(args.batch, Hkv, D, args.context, *map(int, args.bits.split("/")))
        q = torch.randn(args.batch, Hq, 1, D, device="cuda", dtype=torch.float16)
        t = median_us(lambda: fused_decode_attention(q, h, defines=tuple(args.define)), args.reps)
        print(f"{args.shape} B={args.batch} ctx={args.context} K/V {args.bits} {args.define}: {t:.1f} us")
