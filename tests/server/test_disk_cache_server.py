"""The disk tier through the real server: kill -9 while it writes, leave the debris a crash
leaves (a torn file, a temporary file), restart on the same directory: the server starts,
reads back what is sound, recomputes the rest, and every answer is the cold answer."""
from __future__ import annotations

import os
import signal

import httpx
import pytest
from serverproc import start_server, stop_server

from ostinato.llm import LLM
from ostinato.params import SamplingParams

MAX_TOKENS = 12


def _prompt(topic: str) -> str:
    return " ".join(f"{topic} note {i}: item {i} weighs {i * 13 % 71} grams." for i in range(70))


def _complete(base: str, model: str, prompt: str) -> tuple[str, list[float]]:
    """The text and each token's logprob (the bits of the logits show through)."""
    r = httpx.post(base + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
        "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def _kill_at_first_token(server, prompt: str) -> None:
    with httpx.stream("POST", server.base + "/v1/completions", timeout=120, json={
            "model": server.model, "prompt": prompt, "max_tokens": 200, "temperature": 0,
            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                os.kill(server.proc.pid, signal.SIGKILL)     # the prompt's blocks are queued
                break
    server.proc.wait(30)


def test_kill_9_mid_write_then_restart(smollm_path, tmp_path):
    a, b = _prompt("kitchen"), _prompt("garage")
    ref = LLM(smollm_path, threads=1, max_model_len=2048, enable_prefix_caching=False)
    outs = ref.generate([a, b], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=1))
    cold = [(c.text, [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
            for c in (o.outputs[0] for o in outs)]
    del ref
    args = ("--kv-cache-dir", str(tmp_path), "--max-model-len", "2048", "--threads", "1")
    first = start_server(smollm_path, *args)
    try:
        assert _complete(first.base, first.model, a) == cold[0]
        _kill_at_first_token(first, b)
    finally:
        stop_server(first)
    files = sorted(tmp_path.rglob("*.kv"))
    assert len(files) > 40
    torn = files[len(files) // 2]
    torn.write_bytes(torn.read_bytes()[:1000])                  # a write cut short
    (torn.parent / f"{torn.name}.999999999.tmp").write_bytes(b"half a block")
    second = start_server(smollm_path, *args)
    try:
        assert _complete(second.base, second.model, a) == cold[0]
        assert _complete(second.base, second.model, b) == cold[1]
        m = second.metrics()
        assert m["ostinato:kv_disk_blocks_read_total"] > 20
        assert m["ostinato:kv_disk_blocks_rejected_total"] >= 1
        assert m["ostinato:prefix_cache_hit_rate"] > 0.3
        assert "prefix cache disk tier" in second.log(100_000)
    finally:
        stop_server(second)
    assert not list(tmp_path.rglob("*.999999999.tmp"))


@pytest.mark.parametrize("flags, message", [
    (["--kv-cache-disk-gb", "2"], "--kv-cache-disk-gb goes with --kv-cache-dir"),
    (["--kv-cache-dir", "x", "--kv-cache-disk-gb", "-1"], "--kv-cache-disk-gb must be > 0"),
])
def test_bad_disk_tier_flags_are_usage_errors(flags, message):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "ostinato", "serve", *flags],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr
