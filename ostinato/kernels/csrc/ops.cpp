// Batch-invariant CPU kernels for Ostinato.
//
// Every output element is computed by one thread with a reduction order fixed by the
// weight layout alone: never by the batch size, the row's position in the batch, the
// thread count or how a prompt was chunked. So a request's logits are bit-identical
// alone or among 64 others.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <cfloat>
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


// ---- int16 activations -------------------------------------------------------------
// x is quantized once per call, row by row and per 32 elements: d = max|x| / 32767,
// q = round-half-even(x / d), an error of at most 1/65534 of the block's largest value (int8,
// as llama.cpp does it, cost SmolLM2 5 points of top-1 agreement; int16 costs nothing
// measurable). A quantized weight block then meets it in an exact integer dot product
// (s16 x s16 pairs: AVX-512 VNNI's dpwssd where the CPU has it, else madd + add: the same
// integers), scaled once per block. A row's quantization depends on that row alone, so
// the result stays batch-invariant.
struct QAct {
  std::vector<int16_t> q;     // (M, K)
  std::vector<float> d;       // (M, K/32) scale per 32 elements
  std::vector<float> fsum;    // (M, K/32) exact float block sums of x (the min term)
};

// Quantize one 32-element block: q, d, d * sum(q), and the exact float sum of x (in a fixed
// tree order), vectorized; the rounding is the CPU's round-half-even, as nearbyint's.
inline void quantize_block(const float* xb, int16_t* q, float* d_out, float* fsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 x[4], mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm256_loadu_ps(xb + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, x[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  bool nan = false;
  for (int i = 0; i < 4; ++i) nan |= _mm256_movemask_ps(_mm256_cmp_ps(x[i], x[i], _CMP_UNORD_Q)) != 0;
  // a block too small for a normal scale counts as zero; a NaN makes the whole block NaN
  const float d = nan ? NAN : amax / 32767.f;
  const float id = d >= FLT_MIN ? 1.f / d : 0.f;
  const __m256 idv = _mm256_set1_ps(id);
  const __m256i lo = _mm256_set1_epi32(-32767), hi = _mm256_set1_epi32(32767);
  __m256i qi[4];
  for (int i = 0; i < 4; ++i)
    qi[i] = _mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvtps_epi32(_mm256_mul_ps(x[i], idv))));
  // packs works within 128-bit lanes: restore element order with one permute per pair
  const __m256i p01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[0], qi[1]), 0xD8);
  const __m256i p23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[2], qi[3]), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p01);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16), p23);
  *d_out = d >= FLT_MIN || nan ? d : 0.f;
  *fsum = hsum8(_mm256_add_ps(_mm256_add_ps(x[0], x[1]), _mm256_add_ps(x[2], x[3])));
}

void quantize_rows(const float* x, int64_t M, int64_t K, QAct& a) {
  const int64_t nb = K / 32;
  a.q.resize(M * K); a.d.resize(M * nb); a.fsum.resize(M * nb);
#pragma omp parallel for schedule(static) if (M >= 8)
  for (int64_t i = 0; i < M * nb; ++i)
    quantize_block(x + i * 32, a.q.data() + i * 32, &a.d[i], &a.fsum[i]);
}

// acc + pairwise products of 16 s16 lanes, summed in pairs into 8 int32 lanes.
inline __m256i dot_s16(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// The 32 weights of chunk c (32 elements) of row n as two vectors of 16 int16.
template <int FMT>
inline void load_w32(const Weights& w, int64_t n, int64_t c, __m256i out[2]) {
  if constexpr (FMT == kQ4) {
    const uint8_t* p = static_cast<const uint8_t*>(w.q) + (n * w.K + c * 32) / 2;
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m256i zp = _mm256_set1_epi16((int16_t)w.zp);    // codes - zp: still exact integers
    out[0] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask)), zp);
    out[1] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask)), zp);
  } else {
    const int8_t* p = static_cast<const int8_t*>(w.q) + n * w.K + c * 32;
    out[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    out[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
  }
}

// sum_i a[i] * b[i] in a fixed order (8 lanes, then the tail).
inline float dot_fixed(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum8(acc);
  for (; i < n; ++i) s = std::fma(a[i], b[i], s);
  return s;
}

// The per-block term outside the integer dot: min * (exact sum of x); needs 32-element
// blocks (checked by the caller).
inline float side_terms(const Weights& w, int64_t n, const QAct& a, int64_t row) {
  const int64_t nc = w.K / 32;
  return w.min ? dot_fixed(w.min + n * w.nb, a.fsum.data() + row * nc, nc) : 0.f;
}

// out[r, n0 + j] for R rows of x and NR weight rows: NR independent accumulator chains per x
// row keep the FMA pipes busy at batch 1. Each output still sees the blocks in order c = 0..,
// with the same operations whatever R and NR are: the tiling never changes a result's bits.
template <int R, int NR, int FMT, int BS>
void tile_qa(const Weights& w, int64_t n0, const QAct& a, int64_t m0, float* out, int64_t ldo) {
  __m256 acc[R][NR];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t nc = w.K / 32;
  for (int64_t c = 0; c < nc; ++c) {
    __m256i wv[NR][2];
    __m256 s0[NR], s1[NR];
    for (int j = 0; j < NR; ++j) {
      load_w32<FMT>(w, n0 + j, c, wv[j]);
      const float* sc = w.scale + (n0 + j) * w.nb + c * (32 / BS);
      s0[j] = _mm256_set1_ps(sc[0]);
      s1[j] = BS == 16 ? _mm256_set1_ps(sc[1]) : s0[j];
    }
    for (int r = 0; r < R; ++r) {
      const int64_t row = m0 + r;
      const int16_t* xq = a.q.data() + row * w.K + c * 32;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
      const __m256 dx = _mm256_set1_ps(a.d[row * nc + c]);
      for (int j = 0; j < NR; ++j) {
        if constexpr (BS == 32) {      // both halves share one scale: one integer sum
          const __m256i dot = dot_s16(_mm256_madd_epi16(wv[j][0], x0), wv[j][1], x1);
          acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s0[j], dx), acc[r][j]);
        } else {                       // two blocks of 16, one per half
          const __m256 f0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(wv[j][0], x0));
          const __m256 f1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(wv[j][1], x1));
          acc[r][j] = _mm256_fmadd_ps(f0, _mm256_mul_ps(s0[j], dx), acc[r][j]);
          acc[r][j] = _mm256_fmadd_ps(f1, _mm256_mul_ps(s1[j], dx), acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j)
      out[r * ldo + n0 + j] = hsum8(acc[r][j]) + side_terms(w, n0 + j, a, m0 + r);
}

// Weight rows [n0, n1) against x rows [m0, m0 + rows): 4 weight rows at a time at batch 1,
// 2 with more x rows (so the accumulators stay in 16 registers), single rows at the end.
template <int FMT, int BS>
void tile_span_qa(int rows, const Weights& w, int64_t n0, int64_t n1, const QAct& a,
                  int64_t m0, float* out, int64_t ldo) {
  int64_t n = n0;
  switch (rows) {
    case 1: for (; n + 4 <= n1; n += 4) tile_qa<1, 4, FMT, BS>(w, n, a, m0, out, ldo); break;
    case 2: for (; n + 2 <= n1; n += 2) tile_qa<2, 2, FMT, BS>(w, n, a, m0, out, ldo); break;
    case 3: for (; n + 2 <= n1; n += 2) tile_qa<3, 2, FMT, BS>(w, n, a, m0, out, ldo); break;
    default: for (; n + 2 <= n1; n += 2) tile_qa<4, 2, FMT, BS>(w, n, a, m0, out, ldo); break;
  }
  for (; n < n1; ++n) {
    switch (rows) {
      case 1: tile_qa<1, 1, FMT, BS>(w, n, a, m0, out, ldo); break;
      case 2: tile_qa<2, 1, FMT, BS>(w, n, a, m0, out, ldo); break;
      case 3: tile_qa<3, 1, FMT, BS>(w, n, a, m0, out, ldo); break;
      default: tile_qa<4, 1, FMT, BS>(w, n, a, m0, out, ldo); break;
    }
  }
}

using SpanQaFn = void (*)(int, const Weights&, int64_t, int64_t, const QAct&, int64_t, float*,
                          int64_t);

SpanQaFn pick_span_qa(int64_t fmt, int64_t bs) {
  if (fmt == kQ4) return tile_span_qa<kQ4, 32>;
  return bs == 16 ? tile_span_qa<kQ8, 16> : tile_span_qa<kQ8, 32>;
}

}  // namespace

// x: (M, K) f32 contiguous -> (M, N) f32
torch::Tensor qlinear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min,
                      int64_t fmt, int64_t bs, int64_t zp, int64_t N, int64_t K, int64_t quant_act) {
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
  float* op = out.data_ptr<float>();
  constexpr int64_t kColChunk = 16;   // weight rows kept hot in cache across row tiles
  const int64_t chunks = (N + kColChunk - 1) / kColChunk;
  // Tiny products are not worth a fork/join (measured: 2^18 gives 47 tok/s batch-1 decode on
  // SmolLM2 here, 2^20 gives 40, 2^22 gives 32).
  const bool parallel = M * N * K >= (1 << 18);
  if (quant_act && fmt != kF32) {
    TORCH_CHECK(K % 32 == 0 && (!w.min || bs == 32),
                "qlinear: quantized activations need K % 32 == 0 and 32-element min blocks");
    QAct a;
    quantize_rows(xp, M, K, a);
    const SpanQaFn span = pick_span_qa(fmt, bs);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n0 = c * kColChunk, n1 = std::min(N, n0 + kColChunk);
      for (int64_t m = 0; m < M; m += kRowTile)
        span((int)std::min<int64_t>(kRowTile, M - m), w, n0, n1, a, m, op + m * N, N);
    }
    return out;
  }
  std::vector<float> xs = w.min ? block_sums(xp, M, K, bs) : std::vector<float>();
  const TileFn tile = pick_tile(fmt, bs);
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

// y = x * w / sqrt(mean(x^2) + eps) for one row of D floats (D % 8 == 0); out may alias r.
inline void rms_row(const float* r, const float* wp, int64_t D, float eps, float* out) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) {
    __m256 v = _mm256_loadu_ps(r + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  const float inv = 1.f / std::sqrt(hsum8(acc) / (float)D + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = r[i] * inv * wp[i];
}

// Rotate one head in place: neox pairs (i, i + D/2), else adjacent pairs (2i, 2i + 1).
inline void rope_head(float* x, const float* cs, const float* sn, int64_t D, bool neox) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x1 = x[a], x2 = x[b];
    x[a] = x1 * cs[i] - x2 * sn[i];
    x[b] = x2 * cs[i] + x1 * sn[i];
  }
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
  for (int64_t m = 0; m < M; ++m) rms_row(xp + m * D, wp, D, (float)eps, op + m * D);
  return out;
}

// The step between the q|k|v projection and attention, in one pass: split the fused
// projection (T, (H + 2 KV) * D) into heads, RMS-normalise q and k per head when q_norm /
// k_norm are given (Gemma 3), rotate them by the per-token cos/sin tables (T, D/2), and
// write k and v into the paged caches at their slots. Returns q as (T, H, D).
torch::Tensor qkv_rope_cache(torch::Tensor qkv, torch::Tensor q_norm, torch::Tensor k_norm,
                             double eps, torch::Tensor cos, torch::Tensor sin, int64_t neox,
                             int64_t H, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots) {
  const int64_t T = qkv.size(0), KV = kc.size(2), D = kc.size(3), W = (H + 2 * KV) * D;
  TORCH_CHECK(qkv.is_contiguous() && qkv.dtype() == torch::kFloat32 && qkv.size(1) == W,
              "qkv_rope_cache: qkv must be (T, (H + 2 KV) * D) f32");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
              cos.size(0) == T && cos.size(1) == D / 2 && D % 8 == 0, "qkv_rope_cache: shapes");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.sizes() == vc.sizes() &&
              kc.dtype() == torch::kFloat32 && vc.dtype() == torch::kFloat32,
              "qkv_rope_cache: caches must be contiguous f32 of one shape");
  TORCH_CHECK((!q_norm.numel() || q_norm.numel() == D) && (!k_norm.numel() || k_norm.numel() == D),
              "qkv_rope_cache: norm weights must have head_dim elements");
  TORCH_CHECK(slots.numel() == T && slots.dtype() == torch::kInt64, "qkv_rope_cache: slots");
  const int64_t n_slots = kc.size(0) * kc.size(1);
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(slots.data_ptr<int64_t>()[i] >= 0 && slots.data_ptr<int64_t>()[i] < n_slots,
                "qkv_rope_cache: slot out of range");
  auto q = torch::empty({T, H, D}, qkv.options());
  const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float* qn = q_norm.numel() ? q_norm.data_ptr<float>() : nullptr;
  const float* kn = k_norm.numel() ? k_norm.data_ptr<float>() : nullptr;
  float *qp = q.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  const int64_t* sl = slots.data_ptr<int64_t>();
#pragma omp parallel for schedule(static) if (T >= 16)
  for (int64_t t = 0; t < T; ++t) {
    const float* row = src + t * W;
    const float *cs = cp + t * (D / 2), *sn = sp + t * (D / 2);
    for (int64_t h = 0; h < H + KV; ++h) {
      float* dst = h < H ? qp + (t * H + h) * D : kp + (sl[t] * KV + (h - H)) * D;
      const float* nw = h < H ? qn : kn;
      if (nw) rms_row(row + h * D, nw, D, (float)eps, dst);
      else std::copy(row + h * D, row + (h + 1) * D, dst);
      rope_head(dst, cs, sn, D, neox != 0);
    }
    std::copy(row + (H + KV) * D, row + W, vp + sl[t] * KV * D);
  }
  return q;
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

// exp(x) for x <= 0 (softmax arguments after the max is subtracted), 8 at a time: 2^n * p(r)
// with x = n ln2 + r, |r| <= ln2/2, p a degree-6 Taylor polynomial (relative error ~2e-7).
// Own code, no libm call per score; results depend on x alone.
inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

// sc[i] = exp(sc[i] - mx) for i < n; returns their sum (8 lanes, then the tail: a fixed order).
inline float softmax_numerators(float* sc, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(sc + i), m));
    _mm256_storeu_ps(sc + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum8(acc);
  if (i < n) {
    alignas(32) float tail[8];
    for (int k = 0; k < 8; ++k) tail[k] = i + k < n ? sc[i + k] : mx;
    _mm256_store_ps(tail, exp_neg(_mm256_sub_ps(_mm256_load_ps(tail), m)));
    for (int k = 0; i + k < n; ++k) { sc[i + k] = tail[k]; sum += tail[k]; }
  }
  return sum;
}

// One query row of one head against keys [lo, pos] of its sequence, read through its block
// table block by block: scores in key order, softmax with the row max, values summed in key
// order into o (the output row, overwritten). The arithmetic per (query, key) is the same
// however the batch or the prompt is cut.
inline void attend_row(const float* qv, const float* kc, const float* vc, const int64_t* table,
                       int64_t BS, int64_t KV, int64_t kvh, int64_t D, int64_t lo, int64_t pos,
                       float scale, std::vector<float>& sc, float* o) {
  const int64_t stride = KV * D;
  sc.resize(pos - lo + 1);
  float mx = -INFINITY;
  for (int64_t j = lo; j <= pos;) {
    const int64_t b = j / BS, end = std::min(pos + 1, (b + 1) * BS);
    const float* kb = kc + (table[b] * BS * KV + kvh) * D;       // slot 0 of the block
    for (; j + 4 <= end; j += 4) {       // 4 keys at once: independent chains, same sums
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float* k0 = kb + (j - b * BS) * stride;
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qd = _mm256_loadu_ps(qv + d);
        a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + d), a0);
        a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + stride + d), a1);
        a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + 2 * stride + d), a2);
        a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + 3 * stride + d), a3);
      }
      const float x[4] = {hsum8(a0) * scale, hsum8(a1) * scale, hsum8(a2) * scale, hsum8(a3) * scale};
      for (int i = 0; i < 4; ++i) { sc[j + i - lo] = x[i]; mx = std::max(mx, x[i]); }
    }
    for (; j < end; ++j) {
      const float* kv = kb + (j - b * BS) * stride;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qv + d), _mm256_loadu_ps(kv + d), acc);
      const float x = hsum8(acc) * scale;
      sc[j - lo] = x;
      mx = std::max(mx, x);
    }
  }
  const float sum = softmax_numerators(sc.data(), pos - lo + 1, mx);
  const __m256 inv = _mm256_set1_ps(1.f / sum);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {   // 64 output dims in registers, keys in order
    const int64_t nd = std::min<int64_t>(64, D - d0) / 8;
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j = lo; j <= pos;) {
      const int64_t b = j / BS, end = std::min(pos + 1, (b + 1) * BS);
      const float* vb = vc + (table[b] * BS * KV + kvh) * D + d0;
      for (; j < end; ++j) {
        const float* vv = vb + (j - b * BS) * stride;
        const __m256 p = _mm256_set1_ps(sc[j - lo]);
        for (int i = 0; i < 8; ++i)
          if (i < nd) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vv + 8 * i), acc[i]);
      }
    }
    for (int i = 0; i < nd; ++i) _mm256_storeu_ps(o + d0 + 8 * i, _mm256_mul_ps(acc[i], inv));
  }
}

// Causal (optionally sliding-window) attention over a paged cache, one (token, head) at a
// time (attend_row). q: (T, H, D); caches: (NB, BS, KV, D); tables: (S, maxb) int64;
// meta: (S, 3) int64 rows of (q_start, q_len, context_len).
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
  int64_t work = 0;                     // key rows read, summed over queries and heads
  for (int64_t s = 0; s < S; ++s) work += mp[3 * s + 1] * mp[3 * s + 2] * H;
#pragma omp parallel if (work >= 4096)   // a short decode step stays on one core
  {
    std::vector<float> sc;
#pragma omp for schedule(dynamic, 4)
    for (int64_t th = 0; th < T * H; ++th) {
      const int64_t t = th / H, h = th % H, s = row_seq[t];
      if (s < 0) continue;
      const int64_t q_start = mp[3 * s], q_len = mp[3 * s + 1], ctx = mp[3 * s + 2];
      const int64_t pos = ctx - q_len + (t - q_start);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      attend_row(qp + (t * H + h) * D, kp, vp, tp + s * maxb, BS, KV, h / (H / KV), D, lo, pos,
                 (float)scale, sc, op + (t * H + h) * D);
    }
  }
  return out;
}

// ---- the step as one call ------------------------------------------------------------
// A Plan holds every layer's weights and KV caches, set up once at start-up, and runs the
// decoder (model/transformer.py's math, with the very same kernels in the same order, so the
// same bits) in one call per step: no Python between the layers.
struct QW {
  torch::Tensor q, scale, min;
  int64_t fmt, bs, zp, N, K;
  QW(torch::Tensor q, torch::Tensor scale, torch::Tensor min, int64_t fmt, int64_t bs, int64_t zp,
     int64_t N, int64_t K) : q(q), scale(scale), min(min), fmt(fmt), bs(bs), zp(zp), N(N), K(K) {}
  torch::Tensor operator()(const torch::Tensor& x, int64_t quant) const {
    return qlinear(x.reshape({-1, K}).contiguous(), q, scale, min, fmt, bs, zp, N, K, quant);
  }
};

struct PlanLayer {
  torch::Tensor attn_norm, q_norm, k_norm, post_attn_norm, ffn_norm, post_ffw_norm, kc, vc;
  QW qkv, o, gate_up, down;
  int64_t group, sliding;
};

class Plan {
 public:
  Plan(int64_t n_heads, int64_t ffn_dim, double eps, int64_t neox, int64_t gelu, double attn_scale,
       int64_t window, int64_t quant, torch::Tensor out_norm)
      : H_(n_heads), F_(ffn_dim), eps_(eps), neox_(neox), gelu_(gelu), scale_(attn_scale),
        window_(window), quant_(quant), out_norm_(out_norm) {}

  void add_layer(torch::Tensor attn_norm, torch::Tensor q_norm, torch::Tensor k_norm,
                 torch::Tensor post_attn_norm, torch::Tensor ffn_norm, torch::Tensor post_ffw_norm,
                 QW qkv, QW o, QW gate_up, QW down, int64_t group, int64_t sliding,
                 torch::Tensor kc, torch::Tensor vc) {
    layers_.push_back({attn_norm, q_norm, k_norm, post_attn_norm, ffn_norm, post_ffw_norm, kc, vc,
                       qkv, o, gate_up, down, group, sliding});
  }

  // x: (T, d_model) embedded; cos/sin: [global, local] tables; slots/tables: per KV group.
  torch::Tensor forward(torch::Tensor x, std::vector<torch::Tensor> cos,
                        std::vector<torch::Tensor> sin, std::vector<torch::Tensor> slots,
                        std::vector<torch::Tensor> tables, torch::Tensor meta) const {
    const int64_t T = x.size(0);
    for (const PlanLayer& L : layers_) {
      torch::Tensor h = rms_norm(x.contiguous(), L.attn_norm, eps_);
      torch::Tensor q = qkv_rope_cache(L.qkv(h, quant_), L.q_norm, L.k_norm, eps_, cos[L.sliding],
                                       sin[L.sliding], neox_, H_, L.kc, L.vc, slots[L.group]);
      torch::Tensor a = paged_attention(q, L.kc, L.vc, tables[L.group], meta, scale_,
                                        L.sliding ? window_ : 0);
      h = L.o(a.reshape({T, -1}), quant_);
      if (L.post_attn_norm.numel()) h = rms_norm(h, L.post_attn_norm, eps_);
      x = x + h;
      torch::Tensor gu = L.gate_up(rms_norm(x.contiguous(), L.ffn_norm, eps_), quant_);
      h = L.down(gated_act(gu.narrow(1, 0, F_).contiguous(), gu.narrow(1, F_, F_).contiguous(),
                           gelu_), quant_);
      if (L.post_ffw_norm.numel()) h = rms_norm(h, L.post_ffw_norm, eps_);
      x = x + h;
    }
    return rms_norm(x.contiguous(), out_norm_, eps_);
  }

 private:
  int64_t H_, F_;
  double eps_;
  int64_t neox_, gelu_;
  double scale_;
  int64_t window_, quant_;
  torch::Tensor out_norm_;
  std::vector<PlanLayer> layers_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear);
  m.def("rms_norm", &rms_norm);
  m.def("qkv_rope_cache", &qkv_rope_cache);
  m.def("gated_act", &gated_act);
  m.def("paged_attention", &paged_attention);
  py::class_<QW>(m, "QW").def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, int64_t,
                                       int64_t, int64_t, int64_t, int64_t>());
  py::class_<Plan>(m, "Plan")
      .def(py::init<int64_t, int64_t, double, int64_t, int64_t, double, int64_t, int64_t,
                    torch::Tensor>())
      .def("add_layer", &Plan::add_layer)
      .def("forward", &Plan::forward, py::call_guard<py::gil_scoped_release>());
}
