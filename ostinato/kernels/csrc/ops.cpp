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
#include <cstring>
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <sys/syscall.h>
#include <unistd.h>
#include <tuple>
#include <type_traits>
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

// Per-block values of the weight rows (scales, mins), stored by fours of rows,
// [n / 4][block][n % 4], so the rows a tile reads together sit side by side; float32, or
// float16 where every value is exactly a half (the scales of Q4_0, Q4_1, Q8_0 ... are).
struct BlockVals {
  const void* p = nullptr;
  bool half = false;
  int64_t nb = 0;
  explicit operator bool() const { return p != nullptr; }
  int64_t at(int64_t n, int64_t b) const { return (n >> 2) * nb * 4 + (n & 3) + 4 * b; }
  float get(int64_t n, int64_t b) const {
    const int64_t i = at(n, b);
    return half ? _cvtsh_ss(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  __m128 four(int64_t n, int64_t b) const {          // rows n .. n + 3 (n % 4 == 0)
    const int64_t i = at(n, b);
    if (half) return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(
                                      static_cast<const uint16_t*>(p) + i)));
    return _mm_loadu_ps(static_cast<const float*>(p) + i);
  }
  __m128 two(int64_t n, int64_t b) const {           // rows n, n + 1 in lanes 0, 1 (n even)
    const int64_t i = at(n, b);
    if (half) {
      int32_t v;
      std::memcpy(&v, static_cast<const uint16_t*>(p) + i, 4);
      return _mm_cvtph_ps(_mm_cvtsi32_si128(v));
    }
    return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(static_cast<const float*>(p) + i)));
  }
};

struct Weights {
  int64_t fmt, bs, zp, N, K, nb;   // nb = blocks per row = K / bs
  const void* q;                   // (N, K) f32 | (N, K) int8 | (N, K/2) uint8
  BlockVals scale;                 // unused for f32
  BlockVals min;                   // p == nullptr when the format has none
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
    const __m256 s = _mm256_set1_ps(FMT == kF32 ? 1.f : w.scale.get(n, b));
    const float m = w.min ? w.min.get(n, b) : 0.f;
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
// ---- scratch -----------------------------------------------------------------------
// Kernels keep their scratch (quantized activations, tile packing, attention scores) in
// per-thread buffers that only ever grow: once a Plan has reserved the largest step, a step
// allocates nothing. Every growth is counted, so a test can see that none happens.
std::atomic<int64_t> g_scratch_growths{0};

template <class T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) {
    g_scratch_growths.fetch_add(1, std::memory_order_relaxed);
    v.resize(n);
  }
  return v.data();
}

struct QAct {
  std::vector<int16_t> q;     // (M, K)
  int64_t ldt = 0;            // row stride of the two below: M + 4 (a tile may read 4 rows)
  std::vector<float> dt;      // (K/32, ldt) scale per 32 elements, by block: [c][row]
  std::vector<float> fsumt;   // (K/32, ldt) exact float block sums of x (the min term)
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

// evens_first: each block's codes as [q0, q2, .., q30, q1, q3, .., q31], the order
// load_w32_bytes unpacks int8 weights in.
void quantize_rows(const float* x, int64_t M, int64_t K, QAct& a, bool evens_first) {
  const int64_t nb = K / 32;
  grow(a.q, M * K);
  a.ldt = M + 4;
  grow(a.dt, nb * a.ldt); grow(a.fsumt, nb * a.ldt);
  for (int64_t c = 0; c < nb; ++c)           // the 4 rows past M that a tile may read
    for (int64_t r = M; r < a.ldt; ++r) a.dt[c * a.ldt + r] = a.fsumt[c * a.ldt + r] = 0.f;
#pragma omp parallel for schedule(static) if (M >= 8)
  for (int64_t i = 0; i < M * nb; ++i) {
    int16_t* q = a.q.data() + i * 32;
    const int64_t at = (i % nb) * a.ldt + i / nb;
    quantize_block(x + i * 32, q, &a.dt[at], &a.fsumt[at]);
    if (evens_first) {
      int16_t t[32];
      for (int k = 0; k < 16; ++k) { t[k] = q[2 * k]; t[16 + k] = q[2 * k + 1]; }
      std::memcpy(q, t, sizeof t);
    }
  }
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

// The 32 int8 weights of chunk c of row n as [w0, w2, .., w30] and [w1, w3, .., w31] in
// int16, sign-extended with shifts (no shuffles: the shuffle port is what batch-1 tiles run
// short of); x comes quantized in the same order (quantize_rows' evens_first).
inline void load_w32_bytes(const Weights& w, int64_t n, int64_t c, __m256i out[2]) {
  const __m256i v = _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(w.q) + n * w.K + c * 32));
  out[0] = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
  out[1] = _mm256_srai_epi16(v, 8);
}

// Lane i of the result = the exact sum of v[i]'s 8 int32 lanes (integer adds: any order
// gives the same value). NV <= 4 fills the low half.
template <int NV>
inline __m256i lane_sums(const __m256i* v) {
  const __m256i z = _mm256_setzero_si256();
  auto at = [&](int i) { return i < NV ? v[i] : z; };
  const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(at(0), at(1)),
                                       _mm256_hadd_epi32(at(2), at(3)));
  if constexpr (NV <= 4) {
    return _mm256_zextsi128_si256(
        _mm_add_epi32(_mm256_castsi256_si128(u0), _mm256_extracti128_si256(u0, 1)));
  } else {
    const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(at(4), at(5)),
                                         _mm256_hadd_epi32(at(6), at(7)));
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                            _mm256_permute2x128_si256(u0, u1, 0x31));
  }
}

// Lane r * NR + j of a tile's outputs: the value of weight row n0 + j (w_lanes) and of x
// row m0 + r (x_lanes, from QAct's by-block rows).
template <int NR>
inline __m256 w_lanes(const BlockVals& v, int64_t n0, int64_t b) {
  if constexpr (NR == 4) return _mm256_zextps128_ps256(v.four(n0, b));
  else if constexpr (NR == 2)
    return _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(v.two(n0, b))));
  else return _mm256_set1_ps(v.get(n0, b));
}
template <int NR>
inline __m256 x_lanes(const float* q) {
  if constexpr (NR == 4) return _mm256_set1_ps(q[0]);
  else if constexpr (NR == 2)
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(q)),
                                    _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  else return _mm256_zextps128_ps256(_mm_loadu_ps(q));
}

// The arithmetic every quantized-activation output follows, whichever kernel runs it:
//   acc = 0; for each 32-block c (and each 16-half h when the weights have 16-blocks):
//     acc = fma(float(exact integer dot of the block), w_scale * x_scale, acc)
//     acc = fma(w_min, exact float sum of x's block, acc)          (formats with a min)
// These AVX tiles and the AMX tiles further down both compute exactly this, so a row's
// result never depends on which kernel its batch size picked. A tile is R x rows and NR
// weight rows (n0 % NR == 0), one output per lane.
template <int R, int NR, int FMT, int BS>
void tile_qa(const Weights& w, int64_t n0, const QAct& a, int64_t m0, float* out, int64_t ldo) {
  constexpr int NV = R * NR;                 // lane l = r * NR + j
  static_assert(NV <= 8 && R <= 4, "8 outputs per tile at most");
  const int64_t nc = w.K / 32;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    __m256i wv[NR][2];
    if (R == 1 || m0 == 0) {
      // Small batches stream the weights, and one core alone keeps too few loads in flight
      // to reach the memory's bandwidth: ask for them 512 blocks ahead (8 KB of Q4 rows, 16
      // KB of int8), which runs into the rows that come next, as a thread walks its rows in
      // memory order (with more x rows, the first row tile fetches; the others find the
      // rows in cache). SmolLM2 decode here, median tok/s: 8 blocks 85-111, 32: 110-112,
      // 128: 138-150, 256: 152-157, 512: 151-154. A prefetch past the weights' end is
      // harmless (it never faults).
      constexpr int64_t kBytes = FMT == kQ4 ? 16 : 32;
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(static_cast<const char*>(w.q) + ((n0 + j) * (w.K / 32) + c + 512) * kBytes,
                     _MM_HINT_T0);
    }
    for (int j = 0; j < NR; ++j) {
      if constexpr (FMT == kQ8 && BS == 32) load_w32_bytes(w, n0 + j, c, wv[j]);
      else load_w32<FMT>(w, n0 + j, c, wv[j]);
    }
    __m256i dots[2][NV];
    for (int r = 0; r < R; ++r) {
      const int16_t* xq = a.q.data() + (m0 + r) * w.K + c * 32;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
      for (int j = 0; j < NR; ++j) {
        if constexpr (BS == 32) {
          dots[0][r * NR + j] = dot_s16(_mm256_madd_epi16(wv[j][0], x0), wv[j][1], x1);
        } else {
          dots[0][r * NR + j] = _mm256_madd_epi16(wv[j][0], x0);
          dots[1][r * NR + j] = _mm256_madd_epi16(wv[j][1], x1);
        }
      }
    }
    const __m256 dx = x_lanes<NR>(a.dt.data() + c * a.ldt + m0);
    for (int h = 0; h < 32 / BS; ++h) {
      const __m256 s = _mm256_mul_ps(w_lanes<NR>(w.scale, n0, c * (32 / BS) + h), dx);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lane_sums<NV>(dots[h])), s, acc);
    }
    if (w.min)
      acc = _mm256_fmadd_ps(w_lanes<NR>(w.min, n0, c),
                            x_lanes<NR>(a.fsumt.data() + c * a.ldt + m0), acc);
  }
  alignas(32) float o[8];
  _mm256_store_ps(o, acc);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) out[r * ldo + n0 + j] = o[r * NR + j];
}

// Weight rows [n0, n1) against x rows [m0, m0 + rows): 4 weight rows at a time at batch 1,
// 2 with more x rows (so the accumulators stay in 16 registers), single rows at the end.
template <int FMT, int BS>
void tile_span_qa(int rows, const Weights& w, int64_t n0, int64_t n1, const QAct& a,
                  int64_t m0, float* out, int64_t ldo) {
  int64_t n = n0;
  switch (rows) {
    case 1:
      for (; n + 4 <= n1; n += 4) tile_qa<1, 4, FMT, BS>(w, n, a, m0, out, ldo);
      break;
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

// ---- AMX (Sapphire Rapids and later) ------------------------------------------------
// The same arithmetic as tile_qa, with the integer dots on the tile unit: a weight tile of
// 16 rows x one block meets a tile of 16 activation rows. int16 activations are split
// exactly into hi * 256 + lo (hi signed, lo unsigned bytes), so two int8 tile products give
// the same exact integers as the int16 dot; the per-block scaling then runs on 16 rows at a
// time in AVX-512, in the order above. Integer sums are exact and each output element sees
// the same float operations, so results equal tile_qa's bit for bit (tests/test_kernels.py).
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define OSTINATO_AMX 1

bool amx_permitted() {        // Linux hands out the tile state only on request
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Two sets of four tiles: int32 sums of the hi and lo bytes (16 weight rows x 16 x rows),
// weights (16 rows x BS bytes), activation bytes (BS/4 rows of 16 x rows x 4 bytes).
void load_tile_config(int64_t bs) {
  TileConfig cfg;
  for (int t : {0, 1, 4, 5}) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  for (int t : {2, 6}) { cfg.rows[t] = 16; cfg.colsb[t] = (uint16_t)bs; }
  for (int t : {3, 7}) { cfg.rows[t] = (uint8_t)(bs / 4); cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
}

// Activations in tile order: for x-row tile t (16 rows) and block c, byte k of row m sits at
// [t][c][k / 4][m % 16][k % 4]; scales, exact float sums and integer sums at [t][c][m % 16].
// Rows past M stay zero.
struct AmxAct {
  int64_t tiles = 0, nc = 0;
  std::vector<int8_t> hi;
  std::vector<uint8_t> lo;
  std::vector<float> d, fsum;
  std::vector<int32_t> qsum;             // only for weights with a zero point
};

void alloc_amx(int64_t M, int64_t K, bool qsum, AmxAct& p) {
  p.nc = K / 32;
  p.tiles = (M + 15) / 16;
  const int64_t n = p.tiles * p.nc;
  grow(p.hi, n * 512); grow(p.lo, n * 512);
  grow(p.d, n * 16); grow(p.fsum, n * 16);
  if (qsum) grow(p.qsum, n * 16);
  if (M % 16) {                        // the last tile's missing rows are zeros
    const int64_t first = (p.tiles - 1) * p.nc;
    std::memset(p.hi.data() + first * 512, 0, p.nc * 512);
    std::memset(p.lo.data() + first * 512, 0, p.nc * 512);
    std::fill_n(p.d.data() + first * 16, p.nc * 16, 0.f);
    std::fill_n(p.fsum.data() + first * 16, p.nc * 16, 0.f);
    if (qsum) std::fill_n(p.qsum.data() + first * 16, p.nc * 16, 0);
  }
}

// Quantize block i (row i / nc, block i % nc) of x exactly as quantize_rows does, straight
// into tile order.
inline void pack_cell(const float* x, int64_t i, bool qsum, AmxAct& p) {
  const int64_t m = i / p.nc, c = i % p.nc, cell = (m / 16) * p.nc + c, at = cell * 16 + m % 16;
  alignas(64) int16_t q16[32];
  quantize_block(x + i * 32, q16, &p.d[at], &p.fsum[at]);
  const __m512i q = _mm512_load_si512(q16);
  const __m256i rows = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112);   // in dwords
  const int64_t base = cell * 512 + (m % 16) * 4;
  _mm256_i32scatter_epi32(p.hi.data() + base, rows, _mm512_cvtepi16_epi8(_mm512_srai_epi16(q, 8)), 4);
  _mm256_i32scatter_epi32(p.lo.data() + base, rows,
                          _mm512_cvtepi16_epi8(_mm512_and_si512(q, _mm512_set1_epi16(0xff))), 4);
  if (qsum) p.qsum[at] = _mm512_reduce_add_epi32(_mm512_madd_epi16(q, _mm512_set1_epi16(1)));
}

// Rows [n0, n0 + 16) of the weights as int8 bytes, row stride K (Q4: codes 0..15, the zero
// point is taken off the integer sums instead); rows past N are zero.
const int8_t* weight_rows(const Weights& w, int64_t n0, int8_t* buf) {
  const int64_t rows = std::min<int64_t>(16, w.N - n0), K = w.K;
  if (w.fmt == kQ8 && rows == 16) return static_cast<const int8_t*>(w.q) + n0 * K;
  for (int64_t r = 0; r < 16; ++r) {
    int8_t* dst = buf + r * K;
    if (r >= rows) { std::memset(dst, 0, K); continue; }
    if (w.fmt == kQ8) { std::memcpy(dst, static_cast<const int8_t*>(w.q) + (n0 + r) * K, K); continue; }
    const uint8_t* src = static_cast<const uint8_t*>(w.q) + (n0 + r) * K / 2;
    int64_t c = 0;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
    const __m512i second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (; c + 4 <= K / 32; c += 4) {       // 4 blocks: low nibbles then high, block by block
      const __m512i b = _mm512_loadu_si512(src + c * 16);
      const __m512i lo = _mm512_and_si512(b, m4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
      _mm512_storeu_si512(dst + c * 32, _mm512_permutex2var_epi64(lo, first, hi));
      _mm512_storeu_si512(dst + c * 32 + 64, _mm512_permutex2var_epi64(lo, second, hi));
    }
    const __m128i mask = _mm_set1_epi8(0x0f);
    for (; c < K / 32; ++c) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c * 16));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c * 32), _mm_and_si128(b, mask));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c * 32 + 16),
                       _mm_and_si128(_mm_srli_epi16(b, 4), mask));
    }
  }
  return buf;
}

// In-register 16 x 16 transpose of floats.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 8; ++i) {
    const int a = (i / 4) * 8 + i % 4, b = a + 4;
    t[a] = _mm512_shuffle_f32x4(r[a], r[b], 0x88);
    t[b] = _mm512_shuffle_f32x4(r[a], r[b], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// One group of 16 weight rows against every x-row tile.
template <int FMT, int BS>
void amx_group(const Weights& w, int64_t n0, const AmxAct& a, int64_t M, float* out,
               int64_t ldo, int8_t* wbuf) {
  const int64_t K = w.K, nc = a.nc, rows = std::min<int64_t>(16, w.N - n0);
  const int8_t* A = weight_rows(w, n0, wbuf);
  int64_t row[16];                         // padding rows reuse a real row's scales
  for (int n = 0; n < 16; ++n) row[n] = n0 + std::min<int64_t>(n, rows - 1);
  // the 16 rows' values of block b, as floats (by fours of rows: 4 vector loads when whole)
  auto vals16 = [&](const BlockVals& v, int64_t b, float* out) {
    if (rows == 16) for (int f = 0; f < 4; ++f) _mm_storeu_ps(out + 4 * f, v.four(n0 + 4 * f, b));
    else for (int n = 0; n < 16; ++n) out[n] = v.get(row[n], b);
  };
  // the next group's weight bytes stream into the cache while this group computes (they
  // come from memory: a step reads each weight once), a few lines per pair of cells
  const int64_t row_bytes = FMT == kQ4 ? K / 2 : K, lines = (row_bytes + 63) / 64;
  const int64_t next_rows = std::max<int64_t>(0, std::min<int64_t>(16, w.N - n0 - 16));
  const char* next = static_cast<const char*>(w.q) + (next_rows ? n0 + 16 : 0) * row_bytes;
  const int64_t to_fetch = next_rows * lines, pairs = std::max<int64_t>(1, nc * (32 / BS) / 2);
  int64_t fetched = 0;
  auto prefetch_some = [&](int64_t pair) {
    for (const int64_t upto = to_fetch * (pair + 1) / pairs; fetched < upto; ++fetched)
      _mm_prefetch(next + (fetched / lines) * row_bytes + (fetched % lines) * 64, _MM_HINT_T0);
  };
  // Cells (block c, half h) go two at a time on separate tiles, so one pair's tile
  // products overlap the other's: X on tmm0-3 (C hi, C lo, weights, x bytes), Y on tmm4-7.
  constexpr int H = 32 / BS;
  const int64_t cells = nc * H;
  alignas(64) int32_t cs[2][2][16][16];      // [X/Y][hi/lo]
  auto w_at = [&](int64_t i) { return A + (i / H) * 32 + (i % H) * BS; };
  auto x_at = [&](const auto& v, int64_t t, int64_t i) {
    return v.data() + (t * nc + i / H) * 512 + (i % H) * (BS / 4) * 64;
  };
  for (int64_t t = 0; t < a.tiles; ++t) {
    __m512 acc[16];
    for (int n = 0; n < 16; ++n) acc[n] = _mm512_setzero_ps();
    auto finish = [&](int64_t i, int32_t (*ch)[16], int32_t (*cl)[16]) {
      const int64_t c = i / H, h = i % H, cell = t * nc + c;
      const __m512 dx = _mm512_loadu_ps(a.d.data() + cell * 16);
      __m512i zq = _mm512_setzero_si512();
      if (FMT == kQ4 && w.zp)
        zq = _mm512_mullo_epi32(_mm512_loadu_si512(a.qsum.data() + cell * 16),
                                _mm512_set1_epi32((int32_t)w.zp));
      alignas(64) float ws[16];
      vals16(w.scale, c * H + h, ws);
      auto scale_in = [&](auto with_zp) {
        for (int n = 0; n < 16; ++n) {
          __m512i iv = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(ch[n]), 8),
                                        _mm512_load_si512(cl[n]));
          if constexpr (decltype(with_zp)::value) iv = _mm512_sub_epi32(iv, zq);
          const __m512 s = _mm512_mul_ps(_mm512_set1_ps(ws[n]), dx);
          acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv), s, acc[n]);
        }
      };
      if (FMT == kQ4 && w.zp) scale_in(std::true_type{});
      else scale_in(std::false_type{});
      if (w.min && h == H - 1) {
        const __m512 fs = _mm512_loadu_ps(a.fsum.data() + cell * 16);
        vals16(w.min, c, ws);
        for (int n = 0; n < 16; ++n) acc[n] = _mm512_fmadd_ps(_mm512_set1_ps(ws[n]), fs, acc[n]);
      }
    };
    int64_t i = 0;
    for (; i + 2 <= cells; i += 2) {
      if (t == 0) prefetch_some(i / 2);
      _tile_zero(0); _tile_zero(1); _tile_zero(4); _tile_zero(5);
      _tile_loadd(2, w_at(i), K);
      _tile_loadd(6, w_at(i + 1), K);
      _tile_loadd(3, x_at(a.hi, t, i), 64);
      _tile_loadd(7, x_at(a.hi, t, i + 1), 64);
      if constexpr (FMT == kQ4) { _tile_dpbusd(0, 2, 3); _tile_dpbusd(4, 6, 7); }
      else { _tile_dpbssd(0, 2, 3); _tile_dpbssd(4, 6, 7); }
      _tile_loadd(3, x_at(a.lo, t, i), 64);
      _tile_loadd(7, x_at(a.lo, t, i + 1), 64);
      if constexpr (FMT == kQ4) { _tile_dpbuud(1, 2, 3); _tile_dpbuud(5, 6, 7); }
      else { _tile_dpbsud(1, 2, 3); _tile_dpbsud(5, 6, 7); }
      _tile_stored(0, cs[0][0], 64); _tile_stored(1, cs[0][1], 64);
      _tile_stored(4, cs[1][0], 64); _tile_stored(5, cs[1][1], 64);
      finish(i, cs[0][0], cs[0][1]);
      finish(i + 1, cs[1][0], cs[1][1]);
    }
    if (i < cells) {
      _tile_zero(0); _tile_zero(1);
      _tile_loadd(2, w_at(i), K);
      _tile_loadd(3, x_at(a.hi, t, i), 64);
      if constexpr (FMT == kQ4) _tile_dpbusd(0, 2, 3); else _tile_dpbssd(0, 2, 3);
      _tile_loadd(3, x_at(a.lo, t, i), 64);
      if constexpr (FMT == kQ4) _tile_dpbuud(1, 2, 3); else _tile_dpbsud(1, 2, 3);
      _tile_stored(0, cs[0][0], 64); _tile_stored(1, cs[0][1], 64);
      finish(i, cs[0][0], cs[0][1]);
    }
    transpose16(acc);                            // acc[m] = row m's 16 outputs
    const int64_t mrows = std::min<int64_t>(16, M - t * 16);
    const __mmask16 keep = (__mmask16)((1u << rows) - 1);
    for (int64_t m = 0; m < mrows; ++m)
      _mm512_mask_storeu_ps(out + (t * 16 + m) * ldo + n0, keep, acc[m]);
  }
}

// Quantizing, packing and the tile products share one parallel region.
// (a thread_local named inside a parallel region is each thread's own: the caller's are
// bound to references first)
thread_local std::vector<int8_t> t_wbuf;      // each thread's unpacked weight rows
thread_local AmxAct t_amx;                    // the calling thread's packed activations

void qlinear_amx(const Weights& w, const float* x, int64_t M, float* out, bool parallel) {
  AmxAct& a = t_amx;
  const bool qsum = w.fmt == kQ4 && w.zp;
  alloc_amx(M, w.K, qsum, a);
  auto group = w.fmt == kQ4 ? amx_group<kQ4, 32>
             : w.bs == 16 ? amx_group<kQ8, 16> : amx_group<kQ8, 32>;
  const int64_t groups = (w.N + 15) / 16, cells = a.tiles * a.nc;
#pragma omp parallel if (parallel)
  {
    // a thread packs whole tile cells (16 rows of one block): rows of one cell share cache
    // lines, and splitting them between threads made the lines ping-pong
#pragma omp for schedule(static)
    for (int64_t i = 0; i < cells; ++i) {
      const int64_t t = i / a.nc, c = i % a.nc;
      for (int64_t m = t * 16; m < std::min(M, t * 16 + 16); ++m) pack_cell(x, m * a.nc + c, qsum, a);
    }
    load_tile_config(w.bs);
    int8_t* wbuf = grow(t_wbuf, 16 * w.K);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) group(w, g * 16, a, M, out, w.N, wbuf);
    _tile_release();
  }
}
#else
bool amx_permitted() { return false; }
void qlinear_amx(const Weights&, const float*, int64_t, float*, bool) {}
#endif

thread_local QAct t_qact;                     // the calling thread's quantized activations

// Small batches stay on AVX: a tile product costs the same for 1 x row as for 16. Measured
// on SmolLM2 here, offline tok/s with 4 / 5 / 6 sequences: AVX 283 / 273 / 283, AMX 224 /
// 283 / 348 (AVX prefetching); on its matmuls AMX is 1.6x AVX at 16 rows, 3x from 64.
int64_t g_amx_min_rows = 5;
bool g_amx_enabled = true;
bool use_amx(int64_t M) { return g_amx_enabled && M >= g_amx_min_rows && amx_permitted(); }

}  // namespace

// x: (M, K) f32 contiguous -> out: (M, N) f32 contiguous
void qlinear_into(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min,
                  int64_t fmt, int64_t bs, int64_t zp, int64_t N, int64_t K, int64_t quant_act,
                  torch::Tensor out) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: (M,K) f32");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 &&
              out.size(0) == x.size(0) && out.size(1) == N, "qlinear: out must be (M, N) f32");
  TORCH_CHECK(x.size(1) == K && K % bs == 0, "qlinear: x has the wrong width");
  TORCH_CHECK((fmt == kQ8 && (bs == 16 || bs == 32)) || ((fmt == kQ4 || fmt == kF32) && bs == 32),
              "qlinear: unsupported format/block size");
  TORCH_CHECK(fmt == kF32 || (scale.is_contiguous() && scale.numel() == (N + 3) / 4 * (K / bs) * 4 &&
                              (!min.numel() || min.numel() == scale.numel())),
              "qlinear: scales (and mins) must be (ceil(N/4), K/bs, 4)");
  const int64_t M = x.size(0);
  auto vals = [&](const torch::Tensor& t) {
    TORCH_CHECK(!t.numel() || t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kHalf,
                "qlinear: scales and mins are float32 or float16");
    return BlockVals{t.numel() ? t.data_ptr() : nullptr, t.scalar_type() == torch::kHalf, K / bs};
  };
  Weights w{fmt, bs, zp, N, K, K / bs, q.data_ptr(), fmt == kF32 ? BlockVals{} : vals(scale),
            vals(min)};
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
    if (use_amx(M)) {
      qlinear_amx(w, xp, M, op, parallel);
      return;
    }
    QAct& a = t_qact;
    quantize_rows(xp, M, K, a, fmt == kQ8 && bs == 32);
    const SpanQaFn span = pick_span_qa(fmt, bs);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n0 = c * kColChunk, n1 = std::min(N, n0 + kColChunk);
      for (int64_t m = 0; m < M; m += kRowTile)
        span((int)std::min<int64_t>(kRowTile, M - m), w, n0, n1, a, m, op + m * N, N);
    }
    return;
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
}

torch::Tensor qlinear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min,
                      int64_t fmt, int64_t bs, int64_t zp, int64_t N, int64_t K, int64_t quant_act) {
  TORCH_CHECK(x.dim() == 2, "x: (M,K) f32");
  auto out = torch::empty({x.size(0), N}, x.options());
  qlinear_into(x, q, scale, min, fmt, bs, zp, N, K, quant_act, out);
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
// out may be x itself
void rms_norm_into(torch::Tensor x, torch::Tensor w, double eps, torch::Tensor out) {
  TORCH_CHECK(x.is_contiguous() && x.dtype() == torch::kFloat32, "x: contiguous f32");
  TORCH_CHECK(out.sizes() == x.sizes() && out.is_contiguous() && out.dtype() == torch::kFloat32,
              "rms_norm: out must be like x");
  const int64_t D = x.size(-1), M = x.numel() / D;
  TORCH_CHECK(D % 8 == 0 && w.numel() == D, "rms_norm: D must be a multiple of 8, w of D");
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
#pragma omp parallel for schedule(static) if (M > 16)
  for (int64_t m = 0; m < M; ++m) rms_row(xp + m * D, wp, D, (float)eps, op + m * D);
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous(), "x: contiguous f32");
  auto out = torch::empty_like(x);
  rms_norm_into(x, w, eps, out);
  return out;
}

// The KV cache (kernels/backend.py makes it): float16, per layer K (blocks, KV, D, BS), each
// block's keys transposed, and V (blocks, KV, BS, D). Checks the pair and returns BS.
constexpr int64_t kMaxHeadDim = 1024;

int64_t check_kv_cache(const torch::Tensor& kc, const torch::Tensor& vc, int64_t KV, int64_t D,
                       const char* who) {
  TORCH_CHECK(kc.dim() == 4 && vc.dim() == 4 && kc.is_contiguous() && vc.is_contiguous() &&
              kc.scalar_type() == torch::kHalf && vc.scalar_type() == torch::kHalf, who,
              ": KV caches must be contiguous float16 (blocks, kv_heads, ...)");
  const int64_t BS = kc.size(3);
  TORCH_CHECK(kc.size(1) == KV && kc.size(2) == D && vc.size(0) == kc.size(0) &&
              vc.size(1) == KV && vc.size(2) == BS && vc.size(3) == D && BS % 16 == 0 && D % 16 == 0,
              who, ": KV caches must be K (blocks, kv_heads, head_dim, block_size) and V (blocks, "
              "kv_heads, block_size, head_dim), block_size and head_dim multiples of 16");
  return BS;
}

// The step between the q|k|v projection and attention, in one pass: split the fused
// projection (T, (H + 2 KV) * D) into heads, RMS-normalise q and k per head when q_norm /
// k_norm are given (Gemma 3), rotate them by the per-token cos/sin tables (T, D/2), and
// write k and v (rounded to float16, to nearest even) into the paged caches at their slots.
// Returns q as (T, H, D).
void qkv_rope_cache_into(torch::Tensor qkv, torch::Tensor q_norm, torch::Tensor k_norm,
                         double eps, torch::Tensor cos, torch::Tensor sin, int64_t neox,
                         int64_t H, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots,
                         torch::Tensor q) {
  TORCH_CHECK(kc.dim() == 4, "qkv_rope_cache: KV caches must be 4-d");
  const int64_t T = qkv.size(0), KV = kc.size(1), D = kc.size(2), W = (H + 2 * KV) * D;
  const int64_t BS = check_kv_cache(kc, vc, KV, D, "qkv_rope_cache");
  TORCH_CHECK(D <= kMaxHeadDim, "qkv_rope_cache: head_dim above ", kMaxHeadDim);
  TORCH_CHECK(qkv.is_contiguous() && qkv.dtype() == torch::kFloat32 && qkv.size(1) == W,
              "qkv_rope_cache: qkv must be (T, (H + 2 KV) * D) f32");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
              cos.size(0) == T && cos.size(1) == D / 2, "qkv_rope_cache: shapes");
  TORCH_CHECK((!q_norm.numel() || q_norm.numel() == D) && (!k_norm.numel() || k_norm.numel() == D),
              "qkv_rope_cache: norm weights must have head_dim elements");
  TORCH_CHECK(slots.numel() == T && slots.dtype() == torch::kInt64, "qkv_rope_cache: slots");
  const int64_t n_slots = kc.size(0) * BS;
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(slots.data_ptr<int64_t>()[i] >= 0 && slots.data_ptr<int64_t>()[i] < n_slots,
                "qkv_rope_cache: slot out of range");
  TORCH_CHECK(q.dim() == 3 && q.size(0) == T && q.size(1) == H && q.size(2) == D &&
              q.is_contiguous() && q.dtype() == torch::kFloat32, "qkv_rope_cache: q must be (T, H, D) f32");
  const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float* qn = q_norm.numel() ? q_norm.data_ptr<float>() : nullptr;
  const float* kn = k_norm.numel() ? k_norm.data_ptr<float>() : nullptr;
  float* qp = q.data_ptr<float>();
  uint16_t *kp = static_cast<uint16_t*>(kc.data_ptr()), *vp = static_cast<uint16_t*>(vc.data_ptr());
  const int64_t* sl = slots.data_ptr<int64_t>();
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#pragma omp parallel for schedule(static) if (T >= 16)
  for (int64_t t = 0; t < T; ++t) {
    const float* row = src + t * W;
    const float *cs = cp + t * (D / 2), *sn = sp + t * (D / 2);
    const int64_t blk = sl[t] / BS, off = sl[t] % BS;
    float k[kMaxHeadDim];
    alignas(32) uint16_t half[8];
    for (int64_t h = 0; h < H + KV; ++h) {
      float* dst = h < H ? qp + (t * H + h) * D : k;
      const float* nw = h < H ? qn : kn;
      if (nw) rms_row(row + h * D, nw, D, (float)eps, dst);
      else std::copy(row + h * D, row + (h + 1) * D, dst);
      rope_head(dst, cs, sn, D, neox != 0);
      if (h < H) continue;
      uint16_t* kt = kp + ((blk * KV + (h - H)) * D) * BS + off;    // dimension d at kt[d * BS]
      for (int64_t d = 0; d < D; d += 8) {
        _mm_store_si128(reinterpret_cast<__m128i*>(half), _mm256_cvtps_ph(_mm256_loadu_ps(dst + d), kRne));
        for (int i = 0; i < 8; ++i) kt[(d + i) * BS] = half[i];
      }
    }
    for (int64_t h = 0; h < KV; ++h) {
      const float* v = row + (H + KV + h) * D;
      uint16_t* vt = vp + ((blk * KV + h) * BS + off) * D;
      for (int64_t d = 0; d < D; d += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(vt + d), _mm256_cvtps_ph(_mm256_loadu_ps(v + d), kRne));
    }
  }
}

torch::Tensor qkv_rope_cache(torch::Tensor qkv, torch::Tensor q_norm, torch::Tensor k_norm,
                             double eps, torch::Tensor cos, torch::Tensor sin, int64_t neox,
                             int64_t H, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots) {
  TORCH_CHECK(kc.dim() == 4 && qkv.dim() == 2, "qkv_rope_cache: KV caches must be 4-d, qkv 2-d");
  auto q = torch::empty({qkv.size(0), H, kc.size(2)}, qkv.options());
  qkv_rope_cache_into(qkv, q_norm, k_norm, eps, cos, sin, neox, H, kc, vc, slots, q);
  return q;
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

// act(gate) * up, elementwise, 8 at a time with the tail through the same vector code (masked
// loads), so an element's result never depends on where it sits. Both activations are
// x * sigmoid(s): silu has s = x; tanh-gelu has s = 2z, z = sqrt(2/pi) (x + 0.044715 x^3),
// since (1 + tanh z) / 2 = sigmoid(2z). sigmoid(s) = 1 / (1 + e) for s >= 0 and e / (1 + e)
// for s < 0 with e = exp(-|s|), so exp_neg sees no positive argument and no 1 - e cancels.
inline __m256 gated8(__m256 x, __m256 u, bool gelu) {
  __m256 s = x;
  if (gelu) {
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    s = _mm256_mul_ps(_mm256_set1_ps(2 * 0.7978845608028654f),
                      _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
  }
  const __m256 ns = _mm256_or_ps(_mm256_set1_ps(-0.f), s);            // -|s|
  const __m256 e = _mm256_and_ps(exp_neg(ns),                         // exp(-|s|), 0 below -87
                                 _mm256_cmp_ps(ns, _mm256_set1_ps(-87.f), _CMP_GE_OQ));
  const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), s);    // s < 0: x e
  return _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

// gate and up: (T, F) rows, each row contiguous (they may be the two halves of one fused
// gate|up product: no copies); out: (T, F) contiguous.
// rows of gate at stride gs, of up at stride us, out contiguous (T, F)
void gated_act_rows(const float* g, int64_t gs, const float* u, int64_t us, int64_t T, int64_t F,
                    bool gelu, float* o) {
  const int64_t chunks = (F + 7) / 8;
#pragma omp parallel for schedule(static) if (T * F >= 8192)   // 16 x 1536: 2 threads pay
  for (int64_t c = 0; c < T * chunks; ++c) {
    const int64_t t = c / chunks, i = (c % chunks) * 8, left = std::min<int64_t>(8, F - i);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 r = gated8(_mm256_maskload_ps(g + t * gs + i, mask),
                            _mm256_maskload_ps(u + t * us + i, mask), gelu);
    _mm256_maskstore_ps(o + t * F + i, mask, r);
  }
}

void gated_act_into(torch::Tensor gate, torch::Tensor up, int64_t gelu, torch::Tensor out) {
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.stride(1) == 1 &&
              up.stride(1) == 1 && gate.dtype() == torch::kFloat32 && up.dtype() == torch::kFloat32,
              "gated_act: gate and up must be (T, F) f32 with contiguous rows");
  TORCH_CHECK(out.sizes() == gate.sizes() && out.is_contiguous() && out.dtype() == torch::kFloat32,
              "gated_act: out must be (T, F) f32");
  gated_act_rows(gate.data_ptr<float>(), gate.stride(0), up.data_ptr<float>(), up.stride(0),
                 gate.size(0), gate.size(1), gelu != 0, out.data_ptr<float>());
}

torch::Tensor gated_act(torch::Tensor gate, torch::Tensor up, int64_t gelu) {
  TORCH_CHECK(gate.dim() == 2, "gated_act: gate and up must be (T, F) f32 with contiguous rows");
  auto out = torch::empty({gate.size(0), gate.size(1)}, gate.options());
  gated_act_into(gate, up, gelu, out);
  return out;
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

// 16 float lanes: one AVX-512 register, or two AVX2 halves (the same arithmetic per lane, so
// the same bits either way); masks are 16-bit lane sets.
#if defined(__AVX512F__)
struct V16 {
  __m512 v;
  static V16 zero() { return {_mm512_setzero_ps()}; }
  static V16 set1(float x) { return {_mm512_set1_ps(x)}; }
  static V16 half(const uint16_t* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  V16 fma(V16 b, V16 c) const { return {_mm512_fmadd_ps(v, b.v, c.v)}; }
  V16 operator+(V16 b) const { return {_mm512_add_ps(v, b.v)}; }
  V16 operator*(V16 b) const { return {_mm512_mul_ps(v, b.v)}; }
  V16 max_where(uint32_t keep, V16 x) const {
    return {_mm512_mask_max_ps(v, (__mmask16)keep, v, x.v)};
  }
  void store_where(uint32_t keep, float* p) const { _mm512_mask_storeu_ps(p, (__mmask16)keep, v); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  float max() const { return _mm512_reduce_max_ps(v); }
};
#else
struct V16 {
  __m256 a, b;
  static V16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static V16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static V16 half(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  }
  V16 fma(V16 y, V16 c) const { return {_mm256_fmadd_ps(a, y.a, c.a), _mm256_fmadd_ps(b, y.b, c.b)}; }
  V16 operator+(V16 y) const { return {_mm256_add_ps(a, y.a), _mm256_add_ps(b, y.b)}; }
  V16 operator*(V16 y) const { return {_mm256_mul_ps(a, y.a), _mm256_mul_ps(b, y.b)}; }
  static __m256i lanes(uint32_t keep) {     // 8 lanes of a mask: all ones where set
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)keep), bit), bit);
  }
  V16 max_where(uint32_t keep, V16 x) const {
    return {_mm256_blendv_ps(a, _mm256_max_ps(a, x.a), _mm256_castsi256_ps(lanes(keep))),
            _mm256_blendv_ps(b, _mm256_max_ps(b, x.b), _mm256_castsi256_ps(lanes(keep >> 8)))};
  }
  void store_where(uint32_t keep, float* p) const {
    _mm256_maskstore_ps(p, lanes(keep), a);
    _mm256_maskstore_ps(p + 8, lanes(keep >> 8), b);
  }
  void store(float* p) const { _mm256_storeu_ps(p, a); _mm256_storeu_ps(p + 8, b); }
  float max() const {
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_max_ps(a, b));
    return *std::max_element(t, t + 8);
  }
};
#endif

// G query rows of one token whose heads share one KV head, against keys [lo, pos] of their
// sequence, read through its block table 16 slots at a time: each key and value is loaded
// once for all G heads. Per head the arithmetic is fixed: a key's score is its dot with q
// summed over the dimensions in 4 interleaved chains, added (c0 + c1) + (c2 + c3), then
// scaled; softmax with the head's max; values summed in key order into o (the G output
// rows, overwritten). A key's slot is where it sits in its block, the same whatever the batch
// or however the prompt is cut, so nothing depends on either.
template <int G>
void attend_group(const float* qv, const uint16_t* kc, const uint16_t* vc, const int64_t* table,
                  int64_t BS, int64_t KV, int64_t kvh, int64_t D, int64_t lo, int64_t pos,
                  float scale, std::vector<float>& sc, float* o) {
  const int64_t n = pos - lo + 1;
  float* base = grow(sc, 16 + G * n + 16) + 16;   // scores of head g: base[g * n + j - lo]
  V16 mxv[G];
  for (int g = 0; g < G; ++g) mxv[g] = V16::set1(-INFINITY);
  // The blocks sit wherever the table says, so no hardware prefetcher sees the next one
  // coming: each block's keys (and, later, values) are asked for one block ahead.
  auto keys_at = [&](int64_t j0) {
    const int64_t b = j0 / BS;
    return kc + ((table[b] * KV + kvh) * D) * BS + (j0 - b * BS);
  };
  auto values_at = [&](int64_t j) {
    const int64_t b = j / BS;
    return vc + ((table[b] * KV + kvh) * BS + (j - b * BS)) * D;
  };
  auto prefetch_rows = [](const uint16_t* p, int64_t rows, int64_t stride, int64_t bytes) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t at = 0; at < bytes; at += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p + r * stride) + at, _MM_HINT_T0);
  };
  for (int64_t j0 = lo / 16 * 16; j0 <= pos; j0 += 16) {        // 16 slots of one block
    const uint16_t* kt = keys_at(j0);
    if (j0 + 16 <= pos) prefetch_rows(keys_at(j0 + 16), D, BS, 32);
    V16 c[G][4];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) c[g][i] = V16::zero();
    for (int64_t d = 0; d < D; d += 4)
      for (int i = 0; i < 4; ++i) {
        const V16 k = V16::half(kt + (d + i) * BS);
        for (int g = 0; g < G; ++g) c[g][i] = V16::set1(qv[g * D + d + i]).fma(k, c[g][i]);
      }
    uint32_t keep = 0xffff;                   // the slots in [lo, pos]
    if (j0 < lo) keep &= ~((1u << (lo - j0)) - 1);
    if (j0 + 15 > pos) keep &= (1u << (pos - j0 + 1)) - 1;
    for (int g = 0; g < G; ++g) {
      const V16 x = ((c[g][0] + c[g][1]) + (c[g][2] + c[g][3])) * V16::set1(scale);
      mxv[g] = mxv[g].max_where(keep, x);
      x.store_where(keep, base + g * n + j0 - lo);              // j0 - lo >= -15
    }
  }
  prefetch_rows(values_at(lo), std::min<int64_t>(n, BS - lo % BS), D, 2 * std::min<int64_t>(64, D));
  float inv[G];
  for (int g = 0; g < G; ++g)
    inv[g] = 1.f / softmax_numerators(base + g * n, n, mxv[g].max());
  constexpr int kDims = 64;                  // output dims kept in registers per pass
  for (int64_t d0 = 0; d0 < D; d0 += kDims) {
    const int nd = (int)std::min<int64_t>(kDims, D - d0) / 16;
    V16 acc[G][kDims / 16];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < kDims / 16; ++i) acc[g][i] = V16::zero();
    for (int64_t j = lo; j <= pos;) {
      const int64_t b = j / BS, end = std::min(pos + 1, (b + 1) * BS);
      const uint16_t* vb = vc + ((table[b] * KV + kvh) * BS) * D + d0;
      if (end <= pos)                        // the next block's rows of this pass
        prefetch_rows(values_at(end) + d0, std::min<int64_t>(BS, pos + 1 - end), D, 2 * nd * 16);
      for (; j < end; ++j) {
        const uint16_t* vv = vb + (j - b * BS) * D;
        V16 v[kDims / 16];
        for (int i = 0; i < kDims / 16; ++i) if (i < nd) v[i] = V16::half(vv + 16 * i);
        for (int g = 0; g < G; ++g) {
          const V16 p = V16::set1(base[g * n + j - lo]);
          for (int i = 0; i < kDims / 16; ++i)
            if (i < nd) acc[g][i] = p.fma(v[i], acc[g][i]);
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < nd; ++i) (acc[g][i] * V16::set1(inv[g])).store(o + g * D + d0 + 16 * i);
  }
}

using AttendFn = void (*)(const float*, const uint16_t*, const uint16_t*, const int64_t*, int64_t,
                          int64_t, int64_t, int64_t, int64_t, int64_t, float, std::vector<float>&,
                          float*);

// Heads per KV head: 1..4 together; larger groups go in runs of 4, then the rest.
void attend_heads(int64_t G, const float* qv, const uint16_t* kc, const uint16_t* vc,
                  const int64_t* table, int64_t BS, int64_t KV, int64_t kvh, int64_t D,
                  int64_t lo, int64_t pos, float scale, std::vector<float>& sc, float* o) {
  static const AttendFn fns[4] = {attend_group<1>, attend_group<2>, attend_group<3>, attend_group<4>};
  for (int64_t g = 0; g < G; g += 4) {
    const int64_t k = std::min<int64_t>(4, G - g);
    fns[k - 1](qv + g * D, kc, vc, table, BS, KV, kvh, D, lo, pos, scale, sc, o + g * D);
  }
}

thread_local std::vector<int64_t> t_row_seq;  // the calling thread's row -> sequence map
thread_local std::vector<float> t_scores;      // each thread's attention scores

// out: (T, H, D) f32, contiguous; every row is written (rows of no sequence get zeros).
void paged_attention_into(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor tables,
                          torch::Tensor meta, double scale, int64_t window, torch::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.dtype() == torch::kFloat32 && kc.dim() == 4,
              "attention: q must be (T, H, D) f32");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.dtype() == torch::kFloat32,
              "attention: out must be like q");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KV = kc.size(1), S = meta.size(0), maxb = tables.size(1);
  const int64_t BS = check_kv_cache(kc, vc, KV, D, "attention");
  TORCH_CHECK(H % KV == 0, "attention: bad head shapes");
  const float* qp = q.data_ptr<float>();
  const uint16_t *kp = static_cast<const uint16_t*>(kc.data_ptr()),
                 *vp = static_cast<const uint16_t*>(vc.data_ptr());
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* mp = meta.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  int64_t* row_seq = grow(t_row_seq, T);
  std::fill_n(row_seq, T, -1);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t i = 0; i < mp[3 * s + 1]; ++i) row_seq[mp[3 * s] + i] = s;
  for (int64_t t = 0; t < T; ++t)
    if (row_seq[t] < 0) std::fill_n(op + t * H * D, H * D, 0.f);
  int64_t work = 0;                     // key rows read, summed over queries and heads
  for (int64_t s = 0; s < S; ++s) work += mp[3 * s + 1] * mp[3 * s + 2] * H;
#pragma omp parallel if (work >= 4096)   // a short decode step stays on one core
  {
    std::vector<float>& sc = t_scores;
    const int64_t G = H / KV;
#pragma omp for schedule(dynamic, 2)
    for (int64_t tk = 0; tk < T * KV; ++tk) {
      const int64_t t = tk / KV, kvh = tk % KV, s = row_seq[t];
      if (s < 0) continue;
      const int64_t q_start = mp[3 * s], q_len = mp[3 * s + 1], ctx = mp[3 * s + 2];
      const int64_t pos = ctx - q_len + (t - q_start);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t h0 = kvh * G;             // heads h0 .. h0 + G - 1 read KV head kvh
      attend_heads(G, qp + (t * H + h0) * D, kp, vp, tp + s * maxb, BS, KV, kvh, D, lo, pos,
                   (float)scale, sc, op + (t * H + h0) * D);
    }
  }
}

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc,
                              torch::Tensor tables, torch::Tensor meta, double scale,
                              int64_t window) {
  TORCH_CHECK(q.dim() == 3, "attention: q must be (T, H, D) f32");
  auto out = torch::empty_like(q);
  paged_attention_into(q, kc, vc, tables, meta, scale, window, out);
  return out;
}

// ---- log-probabilities ----------------------------------------------------------------
// For one row of raw logits: its max, log(sum(exp(x - max))), and how many entries exceed
// x[token] (so a log-probability is (x - max) - logsum, as log_softmax computes it, and the
// token's rank is one more than the count), in two vector passes and no (vocab,) temporary.
// The sum is kept in double, 8 lanes in a fixed order, then the lanes in a fixed tree. A NaN
// anywhere, an infinite max or all -inf gives a NaN logsum.
// The first min(8, left) lanes, as an all-ones mask.
inline __m256i lanes_before(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::min<int64_t>(8, left)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 logits from x[i], -inf past x[n - 1].
inline __m256 load8_logits(const float* x, int64_t i, int64_t n) {
  const __m256i k = lanes_before(n - i);
  return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_maskload_ps(x + i, k),
                          _mm256_castsi256_ps(k));
}

// One pass over a row of n logits: its max, NaN if any entry is NaN; *above counts the
// entries greater than `than`.
float row_max(const float* x, int64_t n, float than, int64_t* above) {
  __m256 mxv = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
  const __m256 t = _mm256_set1_ps(than);
  int64_t count = 0;
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = load8_logits(x, i, n);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    mxv = _mm256_max_ps(mxv, v);
    count += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GT_OQ)));
  }
  *above = count;
  alignas(32) float m[8];
  _mm256_store_ps(m, mxv);
  return _mm256_movemask_ps(nan) ? NAN : *std::max_element(m, m + 8);
}

// log(sum(exp(x - mx))) over n logits (mx finite): exp in 8 lanes, each summed in double in
// a fixed order, then the lanes in a fixed tree.
double log_sum_exp(const float* x, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i k = lanes_before(n - i);
    const __m256 e = _mm256_and_ps(exp_neg(_mm256_sub_ps(_mm256_maskload_ps(x + i, k), m)),
                                   _mm256_castsi256_ps(k));
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double d[4];
  _mm256_store_pd(d, _mm256_add_pd(acc0, acc1));
  return std::log((d[0] + d[1]) + (d[2] + d[3]));
}

std::tuple<double, double, int64_t> logprob_stats(torch::Tensor logits, int64_t token) {
  TORCH_CHECK(logits.dim() == 1 && logits.is_contiguous() && logits.dtype() == torch::kFloat32,
              "logprob_stats: logits must be a contiguous (vocab,) f32 row");
  const int64_t n = logits.numel();
  TORCH_CHECK(token >= 0 && token < n, "logprob_stats: token out of range");
  const float* x = logits.data_ptr<float>();
  int64_t above = 0;
  const float mx = row_max(x, n, x[token], &above);
  if (!std::isfinite(mx)) return {mx, NAN, above};
  return {mx, log_sum_exp(x, n, mx), above};
}

// Greedy choice for each row of (S, vocab) logits, rows in parallel: the first index of the
// row's max, and log(sum(exp(x - max))) as logprob_stats gives it (so the chosen token's
// log-probability is -logsum). A row with a NaN or an infinite max gets index -1: the caller
// takes it the slow way.
std::tuple<torch::Tensor, torch::Tensor> greedy_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.dtype() == torch::kFloat32,
              "greedy_rows: logits must be contiguous (rows, vocab) f32");
  const int64_t S = logits.size(0), n = logits.size(1);
  auto ids = torch::empty({S}, torch::kInt64);
  auto logsum = torch::empty({S}, torch::kFloat64);
  const float* x = logits.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  double* lp = logsum.data_ptr<double>();
#pragma omp parallel for schedule(dynamic, 1) if (S > 1 && S * n >= (1 << 17))
  for (int64_t r = 0; r < S; ++r) {
    const float* row = x + r * n;
    int64_t above = 0;
    const float mx = row_max(row, n, INFINITY, &above);
    int64_t at = -1;
    if (std::isfinite(mx)) {
      for (int64_t i = 0; i < n && at < 0; i += 8) {      // the first lane equal to the max
        const int hit = _mm256_movemask_ps(
            _mm256_cmp_ps(load8_logits(row, i, n), _mm256_set1_ps(mx), _CMP_EQ_OQ));
        if (hit) at = i + __builtin_ctz(hit);
      }
    }
    ip[r] = at;
    lp[r] = at < 0 ? NAN : log_sum_exp(row, n, mx);
  }
  return {ids, logsum};
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
  void into(const torch::Tensor& x, const torch::Tensor& out, int64_t quant) const {
    qlinear_into(x, q, scale, min, fmt, bs, zp, N, K, quant, out);
  }
};

struct PlanLayer {
  torch::Tensor attn_norm, q_norm, k_norm, post_attn_norm, ffn_norm, post_ffw_norm, kc, vc;
  QW qkv, o, gate_up, down;
  int64_t group, sliding;
};

enum Stage { kNorms, kQkv, kRope, kAttention, kO, kGateUp, kAct, kDown, kStages };
const char* const kStageNames[kStages] = {"norms+residual", "qkv", "rope+cache", "attention",
                                          "o", "gate_up", "act", "down"};

// Adds the time since the previous lap to a stage (when given somewhere to add it).
class Stopwatch {
 public:
  explicit Stopwatch(std::array<double, kStages>* into) : into_(into), t_(now()) {}
  void lap(Stage s) {
    if (!into_) return;
    const double t = now();
    (*into_)[s] += t - t_;
    t_ = t;
  }

 private:
  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  std::array<double, kStages>* into_;
  double t_;
};

// A Plan's activations live in a workspace sized once for the largest step (`reserve`):
// each step works in views of it, and the kernels' scratch was grown to the same size, so
// a step allocates no tensor storage and no scratch (tests/test_plan.py counts both).
// x += h elementwise (both contiguous, the same shape): what torch's add_ computes, without
// its dispatch (a few us, twice per layer, is a few % of a batch-1 step)
inline void add_rows(const torch::Tensor& x, const torch::Tensor& h) {
  float* xp = x.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) xp[i] += hp[i];
}

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
    TORCH_CHECK(layers_.empty() || (qkv.N == layers_[0].qkv.N && o.K == layers_[0].o.K &&
                                    gate_up.N == 2 * F_ && down.K == F_),
                "Plan: every layer must have the same shapes");
    layers_.push_back({attn_norm, q_norm, k_norm, post_attn_norm, ffn_norm, post_ffw_norm, kc, vc,
                       qkv, o, gate_up, down, group, sliding});
  }

  // Workspace for steps of up to max_tokens tokens, and the calling thread's (and its
  // worker threads') kernel scratch for them, with up to max_context keys per query. Call it
  // at start-up on the thread that will run the steps.
  void reserve(int64_t max_tokens, int64_t max_context) {
    TORCH_CHECK(!layers_.empty() && max_tokens >= 1 && max_context >= 1, "Plan.reserve: sizes");
    const std::lock_guard<std::mutex> not_during_a_step(step_);
    ensure(max_tokens);
    const PlanLayer& L = layers_[0];
    int64_t K = 0;
    for (const QW* w : {&L.qkv, &L.o, &L.gate_up, &L.down}) K = std::max(K, w->K);
    const int64_t nb = K / 32, M = max_tokens;
    grow(t_qact.q, M * K); grow(t_qact.dt, nb * (M + 4)); grow(t_qact.fsumt, nb * (M + 4));
    grow(t_row_seq, M);
#ifdef OSTINATO_AMX
    alloc_amx(M, K, true, t_amx);
#endif
#pragma omp parallel
    {
#ifdef OSTINATO_AMX
      grow(t_wbuf, 16 * K);
#endif
      grow(t_scores, 32 + 4 * max_context);
    }
  }

  // x: (T, d_model) embedded; cos/sin: [global, local] tables; slots/tables: per KV group.
  // Returns the final normed hidden states: a view of the workspace, valid until the next step.
  torch::Tensor forward(torch::Tensor x_in, std::vector<torch::Tensor> cos,
                        std::vector<torch::Tensor> sin, std::vector<torch::Tensor> slots,
                        std::vector<torch::Tensor> tables, torch::Tensor meta) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == out_norm_.numel() &&
                x_in.dtype() == torch::kFloat32, "Plan.forward: x must be (T, d_model) f32");
    const std::lock_guard<std::mutex> one_step_at_a_time(step_);   // the workspace is shared
    const int64_t T = x_in.size(0);
    ensure(T);
    Stopwatch sw(profile_ ? &seconds_ : nullptr);
    auto rows = [T](const torch::Tensor& t) { return t.narrow(0, 0, T); };
    torch::Tensor x = rows(x_), h = rows(h_), qkv = rows(qkv_), q = rows(q_), a = rows(attn_),
                  gu = rows(gu_), act = rows(act_), out = rows(out_);
    const torch::Tensor a2 = a.view({T, -1});          // attention out as the o-proj's input
    x.copy_(x_in);
    for (const PlanLayer& L : layers_) {
      rms_norm_into(x, L.attn_norm, eps_, h);
      sw.lap(kNorms);
      L.qkv.into(h, qkv, quant_);
      sw.lap(kQkv);
      qkv_rope_cache_into(qkv, L.q_norm, L.k_norm, eps_, cos[L.sliding], sin[L.sliding], neox_, H_,
                          L.kc, L.vc, slots[L.group], q);
      sw.lap(kRope);
      paged_attention_into(q, L.kc, L.vc, tables[L.group], meta, scale_, L.sliding ? window_ : 0, a);
      sw.lap(kAttention);
      L.o.into(a2, h, quant_);
      sw.lap(kO);
      if (L.post_attn_norm.numel()) rms_norm_into(h, L.post_attn_norm, eps_, h);
      add_rows(x, h);
      rms_norm_into(x, L.ffn_norm, eps_, h);
      sw.lap(kNorms);
      L.gate_up.into(h, gu, quant_);
      sw.lap(kGateUp);
      gated_act_rows(gu.data_ptr<float>(), 2 * F_, gu.data_ptr<float>() + F_, 2 * F_, T, F_,
                     gelu_ != 0, act.data_ptr<float>());   // the halves of gate|up, no views
      sw.lap(kAct);
      L.down.into(act, h, quant_);
      sw.lap(kDown);
      if (L.post_ffw_norm.numel()) rms_norm_into(h, L.post_ffw_norm, eps_, h);
      add_rows(x, h);
      sw.lap(kNorms);
    }
    rms_norm_into(x, out_norm_, eps_, out);
    return out;
  }

  // Seconds spent in each stage of forward since profiling was switched on (for `bench`).
  void set_profile(bool on) { profile_ = on; seconds_.fill(0.0); }
  std::map<std::string, double> profile() const {
    std::map<std::string, double> out;
    for (int i = 0; i < kStages; ++i) out[kStageNames[i]] = seconds_[i];
    return out;
  }

 private:
  // the workspace holds at least T rows (growing it is counted like scratch growth)
  void ensure(int64_t T) {
    if (x_.defined() && x_.size(0) >= T) return;
    g_scratch_growths.fetch_add(1, std::memory_order_relaxed);
    const PlanLayer& L = layers_.at(0);
    const int64_t D = out_norm_.numel(), Dh = L.kc.size(2);
    auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
    x_ = torch::empty({T, D}, f32); h_ = torch::empty({T, D}, f32);
    qkv_ = torch::empty({T, L.qkv.N}, f32);
    q_ = torch::empty({T, H_, Dh}, f32); attn_ = torch::empty({T, H_, Dh}, f32);
    gu_ = torch::empty({T, 2 * F_}, f32); act_ = torch::empty({T, F_}, f32);
    out_ = torch::empty({T, D}, f32);
  }

  torch::Tensor x_, h_, qkv_, q_, attn_, gu_, act_, out_;
  std::mutex step_;
  bool profile_ = false;
  std::array<double, kStages> seconds_{};
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
  m.def("amx_available", [] { return amx_permitted(); });
  m.def("scratch_growths", [] { return g_scratch_growths.load(); });
  m.def("logprob_stats", &logprob_stats);
  m.def("greedy_rows", &greedy_rows);
  m.def("set_amx", [](bool on, int64_t min_rows) { g_amx_enabled = on; g_amx_min_rows = min_rows; });
  m.def("amx_settings", [] { return std::make_tuple(g_amx_enabled, g_amx_min_rows); });
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
      .def("forward", &Plan::forward, py::call_guard<py::gil_scoped_release>())
      .def("reserve", &Plan::reserve, py::call_guard<py::gil_scoped_release>())
      .def("set_profile", &Plan::set_profile)
      .def("profile", &Plan::profile);
}
