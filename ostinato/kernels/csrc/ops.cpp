// Batch-invariant CPU kernels for Ostinato.
//
// Every output element is computed by one thread with a reduction order fixed by the
// weight layout alone: never by the batch size, the row's position in the batch, the
// thread count or how a prompt was chunked. So a request's logits are bit-identical
// alone or among 64 others.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <sys/syscall.h>
#include <unistd.h>
#include <tuple>
#include <type_traits>
#include <vector>


// One translation unit (one compile of torch's headers), one file per kernel family:
#include "quant.h"        // weight layouts, AVX tiles, int16 activations
#include "amx.h"          // AMX tiles for 5+ rows
#include "amx_bf16.h"     // AMX bfloat16 tiles (--prompt-bf16, --dtype bfloat16)
#include "panels.h"       // weight panels for many rows, without AMX (AVX-512 or AVX2)
#include "qlinear.h"      // the quantized matmul's entry point
#include "norm_rope.h"    // RMSNorm; q/k norm + rotary + KV-cache write
#include "activation.h"   // SiLU / tanh-GELU gating
#include "moe.h"          // routed experts
#include "attention.h"    // paged attention over the float16 cache
#include "logprobs.h"     // log-probabilities and greedy picks from logits
#include "executor.h"     // the static plan: replays the recorded decoder

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear);
  m.def("amx_available", [] { return amx_permitted(); });
  m.def("amx_bf16_available", [] { return amx_bf16_permitted(); });
  m.def("qlinear_rows", [](torch::Tensor x, const QW& w, torch::Tensor bf16_rows) {
    TORCH_CHECK(bf16_rows.dtype() == torch::kUInt8 && bf16_rows.dim() == 1 &&
                bf16_rows.is_contiguous() && bf16_rows.numel() == x.size(0),
                "qlinear_rows: a (M,) uint8 row mask");
    auto out = torch::empty({x.size(0), w.N}, x.options());
    w.into(x, out, 1, bf16_rows.data_ptr<uint8_t>());
    return out;
  });
  // out = x . w^T into a given (M, N) float32 tensor (a buffer kept across steps: the LM
  // head's logits); a packed weight (QW.pack_bf16) takes every row on the bfloat16 tiles.
  m.def("linear_into", [](torch::Tensor x, const QW& w, torch::Tensor out, int64_t quant) {
    thread_local std::vector<uint8_t> ones;
    const uint8_t* rows = nullptr;
    if (w.bf16.defined()) {
      if ((int64_t)ones.size() < x.size(0)) ones.assign(x.size(0), 1);
      rows = ones.data();
    }
    w.into(x, out, quant, rows);
  }, py::call_guard<py::gil_scoped_release>());
  m.def("scratch_growths", [] { return g_scratch_growths.load(); });
  m.def("logprob_stats", &logprob_stats);
  m.def("greedy_rows", &greedy_rows);
  m.def("held_greedy_rows", &held_greedy_rows);
  m.def("set_amx", [](bool on, int64_t min_rows) { g_amx_enabled = on; g_amx_min_rows = min_rows; });
  m.def("amx_settings", [] { return std::make_tuple(g_amx_enabled, g_amx_min_rows); });
  m.def("panel_isa", [] { return std::string(PanelIsa::kName); });
  m.def("set_panels", [](bool on, int64_t min_rows) { g_panels_enabled = on; g_panel_min_rows = min_rows; });
  m.def("panel_settings", [] { return std::make_tuple(g_panels_enabled, g_panel_min_rows); });
  m.def("set_panel_fused", [](int64_t rows) {
    TORCH_CHECK(rows >= 0 && rows <= PanelIsa::kFusedRows, "set_panel_fused: 0 ..", PanelIsa::kFusedRows);
    g_fused_rows = rows;
  });
  m.def("rms_norm", &rms_norm);
  m.def("qkv_rope_cache", &qkv_rope_cache);
  m.def("gated_act", &gated_act);
  m.def("paged_attention", &paged_attention);
  m.def("moe", &moe);
  py::class_<QW>(m, "QW").def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                       torch::Tensor, int64_t, int64_t, int64_t, int64_t, int64_t>())
      .def("pack_bf16", &QW::pack_bf16)
      .def_property_readonly("packed_bytes", [](const QW& w) {
        return w.bf16.defined() ? w.bf16.numel() * 2 : int64_t{0}; })
      .def_property_readonly("packed", [](const QW& w) { return w.bf16; });  // tests
  py::class_<Executor>(m, "Executor")
      .def(py::init<std::vector<int64_t>>())
      .def("view", &Executor::view)
      .def("add_op", &Executor::add_op)
      .def("set_output", &Executor::set_output)
      .def("forward", &Executor::forward, py::call_guard<py::gil_scoped_release>())
      .def("reserve", &Executor::reserve, py::call_guard<py::gil_scoped_release>())
      .def("use_bf16_rows", &Executor::use_bf16_rows)
      .def("set_bf16_rows", &Executor::set_bf16_rows)
      .def("set_profile", &Executor::set_profile)
      .def("profile", &Executor::profile)
      .def("num_ops", &Executor::num_ops)
      .def("buffer_widths", &Executor::buffer_widths);
}
