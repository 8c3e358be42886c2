// Prompt rows on AMX bfloat16 tiles (opt-in, `--prompt-bf16`): the activations rounded to
// bfloat16, each 16-row group of weights dequantized to bfloat16 once per call and shared
// by every x tile, float32 sums kept in the tiles across the whole of K (no per-block
// store and rescale, which bounds the int16 path: amx.h). An output element is the same
// sequence of tile products, k = 0, 32, 64, ..., whatever the other rows are: a row's
// result does not depend on the batch. Not the int16 path's bits: the engine picks the
// path by token position (prompt positions here), never by batch size.
// Part of ops.cpp's one translation unit (included there, after amx.h).
#pragma once

namespace {

#if defined(OSTINATO_AMX) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define OSTINATO_AMX_BF16 1

bool amx_bf16_permitted() { return amx_permitted(); }

// Rows [n0, n0 + 16) of w as bfloat16 in the tiles' pair order, dst[k / 2][n][k % 2] (rows
// past N are zero): a row's 32 codes of one 32-column span as two float vectors, each value
// scale * code + min in float32 (a scale per block: per 32, or per 16 for 16-blocks),
// rounded to one vector of bfloat16 pairs; the 16 rows' vectors transposed as dwords give
// the span's 16 pair rows (~4x faster than going through memory row by row).
template <int FMT>
inline void codes32(const Weights& w, int64_t n, int64_t b, __m512& lo, __m512& hi) {
  const __m512i z = _mm512_set1_epi32((int32_t)w.zp);
  const __m128i mask = _mm_set1_epi8(0x0f);
  if constexpr (FMT == kQ8) {
    const int8_t* q = static_cast<const int8_t*>(w.q) + n * w.K + b * 32;
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
    return;
  }
  const uint8_t* p = static_cast<const uint8_t*>(w.q) +
                     (FMT == kQ5 ? (n * w.nb + b) * kQ5Block : (n * w.K + b * 32) / 2);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i l = _mm_and_si128(bytes, mask), h = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  if constexpr (FMT == kQ5) {                 // bit 4 of element j is bit j of the trailing word
    uint32_t qh;
    std::memcpy(&qh, p + 16, 4);
    l = _mm_or_si128(l, _mm_maskz_set1_epi8((__mmask16)(qh & 0xffff), 16));
    h = _mm_or_si128(h, _mm_maskz_set1_epi8((__mmask16)(qh >> 16), 16));
  }
  lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(l), z));
  hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(h), z));
}

template <int FMT, int BS>
void bf16_group(const Weights& w, int64_t n0, uint16_t* dst) {
  const int64_t nrows = std::min<int64_t>(16, w.N - n0), spans = w.K / 32;
  for (int64_t b = 0; b < spans; ++b) {
    __m512 r[16];
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= nrows) { r[i] = _mm512_setzero_ps(); continue; }
      const int64_t n = n0 + i;
      __m512 lo, hi;
      codes32<FMT>(w, n, b, lo, hi);
      const int64_t blo = BS == 16 ? 2 * b : b, bhi = BS == 16 ? 2 * b + 1 : b;
      const __m512 m = _mm512_set1_ps(w.min ? w.min.get(n, b) : 0.f);   // mins: 32-blocks
      r[i] = (__m512)_mm512_cvtne2ps_pbh(
          _mm512_fmadd_ps(_mm512_set1_ps(w.scale.get(n, bhi)), hi, m),
          _mm512_fmadd_ps(_mm512_set1_ps(w.scale.get(n, blo)), lo, m));
    }
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dst + (b * 16 + j) * 32, r[j]);
  }
}

using Bf16GroupFn = void (*)(const Weights&, int64_t, uint16_t*);
Bf16GroupFn pick_bf16_group(const Weights& w) {
  if (w.fmt == kQ4) return bf16_group<kQ4, 32>;
  if (w.fmt == kQ5) return bf16_group<kQ5, 32>;
  return w.bs == 16 ? bf16_group<kQ8, 16> : bf16_group<kQ8, 32>;
}

void load_bf16_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
}

thread_local std::vector<uint16_t> t_bf_x;          // the calling thread's bfloat16 rows
thread_local std::vector<uint16_t> t_bf_w;          // each thread's two weight groups

size_t bf16_x_elems(int64_t M, int64_t K) { return (M + 31) / 32 * 32 * K; }

// C tiles 0-3 hold (x tile 2p + c / 2, group g + c % 2); tile store by number (literal).
void store_c(int c, float* dst, int64_t stride_bytes) {
  switch (c) {
    case 0: _tile_stored(0, dst, stride_bytes); break;
    case 1: _tile_stored(1, dst, stride_bytes); break;
    case 2: _tile_stored(2, dst, stride_bytes); break;
    default: _tile_stored(3, dst, stride_bytes); break;
  }
}

// `--dtype bfloat16`: the weights converted once, at load, as bf16_group writes them, instead
// of once per call (which costs a step as much as the tile products from 64 rows on). Groups
// go by pairs, the last pair's second group zeros when N / 16 is odd: group g at g * 16 * K.
// Twice the bytes of 8-bit codes (four times 4-bit ones): the trade is memory and a slower
// step at a few rows, for steps of many rows with no conversion in them.
int64_t packed_bf16_elems(int64_t N, int64_t K) { return (N + 31) / 32 * 32 * K; }
// Groups g0 and g0 + 1 of w into dst as the tiles read them (the second zeros past N).
void bf16_pair(Bf16GroupFn conv, const Weights& w, int64_t g0, uint16_t* dst) {
  conv(w, g0 * 16, dst);
  if ((g0 + 1) * 16 < w.N) conv(w, g0 * 16 + 16, dst + 16 * w.K);
  else std::memset(dst + 16 * w.K, 0, 16 * w.K * sizeof(uint16_t));
}

void pack_bf16_into(const Weights& w, uint16_t* dst) {
  const Bf16GroupFn conv = pick_bf16_group(w);
  const int64_t pairs = (w.N + 31) / 32;
#pragma omp parallel for schedule(static)
  for (int64_t gp = 0; gp < pairs; ++gp) bf16_pair(conv, w, 2 * gp, dst + 2 * gp * 16 * w.K);
}

// Span s of a pair of packed groups, into L1 two k-steps before the tiles load it: from
// memory a tile load waits for DRAM (SmolLM2's matmuls at 64 rows: 25.8 ms a step without,
// 19.0 with; 4 or 8 steps ahead were slower, and at one row no distance helped: 212 MB a
// step at ~17 GB/s is the bound there).
// Past a pair's last span it reaches into the next pair's (the same thread's next, under a
// static schedule); `left` (the pairs after this one) keeps it inside the array.
inline void prefetch_pair_span(const uint16_t* pair, int64_t K, int64_t s, int64_t left) {
  if (s >= K / 32 && !left) return;
  const char* a = reinterpret_cast<const char*>(pair + s * 512);
  const char* b = reinterpret_cast<const char*>(pair + 16 * K + s * 512);
  for (int l = 0; l < 16; ++l) {
    _mm_prefetch(a + 64 * l, _MM_HINT_T0);
    _mm_prefetch(b + 64 * l, _MM_HINT_T0);
  }
}

// out[row[m]] = x[row[m]] . w^T for m < M (rows of x and out given by index, ascending).
// x is rounded to bfloat16 in tile order: tile t (16 rows), k-step s (32 columns) is one
// contiguous 1 KB block, [t][s][row % 16][32] (a tile load from rows K apart ran ~1.4x slower).
void qlinear_bf16_rows(const Weights& w, const float* x, const int64_t* row, int64_t M,
                       float* out, int64_t ldo, bool parallel) {
  const int64_t K = w.K, N = w.N, groups = (N + 15) / 16, ks = K / 32;
  const int64_t pairs = (M + 31) / 32;          // x tiles go by twos (the second may be zeros)
  uint16_t* xb = grow(t_bf_x, bf16_x_elems(M, K));
  const Bf16GroupFn conv = pick_bf16_group(w);
  auto x_tile = [&](int64_t t, int64_t s) { return xb + (t * ks + s) * 512; };
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < pairs * 32; ++m) {
      const int64_t t = m / 16, r = m % 16;
      for (int64_t s = 0; s < ks; ++s) {
        uint16_t* d = x_tile(t, s) + r * 32;
        if (m >= M) { std::memset(d, 0, 64); continue; }
        const float* xr = x + row[m] * K + s * 32;
        _mm512_storeu_si512(d, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + 16),
                                                            _mm512_loadu_ps(xr)));
      }
    }
    load_bf16_config();
    uint16_t* wb = grow(t_bf_w, 32 * K);
    alignas(64) float tmp[16 * 16];
#pragma omp for schedule(static)
    for (int64_t gp = 0; gp < (groups + 1) / 2; ++gp) {
      const int64_t g0 = 2 * gp;
      const uint16_t* wg = wb;
      if (w.bf16) wg = w.bf16 + g0 * 16 * K;
      else bf16_pair(conv, w, g0, wb);
      const int64_t left = (groups + 1) / 2 - 1 - gp;         // pairs after this one
      for (int64_t p = 0; p < pairs; ++p) {
        const bool two = M - p * 32 > 16;   // else one x tile of live rows: its products alone
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t s = 0; s < ks; ++s) {
          if (w.bf16 && p == 0) prefetch_pair_span(wg, K, s + 2, left);
          _tile_loadd(4, x_tile(2 * p, s), 64);
          if (two) _tile_loadd(5, x_tile(2 * p + 1, s), 64);
          _tile_loadd(6, wg + s * 512, 64);
          _tile_loadd(7, wg + 16 * K + s * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        for (int c = 0; c < 4; ++c) {
          const int64_t m0 = p * 32 + (c / 2) * 16, n0 = (g0 + c % 2) * 16;
          const int64_t mr = std::min<int64_t>(16, M - m0), nr = std::min<int64_t>(16, N - n0);
          if (mr <= 0 || nr <= 0) continue;
          if (mr == 16 && nr == 16 && row[m0 + 15] - row[m0] == 15) {   // 16 rows in a row
            store_c(c, out + row[m0] * ldo + n0, ldo * sizeof(float));
            continue;
          }
          store_c(c, tmp, 64);
          for (int64_t m = 0; m < mr; ++m)
            std::memcpy(out + row[m0 + m] * ldo + n0, tmp + m * 16, nr * sizeof(float));
        }
      }
    }
    _tile_release();
  }
}
#else
bool amx_bf16_permitted() { return false; }
size_t bf16_x_elems(int64_t, int64_t) { return 0; }
int64_t packed_bf16_elems(int64_t, int64_t) { return 0; }
void pack_bf16_into(const Weights&, uint16_t*) {}
void qlinear_bf16_rows(const Weights&, const float*, const int64_t*, int64_t, float*, int64_t,
                       bool) {}
#endif

}  // namespace
