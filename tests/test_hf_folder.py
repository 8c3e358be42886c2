"""Hugging Face safetensors folders (ostinato/loader/hf.py): every family of
tests/randmodels.py, loaded from its HF folder, is the GGUF llama.cpp's converter makes of it
(same keys, same tensor bytes), gives the GGUF-f32 file's logits bit for bit and transformers'
within 1e-4; sharding and bf16 change nothing they should not; --quantize q8_0 writes the
converter's q8_0 bytes; the quantizer equals gguf-py's on random matrices; and what the loader
cannot honour (config keys, missing shards, lying headers, pickles) is refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hfmodels import (edit_config, half_pair, logits_of, ostinato_llm, read_tensors, reshard,
                      write_safetensors)
from ostinato.errors import ModelFileError
from ostinato.loader.gguf import read_gguf
from ostinato.loader.hf import read_hf_folder
from randmodels import FAMILIES, build, converter_dir, convert_with_llamacpp, test_ids

F32_BOUND = 1e-4          # against transformers fp32 (as tests/test_families.py)
# keys of the GGUF the folder need not reproduce: the file's own name/type/version, the
# tokenizer's scores and types (checked through tokenization instead: ours are merge ranks,
# randmodels' writer has its own; an added token HF calls special is CONTROL here), and the
# padding id (taken from config.json's pad_token_id, as gguf-py's SpecialVocab does; the
# randmodels writer writes it only for vocabularies with a pad token)
NOT_COMPARED = ("general.", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.padding_token_id")


class _Built(dict):
    """{family: TinyModel}, each built on first use (a family that fails to build fails only
    its own tests)."""

    def __init__(self, root, make):
        super().__init__()
        self.root, self.make = root, make

    def __missing__(self, family):
        self[family] = self.make(family, self.root)
        return self[family]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _Built(tmp_path_factory.mktemp("tiny"), build)


def _same(a, b) -> bool:
    if isinstance(a, (list, np.ndarray)) or isinstance(b, (list, np.ndarray)):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_folder_is_the_gguf(tiny, family):
    """Every metadata key and every tensor (name, type, shape, bytes) of the GGUF-f32 file."""
    m = tiny[family]
    hf, gf = read_hf_folder(m.hf_dir), read_gguf(m.ggufs["f32"])
    keys = {k for k in set(hf.metadata) | set(gf.metadata) if not k.startswith(NOT_COMPARED)}
    differ = sorted(k for k in keys if not _same(hf.metadata.get(k), gf.metadata.get(k)))
    assert not differ, [(k, hf.metadata.get(k), gf.metadata.get(k)) for k in differ]
    assert set(hf.tensors) == set(gf.tensors)
    for name, info in gf.tensors.items():
        t = hf.tensors[name]
        assert (t.type_name, t.shape) == (info.type_name, info.shape), name
        assert np.array_equal(hf.raw(name), gf.raw(name)), name
        hf.release(name)                    # the pages go; read again, they come back
        assert np.array_equal(hf.raw(name), gf.raw(name)), name
        assert t.sources or name.startswith("rope_"), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_gguf_bits_and_transformers(tiny, family):
    m = tiny[family]
    ids = test_ids(m)
    got = logits_of(ostinato_llm(m.hf_dir), ids)
    gguf = logits_of(ostinato_llm(m.ggufs["f32"]), ids)
    assert np.array_equal(got, gguf), np.abs(got - gguf).max()
    ref = m.hf_logits(ids)
    assert ref.std(axis=-1).min() > 0.5, "the checkpoint's logits are near uniform"
    err = np.abs(got - ref).max()
    print(f"{family}: folder == GGUF-f32 bit for bit; max |Δ| vs transformers {err:.2e}")
    assert err <= F32_BOUND, err


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokenizer_equals_gguf_and_hf(tiny, family):
    """The folder's tokenizer.json, turned into GGUF keys, tokenizes as the GGUF's vocabulary
    and as the `tokenizers` package does on tokenizer.json itself."""
    from tokenizers import Tokenizer as HFTok

    from ostinato.tokenizer import Tokenizer
    m = tiny[family]
    ours = Tokenizer.from_gguf(read_hf_folder(m.hf_dir).metadata)
    gguf = Tokenizer.from_gguf(read_gguf(m.ggufs["f32"]).metadata)
    hf = HFTok.from_file(str(m.hf_dir / "tokenizer.json"))
    texts = ["Hello world", "the quick brown fox jumps over the lazy dog", " two  spaces",
             "über 0123456789 ok?", "the river\nflows\tinto the sea", "unknown ✓ bytes"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == gguf.encode(text), text
        assert ids == hf.encode(text).ids, text
        assert ours.decode(ids, skip_special_tokens=True) == gguf.decode(
            ids, skip_special_tokens=True)


@pytest.mark.parametrize("layout", ["gemma-split", "metaspace"])
def test_other_sentencepiece_layouts_tokenize_the_same(tiny, tmp_path, layout):
    """tokenizer.json as Gemma saves it (a no-op split at spaces after the normalizer) and as
    newer Llama/Mistral ones are (a Metaspace pre-tokenizer instead of the normalizer)."""
    from tokenizers import Tokenizer as HFTok

    from ostinato.tokenizer import Tokenizer
    family = "gemma3_linear_rope" if layout == "gemma-split" else "llama"
    m = tiny[family]
    folder = edit_config(m.hf_dir, tmp_path / layout)
    data = json.loads((folder / "tokenizer.json").read_text())
    if layout == "gemma-split":
        data["pre_tokenizer"] = {"type": "Split", "pattern": {"String": " "},
                                 "behavior": "MergedWithPrevious", "invert": False}
    else:
        data["normalizer"] = None
        data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                                 "prepend_scheme": "first", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer.from_gguf(read_hf_folder(folder).metadata)
    gguf = Tokenizer.from_gguf(read_gguf(m.ggufs["f32"]).metadata)
    hf = HFTok.from_file(str(folder / "tokenizer.json"))
    for text in ["Hello world", " two  spaces here", "the quick brown fox\nand the dog"]:
        assert ours.encode(text) == gguf.encode(text), text
        # Metaspace's "first" adds no U+2581 before a leading space; SentencePiece (and so
        # llama.cpp, and the GGUF of the same model) always does
        if layout != "metaspace" or not text.startswith(" "):
            assert ours.encode(text) == hf.encode(text).ids, text


def test_sentencepiece_tokenizer_model(tiny, tmp_path):
    """A folder with tokenizer.model (SentencePiece BPE, byte fallback) and no tokenizer.json:
    our protobuf reader gives sentencepiece's own pieces, scores and types, padded with
    [PADn] rows to config.json's vocab_size, and tokenizes as sentencepiece does."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    from randmodels import _TEXT

    from ostinato.tokenizer import Tokenizer
    (tmp_path / "text.txt").write_text("\n".join(_TEXT.split(" and ")))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=330,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    folder = edit_config(tiny["llama"].hf_dir, tmp_path / "spm")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    md = read_hf_folder(folder).metadata
    n = sp.get_piece_size()
    assert 300 < n < 384 and len(md["tokenizer.ggml.tokens"]) == 384
    assert md["tokenizer.ggml.tokens"][:n] == [sp.id_to_piece(i) for i in range(n)]
    assert md["tokenizer.ggml.scores"][:n] == [sp.get_score(i) for i in range(n)]
    assert md["tokenizer.ggml.token_type"][n:] == [5] * (384 - n)           # UNUSED
    assert [md["tokenizer.ggml.token_type"][i] for i in range(3)] == [2, 3, 3]
    ours = Tokenizer.from_gguf(md)
    for text in ["the quick brown fox", "Hello world", "über ✓ 42", "the river flows"]:
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
    assert ostinato_llm(folder).tokenize("the sea")[0] == 1                  # bos
    data = (folder / "tokenizer.model").read_bytes()
    for bad in (data[:len(data) // 3], b"\x0a\xff\xff\xff\xff\x0f", b"\x0f" * 64):
        (folder / "tokenizer.model").write_bytes(bad)
        with pytest.raises(ModelFileError, match="tokenizer.model"):
            read_hf_folder(folder)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sharded_folder_gives_the_same_bits(tiny, family, tmp_path):
    m = tiny[family]
    sharded = reshard(m.hf_dir, tmp_path / "sharded", n_shards=3)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    ids = test_ids(m)
    a = logits_of(ostinato_llm(m.hf_dir), ids)
    b = logits_of(ostinato_llm(sharded), ids)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", ["BF16", "F16"])
def test_half_precision_runs_as_stored(tiny, tmp_path, kind):
    """A bf16 (f16) folder keeps BF16 (F16) matrices (norms F32) and gives the same bits as
    an f32 folder holding the same values."""
    m = tiny["llama"]
    bf, f32 = half_pair(m.hf_dir, tmp_path, kind)
    hf = read_hf_folder(bf)
    types = {t.type_name for n, t in hf.tensors.items() if len(t.shape) == 2}
    assert types == {kind}
    assert hf.tensors["output_norm.weight"].type_name == "F32"
    ids = test_ids(m)
    a, b = logits_of(ostinato_llm(bf), ids), logits_of(ostinato_llm(f32), ids)
    assert np.array_equal(a, b)
    assert np.abs(a - logits_of(ostinato_llm(m.hf_dir), ids)).max() > 1e-4  # bf16 did round


@pytest.fixture(scope="module")
def converter_q8(tiny, tmp_path_factory):
    """{family: q8_0 GGUF} written by llama.cpp's own convert_hf_to_gguf.py where its
    source is cached; else randmodels' q8_0 files (gguf-py's quantizer, checked against the
    converter by tests/test_randmodels.py)."""
    conv = converter_dir()
    if conv is None:
        return _Built(None, lambda f, _: tiny[f].ggufs["q8_0"]), "randmodels (gguf-py)"

    def convert(family, out):
        path = out / f"{family}-conv-q8_0.gguf"
        convert_with_llamacpp([(tiny[family].hf_dir, "q8_0", path)], conv)
        return path
    return _Built(tmp_path_factory.mktemp("conv"), convert), "convert_hf_to_gguf.py"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantize_q8_0_equals_the_converter(tiny, converter_q8, family):
    files, made_by = converter_q8
    m = tiny[family]
    hf, gf = read_hf_folder(m.hf_dir, quantize="q8_0"), read_gguf(files[family])
    assert set(hf.tensors) == set(gf.tensors)
    n_q8 = 0
    for name, info in gf.tensors.items():
        assert hf.tensors[name].type_name == info.type_name, name
        assert np.array_equal(hf.raw(name), gf.raw(name)), name
        n_q8 += info.type_name == "Q8_0"
    assert n_q8 >= 3
    print(f"{family}: {n_q8} Q8_0 tensors equal byte for byte to {made_by}'s")
    ids = test_ids(m)
    a = logits_of(ostinato_llm(m.hf_dir, quantize="q8_0"), ids)
    b = logits_of(ostinato_llm(m.ggufs["q8_0"]), ids)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantizer_bytes_equal_gguf_py(qtype):
    """Random rows at several scales, plus the edge cases: all-zero blocks, constant blocks,
    +-max ties, halves that round away from zero."""
    import gguf
    from gguf.quants import quantize as reference

    from ostinato.loader.quantize import quantize
    rng = np.random.default_rng(7)
    for scale in (1e-4, 1.0, 300.0):
        x = (rng.standard_normal((48, 256)) * scale).astype(np.float32)
        x[0, :32] = 0
        x[1, :32] = 0.25
        x[2, :32] = np.linspace(-1, 1, 32)
        x[3, :32] = np.arange(32) - 15.5          # exact halves after scaling for Q8_0
        x[4, 3], x[4, 9] = 5.0, -5.0               # a tie of magnitudes
        got = quantize(x, qtype)
        want = reference(x, gguf.GGMLQuantizationType[qtype])
        assert got.shape == want.shape and np.array_equal(got, want), (qtype, scale)
    big = rng.standard_normal((1100, 1024)).astype(np.float32)    # more blocks than a chunk
    assert np.array_equal(quantize(big, qtype), reference(big, gguf.GGMLQuantizationType[qtype]))


def test_quantize_refusals(tiny):
    m = tiny["llama"]
    with pytest.raises(ModelFileError, match="K-quants"):
        read_hf_folder(m.hf_dir, quantize="q4_k")
    with pytest.raises(ModelFileError, match="unknown type"):
        read_hf_folder(m.hf_dir, quantize="q3")
    with pytest.raises(ValueError, match="applies to a Hugging Face safetensors folder"):
        ostinato_llm(m.ggufs["f32"], quantize="q8_0")


def test_dtype_bfloat16_needs_quantized_weights(tiny):
    """--dtype bfloat16 converts quantized weights for the tiles: a float32 folder would run
    exactly as without it, so it is refused, naming --quantize; quantized, it runs on them."""
    from ostinato.kernels import ops
    if not ops().amx_bf16_available():
        pytest.skip("no AMX-BF16 on this CPU: --dtype bfloat16 is refused here")
    m = tiny["llama"]
    with pytest.raises(ValueError, match="--quantize"):
        ostinato_llm(m.hf_dir, dtype="bfloat16")
    ids = test_ids(m)
    tiles = logits_of(ostinato_llm(m.hf_dir, quantize="q8_0", dtype="bfloat16"), ids)
    int16 = logits_of(ostinato_llm(m.hf_dir, quantize="q8_0"), ids)
    assert not np.array_equal(tiles, int16)                  # bfloat16 rounding: ~1% here
    assert np.abs(tiles - int16).max() < 0.05 * np.abs(int16).max()


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, named", [
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type 'dynamic'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 16}, "sliding_window"),
    ({"architectures": ["FalconForCausalLM"]}, "FalconForCausalLM"),
])
def test_config_key_not_implemented_is_refused(tiny, tmp_path, change, named):
    folder = edit_config(tiny["llama"].hf_dir, tmp_path / "edited", **change)
    with pytest.raises(ModelFileError, match=named) as e:
        read_hf_folder(folder)
    assert "\n" not in str(e.value)


def test_missing_shard_is_refused(tiny, tmp_path):
    sharded = reshard(tiny["llama"].hf_dir, tmp_path / "sharded", n_shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelFileError, match="model-00002-of-00003.safetensors.*missing"):
        read_hf_folder(sharded)


def test_index_naming_a_path_outside_the_folder_is_refused(tiny, tmp_path):
    sharded = reshard(tiny["llama"].hf_dir, tmp_path / "sharded", n_shards=2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../model-00001-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="not a .safetensors file name in the folder"):
        read_hf_folder(sharded)


@pytest.mark.parametrize("lie", [
    {"data_offsets": [0, 1 << 40]},                 # beyond the file
    {"shape": [4096, 4096]},                        # more elements than its bytes
    {"dtype": "I64"},                               # a type we do not run
])
def test_lying_safetensors_header_is_refused(tiny, tmp_path, lie):
    folder = tiny["llama"].hf_dir
    bad = edit_config(folder, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    tensors = read_tensors(folder)
    write_safetensors(bad / "model.safetensors", tensors,
                      header_patch={"model.norm.weight": lie})
    with pytest.raises(ModelFileError, match="model.safetensors") as e:
        hf = read_hf_folder(bad)
        [hf.raw(n) for n in hf.tensors]
    assert "\n" not in str(e.value)


def test_truncated_safetensors_is_refused(tiny, tmp_path):
    bad = edit_config(tiny["llama"].hf_dir, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFileError, match="not a valid safetensors file"):
        read_hf_folder(bad)


def test_pickle_checkpoint_is_refused_unopened(tiny, tmp_path):
    """A folder with only pytorch_model.bin: refused by name; the file is never read (it
    would run code when unpickled: here it is not even a pickle)."""
    folder = edit_config(tiny["llama"].hf_dir, tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelFileError, match="pytorch_model.bin.*never unpickles"):
        read_hf_folder(folder)


def test_tensor_the_mapping_does_not_know_is_refused(tiny, tmp_path):
    folder = tiny["llama"].hf_dir
    bad = edit_config(folder, tmp_path / "extra")
    tensors = read_tensors(folder)
    tensors["model.layers.0.self_attn.rotary_scale"] = ("F32", (4,), bytes(16))
    write_safetensors(bad / "model.safetensors", tensors)
    with pytest.raises(ModelFileError, match="rotary_scale.*not used"):
        read_hf_folder(bad)


def test_untied_config_without_lm_head_is_refused(tiny, tmp_path):
    folder = tiny["llama"].hf_dir
    bad = edit_config(folder, tmp_path / "headless")
    tensors = read_tensors(folder)
    del tensors["lm_head.weight"]
    write_safetensors(bad / "model.safetensors", tensors)
    with pytest.raises(ModelFileError, match="lm_head.weight is missing"):
        read_hf_folder(bad)


def test_generation_config_eos_list_ends_generation(tiny, tmp_path):
    m = tiny["llama"]
    folder = edit_config(m.hf_dir, tmp_path / "eos")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    llm = ostinato_llm(folder)
    assert {2, 7} <= set(llm.tokenizer.eos_token_ids)


def test_cli_generates_from_a_folder_with_quantize(tiny):
    m = tiny["llama"]
    r = subprocess.run([sys.executable, "-m", "ostinato", "generate", "-m", str(m.hf_dir),
                        "--quantize", "q8_0", "-p", "the quick brown", "--max-tokens", "4",
                        "--temperature", "0", "--ignore-eos"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(llama, 2 layers)" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "ostinato", "generate", "-m", str(m.ggufs["f32"]),
                          "--quantize", "q8_0", "-p", "x"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "applies to a Hugging Face safetensors folder" in bad.stderr
    vs = subprocess.run([sys.executable, "-m", "ostinato", "bench", "-m", str(m.hf_dir), "--vs",
                         "llama.cpp"], capture_output=True, text=True, timeout=300)
    assert vs.returncode == 1 and "convert it to GGUF" in vs.stderr


# ---------------------------------------------------------------------------------------------
# every architecture the loader maps, against llama.cpp's converter (whether or not the
# decoder runs the family yet: ModelConfig refuses those it does not)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted_archs(tmp_path_factory):
    from hfmodels import arch_configs, build_arch
    conv = converter_dir()
    if conv is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not cached (llama-cpp-python sdist)")
    out = tmp_path_factory.mktemp("archs")
    folders = {a: build_arch(a, out) for a in arch_configs()}
    convert_with_llamacpp([(f, "f32", out / f"{a}.gguf") for a, f in folders.items()], conv)
    return {a: (f, out / f"{a}.gguf") for a, f in folders.items()}


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "MixtralForCausalLM",
                                  "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
                                  "Phi3ForCausalLM", "Gemma2ForCausalLM", "Olmo2ForCausalLM",
                                  "GraniteForCausalLM", "SmolLM3ForCausalLM"])
def test_every_mapped_arch_equals_the_converter(converted_archs, arch):
    """The `{arch}.*` keys and every tensor (names, types, shapes, bytes) of the GGUF
    convert_hf_to_gguf.py writes from the same folder (the converter's vocabulary step is
    skipped by randmodels' driver: tokenizer keys are compared elsewhere)."""
    folder, gguf_path = converted_archs[arch]
    hf, gf = read_hf_folder(folder), read_gguf(gguf_path)
    keys = {k for k in set(hf.metadata) | set(gf.metadata)
            if not k.startswith(("general.", "tokenizer."))}
    differ = sorted(k for k in keys if not _same(hf.metadata.get(k), gf.metadata.get(k)))
    assert not differ, [(k, hf.metadata.get(k), gf.metadata.get(k)) for k in differ]
    assert set(hf.tensors) == set(gf.tensors)
    for name, info in gf.tensors.items():
        t = hf.tensors[name]
        assert (t.type_name, t.shape) == (info.type_name, info.shape), name
        assert np.array_equal(hf.raw(name), gf.raw(name)), name


@pytest.mark.parametrize("qtype, ftype", [("Q4_0", 2), ("Q4_1", 3), ("Q8_0", 7), ("Q5_0", 8),
                                          ("Q5_1", 9)])
def test_quantize_equals_llama_cpp_quantizer(tiny, tmp_path, qtype, ftype):
    """llama.cpp's own C quantizer (llama_model_quantize, `pure`: one type for every matrix)
    on the GGUF-f32 file writes the bytes --quantize writes from the folder."""
    import ctypes
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    m = tiny["llama"]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = ftype, True, 2
    out = tmp_path / f"{qtype}.gguf"
    assert llama_cpp.llama_model_quantize(str(m.ggufs["f32"]).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    gf, hf = read_gguf(out), read_hf_folder(m.hf_dir, quantize=qtype.lower())
    assert set(gf.tensors) == set(hf.tensors)
    assert sum(t.type_name == qtype for t in gf.tensors.values()) >= 10
    for name, info in gf.tensors.items():
        assert hf.tensors[name].type_name == info.type_name, name
        assert np.array_equal(hf.raw(name), gf.raw(name)), name


_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}")


def test_serve_a_folder_with_quantize(tiny, tmp_path):
    """`ostinato serve --model ./folder --quantize q8_0` through the official client: the
    greedy completion equals the offline LLM's on the same folder, and chat renders the
    folder's chat_template.jinja."""
    from openai import OpenAI

    from serverproc import start_server, stop_server
    folder = edit_config(tiny["llama"].hf_dir, tmp_path / "served")
    (folder / "chat_template.jinja").write_text(_TEMPLATE)
    llm = ostinato_llm(folder, quantize="q8_0")
    from ostinato import SamplingParams
    want = llm.generate(["the quick brown"], SamplingParams(max_tokens=6, temperature=0.0,
                                                            ignore_eos=True))[0].outputs[0]
    messages = [{"role": "user", "content": "the river flows"}]
    prompt_ids = llm.chat_prompt_ids(messages)
    assert llm.detokenize(prompt_ids).endswith("user: the river flows\nassistant:")
    srv = start_server(folder, "--quantize", "q8_0", "--kv-cache-dtype", "float32")
    try:
        client = OpenAI(base_url=f"{srv.base}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["served"]
        got = client.completions.create(model="served", prompt="the quick brown", max_tokens=6,
                                        temperature=0.0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == want.text
        chat = client.chat.completions.create(model="served", messages=messages, max_tokens=3)
        assert chat.usage.prompt_tokens == len(prompt_ids)
    finally:
        stop_server(srv)


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2", "starcoder"])
def test_tokenizer_json_meets_llama_cpp_vectors(name, tmp_path):
    """llama.cpp's own vocabularies (models/ggml-vocab-*.gguf of the sdist) written as
    tokenizer.json in their families' layout: the folder's tokenizer gives llama.cpp's ids on
    its test texts (tests/test_tokenizer_vectors.py runs the same texts on the GGUFs)."""
    from hfmodels import tokenizer_json_from_gguf, vocab_vectors
    from ostinato.loader.hf_tokenizer import tokenizer_metadata
    from ostinato.tokenizer import PRE_TOKENIZERS, Tokenizer
    found = vocab_vectors(name)
    if found is None:
        pytest.skip("llama.cpp's models/ are not extracted from the llama-cpp-python sdist")
    gguf, cases = found
    gmd = read_gguf(gguf).metadata
    folder = tokenizer_json_from_gguf(gguf, tmp_path / name)
    md, _ = tokenizer_metadata(folder, {"vocab_size": len(gmd["tokenizer.ggml.tokens"])})
    assert PRE_TOKENIZERS[md["tokenizer.ggml.pre"]] == PRE_TOKENIZERS[gmd["tokenizer.ggml.pre"]]
    tok = Tokenizer.from_gguf(md)
    wrong = [(text[:30], ids[:8]) for text, ids in cases
             if tok.encode(text, add_special_tokens=False, parse_special=False) != ids]
    assert len(cases) >= 40 and not wrong, wrong[:5]


_TEXTS = ["Hello world", "Hello, world! How are you today?", "  leading spaces and\ttabs\n\n",
          "numbers 1234567 and 3.14159", "def f(x):\n    return x**2  # square",
          "Ünïcödé ñ 中文 日本語", "emoji 🦙🚀 and <|im_start|>user\nhi<|im_end|>",
          "don't WON'T I'll they're", "\r\n\r\n x"]


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_real_byte_level_vocab_through_tokenizer_json(name, tmp_path):
    """A real byte-level vocabulary (SmolLM2's 49k, Qwen2.5's 152k tokens and merges), saved
    as tokenizer.json in its family's layout, becomes the GGUF's tokenizer keys (tokens,
    types, merges, pre-tokenizer) and tokenizes as the GGUF and as `tokenizers` do."""
    from tokenizers import Tokenizer as HFTok

    from hfmodels import tokenizer_json_from_gguf
    from ostinato.hub import ModelNotFound, resolve_model
    from ostinato.loader.hf_tokenizer import tokenizer_metadata
    from ostinato.tokenizer import Tokenizer
    try:
        path = resolve_model(name, pull_missing=False)
    except ModelNotFound:
        pytest.skip(f"{name} is not pulled (ostinato pull {name})")
    gmd = read_gguf(path).metadata
    folder = tokenizer_json_from_gguf(path, tmp_path / "tok")
    md, _ = tokenizer_metadata(folder, {"vocab_size": len(gmd["tokenizer.ggml.tokens"])})
    for key in ("tokens", "merges", "pre", "model"):
        assert _same(md[f"tokenizer.ggml.{key}"], gmd[f"tokenizer.ggml.{key}"]), key
    assert list(md["tokenizer.ggml.token_type"]) == gmd["tokenizer.ggml.token_type"].tolist()
    ours, theirs = Tokenizer.from_gguf(md), Tokenizer.from_gguf(gmd)
    hf = HFTok.from_file(str(folder / "tokenizer.json"))
    for text in _TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ids == hf.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("family", ["llama3_rope", "gemma3_linear_rope"])
def test_config_values_of_the_wrong_type_fail_in_one_line(tiny, tmp_path, family):
    """Every config.json key set to a string, a negative number, a list, a huge number or
    null: the folder loads (an informative key) or is refused in one line naming the file;
    never a traceback from deep in the arithmetic."""
    from ostinato.model.config import ModelConfig
    from ostinato.tokenizer import Tokenizer
    src = tiny[family].hf_dir
    keys = list(json.loads((src / "config.json").read_text())) + ["rope_scaling", "rope_theta"]
    refused = 0
    for key in keys:
        for val in ("x", -1, [1, 2], 1e30, None, 0):
            folder = edit_config(src, tmp_path / f"{key}-{val!r}"[:80], **{key: val})
            try:
                hf = read_hf_folder(folder)
                ModelConfig.from_gguf(hf.metadata, str(folder), set(hf.tensors))
                Tokenizer.from_gguf(hf.metadata, str(folder))
                [hf.raw(n) for n in hf.tensors]
            except ModelFileError as e:
                assert "\n" not in str(e) and str(folder) in str(e), (key, val, str(e))
                refused += 1
    assert refused > len(keys)


def test_real_smollm2_as_a_folder(tmp_path):
    """SmolLM2-135M-Instruct (the embedded Q4_1 GGUF, dequantized to float32 by transformers)
    as a Hugging Face folder: its tensors are the GGUF's values exactly, its chat prompt the
    GGUF's token ids, its logits transformers' within 5e-4 (measured 8.2e-5 over 37 positions)
    and its greedy chat reply transformers' own."""
    from hfmodels import folder_from_gguf
    from ostinato import LLM, SamplingParams
    from ostinato.hub import ModelNotFound, resolve_model
    from ostinato.loader.dequant import dequantize
    from ostinato.loader.gguf import TYPE_IDS
    from randmodels import hf_logits, load_hf
    try:
        gguf_path = resolve_model("smollm2-135m-instruct", pull_missing=False)
    except ModelNotFound:
        pytest.skip("smollm2-135m-instruct is not pulled")
    folder = folder_from_gguf(gguf_path, tmp_path / "smollm2", "LlamaForCausalLM")
    hf, gf = read_hf_folder(folder), read_gguf(gguf_path)
    assert set(hf.tensors) == set(gf.tensors)
    for name, info in gf.tensors.items():
        t = hf.tensors[name]
        assert np.array_equal(dequantize(hf.raw(name), TYPE_IDS[t.type_name], t.shape),
                              dequantize(gf.raw(name), info.type_id, info.shape)), name
    kw = dict(max_model_len=256, kv_cache_gb=0.1, enable_prefix_caching=False,
              kv_cache_dtype="float32")
    ours, theirs = LLM(folder, **kw), LLM(gguf_path, **kw)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = ours.chat_prompt_ids(messages)
    assert ids == theirs.chat_prompt_ids(messages)
    model = load_hf(folder)
    err = np.abs(logits_of(ours, ids) - hf_logits(model, ids)).max()
    print(f"SmolLM2 folder: max |Δ| vs transformers fp32 {err:.2e} over {len(ids)} positions")
    assert err <= 5e-4
    import torch
    want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    got = ours.generate([ids], SamplingParams(max_tokens=12, temperature=0.0))[0].outputs[0]
    assert got.token_ids == want.tolist()[:len(got.token_ids)] and got.token_ids
