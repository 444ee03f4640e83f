"""Where one call of the fused decode kernel spends its time: the phases of every thread block, stamped on the GPU.

    python benchmarks/trace_kernel.py                     # writes benchmarks/results/kernel_h200_trace.json
    python benchmarks/trace_kernel.py --before warm,data,cold --configs llama3-8b:1:16384 --out /tmp/t.json

Builds the kernel with TT_TRACE=1: thread 0 of each block of the split kernel stamps %globaltimer (nanoseconds, one
clock for every multiprocessor) and clock64 (the multiprocessor's cycles) at its start (0), once the query is staged
(1), after the window (2), when its warp's first chunk has landed (3), when its warp's loop is done (4), when every
warp's is (5) and when the block's partial is written (6), and once its first chunks' copies are asked for (slot 7,
between 0 and 1), with the multiprocessor it runs on (slot 8): blocks are also grouped by how many of the launch's
blocks share their multiprocessor (`by_blocks_per_multiprocessor`, when each group's loops end); each block of the
combine kernel stamps its start (with TT_PDL, once its wait is over) and end. %globaltimer's readings scatter by about
a microsecond (the clocks agree over the loops at ~1.75 GHz on an H200): read short phases in `phase_length_cycles`.
One eager call after warm-up, on random data (bench_kernel.random_history); `--before` also traces it after L2 is
evicted (`cold`), or evicted and the cache's tensors read back (`data`: its data in L2 where it fits, the code not).
Times are microseconds from the first block's start: when blocks start, when the phases end (medians and maxima over
blocks), and each phase's length per block from clock64 (the stamps cost a few instructions: 529 instead of 517 per
chunk in the main loop, no spills, by tools/sass_count.py -D TT_TRACE=1).
"""
import argparse, datetime, json
from pathlib import Path
import torch
from tiny_turboquant.kernel import build_kernel, fused_decode_attention
from bench_kernel import SHAPES, random_history

ASKED, SM = 7, 8  # slots: the first chunks' copies asked for (between start and query staged); the block's multiprocessor
PHASES = ["start", "query staged", "window", "first chunk landed", "loop done (warp 0)", "loop done (all warps)",
          "partial written"]


def quantiles(x):
    x = x.double()
    return {"min": x.min().item(), "median": x.median().item(), "p90": x.quantile(0.9).item(), "max": x.max().item()}


BEFORE = {"warm": "right after the warm-up calls (the data, if it fits, and the code in L2)",
          "cold": "after a 1 GB write that evicts L2 (data and code come from memory)",
          "data": "after the 1 GB write and a read of the cache's tensors (the data in L2 where it fits, the code not)"}


def trace_one(shape, B, context, defines, reps=3, before="warm"):
    "The phase stamps of one call (after `reps` warm-up calls and what `before` names), in us, summarised over blocks."
    Hq, Hkv, D = SHAPES[shape]
    h = random_history(B, Hkv, D, context, 4, 4)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
    ext = build_kernel(defines=defines)
    for _ in range(reps): fused_decode_attention(q, h, defines=defines)
    torch.cuda.synchronize(); ext.trace()
    if before in ("cold", "data"): torch.empty(2**30, dtype=torch.uint8, device="cuda").fill_(1)
    if before == "data":
        for t in (h.key_codes, h.key_scale, h.key_zero, h.value_codes, h.value_scale, h.value_zero, h.window_keys,
                  h.window_values, q):
            t.max()
    torch.cuda.synchronize()
    fused_decode_attention(q, h, defines=defines)
    torch.cuda.synchronize()
    clocks = ext.trace()
    if clocks is None: raise RuntimeError("the kernel was not built with TT_TRACE=1")
    SPLIT_BLOCKS, SPLIT_EVENTS = ext.TRACE_SPLIT_BLOCKS, ext.TRACE_SPLIT_EVENTS  # the slot layout, as the header has it
    ns, cycles = clocks[0], clocks[1]
    slots_ns = ns[:SPLIT_BLOCKS * SPLIT_EVENTS].view(SPLIT_BLOCKS, SPLIT_EVENTS)
    slots_cy = cycles[:SPLIT_BLOCKS * SPLIT_EVENTS].view(SPLIT_BLOCKS, SPLIT_EVENTS)
    split_ns, split_cy = slots_ns[:, :len(PHASES)], slots_cy[:, :len(PHASES)]
    asked_ns, sm_of = slots_ns[:, ASKED], slots_cy[:, SM]
    comb = ns[SPLIT_BLOCKS * SPLIT_EVENTS:].view(-1, 2)
    used = split_ns[:, 0] > 0
    split_ns, split_cy, asked_ns, sm_of = split_ns[used], split_cy[used], asked_ns[used], sm_of[used]
    comb = comb[comb[:, 0] > 0]
    # a block with no chunk of its own stamps no "first chunk landed": take its window's end
    split_ns[:, 3] = torch.where(split_ns[:, 3] > 0, split_ns[:, 3], split_ns[:, 2])
    split_cy[:, 3] = torch.where(split_cy[:, 3] > 0, split_cy[:, 3], split_cy[:, 2])
    t0 = split_ns[:, 0].min()
    us = lambda t: (t - t0).double() / 1e3
    phase_us = {PHASES[e]: quantiles(us(split_ns[:, e])) for e in range(len(PHASES))}
    lengths = {f"{PHASES[e - 1]} -> {PHASES[e]}": quantiles((split_ns[:, e] - split_ns[:, e - 1]).double() / 1e3)
               for e in range(1, len(PHASES))}
    cycle_lengths = {f"{PHASES[e - 1]} -> {PHASES[e]}": quantiles((split_cy[:, e] - split_cy[:, e - 1]).double())
                     for e in range(1, len(PHASES))}
    # blocks grouped by how many of the launch's blocks share their multiprocessor: when each group's loops end
    sharing = torch.bincount(sm_of)[sm_of]
    by_sharing = {int(n): dict(blocks=int((sharing == n).sum()), loop_done_us=quantiles(us(split_ns[sharing == n, 5])))
                  for n in sharing.unique()}
    # each block's own numbers, for finding what the late ones share (block b is split b % splits of row b // splits)
    index = used.nonzero().flatten()
    splits = len(index) // (B * Hkv * -(-(Hq // Hkv) // 8))
    blocks = dict(multiprocessor=sm_of.tolist(), row=(index // splits).tolist(), split=(index % splits).tolist(),
                  loop_done_us=[round(x, 3) for x in us(split_ns[:, 5]).tolist()])
    return dict(shape=shape, batch=B, context=context, before=before, split_blocks=int(used.sum()), blocks=blocks,
                multiprocessors_used=int(sm_of.unique().numel()), by_blocks_per_multiprocessor=by_sharing,
                combine_blocks=len(comb),
                split_end_us=us(split_ns[:, 6].max()).item(), combine_start_us=quantiles(us(comb[:, 0])),
                combine_end_us=us(comb[:, 1].max()).item(), combine_ends_us=quantiles(us(comb[:, 1])),
                first_copies_asked_us=quantiles(us(asked_ns)), phase_end_us=phase_us, phase_length_us=lengths,
                phase_length_cycles=cycle_lengths)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_h200_trace.json"))
    ap.add_argument("--define", action="append", default=[], help="another kernel macro, e.g. TT_STAGES=4")
    ap.add_argument("--before", default="warm", help=f"what precedes the traced call, comma-separated: {BEFORE}")
    ap.add_argument("--configs", default=None, help="only these shape:batch:context, e.g. llama3-8b:1:16384")
    args = ap.parse_args()
    defines = ("TT_TRACE=1", "TT_ONLY_HEAD_DIM=128", *args.define)
    configs = [("llama3-8b", 1, 16384), ("llama3-8b", 8, 16384), ("llama3-8b", 8, 65536), ("llama3-8b", 32, 16384),
               ("qwen2.5-7b", 8, 16384)]
    if args.configs:
        configs = [(s, int(b), int(c)) for s, b, c in (x.split(":") for x in args.configs.split(","))]
    befores = args.before.split(",")
    unknown = set(befores) - set(BEFORE)
    if unknown: raise ValueError(f"--before takes {', '.join(BEFORE)}, not {', '.join(sorted(unknown))}")
    rows = []
    for (shape, B, ctx), before in [(c, b) for c in configs for b in befores]:
        r = trace_one(shape, B, ctx, defines, before=before)
        rows.append(r)
        med = lambda name: r["phase_end_us"][name]["median"]
        print(f"{shape:11} B={B:2} ctx={ctx:6} {before:4}: {r['split_blocks']} blocks; starts "
              f"{r['phase_end_us']['start']['median']:.1f}"
              f"/{r['phase_end_us']['start']['max']:.1f} us (median/max), query {med('query staged'):.1f}, window {med('window'):.1f}, "
              f"first chunk {med('first chunk landed'):.1f}, loop done {med('loop done (all warps)'):.1f}"
              f"/{r['phase_end_us']['loop done (all warps)']['max']:.1f}, partial {med('partial written'):.1f}"
              f"/{r['split_end_us']:.1f}; combine {r['combine_start_us']['min']:.1f}-"
              f"{r['combine_ends_us']['median']:.1f}/{r['combine_end_us']:.1f} us; copies asked "
              f"{r['first_copies_asked_us']['median']:.2f}; loops done by blocks per multiprocessor: "
              + ", ".join(f"{n}: {g['blocks']} blocks {g['loop_done_us']['median']:.1f}/{g['loop_done_us']['max']:.1f}"
                          for n, g in r["by_blocks_per_multiprocessor"].items()), flush=True)
    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, defines=list(defines),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), phases=PHASES, before=BEFORE, calls=rows,
                  notes="microseconds from the first split block's start; phase_end_us: when each block reached the phase "
                        "(over blocks); phase_length_*: per block, between consecutive phases")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
