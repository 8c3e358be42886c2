"""Engine replicas on Ray Serve (ostinato/server/replicas, docs/replicas.md): two replicas of
one thread each behind the same routes answer as the single-process server does, bit for
bit; a mixed load with streams and disconnects loses no request; /metrics is per replica and
aggregated; prefix-aware routing keeps a multi-tenant workload's prefix-cache hit rate near a
single engine's and above random routing's. Ray starts once for the module."""
from __future__ import annotations

import concurrent.futures as cf
import json
import random
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serverproc import free_port, start_ostinato

from ostinato.bench.tenants import tenants, workload
from ostinato.server.replicas.metrics import ReplicaMetrics, merge
from ostinato.server.replicas.routing import (
    DEPTHS,
    PrefixAffinity,
    prompt_text,
    replica_cores,
    route_keys,
)

NAME = "smollm"
LLM_ARGS = {"max_model_len": 4096, "kv_cache_gb": 0.5}


# -- the routing policy, without Ray ----------------------------------------------------------

def test_route_keys_follow_the_prompt_prefix():
    system = "You answer questions about tenant A's invoices. " * 40
    chat = {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": "hi"}]}
    other_user = {"messages": [{"role": "system", "content": system},
                               {"role": "user", "content": "something else"}]}
    a = route_keys("/v1/chat/completions", json.dumps(chat).encode())
    b = route_keys("/v1/chat/completions", json.dumps(other_user).encode())
    assert len(a) == sum(d <= len(system) for d in DEPTHS) >= 2
    assert a == b                                   # same system prompt: same keys
    parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": system}]},
                         {"role": "user", "content": "hi"}]}
    assert route_keys("/v1/chat/completions", json.dumps(parts).encode()) == a
    other = {"messages": [{"role": "system", "content": "B " + system}]}
    assert set(route_keys("/v1/chat/completions", json.dumps(other).encode())).isdisjoint(a)
    assert route_keys("/v1/chat/completions", b"not json") == []
    assert route_keys("/v1/chat/completions", b'{"messages": "x"}') == []
    for hostile in (b"[" * 100_000, b'{"prompt": ' + b"9" * 5000 + b"}"):   # the replica's 400
        assert route_keys("/v1/completions", hostile) == []
    assert prompt_text("/v1/completions", b'{"prompt": [[1, 2], [3]]}') == "1,2,"
    assert prompt_text("/v1/completions", b'{"prompt": ["ab", "c"]}') == "ab"
    assert prompt_text("/v1/messages", b'{"system": "S", "messages": []}') == "S"
    assert prompt_text("/v1/responses", b'{"instructions": "I", "input": "x"}') == "Ix"
    assert prompt_text("/v1/models", b"{}") == ""


def test_prefix_affinity_sticks_unless_much_more_loaded():
    p = PrefixAffinity("prefix", imbalance=2, rng=random.Random(0))
    reps = ["r0", "r1"]
    first = p.choose(reps, ["k1", "k2"])
    p.routed(first, ["k1", "k2"])
    other = "r1" if first == "r0" else "r0"
    for _ in range(2):                      # load 3 vs 0 is over the imbalance of 2
        assert p.choose(reps, ["k1"]) == first
        p.routed(first, ["k1"])
    assert p.choose(reps, ["k1"]) == other
    assert p.choose(reps, ["unknown"]) == other         # an unknown prefix: least loaded
    for _ in range(3):
        p.finished(first)
    assert p.choose(reps, ["k1", "k2"]) == first
    p.forget(first)
    assert "k1" not in p.owner and first not in p.load


def test_policies_and_cores_refuse_bad_values():
    with pytest.raises(ValueError, match="routing must be one of"):
        PrefixAffinity("sticky")
    with pytest.raises(ValueError, match="imbalance"):
        PrefixAffinity("prefix", imbalance=-1)
    with pytest.raises(ValueError, match="no replica"):
        PrefixAffinity().choose([], [])
    least = PrefixAffinity("least-loaded")
    least.routed("a", ["k"])
    assert least.choose(["a", "b"], ["k"]) == "b"
    assert replica_cores(0, 1, [0, 1]) == [0] and replica_cores(1, 1, [1, 0]) == [1]
    assert replica_cores(1, 2, [0, 1, 2, 3]) == [2, 3]
    assert replica_cores(2, 1, [0, 1]) == [0]               # more replicas than cores: wrap


def test_merged_metrics_label_replicas_and_recompute_the_hit_rate():
    def text(hit_rate, accepted):
        return ("# TYPE ostinato:prefix_cache_hit_rate gauge\n"
                f'ostinato:prefix_cache_hit_rate{{model_name="m"}} {hit_rate}\n'
                "# TYPE ostinato_requests_accepted counter\n"
                f'ostinato_requests_accepted_total{{model_name="m"}} {accepted}\n')
    out = merge([ReplicaMetrics(0, text(0.5, 3), 100, 50),
                 ReplicaMetrics(1, text(0.0, 1), 300, 0)], expected=2)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(out) for s in fam.samples}
    m = ("model_name", "m")
    assert got[("ostinato_requests_accepted_total", (m,))] == 4
    assert got[("ostinato_requests_accepted_total", (m, ("replica", "1")))] == 1
    assert got[("ostinato:prefix_cache_hit_rate", (m,))] == 50 / 400    # not the mean 0.25
    assert got[("ostinato:prefix_cache_hit_rate", (m, ("replica", "0")))] == 0.5
    assert got[("ostinato:replicas_up", ())] == 2


def test_cli_refuses_routing_without_replicas_and_loads_no_ray():
    r = subprocess.run([sys.executable, "-m", "ostinato", "serve", "--routing", "random"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--routing goes with --replicas" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ostinato", "serve", "--replicas", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--replicas" in r.stderr
    code = ("import sys, ostinato.cli, ostinato.server.run, ostinato.server.app; "
            "print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_serve_run_app_builder_checks_its_arguments():
    """`serve run ostinato.server.replicas.ray_app:app_builder k=v ...` (strings, as `serve
    run` passes them); building the application starts nothing."""
    from ray.serve import Application

    from ostinato.server.replicas.ray_app import app_builder
    app = app_builder({"model": "smollm2-135m-instruct", "replicas": "3", "threads": "1",
                       "routing": "least-loaded", "kv_cache_gb": "0.5",
                       "kv_cache_dir": "/tmp/ostinato-kv-shared"})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="unknown arguments"):
        app_builder({"replica": "2"})
    with pytest.raises(ValueError, match="routing must be one of"):
        app_builder({"routing": "sticky"})


def test_cli_serves_replicas_and_stops_on_sigterm(smollm_path):
    """`ostinato serve --replicas 2` end to end (its own Ray, started and stopped before the
    module's: this test comes first)."""
    from serverproc import Launch
    srv = start_ostinato(smollm_path, "--replicas", "2", "--served-model-name", NAME,
                         "--max-model-len", "1024", "--kv-cache-gb", "0.1", "--api-key", "k1",
                         threads=1, model_id=NAME, how=Launch(timeout=240, grace_s=60))
    try:
        assert httpx.get(srv.base + "/health").json() == {"status": "ok", "replicas": 2}
        body = {"model": NAME, "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 4}
        r = httpx.post(srv.base + "/v1/chat/completions", json=body)
        assert r.status_code == 401                       # each replica's own key check
        r = httpx.post(srv.base + "/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200 and r.json()["model"] == NAME
        m = samples(srv.base)
        assert m[("ostinato:replicas_up", None, None)] == 2
        assert {r for (n, r, _) in m if n == "ostinato_requests_accepted_total"} == {
            None, "0", "1"}
        r = httpx.post(srv.base + "/v1/completions", json={"prompt": "x", "top_p": 0},
                       headers={"Authorization": "Bearer k1"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.log()
    log = srv.log(200_000)                  # each replica pinned to a core of its own
    assert "on cores [0], 1 thread(s)" in log and "on cores [1], 1 thread(s)" in log


# -- two replicas on Ray Serve -----------------------------------------------------------------

@pytest.fixture(scope="module")
def single(smollm_path):
    srv = start_ostinato(smollm_path, "--served-model-name", NAME, "--max-model-len", "4096",
                         "--kv-cache-gb", "0.5", threads=1, model_id=NAME)
    try:
        yield srv.base
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(model_path, routing: str) -> None:
    from ray import serve

    from ostinato.server.replicas.ray_app import replica_app
    serve.run(replica_app(str(model_path), replicas=2, threads=1, routing=routing,
                          served_model_name=NAME, **LLM_ARGS), name="ostinato", route_prefix="/")


@pytest.fixture(scope="module")
def replicas(cluster, smollm_path):
    deploy(smollm_path, "prefix")
    return cluster


def samples(base: str) -> dict:
    """/metrics by (name, replica label or None, outcome label or None)."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for s in fam.samples:
            out[(s.name, s.labels.get("replica"), s.labels.get("outcome"))] = s.value
    return out


def settled(base: str, timeout: float = 30.0) -> dict:
    """Metrics once nothing runs and every accepted request has its outcome."""
    deadline = time.monotonic() + timeout
    while True:
        m = samples(base)
        accepted = m[("ostinato_requests_accepted_total", None, None)]
        outcomes = sum(v for (n, r, o), v in m.items()
                       if n == "ostinato_request_outcomes_total" and r is None)
        if accepted == outcomes and m[("ostinato:num_requests_running", None, None)] == 0:
            return m
        assert time.monotonic() < deadline, f"accepted {accepted} != outcomes {outcomes}"
        time.sleep(0.2)


def chat(base: str, content: str, **kw) -> dict:
    body = {"model": NAME, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 12, **kw}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream_text(base: str, path: str, body: dict) -> str:
    text = ""
    with httpx.stream("POST", base + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    text += c.get("text") or (c.get("delta") or {}).get("content") or ""
    return text


def test_greedy_outputs_equal_the_single_process_server(single, replicas):
    import openai
    clients = [openai.OpenAI(base_url=b + "/v1", api_key="x", max_retries=0, timeout=120)
               for b in (single, replicas)]
    prompts = ["Name three colours.", "What is 2 + 2?", "Write a haiku about rain.",
               "Name three colours."]
    got = []
    for c in clients:
        answers = []
        for p in prompts:
            r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}],
                                          temperature=0, max_tokens=24, logprobs=True,
                                          top_logprobs=2)
            answers.append((r.choices[0].message.content,
                            [(t.token, t.logprob) for t in r.choices[0].logprobs.content]))
        r = c.completions.create(model=NAME, prompt="The capital of France is", max_tokens=16,
                                 temperature=0, logprobs=1)
        answers.append((r.choices[0].text, r.choices[0].logprobs.token_logprobs))
        got.append(answers)
    assert got[0] == got[1]
    for base in (single, replicas):
        got.append((stream_text(base, "/v1/chat/completions",
                                {"model": NAME, "temperature": 0, "max_tokens": 24,
                                 "messages": [{"role": "user", "content": prompts[0]}]}),
                    stream_text(base, "/v1/completions", {"model": NAME, "temperature": 0,
                                "max_tokens": 16, "prompt": "The capital of France is"})))
    assert got[2] == got[3] == (got[0][0][0], got[0][4][0])


def test_mixed_load_loses_no_request(replicas):
    before = settled(replicas)
    long = {"model": NAME, "prompt": "Count: 1, 2, 3,", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True}

    def plain(i):
        return chat(replicas, f"Say the number {i}.")["choices"][0]["finish_reason"]

    def streamed(i):
        return stream_text(replicas, "/v1/chat/completions", {
            "model": NAME, "temperature": 0, "max_tokens": 10,
            "messages": [{"role": "user", "content": f"Spell {i}."}]})

    def disconnect_stream(i):
        with httpx.stream("POST", replicas + "/v1/completions", json={**long, "stream": True},
                          timeout=120) as r:
            next(r.iter_lines())            # the first event, then the client goes
        return "gone"

    def disconnect_plain(i):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(replicas + "/v1/completions", json=long, timeout=1.0)
        return "gone"

    def bad(i):
        r = httpx.post(replicas + "/v1/completions", json={"model": NAME, "prompt": "x",
                                                           "temperature": 5})
        return r.status_code

    jobs = ([(plain, i) for i in range(6)] + [(streamed, i) for i in range(4)] +
            [(disconnect_stream, i) for i in range(3)] + [(disconnect_plain, i) for i in
                                                          range(2)] + [(bad, i) for i in range(2)])
    random.Random(1).shuffle(jobs)
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: j[0](j[1]), jobs))
    assert results.count(400) == 2 and results.count("gone") == 5
    after = settled(replicas)

    def delta(name, replica=None, outcome=None):
        return after.get((name, replica, outcome), 0) - before.get((name, replica, outcome), 0)
    assert delta("ostinato_requests_accepted_total") == 15
    assert delta("ostinato_request_outcomes_total", outcome="aborted") == 5
    assert delta("ostinato_request_outcomes_total", outcome="completed") == 10
    assert delta("ostinato_request_outcomes_total", outcome="error") == 0
    for rep in ("0", "1"):                  # both replicas served, each settles what it took
        took = delta("ostinato_requests_accepted_total", rep)
        assert took > 0
        assert took == sum(delta("ostinato_request_outcomes_total", rep, o)
                           for o in ("completed", "error", "aborted"))
    # the disconnected ones were stopped on their replica, far short of 400 tokens each
    assert delta("ostinato:generation_tokens_total") < 10 * 12 + 5 * 200


# -- prefix-aware routing: a multi-tenant workload ---------------------------------------------

def hit_rate(base: str, systems: list[str], users: int) -> float:
    return workload(base, NAME, systems, users)["hit_rate"]


def test_prefix_routing_keeps_the_hit_rate_of_one_engine(single, replicas, smollm_path):
    users = 4           # a shorter workload than scripts/replica_hit_rate.py's
    one_engine = hit_rate(single, tenants(1), users)
    m0 = samples(replicas)
    prefix = hit_rate(replicas, tenants(2), users)
    m1 = samples(replicas)
    deploy(smollm_path, "random")
    rand = hit_rate(replicas, tenants(3), users)
    print(f"prefix-cache hit rate: one engine {one_engine:.3f}, prefix-aware {prefix:.3f}, "
          f"random {rand:.3f}")
    assert prefix >= one_engine - 0.10
    assert prefix >= rand + 0.08
    # /metrics' aggregate hit counters saw the same workload
    hits = (m1[("ostinato:prefix_cache_hits_total", None, None)] -
            m0[("ostinato:prefix_cache_hits_total", None, None)])
    queries = (m1[("ostinato:prefix_cache_queries_total", None, None)] -
               m0[("ostinato:prefix_cache_queries_total", None, None)])
    assert abs(hits / queries - prefix) < 0.05
