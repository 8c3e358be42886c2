// Paged attention over the float16 KV cache: a thread per KV head and token (or prompt run).
// Part of ops.cpp's one translation unit (included there, after the common headers):
// one file per kernel family so that a reader finds the room for what they change.
#pragma once

// sc[i] = exp(sc[i] - mx) for i < n; returns their sum (8 lanes, then the tail: a fixed order;
// AVX-512 computes 16 exps at a time and adds them to the 8 lanes in the same order).
inline float softmax_numerators(float* sc, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 m16 = _mm512_set1_ps(mx);     // 16 exps at once, summed as two 8-lane steps
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(sc + i), m16));
    _mm512_storeu_ps(sc + i, e);
    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
    acc = _mm256_add_ps(acc, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
  }
#endif
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
  static V16 load(const uint16_t* p) {       // 16 float16 values
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static V16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static V16 load(const int8_t* p) {         // 16 int8 codes
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
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
  static V16 load(const uint16_t* p) {       // 16 float16 values
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  }
  static V16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static V16 load(const int8_t* p) {         // 16 int8 codes
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))))};
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

// R query rows that share one KV head: the heads of that KV head, for one token or for a run
// of consecutive tokens of one sequence (a prefill chunk), each against its own keys
// [lo[r], pos[r]], read through the sequence's block table 16 slots at a time: each key and
// value is loaded once for all R rows. Per row the arithmetic is fixed: a key's score is its
// dot with q summed over the dimensions in 4 interleaved chains, added (c0 + c1) + (c2 + c3),
// then scaled; softmax with the row's max over its own keys; values summed in key order from
// its lo into o (overwritten). Which rows share a call changes none of it (a row's keys
// outside its range are masked before they are stored and skipped in the value sum), and a
// key's slot is where it sits in its block, the same whatever the batch or however the prompt
// is cut, so nothing depends on either. EK, EV: the cache's element types, float16 (uint16_t
// bits, the default), float32 (--kv-cache-dtype float32), or float16 keys and int8 values
// (--kv-cache-dtype int8-values: codes and a scale per 16 dims, norm_rope.h; a value is its
// codes times their scale, as float32, before the sum).
constexpr int kAttnMaxRows = 6;              // attend_rows<E, 1> .. <E, 6>
struct AttnRows {
  const float* q[kAttnMaxRows];
  float* o[kAttnMaxRows];
  int64_t lo[kAttnMaxRows], pos[kAttnMaxRows];
  bool cold = false;       // its keys and values come from memory (see kColdAheadBytes)
};

// A decode row's keys and values come from memory, a few KB a block in blocks the table
// scatters: no hardware prefetcher sees them coming, and fetching one block ahead used half
// the machine's read bandwidth. A cold run (a sequence of at most kColdTokens query rows, or
// a prefill chunk's first run of a KV head) asks for its K and V blocks into L2
// kColdAheadBytes ahead of the block it reads (all of a short run at its start); L1 still
// takes them a block ahead. One step, 30 layers (scripts/attention_speed.py --decode S
// --tokens C [--query-tokens Q]), SmolLM2 shape: 16 x 140 tokens 6.0 -> 3.0 ms, 64 x 140
// 27.4 -> 14.7, 8 x 4,000 98.9 -> 64.4; 2 chunks of 32 tokens at 1,000: 29.2-29.8 -> 25.2-25.9.
// A chunk's later runs re-read the keys its first run read (in cache): they skip it.
constexpr int64_t kColdAheadBytes = 512 << 10;
constexpr int64_t kColdTokens = 8;            // a sequence with this few query rows is cold
// A KV head's share of one block, keys and values (k_bytes, v_bytes), into L2.
inline void prefetch_block_l2(const void* k, const void* v, int64_t k_bytes, int64_t v_bytes) {
  for (int64_t at = 0; at < std::max(k_bytes, v_bytes); at += 64) {
    if (at < k_bytes) _mm_prefetch(static_cast<const char*>(k) + at, _MM_HINT_T1);
    if (at < v_bytes) _mm_prefetch(static_cast<const char*>(v) + at, _MM_HINT_T1);
  }
}

template <typename EK, typename EV, int R>
void attend_rows(const AttnRows& rw, const EK* kc, const EV* vc, const int64_t* table,
                 int64_t BS, int64_t KV, int64_t kvh, int64_t D, float scale, float cap,
                 std::vector<float>& sc) {
  int64_t lo = rw.lo[0], pos = rw.pos[0];
  for (int r = 1; r < R; ++r) lo = std::min(lo, rw.lo[r]), pos = std::max(pos, rw.pos[r]);
  const int64_t n = pos - lo + 1;             // the keys some row reads
  float* base = grow(sc, 16 + R * n + 16) + 16;   // scores of row r: base[r * n + j - lo]
  V16 mxv[R];
  for (int r = 0; r < R; ++r) mxv[r] = V16::set1(-INFINITY);
  // The blocks sit wherever the table says, so no hardware prefetcher sees the next one
  // coming: each block's keys (and, later, values) are asked for one block ahead.
  constexpr bool kI8 = std::is_same_v<EV, int8_t>;           // int8 values and their scales
  const int64_t VR = BS + (kI8 ? kv_v_extra(BS) : 0);      // V rows a KV head's block
  auto keys_at = [&](int64_t j0) {
    const int64_t b = j0 / BS;
    return kc + ((table[b] * KV + kvh) * D) * BS + (j0 - b * BS);
  };
  auto values_at = [&](int64_t j) {
    const int64_t b = j / BS;
    return vc + ((table[b] * KV + kvh) * VR + (j - b * BS)) * D;
  };
  auto prefetch_rows = [](const auto* p, int64_t rows, int64_t stride, int64_t bytes) {
    if (stride * (int64_t)sizeof(*p) == bytes) {           // rows back to back: one run
      for (int64_t at = 0; at < rows * bytes; at += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p) + at, _MM_HINT_T0);
      return;
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t at = 0; at < bytes; at += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p + r * stride) + at, _MM_HINT_T0);
  };
  auto slots = [](int64_t j0, int64_t a, int64_t b) -> uint32_t {   // slots of j0.. in [a, b]
    if (b < j0 || a > j0 + 15) return 0;
    uint32_t keep = 0xffff;
    if (j0 < a) keep &= ~((1u << (a - j0)) - 1);
    if (j0 + 15 > b) keep &= (1u << (b - j0 + 1)) - 1;
    return keep;
  };
  // a cold run: the blocks `ahead` keys past the one it reads (all up to there, first)
  const int64_t k_bytes = D * BS * (int64_t)sizeof(EK), v_bytes = VR * D * (int64_t)sizeof(EV);
  const int64_t ahead = rw.cold ? std::max<int64_t>(1, kColdAheadBytes / (k_bytes + v_bytes)) * BS : 0;
  for (int64_t j = lo / BS * BS; j <= pos && j < lo / BS * BS + ahead; j += BS)
    prefetch_block_l2(keys_at(j), values_at(j), k_bytes, v_bytes);
  for (int64_t j0 = lo / 16 * 16; j0 <= pos; j0 += 16) {        // 16 slots of one block
    if (ahead && j0 % BS == 0 && j0 + ahead <= pos)
      prefetch_block_l2(keys_at(j0 + ahead), values_at(j0 + ahead), k_bytes, v_bytes);
    const EK* kt = keys_at(j0);
    if (j0 + 16 <= pos) prefetch_rows(keys_at(j0 + 16), D, BS, 16 * sizeof(EK));
    V16 c[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) c[r][i] = V16::zero();
    for (int64_t d = 0; d < D; d += 4)
      for (int i = 0; i < 4; ++i) {
        const V16 k = V16::load(kt + (d + i) * BS);
        for (int r = 0; r < R; ++r) c[r][i] = V16::set1(rw.q[r][d + i]).fma(k, c[r][i]);
      }
    for (int r = 0; r < R; ++r) {
      const uint32_t keep = slots(j0, rw.lo[r], rw.pos[r]);
      const V16 x = ((c[r][0] + c[r][1]) + (c[r][2] + c[r][3])) * V16::set1(scale);
      mxv[r] = mxv[r].max_where(keep, x);
      x.store_where(keep, base + r * n + j0 - lo);              // j0 - lo >= -15
    }
  }
  prefetch_rows(values_at(lo), std::min<int64_t>(n, BS - lo % BS), D,
                sizeof(EV) * std::min<int64_t>(64, D));
  float inv[R];
  for (int r = 0; r < R; ++r) {
    float* sr = base + r * n + (rw.lo[r] - lo);
    const int64_t nr = rw.pos[r] - rw.lo[r] + 1;
    float mx = mxv[r].max();
    if (cap > 0.f) {            // soft-cap (Gemma 2): monotonic, so the max maps to the max
      for (int64_t j = 0; j < nr; ++j) sr[j] = cap * std::tanh(sr[j] / cap);
      mx = cap * std::tanh(mx / cap);
    }
    inv[r] = 1.f / softmax_numerators(sr, nr, mx);
  }
  // The value sums, 16 * ND output dims a pass (64 at most, in registers). ND is a template
  // argument and the rows' key ranges are checked only where some row's range ends, so
  // the loop over a key's rows and dims has no branch in it (one a product, before).
  int64_t all_lo = rw.lo[0], all_pos = rw.pos[0];     // the keys every row reads
  for (int r = 1; r < R; ++r) all_lo = std::max(all_lo, rw.lo[r]), all_pos = std::min(all_pos, rw.pos[r]);
  auto value_pass = [&]<int ND>(int64_t d0) {
    V16 acc[R][ND];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < ND; ++i) acc[r][i] = V16::zero();
    for (int64_t j = lo; j <= pos;) {
      const int64_t b = j / BS, end = std::min(pos + 1, (b + 1) * BS);
      const EV* vb = vc + ((table[b] * KV + kvh) * VR) * D + d0;
      const float* vs = kI8 ? reinterpret_cast<const float*>(vc + ((table[b] * KV + kvh) * VR + BS) * D)
                              + d0 / kVBlock : nullptr;    // int8: this pass's first scale
      if (end <= pos)                        // the next block's rows of this pass
        prefetch_rows(values_at(end) + d0, std::min<int64_t>(BS, pos + 1 - end), D,
                      sizeof(EV) * ND * 16);
      for (; j < end; ++j) {
        const EV* vv = vb + (j - b * BS) * D;
        V16 v[ND];
        for (int i = 0; i < ND; ++i) v[i] = V16::load(vv + 16 * i);
        if constexpr (kI8) {                // a scale per 16 dims: one per register
          const float* sj = vs + (j - b * BS) * (D / kVBlock);
          for (int i = 0; i < ND; ++i) v[i] = v[i] * V16::set1(sj[i]);
        }
        const bool every = R == 1 || (j >= all_lo && j <= all_pos);
        for (int r = 0; r < R; ++r) {
          if (!every && (j < rw.lo[r] || j > rw.pos[r])) continue;   // not one of its keys
          const V16 p = V16::set1(base[r * n + j - lo]);
          for (int i = 0; i < ND; ++i) acc[r][i] = p.fma(v[i], acc[r][i]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < ND; ++i) (acc[r][i] * V16::set1(inv[r])).store(rw.o[r] + d0 + 16 * i);
  };
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    switch (std::min<int64_t>(64, D - d0) / 16) {
      case 4: value_pass.template operator()<4>(d0); break;
      case 3: value_pass.template operator()<3>(d0); break;
      case 2: value_pass.template operator()<2>(d0); break;
      default: value_pass.template operator()<1>(d0); break;
    }
  }
}

template <typename EK, typename EV>
using AttendFn = void (*)(const AttnRows&, const EK*, const EV*, const int64_t*, int64_t, int64_t,
                          int64_t, int64_t, float, float, std::vector<float>&);

// Rows a call takes: 6 keep the scores' and the values' accumulators (4 registers a row) in
// AVX-512's 32 registers; AVX2's 16 hold fewer, so there a call takes one token's heads
// (at most 4), as before. A prefill token's heads go with the next tokens' while they fit.
#if defined(__AVX512F__)
constexpr int64_t kAttnRows = kAttnMaxRows;
#else
constexpr int64_t kAttnRows = 4;
#endif

// nt consecutive tokens of one sequence (positions pos0 .., queries qv and outputs ov a row
// qstride apart) and the G heads of KV head kvh: heads by fours, and as many tokens at a time
// as the rows allow.
template <typename EK, typename EV>
void attend_tokens(int64_t nt, int64_t G, const float* qv, int64_t qstride, float* ov,
                   const EK* kc, const EV* vc, const int64_t* table, int64_t BS, int64_t KV,
                   int64_t kvh, int64_t D, int64_t pos0, int64_t window, float scale, float cap,
                   bool cold, std::vector<float>& sc) {
  static const AttendFn<EK, EV> fns[kAttnMaxRows] = {
      attend_rows<EK, EV, 1>, attend_rows<EK, EV, 2>, attend_rows<EK, EV, 3>,
      attend_rows<EK, EV, 4>, attend_rows<EK, EV, 5>, attend_rows<EK, EV, 6>};
  for (int64_t g = 0; g < G; g += 4) {
    const int64_t hg = std::min<int64_t>(4, G - g);
    const int64_t per = std::max<int64_t>(1, kAttnRows / hg);    // tokens a call
    for (int64_t t = 0; t < nt; t += per) {
      AttnRows rw;
      rw.cold = cold;
      int R = 0;
      for (int64_t u = t; u < std::min(nt, t + per); ++u)
        for (int64_t h = g; h < g + hg; ++h, ++R) {
          rw.q[R] = qv + u * qstride + h * D;
          rw.o[R] = ov + u * qstride + h * D;
          rw.pos[R] = pos0 + u;
          rw.lo[R] = window > 0 ? std::max<int64_t>(0, pos0 + u - window + 1) : 0;
        }
      fns[R - 1](rw, kc, vc, table, BS, KV, kvh, D, scale, cap, sc);
    }
  }
}

thread_local std::vector<int64_t> t_row_seq;  // the calling thread's row -> sequence map
thread_local std::vector<float> t_scores;      // each thread's attention scores

// out: (T, H, D) f32, contiguous; every row is written (rows of no sequence get zeros).
void paged_attention_into(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor tables,
                          torch::Tensor meta, double scale, int64_t window, double softcap,
                          torch::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.dtype() == torch::kFloat32 && kc.dim() == 4,
              "attention: q must be (T, H, D) f32");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.dtype() == torch::kFloat32,
              "attention: out must be like q");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KV = kc.size(1), S = meta.size(0), maxb = tables.size(1);
  const int64_t BS = check_kv_cache(kc, vc, KV, D, "attention");
  TORCH_CHECK(H % KV == 0, "attention: bad head shapes");
  const float* qp = q.data_ptr<float>();
  const auto st = vc.scalar_type();           // float32, int8 (float16 keys) or float16
  const void *kp = kc.data_ptr(), *vp = vc.data_ptr();
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
    const int64_t tile = std::max<int64_t>(1, kAttnRows / std::min<int64_t>(4, G));
    // KV head by KV head, so that a thread's next run reads the keys its last one read (a
    // long context's K and V of all heads do not fit a core's L2; one head's often do)
#pragma omp for schedule(dynamic, 2)
    for (int64_t tk = 0; tk < T * KV; ++tk) {  // a run of `tile` tokens from each tile's first
      const int64_t t = tk % T, kvh = tk / T, s = row_seq[t];
      if (s < 0) continue;
      const int64_t q_start = mp[3 * s], q_len = mp[3 * s + 1], ctx = mp[3 * s + 2];
      if ((t - q_start) % tile) continue;
      const int64_t nt = std::min(tile, q_start + q_len - t);
      const int64_t pos = ctx - q_len + (t - q_start);
      const int64_t at = (t * H + kvh * G) * D;  // heads kvh * G .. read KV head kvh
      // a decode row (and its drafts), or a chunk's first run: its context is in memory
      const bool cold = q_len <= kColdTokens || t - q_start < tile;
      if (st == torch::kFloat32)
        attend_tokens(nt, G, qp + at, H * D, op + at, static_cast<const float*>(kp),
                      static_cast<const float*>(vp), tp + s * maxb, BS, KV, kvh, D, pos, window,
                      (float)scale, (float)softcap, cold, sc);
      else if (st == torch::kChar)
        attend_tokens(nt, G, qp + at, H * D, op + at, static_cast<const uint16_t*>(kp),
                      static_cast<const int8_t*>(vp), tp + s * maxb, BS, KV, kvh, D, pos, window,
                      (float)scale, (float)softcap, cold, sc);
      else
        attend_tokens(nt, G, qp + at, H * D, op + at, static_cast<const uint16_t*>(kp),
                      static_cast<const uint16_t*>(vp), tp + s * maxb, BS, KV, kvh, D, pos,
                      window, (float)scale, (float)softcap, cold, sc);
    }
  }
}

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc,
                              torch::Tensor tables, torch::Tensor meta, double scale,
                              int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3, "attention: q must be (T, H, D) f32");
  auto out = torch::empty_like(q);
  paged_attention_into(q, kc, vc, tables, meta, scale, window, softcap, out);
  return out;
}

// ---- log-probabilities ----------------------------------------------------------------
// For one row of raw logits: its max, log(sum(exp(x - max))), and how many entries exceed
// x[token] (so a log-probability is (x - max) - logsum, as log_softmax computes it, and the
// token's rank is one more than the count), in two vector passes and no (vocab,) temporary.
// The sum is kept in double, 8 lanes in a fixed order, then the lanes in a fixed tree. A NaN
// anywhere, an infinite max or all -inf gives a NaN logsum.
