"""Throughput of the TurboQuant quantizers (`tiny_turboquant.turboquant`) and the cost of building their codebooks.

    python benchmarks/bench_turboquant.py --device cpu     # writes benchmarks/results/turboquant_cpu.json
    python benchmarks/bench_turboquant.py --device cuda    # writes benchmarks/results/turboquant_cuda.json

Quantize and dequantize are timed on `--n` random vectors of dimension `--dim` (median of `--reps` runs after a
warm-up), for TinyQuantizer at 1-4 bits and TinyQuantizerIP at 2-4 bits. Codebook construction is timed first-time
(Lloyd-Max from scratch), from the disk cache (a fresh temporary cache directory), and from the in-memory cache.
"""
import argparse, datetime, json, os, platform, statistics, tempfile, time
from pathlib import Path

import torch

from tiny_turboquant import turboquant as tq


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def median_time(f, device, reps):
    "Median wall time of `f()` over `reps` runs, after one warm-up run."
    f(); sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(); sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_quantizers(dim, n, dtype, device, reps):
    x = torch.randn(n, dim, device=device).to(dtype)
    rows = []
    for kind, cls, bits_range in (("mse", tq.TinyQuantizer, (1, 2, 3, 4)), ("ip", tq.TinyQuantizerIP, (2, 3, 4))):
        for bits in bits_range:
            q = cls(dim, bits)
            codes = q.quantize(x)
            t_q = median_time(lambda: q.quantize(x), device, reps)
            t_dq = median_time(lambda: q.dequantize(codes, dtype), device, reps)
            rows.append({"quantizer": kind, "bits": bits, "dim": dim, "n": n,
                         "quantize_vectors_per_s": n / t_q, "dequantize_vectors_per_s": n / t_dq,
                         "quantize_s": t_q, "dequantize_s": t_dq})
            print(f"{kind:3} {bits} bits: quantize {n / t_q:12.3e} vec/s, dequantize {n / t_dq:12.3e} vec/s", flush=True)
    return rows


def bench_codebooks(pairs):
    rows = []
    old = os.environ.get("TINY_TURBOQUANT_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TINY_TURBOQUANT_CACHE"] = tmp  # empty disk cache: the first call really computes
        try:
            for dim, bits in pairs:
                tq._CODEBOOKS.pop((dim, bits), None)
                t0 = time.perf_counter(); cb = tq.beta_codebook(dim, bits); t_first = time.perf_counter() - t0
                tq._CODEBOOKS.pop((dim, bits))
                t0 = time.perf_counter(); tq.beta_codebook(dim, bits); t_disk = time.perf_counter() - t0
                t0 = time.perf_counter(); tq.beta_codebook(dim, bits); t_mem = time.perf_counter() - t0
                rows.append({"dim": dim, "bits": bits, "lloyd_iterations": cb.iterations, "first_s": t_first,
                             "disk_cache_s": t_disk, "memory_cache_s": t_mem})
                print(f"codebook d={dim} b={bits}: first {t_first:.3f} s ({cb.iterations} iterations), "
                      f"disk {t_disk * 1e3:.2f} ms, memory {t_mem * 1e6:.1f} us", flush=True)
        finally:
            if old is None: os.environ.pop("TINY_TURBOQUANT_CACHE", None)
            else: os.environ["TINY_TURBOQUANT_CACHE"] = old
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n", type=int, default=None, help="vectors per call (default 65536 on CPU, 1048576 on CUDA)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/turboquant_<device>.json)")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available(): raise SystemExit("--device cuda: no CUDA GPU found")
    n = args.n or (1 << 20 if device.type == "cuda" else 1 << 16)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out or Path(__file__).parent / "results" / f"turboquant_{device.type}.json")

    codebooks = bench_codebooks([(args.dim, b) for b in (1, 2, 3, 4)] + [(1536, 4)])
    throughput = bench_quantizers(args.dim, n, dtype, device, args.reps)
    result = {
        "benchmark": "turboquant", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "device_type": device.type, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "dtype": args.dtype, "reps": args.reps, "codebooks": codebooks, "throughput": throughput,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
