"""POST /v1/embeddings: each input's final hidden states (after the output norm) pooled
through the engine (engine/pooling.py: "last" or "mean", L2-normalised, batch-invariant)."""
from __future__ import annotations

import base64
import uuid
from contextlib import aclosing

from ..engine.async_engine import AsyncEngine
from ..params import SamplingParams
from .protocol import EmbeddingRequest, Limits, bad_request
from .serving import merge, prompt_cap, prompt_ids


def embedding_inputs(llm, req: EmbeddingRequest, limits: Limits) -> list[list[int]]:
    """Token ids of each input (BOS as the model adds it), checked against the limits."""
    inputs = req.input_list()
    if len(inputs) > limits.max_prompts:
        raise bad_request(f"the number of inputs is {len(inputs)}, over this server's limit of "
                          f"{limits.max_prompts} (--max-prompts)", "input")
    if req.dimensions is not None and req.dimensions != llm.config.d_model:
        raise bad_request(f"dimensions: this model's embeddings have {llm.config.d_model} "
                          "dimensions and it was not trained for shorter ones", "dimensions")
    ids = [prompt_ids(llm, x, "input", limits) for x in inputs]
    cap = prompt_cap(llm, limits)
    for k, i in enumerate(ids):
        if len(i) > cap:
            raise bad_request(f"input {k} has {len(i)} tokens, over the limit of {cap} (the "
                              "model's context, or --max-prompt-tokens)", "input")
    return ids


async def embed(engine: AsyncEngine, ids: list[list[int]], pooling: str) -> list:
    """The pooled vectors ((D,) float32 tensors), in input order; leaving early aborts them."""
    params = SamplingParams(max_tokens=0, temperature=0.0, pooling=pooling)
    rid = f"embd-{uuid.uuid4().hex}"
    out: list = [None] * len(ids)
    gens = [engine.generate(i, params, f"{rid}-{k}") for k, i in enumerate(ids)]
    async with aclosing(merge(gens)) as merged:
        async for k, d in merged:
            if d.finished and d.embedding is None:
                raise RuntimeError(f"input {k} ended ({d.finish_reason}) without an embedding")
            if d.finished:
                out[k] = d.embedding
    return out


def embedding_response(vectors: list, ids: list[list[int]], model: str, fmt: str) -> dict:
    data = [{"object": "embedding", "index": k, "embedding": _encode(v, fmt)}
            for k, v in enumerate(vectors)]
    n = sum(len(i) for i in ids)
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": n, "total_tokens": n}}


def _encode(v, fmt: str):
    if fmt == "base64":         # little-endian float32 bytes, as OpenAI sends them
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
    return v.tolist()
