"""How fast can any kernel read a decode step's bytes? A plain read of exactly as many bytes as the fused kernel reads.

    python benchmarks/read_floor.py          # writes benchmarks/results/kernel_h200_read_floor.json

The attention bars (2.5x fp16 SDPA, 60% of the copy bandwidth) are set against a copy of 2 GB, where the GPU runs at
its full bandwidth for milliseconds. A decode step at batch 1 reads 9-18 MB at 16k tokens: a few microseconds, of which
the launch, the first requests' round trip and the last requests' tail are a large part. This probe measures that floor:
a kernel that does nothing but read `ours_bytes` (each thread issues all its 16-byte loads before using any, so every
request is in flight at once; grid-strided or one contiguous span per block; 1-16 loads per thread; the fastest kept),
timed like the fused kernel (`bench_kernel.per_layer_us`: one call per layer over distinct buffers, at least 2 GB in
all, back to back in one CUDA graph), and a device-to-device copy of the same bytes (`copy_`). Beside it, reads shaped
like the kernel (`one_wave_us`: one wave of 128-thread blocks, each warp two 4 KB pieces in flight, over a contiguous
span of its own or interleaved with the other warps; over every buffer and over two), and the kernel over two layers
only. Per shape, in the same run: the fused kernel and fp16 SDPA (`bench_kernel.bench_one`, variants too), the floor's
time, its fraction of the 2 GB copy bandwidth, and the speed-up over SDPA a kernel reading that fast would have.

    python benchmarks/read_floor.py --variant copy=TT_ONLY_HEAD_DIM=128,TT_ABLATE=1   # also the kernel's copies alone
"""
import argparse, datetime, json
from pathlib import Path
import torch
from torch.utils import cpp_extension
from bench_kernel import SHAPES, bench_one, layer_count, per_layer_us, prepare_run, random_history
from tiny_turboquant.kernel import fused_decode_attention

CONFIGS = [(s, B, c) for s in SHAPES for B, c in ((1, 16384), (1, 65536), (1, 131072), (8, 16384), (8, 65536))]
LOADS = (1, 2, 4, 8, 16)  # 16-byte loads per thread
THREADS = 256

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

// Thread t of block b issues all its K loads, then xors what came: grid-strided (load k at t + b*T + k*T*grid) or one
// contiguous span per block (t + T*(b*K + k)). The sink is written only if the xor hits one value in 2^32.
template <int K, bool SPAN>
__global__ void read_kernel(const int4* __restrict__ x, int64_t n, int* __restrict__ sink) {
  int4 v[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = SPAN ? threadIdx.x + int64_t(blockDim.x) * (int64_t(blockIdx.x) * K + k)
                           : threadIdx.x + int64_t(blockDim.x) * (blockIdx.x + int64_t(gridDim.x) * k);
    v[k] = j < n ? __ldcs(x + j) : make_int4(0, 0, 0, 0);
  }
  int a = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) a ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  if (a == 0x5bd1e995) sink[0] = a;
}

// One wave of 128-thread blocks (the fused kernel's grid, `per_sm` blocks per multiprocessor); each warp reads 4 KB
// pieces (8 loads per lane), the next piece's loads in flight while the last is used (about the kernel's 2 chunks in
// flight per warp). INTERLEAVED: warp w reads pieces w, w + W, ... (the warps running together read neighbouring
// bytes); else a contiguous span of n / W pieces each (as the kernel's splits and warps do).
template <bool INTERLEAVED>
__global__ void stream_kernel(const int4* __restrict__ x, int64_t n, int* __restrict__ sink) {
  constexpr int L = 8;
  const int lane = threadIdx.x & 31;
  const int64_t W = int64_t(gridDim.x) * (blockDim.x / 32);                     // warps
  const int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;  // this warp
  const int64_t pieces = n / (32 * L);
  const int64_t first = INTERLEAVED ? w : pieces * w / W, last = INTERLEAVED ? pieces : pieces * (w + 1) / W;
  const int64_t step = INTERLEAVED ? W : 1;
  int4 a[L], b[L];
  int acc = 0;
  auto load = [&](int4* v, int64_t piece) {
#pragma unroll
    for (int k = 0; k < L; ++k)
      v[k] = piece < last ? __ldcs(x + piece * 32 * L + 32 * k + lane) : make_int4(0, 0, 0, 0);
  };
  auto use = [&](const int4* v) {
#pragma unroll
    for (int k = 0; k < L; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  };
  load(a, first);
  for (int64_t piece = first; piece < last; piece += 2 * step) {
    load(b, piece + step);
    use(a);
    load(a, piece + 2 * step);
    use(b);
  }
  if (acc == 0x5bd1e995) sink[0] = acc;
}

void stream_bytes(torch::Tensor x, torch::Tensor sink, bool interleaved, int64_t per_sm) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kUInt8 && x.numel() % 4096 == 0, "x: CUDA uint8, 4 KB multiple");
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int4* p = reinterpret_cast<const int4*>(x.data_ptr());
  if (interleaved) stream_kernel<true><<<sms * per_sm, 128, 0, stream>>>(p, x.numel() / 16, sink.data_ptr<int>());
  else stream_kernel<false><<<sms * per_sm, 128, 0, stream>>>(p, x.numel() / 16, sink.data_ptr<int>());
}

template <int K>
void launch(const torch::Tensor& x, torch::Tensor& sink, bool span, int threads) {
  const int64_t n = x.numel() / 16, blocks = (n + int64_t(threads) * K - 1) / (int64_t(threads) * K);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int4* p = reinterpret_cast<const int4*>(x.data_ptr());
  if (span) read_kernel<K, true><<<blocks, threads, 0, stream>>>(p, n, sink.data_ptr<int>());
  else read_kernel<K, false><<<blocks, threads, 0, stream>>>(p, n, sink.data_ptr<int>());
}

void read_bytes(torch::Tensor x, torch::Tensor sink, int64_t loads, bool span, int64_t threads) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kUInt8 && x.numel() % 16 == 0,
              "x: CUDA uint8, 16-byte multiple");
  switch (loads) {
    case 1: launch<1>(x, sink, span, threads); break;
    case 2: launch<2>(x, sink, span, threads); break;
    case 4: launch<4>(x, sink, span, threads); break;
    case 8: launch<8>(x, sink, span, threads); break;
    case 16: launch<16>(x, sink, span, threads); break;
    default: TORCH_CHECK(false, "loads per thread: 1, 2, 4, 8 or 16, not ", loads);
  }
}
"""


def build_probe():
    major, minor = torch.cuda.get_device_capability()
    return cpp_extension.load_inline(
        name="tiny_turboquant_read_floor", cuda_sources=SOURCE, functions=["read_bytes", "stream_bytes"],
        cpp_sources="void read_bytes(torch::Tensor x, torch::Tensor sink, int64_t loads, bool span, int64_t threads);\n"
                    "void stream_bytes(torch::Tensor x, torch::Tensor sink, bool interleaved, int64_t per_sm);",
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"])


def floor_one(probe, nbytes, reps):
    "The fastest plain read of `nbytes` (over the loads per thread and both orders), and a copy_ of as many bytes."
    nbytes = -(-nbytes // 4096) * 4096
    bufs = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda") for _ in range(layer_count(nbytes))]
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    reads = {}
    for loads in LOADS:
        for span in (False, True):
            calls = [lambda x=x: probe.read_bytes(x, sink, loads, span, THREADS) for x in bufs]
            reads[f"{'span' if span else 'strided'}{loads}"] = per_layer_us(calls, reps)
    streams = {}
    for interleaved in (False, True):
        for few in (False, True):  # every buffer (2 GB), or two of them (more than L2 holds, pages seen again soon)
            calls = [lambda x=x: probe.stream_bytes(x, sink, interleaved, 3) for x in (bufs[:2] if few else bufs)]
            name = ("interleaved" if interleaved else "warp_spans") + ("_2_buffers" if few else "")
            streams[name] = per_layer_us(calls, reps)
    outs = [torch.empty_like(x) for x in bufs[:max(2, len(bufs) // 2)]]  # a copy moves twice the bytes: half the layers
    copy_us = per_layer_us([lambda x=x, y=y: y.copy_(x) for x, y in zip(bufs, outs)], reps)
    best = min(reads, key=reads.get)
    return dict(floor_us=reads[best], floor_read=best, reads_us=reads, one_wave_us=streams, copy_same_bytes_us=copy_us,
                buffers=len(bufs))


def measure(probe, shape, B, context, copy_bw, args, variants):
    "One shape: the kernel and SDPA (bench_one), the read floor of the kernel's bytes, the kernel over two layers."
    r = bench_one(shape, B, context, (4, 4), args.reps, copy_bw, with_dequant=False, defines=args.define,
                  variants=variants)
    r.update(floor_one(probe, r["ours_bytes"], args.reps))
    Hq, Hkv, D = SHAPES[shape]
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
    two = [random_history(B, Hkv, D, context, 4, 4) for _ in range(2)]
    r["ours_2_layers_us"] = per_layer_us([lambda h=h: fused_decode_attention(q, h, defines=args.define) for h in two],
                                         args.reps)
    r["floor_fraction_of_copy"] = r["ours_bytes"] / r["floor_us"] / 1e3 / copy_bw
    r["floor_speedup_vs_sdpa"] = r["sdpa_us"] / r["floor_us"]
    r["ours_over_floor"] = r["ours_us"] / r["floor_us"]
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_h200_read_floor.json"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--define", action="append", default=[],
                    help="kernel macro for the timed build, e.g. TT_ONLY_HEAD_DIM=128")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=MACROS",
                    help="also time this build of the fused kernel, e.g. copy=TT_ONLY_HEAD_DIM=128,TT_ABLATE=1")
    args = ap.parse_args()
    probe = build_probe()
    variants, copy_bw = prepare_run(args.define, args.variant, args.reps)
    rows = []
    for shape, B, context in CONFIGS:
        r = measure(probe, shape, B, context, copy_bw, args, variants)
        rows.append(r)
        w = r["one_wave_us"]
        print(f"{shape:11} B={B:2} ctx={context:6}: {r['ours_bytes'] / 1e6:6.1f} MB; ours {r['ours_us']:7.1f} us "
              f"({r['fraction_of_copy']:.2f} of copy, {r['speedup_vs_sdpa']:.2f}x SDPA); read floor "
              f"{r['floor_us']:7.1f} us ({r['floor_read']}: {r['floor_fraction_of_copy']:.2f} of copy, "
              f"{r['floor_speedup_vs_sdpa']:.2f}x SDPA); one wave, warp spans {w['warp_spans']:.1f} us, interleaved "
              f"{w['interleaved']:.1f} us (2 buffers: {w['warp_spans_2_buffers']:.1f}, "
              f"{w['interleaved_2_buffers']:.1f}); ours over 2 layers {r['ours_2_layers_us']:.1f} us; copy_ of the "
              f"bytes {r['copy_same_bytes_us']:7.1f} us; SDPA {r['sdpa_us']:7.1f} us"
              + "".join(f"; {n} {v['us']:.1f} us" for n, v in r["variants"].items()), flush=True)
        torch.cuda.empty_cache()
        result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                      date=datetime.datetime.now().isoformat(timespec="seconds"), copy_GBps=copy_bw, reps=args.reps,
                      kernel_defines=args.define, variants=args.variant, threads=THREADS, rows=rows,
                      notes="floor_us: the fastest plain read of ours_bytes (reads_us: every order and loads "
                            "per thread), per layer-step as the kernel is timed; one_wave_us: reads shaped like the "
                            "kernel; copy_same_bytes_us: copy_ of ours_bytes (reads and writes them); "
                            "floor_fraction_of_copy against the 2 GB copy bandwidth copy_GBps.")
        Path(args.out).write_text(json.dumps(result, indent=1))  # after every shape: a run cut short keeps its rows
    print("wrote", args.out)


if __name__ == "__main__":
    main()
