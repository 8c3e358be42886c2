"""OpenAI-API conformance, as outside suites (llama.cpp's server tests, lm-eval, the `openai`
client's less common paths) found it: every field honoured or refused with a 400 naming it,
405s and CORS, the extra routes clients probe, usage details and the fingerprint."""
from __future__ import annotations

import base64
import math
import subprocess
import sys
import threading

import httpx
import numpy as np
import openai
import pytest
from serverproc import start_server, stop_server
from test_errors import assert_error

pytestmark = pytest.mark.model
HI = [{"role": "user", "content": "Hi"}]
PREFILL = [{"role": "user", "content": "What is the capital of France?"},
           {"role": "assistant", "content": "The capital of France is"}]


def chat(http, server, **body):
    body = {"model": server.model, "messages": HI, "max_tokens": 2, "temperature": 0, **body}
    return http.post("/v1/chat/completions", json=body)


def complete(http, server, **body):
    body = {"model": server.model, "prompt": "Hello", "max_tokens": 2, "temperature": 0, **body}
    return http.post("/v1/completions", json=body)


def detok(http, ids) -> str:
    return http.post("/detokenize", json={"tokens": ids}).json()["prompt"]


# ----------------------------------------------------------------------- chat templates
def test_continue_final_message_prefills_the_assistant(client, server, http):
    """The prompt ends inside the assistant's message (no end of turn, no new turn), and
    the reply continues it."""
    body = {"messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True}
    prompt = detok(http, http.post("/tokenize", json=body).json()["tokens"])
    assert prompt.endswith("<|im_start|>assistant\nThe capital of France is")
    closed = detok(http, http.post("/tokenize", json={"messages": PREFILL}).json()["tokens"])
    assert closed.endswith("The capital of France is<|im_end|>\n<|im_start|>assistant\n")
    r = client.chat.completions.create(
        model=server.model, messages=PREFILL, max_tokens=4, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert r.choices[0].message.content.startswith(" Paris"), r.choices[0].message.content
    assert r.usage.prompt_tokens == len(http.post("/tokenize", json=body).json()["tokens"])


def test_add_generation_prompt_false_opens_no_turn(http, server):
    no_turn = detok(http, http.post("/tokenize", json={"messages": HI,
                                                       "add_generation_prompt": False}
                                    ).json()["tokens"])
    assert no_turn.endswith("Hi<|im_end|>\n")
    r = chat(http, server, add_generation_prompt=False)
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == len(
        http.post("/tokenize", json={"messages": HI, "add_generation_prompt": False}
                  ).json()["tokens"])


def test_continue_with_generation_prompt_is_400(http, server):
    r = chat(http, server, messages=PREFILL, continue_final_message=True)   # agp defaults true
    assert_error(r, 400, "continue_final_message")
    r = chat(http, server, messages=[*HI, {"role": "assistant", "content": ""}],
             continue_final_message=True, add_generation_prompt=False)
    assert_error(r, 400, "messages")                            # nothing to continue


def test_chat_template_kwargs_the_template_does_not_read_are_400(http, server):
    for kwargs in ({"enable_thinking": False}, {"messages": []}, {"bos_token": "x"}):
        r = chat(http, server, chat_template_kwargs=kwargs)
        err = assert_error(r, 400, "chat_template_kwargs")
        assert next(iter(kwargs)) in err["message"]
    assert_error(chat(http, server, chat_template="{{ messages }}"), 400, "chat_template")


@pytest.fixture(scope="module")
def persona_server(smollm_path, tmp_path_factory):
    """SmolLM2 with a chat template that reads a `persona` variable and trims contents;
    its embeddings pool by the mean."""
    template = ("{% if persona is defined %}<|im_start|>system\n{{ persona }}<|im_end|>\n"
                "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = tmp_path_factory.mktemp("persona") / "persona.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm_path),
                    str(path), "--chat-template", template, "--force"], check=True,
                   capture_output=True)
    proc = start_server(path, "--max-model-len", "1024", "--kv-cache-gb", "0.1",
                        "--pooling", "mean")
    yield proc
    stop_server(proc)


def test_chat_template_kwargs_reach_the_template(persona_server):
    s = persona_server
    with httpx.Client(base_url=s.base, timeout=120) as http:
        pirate = {"messages": HI, "chat_template_kwargs": {"persona": "You are a pirate."}}
        ids = http.post("/tokenize", json=pirate).json()["tokens"]
        assert detok(http, ids).startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
        plain = http.post("/tokenize", json={"messages": HI}).json()["tokens"]
        assert "pirate" not in detok(http, plain)
        r = http.post("/v1/chat/completions", json={**pirate, "max_tokens": 1})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)
        # the template trims contents: the prefill is found trimmed, and continued
        body = {"messages": [*HI, {"role": "assistant", "content": "Ahoy "}],
                "add_generation_prompt": False, "continue_final_message": True}
        text = detok(http, http.post("/tokenize", json=body).json()["tokens"])
        assert text.endswith("<|im_start|>assistant\nAhoy")


# ------------------------------------------------------------------ refused and checked
@pytest.mark.parametrize("route, field, value", [
    ("completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("chat", "tool_choice", "auto"),              # without tools: nothing to choose from
    ("chat", "response_format", {"type": "xml"}),     # json_object/json_schema: structured
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "reasoning_effort", "low"),
    ("chat", "store", True),
    ("chat", "prediction", {"type": "content", "content": "x"}),
    ("chat", "functions", [{"name": "f"}]),
    ("chat", "web_search_options", {"search_context_size": "low"}),
    ("chat", "service_tier", "flex"),
    ("chat", "an_unknown_field", 1),
    ("completions", "suffix", " and that is all."),
    ("completions", "an_unknown_field", 1),
    ("completions", "top_logprobs", 2),           # a chat field, not a completions one
])
def test_unimplemented_fields_are_400_naming_them(http, server, route, field, value):
    r = (chat if route == "chat" else complete)(http, server, **{field: value})
    err = assert_error(r, 400, field)
    assert field in err["message"]


def test_openai_limits_are_checked(http, server, client):
    assert_error(chat(http, server, temperature=2.5), 400, "temperature")
    assert chat(http, server, temperature=2.0, seed=1).status_code == 200
    assert_error(complete(http, server, stream_options={"include_usage": True}), 400,
                 "stream_options")
    assert_error(chat(http, server, stream=False, stream_options={"include_usage": True}), 400,
                 "stream_options")
    assert_error(complete(http, server, n=3, best_of=2), 400, "best_of")
    assert_error(complete(http, server, n=1, best_of=2, stream=True), 400, "best_of")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt="x", suffix="y", max_tokens=1)


def test_best_of_returns_the_best_by_mean_logprob(http, server):
    """best_of candidates are drawn as n=best_of would draw them (same seed); the answer
    holds the n with the highest mean token log-probability, best first."""
    kw = dict(prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=11, logprobs=0,
              ignore_eos=True)
    pool = complete(http, server, n=4, **kw).json()["choices"]

    def mean(c):
        return sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"])
    ranked = sorted(pool, key=lambda c: (-mean(c), c["index"]))
    r = complete(http, server, n=2, best_of=4, **kw).json()
    assert [c["text"] for c in r["choices"]] == [c["text"] for c in ranked[:2]]
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert r["usage"]["completion_tokens"] == 4 * 6            # every candidate was generated
    assert len({c["text"] for c in pool}) > 2                  # the test can tell them apart


# ------------------------------------------------------------------------ routes, CORS
def test_405_is_openai_shaped(http):
    r = http.get("/v1/chat/completions")
    err = assert_error(r, 405)
    assert err["type"] == "invalid_request_error" and "POST" in err["message"]
    assert r.headers["allow"] == "POST"
    assert assert_error(http.put("/v1/models"), 405)["type"] == "invalid_request_error"


def test_error_types_are_openai_names(http, server):
    assert assert_error(chat(http, server, n=0), 400)["type"] == "invalid_request_error"
    r = httpx.get(server.v1 + "/models")
    assert assert_error(r, 401)["code"] == "invalid_api_key"
    assert assert_error(chat(http, server, model="gpt-9"), 404)["type"] == "invalid_request_error"


def test_cors_preflight_and_response_headers(server):
    """The session server allows http://allowed.example: its preflight gets the CORS
    headers without a key, the real request with one; another origin gets none."""
    pre = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(server.v1 + "/chat/completions",
                       headers={"Origin": "http://allowed.example", **pre})
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == "http://allowed.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    bad = httpx.options(server.v1 + "/chat/completions",
                        headers={"Origin": "http://evil.example", **pre})
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    got = httpx.get(server.v1 + "/models", headers={"Origin": "http://allowed.example",
                                                    "Authorization": f"Bearer {server.api_key}"})
    assert got.status_code == 200
    assert got.headers["access-control-allow-origin"] == "http://allowed.example"
    denied = httpx.get(server.v1 + "/models", headers={"Origin": "http://allowed.example"})
    assert denied.status_code == 401                    # CORS lets the page read the 401
    assert denied.headers["access-control-allow-origin"] == "http://allowed.example"


def test_cors_is_off_by_default():
    """Without --allowed-origins, a preflight is a 405 in OpenAI's shape, with no CORS
    header (the route answers whether or not a model has loaded)."""
    import uvicorn

    from ostinato.bench.serving import free_port
    from ostinato.server import build_app
    never = threading.Event()
    app = build_app(never.wait, "m", on_load_error=lambda e: None)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        while not srv.started:
            t.join(0.02)
        r = httpx.options(f"http://127.0.0.1:{port}/v1/chat/completions",
                          headers={"Origin": "http://a.example",
                                   "Access-Control-Request-Method": "POST"})
        assert assert_error(r, 405)["type"] == "invalid_request_error"
        assert "access-control-allow-origin" not in r.headers
    finally:
        never.set()
        srv.should_exit = True
        t.join(10)


def test_models_retrieve(client, server):
    m = client.models.retrieve(server.model)
    assert m.id == server.model and m.object == "model"
    assert m.embedding_dimensions == 576                        # SmolLM2's d_model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_tokenizer_info_is_what_lm_eval_reads(http, server):
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>"
    assert "pad_token" in info and info["model_max_length"] == server.max_model_len
    assert "<|im_start|>" in info["chat_template"]
    # lm-eval finds eos_token_id as the first token of encoding eos_token without specials
    eos = http.post("/tokenize", json={"prompt": info["eos_token"],
                                       "add_special_tokens": False}).json()["tokens"]
    assert eos == [2]                                           # SmolLM2's <|im_end|>


# --------------------------------------------------------------- usage and fingerprint
def test_cached_tokens_count_the_prefix_cache_hits(client, server):
    """A prompt sent twice: the second reuses every full 16-token block but the one holding
    its last token (which must be computed for its logits)."""
    prompt = "A unique preamble 7f3a9c: " + "the quick brown fox jumps over the lazy dog " * 6
    first = client.completions.create(model=server.model, prompt=prompt, max_tokens=1,
                                      temperature=0)
    second = client.completions.create(model=server.model, prompt=prompt, max_tokens=1,
                                       temperature=0)
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    msgs = [{"role": "user", "content": prompt}]
    stream = list(client.chat.completions.create(
        model=server.model, messages=msgs, max_tokens=1, stream=True,
        stream_options={"include_usage": True}))
    again = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=1)
    before = stream[-1].usage.prompt_tokens_details.cached_tokens   # the system prompt's
    full = (again.usage.prompt_tokens - 1) // 16 * 16
    assert before < full and again.usage.prompt_tokens_details.cached_tokens == full


def test_system_fingerprint_is_stable_and_names_the_build(client, server):
    a = client.chat.completions.create(model=server.model, messages=HI, max_tokens=1)
    b = client.completions.create(model=server.model, prompt="x", max_tokens=1)
    chunks = list(client.completions.create(model=server.model, prompt="x", max_tokens=2,
                                            stream=True))
    fp = a.system_fingerprint
    assert fp.startswith("fp_") and len(fp) == 15
    assert b.system_fingerprint == fp and {c.system_fingerprint for c in chunks} == {fp}
    from ostinato.llm import system_fingerprint
    assert system_fingerprint("a" * 64, "k1") != system_fingerprint("b" * 64, "k1")
    assert system_fingerprint("a" * 64, "k1") != system_fingerprint("a" * 64, "k2")


# ------------------------------------------------------------------------- embeddings
def embed(client, server, inputs, **kw):
    return client.embeddings.create(model=server.model, input=inputs, **kw)


def test_embeddings_shape_norm_and_encodings(client, server):
    r = embed(client, server, ["Hello world", "A cat sat on the mat."], encoding_format="float")
    assert [d.index for d in r.data] == [0, 1] and r.object == "list"
    v = np.array(r.data[0].embedding)
    assert v.shape == (576,) and math.isclose(np.linalg.norm(v), 1.0, rel_tol=1e-5)
    assert not np.allclose(v, r.data[1].embedding)
    # asked for base64, the client hands back the string: little-endian float32 bytes
    b64 = embed(client, server, "Hello world", encoding_format="base64").data[0].embedding
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    assert np.array_equal(decoded, np.array(r.data[0].embedding, dtype=np.float32))
    # asked for nothing, the client asks for base64 and decodes it itself
    default = embed(client, server, "Hello world").data[0].embedding
    assert default == r.data[0].embedding
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0


def test_embeddings_are_batch_invariant(client, server, http):
    """The same input alone, in a batch, as token ids and among concurrent requests: the
    same bits. A long input is prefilled in chunks that other requests change."""
    long = "word " * 700                                       # > 512: chunked prefill
    alone = embed(client, server, "The sea is calm tonight.").data[0].embedding
    batch = embed(client, server, ["Other text", "The sea is calm tonight.", long]).data
    assert batch[1].embedding == alone
    ids = http.post("/tokenize", json={"prompt": "The sea is calm tonight."}).json()["tokens"]
    assert embed(client, server, [ids]).data[0].embedding == alone
    long_alone = embed(client, server, long).data[0].embedding
    assert batch[2].embedding == long_alone
    out = {}

    def run(k, x):
        out[k] = embed(client, server, x).data[0].embedding
    threads = [threading.Thread(target=run, args=(k, x)) for k, x in
               enumerate([long, "a b c " * 90, "Hello", long])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == out[3] == long_alone


def test_embeddings_are_the_last_final_hidden_state(client, server, http, smollm_path):
    """SmolLM2's output layer is its token embedding matrix E (tied), so E @ embedding ranks
    the next token as the model does: the vector is the last position's hidden state after
    the output norm (normalising changes no ranking)."""
    import gguf
    reader = gguf.GGUFReader(smollm_path)
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names                         # tied, as assumed
    t = names["token_embd.weight"]
    E = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, 576)
    for prompt in ("The capital of France is", "One, two, three,"):
        v = np.array(embed(client, server, prompt).data[0].embedding, dtype=np.float32)
        top = client.completions.create(model=server.model, prompt=prompt, max_tokens=1,
                                        temperature=0, logprobs=5)
        ours = [detok(http, [int(i)]) for i in np.argsort(-(E @ v))[:3]]
        assert ours[0] == top.choices[0].text, (prompt, ours, top.choices[0].text)
        assert set(ours) <= set(top.choices[0].logprobs.top_logprobs[0]), ours


def test_embeddings_errors(http, server):
    def post(**body):
        return http.post("/v1/embeddings", json={"model": server.model, "input": "x", **body})
    assert_error(post(input=""), 400, "input")
    assert_error(post(input=[]), 400, "input")
    assert_error(post(dimensions=128), 400, "dimensions")
    assert post(dimensions=576).status_code == 200
    assert_error(post(encoding_format="int8"), 400, "encoding_format")
    assert_error(post(input="word " * 2000), 400, "input")
    assert_error(post(model="gpt-9"), 404, "model")
    assert_error(post(embd_normalize=1), 400, "embd_normalize")


def test_mean_pooling(persona_server, client, server):
    """--pooling mean: one token's mean is that token's row, the same bits as last pooling
    (the session server, same weights); longer inputs differ from last pooling; and the
    mean over a chunked prefill does not depend on what else ran."""
    s = persona_server
    mean = openai.OpenAI(base_url=s.base + "/v1", api_key="x", max_retries=0, timeout=120)
    one = [[504]]                                               # "The", no BOS in SmolLM2
    assert embed(mean, s, one).data[0].embedding == embed(client, server, one).data[0].embedding
    text = "The sea is calm tonight."
    m = np.array(embed(mean, s, text).data[0].embedding)
    assert math.isclose(np.linalg.norm(m), 1.0, rel_tol=1e-5)
    assert not np.allclose(m, embed(client, server, text).data[0].embedding, atol=1e-3)
    long = "tide " * 700                                       # prefilled in chunks
    alone = embed(mean, s, long).data[0].embedding
    out = {}

    def run(k, x):
        out[k] = embed(mean, s, x).data[-1].embedding
    threads = [threading.Thread(target=run, args=(k, x)) for k, x in
               enumerate(["a b c " * 90, long, "Hello", ["x", long]])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[1] == alone and out[3] == alone


# ------------------------------------------------------------------------------ Gemma 3
@pytest.fixture(scope="module")
def gemma(gemma_path):
    proc = start_server(gemma_path, "--max-model-len", "256", "--kv-cache-gb", "0.05")
    with httpx.Client(base_url=proc.base, timeout=120) as http:
        yield proc, http
    stop_server(proc)


def test_gemma_echo_offsets_index_the_text(gemma):
    """Gemma adds <bos>, which the echoed text does not spell: it takes no room, so every
    text_offset points at its token in `text`."""
    proc, http = gemma
    prompt = "The capital of France is Paris"
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "echo": True,
                                           "logprobs": 1, "temperature": 0}).json()
    c = r["choices"][0]
    toks, offs = c["logprobs"]["tokens"], c["logprobs"]["text_offset"]
    assert toks[0] == "<bos>" and offs[:2] == [0, 0] and c["text"].startswith(prompt)
    for tok, off in zip(toks[1:], offs[1:]):
        assert c["text"][off:off + len(tok)] == tok, (tok, off, c["text"])
    assert offs[-1] + len(toks[-1]) == len(c["text"])
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    by_ids = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True,
                                                "logprobs": 1, "temperature": 0}).json()
    c = by_ids["choices"][0]            # token ids echo as their text, <bos> spelt out
    assert c["text"].startswith("<bos>The") and c["logprobs"]["text_offset"][1] == 5


def test_gemma_fingerprint_and_template_variables(gemma, client):
    proc, http = gemma
    theirs = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).json()
    ours = client.completions.create(model=client.models.list().data[0].id, prompt="x",
                                     max_tokens=1)
    assert theirs["system_fingerprint"].startswith("fp_")
    assert theirs["system_fingerprint"] != ours.system_fingerprint    # another model file
    # no chat template: the plain transcript takes no variables, so kwargs are refused
    r = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1,
                                                "chat_template_kwargs": {"x": 1}})
    assert_error(r, 400, "chat_template_kwargs")
    prefill = http.post("/tokenize", json={"messages": PREFILL, "add_generation_prompt": False,
                                           "continue_final_message": True}).json()["tokens"]
    assert detok(http, prefill).endswith("Assistant: The capital of France is")


# ------------------------------------------------- found by llama.cpp's server test suite
@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("logprobs", [False, True])
def test_stream_finish_chunk_carries_no_text(client, server, kind, logprobs):
    """As OpenAI streams: the finish_reason comes in a chunk of its own, with an empty delta
    (text) and no logprobs, so a client that stops reading at the finish_reason (as
    llama.cpp's tests and many hand-written clients do) still has every token. The text
    read up to there equals the non-streamed answer."""
    def create(**kw):
        if kind == "chat":
            lp = {"logprobs": True, "top_logprobs": 1} if logprobs else {}
            return client.chat.completions.create(
                model=server.model, messages=HI, max_tokens=6, temperature=0, **lp, **kw)
        lp = {"logprobs": 1} if logprobs else {}
        return client.completions.create(model=server.model, prompt="Once upon a time",
                                         max_tokens=6, temperature=0, **lp, **kw)

    def text(choice):
        return (choice.delta.content or "") if kind == "chat" else choice.text

    full = create().choices[0]
    read, finishes = "", []
    for chunk in create(stream=True):
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            finishes.append(chunk)
            assert text(choice) == "" and choice.logprobs is None, chunk
            break
        read += text(choice)
    assert len(finishes) == 1 and finishes[0].choices[0].finish_reason == "length"
    assert read == (full.message.content if kind == "chat" else full.text)
