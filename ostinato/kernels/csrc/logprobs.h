// Log-probabilities and greedy picks straight from raw logits rows.
// Part of ops.cpp's one translation unit (included there, after the common headers):
// one file per kernel family so that a reader finds the room for what they change.
#pragma once

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
  int64_t count = 0, i = 0;
#if defined(__AVX512F__)
  {   // 16 at a time (a max and a count need no order), the tail 8 at a time below
    __m512 mx16 = _mm512_set1_ps(-INFINITY);
    const __m512 t16 = _mm512_set1_ps(than);
    __mmask16 nan16 = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      nan16 |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      mx16 = _mm512_max_ps(mx16, v);
      count += __builtin_popcount(_mm512_cmp_ps_mask(v, t16, _CMP_GT_OQ));
    }
    mxv = _mm256_max_ps(_mm512_castps512_ps256(mx16), _mm256_castpd_ps(
        _mm512_extractf64x4_pd(_mm512_castps_pd(mx16), 1)));
    if (nan16) nan = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  }
#endif
  for (; i < n; i += 8) {
    const __m256 v = load8_logits(x, i, n);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    mxv = _mm256_max_ps(mxv, v);
    count += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GT_OQ)));
  }
  *above = count;
  alignas(32) float m[8];
  _mm256_store_ps(m, mxv);
  // + 0: a max of zero is +0 whichever zero a lane kept (the 16-lane pass keeps others)
  return _mm256_movemask_ps(nan) ? NAN : *std::max_element(m, m + 8) + 0.f;
}

// log(sum(exp(x - mx))) over n logits (mx finite): exp in 8 lanes, each summed in double in
// a fixed order, then the lanes in a fixed tree.
double log_sum_exp(const float* x, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t i = 0;
#if defined(__AVX512F__)
  {   // 16 exps at once (exp_neg16: exp_neg's bits), added as the two 8s in turn: each lane's
      // sum in the same order
    const __m512 m16 = _mm512_set1_ps(mx);
    for (; i + 16 <= n; i += 16) {
      const __m512 e = exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(x + i), m16));
      const __m256 lo = _mm512_castps512_ps256(e);
      const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1));
      acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(lo)));
      acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1)));
      acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(hi)));
      acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1)));
    }
  }
#endif
  for (; i < n; i += 8) {
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
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n && at < 0; i += 16) {             // the first lane equal to the max
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), _mm512_set1_ps(mx),
                                                 _CMP_EQ_OQ);
        if (hit) at = i + __builtin_ctz(hit);
      }
#endif
      for (; i < n && at < 0; i += 8) {
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

// 8 lanes, all ones where bit k of `byte` is set (token i + k allowed), else zero.
inline __m256 allowed_lanes(uint8_t byte) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(
      _mm256_and_si256(_mm256_set1_epi32(byte), lane_bit), lane_bit));
}

// Greedy choice under a grammar, for each row of (S, vocab) logits and its allowed-token
// bit mask (S, words) int32 (bit t % 32 of word t / 32: token t allowed): the first index of
// the row's largest allowed logit, and, as greedy_rows gives them, the raw row's first argmax
// and log(sum(exp(x - max))) (the chosen token's raw log-probability is then
// (x[pick] - x[top]) - logsum). A row with a NaN, an infinite max or no allowed finite logit
// gets pick -1: the caller takes it the slow way. Three passes over the row (both maxes, both
// first indices, the log-sum-exp); the mask is read as bits: none unpacked, no masked copy.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> held_greedy_rows(torch::Tensor logits,
                                                                         torch::Tensor allowed) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.dtype() == torch::kFloat32,
              "held_greedy_rows: logits must be contiguous (rows, vocab) f32");
  const int64_t S = logits.size(0), n = logits.size(1);
  TORCH_CHECK(allowed.dim() == 2 && allowed.is_contiguous() && allowed.dtype() == torch::kInt32
              && allowed.size(0) == S && allowed.size(1) * 32 >= n,
              "held_greedy_rows: allowed must be contiguous (rows, >= vocab / 32) int32");
  const int64_t words = allowed.size(1);
  auto pick = torch::empty({S}, torch::kInt64), top = torch::empty({S}, torch::kInt64);
  auto logsum = torch::empty({S}, torch::kFloat64);
  const float* x = logits.data_ptr<float>();
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(allowed.data_ptr<int32_t>());
  int64_t *pp = pick.data_ptr<int64_t>(), *tp = top.data_ptr<int64_t>();
  double* lp = logsum.data_ptr<double>();
#pragma omp parallel for schedule(dynamic, 1) if (S > 1 && S * n >= (1 << 17))
  for (int64_t r = 0; r < S; ++r) {
    const float* row = x + r * n;
    const uint8_t* on8 = reinterpret_cast<const uint8_t*>(bits + r * words);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    // one pass: the raw max (NaN if any), the max over the allowed tokens
    __m256 mxv = ninf, okv = ninf, nan = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 v = load8_logits(row, i, n);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      mxv = _mm256_max_ps(mxv, v);
      okv = _mm256_max_ps(okv, _mm256_blendv_ps(ninf, v, allowed_lanes(on8[i / 8])));
    }
    alignas(32) float m[8], k[8];
    _mm256_store_ps(m, mxv);
    _mm256_store_ps(k, okv);
    const float mx = _mm256_movemask_ps(nan) ? NAN : *std::max_element(m, m + 8);
    const float best = *std::max_element(k, k + 8);
    int64_t at = -1, best_at = -1;
    if (std::isfinite(mx) && std::isfinite(best)) {
      // one pass: the first lane equal to the raw max, the first allowed lane equal to best
      const __m256 mb = _mm256_set1_ps(mx), bb = _mm256_set1_ps(best);
      for (int64_t i = 0; i < n && (at < 0 || best_at < 0); i += 8) {
        const __m256 v = load8_logits(row, i, n);
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(v, mb, _CMP_EQ_OQ));
        const int ok = _mm256_movemask_ps(_mm256_and_ps(allowed_lanes(on8[i / 8]),
                                                        _mm256_cmp_ps(v, bb, _CMP_EQ_OQ)));
        if (at < 0 && hit) at = i + __builtin_ctz(hit);
        if (best_at < 0 && ok) best_at = i + __builtin_ctz(ok);
      }
    }
    tp[r] = at;
    pp[r] = at < 0 ? -1 : best_at;
    lp[r] = at < 0 ? NAN : log_sum_exp(row, n, mx);
  }
  return {pick, top, logsum};
}
