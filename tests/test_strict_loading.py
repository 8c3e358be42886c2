"""Strict loading: a GGUF that asks for arithmetic Ostinato does not implement is refused with
one line naming the file, the key or tensor and the value, never run with the request
ignored. Each case rewrites a tiny random-weight file (tests/randmodels.py) with one change."""
from __future__ import annotations

import logging

import gguf
import gguf.quants
import numpy as np
import pytest

from ostinato import LLM, SamplingParams
from ostinato.loader.gguf import GGUFError, read_gguf
from ostinato.model.config import ModelConfig
from plancheck import plan_and_eager
from randmodels import build

T = gguf.GGUFValueType


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    return {f: build(f, root).ggufs["f32"] for f in ("llama", "gemma3_linear_rope")}


def rewrite(src, dst, set_keys=None, drop_keys=(), add_tensors=None, q8_0=()):
    """A copy of the f32 GGUF `src` with keys set ({key: (value, GGUFValueType)}), keys
    dropped, tensors added and the tensors named in q8_0 quantized."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    set_keys = set_keys or {}
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_keys \
                or name in set_keys:
            continue
        sub = f.types[-1] if f.types[0] == T.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    for key, (val, vtype) in set_keys.items():
        sub = T.BOOL if vtype == T.ARRAY else None
        w.add_key_value(key, val, vtype, sub_type=sub)
    for t in r.tensors:
        if t.name in q8_0:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(t.name, gguf.quants.quantize(np.array(t.data), q), raw_dtype=q)
        else:
            w.add_tensor(t.name, np.array(t.data))
    for name, data in (add_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def refused(path, *fragments):
    with pytest.raises(GGUFError) as info:
        LLM(path, max_model_len=64, kv_cache_gb=0.01)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_the_unchanged_copy_loads(files, tmp_path):
    LLM(rewrite(files["llama"], tmp_path / "same.gguf"), max_model_len=64, kv_cache_gb=0.01)


def test_an_unknown_metadata_key_is_refused(files, tmp_path):
    path = rewrite(files["llama"], tmp_path / "softcap.gguf",
                   {"llama.router_logit_softcapping": (30.0, T.FLOAT32)})
    refused(path, "llama.router_logit_softcapping", "30.0", "not implemented")


def test_a_known_feature_at_its_neutral_value_loads(files, tmp_path):
    path = rewrite(files["llama"], tmp_path / "no-experts.gguf",
                   {"llama.expert_count": (0, T.UINT32), "llama.logit_scale": (1.0, T.FLOAT32)})
    LLM(path, max_model_len=64, kv_cache_gb=0.01)


def test_experts_of_an_unimplemented_kind_are_refused(files, tmp_path):
    """Softmax routing is implemented; sigmoid gating (DeepSeek V3's) and shared experts are
    not; experts the metadata promises must be in the file."""
    sigmoid = rewrite(files["llama"], tmp_path / "sigmoid.gguf",
                      {"llama.expert_count": (8, T.UINT32), "llama.expert_used_count": (2, T.UINT32),
                       "llama.expert_gating_func": (2, T.UINT32)})
    refused(sigmoid, "llama.expert_gating_func", "2")
    shared = rewrite(files["llama"], tmp_path / "shared.gguf",
                     {"llama.expert_shared_count": (1, T.UINT32)})
    refused(shared, "llama.expert_shared_count", "1")
    missing = rewrite(files["llama"], tmp_path / "moe.gguf",
                      {"llama.expert_count": (8, T.UINT32), "llama.expert_used_count": (2, T.UINT32)})
    refused(missing, "blk.0.ffn_down.weight", "not used")   # dense tensors where experts should be


def test_an_unimplemented_rope_scaling_is_refused(files, tmp_path):
    path = rewrite(files["llama"], tmp_path / "yarn.gguf",
                   {"llama.rope.scaling.type": ("yarn", T.STRING),
                    "llama.rope.scaling.factor": (4.0, T.FLOAT32)})
    refused(path, "llama.rope.scaling.type", "'yarn'")


def test_a_scaling_factor_is_acted_on_or_refused(files, tmp_path):
    """A factor with no type is linear scaling, as llama.cpp reads it; with type "none" it
    cannot be honoured, so it is refused."""
    bare = rewrite(files["llama"], tmp_path / "factor.gguf",
                   {"llama.rope.scaling.factor": (4.0, T.FLOAT32)})
    assert _config(bare).ropes[0].factor == 4.0
    none = rewrite(files["llama"], tmp_path / "none.gguf",
                   {"llama.rope.scaling.type": ("none", T.STRING),
                    "llama.rope.scaling.factor": (4.0, T.FLOAT32)})
    refused(none, "llama.rope.scaling.factor", "'none'")


def test_rotary_over_part_of_a_head_is_read_and_an_impossible_one_refused(files, tmp_path):
    path = rewrite(files["llama"], tmp_path / "partial.gguf",
                   {"llama.rope.dimension_count": (16, T.UINT32)})
    assert _config(path).ropes[0].dim == 16
    path = rewrite(files["llama"], tmp_path / "wide.gguf",
                   {"llama.rope.dimension_count": (48, T.UINT32)})
    refused(path, "llama.rope.dimension_count", "48")


def test_value_heads_of_another_width_are_refused(files, tmp_path):
    path = rewrite(files["llama"], tmp_path / "vlen.gguf",
                   {"llama.attention.value_length": (64, T.UINT32)})
    refused(path, "llama.attention.value_length", "64")


def test_an_unused_tensor_is_refused(files, tmp_path):
    path = rewrite(files["llama"], tmp_path / "bias.gguf",
                   add_tensors={"blk.0.attn_q.bias": np.ones(128, dtype=np.float32)})
    refused(path, "blk.0.attn_q.bias", "not used")


def test_a_split_file_is_refused(files, tmp_path):
    path = rewrite(files["llama"], tmp_path / "split.gguf", {"split.count": (2, T.UINT16)})
    refused(path, "split.count")


def test_a_missing_tensor_is_refused(files, tmp_path):
    src = gguf.GGUFReader(files["llama"])
    assert any(t.name == "blk.1.ffn_up.weight" for t in src.tensors)
    dst = tmp_path / "missing.gguf"
    w = gguf.GGUFWriter(dst, "llama")
    for name, f in src.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, f.contents(), f.types[0],
                            sub_type=f.types[-1] if f.types[0] == T.ARRAY else None)
    for t in src.tensors:
        if t.name != "blk.1.ffn_up.weight":
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    refused(dst, "blk.1.ffn_up.weight", "missing")


def _config(path) -> ModelConfig:
    gf = read_gguf(path)
    try:
        return ModelConfig.from_gguf(gf.metadata, str(path), set(gf.tensors))
    finally:
        gf.close()


def test_gemma3_reads_its_sliding_pattern_and_local_base_where_the_file_has_them(files, tmp_path):
    default = _config(files["gemma3_linear_rope"])
    assert default.layer_sliding == (True,) * 5 + (False,)           # llama.cpp's default 6
    assert [r.base for r in default.ropes] == [1e6, 1000.0]          # rope.freq_base_swa
    assert default.ropes[0].factor == 8.0 and default.ropes[1].factor == 1.0
    assert default.layer_rope == (1,) * 5 + (0,)
    every_other = rewrite(files["gemma3_linear_rope"], tmp_path / "p2.gguf",
                          {"gemma3.attention.sliding_window_pattern": (2, T.UINT32)})
    assert _config(every_other).layer_sliding == (True, False) * 3
    flags = [True, False, False, True, True, False]
    per_layer = rewrite(files["gemma3_linear_rope"], tmp_path / "flags.gguf",
                        {"gemma3.attention.sliding_window_pattern": (flags, T.ARRAY)})
    assert _config(per_layer).layer_sliding == tuple(flags)
    no_swa_base = rewrite(files["gemma3_linear_rope"], tmp_path / "base.gguf",
                          drop_keys=("gemma3.rope.freq_base_swa",))
    assert _config(no_swa_base).ropes[1].base == 10_000.0            # Gemma 3's own default


def test_a_mixed_quantization_file_runs_on_the_plan_and_says_it_is_slower(files, tmp_path, caplog):
    """q/k/v of different layouts cannot be one stacked matmul: the plan computes them one by
    one and copies them side by side (the same bits as the eager decoder), and the load says
    so in the log and in LLM.slow_paths (the server's ostinato:slow_paths gauge)."""
    path = rewrite(files["llama"], tmp_path / "mixed.gguf", q8_0=("blk.1.attn_k.weight",))
    with caplog.at_level(logging.WARNING, logger="ostinato.model"):
        llm = LLM(path, max_model_len=64, kv_cache_gb=0.01)
    assert len(llm.slow_paths) == 1 and "blk.1.attn_k.weight" in llm.slow_paths[0]
    assert "blk.1.attn_q.weight" in caplog.text and "one matmul each" in caplog.text
    with plan_and_eager(llm) as seen:
        llm.generate([[1, 5, 9, 30, 44]], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(seen) == 4 and all(same for _, same in seen)


def _gemma_meta(arch: str, layers: int) -> dict:
    return {"general.architecture": arch, f"{arch}.block_count": layers,
            f"{arch}.embedding_length": 4608, f"{arch}.attention.head_count": 32,
            f"{arch}.attention.head_count_kv": 16, f"{arch}.attention.key_length": 128,
            f"{arch}.attention.value_length": 128, f"{arch}.feed_forward_length": 36864,
            f"{arch}.context_length": 8192, f"{arch}.attention.sliding_window": 4096,
            "tokenizer.ggml.tokens": ["a"] * 64}


@pytest.mark.parametrize("arch,layers", [("gemma2", 46), ("gemma3", 62)])
def test_gemma_27b_scales_queries_by_the_width_as_llama_cpp(arch, layers):
    """Gemma 2/3 27B were trained with query_pre_attn_scalar = d_model / heads (144), not
    head_dim (128); their GGUFs carry no attention.scale, and llama.cpp picks the scale by
    the model's size. Other sizes scale by head_dim; a file's attention.scale wins."""
    from ostinato.model.config import ModelConfig
    big = ModelConfig.from_gguf(_gemma_meta(arch, layers), "x.gguf")
    assert big.attn_scale == pytest.approx(144 ** -0.5)
    other = ModelConfig.from_gguf(_gemma_meta(arch, layers - 4), "x.gguf")
    assert other.attn_scale == pytest.approx(128 ** -0.5)
    given = ModelConfig.from_gguf(_gemma_meta(arch, layers) | {f"{arch}.attention.scale": 0.1},
                                  "x.gguf")
    assert given.attn_scale == pytest.approx(0.1)
