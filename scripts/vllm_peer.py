#!/usr/bin/env python3
"""vLLM-CPU as an optional benchmark peer: convert a GGUF model to HF safetensors, then serve it.

Runs in its own virtualenv (`make install-vllm` creates .venv-vllm and converts SmolLM2);
it does not import the ostinato package.

    .venv-vllm/bin/python scripts/vllm_peer.py convert \
        --gguf ~/.cache/ostinato/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out ~/.cache/ostinato/peers/smollm2-135m-instruct-hf
    .venv-vllm/bin/python scripts/vllm_peer.py serve \
        --model-dir ~/.cache/ostinato/peers/smollm2-135m-instruct-hf --port 8011

`convert` dequantizes the GGUF weights to float32 with transformers and writes config.json
(without quantization_config), model.safetensors, the tokenizer files and generation_config.json;
it does nothing when the output dir already holds model.safetensors and config.json.
`serve` replaces this process with vLLM's OpenAI-compatible server on 127.0.0.1:PORT, computing
on both cores in bfloat16 where the CPU has AMX/AVX512-BF16 (else float32; --dtype overrides),
under the model name = the dir's base name.

Start-up takes ~80-110 s each time: vLLM's AOT compile cache fails to load on CPU ("no attribute
'finalize_loading'") and it recompiles. VLLM_USE_AOT_COMPILE=0 in the environment makes restarts
~45 s (its plain compile cache loads) but served ~5-8% fewer tokens/s here, so it is not the default.
"""
import argparse
import json
import os
import sys
from pathlib import Path


def convert(gguf: Path, out: Path) -> None:
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)

    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # safetensors refuses tensors that share storage
        state.pop("lm_head.weight", None)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]  # vLLM needs it
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json.tmp").write_text(json.dumps(config, indent=2) + "\n")

    tokenizer.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    # rename last, so that an interrupted run is redone rather than taken as finished
    tmp.rename(out / "model.safetensors")
    (out / "config.json.tmp").rename(out / "config.json")


def fastest_dtype() -> str:
    """bfloat16 where the CPU computes it natively (AMX/AVX512-BF16: ~1.9x fp32 here), else float32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return "bfloat16" if flags & {"amx_bf16", "avx512_bf16"} else "float32"


def serve(model_dir: Path, port: int, max_model_len: int, dtype: str) -> None:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-%d" % (os.cpu_count() - 1))  # all cores
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # none kept back for the front end
    # `vllm serve` fails in vllm-cpu 0.32.0 (it asks for the metadata of a "vllm" distribution,
    # which is named vllm-cpu here); the older, deprecated module entry point works
    argv = [sys.executable, "-W", "ignore::DeprecationWarning",
            "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", model_dir.name,
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", dtype, "--max-model-len", str(max_model_len),
            # a fixed KV cache: by default it asks for 92% of the NUMA node's RAM and refuses to
            # start when less is free; 2 GiB holds ~45k fp32 (~90k bf16) tokens of SmolLM2
            "--kv-cache-memory-bytes", str(2 << 30)]
    os.execvpe(argv[0], argv, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="GGUF -> HF safetensors model dir")
    c.add_argument("--gguf", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("serve", help="exec vLLM's OpenAI-compatible server")
    s.add_argument("--model-dir", type=Path, required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--max-model-len", type=int, default=4096)
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 if the CPU has AMX/AVX512-BF16, else float32")
    a = ap.parse_args()
    if a.cmd == "convert":
        convert(a.gguf.expanduser(), a.out.expanduser())
    else:
        serve(a.model_dir.expanduser().resolve(), a.port, a.max_model_len,
              fastest_dtype() if a.dtype == "auto" else a.dtype)


if __name__ == "__main__":
    main()
