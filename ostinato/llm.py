"""The offline Python API, named as vLLM's:

    llm = LLM("smollm2-135m-instruct")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .engine.disk_cache import DiskKVCache, namespace_key
from .engine.draft_model import DraftModel
from .engine.engine import Engine
from .engine.kv_cache import KVCacheManager
from .engine.output_processor import OutputProcessor
from .engine.runner import ModelRunner
from .engine.scheduler import Scheduler
from .engine.sequence import Sequence
from .engine.speculative import SpeculativeConfig, Speculator
from .engine.threads import ThreadGovernor
from .engine.step_log import StepLog
from .engine.step_time import AttentionSpan, LatencyTarget, StepTimeModel
from .hub import model_name, resolve_model
from .kernels.backend import make_ops
from .loader.gguf import GGUFFile, read_gguf
from .loader.hf import HFFolder, is_hf_folder, read_hf_folder
from .loader.weights import logical_tensors
from .model.config import ModelConfig
from .model.transformer import Transformer, stacked_groups, tensor_shapes
from .outputs import CompletionOutput, RequestOutput
from .params import SamplingParams
from .tokenizer import Tokenizer

Prompt = str | list[int]
# Longer contexts are there for the asking (max_model_len=...); this bounds the KV cache memory.
DEFAULT_MAX_MODEL_LEN = 8192
log = logging.getLogger("ostinato.model")


def open_model(model: str | os.PathLike, quantize: str | None = None
               ) -> tuple[Path, GGUFFile | HFFolder]:
    """(path, file): a Hugging Face folder (config.json + safetensors) read as its GGUF
    would be, optionally quantized at load; else a GGUF file or an embedded model's name."""
    if is_hf_folder(model):
        return Path(model), read_hf_folder(model, quantize)
    if quantize is not None:
        raise ValueError(f"quantize={quantize!r} applies to a Hugging Face safetensors folder; "
                         f"a GGUF file's tensors run in the types it holds (requantize it with "
                         f"llama.cpp's llama-quantize)")
    path = resolve_model(model)
    return path, read_gguf(path)


def load_model(gf: GGUFFile | HFFolder, cfg: ModelConfig, backend: str,
               kv_cache_dtype: str = "float16") -> tuple[Transformer, list[str]]:
    """The file's logical tensors, packed by the backend, under the one decoder. Returns the
    model and a line per slower path the file forces (each also logged as a warning)."""
    ops = make_ops(backend, kv_cache_dtype)
    weights, unstacked = ops.load_weights(logical_tensors(gf, *tensor_shapes(cfg)),
                                          stacked_groups(cfg))
    slow = [f"{names} have different quantization layouts: one matmul each and a copy "
            f"instead of one stacked matmul" for names in unstacked]
    for line in slow:
        log.warning("%s: %s", gf.path, line)
    return Transformer(cfg, weights, ops), slow


DTYPES = ("auto", "bfloat16")


def bf16_positions(dtype: str, prompt_bf16: bool, backend: str) -> str | None:
    """The positions whose dense matmuls run on AMX bfloat16 tiles (ModelRunner's bf16):
    dtype "bfloat16" all of them, prompt_bf16 the prompt's; raises unless they can run here."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: 'auto' (the GGUF's quantized "
                         "weights on the int16 path) or 'bfloat16' (AMX bfloat16 tiles)")
    if dtype == "bfloat16" and prompt_bf16:
        raise ValueError("prompt_bf16 keeps generated tokens on the int16 path and dtype "
                         "bfloat16 puts every token on the bfloat16 tiles: choose one")
    which = "all" if dtype == "bfloat16" else "prompt" if prompt_bf16 else None
    if which is None:
        return None
    flag = "dtype bfloat16" if which == "all" else "prompt_bf16"
    if backend != "kernels":
        raise ValueError(f"{flag} needs the kernels backend, not {backend!r}")
    from .kernels import ops
    if not ops().amx_bf16_available():
        raise ValueError(f"{flag} needs a CPU with AMX-BF16 (Sapphire Rapids or later) "
                         "and a kernel build for it; this one has none")
    if which == "all":
        log.info("every position runs the decoder's matmuls and the LM head on AMX "
                 "bfloat16 tiles (--dtype bfloat16; weights converted at load; routed "
                 "experts on the int16 path)")
    else:
        log.info("prompt positions run their matmuls on AMX bfloat16 tiles (--prompt-bf16); "
                 "generated positions on the int16 path")
    return which


class LLM:
    def __init__(self, model: str | os.PathLike = "smollm2-135m-instruct", *,
                 threads: int | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 block_size: int = 16, kv_cache_gb: float = 1.0, backend: str = "kernels",
                 enable_prefix_caching: bool = True, kv_cache_dtype: str = "float16",
                 quantize: str | None = None,
                 target_itl_ms: float | str | None = "off",    # engine/step_time.py
                 speculative: str | SpeculativeConfig | None = None,
                 num_speculative_tokens: int | None = None, draft_model: str | None = None,
                 kv_cache_dir: str | os.PathLike | None = None, kv_cache_disk_gb: float = 16.0,
                 adaptive_threads: bool = True, prompt_bf16: bool = False,
                 dtype: str = "auto", step_log: str | os.PathLike | None = None):
        """speculative: "ngram" (prompt lookup), "suffix" (also other requests' text) or
        "draft" (with draft_model, a smaller model of the same vocabulary), or a
        SpeculativeConfig; the output is the same bits as without (engine/speculative.py).
        target_itl_ms: the scheduler's step-time target, "auto", a number of ms or "off"
        (here the default: an offline batch wants throughput; `ostinato serve` defaults to
        "auto", which keeps streaming clients' token times steady while prompts arrive).
        kv_cache_dir: the prefix cache's disk tier (engine/disk_cache.py), bounded by
        kv_cache_disk_gb: computed prompt blocks are kept there and read back, after a
        restart too, instead of computed again. adaptive_threads: each step runs on the
        thread count measured fastest now (fewer when another process takes a core: same
        bits, engine/threads.py); False: always `threads`. prompt_bf16: prompt positions'
        matmuls on AMX bfloat16 tiles (prefill about twice as fast, activations rounded to
        bfloat16 there; generated positions unchanged); needs a CPU with AMX-BF16.
        dtype: "auto" (the GGUF's quantized weights, activations as int16) or "bfloat16"
        (every position's decoder matmuls and the LM head on AMX bfloat16 tiles, a
        bfloat16 copy of the weights made at load beside the codes: 2 bytes a weight more;
        faster steps from ~16 rows, slower below; not with prompt_bf16).
        step_log: a file to append a JSON line per engine step to (engine/step_log.py)."""
        spec = SpeculativeConfig.parse(speculative, num_speculative_tokens=num_speculative_tokens,
                                       draft_model=draft_model)
        # each step's prefill sized to a step-time target; None: the token budget alone
        self.latency_target = LatencyTarget.parse(target_itl_ms)
        bf16 = bf16_positions(dtype, prompt_bf16, backend)
        if threads:
            torch.set_num_threads(threads)
        self.backend = backend
        self.model_path, gf = open_model(model, quantize)
        self.quantize = quantize
        self.kv_cache_dtype = kv_cache_dtype
        self.model_name = model_name(str(model))
        self.config = ModelConfig.from_gguf(gf.metadata, str(self.model_path), set(gf.tensors))
        self.tokenizer = Tokenizer.from_gguf(gf.metadata, str(self.model_path))
        if isinstance(gf, HFFolder) and gf.extra_eos_ids:   # generation_config.json's eos list
            self.tokenizer.eos_token_ids = self.tokenizer.eos_token_ids | set(gf.extra_eos_ids)
        self.max_model_len = min(max_model_len or DEFAULT_MAX_MODEL_LEN, self.config.context_length)
        self.config = self.config.for_context(self.max_model_len)     # LongRoPE's factors
        model_, self.slow_paths = load_model(gf, self.config, backend, kv_cache_dtype)
        gf.close()
        eos = set(self.tokenizer.eos_token_ids)
        num_blocks = self._num_blocks(kv_cache_gb, block_size,
                                      model_.ops.kv_cache_bytes(block_size, self.config.n_kv_heads,
                                                                self.config.head_dim))
        kv = KVCacheManager(num_blocks, block_size, self.config.kv_group_windows(),
                            enable_prefix_caching, split_paths=bf16 == "prompt")
        runner = ModelRunner(model_, num_blocks, block_size, eos, max_num_batched_tokens,
                             self.max_model_len, bf16, max_num_seqs)
        if kv_cache_dir is not None and not enable_prefix_caching:
            raise ValueError("kv_cache_dir is the prefix cache's disk tier: it needs "
                             "enable_prefix_caching")
        steps = StepLog(step_log) if step_log is not None else None
        self.engine = Engine(
            runner,
            OutputProcessor(self.tokenizer, eos, self.max_model_len),
            Scheduler(kv, max_num_seqs, max_num_batched_tokens, self.latency_target,
                      StepTimeModel(AttentionSpan.of_layers(self.config.layer_windows()))),
            self.max_model_len,
            self._speculator(spec, gf.metadata, backend, kv_cache_dtype, num_blocks[0],
                             block_size, max_num_batched_tokens),
            None if kv_cache_dir is None else self._disk_tier(kv_cache_dir, kv_cache_disk_gb,
                                                              runner, kv_cache_dtype),
            ThreadGovernor(torch.get_num_threads(), cores=len(os.sched_getaffinity(0)))
            if adaptive_threads else None, steps)
        self.speculative = spec

    def _disk_tier(self, root, gb: float, runner: ModelRunner, kv_cache_dtype: str
                   ) -> DiskKVCache:
        """Its namespace: everything that decides a block's bytes besides its tokens."""
        if not gb > 0:
            raise ValueError(f"kv_cache_disk_gb must be > 0, got {gb}")
        from . import __version__
        key = namespace_key("ostinato-kv-1", __version__, self._model_sha256(),
                            self._kernel_build(), self.backend, kv_cache_dtype,
                            runner.block_size, runner.block_layout(), repr(self.config),
                            *_path_modes(runner))
        return DiskKVCache(root, key, [runner.block_bytes(g) for g in range(runner.num_groups)],
                           int(gb * (1 << 30)))

    def _speculator(self, spec: SpeculativeConfig | None, metadata: dict, backend: str,
                    kv_cache_dtype: str, num_blocks: int, block_size: int,
                    max_tokens: int) -> Speculator | None:
        """metadata: the target file's, for a draft model's vocabulary check."""
        if spec is None:
            return None
        draft = None
        if spec.method == "draft":
            draft = self._draft_model(spec.draft_model, metadata.get("tokenizer.ggml.tokens"),
                                      backend, kv_cache_dtype, num_blocks, block_size,
                                      max_tokens)
        return Speculator(spec, draft)

    def _draft_model(self, name: str, vocab, backend: str, kv_cache_dtype: str,
                     num_blocks: int, block_size: int, max_tokens: int) -> DraftModel:
        """The draft model, its cache holding as many tokens as the target's; refused unless
        its vocabulary is the target's (`vocab`), token for token."""
        path, gf = open_model(name)
        try:
            theirs = gf.metadata.get("tokenizer.ggml.tokens")
            if vocab is None or theirs is None or list(vocab) != list(theirs):
                raise ValueError(f"draft model {name}: its vocabulary differs from "
                                 f"{self.model_name}'s; a draft model must share the "
                                 f"target's tokenizer")
            cfg = ModelConfig.from_gguf(gf.metadata, str(path), set(gf.tensors))
            cfg = cfg.for_context(self.max_model_len)
            model, _ = load_model(gf, cfg, backend, kv_cache_dtype)
        finally:
            gf.close()
        groups = len(cfg.kv_group_windows())
        kv = KVCacheManager([num_blocks] * groups, block_size, cfg.kv_group_windows())
        runner = ModelRunner(model, [num_blocks] * groups, block_size,
                             set(self.tokenizer.eos_token_ids), max_tokens, self.max_model_len)
        log.info("speculative decoding: draft model %s (%s, %d layers)", model_name(name),
                 cfg.arch, cfg.n_layers)
        return DraftModel(runner, kv)

    def _num_blocks(self, kv_cache_gb: float, block_size: int, per_layer_block: int) -> list[int]:
        """Blocks per KV-cache group: the budget is split by the groups' layer counts (so
        every group gets the same number of blocks), plus one null block each.
        per_layer_block: bytes of one block of one layer (K and V)."""
        c = self.config
        budget = int(kv_cache_gb * (1 << 30))
        need = -(-self.max_model_len // block_size) + 1
        counts = []
        for g in range(len(c.kv_group_windows())):
            layers = sum(1 for i in range(c.n_layers) if c.layer_kv_group(i) == g)
            n = (budget * layers // c.n_layers) // (layers * per_layer_block)
            if n < need:
                tokens = max(0, n - 1) * block_size
                raise ValueError(f"--kv-cache-gb {kv_cache_gb} holds {tokens} tokens, less "
                                 f"than one sequence of max_model_len {self.max_model_len}")
            counts.append(n)
        return counts

    def fingerprint(self) -> str:
        """What decides this LLM's results besides the request, as OpenAI's
        `system_fingerprint`: 'fp_' + 12 hex digits of a hash over the model file's bytes,
        the kernel build (the compiled extension's bytes), this package's version and the
        options that change the bits (the matmul path, the KV cache's dtype). Equal
        fingerprints, equal results. Reads the whole model file (about 1 s per GB)."""
        return system_fingerprint(self._model_sha256(), self._kernel_build() + "".join(
            f"|{m}" for m in self._bit_modes()))

    def _bit_modes(self) -> list[str]:
        """The options besides the model and the build that decide the output's bits."""
        return (_path_modes(self.engine.runner) +
                ([] if self.kv_cache_dtype == "float16" else [f"kv-{self.kv_cache_dtype}"]))

    def _model_sha256(self) -> str:
        if self.model_path.is_file():
            return _file_sha256(self.model_path)
        return _folder_sha256(self.model_path) + f"|quantize={self.quantize}"

    def _kernel_build(self) -> str:
        if self.backend != "kernels":
            return f"{self.backend}-torch-{torch.__version__}"
        from .kernels import ops
        return _file_sha256(Path(ops().__file__))

    # -- tokens ------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                                 f"(0..{self.config.vocab_size - 1})")
            return list(prompt)
        raise TypeError(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}")

    # -- generation --------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = [self._prompt_ids(p) for p in prompts]
        rids: list[str] = []
        try:
            for i, p in zip(ids, plist):    # a prompt refused here leaves none queued
                rids.append(self.engine.add_request(i, p))
            while self.engine.has_unfinished():
                self.engine.step()
        except BaseException:
            for rid in rids:
                self.engine.abort(rid)
            raise
        return [self._output(rid, p if isinstance(p, str) else None)
                for rid, p in zip(rids, prompts)]

    def _output(self, request_id: str, prompt: str | None) -> RequestOutput:
        seqs = self.engine.pop_finished(request_id)
        first = seqs[0]
        return RequestOutput(request_id, prompt, first.prompt_ids, first.prompt_logprobs,
                             [self._completion(s) for s in seqs], finished=True)

    def _completion(self, s: Sequence) -> CompletionOutput:
        if s.logprobs:
            for entry in s.logprobs:
                self._fill_decoded(entry)
        return CompletionOutput(s.index, s.text, list(s.output_ids), s.cumulative_logprob,
                                s.logprobs, s.finish_reason, s.stop_reason)

    def _fill_decoded(self, entry: dict) -> None:
        for tid, lp in list(entry.items()):
            if lp.decoded_token is None:
                entry[tid] = type(lp)(lp.logprob, lp.rank, self.tokenizer.decode([tid]))

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request as it is generated."""
        for d in self.stream_deltas(prompt, params):
            if d.text:
                yield d.text

    def stream_deltas(self, prompt: Prompt, params: SamplingParams | None = None):
        """Yield one request's SeqDeltas (new text, new token ids, finished) step by step."""
        rid = self.engine.add_request(self._prompt_ids(prompt), params or SamplingParams())
        try:
            while self.engine.has_unfinished():
                for d in self.engine.step():
                    if d.seq.request_id == rid and (d.text or d.token_ids):
                        yield d
        finally:
            self.engine.abort(rid)

    def chat(self, messages: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.chat_prompt_ids(m) for m in convs], params)

    def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                        continue_final_message: bool = False,
                        extra: dict | None = None) -> list[int]:
        """The prompt of a chat; continue_final_message: it ends inside the final message
        (assistant prefill); extra: more variables for the chat template."""
        return self.chat_text_ids(self.tokenizer.apply_chat_template(
            messages, add_generation_prompt, continue_final_message, extra))

    def chat_text_ids(self, text: str) -> list[int]:
        """The ids of a rendered chat prompt: a real template writes BOS itself (as vLLM
        assumes); the plain fallback does not, so encoding adds it."""
        return self.tokenize(text, add_special_tokens=self.tokenizer.chat_template is None)


def _path_modes(runner: ModelRunner) -> list[str]:
    """The matmul path's mode, where it is not the default (its bits differ)."""
    return {"prompt": ["prompt-bf16"], "all": ["bf16"]}.get(runner.bf16, [])


def system_fingerprint(model_sha256: str, kernel_build: str) -> str:
    from . import __version__
    h = hashlib.sha256(f"{model_sha256}|{kernel_build}|{__version__}".encode())
    return "fp_" + h.hexdigest()[:12]


def _folder_sha256(path: Path) -> str:
    """A hash over a model folder's files (names and contents), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f"{f.name}:{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    """Memoised per (path, size, mtime): the server's fingerprint and the disk tier's
    namespace both need it."""
    st = path.stat()
    return _file_sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
