"""How fast can any kernel read a decode step's bytes? A plain read of exactly as many bytes as the fused kernel reads.

    python benchmarks/read_floor.py          # writes benchmarks/results/kernel_h200_read_floor.json

The attention bars (2.5x fp16 SDPA, 60% of the copy bandwidth) are set against a copy of 2 GB, where the GPU runs at its
full bandwidth for milliseconds. A decode step at batch 1 reads 9-18 MB at 16k tokens: a few microseconds, of which the
launch, the first requests' round trip and the last requests' tail are a large part. This probe measures that floor: a
kernel that does nothing but read `ours_bytes` (each thread issues all its 16-byte loads before using any, so every
request is in flight at once; grid-strided or one contiguous span per block; 1-16 loads per thread; the fastest kept),
timed like the fused kernel (`bench_kernel.per_layer_us`: one call per layer over distinct buffers, at least 2 GB in
all, back to back in one CUDA graph), and a device-to-device copy of the same bytes (`copy_`). Beside it, reads shaped
like the kernel (`one_wave_us`: one wave of 128-thread blocks, each warp two 4 KB pieces in flight, over a contiguous
span of its own or interleaved with the other warps; over every buffer and over two), the one-wave read with what any
split kernel adds whatever its arithmetic (`split_read_us`: each block's warps merged into one partial, the partials
merged by a second kernel launched programmatically, by each row's last block, or after a grid barrier by the first
blocks), and the kernel over two layers only. Per shape, in the same run: the fused kernel and fp16 SDPA
(`bench_kernel.bench_one`, variants too), the floor's time, its fraction of the 2 GB copy bandwidth, and the speed-up
over SDPA a kernel reading that fast would have.

    python benchmarks/read_floor.py --variant copy=TT_ONLY_HEAD_DIM=128,TT_ABLATE=1   # also the kernel's copies alone
"""
import argparse, datetime, json
from pathlib import Path
import torch
from torch.utils import cpp_extension
from ab_kernel import parse_config
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

// A warp reads 4 KB pieces first, first + step, ... below last (8 16-byte loads per lane), the next piece's loads in
// flight while the last is used, and returns the xor of what it read.
constexpr int PIECE_LOADS = 8;
__device__ __forceinline__ int read_pieces(const int4* __restrict__ x, int64_t first, int64_t last, int64_t step) {
  constexpr int L = PIECE_LOADS;
  const int lane = threadIdx.x & 31;
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
  return acc;
}

// One wave of 128-thread blocks (the fused kernel's grid, `per_sm` blocks per multiprocessor); each warp reads 4 KB
// pieces with read_pieces (about the kernel's 2 chunks in flight per warp). INTERLEAVED: warp w reads pieces w, w + W,
// ... (the warps running together read neighbouring bytes); else a contiguous span of n / W pieces each (as the
// kernel's splits and warps do).
template <bool INTERLEAVED>
__global__ void stream_kernel(const int4* __restrict__ x, int64_t n, int* __restrict__ sink) {
  const int64_t W = int64_t(gridDim.x) * (blockDim.x / 32);                     // warps
  const int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;  // this warp
  const int64_t pieces = n / (32 * PIECE_LOADS);
  const int64_t first = INTERLEAVED ? w : pieces * w / W, last = INTERLEAVED ? pieces : pieces * (w + 1) / W;
  const int acc = read_pieces(x, first, last, INTERLEAVED ? W : 1);
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

// Move the running max M to cover a state whose max is m2: the factors for the sums so far and for that state's.
__device__ __forceinline__ float2 rescale(float& M, float m2) {
  const float m = fmaxf(M, m2);
  const float2 f = make_float2(exp2f(M - m), exp2f(m2 - m));
  M = m;
  return f;
}

// Merge the partials into the outputs: an item is 32 channels of one head, a lane each; PER_ITEM warps of a block share
// its partials, each every PER_ITEM-th one, 16 partials' loads in flight at a time, then merge in shared memory.
// Block `block` of WARPS warps takes items block * WARPS / per_item onwards.
template <int G, int D, int WARPS>
__device__ void merge_items(const float* __restrict__ part_o, const float2* __restrict__ part_ml,
                            float* __restrict__ out, int S, int per_item, int items, int block) {
  constexpr int C = G * D, BATCH = 16;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int item = block * (WARPS / per_item) + warp / per_item, first = warp % per_item;
  const int rh = item / (D / 32), row = rh / G, h = rh % G, c = h * D + item % (D / 32) * 32 + lane;
  float M = -INFINITY, l = 0.f, o = 0.f;
  if (item < items) {
    for (int s0 = first; s0 < S; s0 += per_item * BATCH) {
      float po[BATCH];
      float2 pml[BATCH];
#pragma unroll
      for (int k = 0; k < BATCH; ++k) {
        const int s = min(s0 + k * per_item, S - 1);
        po[k] = __ldcg(part_o + (int64_t(row) * S + s) * C + c);
        pml[k] = __ldcg(part_ml + (int64_t(row) * S + s) * G + h);
      }
#pragma unroll
      for (int k = 0; k < BATCH; ++k) {
        if (s0 + k * per_item >= S) continue;
        const float2 f = rescale(M, pml[k].x);
        l = fmaf(l, f.x, f.y * pml[k].y); o = fmaf(o, f.x, f.y * po[k]);
      }
    }
  }
  __shared__ float sm[WARPS][3][32];
  sm[warp][0][lane] = M; sm[warp][1][lane] = l; sm[warp][2][lane] = o;
  __syncthreads();
  if (first != 0 || item >= items) return;
  for (int v = 1; v < per_item; ++v) {
    if (fmaxf(M, sm[warp + v][0][lane]) == -INFINITY) continue;
    const float2 f = rescale(M, sm[warp + v][0][lane]);
    l = fmaf(l, f.x, f.y * sm[warp + v][1][lane]); o = fmaf(o, f.x, f.y * sm[warp + v][2][lane]);
  }
  out[int64_t(row) * C + c] = o / l;
}

// MODE 1's second kernel: 8-warp blocks, launched programmatically, waiting on the device for the split kernel's end.
template <int G, int D>
__global__ void __launch_bounds__(256) merge_rows_kernel(const float* __restrict__ part_o,
                                                         const float2* __restrict__ part_ml, float* __restrict__ out,
                                                         int S, int per_item, int items) {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  merge_items<G, D, 8>(part_o, part_ml, out, S, per_item, items, blockIdx.x);
}

// What a split kernel adds to the read whatever its arithmetic: a one-wave grid (splits, rows) of 128-thread blocks,
// each warp reading a contiguous share of its row as stream_kernel does; each warp's state (G heads x D channels: PER
// floats a lane, made from what it read) merged in shared memory into one partial per block, then the partials of a
// row merged into its output. MODE 0: partials only (no output); 1: a second kernel merges them, launched
// programmatically (it starts early and waits on the device, as the fused kernel's combine does); 2: the row's last
// block merges them (a fence and a count per row, no second kernel); 3: every block waits at a grid barrier (a count
// and an epoch, the grid being one wave), then the first blocks merge as the second kernel's do.
template <int G, int D, int MODE>
__global__ void __launch_bounds__(128, 3) split_read_kernel(const int4* __restrict__ x, int64_t row_pieces,
                                                         float* __restrict__ part_o, float2* __restrict__ part_ml,
                                                         int* __restrict__ count, float* __restrict__ out) {
#if __CUDA_ARCH__ >= 900
  if (MODE == 1) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  constexpr int C = G * D, PER = C / 32, WARPS = 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, S = gridDim.x, row = blockIdx.y, split = blockIdx.x;
  const int64_t W = int64_t(S) * WARPS, w = int64_t(split) * WARPS + warp;
  const int acc = read_pieces(x + int64_t(row) * row_pieces * 32 * PIECE_LOADS, row_pieces * w / W,
                              row_pieces * (w + 1) / W, 1);
  __shared__ float states[WARPS][C];
  __shared__ float maxima[WARPS][G];
#pragma unroll
  for (int k = 0; k < PER; ++k) states[warp][k * 32 + lane] = float(acc ^ k) * 1e-9f;
  if (lane < G) maxima[warp][lane] = float((acc >> lane) & 15);
  __syncthreads();
  const int64_t at = int64_t(row) * S + split;
  for (int c = threadIdx.x; c < C; c += 128) {
    const int h = c / D;
    float M = maxima[0][h], o = 0.f;
    for (int v = 1; v < WARPS; ++v) M = fmaxf(M, maxima[v][h]);
    for (int v = 0; v < WARPS; ++v) o = fmaf(exp2f(maxima[v][h] - M), states[v][c], o);
    part_o[at * C + c] = o;
    if (c % D == 0) part_ml[at * G + h] = make_float2(M, 1.f);
  }
  if (MODE == 3) {
    __shared__ int epoch;
    const int blocks = S * gridDim.y;
    __threadfence();  // this block's partial visible before it arrives
    __syncthreads();
    if (threadIdx.x == 0) {
      volatile int* release = count + gridDim.y + 1;
      epoch = *release;  // it moves only once every block, this one too, has arrived
      if (atomicAdd(count + gridDim.y, 1) == blocks - 1) {
        count[gridDim.y] = 0;
        __threadfence();
        atomicAdd(count + gridDim.y + 1, 1);
      } else {
        while (*release == epoch) __nanosleep(32);
      }
      __threadfence();
    }
    __syncthreads();
    int per_item = 1;
    while (per_item < WARPS && per_item * 16 < S) per_item *= 2;
    const int items = gridDim.y * G * (D / 32), block = blockIdx.y * S + split;
    if (block * (WARPS / per_item) < items) merge_items<G, D, WARPS>(part_o, part_ml, out, S, per_item, items, block);
    return;
  }
  if (MODE != 2) return;
  __shared__ int is_last;
  __threadfence();  // this block's partial visible before it is counted
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(count + row, 1) == S - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // every partial of the row: thread t takes channels 4t..4t+3, 4t+512.., as float4, 16 partials in flight at a time
  constexpr int C4 = C / 4, CH = (C4 + 127) / 128, BATCH = CH > 1 ? 8 : 16;
  float M[CH], l[CH];
  float4 o[CH];
#pragma unroll
  for (int j = 0; j < CH; ++j) { M[j] = -INFINITY; l[j] = 0.f; o[j] = make_float4(0.f, 0.f, 0.f, 0.f); }
  const float4* ro = reinterpret_cast<const float4*>(part_o) + int64_t(row) * S * C4;
  const float2* rml = part_ml + int64_t(row) * S * G;
  for (int s0 = 0; s0 < S; s0 += BATCH) {
    float4 po[BATCH][CH];
    float2 pml[BATCH][CH];
#pragma unroll
    for (int k = 0; k < BATCH; ++k)
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int s = min(s0 + k, S - 1), c4 = min(threadIdx.x + 128 * j, C4 - 1);
        po[k][j] = __ldcg(ro + int64_t(s) * C4 + c4);
        pml[k][j] = __ldcg(rml + int64_t(s) * G + c4 * 4 / D);
      }
#pragma unroll
    for (int k = 0; k < BATCH; ++k)
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        if (s0 + k >= S) continue;
        const float2 f = rescale(M[j], pml[k][j].x);
        l[j] = fmaf(l[j], f.x, f.y * pml[k][j].y);
        o[j].x = fmaf(o[j].x, f.x, f.y * po[k][j].x); o[j].y = fmaf(o[j].y, f.x, f.y * po[k][j].y);
        o[j].z = fmaf(o[j].z, f.x, f.y * po[k][j].z); o[j].w = fmaf(o[j].w, f.x, f.y * po[k][j].w);
      }
  }
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    const int c4 = threadIdx.x + 128 * j;
    if (c4 < C4)
      reinterpret_cast<float4*>(out)[int64_t(row) * C4 + c4] =
          make_float4(o[j].x / l[j], o[j].y / l[j], o[j].z / l[j], o[j].w / l[j]);
  }
  if (threadIdx.x == 0) count[row] = 0;  // ready for the next call
}

template <int G, int MODE>
void launch_split(const torch::Tensor& x, torch::Tensor& part_o, torch::Tensor& part_ml, torch::Tensor& count,
                  torch::Tensor& out, int64_t rows, int64_t splits) {
  constexpr int D = 128;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t row_pieces = x.numel() / 4096 / rows;
  split_read_kernel<G, D, MODE><<<dim3(splits, rows), 128, 0, stream>>>(
      reinterpret_cast<const int4*>(x.data_ptr()), row_pieces, part_o.data_ptr<float>(),
      reinterpret_cast<float2*>(part_ml.data_ptr<float>()), count.data_ptr<int>(), out.data_ptr<float>());
  if (MODE != 1) return;
  int per_item = 1;
  while (per_item < 8 && per_item * 16 < splits) per_item *= 2;
  const int items = rows * G * (D / 32), per_block = 8 / per_item;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((items + per_block - 1) / per_block); config.blockDim = dim3(256); config.stream = stream;
  cudaLaunchAttribute early;
  early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  early.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &early; config.numAttrs = 1;
  TORCH_CHECK(cudaLaunchKernelEx(&config, merge_rows_kernel<G, D>, (const float*)part_o.data_ptr<float>(),
                                 (const float2*)part_ml.data_ptr<float>(), out.data_ptr<float>(), int(splits), per_item,
                                 items) == cudaSuccess, "merge_rows_kernel launch failed");
}

template <int G>
void split_mode(const torch::Tensor& x, torch::Tensor& part_o, torch::Tensor& part_ml, torch::Tensor& count,
                torch::Tensor& out, int64_t rows, int64_t splits, int64_t mode) {
  if (mode == 0) launch_split<G, 0>(x, part_o, part_ml, count, out, rows, splits);
  else if (mode == 1) launch_split<G, 1>(x, part_o, part_ml, count, out, rows, splits);
  else if (mode == 2) launch_split<G, 2>(x, part_o, part_ml, count, out, rows, splits);
  else launch_split<G, 3>(x, part_o, part_ml, count, out, rows, splits);
}

void split_read(torch::Tensor x, torch::Tensor part_o, torch::Tensor part_ml, torch::Tensor count, torch::Tensor out,
                int64_t rows, int64_t heads, int64_t splits, int64_t mode) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kUInt8 && x.numel() % (4096 * rows) == 0,
              "x: CUDA uint8, a multiple of 4 KB per row");
  TORCH_CHECK(mode >= 0 && mode <= 3, "mode: 0 partials only, 1 a combine kernel, 2 the last block, 3 a grid barrier, "
              "not ", mode);
  TORCH_CHECK(part_o.numel() >= rows * splits * heads * 128 && part_ml.numel() >= 2 * rows * splits * heads &&
              count.numel() >= rows + 2 && out.numel() >= rows * heads * 128, "buffers too small");
  if (heads == 4) split_mode<4>(x, part_o, part_ml, count, out, rows, splits, mode);
  else if (heads == 7) split_mode<7>(x, part_o, part_ml, count, out, rows, splits, mode);
  else TORCH_CHECK(false, "query heads per KV head: 4 or 7 (the benchmark's shapes), not ", heads);
}
"""


def build_probe():
    major, minor = torch.cuda.get_device_capability()
    return cpp_extension.load_inline(
        name="tiny_turboquant_read_floor", cuda_sources=SOURCE,
        functions=["read_bytes", "stream_bytes", "split_read"],
        cpp_sources="void read_bytes(torch::Tensor x, torch::Tensor sink, int64_t loads, bool span, int64_t threads);\n"
                    "void stream_bytes(torch::Tensor x, torch::Tensor sink, bool interleaved, int64_t per_sm);\n"
                    "void split_read(torch::Tensor x, torch::Tensor part_o, torch::Tensor part_ml, torch::Tensor count, "
                    "torch::Tensor out, int64_t rows, int64_t heads, int64_t splits, int64_t mode);",
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


SPLIT_MODES = ("partials", "combine_kernel", "last_block", "grid_barrier")


def split_one(probe, nbytes, rows, heads, reps):
    "The read as a split kernel does it (`split_read`: one wave, 3 blocks per multiprocessor), in each SPLIT_MODES."
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits, per_row = max(1, 3 * sms // rows), -(-nbytes // (4096 * rows)) * 4096
    bufs = [torch.empty(rows * per_row, dtype=torch.uint8, device="cuda") for _ in range(layer_count(rows * per_row))]
    part_o = torch.empty(rows * splits * heads * 128, device="cuda")
    part_ml = torch.empty(2 * rows * splits * heads, device="cuda")
    count = torch.zeros(rows + 2, dtype=torch.int32, device="cuda")  # a count per row, the barrier's count and epoch
    outs = [torch.zeros(rows * heads * 128, device="cuda") for _ in SPLIT_MODES]
    for mode in (1, 2, 3):  # the three merges of the same partials agree (and the counts come back to 0)
        probe.split_read(bufs[0], part_o, part_ml, count, outs[mode], rows, heads, splits, mode)
    torch.testing.assert_close(outs[2], outs[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outs[3], outs[1], rtol=1e-4, atol=1e-6)
    assert int(count[:rows + 1].abs().sum()) == 0, "a block left a count behind"
    return {name: per_layer_us([lambda x=x: probe.split_read(x, part_o, part_ml, count, outs[mode], rows, heads,
                                                             splits, mode) for x in bufs], reps)
            for mode, name in enumerate(SPLIT_MODES)} | dict(splits=splits)


def measure(probe, shape, B, context, copy_bw, args, variants):
    "One shape: the kernel and SDPA (bench_one), the read floor of the kernel's bytes, the kernel over two layers."
    r = bench_one(shape, B, context, (4, 4), args.reps, copy_bw, with_dequant=False, defines=args.define,
                  variants=variants)
    r.update(floor_one(probe, r["ours_bytes"], args.reps))
    Hq, Hkv, D = SHAPES[shape]
    r["split_read_us"] = split_one(probe, r["ours_bytes"], B * Hkv, Hq // Hkv, args.reps)
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
    ap.add_argument("--configs", default=None, help="shape:batch:context instead of the ten, e.g. llama3-8b:1:16384")
    args = ap.parse_args()
    configs = CONFIGS if args.configs is None else [parse_config(c) for c in args.configs.split(",")]
    probe = build_probe()
    variants, copy_bw = prepare_run(args.define, args.variant, args.reps)
    rows = []
    for shape, B, context in configs:
        r = measure(probe, shape, B, context, copy_bw, args, variants)
        rows.append(r)
        w = r["one_wave_us"]
        print(f"{shape:11} B={B:2} ctx={context:6}: {r['ours_bytes'] / 1e6:6.1f} MB; ours {r['ours_us']:7.1f} us "
              f"({r['fraction_of_copy']:.2f} of copy, {r['speedup_vs_sdpa']:.2f}x SDPA); read floor "
              f"{r['floor_us']:7.1f} us ({r['floor_read']}: {r['floor_fraction_of_copy']:.2f} of copy, "
              f"{r['floor_speedup_vs_sdpa']:.2f}x SDPA); one wave, warp spans {w['warp_spans']:.1f} us, interleaved "
              f"{w['interleaved']:.1f} us (2 buffers: {w['warp_spans_2_buffers']:.1f}, "
              f"{w['interleaved_2_buffers']:.1f}); split read ({r['split_read_us']['splits']} splits) "
              + ", ".join(f"{n} {r['split_read_us'][n]:.1f} us" for n in SPLIT_MODES)
              + f"; ours over 2 layers {r['ours_2_layers_us']:.1f} us; copy_ of the "
              f"bytes {r['copy_same_bytes_us']:7.1f} us; SDPA {r['sdpa_us']:7.1f} us"
              + "".join(f"; {n} {v['us']:.1f} us" for n, v in r["variants"].items()), flush=True)
        torch.cuda.empty_cache()
        result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                      date=datetime.datetime.now().isoformat(timespec="seconds"), copy_GBps=copy_bw, reps=args.reps,
                      kernel_defines=args.define, variants=args.variant, threads=THREADS, rows=rows,
                      notes="floor_us: the fastest plain read of ours_bytes (reads_us: every order and loads "
                            "per thread), per layer-step as the kernel is timed; one_wave_us: reads shaped like the "
                            "kernel; split_read_us: the one-wave read with a split kernel's partials (partials), merged by a "
                            "second kernel (combine_kernel), by each row's last block (last_block) or by the first "
                            "blocks after a grid barrier (grid_barrier); "
                            "copy_same_bytes_us: copy_ of ours_bytes (reads and writes them); "
                            "floor_fraction_of_copy against the 2 GB copy bandwidth copy_GBps.")
        Path(args.out).write_text(json.dumps(result, indent=1))  # after every shape: a run cut short keeps its rows
    print("wrote", args.out)


if __name__ == "__main__":
    main()
