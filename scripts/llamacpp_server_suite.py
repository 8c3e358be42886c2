"""Run llama.cpp's own server test suite (tools/server/tests of the llama-cpp-python==0.3.36
sdist, in place) against `ostinato serve`, and sort every test into one of:

  pass             the test passed against ostinato
  model-specific   it failed only on content their tiny model writes (an expected-text regex,
                   a token count of their tokenizer, a vocabulary id)
  llama.cpp-only   it needs a route, request field, response field or server flag that only
                   llama-server has (/completion, /slots, /infill, n_probs, timings, --lora...)
  refused          it uses an OpenAI feature ostinato does not implement and refuses with a
                   clear 400 or 404 (tools, image input, the Responses API)
  skipped          llama.cpp itself skips it here (their skip marks; no network)
  real             none of the above: an incompatibility to fix in ostinato

The rules are RULES below, tried in order on each failed test's record (its exception, the
failing source lines, every request it made with the status and error message); the first
that matches decides; then JUDGED, a short list of tests sorted by reading them. A failure
nothing explains is "real". A passing test that got its pass only from a missing route or a
refused flag or input (VACUOUS) is counted in that class. The shim that points the suite at
ostinato is tests/llamacpp_suite/ostinato_shim.py.

    python scripts/llamacpp_server_suite.py                      # the whole suite (20-60 min)
    python scripts/llamacpp_server_suite.py unit/test_completion.py unit/test_chat_completion.py
    python scripts/llamacpp_server_suite.py --from-results r.jsonl   # classify a saved run
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SDIST = "llama_cpp_python-0.3.36"
SUITE_IN_SDIST = f"{SDIST}/vendor/llama.cpp/tools/server/tests"
CLASSES = ("pass", "model-specific", "llama.cpp-only", "refused", "skipped", "real")


def suite_dir() -> Path:
    """tools/server/tests extracted from the cached sdist (pip downloads it once if absent)."""
    home = Path(os.environ.get("OSTINATO_HOME", Path.home() / ".cache" / "ostinato")) / "sdist"
    suite = home / SUITE_IN_SDIST
    if (suite / "utils.py").exists():
        return suite
    tgz = home / f"{SDIST}.tar.gz"
    if not tgz.exists():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", "llama-cpp-python==0.3.36", "-d", str(home)], check=True)
    with tarfile.open(tgz) as tf:
        members = [m for m in tf.getmembers()
                   if m.name.startswith(SUITE_IN_SDIST + "/") and m.isfile()]
        tf.extractall(home, members=members, filter="data")
    return suite


def run_suite(files: list[str], results: Path, fresh: bool, timeout: int) -> int:
    """pytest over their unit/ files with the shim; one JSON line per test into results."""
    suite = suite_dir()
    (suite / "tmp").mkdir(exist_ok=True)        # their scratch folder (LLAMA_CACHE=tmp)
    env = {**os.environ, "OSTINATO_SUITE_DIR": str(suite), "OSTINATO_SUITE_RESULTS": str(results),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "llamacpp_suite"),
                                          os.environ.get("PYTHONPATH", "")]),
           "OSTINATO_SUITE_FRESH": "1" if fresh else "0"}
    cmd = [sys.executable, "-m", "pytest", "-p", "ostinato_shim", "-p", "no:cacheprovider",
           "-c", str(suite / "pytest.ini"), "--rootdir", str(suite), "-m", "not slow",
           "-q", "--tb=short", "-rN", f"--timeout={timeout}", *(files or ["unit"])]
    return subprocess.run(cmd, cwd=suite, env=env).returncode



# ---------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------
# routes only llama-server has (each answers a 404 here)
LLAMACPP_ROUTES = re.compile(r"^/(completions?|embeddings?|slots|props|infill|rerank|reranking|v1/rerank|"
                             r"apply-template|lora-adapters|"
                             r"models/(load|unload)|tools|mcp|cors-proxy|"
                             r"chat/completions/input_tokens|v1/chat/completions/input_tokens|"
                             r"api/|predict|metrics/slots|sw\.js|manifest\.webmanifest|"
                             r"_app)(/.*)?$")

# OpenAI's request schema (chat, completions, embeddings), as dotted paths: a 400 that names
# a path outside it is a llama.cpp-only field; one inside it is an OpenAI field we refuse
# (README's table) or, with "Field required", one OpenAI requires and llama-server doesn't
OPENAI_FIELDS = set("""
messages model audio frequency_penalty function_call functions logit_bias logprobs
max_completion_tokens max_tokens metadata modalities n parallel_tool_calls prediction
presence_penalty prompt_cache_key reasoning_effort response_format safety_identifier seed
service_tier stop store stream stream_options temperature tool_choice tools top_logprobs
top_p user verbosity web_search_options prompt best_of echo suffix input dimensions
encoding_format response_format.type response_format.json_schema
response_format.json_schema.name response_format.json_schema.schema
response_format.json_schema.strict response_format.json_schema.description
stream_options.include_usage stream_options.include_obfuscation
""".split())

# response fields, error types and formats only llama-server has, as the failing line reads
# them: its timings and debug output, its native completion fields, its build-number
# fingerprint ("b1234"), its model aliases/tags, its context error type
LLAMACPP_RESPONSE = re.compile(
    r"""["'](timings|__verbose|generation_settings|completion_probabilities|stop_type|"""
    r"""has_new_line|truncated|tokens_cached|n_prompt_tokens|n_ctx|aliases|tags|"""
    r"""exceed_context_size_error|reasoning_content|prompt_progress|id_slot|"""
    r"""n_decoded|tokens_evaluated|tokens_predicted|authentication_error|"""
    r"""Process-Start-Time-Unix|models)["']|"""
    r"""system_fingerprint(["']\])?\.startswith\(["']b["']\)""")

# content only their tiny models write: an expected-text regex, a token count or id of their
# tokenizer (ostinato's model and tokenizer differ), an embedding value
MODEL_SPECIFIC = re.compile(r"match_regex\(|bosId|prompt_tokens\W*== *[\dn]|n_prompt|"
                            r"completion_tokens.*== *n_predicted|n_tokens|cached_tokens.*n_cache|"
                            r"pytest.approx\(.*embedding|== *expected_")


def _requests(rec: dict) -> list[dict]:
    return [e for e in rec.get("events", []) if e.get("event") == "request"]


def _lines(rec: dict) -> str:
    return "\n".join(rec.get("failed_lines") or [])


def _error_path(ev: dict) -> tuple[str, str]:
    """(the dotted field path a 400 names, its message): 'response_format.schema: ...'."""
    try:
        msg = json.loads(ev.get("error") or "{}")["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return "", ""
    path = msg.split(":", 1)[0] if ":" in msg else ""
    return re.sub(r"\.\d+", "", path), msg       # messages.0.content -> messages.content


def _first_400(rec: dict) -> tuple[str, str]:
    for ev in _requests(rec):
        if ev["status"] == 400:
            return _error_path(ev)
    return "", ""


def llamacpp_option(rec: dict) -> bool:
    """The shim found a llama-server flag or model with no ostinato equivalent."""
    return rec.get("exc_type") == "LlamaCppOnlyOption"


def llamacpp_route(rec: dict) -> bool:
    """A request went to a route only llama-server has and got our 404."""
    return any(e["status"] == 404 and LLAMACPP_ROUTES.match(e["path"]) for e in _requests(rec))


# OpenAI routes ostinato does not serve (a clear 404); none since /v1/responses came
OPENAI_ROUTES_MISSING = re.compile(r"^/v1/responses(/.*)?$")


def openai_route_missing(rec: dict) -> bool:
    """A request went to an OpenAI route ostinato does not implement (the Responses API;
    llama-server also serves it without /v1)."""
    return any(e["status"] == 404 and OPENAI_ROUTES_MISSING.match(e["path"])
               for e in _requests(rec))


def llamacpp_field(rec: dict) -> bool:
    """A 400 named a request field outside OpenAI's schema (n_probs, cache_prompt, grammar,
    response_format.schema, ...) or a field OpenAI requires that llama-server lets go."""
    path, msg = _first_400(rec)
    if not path or path.split(".")[0] not in OPENAI_FIELDS | {"messages", "prompt"}:
        return bool(path) and "does not implement this field" in msg
    return path not in OPENAI_FIELDS and "does not implement this field" in msg or \
        (path in OPENAI_FIELDS and "Field required" in msg)


def refused_openai_field(rec: dict) -> bool:
    """A 400 named an OpenAI field whose feature ostinato does not implement (tools,
    json_schema, ...): refused by design, listed in README's table."""
    path, msg = _first_400(rec)
    return path in OPENAI_FIELDS and "this server does not implement" in msg


REFUSAL = re.compile(r"does not implement|is not supported|serves no ")


def refused_api_feature(rec: dict) -> bool:
    """A 400 from the Anthropic Messages or Responses route that refuses a feature by name
    (extended thinking, image blocks, tools): refused by design, not ignored."""
    return any(ev["status"] == 400 and re.match(r"^/v1/(messages|responses)", ev["path"])
               and REFUSAL.search(ev.get("error") or "") for ev in _requests(rec))


def expects_500(rec: dict) -> bool:
    """They expect a 500 (llama-server fails inside) where ostinato answers a clear 400."""
    return bool(re.search(r"status_code == 500", _lines(rec)))


def unhonoured_option(rec: dict) -> bool:
    """It failed after running without a chat-template or reasoning flag (the shim's SOFT)."""
    return any(e.get("event") == "unhonoured" for e in rec.get("events", []))


def llamacpp_response(rec: dict) -> bool:
    """The failing line reads a response field or format only llama-server has, or a
    KeyError says so."""
    key = rec.get("exc") if rec.get("exc_type") == "KeyError" else None
    return bool(LLAMACPP_RESPONSE.search(_lines(rec)) or
                key and LLAMACPP_RESPONSE.search(key))


def error_wording(rec: dict) -> bool:
    """The status was what they expect, but the failing line looks for llama-server's words
    in the error message ('too large', 'exceeds the available context size', ...)."""
    return bool(re.search(r"""["'] in \S*\[["']error["']\]\[["']message["']\]""", _lines(rec)))


def not_supported_501(rec: dict) -> bool:
    """They expect 501 from a llama-server endpoint that is off unless a flag turns it on
    (/metrics, /slots); ostinato's is always on."""
    return bool(re.search(r"status_code == 501", _lines(rec)))


def _embedding_input_ok(x) -> bool:
    """OpenAI's embeddings input: a non-empty string, or a list of them, or a list of token
    ids, or a list of such lists (llama-server also takes mixtures and objects)."""
    if isinstance(x, str):
        return x != ""
    if not isinstance(x, list) or not x:
        return False
    ints = lambda v: isinstance(v, list) and v and all(type(t) is int for t in v)  # noqa: E731
    return all(isinstance(v, str) and v for v in x) or ints(x) or all(ints(v) for v in x)


def embedding_input_outside_openai(rec: dict) -> bool:
    """A 400 on /v1/embeddings for an input OpenAI's schema does not allow either."""
    for ev in _requests(rec):
        if ev["path"] == "/v1/embeddings" and ev["status"] == 400 and ev.get("request"):
            try:
                body = json.loads(ev["request"])
            except ValueError:
                continue
            if not _embedding_input_ok(body.get("input")):
                return True
    return False


def cors_by_default(rec: dict) -> bool:
    """They expect CORS headers from a server started without an origin list: llama-server
    allows every origin by default; ostinato's CORS is off unless --allowed-origins."""
    started = [a for e in rec.get("events", []) if e.get("event") in ("start", "reuse")
               for a in e["args"]]
    return "--allowed-origins" not in started and bool(
        re.search(r"cors_header|Access-Control", _lines(rec)))


def media_input(rec: dict) -> bool:
    """A 400 for image or audio content parts: OpenAI's, but ostinato's models read text only
    (their tinygemma3 has a vision projector; gemma3-270m, our stand-in, has none)."""
    return any(ev["status"] == 400 and "content parts" in (ev.get("error") or "") and
               re.search(r"image_url|input_audio", ev.get("request") or "")
               for ev in _requests(rec))


def detokenize_shape(rec: dict) -> bool:
    """llama-server's /detokenize answers {"content"}; vLLM's, which ostinato follows (and
    lm-eval reads), answers {"prompt"}."""
    reqs = _requests(rec)
    return rec.get("exc_type") == "KeyError" and "'content'" in (rec.get("exc") or "") and \
        bool(reqs) and reqs[-1]["path"] == "/detokenize"


def role_chunk_content(rec: dict) -> bool:
    """Their streams' first chunk has content null; OpenAI's (and ours) has content ""."""
    return bool(re.search(r"delta\W+content\W* is None", _lines(rec)))


def model_specific(rec: dict) -> bool:
    """The failing line checks text or token counts of their tiny model."""
    return bool(MODEL_SPECIFIC.search(_lines(rec).splitlines()[-1] if _lines(rec) else ""))


RULES = [
    ("llama.cpp-only", "server flag or model", llamacpp_option),
    ("llama.cpp-only", "route", llamacpp_route),
    ("llama.cpp-only", "request field", llamacpp_field),
    ("refused", "OpenAI field not implemented", refused_openai_field),
    ("refused", "OpenAI route not implemented (Responses API)", openai_route_missing),
    ("refused", "image or audio input (OpenAI's; a text-only model here)", media_input),
    ("refused", "Anthropic/Responses feature refused by name", refused_api_feature),
    ("llama.cpp-only", "they expect a 500 where ours is a 400", expects_500),
    ("llama.cpp-only", "CORS on by default there", cors_by_default),
    ("llama.cpp-only", "response field or format", llamacpp_response),
    ("llama.cpp-only", "embeddings input outside OpenAI's schema", embedding_input_outside_openai),
    ("llama.cpp-only", "their error message's words", error_wording),
    ("llama.cpp-only", "endpoint off by default there (501)", not_supported_501),
    ("llama.cpp-only", "first stream chunk's content null", role_chunk_content),
    ("llama.cpp-only", "/detokenize's answer shape", detokenize_shape),
    ("model-specific", "their model's text or token counts", model_specific),
    # last: a failure no other rule explains, in a test run without its template flag
    ("llama.cpp-only", "run without its chat-template / reasoning flag", unhonoured_option),
]


def refused_option(rec: dict) -> bool:
    """The shim refused a llama-server flag or model during the test (one that expects the
    server to fail to start passes on it)."""
    return any(e.get("event") == "llamacpp_option" for e in rec.get("events", []))


VACUOUS = [
    ("llama.cpp-only", "server flag or model", refused_option),
    ("llama.cpp-only", "route", llamacpp_route),
    ("refused", "image or audio input", media_input),
    ("refused", "OpenAI route not implemented (Responses API)", openai_route_missing),
]

# Tests no general rule can sort, each judged by reading it: (test id prefix, class, why).
JUDGED = [
    ("unit/test_chat_completion.py::test_invalid_chat_completion_req[messages7]",
     "llama.cpp-only", "they refuse two assistant messages in a row; OpenAI's schema allows it "
     "and ostinato closes the turn as the template says"),
    ("unit/test_compat_anthropic.py::test_anthropic_empty_messages", "llama.cpp-only",
     "they answer an empty messages list; Anthropic's API requires at least one message"),
]


def classify(rec: dict) -> tuple[str, str]:
    """(class, the rule that decided it) for one test's record."""
    if rec["outcome"] == "passed":
        # a test that expects an error passes vacuously on a route we lack or an input we
        # refuse for another reason: counted where the route or input belongs, not as a pass
        for cls, name, rule in VACUOUS:
            if rule(rec):
                return cls, name + " (passed only because of it)"
        return "pass", ""
    if rec["outcome"] == "skipped":
        return "skipped", rec.get("skip", "")[:80]
    for cls, name, rule in RULES:
        if rule(rec):
            return cls, name
    for prefix, cls, why in JUDGED:
        if rec["nodeid"].startswith(prefix):
            return cls, "judged: " + why
    return "real", "no rule explains it"


def print_table(rows: list[tuple], deselected: int) -> None:
    counts = Counter(cls for _, cls, _ in rows)
    by_file: dict[str, Counter] = {}
    for r, cls, _ in rows:
        by_file.setdefault(r["nodeid"].split("::")[0], Counter())[cls] += 1
    print(f"\n{'file':34}" + "".join(f"{c:>16}" for c in CLASSES))
    for f, c in sorted(by_file.items()):
        print(f"{f:34}" + "".join(f"{c[k]:16}" for k in CLASSES))
    print(f"{'total (' + str(len(rows)) + ' tests)':34}" + "".join(f"{counts[k]:16}" for k in CLASSES))
    print(f"not run: {deselected} tests marked slow (they need large hub models; llama.cpp's "
          "CI deselects them too)")


def load(*results: Path) -> list[dict]:
    """The records of one or more results files, by test id (a later file's record of a test
    replaces an earlier one's: a rerun of some files after a fix)."""
    out: dict[str, dict] = {}
    for path in results:
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["nodeid"]] = rec
    return list(out.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="their test files, e.g. unit/test_completion.py "
                    "(default: all of unit/)")
    ap.add_argument("--from-results", type=Path, nargs="+", help="classify saved results "
                    "files (a test in a later file replaces its record in an earlier one)")
    ap.add_argument("--results", type=Path, help="where to keep the raw results (JSON lines)")
    ap.add_argument("--fresh", action="store_true", help="a new server for every test, as "
                    "llama.cpp does (default: reuse it while the flags are the same)")
    ap.add_argument("--timeout", type=int, default=180, help="seconds per test")
    ap.add_argument("--list", action="store_true", help="print every test's class and reason")
    args = ap.parse_args(argv)
    files = args.from_results
    if files is None:
        results = args.results or Path(tempfile.mkstemp(prefix="llamacpp-suite-",
                                                        suffix=".jsonl")[1])
        results.write_text("")
        run_suite(args.files, results, args.fresh, args.timeout)
        print(f"raw results: {results}")
        files = [results]
    records = load(*files)
    rows = [(r, *classify(r)) for r in records if r["outcome"] != "deselected"]
    if args.list:
        for r, cls, why in rows:
            print(f"{cls:15} {r['nodeid']}  [{why}]")
    print_table(rows, sum(r["outcome"] == "deselected" for r in records))
    return 1 if any(cls == "real" for _, cls, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
