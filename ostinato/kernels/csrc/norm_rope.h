// RMSNorm, and the step between the q|k|v projection and attention: q/k norms, rotary, and k/v into the paged float16 cache.
// Part of ops.cpp's one translation unit (included there, after the common headers):
// one file per kernel family so that a reader finds the room for what they change.
#pragma once

// 1 / sqrt(mean(x^2) + eps) over D floats (D % 8 == 0)
inline float rms_inv(const float* r, int64_t D, float eps) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) {
    __m256 v = _mm256_loadu_ps(r + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  return 1.f / std::sqrt(hsum8(acc) / (float)D + eps);
}

// y = x * w / sqrt(mean(x^2) + eps) for one row of D floats (D % 8 == 0); out may alias r.
inline void rms_row(const float* r, const float* wp, int64_t D, float eps, float* out) {
  const float inv = rms_inv(r, D, eps);
  for (int64_t i = 0; i < D; ++i) out[i] = r[i] * inv * wp[i];
}

// Rotate the first R dimensions of one head in place (the rest pass): neox pairs
// (i, i + R/2), else adjacent pairs (2i, 2i + 1).
inline void rope_head(float* x, const float* cs, const float* sn, int64_t R, bool neox) {
  const int64_t half = R / 2;
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

// The KV cache (kernels/backend.py makes it), per layer K (blocks, KV, D, BS), each block's
// keys transposed, and V (blocks, KV, BS, D), in float16 (the default) or float32; or float16
// keys and int8 values (--kv-cache-dtype int8-values): each (token, KV head) value is D codes
// and a float32 scale per 16 dimensions (kVBlock), code = round(x * 127 / max|x|), value =
// code * (max|x| / 127) over each 16, and a KV head's share of a V block holds its BS rows of
// codes, then its BS * D / 16 scales (slot by slot, in kv_v_extra(BS) = BS / 4 more rows):
// V (blocks, KV, BS + BS / 4, D). One scale per head (256 dimensions in Gemma 3) flipped 2 of
// its 6 greedy completions' first words. (int8 keys were measured and left out: Qwen2.5's
// key channels with outliers cost 3-5 points of top-1.)
// Checks the pair and returns BS.
constexpr int64_t kMaxHeadDim = 1024;
constexpr int64_t kVBlock = 16;              // int8 values: dimensions a scale
inline int64_t kv_v_extra(int64_t BS) { return BS / 4; }   // 4 bytes a 16 dims

int64_t check_kv_cache(const torch::Tensor& kc, const torch::Tensor& vc, int64_t KV, int64_t D,
                       const char* who) {
  const auto sk = kc.scalar_type(), sv = vc.scalar_type();
  TORCH_CHECK(kc.dim() == 4 && vc.dim() == 4 && kc.is_contiguous() && vc.is_contiguous() &&
              ((sk == torch::kHalf && (sv == torch::kHalf || sv == torch::kChar)) ||
               (sk == torch::kFloat32 && sv == torch::kFloat32)), who,
              ": KV caches must be contiguous float16, float32, or float16 keys and int8 values "
              "(blocks, kv_heads, ...)");
  const int64_t BS = kc.size(3), i8 = sv == torch::kChar;
  TORCH_CHECK(kc.size(1) == KV && kc.size(2) == D && vc.size(0) == kc.size(0) &&
              vc.size(1) == KV && vc.size(2) == BS + i8 * kv_v_extra(BS) && vc.size(3) == D &&
              BS % 16 == 0 && D % 16 == 0,
              who, ": KV caches must be K (blocks, kv_heads, head_dim, block_size) and V (blocks, "
              "kv_heads, block_size, head_dim), block_size and head_dim multiples of 16 (int8 "
              "values: with the rows of their scales)");
  return BS;
}

// 127 / amax, or 0 where that is not finite (amax 0, or below 127 / FLT_MAX: such a 16's
// values are all below 4e-37 and read back as 0)
inline float kv_inverse(float amax) {
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  return inv <= FLT_MAX ? inv : 0.f;
}

// int8 values: x (D floats) as codes and a scale per 16 (the formula above; backend.py's
// kv_quantize is the same arithmetic in torch, so a test can hold the two to the bit). A 16
// with a NaN or an infinity gets codes 0 and a NaN scale: it reads back as NaNs, as a
// float16 cache would show them, never as made-up numbers.
inline void kv_quantize(const float* x, int64_t D, int8_t* codes, float* scales) {
  for (int64_t b = 0; b < D; b += kVBlock) {
#if defined(__AVX512F__)
    // one register a 16: the same max (exact in any order), product and rounding (to
    // nearest even, as nearbyint), so the scalar loop's bits
    const __m512 v = _mm512_loadu_ps(x + b), a = _mm512_abs_ps(v);
    const bool finite = _mm512_cmp_ps_mask(a, _mm512_set1_ps(FLT_MAX), _CMP_LE_OQ) == 0xffff;
    const float amax = finite ? _mm512_reduce_max_ps(a) : 0.f;
    const float inv = kv_inverse(amax);
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + b),
                     finite ? _mm512_cvtepi32_epi8(q) : _mm_setzero_si128());
#else
    float amax = 0.f;
    bool finite = true;
    for (int64_t d = b; d < b + kVBlock; ++d) {
      amax = std::max(amax, std::fabs(x[d]));
      finite &= std::isfinite(x[d]);
    }
    const float inv = finite ? kv_inverse(amax) : 0.f;
    for (int64_t d = b; d < b + kVBlock; ++d)
      codes[d] = finite ? (int8_t)std::nearbyint(x[d] * inv) : 0;
#endif
    scales[b / kVBlock] = finite ? amax / 127.f : NAN;
  }
}

// The step between the q|k|v projection and attention, in one pass: split the fused
// projection (T, (H + 2 KV) * D) into heads, RMS-normalise q and k when q_norm / k_norm are
// given (D weights: each head, as Gemma 3 and Qwen3; H*D or KV*D: the whole projection, as
// OLMo 2), rotate the first R dims of each head by the per-token cos/sin tables (T, R/2;
// empty: no rotary, as SmolLM3's every 4th layer), and write k and v (float32, or float16
// rounded to nearest even) into the paged caches at their slots. Returns q as (T, H, D).
void qkv_rope_cache_into(torch::Tensor qkv, torch::Tensor q_norm, torch::Tensor k_norm,
                         double eps, torch::Tensor cos, torch::Tensor sin, int64_t neox,
                         int64_t H, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots,
                         torch::Tensor q) {
  TORCH_CHECK(kc.dim() == 4 && vc.dim() == 4, "qkv_rope_cache: KV caches must be 4-d");
  const int64_t T = qkv.size(0), KV = kc.size(1), D = vc.size(3), W = (H + 2 * KV) * D;
  const int64_t BS = check_kv_cache(kc, vc, KV, D, "qkv_rope_cache");
  TORCH_CHECK(D <= kMaxHeadDim, "qkv_rope_cache: head_dim above ", kMaxHeadDim);
  TORCH_CHECK(qkv.is_contiguous() && qkv.dtype() == torch::kFloat32 && qkv.size(1) == W,
              "qkv_rope_cache: qkv must be (T, (H + 2 KV) * D) f32");
  const int64_t R = cos.numel() ? 2 * cos.size(1) : 0;      // rotated dims per head
  TORCH_CHECK(cos.sizes() == sin.sizes() && (!R || (cos.is_contiguous() && sin.is_contiguous() &&
              cos.dim() == 2 && cos.size(0) == T && R <= D)), "qkv_rope_cache: cos/sin shapes");
  TORCH_CHECK((!q_norm.numel() || q_norm.numel() == D || q_norm.numel() == H * D) &&
              (!k_norm.numel() || k_norm.numel() == D || k_norm.numel() == KV * D),
              "qkv_rope_cache: norm weights must have head_dim or all heads' elements");
  const bool q_all = q_norm.numel() == H * D && H > 1, k_all = k_norm.numel() == KV * D && KV > 1;
  TORCH_CHECK(slots.numel() == T && slots.dtype() == torch::kInt64, "qkv_rope_cache: slots");
  const int64_t n_slots = kc.size(0) * BS;
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(slots.data_ptr<int64_t>()[i] >= 0 && slots.data_ptr<int64_t>()[i] < n_slots,
                "qkv_rope_cache: slot out of range");
  TORCH_CHECK(q.dim() == 3 && q.size(0) == T && q.size(1) == H && q.size(2) == D &&
              q.is_contiguous() && q.dtype() == torch::kFloat32, "qkv_rope_cache: q must be (T, H, D) f32");
  const float *src = qkv.data_ptr<float>();
  const float *cp = R ? cos.data_ptr<float>() : nullptr, *sp = R ? sin.data_ptr<float>() : nullptr;
  const float* qn = q_norm.numel() ? q_norm.data_ptr<float>() : nullptr;
  const float* kn = k_norm.numel() ? k_norm.data_ptr<float>() : nullptr;
  float* qp = q.data_ptr<float>();
  const bool f32 = kc.scalar_type() == torch::kFloat32;     // else float16, rounded to nearest
  const bool i8 = vc.scalar_type() == torch::kChar;         // int8 values and their scales
  const int64_t VR = BS + (i8 ? kv_v_extra(BS) : 0);
  int8_t* vq = static_cast<int8_t*>(vc.data_ptr());
  uint16_t *kp = static_cast<uint16_t*>(kc.data_ptr()), *vp = static_cast<uint16_t*>(vc.data_ptr());
  float *kf = static_cast<float*>(kc.data_ptr()), *vf = static_cast<float*>(vc.data_ptr());
  const int64_t* sl = slots.data_ptr<int64_t>();
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#pragma omp parallel for schedule(static) if (T >= 16)
  for (int64_t t = 0; t < T; ++t) {
    const float* row = src + t * W;
    const float *cs = R ? cp + t * (R / 2) : nullptr, *sn = R ? sp + t * (R / 2) : nullptr;
    const int64_t blk = sl[t] / BS, off = sl[t] % BS;
    // a norm over the whole projection: one scale for all its heads
    const float q_inv = q_all ? rms_inv(row, H * D, (float)eps) : 0.f;
    const float k_inv = k_all ? rms_inv(row + H * D, KV * D, (float)eps) : 0.f;
    float k[kMaxHeadDim];
    alignas(32) uint16_t half[8];
    for (int64_t h = 0; h < H + KV; ++h) {
      float* dst = h < H ? qp + (t * H + h) * D : k;
      const float* nw = h < H ? qn : kn;
      const float* r = row + h * D;
      if (h < H ? q_all : k_all) {
        const float inv = h < H ? q_inv : k_inv;
        const float* wh = nw + (h < H ? h : h - H) * D;
        for (int64_t i = 0; i < D; ++i) dst[i] = r[i] * inv * wh[i];
      } else if (nw) {
        rms_row(r, nw, D, (float)eps, dst);
      } else {
        std::copy(r, r + D, dst);
      }
      if (R) rope_head(dst, cs, sn, R, neox != 0);
      if (h < H) continue;
      const int64_t at = ((blk * KV + (h - H)) * D) * BS + off;    // dimension d at [at + d * BS]
      if (f32) {
        for (int64_t d = 0; d < D; ++d) kf[at + d * BS] = dst[d];
        continue;
      }
      uint16_t* kt = kp + at;
      for (int64_t d = 0; d < D; d += 8) {
        _mm_store_si128(reinterpret_cast<__m128i*>(half), _mm256_cvtps_ph(_mm256_loadu_ps(dst + d), kRne));
        for (int i = 0; i < 8; ++i) kt[(d + i) * BS] = half[i];
      }
    }
    for (int64_t h = 0; h < KV; ++h) {
      const float* v = row + (H + KV + h) * D;
      if (i8) {
        int8_t* head = vq + (blk * KV + h) * VR * D;
        kv_quantize(v, D, head + off * D, reinterpret_cast<float*>(head + BS * D) + off * (D / kVBlock));
        continue;
      }
      if (f32) {
        std::copy(v, v + D, vf + ((blk * KV + h) * BS + off) * D);
        continue;
      }
      uint16_t* vt = vp + ((blk * KV + h) * BS + off) * D;
      for (int64_t d = 0; d < D; d += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(vt + d), _mm256_cvtps_ph(_mm256_loadu_ps(v + d), kRne));
    }
  }
}

torch::Tensor qkv_rope_cache(torch::Tensor qkv, torch::Tensor q_norm, torch::Tensor k_norm,
                             double eps, torch::Tensor cos, torch::Tensor sin, int64_t neox,
                             int64_t H, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots) {
  TORCH_CHECK(kc.dim() == 4 && vc.dim() == 4 && qkv.dim() == 2, "qkv_rope_cache: KV caches must be 4-d, qkv 2-d");
  auto q = torch::empty({qkv.size(0), H, vc.size(3)}, qkv.options());
  qkv_rope_cache_into(qkv, q_norm, k_norm, eps, cos, sin, neox, H, kc, vc, slots, q);
  return q;
}

// exp(x) for x <= 0 (softmax arguments after the max is subtracted), 8 at a time: 2^n * p(r)
// with x = n ln2 + r, |r| <= ln2/2, p a degree-6 Taylor polynomial (relative error ~2e-7).
