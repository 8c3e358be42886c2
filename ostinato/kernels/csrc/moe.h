// Routed experts (Mixtral, Qwen3-MoE): per token, a softmax over the router's logits, the
// top k experts (ties to the lower index), their weights renormalised to sum 1 (when norm),
// and the weighted sum of those experts' gated MLPs, added in pick order.
//
// Batch invariance: each expert's matmuls run over the rows that picked it, and a matmul's
// output row depends on its input row alone (qlinear), so a token's result never depends on
// which other tokens picked the same expert; its k results are summed in its own pick order.
// Scratch is per calling thread and only grows (moe_reserve sizes it for the plan).
// Part of ops.cpp's one translation unit, after qlinear.h, activation.h and executor's QW.
#pragma once

struct MoeScratch {
  std::vector<float> logits, wts, xg, gu, up, act, yg, y;
  std::vector<int64_t> pick, rows;
};
thread_local MoeScratch t_moe;

// Grows the calling thread's scratch for steps of up to T tokens.
inline void moe_reserve(int64_t T, int64_t E, int64_t k, int64_t d, int64_t F) {
  MoeScratch& s = t_moe;
  const int64_t R = T * k;          // at most T rows per expert, T * k results in all
  grow(s.logits, T * E); grow(s.wts, R); grow(s.pick, R); grow(s.rows, T);
  grow(s.xg, T * d); grow(s.gu, T * 2 * F); grow(s.up, T * F); grow(s.act, T * F);
  grow(s.yg, T * d); grow(s.y, R * d);
}

inline torch::Tensor rows_of(float* p, int64_t n, int64_t w) {
  return torch::from_blob(p, {n, w}, torch::dtype(torch::kFloat32));
}

// The softmax over one token's E logits, its top k (pick order) and their weights.
inline void route_token(const float* l, int64_t E, int64_t k, bool norm, int64_t* pick,
                        float* wts) {
  float mx = l[0];
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) sum += std::exp(l[e] - mx);
  float picked = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= pick[i] == e;
      if (!taken && (best < 0 || l[e] > l[best])) best = e;
    }
    pick[j] = best;
    wts[j] = std::exp(l[best] - mx) / sum;
    picked += wts[j];
  }
  if (norm)
    for (int64_t j = 0; j < k; ++j) wts[j] /= picked;
}

// x: (T, d) -> out: (T, d). gate_up[e]: the expert's gate|up stacked (up empty), or its gate
// with up[e] separate; down[e]: (d, F).
void moe_into(torch::Tensor x, const QW& router, const std::vector<QW>& gate_up,
              const std::vector<QW>& up, const std::vector<QW>& down, int64_t k, int64_t norm,
              int64_t gelu, int64_t quant, torch::Tensor out) {
  const int64_t T = x.size(0), d = x.size(1), E = router.N;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.sizes() == x.sizes() &&
              out.is_contiguous() && router.K == d, "moe: x and out must be (T, d) f32");
  TORCH_CHECK((int64_t)gate_up.size() == E && (int64_t)down.size() == E &&
              (up.empty() || (int64_t)up.size() == E) && k >= 1 && k <= E,
              "moe: one gate(|up) and down weight per expert, 1 <= k <= experts");
  const int64_t F = down[0].K;
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(gate_up[e].K == d && gate_up[e].N == (up.empty() ? 2 * F : F) &&
                down[e].K == F && down[e].N == d && (up.empty() || (up[e].K == d && up[e].N == F)),
                "moe: expert ", e, " has the wrong shapes");
  if (T == 0) return;
  moe_reserve(T, E, k, d, F);
  MoeScratch& s = t_moe;
  router.into(x, rows_of(s.logits.data(), T, E), quant);
  for (int64_t t = 0; t < T; ++t)
    route_token(s.logits.data() + t * E, E, k, norm != 0, s.pick.data() + t * k, s.wts.data() + t * k);
  const float* xp = x.data_ptr<float>();
  for (int64_t e = 0; e < E; ++e) {
    int64_t n = 0;                       // the results (token * k + j) that expert e computes
    for (int64_t r = 0; r < T * k; ++r)
      if (s.pick[r] == e) s.rows[n++] = r;
    if (!n) continue;
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(s.xg.data() + i * d, xp + (s.rows[i] / k) * d, d * sizeof(float));
    const torch::Tensor xg = rows_of(s.xg.data(), n, d);
    if (up.empty()) {
      gate_up[e].into(xg, rows_of(s.gu.data(), n, 2 * F), quant);
      gated_act_rows(s.gu.data(), 2 * F, s.gu.data() + F, 2 * F, n, F, gelu != 0, s.act.data());
    } else {
      gate_up[e].into(xg, rows_of(s.gu.data(), n, F), quant);
      up[e].into(xg, rows_of(s.up.data(), n, F), quant);
      gated_act_rows(s.gu.data(), F, s.up.data(), F, n, F, gelu != 0, s.act.data());
    }
    down[e].into(rows_of(s.act.data(), n, F), rows_of(s.yg.data(), n, d), quant);
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(s.y.data() + s.rows[i] * d, s.yg.data() + i * d, d * sizeof(float));
  }
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float* o = op + t * d;
    for (int64_t j = 0; j < k; ++j) {
      const float w = s.wts[t * k + j];
      const float* y = s.y.data() + (t * k + j) * d;
      for (int64_t i = 0; i < d; ++i) o[i] = j ? o[i] + w * y[i] : w * y[i];
    }
  }
}

torch::Tensor moe(torch::Tensor x, const QW& router, const std::vector<QW>& gate_up,
                  const std::vector<QW>& up, const std::vector<QW>& down, int64_t k, int64_t norm,
                  int64_t gelu, int64_t quant) {
  TORCH_CHECK(x.dim() == 2, "moe: x must be (T, d) f32");
  auto out = torch::empty_like(x);
  moe_into(x.contiguous(), router, gate_up, up, down, k, norm, gelu, quant, out);
  return out;
}
