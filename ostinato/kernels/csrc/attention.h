// Paged attention over the float16 KV cache, one thread per (token, KV head).
// Part of ops.cpp's one translation unit (included there, after the common headers):
// one file per kernel family so that a reader finds the room for what they change.
#pragma once

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
  static V16 load(const uint16_t* p) {       // 16 float16 values
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static V16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
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
// or however the prompt is cut, so nothing depends on either. E: the cache's element type,
// float16 (uint16_t bits, the default) or float32 (--kv-cache-dtype float32).
template <typename E, int G>
void attend_group(const float* qv, const E* kc, const E* vc, const int64_t* table,
                  int64_t BS, int64_t KV, int64_t kvh, int64_t D, int64_t lo, int64_t pos,
                  float scale, float cap, std::vector<float>& sc, float* o) {
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
  auto prefetch_rows = [](const E* p, int64_t rows, int64_t stride, int64_t bytes) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t at = 0; at < bytes; at += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p + r * stride) + at, _MM_HINT_T0);
  };
  for (int64_t j0 = lo / 16 * 16; j0 <= pos; j0 += 16) {        // 16 slots of one block
    const E* kt = keys_at(j0);
    if (j0 + 16 <= pos) prefetch_rows(keys_at(j0 + 16), D, BS, 16 * sizeof(E));
    V16 c[G][4];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) c[g][i] = V16::zero();
    for (int64_t d = 0; d < D; d += 4)
      for (int i = 0; i < 4; ++i) {
        const V16 k = V16::load(kt + (d + i) * BS);
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
  prefetch_rows(values_at(lo), std::min<int64_t>(n, BS - lo % BS), D,
                sizeof(E) * std::min<int64_t>(64, D));
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float mx = mxv[g].max();
    if (cap > 0.f) {            // soft-cap (Gemma 2): monotonic, so the max maps to the max
      float* sg = base + g * n;
      for (int64_t j = 0; j < n; ++j) sg[j] = cap * std::tanh(sg[j] / cap);
      mx = cap * std::tanh(mx / cap);
    }
    inv[g] = 1.f / softmax_numerators(base + g * n, n, mx);
  }
  constexpr int kDims = 64;                  // output dims kept in registers per pass
  for (int64_t d0 = 0; d0 < D; d0 += kDims) {
    const int nd = (int)std::min<int64_t>(kDims, D - d0) / 16;
    V16 acc[G][kDims / 16];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < kDims / 16; ++i) acc[g][i] = V16::zero();
    for (int64_t j = lo; j <= pos;) {
      const int64_t b = j / BS, end = std::min(pos + 1, (b + 1) * BS);
      const E* vb = vc + ((table[b] * KV + kvh) * BS) * D + d0;
      if (end <= pos)                        // the next block's rows of this pass
        prefetch_rows(values_at(end) + d0, std::min<int64_t>(BS, pos + 1 - end), D,
                      sizeof(E) * nd * 16);
      for (; j < end; ++j) {
        const E* vv = vb + (j - b * BS) * D;
        V16 v[kDims / 16];
        for (int i = 0; i < kDims / 16; ++i) if (i < nd) v[i] = V16::load(vv + 16 * i);
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

template <typename E>
using AttendFn = void (*)(const float*, const E*, const E*, const int64_t*, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t, float, float, std::vector<float>&,
                          float*);

// Heads per KV head: 1..4 together; larger groups go in runs of 4, then the rest.
template <typename E>
void attend_heads(int64_t G, const float* qv, const E* kc, const E* vc,
                  const int64_t* table, int64_t BS, int64_t KV, int64_t kvh, int64_t D,
                  int64_t lo, int64_t pos, float scale, float cap, std::vector<float>& sc,
                  float* o) {
  static const AttendFn<E> fns[4] = {attend_group<E, 1>, attend_group<E, 2>, attend_group<E, 3>,
                                     attend_group<E, 4>};
  for (int64_t g = 0; g < G; g += 4) {
    const int64_t k = std::min<int64_t>(4, G - g);
    fns[k - 1](qv + g * D, kc, vc, table, BS, KV, kvh, D, lo, pos, scale, cap, sc, o + g * D);
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
  const bool f32 = kc.scalar_type() == torch::kFloat32;     // else float16
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
#pragma omp for schedule(dynamic, 2)
    for (int64_t tk = 0; tk < T * KV; ++tk) {
      const int64_t t = tk / KV, kvh = tk % KV, s = row_seq[t];
      if (s < 0) continue;
      const int64_t q_start = mp[3 * s], q_len = mp[3 * s + 1], ctx = mp[3 * s + 2];
      const int64_t pos = ctx - q_len + (t - q_start);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t h0 = kvh * G;             // heads h0 .. h0 + G - 1 read KV head kvh
      if (f32)
        attend_heads(G, qp + (t * H + h0) * D, static_cast<const float*>(kp),
                     static_cast<const float*>(vp), tp + s * maxb, BS, KV, kvh, D, lo, pos,
                     (float)scale, (float)softcap, sc, op + (t * H + h0) * D);
      else
        attend_heads(G, qp + (t * H + h0) * D, static_cast<const uint16_t*>(kp),
                     static_cast<const uint16_t*>(vp), tp + s * maxb, BS, KV, kvh, D, lo, pos,
                     (float)scale, (float)softcap, sc, op + (t * H + h0) * D);
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
