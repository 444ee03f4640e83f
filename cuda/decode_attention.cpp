// torch binding for launch_decode_attention: argument checks, split sizing, output and partial buffers.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "decode_attention.h"

namespace {

void check_layout(const at::Tensor& t, const char* name, int64_t dim, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.sizes());
  if (t.numel() == 0) return;  // nothing is read
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dim");
  if (dim == 4 && t.size(2) > 1) TORCH_CHECK(t.stride(2) == t.size(3), name, " must have rows packed along the token axis");
  // every row start 16-byte aligned so the kernels can use vector loads
  const int64_t esize = t.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  for (int64_t d = 0; d + 1 < dim; ++d)
    TORCH_CHECK(t.size(d) == 1 || (t.stride(d) * esize) % 16 == 0 || (dim == 4 && d == 2),
                name, " strides must be multiples of 16 bytes");
}

// `t`, or a contiguous copy if one of its (row, head) slices would not start on 16 bytes (the kernels move 16-byte
// units); the cache's own tensors always do, so a decode step copies nothing
at::Tensor aligned(const at::Tensor& t) {
  if (t.numel() == 0) return t;
  const int64_t esize = t.element_size();
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d < 2 && d + 1 < t.dim(); ++d) ok = ok && (t.size(d) == 1 || (t.stride(d) * esize) % 16 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);  // (contiguous() would hand back a contiguous misaligned t)
}

}  // namespace

at::Tensor decode_attention(at::Tensor q, at::Tensor key_codes, at::Tensor key_scale, at::Tensor key_zero,
                            at::Tensor value_codes, at::Tensor value_scale, at::Tensor value_zero,
                            at::Tensor window_keys, at::Tensor window_values, c10::optional<at::Tensor> mask,
                            c10::optional<at::Tensor> window_length,
                            int64_t key_bits, int64_t value_bits, double scale, bool float_output) {
  q = aligned(q); key_codes = aligned(key_codes); key_scale = aligned(key_scale); key_zero = aligned(key_zero);
  value_codes = aligned(value_codes); value_scale = aligned(value_scale); value_zero = aligned(value_zero);
  const at::Device dev = q.device();
  TORCH_CHECK(dev.is_cuda(), "decode_attention needs CUDA tensors, got ", dev);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "query must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 3 && q.stride(-1) == 1 && q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 &&
              reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0, "query must be [B, Hq, D], contiguous in D, rows 16-byte aligned");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "head_dim must be 64, 128 or 256, got ", D);
  TORCH_CHECK(key_bits >= 2 && key_bits <= 4 && value_bits >= 2 && value_bits <= 4, "bits must be 2, 3 or 4");
  const auto meta = q.scalar_type();
  check_layout(key_codes, "key_codes", 4, dev); check_layout(value_codes, "value_codes", 4, dev);
  check_layout(window_keys, "window_keys", 4, dev); check_layout(window_values, "window_values", 4, dev);
  TORCH_CHECK(key_codes.scalar_type() == at::kByte && value_codes.scalar_type() == at::kByte, "codes must be uint8");
  TORCH_CHECK(window_keys.scalar_type() == meta && window_values.scalar_type() == meta, "window dtype must match the query");
  const int64_t Hkv = window_keys.size(1), nq = key_codes.size(2), nw = window_keys.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads ", Hq, " must be a multiple of kv heads ", Hkv);
  TORCH_CHECK(nq % 128 == 0, "quantized tokens must be whole 128-token blocks, got ", nq);
  TORCH_CHECK(window_keys.size(0) == B && window_keys.size(3) == D && window_values.sizes() == window_keys.sizes(), "window shape mismatch");
  TORCH_CHECK(key_codes.size(0) == B && key_codes.size(1) == Hkv && key_codes.size(3) == D * key_bits / 8, "key_codes shape mismatch");
  TORCH_CHECK(value_codes.size(0) == B && value_codes.size(1) == Hkv && value_codes.size(2) == nq &&
              value_codes.size(3) == D * value_bits / 8, "value_codes shape mismatch");
  TORCH_CHECK(nq + nw > 0, "the cache holds no tokens");
  TORCH_CHECK(nq + nw < (int64_t(1) << 31), "the kernel takes fewer than 2^31 tokens per row, got ", nq + nw);
  int vgroups = 1;
  if (nq > 0) {
    for (auto* t : {&key_scale, &key_zero, &value_scale, &value_zero}) {
      TORCH_CHECK(t->device() == dev && t->scalar_type() == meta && t->dim() == 4 && t->stride(-1) == 1,
                  "scales and zeros must be [B, H, *, *] ", meta, " tensors on ", dev, " contiguous in the last dim");
    }
    TORCH_CHECK(key_scale.size(2) == nq / 128 && key_scale.size(3) == D && key_scale.stride(2) == D &&
                key_zero.sizes() == key_scale.sizes() && key_zero.strides() == key_scale.strides(), "key scale/zero shape mismatch");
    vgroups = value_scale.size(3);
    TORCH_CHECK(value_scale.size(2) == nq && value_scale.stride(2) == vgroups && value_zero.sizes() == value_scale.sizes() &&
                value_zero.strides() == value_scale.strides(), "value scale/zero shape mismatch");
    TORCH_CHECK(D % vgroups == 0 && (vgroups == 1 || (D / vgroups) % (D / 8) == 0),
                "value groups must span at least head_dim/8 channels, got ", vgroups, " groups of ", D);
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->device() == dev && (mask->scalar_type() == at::kByte || mask->scalar_type() == at::kBool), "mask must be a bool or uint8 tensor on ", dev);
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) >= nq + nw && mask->stride(1) == 1, "mask must be [B, >= tokens]");
  }

  if (window_length.has_value()) {  // read on the device: a CUDA graph replays this launch while the window fills
    TORCH_CHECK(window_length->device() == dev && window_length->scalar_type() == at::kLong && window_length->numel() == 1,
                "window_length must be a one-element int64 tensor on ", dev, ", got ", window_length->scalar_type(),
                " of shape ", window_length->sizes(), " on ", window_length->device());
  }

  const at::cuda::CUDAGuard guard(dev);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;  // cached by torch
  static int occupancy[3][3][3][4] = {};  // blocks per SM for each (head_dim, key_bits, value_bits, value groups); asked once
  int& occ = occupancy[D == 64 ? 0 : D == 128 ? 1 : 2][key_bits - 2][value_bits - 2][vgroups == 1 ? 0 : vgroups == 2 ? 1 : vgroups == 4 ? 2 : 3];
  if (occ == 0) occ = decode_blocks_per_sm(int(D), int(key_bits), int(value_bits), vgroups);
  DecodeParams p{};
  p.q = q.data_ptr(); p.q_sb = q.stride(0); p.q_sh = q.stride(1);
  p.kc = key_codes.data_ptr<uint8_t>(); p.kc_sb = key_codes.stride(0); p.kc_sh = key_codes.stride(1);
  p.vc = value_codes.data_ptr<uint8_t>(); p.vc_sb = value_codes.stride(0); p.vc_sh = value_codes.stride(1);
  if (nq > 0) {
    p.ks = key_scale.data_ptr(); p.kz = key_zero.data_ptr(); p.km_sb = key_scale.stride(0); p.km_sh = key_scale.stride(1);
    p.vs = value_scale.data_ptr(); p.vz = value_zero.data_ptr(); p.vm_sb = value_scale.stride(0); p.vm_sh = value_scale.stride(1);
  }
  p.vgroups = vgroups;
  p.wk = window_keys.data_ptr(); p.wv = window_values.data_ptr();
  p.wk_sb = window_keys.stride(0); p.wk_sh = window_keys.stride(1); p.wk_st = window_keys.stride(2);
  p.wv_sb = window_values.stride(0); p.wv_sh = window_values.stride(1); p.wv_st = window_values.stride(2);
  if (mask.has_value()) { p.mask = static_cast<const uint8_t*>(mask->data_ptr()); p.mask_sb = mask->stride(0); }
  if (window_length.has_value()) p.window_length = window_length->data_ptr<int64_t>();
  p.B = B; p.Hkv = Hkv; p.G = Hq / Hkv; p.D = D; p.key_bits = key_bits; p.value_bits = value_bits;
  p.nq = nq; p.nw = nw;
  p.head_groups = (p.G + 7) / 8;
  // split-K: the number of splits per (row, head group). Blocks that share a multiprocessor with two others end their
  // loops about 1.2x later than blocks that share it with one (trace_kernel.py), so the grid should put as many blocks
  // on every multiprocessor: among the grids of one wave that fill 90-100% of the resident slots, the one whose blocks
  // spread the most evenly; where no grid fills 90% of them (short contexts, or more rows than slots), the fewest
  // splits that fill 90% of whole waves (or the best fill). A split takes a share of the chunks (a block's
  // work differs by at most one chunk), at least 8 of them (2 key blocks) where it can, so every warp has a few to
  // pipeline; the first splits take the window too, and fewer chunks (TT_WINDOW_SPLIT_TOKENS, decode_attention.h).
  const int64_t ntiles = nq / 128, rows = B * Hkv * p.head_groups;
  const int64_t resident = int64_t(sms) * occ;
  const int64_t max_splits = std::max<int64_t>({1, ntiles / 2, (nw + 63) / 64});
  int64_t splits = 1;
  double fill_best = 0;
  for (int64_t s = 1; s <= max_splits; ++s) {  // the fewest splits that fill 90% of whole waves, or the best fill
    const int64_t blocks = rows * s, waves = (blocks + resident - 1) / resident;
    const double fill = double(blocks) / double(waves * resident);
    if (fill > fill_best + 1e-9) { splits = s; fill_best = fill; }
    if (fill >= 0.9) break;
  }
  double even_best = 0;  // then, among the grids of one wave filling 90-100% of the slots, the most even one
  for (int64_t s = (9 * resident + 10 * rows - 1) / (10 * rows); s <= max_splits && rows * s <= resident; ++s) {
    const int64_t blocks = rows * s;
    const double even = double(blocks) / double(sms * ((blocks + sms - 1) / sms));  // 1: as many on every SM
    if (even >= even_best - 1e-9) { splits = s; even_best = even; }
  }
  p.splits = splits;
  p.window_per_split = std::max<int64_t>((nw + splits - 1) / splits, TT_WINDOW_SPLIT_TOKENS);
  p.window_splits = nw > 0 ? std::min<int64_t>(splits, (nw + p.window_per_split - 1) / p.window_per_split) : 0;
  const int64_t chunks = nq / CHUNK_TOKENS;  // per row
  // (at most what leaves the window splits no chunks: chunks >= (splits - window_splits) * discount)
  const int64_t discount = p.window_splits < splits ? std::min<int64_t>(TT_WINDOW_DISCOUNT, chunks / (splits - p.window_splits)) : 0;
  p.window_discount = int(discount);
  const int64_t shared = chunks + p.window_splits * discount;  // the discounts, spread over every split, then taken back
  p.split_chunks = int(shared / splits); p.split_extra = int(shared % splits);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.is_bf16 = meta == at::kBFloat16;
  auto f32 = q.options().dtype(at::kFloat);
  // one partial per block ([B, Hq, splits] of them, then COMBINE_READS_PAST unwritten): its warps and its share of the
  // window are merged in shared memory first
  const int64_t partials = B * Hq * p.splits + COMBINE_READS_PAST;
  at::Tensor o_part = at::empty({partials, D}, f32), ml_part = at::empty({partials, 2}, f32);
  at::Tensor out = at::empty({B, Hq, D}, float_output ? f32 : q.options());
  p.out_f32 = float_output;
  p.o_part = o_part.data_ptr<float>(); p.ml_part = ml_part.data_ptr<float>();
  p.out = out.data_ptr(); p.out_sb = out.stride(0); p.out_sh = out.stride(1);
  const cudaError_t err = launch_decode_attention(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "decode_attention kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

// The phase stamps of the last launch ([2, TRACE_SLOTS] int64, zeros where nothing stamped), cleared; builds with
// TT_TRACE only (None otherwise)
c10::optional<at::Tensor> trace() {
  at::Tensor host = at::zeros({2, TRACE_SLOTS}, at::kLong);
  if (decode_trace(host.data_ptr<int64_t>()) == 0) return c10::nullopt;
  return host;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "Fused dequantize + attention for one decode step (KIVI layout + window)");
  m.def("trace", &trace, "TT_TRACE builds: the phase stamps of the last launch ([2, slots] int64: %globaltimer, clock64), cleared");
  // the trace's slot layout (decode_attention.h), for benchmarks/trace_kernel.py
  m.attr("TRACE_SPLIT_BLOCKS") = TRACE_SPLIT_BLOCKS;
  m.attr("TRACE_SPLIT_EVENTS") = TRACE_SPLIT_EVENTS;
  m.attr("TRACE_COMBINE_BLOCKS") = TRACE_COMBINE_BLOCKS;
}
