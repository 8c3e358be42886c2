// The AMX tile path of the quantized matmul (batches of 5+ rows), bit-identical to the AVX tiles.
// Part of ops.cpp's one translation unit (included there, after the common headers):
// one file per kernel family so that a reader finds the room for what they change.
#pragma once

namespace {

#if defined(__AVX512F__)
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
#endif

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
    if (w.fmt == kQ5) {                    // codes 0..31, as Q4's 0..15 (zp off the sums)
      const uint8_t* src = static_cast<const uint8_t*>(w.q) + (n0 + r) * (K / 32) * kQ5Block;
      const __m128i mask = _mm_set1_epi8(0x0f);
      for (int64_t c = 0; c < K / 32; ++c) {
        const uint8_t* b = src + c * kQ5Block;
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
        uint32_t qh;
        std::memcpy(&qh, b + 16, 4);
        const __m128i lo = _mm_or_si128(_mm_and_si128(q, mask),
                                        _mm_maskz_set1_epi8((__mmask16)(qh & 0xffff), 16));
        const __m128i hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(q, 4), mask),
                                        _mm_maskz_set1_epi8((__mmask16)(qh >> 16), 16));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c * 32), lo);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c * 32 + 16), hi);
      }
      continue;
    }
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

// One group of 16 weight rows (n0 ..) against every x-row tile; out: where its column 0
// goes (rows ldo apart).
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
  const int64_t row_bytes = w.row_bytes();
  const int64_t lines = (row_bytes + 63) / 64;
  const int64_t next_rows = std::max<int64_t>(0, std::min<int64_t>(16, w.N - n0 - 16));
  const char* next = static_cast<const char*>(w.q) + (next_rows ? n0 + 16 : 0) * row_bytes;
  const int64_t to_fetch = next_rows * lines, pairs = std::max<int64_t>(1, nc * (32 / BS) / 2);
  int64_t fetched = 0;
  auto prefetch_some = [&](int64_t pair) {
    for (const int64_t upto = to_fetch * (pair + 1) / pairs; fetched < upto; ++fetched)
      _mm_prefetch(next + (fetched / lines) * row_bytes + (fetched % lines) * 64, _MM_HINT_T0);
  };
  // Cells (block c, half h) alternate between tmm0-3 and tmm4-7.
  constexpr int H = 32 / BS;
  const int64_t cells = nc * H;
  alignas(64) int32_t cs[2][2][16][16];      // [X/Y][hi/lo]
  auto w_at = [&](int64_t i) { return A + (i / H) * 32 + (i % H) * BS; };
  auto x_at = [&](const auto& v, int64_t t, int64_t i) {
    return v.data() + (t * nc + i / H) * 512 + (i % H) * (BS / 4) * 64;
  };
  // cell i's two products (x's hi and lo bytes) on tiles CH, CL (sums), WT (weights), XT
  // (x bytes); the tile numbers are literal in the instructions, hence a macro
#define OSTINATO_AMX_CELL(CH, CL, WT, XT)                                                       \
  [&](int64_t t, int64_t i) {                                                                  \
    _tile_zero(CH); _tile_zero(CL);                                                            \
    _tile_loadd(WT, w_at(i), K);                                                               \
    _tile_loadd(XT, x_at(a.hi, t, i), 64);                                                     \
    if constexpr (FMT == kQ4) _tile_dpbusd(CH, WT, XT); else _tile_dpbssd(CH, WT, XT);         \
    _tile_loadd(XT, x_at(a.lo, t, i), 64);                                                     \
    if constexpr (FMT == kQ4) _tile_dpbuud(CL, WT, XT); else _tile_dpbsud(CL, WT, XT);         \
  }
  auto issue_x = OSTINATO_AMX_CELL(0, 1, 2, 3);
  auto issue_y = OSTINATO_AMX_CELL(4, 5, 6, 7);
#undef OSTINATO_AMX_CELL
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
    // Software-pipelined: when cell i's sums are scaled into acc on the vector units, the
    // products of cells i + 1 and i + 2 are already queued on the tile unit (the two sets of
    // tiles take turns), so the two overlap. Q4_K 4864 x 1024, 64 rows, one thread: 2.30 ->
    // 1.91-2.07 ms; Q6_K 1024 x 4864: 3.12 -> 2.79-2.88; Q4_1 and Q8_0 even (same bits).
    issue_x(t, 0);
    if (cells > 1) issue_y(t, 1);
    for (int64_t i = 0; i < cells; ++i) {
      if (t == 0 && i % 2 == 0) prefetch_some(i / 2);
      int32_t (*ch)[16] = cs[i % 2][0], (*cl)[16] = cs[i % 2][1];
      if (i % 2 == 0) {
        _tile_stored(0, ch, 64); _tile_stored(1, cl, 64);
        if (i + 2 < cells) issue_x(t, i + 2);
      } else {
        _tile_stored(4, ch, 64); _tile_stored(5, cl, 64);
        if (i + 2 < cells) issue_y(t, i + 2);
      }
      finish(i, ch, cl);
    }
    transpose16(acc);                            // acc[m] = row m's 16 outputs
    const int64_t mrows = std::min<int64_t>(16, M - t * 16);
    const __mmask16 keep = (__mmask16)((1u << rows) - 1);
    for (int64_t m = 0; m < mrows; ++m)
      _mm512_mask_storeu_ps(out + (t * 16 + m) * ldo, keep, acc[m]);
  }
}

// Quantizing, packing and the tile products share one parallel region.
// (a thread_local named inside a parallel region is each thread's own: the caller's are
// bound to references first)
thread_local std::vector<int8_t> t_wbuf;      // each thread's unpacked weight rows
thread_local AmxAct t_amx;                    // the calling thread's packed activations
thread_local std::vector<float> t_amx_stage;  // each thread's staged output columns

// Output rows N floats apart fall into the same few cache sets: past 32 rows, an output past
// the L2 had each 64-byte store wait on a line that an earlier row's store had evicted. Such
// an output is staged: a thread computes kStageGroups groups of columns into a buffer of its
// own, then copies each row's 512 bytes at once (same bits). LM heads (Q8_0), 2 threads, ms
// at 64 / 128 rows, interleaved (scripts/lm_head_speed.py): SmolLM2 (49,152 x 576)
// 9.0-10.8 / 20.1-20.8 -> 6.7-7.2 / 14.5-16.0; Gemma 3 (262,144 x 640) 59.9-62.6 / 119-122
// -> 59.1-59.4 / 107-112; Qwen2.5 (151,936 x 896) 45.5-45.6 / 86-103 -> 43.7-44.7 / 84-88.
// At 32 rows Gemma's was 8% slower staged, hence "past 32". (Non-temporal stores gave SmolLM2
// 5.9 ms at 64 rows but Gemma 65.8: its weights come from memory at the same time.)
constexpr int64_t kStageGroups = 8;
bool stage_output(int64_t M, int64_t N) { return M > 32 && M * N * 4 >= (8 << 20); }
size_t stage_floats(int64_t M) { return (M + 15) / 16 * 16 * 16 * kStageGroups; }

void qlinear_amx(const Weights& w, const float* x, int64_t M, float* out, bool parallel) {
  AmxAct& a = t_amx;
  const bool qsum = (w.fmt == kQ4 || w.fmt == kQ5) && w.zp;
  alloc_amx(M, w.K, qsum, a);
  // Q5 runs as Q4 does: its rows unpacked to unsigned codes (weight_rows), zp off the sums
  auto group = w.fmt == kQ4 || w.fmt == kQ5 ? amx_group<kQ4, 32>
             : w.bs == 16 ? amx_group<kQ8, 16> : amx_group<kQ8, 32>;
  const int64_t groups = (w.N + 15) / 16, cells = a.tiles * a.nc, G = kStageGroups;
  const bool stage = stage_output(M, w.N);
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
    if (!stage) {
#pragma omp for schedule(static)
      for (int64_t g = 0; g < groups; ++g) group(w, g * 16, a, M, out + g * 16, w.N, wbuf);
    } else {
      float* st = grow(t_amx_stage, stage_floats(M));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < (groups + G - 1) / G; ++b) {
        const int64_t g0 = b * G, g1 = std::min(groups, g0 + G), c0 = g0 * 16;
        for (int64_t g = g0; g < g1; ++g) group(w, g * 16, a, M, st + (g - g0) * 16, 16 * G, wbuf);
        const int64_t cols = std::min(w.N, g1 * 16) - c0;
        for (int64_t m = 0; m < M; ++m) std::memcpy(out + m * w.N + c0, st + m * 16 * G, cols * 4);
      }
    }
    _tile_release();
  }
}
#else
bool amx_permitted() { return false; }
void qlinear_amx(const Weights&, const float*, int64_t, float*, bool) {}
#endif

}  // namespace
