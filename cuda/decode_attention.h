// Fused dequantize + attention for one decode step over a TinyKVCache layer (KIVI layout + full-precision window).
// Shared by the kernels (decode_attention.cu, no torch headers) and the torch binding (decode_attention.cpp).
#pragma once
#ifdef __CUDACC_RTC__  // NVRTC (tools/sass_count.py compiles the kernels alone): no host headers
typedef unsigned char uint8_t; typedef unsigned short uint16_t; typedef unsigned int uint32_t; typedef long long int64_t;
typedef unsigned long long uint64_t;
#define INFINITY __int_as_float(0x7f800000)
#else
#include <cstdint>
#include <cuda_runtime.h>
#endif

#ifndef TT_MT
#define TT_MT 2  // 16-token mma tiles per chunk (4: 64-token chunks, measured 9-27% slower)
#endif
constexpr int CHUNK_TOKENS = 16 * TT_MT;  // a chunk: the unit of a split's share and of a warp's copies

// The window's tokens go to the first splits of a row, at least TT_WINDOW_SPLIT_TOKENS to each (a 16-token tile per
// warp; 0: an equal share to every split), and those splits take TT_WINDOW_DISCOUNT chunks fewer than the others (at
// most all of theirs): the other splits start their loops at once instead of after a mostly empty tile each. On an
// H200 (kernel_h200_window_discount.json) 64 and 8 were 1.01-1.06x faster than equal shares at batch 1 and at batch 8
// and 16k, 0.96-1.01x at batch 8 and 32 from 64k (where the variants timed one after another drifted 1-2% slower each);
// discounts of 12-24 no better, and no discount slower.
#ifndef TT_WINDOW_SPLIT_TOKENS
#define TT_WINDOW_SPLIT_TOKENS 64
#endif
#ifndef TT_WINDOW_DISCOUNT
#define TT_WINDOW_DISCOUNT 8
#endif

// The partials' buffers hold this many partials more than the launch writes: the combine kernel reads past a head's
// last partial (and weighs what it reads there 0) so that its loads need no predicates.
constexpr int COMBINE_READS_PAST = 128;

struct DecodeParams {
  // query [B, Hq, D], model dtype (fp16 or bf16), element strides
  const void* q; int64_t q_sb, q_sh;
  // quantized keys: codes [B, Hkv, nq, D*key_bits/8] uint8 (byte strides), scale/zero [B, Hkv, nq/128, D] (element strides)
  const uint8_t* kc; int64_t kc_sb, kc_sh;
  const void* ks; const void* kz; int64_t km_sb, km_sh;
  // quantized values: codes [B, Hkv, nq, D*value_bits/8], scale/zero [B, Hkv, nq, vgroups]
  const uint8_t* vc; int64_t vc_sb, vc_sh;
  const void* vs; const void* vz; int64_t vm_sb, vm_sh; int vgroups;
  // full-precision window [B, Hkv, nw, D], model dtype, element strides
  const void* wk; const void* wv; int64_t wk_sb, wk_sh, wk_st, wv_sb, wv_sh, wv_st;
  // optional key mask [B, >= nq + nw] uint8 (1 = attend), null when every token is attended
  const uint8_t* mask; int64_t mask_sb;
  // optional device count of the window's tokens (a CUDA graph replays one launch while the window fills): the window
  // tensors then hold nw slots of which the first *window_length are read; null when all nw are
  const int64_t* window_length;
  int B, Hkv, G, D, key_bits, value_bits, nq, nw;
  int head_groups;                         // ceil(G / 8): one thread block serves at most 8 query heads
  int splits;                              // split-K: blocks per (row, head group), each a share of the chunks
  int split_chunks, split_extra;           // a split's chunks, and how many splits (the first ones) take one more
  int window_per_split;                    // window tokens per split (the first splits take them)
  int window_splits, window_discount;      // the splits with window tokens take window_discount chunks fewer
  float scale_log2;                        // softmax scale * log2(e): the kernels use exp2
  int is_bf16;
  float* o_part; float* ml_part;           // one partial per split: [B, Hq, splits, D], [B, Hq, splits, 2] (max, sum), then
                                           // COMBINE_READS_PAST more (read, never written)
  void* out; int64_t out_sb, out_sh;       // [B, Hq, D], model dtype (float32 when out_f32)
  int out_f32;
};

// TT_TRACE builds (benchmarks/trace_kernel.py): the phases of each block of the last launch, slot b * TRACE_SPLIT_EVENTS
// + e for split block b's phase e (7: the first copies asked for; 8: its multiprocessor, in the clock64 row), then
// TRACE_SPLIT_BLOCKS * TRACE_SPLIT_EVENTS + 2b (+ 1) for combine block b's start (end)
constexpr int TRACE_SPLIT_BLOCKS = 4096, TRACE_SPLIT_EVENTS = 9, TRACE_COMBINE_BLOCKS = 16384;
constexpr int TRACE_SLOTS = TRACE_SPLIT_BLOCKS * TRACE_SPLIT_EVENTS + TRACE_COMBINE_BLOCKS * 2;

#ifndef __CUDACC_RTC__
// How many blocks of the quantized kernel for these sizes fit on one multiprocessor at once (a stage's size depends
// on the value groups).
int decode_blocks_per_sm(int head_dim, int key_bits, int value_bits, int value_groups);

// TT_TRACE builds: copies both clocks' stamps ([2][TRACE_SLOTS]) into host and clears them; returns how many (0 otherwise).
int64_t decode_trace(int64_t* host);

// Launches the split kernels and the combine kernel on `stream`; returns the first CUDA error.
cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream);
#endif
