// qlinear: the quantized matmul entry point, choosing AVX or AMX tiles by batch size.
// Part of ops.cpp's one translation unit (included there, after the common headers):
// one file per kernel family so that a reader finds the room for what they change.
#pragma once

namespace {


thread_local QAct t_qact;                     // the calling thread's quantized activations

// Small batches stay on AVX: a tile product costs the same for 1 x row as for 16. Measured
// on SmolLM2 here, offline tok/s with 4 / 5 / 6 sequences: AVX 283 / 273 / 283, AMX 224 /
// 283 / 348 (AVX prefetching); on its matmuls AMX is 1.6x AVX at 16 rows, 3x from 64.
int64_t g_amx_min_rows = 5;
bool g_amx_enabled = true;
bool use_amx(int64_t M) { return g_amx_enabled && M >= g_amx_min_rows && amx_permitted(); }
// Without AMX, batches from g_panel_min_rows rows run on weight panels (panels.h). SmolLM2
// decode here, ms a step at 2 / 3 / 4 / 5 rows: AVX-512 tiles 10.8 / 12.8 / 14.7 / 20.0,
// panels 10.0 / 10.8 / 11.2 / 13.2; AVX2 (no word unpack) tiles 11.1 / 13.8 / 14.9 / 20.6,
// panels 16.5 / 18.4 / 17.6 / 19.7.
int64_t g_panel_min_rows = PanelIsa::kMinRows;
bool g_panels_enabled = true;
bool use_panels(int64_t M) { return g_panels_enabled && M >= g_panel_min_rows; }

}  // namespace

void qlinear_w(const Weights& w, const float* xp, int64_t M, float* op, int64_t quant_act);

thread_local std::vector<int64_t> t_split_rows;   // bfloat16 rows, then int16 rows
thread_local std::vector<float> t_split_x, t_split_out;

// Rows with bf16_rows[m] set on the bfloat16 tiles (amx_bf16.h), the rest on the int16 path,
// gathered into a contiguous block and scattered back.
void qlinear_split(const Weights& w, const float* xp, int64_t M, float* op,
                   const uint8_t* bf16_rows) {
  TORCH_CHECK(amx_bf16_permitted(), "qlinear: bfloat16 rows need AMX-BF16 (this CPU has none)");
  int64_t* idx = grow(t_split_rows, M);
  int64_t nb = 0;
  for (int64_t m = 0; m < M; ++m) if (bf16_rows[m]) idx[nb++] = m;
  for (int64_t m = 0, i = nb; m < M; ++m) if (!bf16_rows[m]) idx[i++] = m;
  const bool parallel = M * w.N * w.K >= (1 << 18);
  if (nb) qlinear_bf16_rows(w, xp, idx, nb, op, w.N, parallel);
  const int64_t rest = M - nb;
  if (!rest) return;
  if (rest == M) { qlinear_w(w, xp, M, op, 1); return; }
  float* xs = grow(t_split_x, rest * w.K);
  float* os = grow(t_split_out, rest * w.N);
  for (int64_t i = 0; i < rest; ++i) std::memcpy(xs + i * w.K, xp + idx[nb + i] * w.K, w.K * 4);
  qlinear_w(w, xs, rest, os, 1);
  for (int64_t i = 0; i < rest; ++i) std::memcpy(op + idx[nb + i] * w.N, os + i * w.N, w.N * 4);
}

// The Weights view of a repacked weight's tensors (checked against N and K).
Weights weights_of(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& min,
                   const torch::Tensor& scale_d, const torch::Tensor& min_d, int64_t fmt,
                   int64_t bs, int64_t zp, int64_t N, int64_t K) {
  TORCH_CHECK((fmt == kQ8 && (bs == 16 || bs == 32)) || ((fmt == kQ4 || fmt == kQ5 || fmt == kF32) && bs == 32),
              "qlinear: unsupported format/block size");
  TORCH_CHECK(fmt == kF32 || (scale.is_contiguous() && scale.numel() == (N + 3) / 4 * (K / bs) * 4 &&
                              (!min.numel() || min.numel() == scale.numel())),
              "qlinear: scales (and mins) must be (ceil(N/4), K/bs, 4)");
  auto vals = [&](const torch::Tensor& t, const torch::Tensor& d) {
    if (t.numel() && t.scalar_type() == torch::kChar) {        // K-quant: halves x int8
      const int64_t rows = (N + 3) / 4 * 4, nb = K / bs;
      TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous() && d.numel() > 0 &&
                  d.numel() % rows == 0 && nb % (d.numel() / rows) == 0,
                  "qlinear: int8 block scales need (ceil(N/4), super-blocks, 4) halves");
      const int64_t per = nb / (d.numel() / rows);             // blocks a super-block
      TORCH_CHECK((per & (per - 1)) == 0, "qlinear: blocks a super-block must be a power of 2");
      return BlockVals{d.data_ptr(), true, nb, t.data_ptr<int8_t>(), __builtin_ctzll(per)};
    }
    TORCH_CHECK(!t.numel() || t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kHalf,
                "qlinear: scales and mins are float32, float16 or int8 (K-quants)");
    return BlockVals{t.numel() ? t.data_ptr() : nullptr, t.scalar_type() == torch::kHalf, K / bs};
  };
  return Weights{fmt, bs, zp, N, K, K / bs, q.data_ptr(),
                 fmt == kF32 ? BlockVals{} : vals(scale, scale_d), vals(min, min_d)};
}

// x: (M, K) f32 contiguous -> out: (M, N) f32 contiguous
// scale, min: per-block values by fours of rows (float32 or float16); or, for K-quants, int8
// multipliers with scale_d / min_d holding the super-blocks' halves (empty otherwise).
// bf16_rows: rows on the bfloat16 tiles; packed: the weights already converted for them.
void qlinear_into(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min,
                  torch::Tensor scale_d, torch::Tensor min_d, int64_t fmt, int64_t bs, int64_t zp,
                  int64_t N, int64_t K, int64_t quant_act, torch::Tensor out,
                  const uint8_t* bf16_rows = nullptr, const uint16_t* packed = nullptr) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: (M,K) f32");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 &&
              out.size(0) == x.size(0) && out.size(1) == N, "qlinear: out must be (M, N) f32");
  TORCH_CHECK(x.size(1) == K && K % bs == 0, "qlinear: x has the wrong width");
  const int64_t M = x.size(0);
  Weights w = weights_of(q, scale, min, scale_d, min_d, fmt, bs, zp, N, K);
  w.bf16 = packed;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (bf16_rows && quant_act && fmt != kF32) {
    qlinear_split(w, xp, M, op, bf16_rows);
    return;
  }
  qlinear_w(w, xp, M, op, quant_act);
}

// The int16 (or float) path for M rows of x.
void qlinear_w(const Weights& w, const float* xp, int64_t M, float* op, int64_t quant_act) {
  const int64_t N = w.N, K = w.K, fmt = w.fmt, bs = w.bs;
  constexpr int64_t kColChunk = 16;   // weight rows kept hot in cache across row tiles
  const int64_t chunks = (N + kColChunk - 1) / kColChunk;
  // Tiny products are not worth a fork/join (measured: 2^18 gives 47 tok/s batch-1 decode on
  // SmolLM2 here, 2^20 gives 40, 2^22 gives 32).
  const bool parallel = M * N * K >= (1 << 18);
  if (quant_act && fmt != kF32) {
    TORCH_CHECK(K % 32 == 0 && (!w.min || bs == 32),
                "qlinear: quantized activations need K % 32 == 0 and 32-element min blocks");
    if (use_amx(M)) {
      qlinear_amx(w, xp, M, op, parallel);
      return;
    }
    QAct& a = t_qact;
    if (use_panels(M)) {
      quantize_rows(xp, M, K, a, false);
      qlinear_panels(w, a, M, op, parallel);
      return;
    }
    quantize_rows(xp, M, K, a, evens_first(fmt, bs));
    const SpanQaFn span = pick_span_qa(fmt, bs);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n0 = c * kColChunk, n1 = std::min(N, n0 + kColChunk);
      for (int64_t m = 0; m < M; m += kRowTile)
        span((int)std::min<int64_t>(kRowTile, M - m), w, n0, n1, a, m, op + m * N, N);
    }
    return;
  }
  std::vector<float> xs = w.min ? block_sums(xp, M, K, bs) : std::vector<float>();
  const TileFn tile = pick_tile(fmt, bs);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * kColChunk, n1 = std::min(N, n0 + kColChunk);
    for (int64_t m = 0; m < M; m += kRowTile) {
      const int rows = (int)std::min<int64_t>(kRowTile, M - m);
      const float* xsm = w.min ? xs.data() + m * w.nb : nullptr;
      for (int64_t n = n0; n < n1; ++n)
        tile(rows, w, n, xp + m * K, xsm, op + m * N, N);
    }
  }
}

torch::Tensor qlinear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min,
                      torch::Tensor scale_d, torch::Tensor min_d, int64_t fmt, int64_t bs,
                      int64_t zp, int64_t N, int64_t K, int64_t quant_act) {
  TORCH_CHECK(x.dim() == 2, "x: (M,K) f32");
  auto out = torch::empty({x.size(0), N}, x.options());
  qlinear_into(x, q, scale, min, scale_d, min_d, fmt, bs, zp, N, K, quant_act, out);
  return out;
}

// A repacked weight (kernels/backend.py QWeight) as the executor and moe hold it.
struct QW {
  torch::Tensor q, scale, min, scale_d, min_d;
  int64_t fmt, bs, zp, N, K;
  QW(torch::Tensor q, torch::Tensor scale, torch::Tensor min, torch::Tensor scale_d,
     torch::Tensor min_d, int64_t fmt, int64_t bs, int64_t zp, int64_t N, int64_t K)
      : q(q), scale(scale), min(min), scale_d(scale_d), min_d(min_d), fmt(fmt), bs(bs), zp(zp),
        N(N), K(K) {}
  torch::Tensor bf16;                  // the codes as bfloat16 tiles, once pack_bf16() ran
  void into(const torch::Tensor& x, const torch::Tensor& out, int64_t quant,
            const uint8_t* bf16_rows = nullptr) const {
    qlinear_into(x, q, scale, min, scale_d, min_d, fmt, bs, zp, N, K, quant, out, bf16_rows,
                 bf16.defined() ? reinterpret_cast<const uint16_t*>(bf16.data_ptr<int16_t>())
                                : nullptr);
  }
  // Converts the codes for the bfloat16 tiles once (amx_bf16.h); a no-op for float32 weights.
  void pack_bf16() {
    TORCH_CHECK(amx_bf16_permitted(), "QW.pack_bf16: this CPU has no AMX-BF16");
    if (fmt == kF32 || bf16.defined()) return;
    Weights w = weights_of(q, scale, min, scale_d, min_d, fmt, bs, zp, N, K);
    bf16 = torch::empty({packed_bf16_elems(N, K)}, torch::kInt16);
    pack_bf16_into(w, reinterpret_cast<uint16_t*>(bf16.data_ptr<int16_t>()));
  }
};
