// The static plan's executor: replays the op list that kernels/plan.py recorded from the
// Python decoder (model/transformer.py), in one call per step with the GIL released. The
// decoder is written once; this file knows ops, not models, so a new family needs no C++.
// Every value is a (T, width) float32 matrix in a workspace buffer sized once for the
// largest step (`reserve`); the kernels' scratch was grown to the same size, so a step
// allocates no tensor storage and no scratch (tests/test_plan.py counts both).
// Part of ops.cpp's one translation unit.
#pragma once

// out row t = a row t + b (a row vector: a bias), or a * s: plain float arithmetic, so the
// eager backend's torch `x + b` and `x * s` give the same bits
inline void bias_into(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& out) {
  const int64_t T = a.size(0), W = a.size(1);
  TORCH_CHECK(b.numel() == W && b.is_contiguous() && b.dtype() == torch::kFloat32, "bias: width");
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < W; ++i) op[t * W + i] = ap[t * W + i] + bp[i];
}

inline void scale_into(const torch::Tensor& a, float s, const torch::Tensor& out) {
  const float* ap = a.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0, n = a.numel(); i < n; ++i) op[i] = ap[i] * s;
}

// out = a + b elementwise (all contiguous, one shape; out may be a): what torch's add
// computes, without its dispatch (a few us, twice per layer, is a few % of a batch-1 step)
inline void add_into(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& out) {
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = a.numel();
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) op[i] = ap[i] + bp[i];
}

// out row t = the rows t of views[args[0..n)] side by side (no allocation in the step)
inline void concat_into(const std::vector<torch::Tensor>& views, const std::vector<int64_t>& args,
                        size_t n, const torch::Tensor& out) {
  const int64_t T = out.size(0), W = out.size(1);
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    int64_t col = 0;
    for (size_t j = 0; j < n; ++j) {
      const torch::Tensor& a = views[args[j]];
      const int64_t w = a.size(1);
      std::memcpy(op + t * W + col, a.data_ptr<float>() + t * w, w * sizeof(float));
      col += w;
    }
  }
}

enum class OpKind { kLinear, kConcat, kNorm, kAdd, kGated, kQkvRope, kAttention, kBias, kScale,
                    kMoe };

struct ExecOp {
  OpKind kind;
  std::vector<int64_t> views;          // the arguments' views, then the output's
  std::vector<QW> w;
  std::vector<torch::Tensor> t;
  std::vector<int64_t> i;
  std::vector<double> f;
  int64_t stage;
  std::vector<QW> gate_up, up, down;   // moe: w[1:] split once per expert kind (add_op)
};

// Adds the time since the previous lap to a stage (when profiling).
class Stopwatch {
 public:
  explicit Stopwatch(std::vector<double>* into) : into_(into), t_(now()) {}
  void lap(int64_t stage) {
    if (!into_) return;
    const double t = now();
    (*into_)[stage] += t - t_;
    t_ = t;
  }

 private:
  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  std::vector<double>* into_;
  double t_;
};

class Executor {
 public:
  // widths: each workspace buffer's columns; buffer 0 receives the step's input
  explicit Executor(std::vector<int64_t> widths) : widths_(std::move(widths)) {
    TORCH_CHECK(!widths_.empty(), "Executor: no buffers");
  }

  // A view of buffer `buf` as (T, width) or, with heads > 0, (T, heads, width / heads);
  // returns its id (the same id for the same view).
  int64_t view(int64_t buf, int64_t heads) {
    TORCH_CHECK(buf >= 0 && buf < (int64_t)widths_.size() && heads >= 0 &&
                (heads == 0 || widths_[buf] % heads == 0), "Executor.view: bad view");
    for (size_t v = 0; v < specs_.size(); ++v)
      if (specs_[v] == std::make_pair(buf, heads)) return (int64_t)v;
    specs_.emplace_back(buf, heads);
    return (int64_t)specs_.size() - 1;
  }

  void add_op(const std::string& kind, std::vector<int64_t> views, std::vector<QW> w,
              std::vector<torch::Tensor> t, std::vector<int64_t> i, std::vector<double> f,
              const std::string& stage) {
    static const std::map<std::string, std::tuple<OpKind, size_t, size_t, size_t, size_t>> kinds = {
        // kind: views (at least), weights, tensors, ints
        {"linear", {OpKind::kLinear, 2, 1, 0, 1}},  {"concat", {OpKind::kConcat, 2, 0, 0, 0}},
        {"norm", {OpKind::kNorm, 2, 0, 1, 0}},      {"add", {OpKind::kAdd, 3, 0, 0, 0}},
        {"gated", {OpKind::kGated, 2, 0, 0, 1}},    {"qkv_rope", {OpKind::kQkvRope, 2, 0, 4, 4}},
        {"attention", {OpKind::kAttention, 2, 0, 2, 2}}, {"bias", {OpKind::kBias, 2, 0, 1, 0}},
        {"scale", {OpKind::kScale, 2, 0, 0, 0}},    {"moe", {OpKind::kMoe, 2, 4, 0, 6}}};
    const auto it = kinds.find(kind);
    TORCH_CHECK(it != kinds.end(), "Executor: unknown op ", kind);
    const auto [k, nv, nw, nt, ni] = it->second;
    // moe: the router, then per expert gate|up (or gate and up), then per expert down
    const bool ok_w = k == OpKind::kMoe ? w.size() >= nw && i.size() == ni &&
                      w.size() == 1 + (size_t)i[0] * (i[5] ? 3 : 2) : w.size() == nw;
    TORCH_CHECK(views.size() >= nv && ok_w && t.size() == nt && i.size() == ni,
                "Executor: wrong arguments for ", kind);
    for (int64_t v : views) TORCH_CHECK(v >= 0 && v < (int64_t)specs_.size(), "Executor: view");
    int64_t s = std::find(stages_.begin(), stages_.end(), stage) - stages_.begin();
    if (s == (int64_t)stages_.size()) stages_.push_back(stage);
    ops_.push_back({k, std::move(views), std::move(w), std::move(t), std::move(i), std::move(f), s});
    if (k == OpKind::kMoe) split_experts(ops_.back());
  }

  void set_output(int64_t view) {
    TORCH_CHECK(view >= 0 && view < (int64_t)specs_.size(), "Executor: output view");
    out_ = view;
  }

  // Workspace for steps of up to max_tokens tokens, and the calling thread's (and its
  // worker threads') kernel scratch for them, with up to max_context keys per query. Call it
  // at start-up on the thread that will run the steps.
  void reserve(int64_t max_tokens, int64_t max_context) {
    TORCH_CHECK(!ops_.empty() && out_ >= 0 && max_tokens >= 1 && max_context >= 1,
                "Executor.reserve: no ops, no output or bad sizes");
    const std::lock_guard<std::mutex> not_during_a_step(step_);
    ensure(max_tokens);
    int64_t K = 0;
    for (const ExecOp& op : ops_) {
      for (const QW& w : op.w) K = std::max(K, w.K);
      if (op.kind == OpKind::kMoe)
        moe_reserve(max_tokens, op.w[0].N, op.i[1], op.w[0].K, op.w.back().K);
    }
    const int64_t nb = K / 32, M = max_tokens;
    grow(t_qact.q, M * K); grow(t_qact.dt, nb * (M + 4)); grow(t_qact.fsumt, nb * (M + 4));
    grow(t_row_seq, M);
    grow(t_xtiles, x_tile_ints(M, K));
#ifdef OSTINATO_AMX
    alloc_amx(M, K, true, t_amx);
#endif
    if (bf16_rows_on_) {
      int64_t N = 0;
      for (const ExecOp& op : ops_) for (const QW& w : op.w) N = std::max(N, w.N);
      grow(t_split_rows, M); grow(t_split_x, M * K); grow(t_split_out, M * N);
#ifdef OSTINATO_AMX_BF16
      grow(t_bf_x, bf16_x_elems(M, K));
#endif
    }
#pragma omp parallel
    {
#ifdef OSTINATO_AMX
      grow(t_wbuf, 16 * K);
      grow(t_amx_stage, stage_floats(M));     // an LM head's output (outside the plan)
#endif
#ifdef OSTINATO_AMX_BF16
      if (bf16_rows_on_) grow(t_bf_w, 32 * K);
#endif
      grow(t_scores, 32 + 4 * max_context);
      grow(t_panel_rows, kPanelRows * K);
      grow(t_panel, kPanelRows * K / 2);
      grow(t_panel_vals, panel_vals_floats(K));
    }
  }

  // x: (T, width of buffer 0) f32; cos/sin: per rotary variant; slots/tables: per KV group.
  // Returns the output view: valid until the next step.
  torch::Tensor forward(torch::Tensor x_in, std::vector<torch::Tensor> cos,
                        std::vector<torch::Tensor> sin, std::vector<torch::Tensor> slots,
                        std::vector<torch::Tensor> tables, torch::Tensor meta) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == widths_[0] && x_in.is_contiguous() &&
                x_in.dtype() == torch::kFloat32, "Executor.forward: x must be (T, width) f32");
    const std::lock_guard<std::mutex> one_step_at_a_time(step_);   // the workspace is shared
    const int64_t T = x_in.size(0);
    ensure(T);
    views_.clear();
    for (const auto& [buf, heads] : specs_) {
      torch::Tensor v = bufs_[buf].narrow(0, 0, T);
      views_.push_back(heads ? v.view({T, heads, widths_[buf] / heads}) : v);
    }
    bufs_[0].narrow(0, 0, T).copy_(x_in);
    const torch::Tensor rows = std::move(bf16_rows_);     // this step's only
    bf16_rows_ = torch::Tensor();
    TORCH_CHECK(!rows.defined() || rows.numel() == T, "Executor.forward: bf16 rows for ",
                rows.defined() ? rows.numel() : 0, " tokens, the step has ", T);
    bf16_ = rows.defined() ? rows.data_ptr<uint8_t>() : nullptr;
    Stopwatch sw(profile_ ? &seconds_ : nullptr);
    for (const ExecOp& op : ops_) {
      run(op, T, cos, sin, slots, tables, meta);
      sw.lap(op.stage);
    }
    return views_[out_];
  }

  // `--prompt-bf16`, `--dtype bfloat16`: the next forward's rows with a 1 in `rows` ((T,)
  // uint8) take the bfloat16 tiles in every dense matmul (routed experts stay on the int16
  // path). use_bf16_rows(true) before reserve() sizes the scratch for it; packed: every dense
  // weight converted for the tiles now, once, rather than in each call (same bits).
  void use_bf16_rows(bool on, bool packed) {
    TORCH_CHECK(!on || amx_bf16_permitted(), "bfloat16 rows need AMX-BF16 (this CPU has none)");
    TORCH_CHECK(on || !packed, "Executor.use_bf16_rows: packed weights are for bfloat16 rows");
    bf16_rows_on_ = on;
    if (packed)
      for (ExecOp& op : ops_)
        if (op.kind == OpKind::kLinear) op.w[0].pack_bf16();
  }
  void set_bf16_rows(torch::Tensor rows) {
    TORCH_CHECK(bf16_rows_on_, "Executor.set_bf16_rows: use_bf16_rows(true) first");
    TORCH_CHECK(rows.dtype() == torch::kUInt8 && rows.dim() == 1 && rows.is_contiguous(),
                "Executor.set_bf16_rows: a (T,) uint8 tensor");
    bf16_rows_ = rows;
  }

  // Seconds spent in each stage since profiling was switched on (for `bench`).
  void set_profile(bool on) { profile_ = on; seconds_.assign(stages_.size(), 0.0); }
  std::map<std::string, double> profile() const {
    std::map<std::string, double> out;
    for (size_t i = 0; i < stages_.size() && i < seconds_.size(); ++i) out[stages_[i]] += seconds_[i];
    return out;
  }
  int64_t num_ops() const { return ops_.size(); }
  std::vector<int64_t> buffer_widths() const { return widths_; }

 private:
  void run(const ExecOp& op, int64_t T, const std::vector<torch::Tensor>& cos,
           const std::vector<torch::Tensor>& sin, const std::vector<torch::Tensor>& slots,
           const std::vector<torch::Tensor>& tables, const torch::Tensor& meta) {
    const torch::Tensor& out = views_[op.views.back()];
    const torch::Tensor& a = views_[op.views[0]];
    switch (op.kind) {
      case OpKind::kLinear: op.w[0].into(a, out, op.i[0], bf16_); break;
      case OpKind::kConcat:
        concat_into(views_, op.views, op.views.size() - 1, out);   // the last view is out
        break;
      case OpKind::kNorm: rms_norm_into(a, op.t[0], op.f.at(0), out); break;
      case OpKind::kAdd: add_into(a, views_[op.views[1]], out); break;
      case OpKind::kGated: {
        const int64_t F = out.size(1);
        gated_act_rows(a.data_ptr<float>(), 2 * F, a.data_ptr<float>() + F, 2 * F, T, F,
                       op.i[0] != 0, out.data_ptr<float>());   // the halves of gate|up
        break;
      }
      case OpKind::kQkvRope: {
        const bool rotary = op.i[0] >= 0;      // -1: a layer without rotary
        qkv_rope_cache_into(a, op.t[0], op.t[1], op.f.at(0), rotary ? cos.at(op.i[0]) : empty_,
                            rotary ? sin.at(op.i[0]) : empty_, op.i[1], op.i[2], op.t[2], op.t[3],
                            slots.at(op.i[3]), out);
        break;
      }
      case OpKind::kAttention:
        paged_attention_into(a, op.t[0], op.t[1], tables.at(op.i[0]), meta, op.f.at(0), op.i[1],
                             op.f.at(1), out);
        break;
      case OpKind::kBias: bias_into(a, op.t[0], out); break;
      case OpKind::kScale: scale_into(a, (float)op.f.at(0), out); break;
      case OpKind::kMoe: run_moe(op, a, out); break;
    }
  }

  // moe ints: experts, k, norm, gelu, quant, gate and up separate (then 3 weights per expert)
  static void split_experts(ExecOp& op) {
    const auto E = op.i[0];
    const auto first = op.w.begin() + 1, last = op.w.end();
    op.gate_up.assign(first, first + E);
    op.up.assign(first + E, first + (op.i[5] ? 2 * E : E));
    op.down.assign(last - E, last);
  }

  static void run_moe(const ExecOp& op, const torch::Tensor& x, const torch::Tensor& out) {
    moe_into(x, op.w[0], op.gate_up, op.up, op.down, op.i[1], op.i[2], op.i[3], op.i[4], out);
  }

  // every buffer holds at least T rows (growing them is counted like scratch growth)
  void ensure(int64_t T) {
    if (!bufs_.empty() && bufs_[0].size(0) >= T) return;
    g_scratch_growths.fetch_add(1, std::memory_order_relaxed);
    bufs_.clear();
    for (int64_t w : widths_) bufs_.push_back(torch::empty({T, w}, torch::dtype(torch::kFloat32)));
  }

  std::vector<int64_t> widths_;
  bool bf16_rows_on_ = false;
  torch::Tensor bf16_rows_;            // set for the next forward only
  const uint8_t* bf16_ = nullptr;      // this forward's
  std::vector<std::pair<int64_t, int64_t>> specs_;   // (buffer, heads) per view id
  std::vector<ExecOp> ops_;
  std::vector<std::string> stages_;
  std::vector<double> seconds_;
  std::vector<torch::Tensor> bufs_, views_;
  const torch::Tensor empty_ = torch::empty({0});
  int64_t out_ = -1;
  bool profile_ = false;
  std::mutex step_;
};
