// Batch-invariant CPU kernels for Ostinato.
//
// Every output element is computed by one thread with a reduction order fixed by the
// weight layout alone: never by the batch size, the row's position in the batch, the
// thread count or how a prompt was chunked. So a request's logits are bit-identical
// alone or among 64 others.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kRowTile = 4;   // x rows sharing one unpacked weight block

enum Format : int64_t { kF32 = 0, kQ8 = 1, kQ4 = 2 };

inline float hsum8(__m256 v) {
  // fixed pairwise order: (0+4, 1+5, 2+6, 3+7), then (a+c, b+d), then (a+b)
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Unpack 8 consecutive weights of a block into floats.
inline __m256 load8_f32(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8_q8(const int8_t* q) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
// Q4 block of 32: byte j holds element j (low nibble) and j+16 (high nibble).
inline void load32_q4(const uint8_t* q, int zp, __m256 out[4]) {
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  __m128i mask = _mm_set1_epi8(0x0f);
  __m128i lo = _mm_and_si128(bytes, mask);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  __m256i z = _mm256_set1_epi32(zp);
  out[0] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo), z));
  out[1] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), z));
  out[2] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi), z));
  out[3] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), z));
}

struct Weights {
  int64_t fmt, bs, zp, N, K, nb;   // nb = blocks per row = K / bs
  const void* q;                   // (N, K) f32 | (N, K) int8 | (N, K/2) uint8
  const float* scale;              // (N, nb); unused for f32
  const float* min;                // (N, nb) or nullptr
};

// Unpack block b of row n into BS/8 float vectors (format and block size fixed at compile
// time so the loop below is fully unrolled and stays in registers).
template <int FMT, int BS>
inline void unpack(const Weights& w, int64_t n, int64_t b, __m256 v[4]) {
  const int64_t off = n * w.K + b * BS;
  if constexpr (FMT == kF32) {
    const float* p = static_cast<const float*>(w.q) + off;
    for (int i = 0; i < BS / 8; ++i) v[i] = load8_f32(p + 8 * i);
  } else if constexpr (FMT == kQ8) {
    const int8_t* p = static_cast<const int8_t*>(w.q) + off;
    for (int i = 0; i < BS / 8; ++i) v[i] = load8_q8(p + 8 * i);
  } else {
    load32_q4(static_cast<const uint8_t*>(w.q) + off / 2, (int)w.zp, v);
  }
}

// out[r, n] for the rows r of one tile: sum_b scale[n,b] * dot(wq[n,b], x[r,b]) + min[n,b] * xsum[r,b]
// Each row's arithmetic is the same whatever R is: that is what makes the result batch-invariant.
template <int R, int FMT, int BS>
void tile_dot(const Weights& w, int64_t n, const float* x, const float* xsum, float* out,
              int64_t ldo) {
  __m256 acc[R];
  float macc[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); macc[r] = 0.f; }
  for (int64_t b = 0; b < w.nb; ++b) {
    __m256 v[4];
    unpack<FMT, BS>(w, n, b, v);
    const __m256 s = _mm256_set1_ps(FMT == kF32 ? 1.f : w.scale[n * w.nb + b]);
    const float m = w.min ? w.min[n * w.nb + b] : 0.f;
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * w.K + b * BS;
      __m256 t = _mm256_mul_ps(v[0], _mm256_loadu_ps(xr));
      for (int i = 1; i < BS / 8; ++i) t = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xr + 8 * i), t);
      acc[r] = _mm256_fmadd_ps(s, t, acc[r]);
      if (w.min) macc[r] = std::fma(m, xsum[r * w.nb + b], macc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo + n] = hsum8(acc[r]) + macc[r];
}

template <int FMT, int BS>
void tile_rows(int rows, const Weights& w, int64_t n, const float* x, const float* xs,
               float* out, int64_t ldo) {
  switch (rows) {
    case 4: tile_dot<4, FMT, BS>(w, n, x, xs, out, ldo); break;
    case 3: tile_dot<3, FMT, BS>(w, n, x, xs, out, ldo); break;
    case 2: tile_dot<2, FMT, BS>(w, n, x, xs, out, ldo); break;
    default: tile_dot<1, FMT, BS>(w, n, x, xs, out, ldo); break;
  }
}

using TileFn = void (*)(int, const Weights&, int64_t, const float*, const float*, float*, int64_t);

TileFn pick_tile(int64_t fmt, int64_t bs) {
  if (fmt == kF32) return tile_rows<kF32, 32>;
  if (fmt == kQ4) return tile_rows<kQ4, 32>;
  return bs == 16 ? tile_rows<kQ8, 16> : tile_rows<kQ8, 32>;
}

// Per-row, per-block sums of x (for the min term), in a fixed order.
std::vector<float> block_sums(const float* x, int64_t M, int64_t K, int64_t bs) {
  int64_t nb = K / bs;
  std::vector<float> s(M * nb);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      float acc = 0.f;
      for (int64_t j = 0; j < bs; ++j) acc += x[m * K + b * bs + j];
      s[m * nb + b] = acc;
    }
  return s;
}

}  // namespace

// x: (M, K) f32 contiguous -> (M, N) f32
torch::Tensor qlinear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min,
                      int64_t fmt, int64_t bs, int64_t zp, int64_t N, int64_t K) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: (M,K) f32");
  TORCH_CHECK(x.size(1) == K && K % bs == 0, "qlinear: x has the wrong width");
  TORCH_CHECK((fmt == kQ8 && (bs == 16 || bs == 32)) || ((fmt == kQ4 || fmt == kF32) && bs == 32),
              "qlinear: unsupported format/block size");
  const int64_t M = x.size(0);
  auto out = torch::empty({M, N}, x.options());
  Weights w{fmt, bs, zp, N, K, K / bs, q.data_ptr(),
            fmt == kF32 ? nullptr : scale.data_ptr<float>(),
            min.numel() ? min.data_ptr<float>() : nullptr};
  const float* xp = x.data_ptr<float>();
  std::vector<float> xs = w.min ? block_sums(xp, M, K, bs) : std::vector<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kColChunk = 16;   // weight rows kept hot in cache across row tiles
  const int64_t chunks = (N + kColChunk - 1) / kColChunk;
  const TileFn tile = pick_tile(fmt, bs);
  // Tiny products are not worth a fork/join (measured: 2^18 gives 47 tok/s batch-1 decode on
  // SmolLM2 here, 2^20 gives 40, 2^22 gives 32).
  const bool parallel = M * N * K >= (1 << 18);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * kColChunk, n1 = std::min(N, n0 + kColChunk);
    for (int64_t m = 0; m < M; m += kRowTile) {
      const int rows = (int)std::min<int64_t>(kRowTile, M - m);
      const float* xsm = w.min ? xs.data() + m * w.nb : nullptr;
      for (int64_t n = n0; n < n1; ++n)
        tile(rows, w, n, xp + m * K, xsm, op + m * N, N);
    }
  }
  return out;
}

// y = x * w / sqrt(mean(x^2) + eps), row by row; x: (M, D), D % 8 == 0
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && x.dtype() == torch::kFloat32, "x: contiguous f32");
  const int64_t D = x.size(-1), M = x.numel() / D;
  TORCH_CHECK(D % 8 == 0, "rms_norm: D must be a multiple of 8");
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
#pragma omp parallel for schedule(static) if (M > 16)
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
      __m256 v = _mm256_loadu_ps(r + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    const float inv = 1.f / std::sqrt(hsum8(acc) / (float)D + (float)eps);
    for (int64_t i = 0; i < D; ++i) op[m * D + i] = r[i] * inv * wp[i];
  }
  return out;
}

// act(gate) * up, elementwise, scalar libm so no vector/tail path can differ
torch::Tensor gated_act(torch::Tensor gate, torch::Tensor up, int64_t gelu) {
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous(), "contiguous inputs");
  auto out = torch::empty_like(gate);
  const float *g = gate.data_ptr<float>(), *u = up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = gate.numel();
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
#pragma omp parallel for schedule(static) if (n > 16384)
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i];
    const float a = gelu ? 0.5f * x * (1.f + std::tanh(k0 * (x + k1 * x * x * x)))
                         : x / (1.f + std::exp(-x));
    o[i] = a * u[i];
  }
  return out;
}

// Causal (optionally sliding-window) attention over a paged cache, one (token, head) at
// a time: scores in key order, softmax with the row max, values summed in key order.
// q: (T, H, D); caches: (NB, BS, KV, D); tables: (S, maxb) int64; meta: (S, 3) int64 rows
// of (q_start, q_len, context_len).
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc,
                              torch::Tensor tables, torch::Tensor meta, double scale,
                              int64_t window) {
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = kc.size(1), KV = kc.size(2), S = meta.size(0), maxb = tables.size(1);
  TORCH_CHECK(D % 8 == 0 && H % KV == 0, "attention: bad head shapes");
  auto out = torch::zeros_like(q);
  const float *qp = q.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* mp = meta.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  std::vector<int64_t> row_seq(T, -1);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t i = 0; i < mp[3 * s + 1]; ++i) row_seq[mp[3 * s] + i] = s;
#pragma omp parallel if (T * H >= 64)   // a decode step of a few sequences stays on one core
  {
    std::vector<float> sc;
#pragma omp for schedule(dynamic, 4)
    for (int64_t th = 0; th < T * H; ++th) {
      const int64_t t = th / H, h = th % H, s = row_seq[t];
      if (s < 0) continue;
      const int64_t q_start = mp[3 * s], q_len = mp[3 * s + 1], ctx = mp[3 * s + 2];
      const int64_t pos = ctx - q_len + (t - q_start);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t kvh = h / (H / KV);
      const float* qv = qp + (t * H + h) * D;
      sc.resize(pos - lo + 1);
      float mx = -INFINITY;
      for (int64_t j = lo; j <= pos; ++j) {
        const int64_t blk = tp[s * maxb + j / BS];
        const float* kv = kp + ((blk * BS + j % BS) * KV + kvh) * D;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(qv + d), _mm256_loadu_ps(kv + d), acc);
        const float x = hsum8(acc) * (float)scale;
        sc[j - lo] = x;
        mx = std::max(mx, x);
      }
      float sum = 0.f;
      for (int64_t j = lo; j <= pos; ++j) { sc[j - lo] = std::exp(sc[j - lo] - mx); sum += sc[j - lo]; }
      float* o = op + (t * H + h) * D;
      for (int64_t j = lo; j <= pos; ++j) {
        const int64_t blk = tp[s * maxb + j / BS];
        const float* vv = vp + ((blk * BS + j % BS) * KV + kvh) * D;
        const __m256 p = _mm256_set1_ps(sc[j - lo]);
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(o + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vv + d), _mm256_loadu_ps(o + d)));
      }
      const __m256 inv = _mm256_set1_ps(1.f / sum);
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), inv));
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear);
  m.def("rms_norm", &rms_norm);
  m.def("gated_act", &gated_act);
  m.def("paged_attention", &paged_attention);
}
