// Native CPU ops of the decode step (see tunehouse/inference/native/__init__.py).
//
// decode_attention: one query position per row against a KV cache, for
// `tunehouse.inference.decode.LlamaDecoder`. A decode step reads every cached key and value once per
// layer, and on a 2-core CPU PyTorch's batched matmuls read them at a fraction of the memory's
// speed. This reads the cache in the order it lies in memory (the engine's cache is position-major:
// a position's keys for every row and KV head side by side), prefetching a few positions ahead, and
// computes each KV head's query heads (grouped-query attention) against one read of its keys and
// values.
//
// rms_norm and int8_inputs: the small ops around a decode step's matmuls, each one pass over a
// [rows, hidden] tensor instead of the five to seven ATen ops (each ~3 µs of dispatch and
// allocation, more than the arithmetic at 16 rows) that compute the same numbers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// 16 floats: one AVX-512 register, two AVX2 ones or four SSE/NEON ones, whatever -march gives.
typedef float vf __attribute__((vector_size(64), aligned(4)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum(vf v) {
  typedef float v8 __attribute__((vector_size(32), aligned(4)));
  typedef float v4 __attribute__((vector_size(16), aligned(4)));
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// exp(x) for x <= 0 (a score minus its row's peak), written so that the compiler vectorises it (a
// call to expf would not be): 2^(x log2 e) = 2^n 2^f with f in [-0.5, 0.5] and 2^f a degree-6
// polynomial, relative error ~2e-7 (fp32's rounding). Below -87 (exp < 1.6e-38) it gives 0, so
// that masked positions (-inf) weigh exactly nothing, as in PyTorch's softmax.
inline float softmax_exp(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const float n = __builtin_nearbyintf(t);
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// Positions read ahead: the next positions' keys (values) of a row lie a whole position's worth of
// rows away, out of the hardware prefetcher's sight. Measured with 16 rows of SmolLM2-135M's
// shape, 30 layers' caches of 85 positions (out of cache), in µs a layer against PyTorch's
// matmuls in the same run: 2 ahead 171 / 331, 256 / 410; 4 ahead 173 / 325, 219 / 334; none
// 259 / 340.
constexpr int64_t AHEAD = 2;

struct Strides {
  int64_t row, head, position;
};

// Row b's KV head h at position p of a cache (keys or values) into `out`, prefetching the same row
// and head AHEAD positions on.
template <int DIM>
inline void load_position(const float* cache, Strides st, int64_t b, int64_t h, int64_t p, int64_t length,
                          vf (&out)[DIM / 16]) {
  const float* at = cache + b * st.row + h * st.head + p * st.position;
  if (p + AHEAD < length)
    for (int c = 0; c < DIM; c += 16) __builtin_prefetch(at + AHEAD * st.position + c);
  for (int c = 0; c < DIM / 16; ++c) out[c] = load(at + 16 * c);
}

// The units (row, KV head) [begin, end): the scores of all their query heads, position by
// position (so the cache is read in memory order), then a softmax per query head, then the values
// position by position into accumulators.
template <int DIM>
void attend(int64_t begin, int64_t end, int64_t heads, int64_t kv_heads, int64_t length,
            const float* q, const float* k, Strides ks, const float* v, Strides vs,
            const float* mask, float scale, float* out) {
  constexpr int C = DIM / 16;
  const int64_t group = heads / kv_heads, n = end - begin;
  std::vector<float> scores(n * group * length);
  std::vector<float> acc(n * group * DIM, 0.f);
  for (int64_t p = 0; p < length; ++p) {
    for (int64_t u = 0; u < n; ++u) {
      const int64_t b = (begin + u) / kv_heads, h = (begin + u) % kv_heads;
      vf key[C];
      load_position<DIM>(k, ks, b, h, p, length, key);
      const float add = mask ? mask[b * length + p] : 0.f;
      const float* qb = q + (b * heads + h * group) * DIM;
      for (int64_t g = 0; g < group; ++g) {
        vf s = load(qb + g * DIM) * key[0];
        for (int c = 1; c < C; ++c) s += load(qb + g * DIM + 16 * c) * key[c];
        scores[(u * group + g) * length + p] = hsum(s) * scale + add;
      }
    }
  }
  for (int64_t r = 0; r < n * group; ++r) {
    float* sr = scores.data() + r * length;
    float peak = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : peak)
    for (int64_t p = 0; p < length; ++p) peak = std::max(peak, sr[p]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t p = 0; p < length; ++p) {
      sr[p] = softmax_exp(sr[p] - peak);
      total += sr[p];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t p = 0; p < length; ++p) sr[p] *= inv;
  }
  for (int64_t p = 0; p < length; ++p) {
    for (int64_t u = 0; u < n; ++u) {
      const int64_t b = (begin + u) / kv_heads, h = (begin + u) % kv_heads;
      vf value[C];
      load_position<DIM>(v, vs, b, h, p, length, value);
      for (int64_t g = 0; g < group; ++g) {
        const float w = scores[(u * group + g) * length + p];
        float* a = acc.data() + (u * group + g) * DIM;
        for (int c = 0; c < C; ++c) store(a + 16 * c, load(a + 16 * c) + w * value[c]);
      }
    }
  }
  for (int64_t u = 0; u < n; ++u) {
    const int64_t b = (begin + u) / kv_heads, h = (begin + u) % kv_heads;
    std::copy_n(acc.data() + u * group * DIM, group * DIM, out + (b * heads + h * group) * DIM);
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "q [rows, heads, dim], k and v [rows, KV heads, length, dim]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors only");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(1), length = k.size(2);
  TORCH_CHECK(dim == 16 || dim == 32 || dim == 64 || dim == 128, "head dim 16, 32, 64 or 128, not ", dim);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads a multiple of KV heads");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == rows && k.size(3) == dim, "k and v must match q");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v need contiguous head dims");
  TORCH_CHECK(length > 0, "an empty cache");
  const at::Tensor qc = q.contiguous();
  at::Tensor mc;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->dim() == 2 && mask->size(0) == rows &&
                    mask->size(1) == length,
                "mask [rows, length], float32");
    mc = mask->contiguous();
  }
  at::Tensor out = at::empty({rows, heads * dim}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = mc.defined() ? mc.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const Strides ks{k.stride(0), k.stride(1), k.stride(2)}, vs{v.stride(0), v.stride(1), v.stride(2)};
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    auto run = dim == 16 ? attend<16> : dim == 32 ? attend<32> : dim == 64 ? attend<64> : attend<128>;
    run(begin, end, heads, kv_heads, length, qp, kp, ks, vp, vs, mp, fscale, op);
  });
  return out;
}

// x * rsqrt(mean(x^2) + eps) * weight over each row of x [rows, hidden] (transformers' RMSNorm in
// fp32, as F.rms_norm computes it).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x [rows, hidden], float32, CPU");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == at::kFloat,
              "weight [hidden], float32");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * hidden;
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < hidden; ++i) total += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(total / static_cast<float>(hidden) + static_cast<float>(eps));
    float* orow = op + r * hidden;
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) orow[i] = xr[i] * inv * wp[i];
  }
  return out;
}

// What an int8 layer group (tunehouse/inference/quantize.py, `SharedInput`) feeds its two matmuls,
// from x [rows, in]: each row with its outlier channels zeroed (`keep` 0 there, 1 elsewhere) and
// divided by its own peak magnitude (clamped at 1e-8), the peaks [rows, 1], and the outlier
// channels' values [rows, outliers]. The same arithmetic as `x * keep`, `abs().amax()`, `clamp_`,
// `div_` and `index_select`, so the same numbers.
std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_inputs(const at::Tensor& x, const at::Tensor& keep,
                                                           const at::Tensor& outliers) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x [rows, in], float32, CPU");
  TORCH_CHECK(keep.dim() == 1 && keep.size(0) == x.size(1) && keep.scalar_type() == at::kFloat,
              "keep [in], float32");
  TORCH_CHECK(outliers.dim() == 1 && outliers.scalar_type() == at::kLong, "outliers [k], int64");
  const at::Tensor xc = x.contiguous(), kc = keep.contiguous(), oc = outliers.contiguous();
  const int64_t rows = x.size(0), width = x.size(1), n_out = outliers.size(0);
  const int64_t* idx = oc.data_ptr<int64_t>();
  for (int64_t j = 0; j < n_out; ++j) TORCH_CHECK(idx[j] >= 0 && idx[j] < width, "outlier channel out of range");
  at::Tensor scaled = at::empty_like(xc);
  at::Tensor peaks = at::empty({rows, 1}, xc.options());
  at::Tensor gathered = at::empty({rows, n_out}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  float* sp = scaled.data_ptr<float>();
  float* pp = peaks.data_ptr<float>();
  float* gp = gathered.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * width;
    float* sr = sp + r * width;
    float peak = 0.f;
#pragma omp simd reduction(max : peak)
    for (int64_t i = 0; i < width; ++i) {
      sr[i] = xr[i] * kp[i];
      peak = std::max(peak, std::abs(sr[i]));
    }
    peak = std::max(peak, 1e-8f);
    pp[r] = peak;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) sr[i] = sr[i] / peak;
    for (int64_t j = 0; j < n_out; ++j) gp[r * n_out + j] = xr[idx[j]];
  }
  return {scaled, peaks, gathered};
}

}  // namespace

TORCH_LIBRARY(tunehouse_native, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("int8_inputs(Tensor x, Tensor keep, Tensor outliers) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tunehouse_native, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("int8_inputs", &int8_inputs);
}
