// Fused dequantize + attention for one decode step over the KIVI layout (see nbs/08_cuda.ipynb for the derivation).
//
// One launch of `quantized_kernel`, grid (split, kv head * head group, batch row), then `combine_kernel`. A block has 4
// warps. Split s takes a range of whole 32-token chunks, and the first splits of a row the full-precision window. Each
// warp first attends its quarter of the split's window tokens (copied into the stages its first chunk leaves free, attended on tensor cores 16
// tokens a tile), then walks its quarter of
// the block's 32-token chunks, going on with the same online-softmax state (the main loop has no block barrier),
// copying them into its own shared-memory stages TT_STAGES - 1 chunks ahead of the one it computes (codes, the value
// scales and zeros, and each key block's scale and zero rows; on Hopper one bulk copy per region, asked for by one
// lane, before Hopper cp.async from every lane) and reading the mma fragments from there. The block merges its warps'
// states (running max m, sum l, unnormalised output o) in shared memory into one partial per split; `combine_kernel`
// merges those (on Hopper launched programmatically: its blocks wait on the device, not for a launch).
// The host picks the number of splits so that the grid is one wave of resident blocks spread evenly over the
// multiprocessors where it can.
//
// Quantized part, per warp and chunk, with tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate):
//   scores^T[token, head] = codes[token, :] . (q * key_scale * softmax_scale)[head, :] + q . key_zero * softmax_scale
//     the per-channel key scale of the 128-token block is folded into the query (split into fp16 hi + lo so the
//     product keeps ~22 bits); the integer codes are exact in fp16;
//   out^T[channel, head] += v[token, channel]^T . p[token, head]
//     v = zero + scale * code is formed in fp16 with one rounding (hfma2), p is the fp16 probability.
// The score fragment (rows = tokens) becomes the probability operand (cols = tokens) with one movmatrix.trans.
// Channel order inside the mma is free as long as both operands agree: each lane loads a contiguous slice of a token's
// codes (16-byte loads at 4 bits, head_dim 128) and the query is arranged to match.
#include "decode_attention.h"
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace {

// Variants, chosen by benchmarks/bench_kernel.py --define / --variant (the defaults are the fastest measured on an H200;
// TT_MT, the chunk's size, is in decode_attention.h: the host sizes the splits in chunks):
#ifndef TT_STAGES
#define TT_STAGES 3    // shared-memory stages per warp: TT_STAGES - 1 chunks in flight while one is computed
#endif
#ifndef TT_FOLD
#define TT_FOLD 1      // 1: fold the per-token value scale into the probabilities (calls with one value group):
#endif                 //    the value codes go to the mma as they are (no scale), the zeros add up in fp32 on
                       //    the side (with TT_KEY_INPLACE: up to 12% faster at 4 bits, same error)
#ifndef TT_SUBNORMAL
#define TT_SUBNORMAL 1  // 1: the codes go to the mma as fp16 subnormals (code * 2^-24, exact: the mask alone makes them),
#endif                  //    not as 1024 + code less 1024 (one HADD2 per code pair fewer); 0: the 1024 + code road
#ifndef TT_ABLATE
#define TT_ABLATE 0  // timing only, WRONG results: leave a stage out to see what it costs (time the difference):
#endif               // 1 copy the chunks and nothing else, 2 no value part, 3 no score mma, 4 fold the query once only,
                     // 5 no window (nothing copied or attended), 6 no combine kernel, 7 window copied, not attended
#ifndef TT_KEY_INPLACE
#define TT_KEY_INPLACE 1  // 1: key codes are masked where they lie (one shift serves two to four pairs)
#endif                    //    and the query absorbs their place value
#ifndef TT_MIN_BLOCKS
#define TT_MIN_BLOCKS 3  // resident blocks per SM the compiler must allow (caps registers per thread; 4 spills)
#endif
#ifndef TT_BULK
#define TT_BULK 1      // 1: Hopper's bulk copies bring the chunks (one lane, one instruction per region); 0, and on GPUs
#endif                 //    before Hopper: every lane copies 16-byte pieces with cp.async (same stage layout)
#if TT_BULK && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TT_USE_BULK 1
#else
#define TT_USE_BULK 0
#endif
#ifndef TT_MAX_SLACK
#define TT_MAX_SLACK 4  // > 0: a warp's running max moves only when a score passes it by more than this (log2 units: the
#endif                  //    probabilities stay below 2^TT_MAX_SLACK), so most chunks skip the max's warp reduction;
                        //    0: the exact running max every chunk
#ifndef TT_CARVEOUT
#define TT_CARVEOUT 100  // percent of the unified L1 / shared memory the kernel prefers as shared memory (the rest is L1)
#endif
#ifndef TT_TRACE
#define TT_TRACE 0     // 1: stamp each block's phases with %globaltimer and clock64 (benchmarks/trace_kernel.py reads them)
#endif
#ifndef TT_FIRST_AHEAD
#define TT_FIRST_AHEAD 1  // chunks a warp asks for before it attends the window (the rest of the TT_STAGES - 1 ahead
#endif                    // right after)
#ifndef TT_HALF_FOLD
#define TT_HALF_FOLD 1  // 1: at head_dim <= 128 a key block's scales fold into a hi + lo query staged once per block,
#endif                  //    in fp16 pairs (one multiply and two fused multiply-adds per pair), and its zeros' bias is
                        //    summed on tensor cores; 0: every number in fp32, as head_dim 256 does
#ifndef TT_PDL
#define TT_PDL 1  // 1: the combine kernel is launched programmatically (Hopper's PDL): the split kernel lets it launch at
#endif            //    once, its blocks start as split blocks leave and wait on the device for the split kernel's end
                  //    (0.2-0.8 us sooner per call at batch 1 and 8, kernel_h200_pdl.json); 0: an ordinary launch
#if TT_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TT_USE_PDL 1
#else
#define TT_USE_PDL 0
#endif
#if TT_STAGES < 2
#error "TT_STAGES must be at least 2"
#endif
#if TT_FIRST_AHEAD < 0 || TT_FIRST_AHEAD > TT_STAGES - 1
#error "TT_FIRST_AHEAD must be between 0 and TT_STAGES - 1"
#endif
constexpr int WARPS = 4;         // warps per block of the split kernel

#if TT_TRACE
__device__ unsigned long long trace_clocks[2][TRACE_SLOTS];  // [%globaltimer (ns, one clock for all SMs), clock64][slot]
#endif
__device__ __forceinline__ int block_index() { return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z); }
__device__ __forceinline__ void stamp(int slot) {  // thread 0 of the block (TT_TRACE builds)
#if TT_TRACE
  if (threadIdx.x != 0) return;
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  trace_clocks[0][slot] = t;
  trace_clocks[1][slot] = clock64();
#endif
}
__device__ __forceinline__ void stamp_split(int event) {
  if (TT_TRACE && block_index() < TRACE_SPLIT_BLOCKS) stamp(block_index() * TRACE_SPLIT_EVENTS + event);
}
__device__ __forceinline__ void stamp_sm() {  // the split block's multiprocessor, in the clock64 row of slot 8
#if TT_TRACE
  if (threadIdx.x != 0 || block_index() >= TRACE_SPLIT_BLOCKS) return;
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  trace_clocks[1][block_index() * TRACE_SPLIT_EVENTS + 8] = sm;
#endif
}
__device__ __forceinline__ void stamp_combine(int event) {
  if (TT_TRACE && block_index() < TRACE_COMBINE_BLOCKS) stamp(TRACE_SPLIT_BLOCKS * TRACE_SPLIT_EVENTS + block_index() * 2 + event);
}
constexpr int TILE = 128;        // tokens per key block (key scales are per channel per 128 tokens)
constexpr int MAX_HEADS = 8;     // query heads per block (the mma's n = 8)
constexpr int MAX_VALUE_GROUPS = 8;  // value groups span at least head_dim / 8 channels (one lane's slice)
constexpr uint32_t MAGIC = 0x64006400u;  // fp16 1024 in both halves: (MAGIC | c) is the half 1024 + c for c < 1024
// What the mma operands of codes carry: with TT_SUBNORMAL the bare bits of c < 1024 are the fp16 subnormal c * 2^-24
// (exact, and tensor cores keep fp16 subnormals), so a product is 2^-24 times too small and CODE_UNIT puts it back.
constexpr uint32_t CODE_BIAS = TT_SUBNORMAL ? 0u : MAGIC;
constexpr float CODE_UNIT = TT_SUBNORMAL ? 16777216.f : 1.f;

__device__ __forceinline__ float to_float(uint16_t bits, bool bf16) {  // both conversions, then a select: no branch
  const float from_bf16 = __uint_as_float(uint32_t(bits) << 16), from_half = __half2float(__ushort_as_half(bits));
  return bf16 ? from_bf16 : from_half;
}
__device__ __forceinline__ uint16_t from_float(float x, bool bf16) {
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x)) : __half_as_ushort(__float2half_rn(x));
}
__device__ __forceinline__ uint16_t half_bits_of(uint16_t meta, bool bf16) {  // 16-bit metadata -> fp16 bits
  return bf16 ? __half_as_ushort(__float2half_rn(to_float(meta, true))) : meta;
}
__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 bits_h2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; 2^-inf = 0 (subnormal results flush to zero)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
template <bool BF16 = false>  // the operands' 16-bit type: fp16, or bf16 (the window's tiles in a bf16 model)
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (BF16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// (x & mask) | MAGIC as one LOP3: the instruction takes one immediate (the mask), so MAGIC must come in a register;
// left to itself the compiler spends two LOP3s per code pair instead.
__device__ __forceinline__ uint32_t mask_magic(uint32_t x, uint32_t mask, uint32_t magic) {
  uint32_t y;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(y) : "r"(x), "r"(mask), "r"(magic));
  return y;
}
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

template <bool B> struct Bool { static constexpr bool value = B; };  // a compile-time flag as an argument

// NB bytes from p (aligned to gcd(NB, 16)) into 32-bit words, and one zero word more (gather_bytes may read it).
template <int NB> struct Words { uint32_t w[(NB + 3) / 4 + 1]; };

// One load of a T from global memory through the read-only cache (GLOBAL) or from shared memory (a plain load, LDS).
template <bool GLOBAL, typename T>
__device__ __forceinline__ T load(const T* p) {
  if constexpr (GLOBAL) return __ldg(p);
  else return *p;
}

template <int NB, bool GLOBAL = true>
__device__ __forceinline__ void load_words(const uint8_t* __restrict__ p, Words<NB>& out) {
  constexpr int NW = (NB + 3) / 4 + 1;
#pragma unroll
  for (int i = 0; i < NW; ++i) out.w[i] = 0;
  if constexpr (NB % 16 == 0) {
#pragma unroll
    for (int i = 0; i < NB / 16; ++i) {
      const uint4 v = load<GLOBAL>(reinterpret_cast<const uint4*>(p) + i);
      out.w[4 * i] = v.x; out.w[4 * i + 1] = v.y; out.w[4 * i + 2] = v.z; out.w[4 * i + 3] = v.w;
    }
  } else if constexpr (NB % 8 == 0) {
#pragma unroll
    for (int i = 0; i < NB / 8; ++i) {
      const uint2 v = load<GLOBAL>(reinterpret_cast<const uint2*>(p) + i);
      out.w[2 * i] = v.x; out.w[2 * i + 1] = v.y;
    }
  } else if constexpr (NB % 4 == 0) {
#pragma unroll
    for (int i = 0; i < NB / 4; ++i) out.w[i] = load<GLOBAL>(reinterpret_cast<const uint32_t*>(p) + i);
  } else if constexpr (NB % 2 == 0) {
#pragma unroll
    for (int i = 0; i < NB / 2; ++i)
      out.w[i / 2] |= uint32_t(load<GLOBAL>(reinterpret_cast<const unsigned short*>(p) + i)) << (16 * (i % 2));
  } else {
#pragma unroll
    for (int i = 0; i < NB; ++i) out.w[i / 4] |= uint32_t(load<GLOBAL>(p + i)) << (8 * (i % 4));
  }
}

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// The bulk copies of Hopper's copy engine (TMA, no tensor map): one lane asks for a whole contiguous region (16-byte
// aligned, a multiple of 16 bytes) and the bytes land in shared memory by themselves; the region's bytes count down
// the transaction count of an mbarrier, whose phase completes when they have all landed and its one arrival is made.
__device__ __forceinline__ uint32_t shared_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void barrier_init(uint64_t* bar) {
#if TT_USE_BULK  // (these instructions exist from sm_90 on; other builds never call them)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(shared_address(bar)) : "memory");
#endif
}
__device__ __forceinline__ void proxy_fence() {  // this thread's shared-memory accesses ordered before the copy engine's
#if TT_USE_BULK
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void barrier_init_fence() {  // the barriers' first state seen by the copy engine
#if TT_USE_BULK
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  proxy_fence();
#endif
}
__device__ __forceinline__ void barrier_expect(uint64_t* bar, uint32_t bytes) {  // the one arrival, with its bytes to come
#if TT_USE_BULK
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {  // until the phase of this parity completes
#if TT_USE_BULK
  const uint32_t a = shared_address(bar);
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(a), "r"(parity) : "memory");
#endif
}
__device__ __forceinline__ bool elect_one() {  // true on one lane of the (converged) warp, known so to the compiler
  uint32_t one = 1;
#if TT_USE_BULK
  asm volatile("{\n.reg .pred p;\nelect.sync _|p, 0xffffffff;\nselp.u32 %0, 1, 0, p;\n}\n" : "=r"(one));
#endif
  return one;
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if TT_USE_BULK
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(shared_address(dst)), "l"(src), "r"(bytes), "r"(shared_address(bar)) : "memory");
#endif
}

// Where token r (0-15) of a 16-token mma tile sits among the tile's rows in a stage: within each half of the tile, the
// Gray code of r (0 1 3 2 6 7 5 4). The value fragment loads of one instruction then read rows {0, 3, 6, 5} (or {1, 2,
// 7, 4}): two of each parity, so with 64-byte rows (4-bit, head_dim 128) two land in each half of the banks, and one of
// each residue mod 4, so with 32-byte rows (2-bit head_dim 128, 4-bit head_dim 64) each lands in its own quarter. The
// rows can then stay in the order the copy engine writes them (no swizzle). The mma does not care which token is
// which row as long as the scores, the probabilities and the values agree; tile_row(r + 8) = tile_row(r) + 8, and
// tile_row(2i + 1) - tile_row(2i) is +1 for even i, -1 for odd i (the value scales' pairs rely on both).
__host__ __device__ constexpr int tile_row(int r) { return (r & 8) | ((r & 7) ^ ((r & 7) >> 1)); }

// 3-bit codes (affine.py's layout): in each unit of 8 codes (3 bytes) code j's two low bits (its crumb) sit at bit 2j of
// the first two bytes and its top bit at bit 2 (j % 4) + j / 4 of the third. With the third byte shifted left by 2
// (codes 0-3) or 1 (codes 4-7) every top bit lies right above its crumb, so two masks take a code where it lies
// (two LOP3 per pair of codes, where the plain bit stream of before took a funnel shift and a mask per code).
// Bytes k0..k3 (compile-time indices into the words, within two consecutive ones) as one word, k0 the lowest.
__device__ __forceinline__ uint32_t gather_bytes(const uint32_t* w, int k0, int k1, int k2, int k3) {
  const int base = min(min(k0, k1), min(k2, k3)) / 4;  // (Words holds a zero word past its bytes: w[base + 1] exists)
  const int o = 4 * base;
  return __byte_perm(w[base], w[base + 1], (k0 - o) | (k1 - o) << 4 | (k2 - o) << 8 | (k3 - o) << 12);
}
// code j of two 3-bit units, one per 16-bit half, at bit 2 (j % 4) of each: `crumbs` holds the code's crumb there,
// `tops` the units' third bytes at the bottom of each half (whatever else lies in either is masked off)
__device__ __forceinline__ uint32_t code3_pair(uint32_t crumbs, uint32_t tops, int j) {
  const int pos = 2 * (j % 4);
  return (crumbs & (0x00030003u << pos)) | ((tops << (j < 4 ? 2 : 1)) & (0x00040004u << pos));
}

// Keys: pair i of a lane's slice -> two channels (c0, c1) packed as the halves 1024 + code.
// 4 bits: channels (8m+s, 8m+s+4) sit 16 bits apart in word m, so one shift and one mask extract both; 2 and 3 bits:
// channels (16m+s, 16m+s+8), in word m (2 bits) or in the two 3-bit units of bytes 6m .. 6m+5.
template <int BITS>
__device__ __forceinline__ void key_pair_channels(int i, int& c0, int& c1) {
  if (BITS == 4) { c0 = 8 * (i >> 2) + (i & 3); c1 = c0 + 4; }
  else { c0 = 16 * (i >> 3) + (i & 7); c1 = c0 + 8; }
}
// TT_KEY_INPLACE: pair i's codes start at bit key_raw of each 16-bit half of their word. Instead of shifting them down
// for every pair, the word is shifted by key_shift (shared by two to four pairs) and the codes are masked where they
// then lie, at key_pos < 10, inside the fp16 mantissa: the half is 1024 + 2^key_pos * code, exact. The query entries of
// that pair carry KEY_GAIN / 2^key_pos, so every product carries the same KEY_GAIN, taken out of the scores once.
// (3 bits: key_raw is where the pair's crumbs start; the crumbs of codes 4-7 are shifted down a byte, as at 4 bits.)
constexpr int KEY_GAIN = TT_KEY_INPLACE ? 16 : 1;
constexpr bool KEY_INPLACE = TT_KEY_INPLACE != 0;
template <int BITS> __host__ __device__ constexpr int key_raw(int i) { return BITS == 3 ? 2 * (i % 8) : BITS * (i % (16 / BITS)); }
template <int BITS> __host__ __device__ constexpr int key_shift(int i) {
  return !KEY_INPLACE ? 0 : BITS == 2 ? 6 * (key_raw<2>(i) / 6) : (key_raw<BITS>(i) & 8);
}
template <int BITS> __host__ __device__ constexpr int key_pos(int i) { return KEY_INPLACE ? key_raw<BITS>(i) - key_shift<BITS>(i) : 0; }
template <int BITS> __host__ __device__ constexpr int key_top() {  // the highest key_pos (4, 6, 4 at 2, 3, 4 bits)
  int top = 0;
  for (int i = 0; i < 16; ++i) top = key_pos<BITS>(i) > top ? key_pos<BITS>(i) : top;
  return top;
}

template <int BITS>
__device__ __forceinline__ uint32_t key_pair(const uint32_t* w, int i) {
  if constexpr (BITS == 3) {
    const int k = 6 * (i / 8), j = i % 8;
    const uint32_t crumbs = gather_bytes(w, k, k + 1, k + 3, k + 4) >> key_raw<3>(i) / 8 * 8;  // (a unit's first two bytes per half)
    const uint32_t x = code3_pair(crumbs, gather_bytes(w, k + 2, k + 2, k + 5, k + 5), j);
    return (KEY_INPLACE ? x : x >> 2 * (j % 4)) | CODE_BIAS;
  } else if constexpr (KEY_INPLACE) {
    const uint32_t mask = (((1u << BITS) - 1) * 0x00010001u) << key_pos<BITS>(i);
    return mask_magic(w[i / (16 / BITS)] >> key_shift<BITS>(i), mask, CODE_BIAS);
  }
  if (BITS == 4) return mask_magic(w[i >> 2] >> (4 * (i & 3)), 0x000F000Fu, CODE_BIAS);
  return mask_magic(w[i >> 3] >> (2 * (i & 7)), 0x00030003u, CODE_BIAS);
}

// Values: channels (2mv, 2mv+1) of two tokens a, b -> lo = (a[2mv], b[2mv]), hi = (a[2mv+1], b[2mv+1]), each code at
// bit value_pos of its half (the folded path, TT_FOLD: a half is then 2^value_pos * code, as a subnormal or plus 1024,
// CODE_BIAS, and the output rows are divided by 2^value_pos at the end).
template <int BITS>
__host__ __device__ constexpr int value_pos(int mv, bool hi) {
  return BITS == 4 ? (hi ? 4 : 0) : BITS == 2 ? (mv & 1) * 4 + (hi ? 2 : 0) : 2 * ((2 * mv + hi) % 4);
}
__device__ __forceinline__ uint32_t token_pair_bytes(const uint32_t* wa, const uint32_t* wb, int byte) {
  const int word = byte >> 2, k = byte & 3;
  return __byte_perm(wa[word], wb[word], k | ((4 + k) << 8));  // a.byte -> byte 0, b.byte -> byte 2
}
template <int BITS>
__device__ __forceinline__ void value_pairs_inplace(const uint32_t* wa, const uint32_t* wb, int mv, uint32_t& lo, uint32_t& hi,
                                                    uint32_t bias = CODE_BIAS) {
  if constexpr (BITS == 4 || BITS == 2) {  // both channels in one byte
    const uint32_t x = token_pair_bytes(wa, wb, 2 * mv * BITS / 8);
    constexpr uint32_t field = ((1u << BITS) - 1) * 0x00010001u;
    lo = mask_magic(x, field << value_pos<BITS>(mv, false), bias);
    hi = mask_magic(x, field << value_pos<BITS>(mv, true), bias);
  } else {  // channels 2mv and 2mv + 1: codes j and j + 1 of unit mv / 4
    const int unit = 3 * (mv / 4), j = (2 * mv) % 8;
    const uint32_t crumbs = token_pair_bytes(wa, wb, unit + j / 4), tops = token_pair_bytes(wa, wb, unit + 2);
    lo = code3_pair(crumbs, tops, j) | bias;
    hi = code3_pair(crumbs, tops, j + 1) | bias;
  }
}
// The same with each code at the bottom of its half, plus `bias` (1024 + code, as dequant2 takes them, by default).
template <int BITS>
__device__ __forceinline__ void value_pairs(const uint32_t* wa, const uint32_t* wb, int mv, uint32_t& lo, uint32_t& hi,
                                            uint32_t bias = MAGIC) {
  if constexpr (BITS == 4 || BITS == 2) {
    const uint32_t x = token_pair_bytes(wa, wb, 2 * mv * BITS / 8);
    constexpr uint32_t field = ((1u << BITS) - 1) * 0x00010001u;
    lo = mask_magic(x >> value_pos<BITS>(mv, false), field, bias);
    hi = mask_magic(x >> value_pos<BITS>(mv, true), field, bias);
  } else {
    value_pairs_inplace<BITS>(wa, wb, mv, lo, hi, 0u);
    lo = (lo >> value_pos<BITS>(mv, false)) | bias;
    hi = (hi >> value_pos<BITS>(mv, true)) | bias;
  }
}
__device__ __forceinline__ uint32_t minus1024(uint32_t magic_code) {  // (1024 + x) - 1024 = x, exact
  return h2_bits(__hsub2(bits_h2(magic_code), __float2half2_rn(1024.f)));
}
__device__ __forceinline__ uint32_t code_half2(uint32_t c) {  // two codes with CODE_BIAS -> their fp16 numbers (/ CODE_UNIT)
  return TT_SUBNORMAL ? c : minus1024(c);
}
__device__ __forceinline__ uint32_t dequant2(uint32_t magic_code, __half2 scale, __half2 zero) {
  return h2_bits(__hfma2(bits_h2(minus1024(magic_code)), scale, zero));  // one rounding
}

// The weight 2^(m - M) of a state with running max m in a merge whose max is M; an empty state (m = -inf) weighs 0.
__device__ __forceinline__ float merge_weight(float m, float M) { return m == -INFINITY ? 0.f : exp2f(m - M); }

__device__ __forceinline__ float warp_max_rows(float x) {  // over the 8 lanes sharing tig (the token rows)
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}

__device__ __forceinline__ float warp_sum_rows(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

// The query of the block's heads, its own 16-bit numbers in shared memory ([MAX_HEADS][D], rows past the block's heads
// zero): the window part and each 128-token block's fold read it there (and scale it by softmax scale * log2(e)), not
// from global memory. Loaded in two steps so that its loads go out before the chunks' copies (TT_TRACE: staged 0.3-2
// us sooner).
template <int D> struct QueryLoad {
  static constexpr int UNITS = MAX_HEADS * D / 8;  // 8 numbers (16 bytes) each: one load per thread at head_dim 128
  uint4 v[(UNITS + WARPS * 32 - 1) / (WARPS * 32)];
};
template <int D>
__device__ __forceinline__ void load_query(const DecodeParams& p, QueryLoad<D>& ql) {
  const int b = blockIdx.z, hkv = blockIdx.y / p.head_groups, h0 = (blockIdx.y % p.head_groups) * MAX_HEADS;
  const int GH = min(MAX_HEADS, p.G - h0);
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_sb + int64_t(hkv * p.G + h0) * p.q_sh;
#pragma unroll
  for (int k = 0; k < int(sizeof(ql.v) / sizeof(uint4)); ++k) {
    const int u = threadIdx.x + k * WARPS * 32, g = u / (D / 8), d0 = (u % (D / 8)) * 8;
    ql.v[k] = u < QueryLoad<D>::UNITS && g < GH ? __ldg(reinterpret_cast<const uint4*>(q + g * p.q_sh + d0)) : make_uint4(0, 0, 0, 0);
  }
}
template <int D>
__device__ __forceinline__ void stage_query(const QueryLoad<D>& ql, uint16_t* staged) {
#pragma unroll
  for (int k = 0; k < int(sizeof(ql.v) / sizeof(uint4)); ++k) {
    const int u = threadIdx.x + k * WARPS * 32, g = u / (D / 8), d0 = (u % (D / 8)) * 8;
    if (u < QueryLoad<D>::UNITS) reinterpret_cast<uint4*>(staged + g * D + d0)[0] = ql.v[k];
  }
  __syncthreads();
}

// The window tokens [lo, hi) of this warp: split s of the launch takes [s * window_per_split, (s + 1) *
// window_per_split), a quarter to each warp. A fixed window (CUDA graphs) says on the device how many it holds.
struct TokenRange { int lo, hi; };
__device__ __forceinline__ TokenRange window_range(const DecodeParams& p, int warp) {
  if (TT_ABLATE == 5) return {0, 0};
  const int nw = p.window_length ? int(min(*p.window_length, int64_t(p.nw))) : p.nw;
  const int per_warp = (p.window_per_split + WARPS - 1) / WARPS;
  const int s_lo = blockIdx.x * p.window_per_split, s_hi = min(nw, s_lo + p.window_per_split);
  const int lo = s_lo + warp * per_warp;
  return {lo, min(s_hi, lo + per_warp)};
}

// The window's rows: each warp copies its share into the stages its first chunks leave free (the loop refills them only
// after the window is attended) as its first cp.async group, ahead of its first chunks' copies: keys, then values, `room`
// rows of each. Rows past the room (a wide window over few splits) are read from global memory. (TT_TRACE: the window is
// attended 5-14 us into a call either way, because every warp's first requests come back together; against plain loads
// issued after the chunks' copies, between 1.8 us sooner and 2.6 us later on five shapes.)
// In a staged row the 16-byte unit u sits at unit u ^ (j & 7) (an XOR swizzle within the row): the 8 rows an ldmatrix
// reads at once (2D bytes apart) then fall on 8 different bank groups, not all on the same 4 banks (08_cuda models it).
__host__ __device__ constexpr int window_unit(int j, int u) { return u ^ (j & 7); }
template <int D>
__device__ __forceinline__ const uint16_t* window_row(const DecodeParams& p, bool values, int64_t t) {  // row t's start
  const int b = blockIdx.z, hkv = blockIdx.y / p.head_groups;
  return values ? static_cast<const uint16_t*>(p.wv) + b * p.wv_sb + hkv * p.wv_sh + t * p.wv_st
                : static_cast<const uint16_t*>(p.wk) + b * p.wk_sb + hkv * p.wk_sh + t * p.wk_st;
}
template <int D>
__device__ __forceinline__ void copy_window(const DecodeParams& p, TokenRange r, uint8_t* staged, int room) {
  constexpr int UNITS = D / 8;  // 16-byte units in a row
  const int lane = threadIdx.x & 31, n = max(0, min(r.hi - r.lo, room));
#pragma unroll 1  // (a few rows at most: short code, as every warp runs it before its first copies)
  for (int i = lane; i < n * UNITS; i += 32) {  // unit u of row j: its key, then its value
    const int j = i / UNITS, u = i % UNITS;
    cp_async16(staged + j * 2 * D + 16 * window_unit(j, u), window_row<D>(p, false, r.lo + j) + 8 * u);
    cp_async16(staged + (room + j) * 2 * D + 16 * window_unit(j, u), window_row<D>(p, true, r.lo + j) + 8 * u);
  }
  cp_async_commit();
}
__device__ __forceinline__ uint32_t word_of(const uint4& v, int k) {  // k a compile-time constant
  return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}
// Two floats as a pair of the mma's 16-bit numbers (a in the low half), rounded to nearest.
template <bool BF16>
__device__ __forceinline__ uint32_t pack16(float a, float b) {
  if constexpr (BF16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    return h2_bits(__floats2half2_rn(a, b));
  }
}
// ... as two pairs whose sum is a and b: the rounded numbers and what rounding left (about 22 bits in fp16, 16 in bf16).
template <bool BF16>
__device__ __forceinline__ void pack16_split(float a, float b, uint32_t& hi, uint32_t& lo) {
  hi = pack16<BF16>(a, b);
  lo = pack16<BF16>(a - to_float(uint16_t(hi), BF16), b - to_float(uint16_t(hi >> 16), BF16));
}

// TT_HALF_FOLD: the pairs of the query that meet key pair i of a lane's slice (key_pair_channels), times the softmax
// scale * log2(e) and the pair's KEY_GAIN / 2^key_pos, as fp16 hi and lo parts (pack16_split: about 22 bits), for every
// lane's head (gid) and slice (tig). Word [k-step i / 2][lane][i % 2][hi, lo]: the 16 bytes of a lane's k-step are one
// load (conflict-free across the warp) and, as they lie, the A operand of the bias mma (rows gid: hi, gid + 8: lo).
template <int D, int KB>
__device__ __forceinline__ void stage_folded_query(const DecodeParams& p, const uint16_t* qs, uint32_t* qf) {
  constexpr int NP = D / 8, SEGK = D / 4;
#pragma unroll
  for (int u = threadIdx.x; u < 32 * NP; u += WARPS * 32) {
    const int ln = u & 31, i = u >> 5, h = ln >> 2, t = ln & 3;
    int c0, c1;
    key_pair_channels<KB>(i, c0, c1);
    const float gain = float(KEY_GAIN) / float(1 << key_pos<KB>(i)) * p.scale_log2;
    const uint16_t* q = qs + h * D + t * SEGK;
    uint32_t hi, lo;
    pack16_split<false>(to_float(q[c0], p.is_bf16) * gain, to_float(q[c1], p.is_bf16) * gain, hi, lo);
    const int w = ((i >> 1) * 32 + ln) * 4 + (i & 1) * 2;
    qf[w] = hi;
    qf[w + 1] = lo;
  }
  __syncthreads();
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {  // four 8x8 16-bit tiles, mma's A layout
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(p)));
}

// The window attended first, before the quantized chunks, on tensor cores: 16 tokens a tile, its keys and values as
// stored (the model's 16-bit numbers, so a bf16 model's go through bf16 mma), the same two products as a quantized
// chunk's: scores^T[token, head] = keys . (q * softmax scale * log2 e), the query as hi + lo parts (two mma per step),
// and out^T[channel, head] += values^T . p. The keys come by ldmatrix (channels in their order); each value fragment
// pairs two tokens' numbers of a channel with one byte permute, so that the accumulator rows are the loop's (this lane:
// channels gid * D/8 + 2mv and + 1, heads 2tig and 2tig + 1). The online softmax is the loop's, which goes on from the
// state left here: m per head (the same on the 8 lanes of a head), l this lane's share of the rows, folded rows in the
// loop's units. Tokens past the warp's last are its last again, masked.
template <int D, int VB, bool BF16>
__device__ __forceinline__ void window_tiles(const DecodeParams& p, const uint16_t* qs, bool fold, TokenRange r,
                                             const uint8_t* staged, int room, float (&m)[2], float (&l)[2],
                                             float (&acc)[D / 16][4]) {
  constexpr int KS = D / 16, VU = D / 64;  // k-steps of a score mma; 16-byte units of a lane's value slice
  if (r.hi <= r.lo) return;
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const uint8_t* mask = p.mask ? p.mask + blockIdx.z * p.mask_sb + p.nq : nullptr;
  uint32_t qh[2 * KS], ql[2 * KS];  // head gid's query: channels 16kk + 2tig, + 1 (entry 2kk) and 8 more (2kk + 1)
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(qs + gid * D);
#pragma unroll
  for (int i = 0; i < 2 * KS; ++i) {
    const uint32_t w = qw[8 * (i >> 1) + 4 * (i & 1) + tig];
    pack16_split<BF16>(to_float(uint16_t(w), BF16) * p.scale_log2, to_float(uint16_t(w >> 16), BF16) * p.scale_log2,
                       qh[i], ql[i]);
  }
  const uint8_t* key_rows = reinterpret_cast<const uint8_t*>(window_row<D>(p, false, r.lo));  // in global memory
  const uint8_t* value_rows = reinterpret_cast<const uint8_t*>(window_row<D>(p, true, r.lo));
  // one tile of tokens from t0: from the stage where all its rows have room there, else from global memory
  auto tile = [&](int t0, auto staged_tile) {
    constexpr bool STAGED = decltype(staged_tile)::value;
    float cc[4] = {0.f, 0.f, 0.f, 0.f}, cl[4] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (STAGED) {  // lane i addresses row i % 16 of the tile, the k-step's second 8 channels from lane 16
      const int j = min(t0 + (lane & 15), r.hi - 1) - r.lo;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[4];
        ldmatrix_x4(a, staged + j * 2 * D + 16 * window_unit(j, 2 * kk + (lane >> 4)));
        mma16816<BF16>(cc, a[0], a[1], a[2], a[3], qh[2 * kk], qh[2 * kk + 1]);
        mma16816<BF16>(cl, a[0], a[1], a[2], a[3], ql[2 * kk], ql[2 * kk + 1]);
      }
    } else {  // rows gid and gid + 8, the words of the same channels
      const uint32_t* ka = reinterpret_cast<const uint32_t*>(key_rows + (min(t0 + gid, r.hi - 1) - r.lo) * 2 * p.wk_st);
      const uint32_t* kb = reinterpret_cast<const uint32_t*>(key_rows + (min(t0 + gid + 8, r.hi - 1) - r.lo) * 2 * p.wk_st);
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const int w = 8 * kk + tig;
        const uint32_t a0 = __ldg(ka + w), a1 = __ldg(kb + w), a2 = __ldg(ka + w + 4), a3 = __ldg(kb + w + 4);
        mma16816<BF16>(cc, a0, a1, a2, a3, qh[2 * kk], qh[2 * kk + 1]);
        mma16816<BF16>(cl, a0, a1, a2, a3, ql[2 * kk], ql[2 * kk + 1]);
      }
    }
    // scores: rows tokens t0 + gid and t0 + gid + 8, columns heads 2tig and 2tig + 1
    const bool va = t0 + gid < r.hi && (!mask || mask[t0 + gid]);
    const bool vb = t0 + gid + 8 < r.hi && (!mask || mask[t0 + gid + 8]);
    float s[4] = {va ? cc[0] + cl[0] : -INFINITY, va ? cc[1] + cl[1] : -INFINITY,
                  vb ? cc[2] + cl[2] : -INFINITY, vb ? cc[3] + cl[3] : -INFINITY};
    float alpha[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {  // the exact running max (the window comes first: no slack yet)
      const float mn = fmaxf(m[e], warp_max_rows(fmaxf(s[e], s[e + 2])));
      const float base = mn == -INFINITY ? 0.f : mn;  // nothing attended yet: exp2(-inf - 0) = 0, not NaN
      alpha[e] = fast_exp2(m[e] - base);
      m[e] = mn;
      s[e] = fast_exp2(s[e] - base);
      s[e + 2] = fast_exp2(s[e + 2] - base);
      l[e] = fmaf(l[e], alpha[e], s[e] + s[e + 2]);
    }
    if (t0 != r.lo) {  // (before the first tile the accumulators are zero)
#pragma unroll
      for (int mv = 0; mv < D / 16; ++mv) {
        acc[mv][0] *= alpha[0]; acc[mv][1] *= alpha[1]; acc[mv][2] *= alpha[0]; acc[mv][3] *= alpha[1];
      }
    }
    // p as the second operand (tokens 2tig, 2tig + 1 and 8 more; head gid): in fp16 once, in bf16 as hi + lo (its 8 bits
    // alone would cost up to 2^-9 of each probability)
    uint32_t bh[2], bl[2];
    pack16_split<BF16>(s[0], s[1], bh[0], bl[0]);
    pack16_split<BF16>(s[2], s[3], bh[1], bl[1]);
#pragma unroll
    for (int i = 0; i < 2; ++i) { bh[i] = transpose8x8(bh[i]); if (BF16) bl[i] = transpose8x8(bl[i]); }
    int jv[4];  // value rows: tokens t0 + 2tig, + 1, + 8, + 9
#pragma unroll
    for (int k = 0; k < 4; ++k) jv[k] = min(t0 + 2 * tig + (k & 1) + 8 * (k >> 1), r.hi - 1) - r.lo;
#pragma unroll
    for (int u = 0; u < VU; ++u) {  // unit u of this lane's value slice: value tiles (channel pairs) 4u .. 4u + 3
      uint4 v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int unit = gid * VU + u;
        if constexpr (STAGED) v[k] = *reinterpret_cast<const uint4*>(staged + (room + jv[k]) * 2 * D + 16 * window_unit(jv[k], unit));
        else v[k] = __ldg(reinterpret_cast<const uint4*>(value_rows + jv[k] * 2 * p.wv_st) + unit);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t w0 = word_of(v[0], k), w1 = word_of(v[1], k), w8 = word_of(v[2], k), w9 = word_of(v[3], k);
        const uint32_t a0 = __byte_perm(w0, w1, 0x5410), a1 = __byte_perm(w0, w1, 0x7632);  // channel 2mv; 2mv + 1
        const uint32_t a2 = __byte_perm(w8, w9, 0x5410), a3 = __byte_perm(w8, w9, 0x7632);
        mma16816<BF16>(acc[4 * u + k], a0, a1, a2, a3, bh[0], bh[1]);
        if (BF16) mma16816<BF16>(acc[4 * u + k], a0, a1, a2, a3, bl[0], bl[1]);
      }
    }
  };
  for (int t0 = r.lo; t0 < r.hi; t0 += 16) {
    if (min(t0 + 15, r.hi - 1) - r.lo < room) tile(t0, Bool<true>());
    else tile(t0, Bool<false>());
  }
  if (fold) {  // into the loop's units (powers of two: exact)
#pragma unroll
    for (int mv = 0; mv < D / 16; ++mv) {
      const float lo = float(1 << value_pos<VB>(mv, false)) / CODE_UNIT, hi = float(1 << value_pos<VB>(mv, true)) / CODE_UNIT;
      acc[mv][0] *= lo; acc[mv][1] *= lo; acc[mv][2] *= hi; acc[mv][3] *= hi;
    }
  }
}

// One warp's shared-memory stage: the key codes and value codes of one chunk, then the chunk's value scales and zeros
// ([token][group]: room for the call's value groups, so a stage's size is the call's). Each region is one bulk copy.
// Beside the stages, each warp has two slots for key blocks' scale and zero rows (block t's in slot t & 1, copied with
// the block's first chunk, or with the warp's first chunk inside it). Shared memory of a block: the query (16-bit),
// (the hi + lo query of TT_HALF_FOLD,) the key row slots, the stages' mbarriers, then the stages.
template <int D, int KB, int VB>
struct Stage {
  static constexpr int CH = CHUNK_TOKENS, KR = D * KB / 8, VR = D * VB / 8;  // tokens, bytes per key/value row
  static constexpr int KEYS = 0, VALUES = CH * KR, META = CH * (KR + VR);  // META: the value scales, then their zeros
  static_assert(VALUES % 128 == 0 && META % 128 == 0, "regions start on 128 bytes (the value loads' bank pattern)");
  __host__ __device__ static constexpr int meta_bytes(int vgroups) { return CH * vgroups * 2; }  // scales (or zeros)
  __host__ __device__ static constexpr int bytes(int vgroups) { return META + 2 * meta_bytes(vgroups); }
};
template <int D> __host__ __device__ constexpr int query_bytes() { return MAX_HEADS * D * 2; }
// (TT_HALF_FOLD) the query's hi + lo parts in the lanes' pair order, D / 8 pairs per lane: not at head_dim 256, whose
// 8 KB more would leave room for one block per multiprocessor instead of two
template <int D> __host__ __device__ constexpr bool half_fold() { return TT_HALF_FOLD && D <= 128; }
template <int D> __host__ __device__ constexpr int folded_query_bytes() { return half_fold<D>() ? 32 * D : 0; }
template <int D> __host__ __device__ constexpr int key_rows_offset() {
  return query_bytes<D>() + folded_query_bytes<D>();
}
template <int D> __host__ __device__ constexpr int key_rows_bytes() { return WARPS * 2 * 4 * D; }  // 2 slots per warp
constexpr int BARRIER_BYTES = (WARPS * TT_STAGES * 8 + 127) / 128 * 128;                           // an mbarrier per stage
template <int D> __host__ __device__ constexpr int stages_offset() {
  return key_rows_offset<D>() + key_rows_bytes<D>() + BARRIER_BYTES;
}
template <int D, int KB, int VB>
__host__ __device__ constexpr int shared_bytes(int vgroups) {
  static_assert(TT_STAGES * Stage<D, KB, VB>::bytes(1) >= MAX_HEADS * (D + 2) * 4, "the stages hold the merge buffers after the loop");
  return stages_offset<D>() + WARPS * TT_STAGES * Stage<D, KB, VB>::bytes(vgroups);
}

// MASKED: the call has a key mask (p.mask). Without one the main loop has no mask code at all: 29 of its 410 SASS
// instructions per chunk (head_dim 128, 4-bit), which a run-time test left in place as predicated loads and selects.
template <int D, int KB, int VB, bool MASKED>
__global__ void __launch_bounds__(WARPS * 32, D == 256 ? 1 : TT_MIN_BLOCKS) quantized_kernel(const DecodeParams p) {
  constexpr int SEGK = D / 4, SEGK_B = SEGK * KB / 8;  // a lane's slice of a key row: channels, bytes
  constexpr int SEGV = D / 8, SEGV_B = SEGV * VB / 8;  // a lane's slice of a value row
  constexpr int NP = D / 8;                            // key channel pairs per lane
  constexpr int NMV = D / 16;                          // value channel tiles (mma m = 16 channels)
  using St = Stage<D, KB, VB>;
  constexpr int MT = TT_MT, CH = St::CH, CPT = TILE / CH;  // 16-token mma tiles per chunk, tokens, chunks per key block
  stamp_split(0);  // phases of a block (TT_TRACE): 0 start
  stamp_sm();      // (and the multiprocessor it runs on)
#if TT_USE_PDL
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");  // the combine kernel may launch now (TT_PDL)
#endif
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  // the warp's index through a shuffle from lane 0: the compiler then knows it is the same on every lane and keeps what
  // derives from it (the chunk index, the copies' addresses) in uniform registers, as the bulk copies need them
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x >> 5), 0);
  // the block's first request, the query's loads, before the chunks' addresses are worked out (after them: 0.995-0.999x
  // the speed on 9 shapes, kernel_h200_ab_query_first.json)
  QueryLoad<D> query;
  load_query<D>(p, query);
  const int b = blockIdx.z, hkv = blockIdx.y / p.head_groups, h0 = (blockIdx.y % p.head_groups) * MAX_HEADS;
  const int GH = min(MAX_HEADS, p.G - h0);
  const bool bf16 = p.is_bf16;
  // the split's share of the row's chunks (it may start or end inside a 128-token key block), a quarter of it for each
  // warp: the row's chunks plus the window splits' discounts, split evenly, then the discount taken back from each of
  // the first window_splits. Sized on the host: two int64 divisions here cost ~1 us at every block's start
  // (kernel_h200_slot_decay.json).
  const int x = blockIdx.x, discounts_before = min(x, p.window_splits) * p.window_discount;
  const int s_begin = x * p.split_chunks + min(x, p.split_extra) - discounts_before;
  const int nc = p.split_chunks + (x < p.split_extra) - (x < p.window_splits ? p.window_discount : 0);
  const int c_begin = s_begin + nc * warp / WARPS, c_end = s_begin + nc * (warp + 1) / WARPS;

  const uint8_t* kc = p.kc + b * p.kc_sb + hkv * p.kc_sh;
  const uint16_t* ks = static_cast<const uint16_t*>(p.ks) + b * p.km_sb + hkv * p.km_sh;
  const uint16_t* kz = static_cast<const uint16_t*>(p.kz) + b * p.km_sb + hkv * p.km_sh;
  const uint8_t* vc = p.vc + b * p.vc_sb + hkv * p.vc_sh;
  const uint16_t* vs = static_cast<const uint16_t*>(p.vs) + b * p.vm_sb + hkv * p.vm_sh;
  const uint16_t* vz = static_cast<const uint16_t*>(p.vz) + b * p.vm_sb + hkv * p.vm_sh;
  const uint8_t* mask = MASKED ? p.mask + b * p.mask_sb : nullptr;
  const int vgroups = p.vgroups, vgroup = (gid * SEGV) / (D / vgroups);  // the host checks a lane's slice is in one group
  const bool fold = TT_FOLD && vgroups == 1;  // value scale folded into the probabilities

  // Each warp streams its chunks through TT_STAGES shared-memory stages of its own, TT_STAGES - 1 chunks ahead of the
  // one being computed: one lane asks the copy engine for a chunk's regions (key codes, value codes, value scales and
  // zeros, and a key block's scale and zero rows with the block's first chunk), and the stage's mbarrier says when they
  // have landed. Only __syncwarp is needed: no warp reads another warp's stages.
  extern __shared__ __align__(128) uint8_t shared_raw[];
  uint16_t* qs = reinterpret_cast<uint16_t*>(shared_raw);
  uint32_t* qf = reinterpret_cast<uint32_t*>(shared_raw + query_bytes<D>());  // (half_fold) the hi + lo query
  uint8_t* key_rows = shared_raw + key_rows_offset<D>() + warp * 2 * 4 * D;  // this warp's two slots
  uint64_t* landed =
      reinterpret_cast<uint64_t*>(shared_raw + key_rows_offset<D>() + key_rows_bytes<D>()) + warp * TT_STAGES;
  const int stage_bytes = St::bytes(vgroups);
  uint8_t* stages = shared_raw + stages_offset<D>() + warp * TT_STAGES * stage_bytes;
  if (TT_USE_BULK && lane == 0) {
#pragma unroll
    for (int i = 0; i < TT_STAGES; ++i) barrier_init(landed + i);
    barrier_init_fence();
  }
  __syncwarp();
  const uint32_t meta_bytes = St::meta_bytes(vgroups);  // a chunk's value scales (as many bytes of zeros)
  // the next chunk to ask for, and where its regions start (running pointers: the addresses stay in uniform registers)
  int next_c = c_begin, next_stage = 0;
  const uint8_t* next_keys = kc + int64_t(c_begin) * St::VALUES;  // CH * KR bytes per chunk
  const uint8_t* next_values = vc + int64_t(c_begin) * (St::META - St::VALUES);
  const uint16_t* next_scales = vs + int64_t(c_begin) * CH * vgroups;
  const uint16_t* next_zeros = vz + int64_t(c_begin) * CH * vgroups;
  auto copy = [&](void* dst, const void* src, uint32_t bytes, int stage) {  // one region of a chunk
    if (TT_USE_BULK) { bulk_copy(dst, src, bytes, landed + stage); return; }  // (by the one elected lane)
    for (int u = lane; u < int(bytes / 16); u += 32)  // (before Hopper: 16 bytes per lane at a time)
      cp_async16(static_cast<uint8_t*>(dst) + 16 * u, static_cast<const uint8_t*>(src) + 16 * u);
  };
  auto issue_next = [&]() {  // the next chunk into the next stage (nothing past the warp's last chunk)
    const int c = next_c, stage = next_stage;
    if (c < c_end) {
      uint8_t* dst = stages + stage * stage_bytes;
      const bool key_block = c == c_begin || c % CPT == 0;  // the chunk that starts a key block (or this warp's run)
      if (!TT_USE_BULK || elect_one()) {
        if (TT_USE_BULK) barrier_expect(landed + stage, stage_bytes + (key_block ? 4 * D : 0));
        copy(dst + St::KEYS, next_keys, St::VALUES, stage);
        copy(dst + St::VALUES, next_values, St::META - St::VALUES, stage);
        copy(dst + St::META, next_scales, meta_bytes, stage);
        copy(dst + St::META + meta_bytes, next_zeros, meta_bytes, stage);
        if (key_block) {
          uint8_t* rows = key_rows + (c / CPT & 1) * 4 * D;
          const int64_t row = int64_t(c / CPT) * D;
          copy(rows, ks + row, 2 * D, stage);
          copy(rows + 2 * D, kz + row, 2 * D, stage);
        }
      }
      __syncwarp();
      next_c = c + 1;
      next_stage = stage + 1 == TT_STAGES ? 0 : stage + 1;
      next_keys += St::VALUES; next_values += St::META - St::VALUES;
      next_scales += CH * vgroups; next_zeros += CH * vgroups;
    }
    if (!TT_USE_BULK) cp_async_commit();  // a group per call, empty past the end: the wait counts stay uniform
  };
  // first out (after the query's loads, above): the window's copies (a few KB), then the first chunk's; the next
  // chunks' after the window is attended (TT_FIRST_AHEAD: asking for fewer bytes at the start brings the first ones
  // sooner, and it was 1.004-1.026x faster on 9 shapes than asking for two chunks at once, kernel_h200_ab_ahead.json)
  const TokenRange wr = window_range(p, warp);
  uint8_t* window_stage = stages + TT_FIRST_AHEAD * stage_bytes;  // free until the loop's first refills
  const int window_room = (TT_STAGES - TT_FIRST_AHEAD) * stage_bytes / (4 * D);  // rows of keys and of values they hold
  copy_window<D>(p, wr, window_stage, window_room);
#pragma unroll
  for (int i = 0; i < TT_FIRST_AHEAD; ++i) issue_next();
  stamp_split(7);  // 7 (out of order) the first chunks' copies asked for
  stage_query<D>(query, qs);
  if (half_fold<D>()) stage_folded_query<D, KB>(p, qs, qf);
  stamp_split(1);  // 1 query staged

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  uint32_t sink = 0;  // TT_ABLATE == 1 only
  float acc[NMV][4];
#pragma unroll
  for (int i = 0; i < NMV; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float zsum_part[2] = {0.f, 0.f};  // (fold) this lane's share of sum_t p_t z_t for heads 2tig, 2tig+1 (tokens gid, gid+8)
  float base[2];                     // what the scores' exponents are taken from: m_run, or 0 while it is -inf
  if (TT_USE_BULK) cp_async_wait<0>();   // the window's rows have landed (the only cp.async group) ...
  else cp_async_wait<TT_FIRST_AHEAD>();  // (the oldest group, ahead of the first chunks')
  __syncwarp();                          // ... for every lane; the first chunks are still on their way
  if (TT_ABLATE == 7) {}  // (timing: the rows copied, not attended)
  else if (bf16) window_tiles<D, VB, true>(p, qs, fold, wr, window_stage, window_room, m_run, l_run, acc);
  else window_tiles<D, VB, false>(p, qs, fold, wr, window_stage, window_room, m_run, l_run, acc);
  // the window's stage was written by cp.async and read by this warp; the copy engine refills it next: order the two
  // proxies' accesses (PTX asks for a proxy fence between them)
  if (TT_USE_BULK) proxy_fence();
#pragma unroll
  for (int i = TT_FIRST_AHEAD; i < TT_STAGES - 1; ++i) issue_next();
  base[0] = m_run[0] == -INFINITY ? 0.f : m_run[0];
  base[1] = m_run[1] == -INFINITY ? 0.f : m_run[1];
  stamp_split(2);  // 2 window attended (warp 0, as the rest)
  uint32_t qh[NP], ql[NP];
  float bias[2] = {0.f, 0.f};
  int cur_tile = -1;
  // where this lane's value scales sit in a stage ([token][group] 16-bit numbers): tokens 2tig + 8r (and the next one)
  // of tile mt, the rows of the value mma; with fold, tokens gid + 8r, the rows of the probabilities they multiply
  int meta_at[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      meta_at[mt][r] = fold ? 16 * mt + tile_row(gid) + 8 * r : (16 * mt + tile_row(2 * tig) + 8 * r) * vgroups + vgroup;

  // A chunk's codes as this lane's mma fragments need them.
  struct Chunk {
    Words<SEGK_B> kw[MT][2];
    Words<SEGV_B> vw[MT][4];
  };

  // st: the chunk's stage (codes, the key block's scale and zero rows where the chunk brought them, value scales)
  auto compute_chunk = [&](const Chunk& ch, const uint8_t* st, int c) {
    const int tile = c / CPT, tok0 = c * CH;
    if (tile != cur_tile && (TT_ABLATE != 4 || cur_tile < 0)) {  // fold this block's key scales into the query, its zeros into a per-head bias
      cur_tile = tile;
      const uint16_t* key_scale_row = reinterpret_cast<const uint16_t*>(key_rows + (tile & 1) * 4 * D);
      const uint16_t* key_zero_row = key_scale_row + D;
      const uint16_t* qg = qs + gid * D;  // this lane's head (a zero row past the block's heads)
      float bias_part = 0.f;  // (times softmax scale * log2(e) at the end, as the query's entries in the products)
      // the fold's 16-bit numbers converted with the model's dtype known at compile time (one instruction each, not
      // both conversions and a select): the branch is the same on every lane, and only this code is there twice
      auto fold_rows = [&](auto dtype) {
      constexpr bool bf16 = decltype(dtype)::value;
#pragma unroll
      for (int j = 0; j < SEGK / 16; ++j) {
        const int ch0 = tig * SEGK + 16 * j;
        float qf[16], sf[16], zf[16];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint4 sv = reinterpret_cast<const uint4*>(key_scale_row + ch0)[h];
          const uint4 zv = reinterpret_cast<const uint4*>(key_zero_row + ch0)[h];
          const uint32_t sa[4] = {sv.x, sv.y, sv.z, sv.w}, za[4] = {zv.x, zv.y, zv.z, zv.w};
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int sh = 16 * (e & 1);
            sf[8 * h + e] = to_float(uint16_t(sa[e >> 1] >> sh), bf16);
            zf[8 * h + e] = to_float(uint16_t(za[e >> 1] >> sh), bf16);
          }
          const uint4 qv = reinterpret_cast<const uint4*>(qg + ch0 + 8 * h)[0];  // 8 of the query's own numbers
          const uint32_t qa[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
          for (int e = 0; e < 8; ++e) qf[8 * h + e] = to_float(uint16_t(qa[e >> 1] >> (16 * (e & 1))), bf16);
        }
#pragma unroll
        for (int e = 0; e < 16; ++e) bias_part = fmaf(qf[e], zf[e], bias_part);
#pragma unroll
        for (int i = 8 * j; i < 8 * j + 8; ++i) {
          int c0, c1;
          key_pair_channels<KB>(i, c0, c1);
          c0 -= 16 * j; c1 -= 16 * j;
          const float gain = float(KEY_GAIN) / float(1 << key_pos<KB>(i)) * p.scale_log2;  // (a power of two times it)
          const float v0 = qf[c0] * sf[c0] * gain, v1 = qf[c1] * sf[c1] * gain;
          pack16_split<false>(v0, v1, qh[i], ql[i]);
        }
      }
      };
      float head_bias;  // this lane's head's (gid)
      if (half_fold<D>()) {
        // TT_HALF_FOLD: the staged query q (hi + lo, softmax scale and gain in) times the scales s in fp16 pairs:
        // hi = q_hi s rounded, then lo = q_lo s + (q_hi s - hi), each fused multiply-add rounding once: about 22 bits,
        // as in fp32. The bias sum_c q_c z_c on tensor cores, one mma per k-step: A the staged query (rows gid: its hi
        // part, gid + 8: its lo part), B the zeros in every column, each pair's times 2^(key_pos - top) (exact, and
        // never above the stored zeros) to cancel the query's 2^-key_pos; this lane's rows give head gid's bias. A
        // bf16 model's scales and zeros become fp16 first: beyond 65504 they would overflow (as the products of the
        // query and the scales already did in the fp32 fold), below 6e-5 they keep 2^-24 absolute.
        constexpr int TOP = key_top<KB>();
        float bq[4] = {0.f, 0.f, 0.f, 0.f};  // rows gid and gid + 8: head gid's bias from the hi and the lo parts
        auto half_fold_rows = [&](auto dtype) {
        constexpr bool bf16 = decltype(dtype)::value;
        // the halves c0 and c1 of the 16-bit numbers in w as an fp16 pair
        auto pair = [](const uint32_t (&w)[8], int c0, int c1) -> uint32_t {
          if constexpr (bf16) {
            return pack16<false>(to_float(uint16_t(w[c0 >> 1] >> 16 * (c0 & 1)), true),
                                 to_float(uint16_t(w[c1 >> 1] >> 16 * (c1 & 1)), true));
          } else {
            return __byte_perm(w[c0 >> 1], w[c1 >> 1], (c0 & 1 ? 0x32u : 0x10u) | (c1 & 1 ? 0x7600u : 0x5400u));
          }
        };
        const uint4* qf4 = reinterpret_cast<const uint4*>(qf);
#pragma unroll
        for (int j = 0; j < SEGK / 16; ++j) {
          const int ch0 = tig * SEGK + 16 * j;
          uint32_t sa[8], za[8];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint4 sv = reinterpret_cast<const uint4*>(key_scale_row + ch0)[h];
            const uint4 zv = reinterpret_cast<const uint4*>(key_zero_row + ch0)[h];
#pragma unroll
            for (int k = 0; k < 4; ++k) { sa[4 * h + k] = word_of(sv, k); za[4 * h + k] = word_of(zv, k); }
          }
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const uint4 q4 = qf4[(4 * j + kk) * 32 + lane];  // pairs 2kk, 2kk + 1 of this j: hi, lo, hi, lo
            uint32_t zp[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int i = 8 * j + 2 * kk + e;
              int c0, c1;
              key_pair_channels<KB>(i, c0, c1);
              c0 -= 16 * j; c1 -= 16 * j;
              const __half2 s2 = bits_h2(pair(sa, c0, c1));
              const __half2 qhi = bits_h2(word_of(q4, 2 * e)), hi = __hmul2(qhi, s2);
              qh[i] = h2_bits(hi);
              ql[i] = h2_bits(__hfma2(bits_h2(word_of(q4, 2 * e + 1)), s2, __hfma2(qhi, s2, __hneg2(hi))));
              const uint32_t z2 = pair(za, c0, c1);
              const float down = 1.f / float(1 << (TOP - key_pos<KB>(i)));  // a power of two: exact
              zp[e] = key_pos<KB>(i) == TOP ? z2 : h2_bits(__hmul2(bits_h2(z2), __float2half2_rn(down)));
            }
            mma16816(bq, q4.x, q4.y, q4.z, q4.w, zp[0], zp[1]);
          }
        }
        };
        if (bf16) half_fold_rows(Bool<true>());
        else half_fold_rows(Bool<false>());
        head_bias = (bq[0] + bq[2]) * (float(1 << TOP) / float(KEY_GAIN));  // (bq[1], bq[3]: the same again)
      } else {
        if (bf16) fold_rows(Bool<true>());
        else fold_rows(Bool<false>());
        bias_part += __shfl_xor_sync(0xffffffffu, bias_part, 1);
        head_bias = (bias_part + __shfl_xor_sync(0xffffffffu, bias_part, 2)) * p.scale_log2;
      }
      bias[0] = __shfl_sync(0xffffffffu, head_bias, 8 * tig);      // head 2*tig lives on lanes 4*(2*tig) + ...
      bias[1] = __shfl_sync(0xffffffffu, head_bias, 8 * tig + 4);  // head 2*tig + 1
    }
    // the value scales and zeros of this chunk's tokens, as two halves (see meta_at); bf16 ones become fp16 (non-fold:
    // the dequantization is fp16 arithmetic)
    const uint16_t* vsm = reinterpret_cast<const uint16_t*>(st + St::META);
    const uint16_t* vzm = reinterpret_cast<const uint16_t*>(st + St::META + meta_bytes);
    const int next = fold ? 8 : (tig & 1 ? -vgroups : vgroups);  // the second half: token gid + 8 (fold), or 2tig + 1
    uint32_t vsc[MT][2], vzr[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < (fold ? 1 : 2); ++r) {
        const int i = meta_at[mt][r];
        vsc[mt][r] = uint32_t(vsm[i]) | (uint32_t(vsm[i + next]) << 16);
        vzr[mt][r] = uint32_t(vzm[i]) | (uint32_t(vzm[i + next]) << 16);
        if (bf16 && !fold) {
          vsc[mt][r] = uint32_t(half_bits_of(uint16_t(vsc[mt][r]), true)) | (uint32_t(half_bits_of(uint16_t(vsc[mt][r] >> 16), true)) << 16);
          vzr[mt][r] = uint32_t(half_bits_of(uint16_t(vzr[mt][r]), true)) | (uint32_t(half_bits_of(uint16_t(vzr[mt][r] >> 16), true)) << 16);
        }
      }
    // --- scores: rows = 16 tokens, cols = 8 heads, per mma tile ---
    float s[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float cc[4] = {0.f, 0.f, 0.f, 0.f}, cl[4] = {0.f, 0.f, 0.f, 0.f};  // two chains of mma, hi and lo parts
#pragma unroll
      for (int kk = 0; kk < (TT_ABLATE == 3 ? 0 : D / 16); ++kk) {
        const uint32_t a0 = key_pair<KB>(ch.kw[mt][0].w, 2 * kk), a1 = key_pair<KB>(ch.kw[mt][1].w, 2 * kk);
        const uint32_t a2 = key_pair<KB>(ch.kw[mt][0].w, 2 * kk + 1), a3 = key_pair<KB>(ch.kw[mt][1].w, 2 * kk + 1);
        const uint32_t c0 = code_half2(a0), c1 = code_half2(a1), c2 = code_half2(a2), c3 = code_half2(a3);
        mma16816(cc, c0, c1, c2, c3, qh[2 * kk], qh[2 * kk + 1]);
        mma16816(cl, c0, c1, c2, c3, ql[2 * kk], ql[2 * kk + 1]);
      }
      constexpr float ungain = CODE_UNIT / KEY_GAIN;
      s[mt][0] = fmaf(cc[0] + cl[0], ungain, bias[0]); s[mt][1] = fmaf(cc[1] + cl[1], ungain, bias[1]);
      s[mt][2] = fmaf(cc[2] + cl[2], ungain, bias[0]); s[mt][3] = fmaf(cc[3] + cl[3], ungain, bias[1]);
      if (MASKED) {
        if (!mask[tok0 + 16 * mt + tile_row(gid)]) s[mt][0] = s[mt][1] = -INFINITY;
        if (!mask[tok0 + 16 * mt + tile_row(gid) + 8]) s[mt][2] = s[mt][3] = -INFINITY;
      }
    }

    // --- online softmax over the chunk (cols = heads 2*tig, 2*tig+1) ---
    float lane_max[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      lane_max[e] = -INFINITY;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) lane_max[e] = fmaxf(lane_max[e], fmaxf(s[mt][e], s[mt][e + 2]));
    }
    // the running max moves (the warp's max, then everything rescaled) only when a score passes it by more than the
    // slack: rarely after a warp's first chunks. Every state stays consistent with its own max, so the merges after the
    // loop need nothing else. (TT_MAX_SLACK=0: at every chunk, as it first was.)
    if (__any_sync(0xffffffffu, lane_max[0] > m_run[0] + TT_MAX_SLACK || lane_max[1] > m_run[1] + TT_MAX_SLACK)) {
      float alpha[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float mn = fmaxf(m_run[e], warp_max_rows(lane_max[e]));
        alpha[e] = mn == -INFINITY ? 1.f : fast_exp2(m_run[e] - mn);  // (m_run = -inf: 0, nothing was summed yet)
        m_run[e] = mn;
        base[e] = mn == -INFINITY ? 0.f : mn;  // every key so far masked: exp2(-inf - 0) = 0, not NaN
        l_run[e] *= alpha[e];
        zsum_part[e] *= alpha[e];
      }
#pragma unroll
      for (int i = 0; i < NMV; ++i) {
        acc[i][0] *= alpha[0]; acc[i][1] *= alpha[1]; acc[i][2] *= alpha[0]; acc[i][3] *= alpha[1];
      }
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float sum = 0.f;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        s[mt][e] = fast_exp2(s[mt][e] - base[e]);
        s[mt][e + 2] = fast_exp2(s[mt][e + 2] - base[e]);
        sum += s[mt][e] + s[mt][e + 2];
      }
      l_run[e] += sum;
    }

    // --- out^T[channel, head] += v^T[channel, token] p[token, head] ---
#pragma unroll
    for (int mt = 0; mt < (TT_ABLATE == 2 ? 0 : MT); ++mt) {
      if (fold) {
        // sum_t p_t (z_t + s_t c_t) = sum_t (p_t s_t) c_t + sum_t p_t z_t: p_t s_t is rounded to fp16 once (from fp32),
        // the codes go to the mma as they are, and the zeros add up in fp32 (tokens gid and gid + 8 of this lane)
        const float sa = to_float(uint16_t(vsc[mt][0]), bf16), sb = to_float(uint16_t(vsc[mt][0] >> 16), bf16);
        const float za = to_float(uint16_t(vzr[mt][0]), bf16), zb = to_float(uint16_t(vzr[mt][0] >> 16), bf16);
        zsum_part[0] = fmaf(s[mt][2], zb, fmaf(s[mt][0], za, zsum_part[0]));
        zsum_part[1] = fmaf(s[mt][3], zb, fmaf(s[mt][1], za, zsum_part[1]));
        const uint32_t b0 = transpose8x8(h2_bits(__floats2half2_rn(s[mt][0] * sa, s[mt][1] * sa)));  // tokens 2tig.., head gid
        const uint32_t b1 = transpose8x8(h2_bits(__floats2half2_rn(s[mt][2] * sb, s[mt][3] * sb)));  // tokens 8+2tig..
#pragma unroll
        for (int mv = 0; mv < NMV; ++mv) {
          uint32_t lo01, hi01, lo89, hi89;
          value_pairs_inplace<VB>(ch.vw[mt][0].w, ch.vw[mt][1].w, mv, lo01, hi01);
          value_pairs_inplace<VB>(ch.vw[mt][2].w, ch.vw[mt][3].w, mv, lo89, hi89);
          mma16816(acc[mv], code_half2(lo01), code_half2(hi01), code_half2(lo89), code_half2(hi89), b0, b1);
        }
      } else {
        const uint32_t b0 = transpose8x8(h2_bits(__floats2half2_rn(s[mt][0], s[mt][1])));  // tokens 2tig.., head gid
        const uint32_t b1 = transpose8x8(h2_bits(__floats2half2_rn(s[mt][2], s[mt][3])));  // tokens 8+2tig..
        const __half2 s01 = bits_h2(vsc[mt][0]), z01 = bits_h2(vzr[mt][0]);
        const __half2 s89 = bits_h2(vsc[mt][1]), z89 = bits_h2(vzr[mt][1]);
#pragma unroll
        for (int mv = 0; mv < NMV; ++mv) {
          uint32_t lo01, hi01, lo89, hi89;
          value_pairs<VB>(ch.vw[mt][0].w, ch.vw[mt][1].w, mv, lo01, hi01);
          value_pairs<VB>(ch.vw[mt][2].w, ch.vw[mt][3].w, mv, lo89, hi89);
          mma16816(acc[mv], dequant2(lo01, s01, z01), dequant2(hi01, s01, z01),
                   dequant2(lo89, s89, z89), dequant2(hi89, s89, z89), b0, b1);
        }
      }
    }
  };


  // this lane's fragment rows in a stage: key row gid, value rows 2tig and 2tig + 1 (the loop adds whole 8-row steps)
  const int key_row0 = St::KEYS + tile_row(gid) * St::KR + tig * SEGK_B;
  const int value_row0[2] = {St::VALUES + tile_row(2 * tig) * St::VR + gid * SEGV_B,
                             St::VALUES + tile_row(2 * tig + 1) * St::VR + gid * SEGV_B};
  int stage = 0;
  uint32_t parity = 0;  // of the stages' current phase: flips each time the loop comes back to stage 0
  for (int c = c_begin; c < c_end; ++c) {
    if (TT_USE_BULK) barrier_wait(landed + stage, parity);  // chunk c has landed
    else cp_async_wait<TT_STAGES - 2>();                    // (this lane's copies of it)
    __syncwarp();  // ... for every lane; every lane is done reading the stage refilled next
    if (TT_TRACE && c == c_begin) stamp_split(3);  // 3 first chunk landed
    issue_next();  // chunk c + TT_STAGES - 1, into the stage chunk c - 1 had
    const uint8_t* st = stages + stage * stage_bytes;
    Chunk ch;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {  // tile_row(r + 8) = tile_row(r) + 8
#pragma unroll
      for (int r = 0; r < 2; ++r)
        load_words<SEGK_B, false>(st + key_row0 + (16 * mt + 8 * r) * St::KR, ch.kw[mt][r]);
#pragma unroll
      for (int r = 0; r < 4; ++r)
        load_words<SEGV_B, false>(st + value_row0[r & 1] + (16 * mt + 8 * (r >> 1)) * St::VR, ch.vw[mt][r]);
    }
#if TT_ABLATE == 1  // keep the loads alive, compute nothing
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      sink ^= ch.kw[mt][0].w[0] ^ ch.kw[mt][1].w[0] ^ reinterpret_cast<const uint32_t*>(st + St::META)[lane];
#pragma unroll
      for (int r = 0; r < 4; ++r) sink ^= ch.vw[mt][r].w[0];
    }
#else
    compute_chunk(ch, st, c);
#endif
    if (++stage == TT_STAGES) { stage = 0; parity ^= 1; }
  }
  if (!TT_USE_BULK) cp_async_wait<0>();
  stamp_split(4);  // 4 loop done

  if (TT_ABLATE == 1 && sink == 0x9e3779b9u) acc[0][0] += 1.f;  // (sink: see TT_ABLATE)

  // --- one partial per block: the 4 warps' states (window and chunks), merged in shared memory ---
  __syncthreads();  // every warp is done with its stages: they become o_sh [WARPS][MAX_HEADS][D], ml_sh [WARPS][MAX_HEADS][2]
  stamp_split(5);  // 5 every warp's loop done
  // o_sh [WARPS][MAX_HEADS][D]: head g's channels d at d ^ 4 (g >> 1) (float4 groups swapped within the row): a store
  // instruction of the warp (8 lanes' channel slices, D/8 apart, for 4 heads) then takes 4 wavefronts at head_dim 64
  // and 128 (8 at 256) instead of 8, 16 (32) in channel order (modelled in 08_cuda); ml_sh [WARPS][MAX_HEADS][2]
  float* o_sh = reinterpret_cast<float*>(shared_raw + stages_offset<D>());  // (past the mbarriers: they stay barriers)
  float* ml_sh = o_sh + WARPS * MAX_HEADS * D;
  float* my_o = o_sh + warp * MAX_HEADS * D;
  float* my_ml = ml_sh + warp * MAX_HEADS * 2;
  float zsum[2] = {0.f, 0.f};
  if (fold) { zsum[0] = warp_sum_rows(zsum_part[0]); zsum[1] = warp_sum_rows(zsum_part[1]); }
#pragma unroll
  for (int e = 0; e < 2; ++e) {  // rows of acc are channels gid*SEGV + 2mv (+1), cols heads 2tig + e
    const float l = warp_sum_rows(l_run[e]);
    const int g = 2 * tig + e;
    if (gid == 0) { my_ml[2 * g] = m_run[e]; my_ml[2 * g + 1] = l; }
    float* o = my_o + g * D;
#pragma unroll
    for (int mv = 0; mv < NMV; ++mv) {  // folded rows hold 2^value_pos times the value: divide (exactly) and add the zeros
      const float lo = fold ? CODE_UNIT / float(1 << value_pos<VB>(mv, false)) : 1.f;
      const float hi = fold ? CODE_UNIT / float(1 << value_pos<VB>(mv, true)) : 1.f;
      if (g < GH)
        *reinterpret_cast<float2*>(o + ((gid * SEGV + 2 * mv) ^ (4 * tig))) =
            make_float2(fmaf(acc[mv][e], lo, zsum[e]), fmaf(acc[mv][e + 2], hi, zsum[e]));
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < GH * D / 4; i += WARPS * 32) {  // the block's partial: channels d .. d + 3 of head g
    const int g = 4 * i / D, d = 4 * i % D, at = g * D + (d ^ (4 * (g >> 1)));
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, ml_sh[w * MAX_HEADS * 2 + 2 * g]);
    float L = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float a = merge_weight(ml_sh[w * MAX_HEADS * 2 + 2 * g], M);
      L = fmaf(a, ml_sh[w * MAX_HEADS * 2 + 2 * g + 1], L);
      const float4 x = *reinterpret_cast<const float4*>(o_sh + w * MAX_HEADS * D + at);
      o.x = fmaf(a, x.x, o.x); o.y = fmaf(a, x.y, o.y); o.z = fmaf(a, x.z, o.z); o.w = fmaf(a, x.w, o.w);
    }
    const int64_t base = (int64_t(b) * p.Hkv * p.G + hkv * p.G + h0 + g) * p.splits + blockIdx.x;
    *reinterpret_cast<float4*>(p.o_part + base * D + d) = o;
    if (d == 0) { p.ml_part[2 * base] = M; p.ml_part[2 * base + 1] = L; }
  }
  stamp_split(6);  // 6 partial written
}

// out[b, h, :] = sum_i 2^(m_i - M) o_i / sum_i 2^(m_i - M) l_i over the partials of one query head bh = b * Hq + h.
// Many short warps, not a few long ones: a lone warp runs its instructions one after another (with a warp per head,
// each lane D/32 channels of every partial, the combine took 2-3 us of a batch-1 call). An item is 32 channels of one
// head, a lane each; PER_ITEM warps share its partials, each every PER_ITEM-th one (a compile-time stride: the loads'
// offsets are constants), BATCH at a time whose loads go out together, unpredicated (past the head's last partial they
// read the next head's, or the buffers' padding, and weigh them 0), with an online max; the item's warps then merge in
// shared memory. A batch is one round trip: its loads are volatile, which ptxas keeps in program order (load_volatile).
constexpr int COMBINE_WARPS = 8;
__device__ __forceinline__ float load_volatile(const float* p) {
  float x;
  asm volatile("ld.volatile.global.f32 %0, [%1];\n" : "=f"(x) : "l"(p));
  return x;
}
__device__ __forceinline__ float2 load_volatile(const float2* p) {
  float2 x;
  asm volatile("ld.volatile.global.v2.f32 {%0, %1}, [%2];\n" : "=f"(x.x), "=f"(x.y) : "l"(p));
  return x;
}
template <int D, int PER_ITEM, int BATCH>
__global__ void __launch_bounds__(COMBINE_WARPS * 32) combine_kernel(const DecodeParams p) {
#if TT_USE_PDL
  asm volatile("griddepcontrol.wait;\n" ::: "memory");  // until the split kernel has ended, its partials visible (TT_PDL)
#endif
  stamp_combine(0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, S = p.splits;
  const int item = blockIdx.x * (COMBINE_WARPS / PER_ITEM) + warp / PER_ITEM, first = warp % PER_ITEM;
  const int bh = item / (D / 32), channel = item % (D / 32) * 32 + lane;
  const bool live = bh < p.B * p.Hkv * p.G;  // (items past the last head only meet the barrier)
  float M = -INFINITY, L = 0.f, acc = 0.f;
  const float2* ml = reinterpret_cast<const float2*>(p.ml_part) + int64_t(bh) * S + first;  // this warp's first partial
  const float* o = p.o_part + (int64_t(bh) * S + first) * D + channel;
  constexpr int STEP = PER_ITEM * BATCH;
  static_assert(STEP <= COMBINE_READS_PAST, "a batch's loads stay inside the partials' buffers");
  for (int s0 = first; live && s0 < S; s0 += STEP, ml += STEP, o += STEP * D) {
    float2 part_ml[BATCH];
    float part_o[BATCH];
    // the outputs' loads first, then the maxima's (see above; kernel_h200_ab_combine_volatile.json)
#pragma unroll
    for (int k = 0; k < BATCH; ++k) part_o[k] = load_volatile(o + k * PER_ITEM * D);
#pragma unroll
    for (int k = 0; k < BATCH; ++k) part_ml[k] = load_volatile(ml + k * PER_ITEM);
    float M_new = M;
#pragma unroll
    for (int k = 0; k < BATCH; ++k) if (s0 + k * PER_ITEM < S) M_new = fmaxf(M_new, part_ml[k].x);
    const float a = merge_weight(M, M_new);  // (0 while nothing is summed)
    L *= a;
    acc *= a;
#pragma unroll
    for (int k = 0; k < BATCH; ++k) {  // a split with no tokens (or every one masked) has m = -inf: weight 0
      const bool used = s0 + k * PER_ITEM < S && part_ml[k].x != -INFINITY;
      const float w = used ? exp2f(part_ml[k].x - M_new) : 0.f;
      L = fmaf(w, used ? part_ml[k].y : 0.f, L);
      acc = fmaf(w, used ? part_o[k] : 0.f, acc);
    }
    M = M_new;
  }
  if constexpr (PER_ITEM > 1) {
    __shared__ float share_ml[COMBINE_WARPS][2], share_o[COMBINE_WARPS][32];
    if (lane == 0) { share_ml[warp][0] = M; share_ml[warp][1] = L; }
    share_o[warp][lane] = acc;
    __syncthreads();
    if (first != 0) return;
    M = -INFINITY;
#pragma unroll
    for (int w = 0; w < PER_ITEM; ++w) M = fmaxf(M, share_ml[warp + w][0]);
    L = acc = 0.f;
#pragma unroll
    for (int w = 0; w < PER_ITEM; ++w) {
      const float a = merge_weight(share_ml[warp + w][0], M);
      L = fmaf(a, share_ml[warp + w][1], L);
      acc = fmaf(a, share_o[warp + w][lane], acc);
    }
  }
  if (!live) return;
  const float out = L > 0.f ? acc / L : 0.f;  // a row with every key masked gets zeros
  const int Hq = p.Hkv * p.G;
  const int64_t at = (bh / Hq) * p.out_sb + int64_t(bh % Hq) * p.out_sh + channel;
  if (p.out_f32) static_cast<float*>(p.out)[at] = out;
  else static_cast<uint16_t*>(p.out)[at] = from_float(out, p.is_bf16);
  stamp_combine(1);
}

#ifndef __CUDACC_RTC__  // the host side: launches (NVRTC compiles only the kernels above, for tools/sass_count.py)
// The kernel of one (head_dim, key bits, value bits), with the dynamic shared memory it needs allowed on the current
// device (once per device: above 48 KB a kernel must ask, and the carveout prefers shared memory over L1).
struct KernelRef { const void* fn; int shared; };
template <int D, int KB, int VB, bool MASKED = false>
KernelRef kernel_ref(int vgroups) {
  const void* f = reinterpret_cast<const void*>(&quantized_kernel<D, KB, VB, MASKED>);
  constexpr int bytes = shared_bytes<D, KB, VB>(MAX_VALUE_GROUPS);  // the most a call asks for
  static unsigned long long ready = 0;  // bit per device
  int dev = 0;
  cudaGetDevice(&dev);
  if (bytes > 0 && dev < 64 && !(ready >> dev & 1ull)) {
    cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    cudaFuncSetAttribute(f, cudaFuncAttributePreferredSharedMemoryCarveout, TT_CARVEOUT);
    ready |= 1ull << dev;
  }
  return {f, shared_bytes<D, KB, VB>(vgroups)};
}
template <int D, int KB, int VB>
void launch_quantized(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.splits, p.Hkv * p.head_groups, p.B);
  if (p.mask) {
    const KernelRef k = kernel_ref<D, KB, VB, true>(p.vgroups);
    quantized_kernel<D, KB, VB, true><<<grid, WARPS * 32, k.shared, stream>>>(p);
  } else {
    const KernelRef k = kernel_ref<D, KB, VB, false>(p.vgroups);
    quantized_kernel<D, KB, VB, false><<<grid, WARPS * 32, k.shared, stream>>>(p);
  }
}
template <int D, int KB>
void dispatch_vb(const DecodeParams& p, cudaStream_t s) {
  if (p.value_bits == 2) launch_quantized<D, KB, 2>(p, s);
  else if (p.value_bits == 3) launch_quantized<D, KB, 3>(p, s);
  else launch_quantized<D, KB, 4>(p, s);
}
template <int D>
void dispatch_kb(const DecodeParams& p, cudaStream_t s) {
  if (p.key_bits == 2) dispatch_vb<D, 2>(p, s);
  else if (p.key_bits == 3) dispatch_vb<D, 3>(p, s);
  else dispatch_vb<D, 4>(p, s);
}
template <int D, int KB>
KernelRef pick_vb(int vb, int vgroups) {
  if (vb == 2) return kernel_ref<D, KB, 2>(vgroups);
  if (vb == 3) return kernel_ref<D, KB, 3>(vgroups);
  return kernel_ref<D, KB, 4>(vgroups);
}
template <int D>
KernelRef pick_kb(int kb, int vb, int vgroups) {
  if (kb == 2) return pick_vb<D, 2>(vb, vgroups);
  if (kb == 3) return pick_vb<D, 3>(vb, vgroups);
  return pick_vb<D, 4>(vb, vgroups);
}

// The combine kernel, launched programmatically where TT_PDL asks for it and the code that runs waits for the split
// kernel on the device: compiled for compute capability 9+ (not JIT-compiled from the compute_80 PTX on a newer GPU).
template <int D, int PER_ITEM, int BATCH>
cudaError_t launch_combine(const DecodeParams& p, cudaStream_t stream) {
  const auto kernel = combine_kernel<D, PER_ITEM, BATCH>;
  const int items = p.B * p.Hkv * p.G * (D / 32), per_block = COMBINE_WARPS / PER_ITEM;
  const dim3 blocks((items + per_block - 1) / per_block), threads(COMBINE_WARPS * 32);
  static signed char waits[64] = {};  // per device: 0 not asked yet, 1 the code waits (griddepcontrol.wait), -1 not
  int dev = 0;
  cudaGetDevice(&dev);
  if (TT_PDL && dev < 64 && waits[dev] == 0) {
    cudaFuncAttributes code{};
    waits[dev] = cudaFuncGetAttributes(&code, kernel) == cudaSuccess && code.ptxVersion >= 90 ? 1 : -1;
  }
  if (!TT_PDL || dev >= 64 || waits[dev] < 0) {
    kernel<<<blocks, threads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = blocks; config.blockDim = threads; config.dynamicSmemBytes = 0; config.stream = stream;
  cudaLaunchAttribute early;
  early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  early.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &early; config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, p);
}
template <int D>
cudaError_t dispatch_combine(const DecodeParams& p, cudaStream_t stream) {  // one batch per warp where it can
  const int S = p.splits;
  if (S <= 4) return launch_combine<D, 1, 4>(p, stream);
  if (S <= 8) return launch_combine<D, 1, 8>(p, stream);
  if (S <= 16) return launch_combine<D, 1, 16>(p, stream);
  if (S <= 32) return launch_combine<D, 2, 16>(p, stream);
  if (S <= 64) return launch_combine<D, 4, 16>(p, stream);
  return launch_combine<D, 8, 16>(p, stream);
}

#endif  // __CUDACC_RTC__
}  // namespace

#ifndef __CUDACC_RTC__

// TT_ONLY_HEAD_DIM=128 (benchmark builds) compiles one head_dim: a third of the build time; other sizes fail to launch
#if defined(TT_ONLY_HEAD_DIM) && TT_ONLY_HEAD_DIM != 64 && TT_ONLY_HEAD_DIM != 128 && TT_ONLY_HEAD_DIM != 256
#error "TT_ONLY_HEAD_DIM must be 64, 128 or 256"
#endif
#ifdef TT_ONLY_HEAD_DIM
#define TT_BUILDS(d) (TT_ONLY_HEAD_DIM == (d))
#else
#define TT_BUILDS(d) 1
#endif

int decode_blocks_per_sm(int head_dim, int key_bits, int value_bits, int value_groups) {
  KernelRef k{nullptr, 0};
#if TT_BUILDS(64)
  if (head_dim == 64) k = pick_kb<64>(key_bits, value_bits, value_groups);
#endif
#if TT_BUILDS(128)
  if (head_dim == 128) k = pick_kb<128>(key_bits, value_bits, value_groups);
#endif
#if TT_BUILDS(256)
  if (head_dim == 256) k = pick_kb<256>(key_bits, value_bits, value_groups);
#endif
  if (k.fn == nullptr) return 1;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k.fn, WARPS * 32, k.shared) != cudaSuccess) return 1;
  return n > 0 ? n : 1;
}

int64_t decode_trace(int64_t* host) {
#if TT_TRACE
  if (cudaMemcpyFromSymbol(host, trace_clocks, sizeof(trace_clocks)) != cudaSuccess) return 0;
  void* device = nullptr;
  if (cudaGetSymbolAddress(&device, trace_clocks) != cudaSuccess || cudaMemset(device, 0, sizeof(trace_clocks)) != cudaSuccess) return 0;
  return 2 * TRACE_SLOTS;
#else
  (void)host;
  return 0;
#endif
}

cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream) {
  bool built = false;
#if TT_BUILDS(64)
  if (p.D == 64) { dispatch_kb<64>(p, stream); built = true; }
#endif
#if TT_BUILDS(128)
  if (p.D == 128) { dispatch_kb<128>(p, stream); built = true; }
#endif
#if TT_BUILDS(256)
  if (p.D == 256) { dispatch_kb<256>(p, stream); built = true; }
#endif
  if (!built) return cudaErrorInvalidValue;
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || TT_ABLATE == 6) return e;
  if (p.D == 64) return dispatch_combine<64>(p, stream);
  if (p.D == 128) return dispatch_combine<128>(p, stream);
  return dispatch_combine<256>(p, stream);
}
#endif  // __CUDACC_RTC__
