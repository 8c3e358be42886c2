// The gated MLP activation (SiLU or tanh-GELU) and the exp it shares with softmax.
// Part of ops.cpp's one translation unit (included there, after the common headers):
// one file per kernel family so that a reader finds the room for what they change.
#pragma once

// Own code, no libm call per score; results depend on x alone.
inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

#if defined(__AVX512F__)
// exp_neg on 16 lanes: the same operations per lane, so the same bits as two exp_neg calls.
inline __m512 exp_neg16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}
#endif

// act(gate) * up, elementwise, 8 at a time with the tail through the same vector code (masked
// loads), so an element's result never depends on where it sits. Both activations are
// x * sigmoid(s): silu has s = x; tanh-gelu has s = 2z, z = sqrt(2/pi) (x + 0.044715 x^3),
// since (1 + tanh z) / 2 = sigmoid(2z). sigmoid(s) = 1 / (1 + e) for s >= 0 and e / (1 + e)
// for s < 0 with e = exp(-|s|), so exp_neg sees no positive argument and no 1 - e cancels.
inline __m256 gated8(__m256 x, __m256 u, bool gelu) {
  __m256 s = x;
  if (gelu) {
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    s = _mm256_mul_ps(_mm256_set1_ps(2 * 0.7978845608028654f),
                      _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
  }
  const __m256 ns = _mm256_or_ps(_mm256_set1_ps(-0.f), s);            // -|s|
  const __m256 e = _mm256_and_ps(exp_neg(ns),                         // exp(-|s|), 0 below -87
                                 _mm256_cmp_ps(ns, _mm256_set1_ps(-87.f), _CMP_GE_OQ));
  const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), s);    // s < 0: x e
  return _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// gated8 on 16 lanes: the same operations per lane (exp_neg16; the blend by s's sign bit), so
// the same bits; twice the elements an instruction.
inline __m512 gated16(__m512 x, __m512 u, bool gelu) {
  __m512 s = x;
  if (gelu) {
    const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    s = _mm512_mul_ps(_mm512_set1_ps(2 * 0.7978845608028654f),
                      _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  }
  const __m512 ns = _mm512_or_ps(_mm512_set1_ps(-0.f), s);            // -|s|
  const __m512 e = _mm512_maskz_mov_ps(                               // exp(-|s|), 0 below -87
      _mm512_cmp_ps_mask(ns, _mm512_set1_ps(-87.f), _CMP_GE_OQ), exp_neg16(ns));
  const __m512 num = _mm512_mask_mul_ps(x, _mm512_movepi32_mask(_mm512_castps_si512(s)), x, e);
  return _mm512_mul_ps(_mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u);
}
constexpr int64_t kActLanes = 16;
#else
constexpr int64_t kActLanes = 8;
#endif

// gate and up: (T, F) rows, each row contiguous (they may be the two halves of one fused
// gate|up product: no copies); out: (T, F) contiguous.
// rows of gate at stride gs, of up at stride us, out contiguous (T, F)
void gated_act_rows(const float* g, int64_t gs, const float* u, int64_t us, int64_t T, int64_t F,
                    bool gelu, float* o) {
  const int64_t chunks = (F + kActLanes - 1) / kActLanes;
#pragma omp parallel for schedule(static) if (T * F >= 8192)   // 16 x 1536: 2 threads pay
  for (int64_t c = 0; c < T * chunks; ++c) {
    const int64_t t = c / chunks, i = (c % chunks) * kActLanes;
    const int64_t left = std::min<int64_t>(kActLanes, F - i);
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    const __mmask16 mask = (__mmask16)((1u << left) - 1);
    const __m512 r = gated16(_mm512_maskz_loadu_ps(mask, g + t * gs + i),
                             _mm512_maskz_loadu_ps(mask, u + t * us + i), gelu);
    _mm512_mask_storeu_ps(o + t * F + i, mask, r);
#else
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 r = gated8(_mm256_maskload_ps(g + t * gs + i, mask),
                            _mm256_maskload_ps(u + t * us + i, mask), gelu);
    _mm256_maskstore_ps(o + t * F + i, mask, r);
#endif
  }
}

void gated_act_into(torch::Tensor gate, torch::Tensor up, int64_t gelu, torch::Tensor out) {
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.stride(1) == 1 &&
              up.stride(1) == 1 && gate.dtype() == torch::kFloat32 && up.dtype() == torch::kFloat32,
              "gated_act: gate and up must be (T, F) f32 with contiguous rows");
  TORCH_CHECK(out.sizes() == gate.sizes() && out.is_contiguous() && out.dtype() == torch::kFloat32,
              "gated_act: out must be (T, F) f32");
  gated_act_rows(gate.data_ptr<float>(), gate.stride(0), up.data_ptr<float>(), up.stride(0),
                 gate.size(0), gate.size(1), gelu != 0, out.data_ptr<float>());
}

torch::Tensor gated_act(torch::Tensor gate, torch::Tensor up, int64_t gelu) {
  TORCH_CHECK(gate.dim() == 2, "gated_act: gate and up must be (T, F) f32 with contiguous rows");
  auto out = torch::empty({gate.size(0), gate.size(1)}, gate.options());
  gated_act_into(gate, up, gelu, out);
  return out;
}

