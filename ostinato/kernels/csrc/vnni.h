// The AVX-512 VNNI panel path of the quantized matmul (many rows, CPUs without AMX),
// bit-identical to the AVX tiles.
// Part of ops.cpp's one translation unit (included there, after the common headers):
// one file per kernel family so that a reader finds the room for what they change.
//
// The AVX tiles (quant.h) unpack a weight block for every 4 activation rows and reduce each
// dot product across lanes; on a CPU without AMX that makes a prefill arithmetic-bound at a
// fraction of what the vector unit can do. Here a thread unpacks a group of 16 weight rows
// once, into a panel of int16 pairs laid out [k / 2][row][2], and runs every activation row
// against it: one dpwssd multiplies a pair of one x row's int16 codes (broadcast) with the
// same pair of all 16 weight rows, so lane j accumulates row j's integer block dot with no
// horizontal sum, 32 multiplies an instruction. The per-block scaling then follows
// tile_qa's arithmetic exactly (fma of the exact integer dot by w_scale * x_scale, then the
// min term), so every output has the same bits whichever path its batch size picked.
#pragma once

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define OSTINATO_VNNI 1

constexpr int kPanelRows = 16;     // weight rows per panel: one output per lane
constexpr int kVnniRowTile = 12;   // x rows per pass: 12 int32 dots + 12 float sums in registers

// Weight rows [n0, n0 + 16) as int16 codes (minus the zero point, as tile_qa's), pairs
// interleaved: panel[p * 16 + j] holds elements 2p, 2p + 1 of row n0 + j. Rows past N are 0.
template <int FMT>
void vnni_panel(const Weights& w, int64_t n0, int16_t* rows16, int32_t* panel) {
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
  // 16 x 16 int32 transposes: pairs [p0, p0 + 16) of the 16 rows -> 16 vectors of rows
  for (int64_t p0 = 0; p0 < K / 2; p0 += 16) {
    __m512 t[16];
    for (int j = 0; j < 16; ++j)
      t[j] = _mm512_castsi512_ps(_mm512_loadu_si512(rows16 + j * K + 2 * p0));
    transpose16(t);
    for (int p = 0; p < 16; ++p)
      _mm512_storeu_si512(panel + (p0 + p) * 16, _mm512_castps_si512(t[p]));
  }
}

// The 16 panel rows' values of block b (rows past N: zero; their outputs are never stored).
inline __m512 vals16(const BlockVals& v, int64_t n0, int64_t valid, int64_t b) {
  if (valid == kPanelRows) {
    return _mm512_insertf32x4(_mm512_insertf32x4(_mm512_insertf32x4(
        _mm512_castps128_ps512(v.four(n0, b)), v.four(n0 + 4, b), 1), v.four(n0 + 8, b), 2),
        v.four(n0 + 12, b), 3);
  }
  alignas(64) float f[16] = {};
  for (int64_t j = 0; j < valid; ++j) f[j] = v.get(n0 + j, b);
  return _mm512_load_ps(f);
}

// x rows [m0, m0 + R) against one panel: out[m, n0 + j] for the valid rows j.
template <int R, int BS>
void vnni_rows(const Weights& w, int64_t n0, int64_t valid, const int32_t* panel,
               const QAct& a, int64_t m0, float* out, int64_t ldo) {
  constexpr int H = 32 / BS;
  const int64_t K = w.K, nc = K / 32;
  const int32_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = reinterpret_cast<const int32_t*>(a.q.data() + (m0 + r) * K);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    const float* dx = a.dt.data() + c * a.ldt + m0;
    for (int h = 0; h < H; ++h) {
      const int64_t p0 = c * 16 + h * (BS / 2);
      __m512i d[R];
      for (int r = 0; r < R; ++r) d[r] = _mm512_setzero_si512();
      for (int p = 0; p < BS / 2; ++p) {
        const __m512i wv = _mm512_loadu_si512(panel + (p0 + p) * 16);
        for (int r = 0; r < R; ++r)
          d[r] = _mm512_dpwssd_epi32(d[r], wv, _mm512_set1_epi32(xr[r][p0 + p]));
      }
      const __m512 ws = vals16(w.scale, n0, valid, c * H + h);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_mul_ps(ws, _mm512_set1_ps(dx[r])),
                                 acc[r]);
    }
    if (w.min) {
      const __m512 wm = vals16(w.min, n0, valid, c);
      const float* fs = a.fsumt.data() + c * a.ldt + m0;
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(wm, _mm512_set1_ps(fs[r]), acc[r]);
    }
  }
  const __mmask16 keep = (__mmask16)((1u << valid) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + (m0 + r) * ldo + n0, keep, acc[r]);
}

template <int BS, int R = kVnniRowTile>
void vnni_tail(int rows, const Weights& w, int64_t n0, int64_t valid, const int32_t* panel,
               const QAct& a, int64_t m0, float* out, int64_t ldo) {
  if constexpr (R > 0) {
    if (rows == R) vnni_rows<R, BS>(w, n0, valid, panel, a, m0, out, ldo);
    else vnni_tail<BS, R - 1>(rows, w, n0, valid, panel, a, m0, out, ldo);
  }
}

thread_local std::vector<int16_t> t_vnni_rows;   // each thread's unpacked weight rows
thread_local std::vector<int32_t> t_vnni_panel;  // ... and the same as a panel of pairs

template <int FMT, int BS>
void vnni_group(const Weights& w, int64_t n0, const QAct& a, int64_t M, float* out, int64_t ldo) {
  int16_t* rows16 = grow(t_vnni_rows, kPanelRows * w.K);
  int32_t* panel = grow(t_vnni_panel, kPanelRows * w.K / 2);
  vnni_panel<FMT>(w, n0, rows16, panel);
  const int64_t valid = std::min<int64_t>(kPanelRows, w.N - n0);
  int64_t m = 0;
  for (; m + kVnniRowTile <= M; m += kVnniRowTile)
    vnni_rows<kVnniRowTile, BS>(w, n0, valid, panel, a, m, out, ldo);
  if (m < M) vnni_tail<BS>((int)(M - m), w, n0, valid, panel, a, m, out, ldo);
}

void qlinear_vnni(const Weights& w, QAct& a, int64_t M, float* out, bool parallel) {
  auto group = w.fmt == kQ4 ? vnni_group<kQ4, 32> : w.fmt == kQ5 ? vnni_group<kQ5, 32>
             : w.bs == 16 ? vnni_group<kQ8, 16> : vnni_group<kQ8, 32>;
  const int64_t groups = (w.N + kPanelRows - 1) / kPanelRows;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t g = 0; g < groups; ++g) group(w, g * kPanelRows, a, M, out, w.N);
}
constexpr bool kVnniBuilt = true;
#else
void qlinear_vnni(const Weights&, QAct&, int64_t, float*, bool) {}
constexpr bool kVnniBuilt = false;
#endif

}  // namespace
