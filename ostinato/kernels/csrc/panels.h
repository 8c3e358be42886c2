// The weight-panel path of the quantized matmul (many rows, CPUs without AMX), in AVX-512
// (with VNNI or without) or AVX2, bit-identical to the AVX tiles.
// Part of ops.cpp's one translation unit (included there, after the common headers):
// one file per kernel family so that a reader finds the room for what they change.
//
// The AVX tiles (quant.h) unpack a weight block for every 4 activation rows and reduce each
// dot product across lanes; on a CPU without AMX that makes a prefill arithmetic-bound at a
// fraction of what the vector unit can do. Here a thread unpacks a group of 16 weight rows
// (8 in AVX2) once, into a panel of int16 pairs laid out [k / 2][row][2], and runs every
// activation row against it: one dpwssd multiplies a pair of one x row's int16 codes
// (broadcast) with the same pair of all the panel's rows, so lane j accumulates row j's
// integer block dot with no horizontal sum, 32 multiplies an instruction (16 in AVX2). The per-block scaling then follows
// tile_qa's arithmetic exactly (fma of the exact integer dot by w_scale * x_scale, then the
// min term), so every output has the same bits whichever path its batch size picked.
#pragma once

namespace {

// Two widths of the same code: 16 weight rows a panel in AVX-512 (VNNI's dpwssd, or on
// AVX-512 without VNNI, Skylake-SP's, madd + add: the same integers, as no code pair is
// two -32768s), and 8 in AVX2 (dot_s16: AVX-VNNI's dpwssd where the CPU has it, else
// madd + add). Without VNNI, 16 rows still halve the passes over x and the instructions a
// multiply that 8 rows take (bench: prefill on a Skylake-SP VM, 2026-11-30).
#if defined(__AVX512F__) && defined(__AVX512BW__)
struct PanelIsa {
#ifdef __AVX512VNNI__
  static constexpr const char* kName = "avx512_vnni";
#else
  static constexpr const char* kName = "avx512bw";
#endif
  static constexpr int kRows = 16;   // weight rows a panel: one output a lane
  static constexpr int kTile = 12;   // x rows a pass: 12 int32 dots + 12 float sums in registers
#ifdef __AVX512VNNI__
  static constexpr int kMinRows = 2; // panels from this many x rows (qlinear.h)
  // panel_fused up to this many x rows (SmolLM2 decode, ms a step, fused against stored
  // panels, 5 rounds interleaved: 2 rows 19.7 / 20.9, 4: 23.6 / 24.2, 6: 26.3 / 26.4, 8:
  // 30.2 / 29.1)
  static constexpr int kFusedRows = 6;
#else
  // Without VNNI the tiles win below 5 rows (Skylake-SP VM, decode tok/s at 2 / 3 / 4 rows,
  // panels from 2 against from 5, 3 rounds interleaved: Gemma 3 26-32 / 35-41 / 41-44
  // against 34-46 / 45-54 / 47-54, Qwen2.5-0.5B at 2 and 4 rows 12-16 / 19-26 against
  // 18-23 / 26-36, SmolLM2 even; at 5 rows even, at 8 the panels ahead)
  static constexpr int kMinRows = 5;
  static constexpr int kFusedRows = 0;   // madd + add: gcc reassociates and spills
#endif
  using I = __m512i;
  using F = __m512;
  static I izero() { return _mm512_setzero_si512(); }
  static F fzero() { return _mm512_setzero_ps(); }
  static I load(const int32_t* p) { return _mm512_loadu_si512(p); }
  // acc + w . the pair at x, broadcast. With VNNI the broadcast is the instruction's own
  // ({1to16}: gcc 12 loads it into a register first, an instruction a multiply).
  static I dot(I acc, I w, const int32_t* x) {
#ifdef __AVX512VNNI__
    asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
    return acc;
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_set1_epi32(*x)));
#endif
  }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F fma_dot(I d, F s, F acc) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F four4(const BlockVals& v, int64_t n0, int64_t b) {
    return _mm512_insertf32x4(_mm512_insertf32x4(_mm512_insertf32x4(
        _mm512_castps128_ps512(v.four(n0, b)), v.four(n0 + 4, b), 1), v.four(n0 + 8, b), 2),
        v.four(n0 + 12, b), 3);
  }
  static void store(float* p, F v, int64_t valid) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << valid) - 1), v);
  }
  // The 16 rows' 16-byte runs at base + j * stride (j = 0..15) as 8 words a row, turned
  // into word columns: out[k] holds word 2k of rows 0..15 in its low half and word 2k + 1
  // in its high half (two rounds of word permutes: rows 0-7 and 8-15, then both).
  static void word_columns(const uint8_t* base, int64_t stride, __m512i out[4]) {
    __m512i z[4];
    for (int g = 0; g < 4; ++g) {
      const uint8_t* r = base + 4 * g * stride;
      auto at = [&](int i) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + i * stride)); };
      z[g] = _mm512_mask_broadcast_i32x4(_mm512_mask_broadcast_i32x4(_mm512_mask_broadcast_i32x4(
          _mm512_castsi128_si512(at(0)), 0x00F0, at(1)), 0x0F00, at(2)), 0xF000, at(3));
    }
    // z[g] word r * 8 + q: row 4g + r, word q. Round 1: a[h] word (q % 4) * 8 + row, for
    // rows 0-7 (b: 8-15) and words q = 4h .. 4h + 3.
    alignas(64) static const int16_t one[2][32] = {
        {0, 8, 16, 24, 32, 40, 48, 56, 1, 9, 17, 25, 33, 41, 49, 57,
         2, 10, 18, 26, 34, 42, 50, 58, 3, 11, 19, 27, 35, 43, 51, 59},
        {4, 12, 20, 28, 36, 44, 52, 60, 5, 13, 21, 29, 37, 45, 53, 61,
         6, 14, 22, 30, 38, 46, 54, 62, 7, 15, 23, 31, 39, 47, 55, 63}};
    // Round 2: out word t * 16 + row = word (2k + t) % 4 of a (rows 0-7) or b (rows 8-15).
    alignas(64) static const int16_t two[2][32] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 32, 33, 34, 35, 36, 37, 38, 39,
         8, 9, 10, 11, 12, 13, 14, 15, 40, 41, 42, 43, 44, 45, 46, 47},
        {16, 17, 18, 19, 20, 21, 22, 23, 48, 49, 50, 51, 52, 53, 54, 55,
         24, 25, 26, 27, 28, 29, 30, 31, 56, 57, 58, 59, 60, 61, 62, 63}};
    const __m512i i10 = _mm512_load_si512(one[0]), i11 = _mm512_load_si512(one[1]);
    const __m512i i20 = _mm512_load_si512(two[0]), i21 = _mm512_load_si512(two[1]);
    const __m512i a0 = _mm512_permutex2var_epi16(z[0], i10, z[1]);
    const __m512i a1 = _mm512_permutex2var_epi16(z[0], i11, z[1]);
    const __m512i b0 = _mm512_permutex2var_epi16(z[2], i10, z[3]);
    const __m512i b1 = _mm512_permutex2var_epi16(z[2], i11, z[3]);
    out[0] = _mm512_permutex2var_epi16(a0, i20, b0);
    out[1] = _mm512_permutex2var_epi16(a0, i21, b0);
    out[2] = _mm512_permutex2var_epi16(a1, i20, b1);
    out[3] = _mm512_permutex2var_epi16(a1, i21, b1);
  }
  // The pairs of 16 weight rows' 32-element chunk c of Q4 or int8 codes, without the int16
  // rows and the 32-bit transpose of unpack_panel: a word of a row's chunk is the pair's two
  // bytes (Q8: elements 2q, 2q + 1; Q4: the low nibbles are elements 2q, 2q + 1 and the high
  // ones 2q + 16, 2q + 17), so a word transpose and a widening give the pairs of 16 rows at
  // once. use(i, v): pair i of the chunk (Q4: all 16; int8: half `half`'s 8, i = 0..7).
  // The same integers as unpack_panel's (tests/test_kernels.py).
  template <int FMT, typename Use>
  static void chunk_pairs(const Weights& w, int64_t n0, int64_t c, int half, Use&& use) {
    const __m512i zp = _mm512_set1_epi16((int16_t)w.zp), low = _mm512_set1_epi16(0x0f);
    __m512i cols[4];
    if constexpr (FMT == kQ4)
      word_columns(static_cast<const uint8_t*>(w.q) + (n0 * w.K + c * 32) / 2, w.K / 2, cols);
    else
      word_columns(static_cast<const uint8_t*>(w.q) + n0 * w.K + c * 32 + 16 * half, w.K, cols);
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      const __m256i words = q % 2 ? _mm512_extracti64x4_epi64(cols[q / 2], 1)
                                  : _mm512_castsi512_si256(cols[q / 2]);
      if constexpr (FMT == kQ4) {
        const __m512i b = _mm512_cvtepu8_epi16(words);
        use(q, _mm512_sub_epi16(_mm512_and_si512(b, low), zp));
        use(q + 8, _mm512_sub_epi16(_mm512_srli_epi16(b, 4), zp));
      } else {
        use(q, _mm512_cvtepi8_epi16(words));   // int8: no zero point
      }
    }
  }
  // A whole panel (16 weight rows) of Q4 or int8 codes into pairs, chunk by chunk.
  template <int FMT>
  static bool unpack16(const Weights& w, int64_t n0, int32_t* panel) {
    if constexpr (FMT != kQ4 && FMT != kQ8) {
      return false;
    } else {
      if (w.N - n0 < 16) return false;
      for (int64_t c = 0; c < w.K / 32; ++c)
        for (int half = 0; half < (FMT == kQ4 ? 1 : 2); ++half)
          chunk_pairs<FMT>(w, n0, c, half, [&](int i, __m512i v) {
            _mm512_storeu_si512(panel + (c * 16 + 8 * half + i) * 16, v);
          });
      return true;
    }
  }
  // pairs [p0, p0 + 16) of 16 int16 rows (row stride K) -> panel + p0 * 16, 16 ints a pair
  static void transpose(const int16_t* rows, int64_t K, int64_t p0, int32_t* panel) {
    __m512 t[16];
    for (int j = 0; j < 16; ++j) t[j] = _mm512_castsi512_ps(_mm512_loadu_si512(rows + j * K + 2 * p0));
    transpose16(t);
    for (int p = 0; p < 16; ++p) _mm512_storeu_si512(panel + (p0 + p) * 16, _mm512_castps_si512(t[p]));
  }
};
#else
struct PanelIsa {
#ifdef __AVXVNNI__
  static constexpr const char* kName = "avx_vnni";
#else
  static constexpr const char* kName = "avx2";
#endif
  static constexpr int kRows = 8;
  static constexpr int kTile = 6;    // 16 registers: 6 + 6 accumulators, weights, scales
  static constexpr int kMinRows = 5; // no word unpack here: tiles are as fast up to 5 rows
  static constexpr int kFusedRows = 0;   // no word unpack
  using I = __m256i;
  using F = __m256;
  static I izero() { return _mm256_setzero_si256(); }
  static F fzero() { return _mm256_setzero_ps(); }
  static I load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I dot(I acc, I w, const int32_t* x) { return dot_s16(acc, w, _mm256_set1_epi32(*x)); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F fma_dot(I d, F s, F acc) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F four4(const BlockVals& v, int64_t n0, int64_t b) {
    return _mm256_set_m128(v.four(n0 + 4, b), v.four(n0, b));
  }
  static void store(float* p, F v, int64_t valid) {
    if (valid == 8) { _mm256_storeu_ps(p, v); return; }
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int64_t j = 0; j < valid; ++j) p[j] = t[j];
  }
  template <int FMT>
  static bool unpack16(const Weights&, int64_t, int32_t*) { return false; }
  template <int FMT, typename Use>
  static void chunk_pairs(const Weights&, int64_t, int64_t, int, Use&&) {}
  static void transpose(const int16_t* rows, int64_t K, int64_t p0, int32_t* panel) {
    for (int64_t h = 0; h < 2; ++h) {           // pairs p0 .. p0 + 7, then p0 + 8 .. p0 + 15
      __m256 r[8], t[8];
      for (int j = 0; j < 8; ++j)
        r[j] = _mm256_castsi256_ps(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(rows + j * K + 2 * (p0 + 8 * h))));
      for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
      }
      for (int j = 0; j < 8; j += 4) {
        r[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
        r[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
        r[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
        r[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
      }
      for (int j = 0; j < 4; ++j) {
        t[j] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x20);
        t[j + 4] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x31);
      }
      for (int j = 0; j < 8; ++j)            // t[j]: pair j of the 8 rows
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + (p0 + 8 * h + j) * 8),
                            _mm256_castps_si256(t[j]));
    }
  }
};
#endif

constexpr int kPanelRows = PanelIsa::kRows;

// Weight rows [n0, n0 + kPanelRows) as int16 codes (minus the zero point, as tile_qa's),
// pairs interleaved: panel[p * kPanelRows + j] holds elements 2p, 2p + 1 of row n0 + j.
// Rows past N are 0.
template <int FMT>
void unpack_panel(const Weights& w, int64_t n0, int16_t* rows16, int32_t* panel) {
  const int64_t K = w.K, nc = K / 32, valid = std::min<int64_t>(kPanelRows, w.N - n0);
  for (int64_t j = 0; j < kPanelRows; ++j) {
    int16_t* dst = rows16 + j * K;
    if (j >= valid) { std::memset(dst, 0, K * sizeof(int16_t)); continue; }
    for (int64_t c = 0; c < nc; ++c) {
      __m256i v[2];
      load_w32<FMT>(w, n0 + j, c, v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * 32), v[0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * 32 + 16), v[1]);
    }
  }
  for (int64_t p0 = 0; p0 < K / 2; p0 += 16) PanelIsa::transpose(rows16, K, p0, panel);
}

// The panel rows' values of blocks [0, nb), kPanelRows floats a block, into out (rows past
// N: zero; their outputs are never stored). Once a panel, not once for every pass of x rows.
inline void panel_vals(const BlockVals& v, int64_t n0, int64_t valid, int64_t nb, float* out) {
  for (int64_t b = 0; b < nb; ++b, out += kPanelRows) {
    if (valid == kPanelRows) { PanelIsa::storef(out, PanelIsa::four4(v, n0, b)); continue; }
    for (int64_t j = 0; j < kPanelRows; ++j) out[j] = j < valid ? v.get(n0 + j, b) : 0.f;
  }
}

// A panel: its weights as pairs, and its rows' scales (per block) and mins (per 32 elements).
struct Panel {
  const int32_t* pairs;
  const float* scales;
  const float* mins;          // nullptr for formats without a min
  int64_t valid;              // weight rows of the panel that exist (the rest are zero)
};

// Prefetch of `bytes` from p spread over a pass's nc blocks (a step reads each weight once,
// from memory: without it the panels ran 1.5x slower in a model than on hot weights).
struct Fetch {
  const char* p = nullptr;
  int64_t bytes = 0;
  // ceil(lines / nc) lines at block c. per does not depend on c, so gcc computes it once
  // a pass (the disassembly has no division in the passes); before, two 64-bit divisions a
  // block, which depend on c, cost about as much as a block's unpacking.
  void some(int64_t c, int64_t nc) const {
    if (!p) return;
    const int64_t lines = (bytes + 63) >> 6, per = (lines + nc - 1) / nc;
    for (int64_t l = c * per, end = std::min(lines, l + per); l < end; ++l)
      _mm_prefetch(p + l * 64, _MM_HINT_T0);
  }
};

// A block's pairs unrolled with AVX-512 VNNI only: where a product is madd + add, gcc 12
// reassociates an unrolled run of them into a tree and spills it (2x slower than the loop
// on AVX-512 without VNNI, 1.3x in AVX2); VNNI's dpwssd (asm) stays one chain a row.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define OSTINATO_PANEL_UNROLL _Pragma("GCC unroll 16")
#else
#define OSTINATO_PANEL_UNROLL
#endif

// x's int16 pairs by tiles of kTile rows, [tile][pair][row]: a pass reads one pair of all its
// rows from one line, so every broadcast is one base register plus a constant offset (with
// 12 row pointers the compiler spilled them and broadcast each code with its own load).
// Rows past M are zero (their outputs are never stored).
thread_local std::vector<int32_t> t_xtiles;

inline int64_t x_tile_ints(int64_t M, int64_t K) {
  return (M + PanelIsa::kTile - 1) / PanelIsa::kTile * PanelIsa::kTile * (K / 2);
}

inline const int32_t* tile_x(const QAct& a, int64_t M, int64_t K) {
  constexpr int T = PanelIsa::kTile;
  const int64_t tiles = (M + T - 1) / T, pairs = K / 2;
  int32_t* xt = grow(t_xtiles, x_tile_ints(M, K));
  const int32_t* q = reinterpret_cast<const int32_t*>(a.q.data());
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
  for (int64_t t = 0; t < tiles; ++t) {
    int32_t* dst = xt + t * pairs * T;
    const int64_t rows = std::min<int64_t>(T, M - t * T);
    for (int64_t p = 0; p < pairs; ++p)
      for (int r = 0; r < T; ++r) dst[p * T + r] = r < rows ? q[(t * T + r) * pairs + p] : 0;
  }
  return xt;
}

// The per-block arithmetic every path shares (tile_qa's): R rows' exact integer dots d of
// block blk, scaled by the panel's block scales times the rows' x scales dx, into acc.
template <int R>
inline void scale_block(PanelIsa::F* acc, const PanelIsa::I* d, const Panel& pn, int64_t blk,
                        const float* dx) {
  using P = PanelIsa;
  const P::F ws = P::loadf(pn.scales + blk * kPanelRows);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = P::fma_dot(d[r], P::mul(ws, P::set1(dx[r])), acc[r]);
}

// ... and, for formats with a min, the 32-element chunk c's min term (fs: the rows' exact
// float sums of x's chunk).
template <int R>
inline void add_mins(PanelIsa::F* acc, const Panel& pn, int64_t c, const float* fs) {
  using P = PanelIsa;
  if (!pn.mins) return;
  const P::F wm = P::loadf(pn.mins + c * kPanelRows);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = P::fma(wm, P::set1(fs[r]), acc[r]);
}

// x rows [m0, m0 + R) against one panel: out[m, n0 + j] for the valid rows j. xt: the
// rows' tile (tile_x), kTile codes a pair.
// fetch: the next panel's weight bytes (nullptr: none, or not on this pass), which stream
// into the cache while this pass computes, a few lines a block.
template <int R, int BS>
void panel_rows(const Weights& w, int64_t n0, const Panel& pn, const QAct& a, const int32_t* xt,
                int64_t m0, float* out, int64_t ldo, const Fetch& fetch) {
  using P = PanelIsa;
  constexpr int H = 32 / BS, T = P::kTile;
  const int64_t nc = w.K / 32;
  P::F acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = P::fzero();
  for (int64_t c = 0; c < nc; ++c) {
    fetch.some(c, nc);
    const float* dx = a.dt.data() + c * a.ldt + m0;
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h) {
      const int64_t p0 = c * 16 + h * (BS / 2);
      const int32_t* x = xt + p0 * T;
      const int32_t* wp = pn.pairs + p0 * kPanelRows;
      P::I d[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) d[r] = P::izero();
      OSTINATO_PANEL_UNROLL
      for (int p = 0; p < BS / 2; ++p) {
        const P::I wv = P::load(wp + p * kPanelRows);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) d[r] = P::dot(d[r], wv, x + p * T + r);
      }
      scale_block<R>(acc, d, pn, c * H + h, dx);
    }
    add_mins<R>(acc, pn, c, a.fsumt.data() + c * a.ldt + m0);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) P::store(out + (m0 + r) * ldo + n0, acc[r], pn.valid);
}

// x rows up to which panel_fused runs (0: never; ops.set_panel_fused, for an A/B)
int64_t g_fused_rows = PanelIsa::kFusedRows;

// Few x rows (decode): a panel's pairs go from the word transpose straight into the rows'
// products, never through memory (unpack16 stores 1 KB a chunk, 16 rows x 32 pairs, and with
// two rows to multiply those stores were most of the matmul). The same integers summed in
// another order (an exact int32 sum), the same per-block arithmetic: the same bits.
template <int R, int FMT, int BS>
void panel_fused(const Weights& w, int64_t n0, const Panel& pn, const QAct& a,
                 const int32_t* xt, float* out, int64_t ldo, const Fetch& fetch) {
  using P = PanelIsa;
  constexpr int H = 32 / BS, T = P::kTile;
  const int64_t nc = w.K / 32;
  P::F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = P::fzero();
  for (int64_t c = 0; c < nc; ++c) {
    fetch.some(c, nc);
    const float* dx = a.dt.data() + c * a.ldt;
    for (int h = 0; h < H; ++h) {
      P::I d[R];
      for (int r = 0; r < R; ++r) d[r] = P::izero();
      for (int half = 0; half < (FMT == kQ4 ? 1 : 2); ++half) {
        if (H == 2 && half != h) continue;        // 16-blocks: block h is half h
        P::chunk_pairs<FMT>(w, n0, c, half, [&](int i, P::I v) {
          const int32_t* x = xt + (c * 16 + 8 * half + i) * T;
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) d[r] = P::dot(d[r], v, x + r);
        });
      }
      scale_block<R>(acc, d, pn, c * H + h, dx);
    }
    add_mins<R>(acc, pn, c, a.fsumt.data() + c * a.ldt);
  }
  for (int r = 0; r < R; ++r) P::store(out + r * ldo + n0, acc[r], pn.valid);
}

template <int FMT, int BS, int R = PanelIsa::kFusedRows>
void fused_tail(int rows, const Weights& w, int64_t n0, const Panel& pn, const QAct& a,
                const int32_t* xt, float* out, int64_t ldo, const Fetch& fetch) {
  if constexpr (R > 0) {
    if (rows == R) panel_fused<R, FMT, BS>(w, n0, pn, a, xt, out, ldo, fetch);
    else fused_tail<FMT, BS, R - 1>(rows, w, n0, pn, a, xt, out, ldo, fetch);
  }
}

template <int BS, int R = PanelIsa::kTile>
void panel_tail(int rows, const Weights& w, int64_t n0, const Panel& pn, const QAct& a,
                const int32_t* xt, int64_t m0, float* out, int64_t ldo, const Fetch& fetch) {
  if constexpr (R > 0) {
    if (rows == R) panel_rows<R, BS>(w, n0, pn, a, xt, m0, out, ldo, fetch);
    else panel_tail<BS, R - 1>(rows, w, n0, pn, a, xt, m0, out, ldo, fetch);
  }
}

// The bytes of weight rows [n0, n1).
inline Fetch rows_fetch(const Weights& w, int64_t n0, int64_t n1) {
  if (n0 >= n1) return {};
  return {static_cast<const char*>(w.q) + n0 * w.row_bytes(), (n1 - n0) * w.row_bytes()};
}

thread_local std::vector<int16_t> t_panel_rows;   // each thread's unpacked weight rows
thread_local std::vector<int32_t> t_panel;        // ... and the same as a panel of pairs
thread_local std::vector<float> t_panel_vals;     // ... and its rows' scales and mins

// Floats of a panel's scales and mins for width K (blocks of 16 at the most).
inline int64_t panel_vals_floats(int64_t K) { return (K / 16 + K / 32) * kPanelRows; }

template <int FMT, int BS>
void panel_group(const Weights& w, int64_t n0, const QAct& a, const int32_t* xt, int64_t M,
                 float* out, int64_t ldo) {
  float* vals = grow(t_panel_vals, panel_vals_floats(w.K));
  const int64_t valid = std::min<int64_t>(kPanelRows, w.N - n0), nb = w.K / BS;
  panel_vals(w.scale, n0, valid, nb, vals);
  if (w.min) panel_vals(w.min, n0, valid, w.K / 32, vals + nb * kPanelRows);
  const Fetch next = rows_fetch(w, n0 + kPanelRows, std::min(w.N, n0 + 2 * kPanelRows));
  if constexpr (FMT == kQ4 || FMT == kQ8) {
    // int8 panels gain up to 4 rows only (one call, 1 thread: Q6_K at 6 rows 0.87x, Q8_0 even)
    if (M <= (FMT == kQ4 ? g_fused_rows : std::min<int64_t>(g_fused_rows, 4)) &&
        valid == kPanelRows) {
      const Panel pn{nullptr, vals, w.min ? vals + nb * kPanelRows : nullptr, valid};
      fused_tail<FMT, BS>((int)M, w, n0, pn, a, xt, out, ldo, next);
      return;
    }
  }
  int32_t* pairs = grow(t_panel, kPanelRows * w.K / 2);
  if (!PanelIsa::unpack16<FMT>(w, n0, pairs))
    unpack_panel<FMT>(w, n0, grow(t_panel_rows, kPanelRows * w.K), pairs);
  const Panel pn{pairs, vals, w.min ? vals + nb * kPanelRows : nullptr, valid};
  constexpr int T = PanelIsa::kTile;
  int64_t m = 0;
  const int64_t tile = w.K / 2 * T;   // int32s of one tile of x
  for (; m + T <= M; m += T)
    panel_rows<T, BS>(w, n0, pn, a, xt + m / T * tile, m, out, ldo, m ? Fetch{} : next);
  if (m < M)
    panel_tail<BS>((int)(M - m), w, n0, pn, a, xt + m / T * tile, m, out, ldo, m ? Fetch{} : next);
}

void qlinear_panels(const Weights& w, QAct& a, int64_t M, float* out, bool parallel) {
  auto group = w.fmt == kQ4 ? panel_group<kQ4, 32> : w.fmt == kQ5 ? panel_group<kQ5, 32>
             : w.bs == 16 ? panel_group<kQ8, 16> : panel_group<kQ8, 32>;
  const int64_t groups = (w.N + kPanelRows - 1) / kPanelRows;
  const int32_t* xt = tile_x(a, M, w.K);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t g = 0; g < groups; ++g) group(w, g * kPanelRows, a, xt, M, out, w.N);
}

}  // namespace
