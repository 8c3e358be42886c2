// The weight-panel path of the quantized matmul (many rows, CPUs without AMX), in AVX-512
// VNNI or AVX2, bit-identical to the AVX tiles.
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

// Two widths of the same code: 16 weight rows a panel in AVX-512 VNNI (dpwssd), and 8 in
// AVX2 (dot_s16: AVX-VNNI's dpwssd where the CPU has it, else madd + add, the same integers).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
struct PanelIsa {
  static constexpr const char* kName = "avx512_vnni";
  static constexpr int kRows = 16;   // weight rows a panel: one output a lane
  static constexpr int kTile = 12;   // x rows a pass: 12 int32 dots + 12 float sums in registers
  using I = __m512i;
  using F = __m512;
  static I izero() { return _mm512_setzero_si512(); }
  static F fzero() { return _mm512_setzero_ps(); }
  static I load(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I dot(I acc, I w, int32_t x) { return _mm512_dpwssd_epi32(acc, w, _mm512_set1_epi32(x)); }
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
  using I = __m256i;
  using F = __m256;
  static I izero() { return _mm256_setzero_si256(); }
  static F fzero() { return _mm256_setzero_ps(); }
  static I load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I dot(I acc, I w, int32_t x) { return dot_s16(acc, w, _mm256_set1_epi32(x)); }
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

// x rows [m0, m0 + R) against one panel: out[m, n0 + j] for the valid rows j.
template <int R, int BS>
void panel_rows(const Weights& w, int64_t n0, const Panel& pn, const QAct& a, int64_t m0,
                float* out, int64_t ldo) {
  using P = PanelIsa;
  constexpr int H = 32 / BS;
  const int64_t K = w.K, nc = K / 32;
  const int32_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = reinterpret_cast<const int32_t*>(a.q.data() + (m0 + r) * K);
  P::F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = P::fzero();
  for (int64_t c = 0; c < nc; ++c) {
    const float* dx = a.dt.data() + c * a.ldt + m0;
    for (int h = 0; h < H; ++h) {
      const int64_t p0 = c * 16 + h * (BS / 2);
      P::I d[R];
      for (int r = 0; r < R; ++r) d[r] = P::izero();
      for (int p = 0; p < BS / 2; ++p) {
        const P::I wv = P::load(pn.pairs + (p0 + p) * kPanelRows);
        for (int r = 0; r < R; ++r) d[r] = P::dot(d[r], wv, xr[r][p0 + p]);
      }
      const P::F ws = P::loadf(pn.scales + (c * H + h) * kPanelRows);
      for (int r = 0; r < R; ++r) acc[r] = P::fma_dot(d[r], P::mul(ws, P::set1(dx[r])), acc[r]);
    }
    if (pn.mins) {
      const P::F wm = P::loadf(pn.mins + c * kPanelRows);
      const float* fs = a.fsumt.data() + c * a.ldt + m0;
      for (int r = 0; r < R; ++r) acc[r] = P::fma(wm, P::set1(fs[r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) P::store(out + (m0 + r) * ldo + n0, acc[r], pn.valid);
}

template <int BS, int R = PanelIsa::kTile>
void panel_tail(int rows, const Weights& w, int64_t n0, const Panel& pn, const QAct& a,
                int64_t m0, float* out, int64_t ldo) {
  if constexpr (R > 0) {
    if (rows == R) panel_rows<R, BS>(w, n0, pn, a, m0, out, ldo);
    else panel_tail<BS, R - 1>(rows, w, n0, pn, a, m0, out, ldo);
  }
}

thread_local std::vector<int16_t> t_panel_rows;   // each thread's unpacked weight rows
thread_local std::vector<int32_t> t_panel;        // ... and the same as a panel of pairs
thread_local std::vector<float> t_panel_vals;     // ... and its rows' scales and mins

// Floats of a panel's scales and mins for width K (blocks of 16 at the most).
inline int64_t panel_vals_floats(int64_t K) { return (K / 16 + K / 32) * kPanelRows; }

template <int FMT, int BS>
void panel_group(const Weights& w, int64_t n0, const QAct& a, int64_t M, float* out, int64_t ldo) {
  int16_t* rows16 = grow(t_panel_rows, kPanelRows * w.K);
  int32_t* pairs = grow(t_panel, kPanelRows * w.K / 2);
  float* vals = grow(t_panel_vals, panel_vals_floats(w.K));
  unpack_panel<FMT>(w, n0, rows16, pairs);
  const int64_t valid = std::min<int64_t>(kPanelRows, w.N - n0), nb = w.K / BS;
  panel_vals(w.scale, n0, valid, nb, vals);
  if (w.min) panel_vals(w.min, n0, valid, w.K / 32, vals + nb * kPanelRows);
  const Panel pn{pairs, vals, w.min ? vals + nb * kPanelRows : nullptr, valid};
  constexpr int T = PanelIsa::kTile;
  int64_t m = 0;
  for (; m + T <= M; m += T) panel_rows<T, BS>(w, n0, pn, a, m, out, ldo);
  if (m < M) panel_tail<BS>((int)(M - m), w, n0, pn, a, m, out, ldo);
}

void qlinear_panels(const Weights& w, QAct& a, int64_t M, float* out, bool parallel) {
  auto group = w.fmt == kQ4 ? panel_group<kQ4, 32> : w.fmt == kQ5 ? panel_group<kQ5, 32>
             : w.bs == 16 ? panel_group<kQ8, 16> : panel_group<kQ8, 32>;
  const int64_t groups = (w.N + kPanelRows - 1) / kPanelRows;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t g = 0; g < groups; ++g) group(w, g * kPanelRows, a, M, out, w.N);
}

}  // namespace
