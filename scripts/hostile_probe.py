#!/usr/bin/env python3
"""Hostile requests against a running Ostinato server: each case is one request (or a few)
built to make the server answer 5xx, crash, stall its event loop, or spend minutes of CPU or
gigabytes of memory. Every finding of it so far is a test in tests/server/ or
tests/reliability/; this script is the wider sweep, with the sizes the tests cannot afford.

usage: python scripts/hostile_probe.py BASE_URL MODEL [SERVER_PID]
  e.g. ostinato serve --model smollm2-135m-instruct --port 8123 &
       python scripts/hostile_probe.py http://127.0.0.1:8123 smollm2-135m-instruct $!

Stdlib only (http.client / socket). One line per case:
  name | status | seconds | health_max | rss_delta | first 120 chars of the body | FLAGS
FLAGS: 5XX (status >= 500), SSE_5XX (an error event >= 500 inside a stream), CONN_ERR
(connection error / timeout / reset), SLOW (> 20 s), STALL (a /health probe took > 5 s while
the case ran: the event loop or the GIL was held), RSS+ (server RSS grew > 300 MB; needs
SERVER_PID, same machine), SERVER_DOWN (/health failed after the case), plus case-specific
flags (MUTATION, BACKLOG, SLOWDOWN, NO_HEADER_LIMIT, ECHOED_UNKNOWN_KEY). A clean run flags
nothing but ECHOED_UNKNOWN_KEY (a Responses tool's unknown keys are kept, as agents send
them).

Environment: SCALE (float, default 1) multiplies the big sizes; SKIP_CRASH=1 skips the last
group (native-recursion probes that killed the server before its grammar threads had a deep
stack); ONLY=substr runs only cases whose name contains substr; N_CHAIN, N_GBNF, N_NEWLINES
size group 8 and 7.

The groups run cheapest first; the cases that may freeze the server for minutes or kill it
come last. The sizes assume the default --max-body-mb 16."""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import string
import sys
import threading
import time
from urllib.parse import urlparse

TIMEOUT = 60.0
SLOW_S = 20.0
STALL_S = 5.0
SCALE = float(os.environ.get("SCALE", "1"))
ONLY = os.environ.get("ONLY")

if len(sys.argv) < 3:
    print(__doc__)
    sys.exit(2)
BASE, MODEL = sys.argv[1].rstrip("/"), sys.argv[2]
PID = sys.argv[3] if len(sys.argv) > 3 else os.environ.get("SERVER_PID")
U = urlparse(BASE)
HOST, PORT = U.hostname, U.port or 80
API_KEY = os.environ.get("OSTINATO_API_KEY")
MAX_BODY = 15 * (1 << 20)       # under the default --max-body-mb 16


# ------------------------------------------------------------------------------ plumbing
def rss_mb() -> float | None:
    if not PID:
        return None
    try:
        with open(f"/proc/{PID}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def request(method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = TIMEOUT):
    """(status, body bytes, seconds, error string or None)."""
    h = {"content-type": "application/json"} if body is not None else {}
    if API_KEY:
        h["authorization"] = f"Bearer {API_KEY}"
    h.update(headers or {})
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return r.status, data, time.monotonic() - t0, None
    except Exception as e:                      # noqa: BLE001
        return None, b"", time.monotonic() - t0, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def post(path: str, obj, **kw):
    body = obj if isinstance(obj, (bytes, bytearray)) else json.dumps(obj).encode()
    return request("POST", path, bytes(body), **kw)


class HealthWatch:
    """Polls /health in the background; max latency of the probes during a window."""

    def __init__(self):
        self.probes: list[tuple[float, float]] = []     # (start, seconds)
        self.pending: float | None = None
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop:
            t0 = time.monotonic()
            self.pending = t0
            request("GET", "/health", timeout=300)
            self.probes.append((t0, time.monotonic() - t0))
            self.pending = None
            time.sleep(0.5)

    def worst(self, a: float, b: float) -> float:
        worst = max((d for s, d in list(self.probes) if a - 1 <= s <= b), default=0.0)
        if self.pending is not None:
            worst = max(worst, time.monotonic() - self.pending)
        return worst


WATCH = HealthWatch()
RESULTS: list[tuple[str, list[str]]] = []


def alive() -> bool:
    st, _, _, _ = request("GET", "/health", timeout=30)
    return st == 200


def sse_errors(data: bytes) -> list[str]:
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        try:
            ev = json.loads(line[6:])
        except ValueError:
            continue
        err = ev.get("error") if isinstance(ev, dict) else None
        if isinstance(err, dict):
            code = err.get("code")
            kind = err.get("type")
            if (isinstance(code, int) and code >= 500) or kind in ("api_error", "server_error"):
                out.append(str(err)[:100])
    return out


def report(name: str, res, extra_flags=(), note: str = "", rss0=None, t_start=None,
           check_alive: bool = False):
    st, data, secs, err = res
    t_end = time.monotonic()
    flags = list(extra_flags)
    if st is not None and st >= 500:
        flags.append("5XX")
    if err:
        flags.append("CONN_ERR")
    if secs > SLOW_S:
        flags.append("SLOW")
    if data[:200].lstrip().startswith(b"data:") or b"\ndata: " in data[:4000] \
            or b"event: " in data[:200]:
        if sse_errors(data):
            flags.append("SSE_5XX")
    hw = WATCH.worst(t_start if t_start is not None else t_end - secs, t_end)
    if hw > STALL_S:
        flags.append("STALL")
    rss1 = rss_mb()
    drss = None if rss0 is None or rss1 is None else rss1 - rss0
    if drss is not None and drss > 300:
        flags.append("RSS+")
    if check_alive and not alive():
        flags.append("SERVER_DOWN")
    text = (err or data[:120].decode("utf-8", "replace")).replace("\n", "\\n")
    line = (f"{name:42s} | {st if st is not None else '---':>3} | {secs:7.2f}s | "
            f"health_max {hw:6.2f}s | rss {'' if drss is None else f'{drss:+.0f}MB':>8} | "
            f"{text}{' | ' + note if note else ''} | {' '.join(flags) or 'ok'}")
    print(line, flush=True)
    RESULTS.append((name, flags))


def case(name: str, fn, check_alive: bool = False):
    if ONLY and ONLY not in name:
        return
    rss0 = rss_mb()
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as e:                      # noqa: BLE001  (a bug here, not the server)
        print(f"{name:42s} | script error {type(e).__name__}: {e}", flush=True)
        return
    res, flags, note = out if isinstance(out, tuple) and len(out) == 3 \
        and isinstance(out[0], tuple) else (out, (), "")
    report(name, res, flags, note, rss0, t0, check_alive)


def chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            **kw}


def comp(**kw):
    return {"model": MODEL, "prompt": "hi", "max_tokens": 1, **kw}


def rf(schema, name="s"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


_LETTERS = bytes((string.ascii_lowercase * 10).encode()[:256])


def rand_word(n: int, seed: int) -> str:
    """n random lowercase letters (one pre-tokenizer 'word'), fast."""
    return random.Random(seed).randbytes(n).translate(_LETTERS).decode()


# ------------------------------------------------------------------------------ server facts
info_st, info_raw, _, info_err = request("GET", "/tokenizer_info")
INFO = json.loads(info_raw) if info_st == 200 else {}
VOCAB = int(INFO.get("vocab_size") or 32000)
EOS_TEXT = INFO.get("eos_token") or "</s>"
st, raw, _, _ = post("/tokenize", {"model": MODEL, "prompt": "a", "add_special_tokens": False})
TOK_A = json.loads(raw)["tokens"][-1] if st == 200 else 1
print(f"# base={BASE} model={MODEL} vocab={VOCAB} eos={EOS_TEXT!r} id('a')={TOK_A} "
      f"pid={PID} scale={SCALE}", flush=True)
print(f"# {'case':42s} | st  | seconds  | health_max      | rss      | body | flags", flush=True)

LOOP = {"$defs": {"loop": {"$ref": "#/$defs/loop"}}}


def nested(prop_schema, defs=None):
    s = {"type": "object", "properties": {"a": prop_schema}, "required": ["a"],
         "additionalProperties": False}
    if defs:
        s["$defs"] = defs
    return s


# ================================================================ 0. sanity (expected 4xx/200)
case("sanity/seed_negative", lambda: post("/v1/completions", comp(seed=-5)))
case("sanity/seed_2**64", lambda: post("/v1/completions", comp(seed=2 ** 64)))
case("sanity/temperature_str_NaN", lambda: post("/v1/completions", comp(temperature="NaN")))
case("sanity/repetition_penalty_str_inf",
     lambda: post("/v1/completions", comp(repetition_penalty="Infinity", max_tokens=2)))
case("sanity/top_k_1e60", lambda: post("/v1/completions", comp(top_k=10 ** 60, max_tokens=2)))
case("sanity/prompt_ids_bools", lambda: post("/v1/completions", comp(prompt=[True, False])))
case("sanity/prompt_ids_oov", lambda: post("/v1/completions", comp(prompt=[VOCAB])))
case("sanity/logit_bias_arabic_digit_key",
     lambda: post("/v1/chat/completions", chat(logit_bias={"\u0661": 1})))
case("sanity/content_part_number",
     lambda: post("/v1/chat/completions", chat(messages=[{"role": "user", "content": [5]}])))
case("sanity/image_part", lambda: post("/v1/chat/completions", chat(messages=[
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}])))
case("sanity/role_template_syntax", lambda: post("/v1/chat/completions", chat(messages=[
    {"role": "{{7*7}}", "content": "x"}])))
case("sanity/chat_template_kwargs_raise_exception", lambda: post("/v1/chat/completions", chat(
    chat_template_kwargs={"raise_exception": 1})))
case("sanity/tool_args_deep_string", lambda: post("/v1/chat/completions", chat(messages=[
    {"role": "user", "content": "x"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
     "function": {"name": "f", "arguments": '{"a":' + "[" * 700 + "]" * 700 + "}"}}]},
    {"role": "tool", "tool_call_id": "c", "content": "r"},
    {"role": "user", "content": "y"}])))

# ================================================================ 1. bodies that were a 500
# a tool_choice whose "function" is not {"name": ...}
case("500/chat_tool_choice_function_str", lambda: post("/v1/chat/completions", chat(
    tool_choice={"type": "function", "function": "f"})))
case("500/chat_tool_choice_function_list", lambda: post("/v1/chat/completions", chat(
    tool_choice={"type": "function", "function": [1]})))
case("500/chat_tool_choice_function_int_notype", lambda: post("/v1/chat/completions", chat(
    tool_choice={"function": 5})))
case("500/chat_tool_choice_function_true+tools", lambda: post("/v1/chat/completions", chat(
    tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    tool_choice={"type": "function", "function": True})))
case("500/chat_tool_choice_stream", lambda: post("/v1/chat/completions", chat(
    stream=True, tool_choice={"type": "function", "function": "f"})))

# grammars that pass the first-token check, then admit nothing: the request's error (400)
DEAD = {
    "ref_loop_in_required_prop": nested({"$ref": "#/$defs/loop"}, LOOP["$defs"]),
    "ref_loop_in_array_items_min1": {"type": "array", "items": {"$ref": "#/$defs/loop"},
                                     "minItems": 1, "$defs": LOOP["$defs"]},
    "ref_loop_via_anyof": {"anyOf": [nested({"$ref": "#/$defs/loop"})], "$defs": LOOP["$defs"]},
    "mutual_ref_loop": nested({"$ref": "#/$defs/p"}, {"p": {"$ref": "#/$defs/q"},
                                                      "q": {"$ref": "#/$defs/p"}}),
    "false_in_required_prop": nested(False),
    "empty_enum_in_required_prop": nested({"enum": []}),
    "int_min_gt_max_required": nested({"type": "integer", "minimum": 5, "maximum": 1}),
}
for k, schema in DEAD.items():
    case(f"500/dead_end_rf/{k}", lambda s=schema: post("/v1/chat/completions", chat(
        max_tokens=24, temperature=0, response_format=rf(s))))
case("500/dead_end_rf/ref_loop_stream", lambda: post("/v1/chat/completions", chat(
    max_tokens=24, temperature=0, stream=True,
    response_format=rf(DEAD["ref_loop_in_required_prop"]))))
case("500/dead_end_rf/ref_loop_sampled_n2", lambda: post("/v1/chat/completions", chat(
    max_tokens=24, temperature=0.7, n=2, seed=1,
    response_format=rf(DEAD["ref_loop_in_required_prop"]))))
case("500/dead_end_guided_json_completions", lambda: post("/v1/completions", comp(
    max_tokens=24, temperature=0, guided_json=DEAD["ref_loop_in_required_prop"])))
case("500/dead_end_lark_unproductive", lambda: post("/v1/completions", comp(
    max_tokens=8, temperature=0, guided_grammar='start: "{" b\nb: b "x"\n')))
case("500/dead_end_lark_empty_class", lambda: post("/v1/completions", comp(
    max_tokens=8, temperature=0, guided_grammar='start: "a" B\nB: /[^\\x00-\\x{10FFFF}]/\n')))
case("500/dead_end_gbnf_unproductive", lambda: post("/v1/completions", comp(
    max_tokens=8, temperature=0, guided_grammar='root ::= "a" b\nb ::= b "c"\n')))
case("500/dead_end_tool_required", lambda: post("/v1/chat/completions", chat(
    max_tokens=40, temperature=0, tool_choice="required",
    tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "items": {"not": {}},
                                              "minItems": 1}},
        "required": ["a"], "additionalProperties": False}}}])))
case("500/dead_end_anthropic_stream", lambda: post("/v1/messages", {
    "model": MODEL, "max_tokens": 24, "temperature": 0, "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
    "output_config": {"format": {"type": "json_schema",
                                 "schema": DEAD["ref_loop_in_required_prop"]}}}))
case("500/dead_end_responses", lambda: post("/v1/responses", {
    "model": MODEL, "input": "hi", "max_output_tokens": 24, "temperature": 0, "store": False,
    "text": {"format": {"type": "json_schema", "name": "s",
                        "schema": DEAD["ref_loop_in_required_prop"]}}}))
case("500/schema_big_int_bound", lambda: post("/v1/chat/completions", chat(
    max_tokens=4, response_format=rf({"type": "integer", "minimum": 10 ** 40,
                                      "maximum": 10 ** 41}))))


# ================================================================ 2. HTTP layer
def raw_socket(head: bytes, body: bytes = b"", timeout=30):
    t0 = time.monotonic()
    try:
        with socket.create_connection((HOST, PORT), timeout=timeout) as s:
            s.sendall(head + body)
            reply = b""
            while len(reply) < 400:
                chunk = s.recv(400)
                if not chunk:
                    break
                reply += chunk
        status = int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/") else None
        return status, reply, time.monotonic() - t0, None if reply else "closed, no reply"
    except Exception as e:                      # noqa: BLE001
        return None, b"", time.monotonic() - t0, f"{type(e).__name__}: {e}"


def cl_digits():
    body = json.dumps({"prompt": "hi"}).encode()
    auth = f"Authorization: Bearer {API_KEY}\r\n".encode() if API_KEY else b""
    head = (b"POST /tokenize HTTP/1.1\r\nHost: x\r\n" + auth +
            b"Content-Type: application/json\r\nContent-Length: " + b"9" * 5000 +
            b"\r\nConnection: close\r\n\r\n")
    return raw_socket(head, body)


case("http/content_length_5000_digits", cl_digits)


def big_header():
    # 1 MB: small enough to be sent whole before the server's 431 and close (a 20 MB one
    # is cut off mid-send: a connection reset, not an answer)
    res = request("GET", "/health", headers={"x-junk": "a" * int(1_000_000 * min(SCALE, 1))})
    flags = ["NO_HEADER_LIMIT"] if res[0] == 200 else []
    return res, flags, "1 MB header"


case("http/header_1MB", big_header)
case("http/utf16_body_lone_surrogate", lambda: post(
    "/tokenize", '{"prompt": "\ud800"}'.encode("utf-16-le", "surrogatepass")))
case("http/cesu_surrogate_utf8", lambda: post("/tokenize", b'{"prompt": "\xed\xa0\x80"}'))


# ================================================================ 3. Responses store / state
def responses_metadata():
    big = "m" * int(5_000_000 * SCALE)
    last = None
    for i in range(3):
        last = post("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 1,
                                      "metadata": {"k": big + str(i)}})
    return last, [], "3 x 5 MB metadata stored (store defaults to true)"


case("mem/responses_store_metadata_3x5MB", responses_metadata)


def responses_tool_junk():
    res = post("/v1/responses", {
        "model": MODEL, "input": "hi", "max_output_tokens": 1, "tool_choice": "none",
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"},
                   "description": "d" * 2_000_000, "junk": "j" * 2_000_000}]})
    flags = ["ECHOED_UNKNOWN_KEY"] if res[0] == 200 and b'"junk"' in res[1] else []
    return res, flags, "unknown tool key + 2 MB description, tool_choice none"


case("mem/responses_tool_unknown_key_echo", responses_tool_junk)


def responses_mutation():
    r1 = post("/v1/responses", {
        "model": MODEL, "input": "Call the tool f.", "max_output_tokens": 128, "temperature": 0,
        "parallel_tool_calls": False,       # else SmolLM2 calls f until the tokens run out
        "tools": [{"type": "function", "name": "f", "parameters": {
            "type": "object", "properties": {}, "additionalProperties": False}}],
        "tool_choice": "required"})
    if r1[0] != 200:
        return r1, ["SETUP_FAILED"], "first response"
    resp = json.loads(r1[1])
    calls = [o for o in resp["output"] if o.get("type") == "function_call"]
    if not calls:
        return r1, ["SETUP_FAILED"], "no function_call in the first response"
    rid, cid = resp["id"], calls[0]["call_id"]

    def probe():
        r = post("/v1/responses", {"model": MODEL, "previous_response_id": rid,
                                   "max_output_tokens": 1, "store": False,
                                   "input": [{"type": "function_call_output", "call_id": cid,
                                              "output": "ok"}]})
        return r, (json.loads(r[1])["usage"]["input_tokens"] if r[0] == 200 else None)

    _, before = probe()
    for i in range(3):
        post("/v1/responses", {"model": MODEL, "previous_response_id": rid,
                               "max_output_tokens": 1, "store": False, "input": [
                                   {"type": "function_call", "call_id": f"x{i}", "name": "f",
                                    "arguments": json.dumps({"pad": "y" * 300})},
                                   {"type": "function_call_output", "call_id": f"x{i}",
                                    "output": "ok"}]})
    res, after = probe()
    flags = ["MUTATION"] if before is not None and after is not None and after > before else []
    return res, flags, f"input_tokens of the same follow-up: before {before}, after {after}"


case("state/responses_prev_id_history_mutation", responses_mutation)


# ================================================================ 4. engine-wide slowdown
def stop_ids_slowdown():
    base = comp(prompt="Count: 1, 2, 3,", max_tokens=32, ignore_eos=True, temperature=0, n=4)
    t0 = post("/v1/completions", base)
    n = int(2_000_000 * min(SCALE, 1))
    attack = {**base, "min_tokens": 1, "stop_token_ids": [VOCAB - 1] * n}
    side: dict = {}

    def bystander():
        time.sleep(3)
        side["r"] = post("/v1/completions", comp(prompt="Hello", max_tokens=8, temperature=0))
    th = threading.Thread(target=bystander)
    th.start()
    res = post("/v1/completions", attack)
    th.join()
    b = side.get("r")
    flags = ["SLOWDOWN"] if res[2] > 5 * t0[2] + 2 else []
    return res, flags, (f"baseline {t0[2]:.2f}s; with {n} stop_token_ids {res[2]:.2f}s; "
                        f"bystander 8-token request {b[2] if b else float('nan'):.2f}s")


case("cpu/stop_token_ids_2M_duplicates", stop_ids_slowdown)


def logit_bias_full_vocab():
    base = comp(prompt="Count: 1, 2, 3,", max_tokens=32, ignore_eos=True, temperature=0, n=4)
    t0 = post("/v1/completions", base)
    res = post("/v1/completions", {**base, "logit_bias": {str(i): 0.001 for i in range(VOCAB)}})
    return res, (["SLOWDOWN"] if res[2] > 5 * t0[2] + 2 else []), \
        f"baseline {t0[2]:.2f}s, with {VOCAB}-entry logit_bias {res[2]:.2f}s"


case("cpu/logit_bias_whole_vocab", logit_bias_full_vocab)


# ================================================================ 5. event-loop stalls (parsing)
def detok_many():
    n = int(min(MAX_BODY, 14_000_000 * SCALE) // (len(str(TOK_A)) + 1))
    body = b'{"tokens":[' + (str(TOK_A).encode() + b",") * n + str(TOK_A).encode() + b"]}"
    res = post("/detokenize", body)
    return res, [], f"{n} token ids, {len(body) / 1e6:.1f} MB; response {len(res[1]) / 1e6:.1f} MB"


case("loop/detokenize_7M_ids", detok_many)


def many_objects():
    n = int(min(MAX_BODY, 14_000_000 * SCALE) // 3)
    body = b'{"model":"' + MODEL.encode() + b'","max_tokens":1,"messages":[' + \
        b"{}," * n + b"{}]}"
    return post("/v1/chat/completions", body), [], f"{n} empty objects"


case("loop/chat_messages_4M_empty_objects", many_objects)


def many_numbers_refused_field():
    n = int(min(MAX_BODY, 14_000_000 * SCALE) // 2)
    body = b'{"prompt":"hi","max_tokens":1,"nope":[' + b"0," * n + b"0]}"
    return post("/v1/completions", body), [], f"{n} ints in an unknown field (refused after parse)"


case("loop/completions_7M_ints_unknown_field", many_numbers_refused_field)


def many_small_objects():
    n = int(min(MAX_BODY, 14_000_000 * SCALE) // 10)
    body = b'{"prompt":"hi","max_tokens":1,"nope":[' + b'{"a":[1]},' * n + b"0]}"
    return post("/v1/completions", body), [], f"{n} small objects in an unknown field"


case("loop/completions_1.4M_small_objects", many_small_objects)


def tokenize_big_response():
    text = ("a " * int(min(MAX_BODY, 14_000_000 * SCALE) // 2))
    res = post("/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True})
    return res, [], f"{len(text) / 1e6:.1f} MB of 'a ' -> response {len(res[1]) / 1e6:.1f} MB"


case("loop/tokenize_7M_tokens_with_strs", tokenize_big_response)


# ================================================================ 6. tokenizer memory / CPU
def long_words(k: int, size: int):
    last = None
    for i in range(k):
        w = rand_word(size, seed=int(time.time() * 1000) + i)
        last = post("/tokenize", {"model": MODEL, "prompt": w})
    return last, [], f"{k} distinct single words of {size / 1e6:.1f} MB (BPE word cache keeps each)"


case("mem/tokenize_one_4MB_word", lambda: long_words(1, int(4_000_000 * SCALE)))
case("mem/tokenize_three_4MB_words_retained", lambda: long_words(3, int(4_000_000 * SCALE)))
case("mem/completions_12MB_word_then_400", lambda: post("/v1/completions", comp(
    prompt=rand_word(int(min(12_000_000 * SCALE, MAX_BODY - 1000)), 7))))
case("cpu/tokenize_4MB_of_lt", lambda: post("/tokenize", {
    "model": MODEL, "prompt": "<" * int(4_000_000 * SCALE)}))
case("mem/embeddings_64x200KB_words", lambda: post("/v1/embeddings", {
    "model": MODEL, "input": [rand_word(200_000, 100 + i) for i in range(64)]}))
case("cpu/tokenize_1MB_random_word", lambda: post("/tokenize", {
    "model": MODEL, "prompt": rand_word(int(1_000_000 * SCALE), 9)}))
case("cpu/chat_250KB_random_word", lambda: post("/v1/chat/completions", chat(
    messages=[{"role": "user", "content": rand_word(int(250_000 * SCALE), 10)}])))
case("cpu/echo_hidden_lead_specials", lambda: post("/v1/completions", comp(
    prompt=EOS_TEXT * 3000, echo=True, max_tokens=1)))


# ================================================================ 7. grammar work outside the time limit
# work done before the compile's 5 s limit starts (telling Lark from GBNF, GBNF's conversion)
# and compiles that outlast it (their worker goes on, bounded by llguidance's own limits)
N_NL = int(os.environ.get("N_NEWLINES", 40_000 * SCALE))
case(f"freeze/guided_grammar_{N_NL}_newlines", lambda: post("/v1/completions", comp(
    guided_grammar="\n" * N_NL + "x")))
case("freeze/structured_outputs_grammar_newlines_chat", lambda: post(
    "/v1/chat/completions", chat(structured_outputs={"grammar": "\n" * (N_NL // 2) + "x"})))


def gbnf_literal_big():
    n = int(min(8_000_000 * SCALE, MAX_BODY - 1000))
    return post("/v1/completions", comp(guided_grammar='root ::= "' + "a" * n + '"')), [], \
        f"GBNF with one {n / 1e6:.0f} MB literal (pure-Python converter, per-char objects)"


case("cpu/gbnf_one_huge_literal", gbnf_literal_big)


def heavy_enum(seed: int, n: int):
    rng = random.Random(seed)
    return {"enum": ["".join(rng.choice(string.ascii_letters) for _ in range(12))
                     for _ in range(n)]}


def allof_product(seed: int, k: int = 6):
    return {"allOf": [{"anyOf": [{"type": "object",
                                   "properties": {f"p{seed}_{i}_{j}": {"type": "integer"}},
                                   "required": [f"p{seed}_{i}_{j}"]} for j in range(k)]}
                      for i in range(k)]}


case("compile/enum_200k_strings", lambda: post("/v1/chat/completions", chat(
    response_format=rf(heavy_enum(1, int(200_000 * SCALE))))))
case("compile/allof_6x6_anyof", lambda: post("/v1/chat/completions", chat(
    response_format=rf(allof_product(1)))))
case("compile/regex_nested_counted", lambda: post("/v1/completions", comp(
    guided_regex="((a|b){1,200}(c|d){1,200}){1,200}")))


def backlog():
    seed0 = int(time.time())
    heavies = [chat(response_format=rf(heavy_enum(seed0 + i, int(200_000 * SCALE))))
               for i in range(4)] + [chat(response_format=rf(allof_product(seed0 + 10 + i)))
                                     for i in range(2)]
    outs: list = []
    ths = [threading.Thread(target=lambda b=b: outs.append(post("/v1/chat/completions", b)))
           for b in heavies]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    fresh = {"type": "object", "properties": {f"u{random.randrange(1 << 30)}":
                                              {"type": "integer"}}}
    res = post("/v1/chat/completions", chat(response_format=rf(fresh), max_tokens=4))
    timed_out = sum(1 for o in outs if o[0] == 400 and b"took longer" in o[1])
    flags = ["BACKLOG"] if res[0] == 400 and b"took longer" in res[1] else []
    return res, flags, (f"{timed_out}/{len(outs)} heavy compiles timed out (their work goes on "
                        f"in the 2-worker pool); then a fresh tiny schema took {res[2]:.2f}s")


case("compile/backlog_then_tiny_schema", backlog)

# ================================================================ 8. may kill the process (native recursion)
# llguidance's compiler recurses once per link of a $ref or rule chain: 2,000 links overflowed
# an 8 MB thread stack (SIGSEGV: the whole server). Run last; /health is checked after each.
if os.environ.get("SKIP_CRASH") != "1":
    N_CHAIN = int(os.environ.get("N_CHAIN", 100_000 * min(SCALE, 1)))
    defs = {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}}
            for i in range(N_CHAIN)}
    defs[f"d{N_CHAIN}"] = {"type": "integer"}
    case(f"crash/json_ref_chain_{N_CHAIN}", lambda: post("/v1/chat/completions", chat(
        response_format=rf({"$ref": "#/$defs/d0", "$defs": defs}))), check_alive=True)
    term = "start: A0\n" + "".join(f"A{i}: A{i + 1}\n" for i in range(N_CHAIN)) + \
        f'A{N_CHAIN}: "x"\n'
    case(f"crash/lark_terminal_chain_{N_CHAIN}", lambda: post("/v1/completions", comp(
        guided_grammar=term)), check_alive=True)
    rules = "start: a0\n" + "".join(f"a{i}: a{i + 1}\n" for i in range(N_CHAIN)) + \
        f'a{N_CHAIN}: "x"\n'
    case(f"crash/lark_rule_chain_{N_CHAIN}", lambda: post("/v1/completions", comp(
        guided_grammar=rules)), check_alive=True)
    under = "start: a0\n" + "".join(f"a{i}: a{i + 1}\n" for i in range(5000)) + 'a5000: "x"\n'
    case("crash/lark_rule_chain_5000_under_the_cap", lambda: post("/v1/completions", comp(
        guided_grammar=under)), check_alive=True)
    nest = "start: " + "(" * 200_000 + '"x"' + ")" * 200_000 + "\n"
    case("crash/lark_200k_nested_parens", lambda: post("/v1/completions", comp(
        guided_grammar=nest)), check_alive=True)
    # GBNF chain: gbnf_to_lark.resolve's fix-point loop is O(N^2) (one rule fixed per pass),
    # then the TERMINAL chain it produces goes to the lark compiler as above
    N_G = int(os.environ.get("N_GBNF", 20_000 * min(SCALE, 1)))
    gbnf = "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(N_G)) + \
        f'r{N_G} ::= "a"\n'
    case(f"crash/gbnf_rule_chain_{N_G}", lambda: post("/v1/completions", comp(
        guided_grammar=gbnf)), check_alive=True)

# ------------------------------------------------------------------------------ summary
WATCH.stop = True
bad = [(n, f) for n, f in RESULTS if f and f != ["ok"]]
print(f"# {len(RESULTS)} cases, {len(bad)} flagged", flush=True)
for n, f in bad:
    print(f"#   {n}: {' '.join(f)}", flush=True)
print(f"# server alive at the end: {alive()}", flush=True)
