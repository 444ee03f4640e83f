"""The fused decode kernel of another revision against this checkout's, on the same data in one run.

    python benchmarks/ab_kernel.py --baseline d1fd665                 # that revision's cuda/ sources, exported with git
    python benchmarks/ab_kernel.py --baseline-dir /tmp/other_cuda     # a folder with another decode_attention.{cpp,cu,h}
    python benchmarks/ab_kernel.py --baseline d1fd665 --bits 4/2      # caches of other bits (4/4 unless told)
    python benchmarks/ab_kernel.py --baseline d1fd665 --dtype bfloat16  # a bf16 model's query and cache (else fp16)
    python benchmarks/ab_kernel.py --baseline d1fd665 --note "what changed"  # kept in the JSON, printed by 08_cuda
    python benchmarks/ab_kernel.py --baseline d1fd665 --configs qwen2.5-7b:1:16384,llama3-8b:1:65536  # other shapes
    python benchmarks/ab_kernel.py --baseline d1fd665 --variant s4=TT_STAGES=4 --variant nofold=TT_FOLD=0  # more builds

Two runs on a lent GPU differ by a few percent (the machine, its clocks, the copy bandwidth), as much as a kernel change
may gain: a change is judged by timing both kernels here, interleaved, on the same caches. Both are built for head_dim
128 only (the baseline as its own extension, `tiny_turboquant_ab_<name>`), and called through the binding's Python
signature, which both must share. Per shape: each kernel's time per layer-step (`bench_kernel.per_layer_us`: `layers`
calls over distinct random caches, back to back in one CUDA graph), measured `--rounds` times in turn, after one round
that is not kept, and the fastest kept, the ratio baseline / this (above 1: this checkout is faster), the fraction of
the device-to-device copy bandwidth measured in the same run, and the largest relative difference between the two
kernels' outputs (each `--variant`, a build of this checkout with other macros, is timed in the same rounds:
`baseline_over` and `max_rel_differences` per row). The round not kept: the first kernel timed in a run came out 1-3%
fast in its first round (kernel_h200_ab_window_fence.json and the two runs before it). Two builds of the same sources
came out 0.996-1.004x of each other on an H200 (kernel_h200_ab_identical.json), 1.000-1.002x with that round left out
(kernel_h200_ab_same.json): the resolution of a run. Writes benchmarks/results/kernel_h200_ab.json unless told
otherwise.
"""
import argparse, datetime, json, subprocess, tempfile
from pathlib import Path
import torch
from torch.utils import cpp_extension
from bench_kernel import SHAPES, copy_GBps, layer_count, per_layer_us, random_history
from tiny_turboquant.kernel import build_kernel, kernel_source_dir

SOURCES = ("decode_attention.cpp", "decode_attention.cu", "decode_attention.h")
CONFIGS = [("llama3-8b", 1, 16384), ("llama3-8b", 1, 131072), ("llama3-8b", 8, 16384), ("llama3-8b", 8, 65536),
           ("llama3-8b", 32, 16384), ("qwen2.5-7b", 1, 131072), ("qwen2.5-7b", 8, 16384), ("qwen2.5-7b", 8, 65536),
           ("qwen2.5-7b", 32, 16384)]


def parse_config(text):
    "`shape:batch:context` -> (shape, batch, context), the shape one of SHAPES."
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in SHAPES or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ValueError(f"a config is shape:batch:context with shape one of {', '.join(SHAPES)}, not {text!r}")
    return parts[0], int(parts[1]), int(parts[2])


def export_revision(rev, folder):
    "Write `rev`'s kernel sources into `folder` (needs git and the repository's history)."
    root = Path(__file__).resolve().parent.parent
    for name in SOURCES:
        text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:cuda/{name}"], capture_output=True, text=True)
        if text.returncode: raise ValueError(f"git cannot show {rev}:cuda/{name}: {text.stderr.strip()}")
        (folder / name).write_text(text.stdout)
    return folder


def build_baseline(folder, name):
    "The kernel in `folder` as an extension of its own (head_dim 128 only), for this GPU."
    missing = [n for n in SOURCES if not (folder / n).exists()]
    if missing: raise ValueError(f"{folder} lacks {', '.join(missing)}")
    major, minor = torch.cuda.get_device_capability()
    return cpp_extension.load(name=f"tiny_turboquant_ab_{name}", sources=[str(folder / SOURCES[0]), str(folder / SOURCES[1])],
                              extra_include_paths=[str(folder)], extra_cflags=["-O3"],
                              extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
                                                 "-DTT_ONLY_HEAD_DIM=128"])


def attend(ext, q, h):
    "One decode step through `ext`'s binding (the whole window)."
    return ext.decode_attention(q[:, :, 0], h.key_codes, h.key_scale, h.key_zero, h.value_codes, h.value_scale, h.value_zero,
                                h.window_keys, h.window_values, None, None, h.key_bits, h.value_bits, q.shape[-1] ** -0.5, False)


def relative_difference(out, base):
    "The largest relative difference between two kernels' outputs, over rows."
    return ((out - base).norm(dim=-1) / base.norm(dim=-1)).max().item()


def compare(kernels, shape, B, context, reps, rounds, copy_bw, bits=(4, 4), dtype=torch.float16):
    Hq, Hkv, D = SHAPES[shape]
    first = random_history(B, Hkv, D, context, *bits, dtype=dtype)
    more = layer_count(first.nbytes()) - 1
    layers = [first] + [random_history(B, Hkv, D, context, *bits, dtype=dtype) for _ in range(more)]
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
    outs = {name: attend(ext, q, first).float() for name, ext in kernels.items()}
    base = outs["baseline"]
    times = {name: [] for name in kernels}
    for r in range(rounds + 1):  # in turn, so that a drift of the machine hits both; round 0 not kept (see above)
        for name, ext in kernels.items():
            t = per_layer_us([lambda h=h, ext=ext: attend(ext, q, h) for h in layers], reps)
            if r: times[name].append(t)
    best = {name: min(t) for name, t in times.items()}
    return dict(shape=shape, batch=B, context=context, bits=f"K{bits[0]}/V{bits[1]}", dtype=str(dtype).split(".")[-1],
                layers=len(layers), us=times,
                best_us=best,
                baseline_over_this=best["baseline"] / best["this"],
                baseline_over={name: best["baseline"] / t for name, t in best.items()
                               if name not in ("baseline", "this")},
                fraction_of_copy={name: first.nbytes() / t / 1e3 / copy_bw for name, t in best.items()},
                max_rel_difference=relative_difference(outs["this"], base),
                max_rel_differences={name: relative_difference(o, base)
                                     for name, o in outs.items() if name not in ("baseline", "this")})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--baseline", help="a git revision whose cuda/ sources are the baseline")
    which.add_argument("--baseline-dir", help="a folder holding the baseline's decode_attention.cpp, .cu and .h")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_h200_ab.json"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bits", default="4/4", help="key/value bits of the caches, e.g. 4/2")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"),
                    help="the query's and the cache's 16-bit type")
    ap.add_argument("--note", help="what the two kernels are, kept in the JSON (08_cuda prints it)")
    ap.add_argument("--configs", default=None, help="shape:batch:context instead of the nine, e.g. llama3-8b:1:16384")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=MACROS",
                    help="also this checkout built with these macros, in the same rounds, e.g. s4=TT_STAGES=4")
    args = ap.parse_args()
    configs = CONFIGS if args.configs is None else [parse_config(c) for c in args.configs.split(",")]
    bits = tuple(int(b) for b in args.bits.split("/"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_revision(args.baseline, Path(tmp)) if args.baseline else Path(args.baseline_dir)
        name = args.baseline or folder.name
        kernels = dict(baseline=build_baseline(folder, "".join(c if c.isalnum() else "_" for c in name)),
                       this=build_kernel(defines=("TT_ONLY_HEAD_DIM=128",)))
    for spec in args.variant:
        vname, _, macros = spec.partition("=")
        if not vname or vname in kernels or not macros:
            raise ValueError(f"--variant is NAME=MACRO,MACRO with a new name, not {spec!r}")
        kernels[vname] = build_kernel(defines=("TT_ONLY_HEAD_DIM=128", *macros.split(",")))
    copy_bw = copy_GBps(args.reps)
    rows = []
    for shape, B, context in configs:
        r = compare(kernels, shape, B, context, args.reps, args.rounds, copy_bw, bits, getattr(torch, args.dtype))
        rows.append(r)
        print(f"{shape:11} B={B:2} ctx={context:6} K{bits[0]}/V{bits[1]} {args.dtype}: "
              f"baseline {r['best_us']['baseline']:7.1f} us, "
              f"this {r['best_us']['this']:7.1f} us "
              f"-> baseline/this {r['baseline_over_this']:.3f} (this: {r['fraction_of_copy']['this']:.2f} of copy); "
              f"outputs differ by {r['max_rel_difference']:.1e}"
              + "".join(f"; {n} {r['best_us'][n]:.1f} us ({r['baseline_over'][n]:.3f})"
                        for n in kernels if n not in ("baseline", "this")),
              flush=True)
        torch.cuda.empty_cache()
    this = str(kernel_source_dir())
    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), baseline=name, this=this,
                  copy_GBps=copy_bw, reps=args.reps, rounds=args.rounds, rows=rows,
                  note=args.note or f"the kernel in {this} against {name} (baseline)")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
