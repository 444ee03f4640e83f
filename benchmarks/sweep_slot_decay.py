"""The launch-slot weights of one-wave grids: the kernel's time at several slot decays, on the same data in one run.

    python benchmarks/sweep_slot_decay.py                                   # writes kernel_h200_slot_decay.json
    python benchmarks/sweep_slot_decay.py --decays 0,24,48 --configs llama3-8b:1:65536,qwen2.5-7b:8:16384

The launch gives a one-wave grid's block L the (L / multiprocessors)-th slot of its multiprocessor, and the blocks of
later slots end their loops later (trace_kernel.py). With a slot decay d, a block in slot k takes a share of its row's
chunks weighted 256 - k * d (decode_attention.cu, split_chunks). One build of this checkout's kernel (head_dim 128)
is timed at each decay as ab_kernel.py times two kernels: `layers` calls over distinct caches in one CUDA graph,
`--rounds` times in turn, the fastest kept; `baseline_over` is the time at decay 0 over the time at each decay (above
1: faster than equal shares), `max_rel_difference` how far the outputs move (summation order only).
"""
import argparse, datetime, json
from pathlib import Path
import torch
from ab_kernel import compare
from bench_kernel import copy_GBps
from tiny_turboquant.kernel import build_kernel

CONFIGS = "llama3-8b:1:16384,llama3-8b:1:65536,llama3-8b:1:131072,llama3-8b:8:16384,llama3-8b:8:65536," \
          "qwen2.5-7b:1:16384,qwen2.5-7b:1:65536,qwen2.5-7b:1:131072,qwen2.5-7b:8:16384,qwen2.5-7b:8:65536"


class AtDecay:
    "The extension `ext` called at slot decay `decay` (set on the host before each launch, so a captured graph keeps it)."
    def __init__(self, ext, decay): self.ext, self.decay = ext, decay
    def decode_attention(self, *args):
        self.ext.set_slot_decay(self.decay)
        return self.ext.decode_attention(*args)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_h200_slot_decay.json"))
    ap.add_argument("--decays", default="0,16,32,48,64", help="slot decays in 256ths, 0 (equal shares) first")
    ap.add_argument("--configs", default=CONFIGS, help="shape:batch:context, comma-separated")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    decays = [int(d) for d in args.decays.split(",")]
    if decays[0] != 0: raise ValueError(f"--decays must start with 0 (the baseline), got {args.decays}")
    ext = build_kernel(defines=("TT_ONLY_HEAD_DIM=128",))
    default = ext.set_slot_decay(0)
    kernels = {"baseline": AtDecay(ext, 0), **{f"decay{d}": AtDecay(ext, d) for d in decays[1:]}}
    copy_bw = copy_GBps(args.reps)
    rows = []
    for shape, B, context in [(s, int(b), int(c)) for s, b, c in (x.split(":") for x in args.configs.split(","))]:
        r = compare(kernels, shape, B, context, args.reps, args.rounds, copy_bw)
        rows.append(r)
        print(f"{shape:11} B={B:2} ctx={context:6}: decay 0 {r['best_us']['baseline']:7.1f} us "
              f"({r['fraction_of_copy']['baseline']:.2f} of copy); time at 0 over time at "
              + ", ".join(f"{n[5:]} {v:.3f}" for n, v in r["baseline_over"].items())
              + f"; outputs differ by up to {max(r['max_rel_difference'].values()):.1e}", flush=True)
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), build_default_decay=default,
                  decays=decays, copy_GBps=copy_bw, reps=args.reps, rounds=args.rounds, rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
