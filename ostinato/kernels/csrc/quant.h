// Quantized weight layouts and the AVX2/AVX-512 matmul tiles: weights dequantized per block (float activations) or exact integer dots with int16-quantized activations.
// Part of ops.cpp's one translation unit (included there, after the common headers):
// one file per kernel family so that a reader finds the room for what they change.
#pragma once

namespace {

constexpr int kRowTile = 4;   // x rows sharing one unpacked weight block

enum Format : int64_t { kF32 = 0, kQ8 = 1, kQ4 = 2, kQ5 = 3 };
// Q5 (Q5_0, Q5_1, Q5_K): per 32-block 20 bytes, the 16 bytes of Q4's nibbles (byte j:
// element j low, j + 16 high) then a little-endian uint32 whose bit j is element j's bit 4.
constexpr int64_t kQ5Block = 20;

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

// The 32 five-bit codes of a Q5 block, minus zp, as int16: elements 0..15 and 16..31.
// (AVX2 only: a bit of qh becomes 16 in its lane by a compare against the lane's bit.)
inline void load32_q5_s16(const uint8_t* p, int zp, __m256i out[2]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0f);
  uint32_t qh;
  std::memcpy(&qh, p + 16, 4);
  const __m256i lane_bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                             4096, 8192, 16384, (int16_t)0x8000);
  auto high = [&](uint32_t bits16) {
    const __m256i b = _mm256_and_si256(_mm256_set1_epi16((int16_t)bits16), lane_bit);
    return _mm256_and_si256(_mm256_cmpeq_epi16(b, lane_bit), _mm256_set1_epi16(16));
  };
  const __m256i z = _mm256_set1_epi16((int16_t)zp);
  out[0] = _mm256_sub_epi16(_mm256_add_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask)),
                                             high(qh & 0xffff)), z);
  out[1] = _mm256_sub_epi16(
      _mm256_add_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask)),
                       high(qh >> 16)), z);
}

// Per-block values of the weight rows (scales, mins), stored by fours of rows,
// [n / 4][block][n % 4], so the rows a tile reads together sit side by side; float32, or
// float16 where every value is exactly a half (the scales of Q4_0, Q4_1, Q8_0 ... are).
// K-quants (Q4_K, Q5_K, Q6_K) keep their two levels: `p` holds one half per super-block of
// `per` blocks (d, or -dmin for mins) and `sub` one int8 per block (the 6- or 8-bit scale),
// and a block's value is float(half) * sub, the one float32 product the repack would have
// stored: the same bits from 0.5 bits a weight instead of 1 or 2.
struct BlockVals {
  const void* p = nullptr;
  bool half = false;
  int64_t nb = 0;
  const int8_t* sub = nullptr;   // K-quants: per-block multipliers of p's super-block values
  int64_t shift = 0;             // K-quants: log2 of the blocks a super-block (8 or 16)
  explicit operator bool() const { return p != nullptr; }
  int64_t at(int64_t n, int64_t b) const { return (n >> 2) * nb * 4 + (n & 3) + 4 * b; }
  // shifts, not divisions: a 64-bit idiv per lookup (four a block) held Skylake-SP's batch-1
  // K-quant tiles to 2 GMAC/s (scripts/panel_speed.py, Q4_K 4864x1024 at 1 row: 2.73 ms)
  int64_t at_super(int64_t n, int64_t b) const {
    return (n >> 2) * (nb >> shift) * 4 + (n & 3) + 4 * (b >> shift);
  }
  float get(int64_t n, int64_t b) const {
    if (sub) return _cvtsh_ss(static_cast<const uint16_t*>(p)[at_super(n, b)]) * (float)sub[at(n, b)];
    const int64_t i = at(n, b);
    return half ? _cvtsh_ss(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  __m128 four(int64_t n, int64_t b) const {          // rows n .. n + 3 (n % 4 == 0)
    if (sub) {
      int32_t s;
      std::memcpy(&s, sub + at(n, b), 4);
      const __m128 d = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(
          static_cast<const uint16_t*>(p) + at_super(n, b))));
      return _mm_mul_ps(d, _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(s))));
    }
    const int64_t i = at(n, b);
    if (half) return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(
                                      static_cast<const uint16_t*>(p) + i)));
    return _mm_loadu_ps(static_cast<const float*>(p) + i);
  }
  __m128 two(int64_t n, int64_t b) const {           // rows n, n + 1 in lanes 0, 1 (n even)
    if (sub) {
      int32_t d2;
      std::memcpy(&d2, static_cast<const uint16_t*>(p) + at_super(n, b), 4);
      const int64_t i = at(n, b);
      return _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(d2)),
                        _mm_setr_ps((float)sub[i], (float)sub[i + 1], 0.f, 0.f));
    }
    const int64_t i = at(n, b);
    if (half) {
      int32_t v;
      std::memcpy(&v, static_cast<const uint16_t*>(p) + i, 4);
      return _mm_cvtph_ps(_mm_cvtsi32_si128(v));
    }
    return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(static_cast<const float*>(p) + i)));
  }
};

// Bytes of a 32-element block in the quantized formats (Q8: int8 codes, 16- or 32-blocks).
constexpr int64_t block_bytes(int64_t fmt) { return fmt == kQ4 ? 16 : fmt == kQ5 ? kQ5Block : 32; }

struct Weights {
  int64_t fmt, bs, zp, N, K, nb;   // nb = blocks per row = K / bs
  const void* q;                   // (N, K) f32 | (N, K) int8 | (N, K/2) uint8
  BlockVals scale;                 // unused for f32
  BlockVals min;                   // p == nullptr when the format has none
  const uint16_t* bf16 = nullptr;  // the codes as bfloat16 tiles (amx_bf16.h), when packed
  // bytes of one row's codes (every format stores a row's blocks contiguously)
  int64_t row_bytes() const {
    return fmt == kF32 ? K * 4 : K / 32 * block_bytes(fmt);
  }
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
  } else if constexpr (FMT == kQ5) {
    __m256i s16[2];
    load32_q5_s16(static_cast<const uint8_t*>(w.q) + (n * w.nb + b) * kQ5Block, (int)w.zp, s16);
    for (int h = 0; h < 2; ++h) {
      v[2 * h] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16[h])));
      v[2 * h + 1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16[h], 1)));
    }
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
  if (fmt == kQ5) return tile_rows<kQ5, 32>;
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

// 32 int8 codes from p, in order, sign-extended to two vectors of 16 int16.
inline void load_bytes_in_order(const uint8_t* p, __m256i out[2]) {
  out[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  out[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
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
  } else if constexpr (FMT == kQ5) {
    load32_q5_s16(static_cast<const uint8_t*>(w.q) + (n * (w.K / 32) + c) * kQ5Block, (int)w.zp, out);
  } else {
    load_bytes_in_order(static_cast<const uint8_t*>(w.q) + n * w.K + c * 32, out);
  }
}

// The AVX tiles' weight loads, from a block's bytes p (32 elements): two vectors of 16 int16,
// codes minus zp. Q8 (32-blocks), Q4 and Q5 come evens first, [w0, w2, .., w30] and
// [w1, w3, .., w31], unpacked with shifts, blends and masks: no shuffles, the port batch-1
// tiles run short of (Skylake-SP, one row: Q4_1 0.15-0.20 -> 0.13-0.18 ms). x comes
// quantized in the same order (quantize_rows' evens_first).
inline void tile_load_bytes(const uint8_t* p, __m256i out[2]) {      // int8, sign-extended
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  out[0] = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
  out[1] = _mm256_srai_epi16(v, 8);
}
// Q4: the 16 bytes in both halves; word i holds w[2i] (bits 0-3), w[16 + 2i] (4-7),
// w[2i + 1] (8-11) and w[17 + 2i] (12-15).
inline __m256i nibbles_evens(const uint8_t* p) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xF0);
}
inline void tile_load_q4(const uint8_t* p, __m256i zp, __m256i out[2]) {
  const __m256i t = nibbles_evens(p), mask = _mm256_set1_epi16(0x0f);
  out[0] = _mm256_sub_epi16(_mm256_and_si256(t, mask), zp);
  out[1] = _mm256_sub_epi16(_mm256_and_si256(_mm256_srli_epi16(t, 8), mask), zp);
}
// Q5: the nibbles as Q4's, bit 4 from the block's uint32 plane. out[0]'s word w is element
// 2w, whose bit 4 is the plane's bit 2w: dword d (words 2d, 2d + 1) shifts the plane right
// by 4d, so that bits 0 and 2 (out[1]: 1 and 3) become bit 4 of each word.
inline void tile_load_q5(const uint8_t* p, __m256i zp, __m256i out[2]) {
  const __m256i t = nibbles_evens(p), mask = _mm256_set1_epi16(0x0f);
  const __m256i plane = _mm256_srlv_epi32(
      _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p + 16))),
      _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
  const __m256i bit4 = _mm256_set1_epi32(0x00100010);
  const __m256i e = _mm256_and_si256(plane, _mm256_set1_epi32(0x5));   // bits 0, 2
  const __m256i o = _mm256_and_si256(plane, _mm256_set1_epi32(0xA));   // bits 1, 3
  const __m256i he = _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi32(e, 4), _mm256_slli_epi32(e, 18)), bit4);
  const __m256i ho = _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi32(o, 3), _mm256_slli_epi32(o, 17)), bit4);
  out[0] = _mm256_sub_epi16(_mm256_or_si256(_mm256_and_si256(t, mask), he), zp);
  out[1] = _mm256_sub_epi16(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(t, 8), mask), ho), zp);
}
template <int FMT, int BS>
inline void tile_load(const uint8_t* p, __m256i zp, __m256i out[2]) {
  if constexpr (FMT == kQ4) tile_load_q4(p, zp, out);
  else if constexpr (FMT == kQ5) tile_load_q5(p, zp, out);
  else if constexpr (BS == 32) tile_load_bytes(p, out);
  else load_bytes_in_order(p, out);       // Q8 in 16-blocks (Q6_K): in order
}
// Whether the AVX tiles take x quantized evens first (quantize_rows): the formats whose
// codes they unpack without shuffles.
inline bool evens_first(int64_t fmt, int64_t bs) {
  return fmt == kQ4 || fmt == kQ5 || (fmt == kQ8 && bs == 32);
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
  constexpr int64_t kBytes = block_bytes(FMT);
  const uint8_t* wr[NR];                     // the tile's weight rows (row pointers hoisted:
  for (int j = 0; j < NR; ++j)               // per-row index arithmetic spilled registers)
    wr[j] = static_cast<const uint8_t*>(w.q) + (n0 + j) * w.row_bytes();
  const int16_t* xr = a.q.data() + m0 * w.K;
  const __m256i zp = _mm256_set1_epi16((int16_t)w.zp);
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
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(wr[j] + (c + 512) * kBytes), _MM_HINT_T0);
    }
    for (int j = 0; j < NR; ++j) tile_load<FMT, BS>(wr[j] + c * kBytes, zp, wv[j]);
    __m256i dots[2][NV];
    for (int r = 0; r < R; ++r) {
      const int16_t* xq = xr + r * w.K + c * 32;
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
  if (fmt == kQ5) return tile_span_qa<kQ5, 32>;
  return bs == 16 ? tile_span_qa<kQ8, 16> : tile_span_qa<kQ8, 32>;
}

// ---- AMX (Sapphire Rapids and later) ------------------------------------------------
// The same arithmetic as tile_qa, with the integer dots on the tile unit: a weight tile of
// 16 rows x one block meets a tile of 16 activation rows. int16 activations are split
// exactly into hi * 256 + lo (hi signed, lo unsigned bytes), so two int8 tile products give
// the same exact integers as the int16 dot; the per-block scaling then runs on 16 rows at a
// time in AVX-512, in the order above. Integer sums are exact and each output element sees
// the same float operations, so results equal tile_qa's bit for bit (tests/test_kernels.py).

}  // namespace
