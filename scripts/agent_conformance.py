#!/usr/bin/env python3
"""Two public conformance suites against a real `ostinato serve` (issue 16).

  python scripts/agent_conformance.py [--model qwen2.5-coder-0.5b-instruct] [--suite all]

Starts the server on a free port with an API key, runs the suites, prints each one's counts
and stops the server.

* Open Responses: the compliance suite of the Open Responses specification
  (openresponses/openresponses, bin/compliance-test.ts; `bun run test:compliance`). It is not
  published on npm (only its repository has it), and its schemas are zod modules that kubb
  generates from the spec at build time, so it cannot be installed from a registry here.
  This script runs the same cases itself: the suite's eight default test ids, each with the
  same kind of request and the same checks (the response, and in a stream every event and the
  final response, must parse against the spec's schema; then output present, status
  completed, a function_call where the case asks for one). The schema is the spec's own:
  `openresponses-types` (PyPI), Pydantic models generated from the spec's openapi.json,
  installed into a venv of its own under the cache. The two optional cases (file_search,
  web_search) are skipped as the suite skips them without their settings.
* SGLang's Anthropic API tests (sgl-project/sglang, test/anthropic/tests/: pytest,
  configured by ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY and TEST_MODEL_NAME), run with pytest
  and an anthropic 0.x client in the same venv (they pass the client an httpx.Client, which
  the anthropic 2.x of this repo's venv refuses). They are in no package: copy that folder to
  <cache>/sglang-anthropic/tests (or pass --sglang-tests DIR); the script says so if missing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("OSTINATO_CACHE", Path.home() / ".cache" / "ostinato"))
API_KEY = "conformance-key"
OPENRESPONSES_TYPES = "openresponses-types==2.4.0"      # the spec of 2026-04-24
# SGLang's tests hand the anthropic client an httpx.Client; anthropic 2.x (this repo's venv)
# is built on httpx2 and refuses one, so they run with a 0.x client in the conformance venv
ANTHROPIC_FOR_SGLANG = "anthropic<1"


# ------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ostinato", "serve", "--model", model, "--port", str(port),
           "--api-key", API_KEY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited ({proc.returncode}); see {log}")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                         headers={"Authorization": f"Bearer {API_KEY}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1)
    proc.terminate()
    sys.exit(f"server did not come up in 600 s; see {log}")


def served_name(port: int) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["data"][0]["id"]


# ------------------------------------------------------------------------------ suites
def conformance_venv() -> Path:
    """A venv of its own under the cache: the spec's schemas, and the client and pytest
    SGLang's tests run with (they clash with this repo's venv)."""
    venv = CACHE / "conformance-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(py), "-c", "import openresponses_types, httpx, pytest, "
                            "anthropic; assert anthropic.__version__.startswith('0.')"],
                           capture_output=True)
    if probe.returncode:
        subprocess.run([str(py), "-m", "pip", "install", "-q", OPENRESPONSES_TYPES, "httpx",
                        "pytest", ANTHROPIC_FOR_SGLANG], check=True)
    return py


def run_openresponses(base_url: str, model: str) -> tuple[int, int, int]:
    py = conformance_venv()
    out = subprocess.run([str(py), __file__, "--openresponses-runner", base_url, model],
                         capture_output=True, text=True)
    print(out.stdout, end="")
    if out.returncode not in (0, 1):
        print(out.stderr, file=sys.stderr)
        sys.exit("the Open Responses runner failed")
    m = re.search(r"(\d+) passed, (\d+) failed, (\d+) skipped", out.stdout)
    return tuple(int(x) for x in m.groups())


def run_sglang(tests: Path, port: int, model: str) -> tuple[int, int, int]:
    if not (tests / "conftest.py").exists():
        sys.exit(f"SGLang's test/anthropic/tests/ is not at {tests}: copy it there from "
                 "sgl-project/sglang (or pass --sglang-tests DIR)")
    env = {**os.environ, "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
           "ANTHROPIC_API_KEY": API_KEY, "TEST_MODEL_NAME": model}
    xml = CACHE / "sglang-anthropic" / "results.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    # from the tests' own folder, so that this repo's pytest configuration is not read
    out = subprocess.run([str(conformance_venv()), "-m", "pytest", "-q", "-rfE", "-p",
                          "no:cacheprovider", f"--junitxml={xml}", str(tests)],
                         cwd=tests, env=env, capture_output=True, text=True)
    print(out.stdout[-6000:], end="")
    text = xml.read_text()
    m = re.search(r'<testsuite [^>]*errors="(\d+)" failures="(\d+)" skipped="(\d+)" '
                  r'tests="(\d+)"', text)
    errors, failures, skipped, total = (int(x) for x in m.groups())
    return total - errors - failures - skipped, errors + failures, skipped


# ------------------------------------------------------------------------------ runner
# Runs inside the conformance venv (openresponses-types there); prints one line per case.
WEATHER = {"type": "function", "name": "get_weather",
           "description": "Get the current weather for a location",
           "parameters": {"type": "object", "required": ["location"], "properties": {
               "location": {"type": "string",
                            "description": "The city and state, e.g. San Francisco, CA"}}}}
def _png() -> str:
    """A 1x1 red PNG, made here."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


PNG = _png()
# a PDF with no pages, made here
PDF = "data:application/pdf;base64," + __import__("base64").b64encode(
    b"%PDF-1.1\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n2 0 obj << /Type /Pages "
    b"/Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF").decode()


def _cases(model: str) -> list[tuple[str, dict | None, bool, list]]:
    """(id, request, stream, checks); a None request is a two-request case."""
    msg = lambda role, content: {"type": "message", "role": role, "content": content}  # noqa
    user = lambda content: [msg("user", content)]  # noqa
    return [
        ("basic-response", {"model": model, "input": user("Greet me in three words.")},
         False, ["output", "completed"]),
        ("streaming-response", {"model": model, "input": user("Count to five.")},
         True, ["events", "completed"]),
        ("system-prompt", {"model": model, "input": [
            msg("system", "Answer like a sailor."), msg("user", "Greet me.")]},
         False, ["output", "completed"]),
        ("tool-calling", {"model": model, "tools": [WEATHER],
                          "input": user("How is the weather in Boston, MA?")},
         False, ["output", "function_call"]),
        ("function-call-roundtrip", None, False, ["output", "completed"]),
        ("image-input", {"model": model, "input": user([
            {"type": "input_text", "text": "Describe this picture in one sentence."},
            {"type": "input_image", "image_url": PNG}])}, False, ["output", "completed"]),
        ("file-input", {"model": model, "input": user([
            {"type": "input_text", "text": "What is in the attached file?"},
            {"type": "input_file", "filename": "fixture.pdf", "file_data": PDF}])},
         False, ["output", "completed"]),
        ("multi-turn", {"model": model, "input": [
            msg("user", "I am called Bob."), msg("assistant", "Hi Bob, how can I help?"),
            msg("user", "Who am I?")]}, False, ["output", "completed"]),
        ("previous-response-id", None, False, ["output", "completed"]),
    ]


def openresponses_runner(base_url: str, model: str) -> int:
    import enum

    import httpx
    import openresponses_types.types as T
    from pydantic import BaseModel, ValidationError

    events = {}
    for cls in vars(T).values():
        if isinstance(cls, type) and issubclass(cls, BaseModel) \
                and cls.__name__.endswith("StreamingEvent") and "type" in cls.model_fields:
            kind = cls.model_fields["type"].annotation
            if isinstance(kind, type) and issubclass(kind, enum.Enum):
                events[list(kind)[0].value] = cls
    http = httpx.Client(base_url=base_url, timeout=600,
                        headers={"Authorization": f"Bearer {API_KEY}"})

    def schema_errors(model_cls, data) -> list[str]:
        try:
            model_cls.model_validate(data)
            return []
        except ValidationError as e:
            return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]

    def post(body: dict, stream: bool):
        """(response dict or None, errors, number of events)."""
        body = {**body, "stream": stream}
        if not stream:
            r = http.post("/responses", json=body)
            if r.status_code != 200:
                return None, [f"HTTP {r.status_code}: {r.text[:300]}"], None
            data = r.json()
            return data, schema_errors(T.ResponseResource, data), None
        errors, final, n = [], None, 0
        with http.stream("POST", "/responses", json=body) as r:
            if r.status_code != 200:
                return None, [f"HTTP {r.status_code}: {r.read().decode()[:300]}"], None
            for line in r.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                ev = json.loads(line[5:])
                n += 1
                cls = events.get(ev.get("type"))
                if cls is None:
                    errors.append(f"event type {ev.get('type')!r} is not in the spec")
                else:
                    errors += [f"{ev['type']}: {e}" for e in schema_errors(cls, ev)]
                if ev.get("type") in ("response.completed", "response.failed",
                                      "response.incomplete"):
                    final = ev["response"]
        if final is None:
            return None, errors + ["no final response event"], n
        return final, errors + schema_errors(T.ResponseResource, final), n

    def checks(resp: dict, names: list, n_events) -> list[str]:
        out = []
        for name in names:
            if name == "output" and not resp.get("output"):
                out.append("Response has no output items")
            if name == "completed" and resp.get("status") != "completed":
                out.append(f"Expected status \"completed\" but got \"{resp.get('status')}\"")
            if name == "function_call" and not any(
                    i.get("type") == "function_call" for i in resp.get("output") or []):
                out.append("Expected output item of type \"function_call\" but none found")
            if name == "events" and not n_events:
                out.append("No streaming events received")
        return out

    def two_step(case: str):
        if case == "previous-response-id":
            first = {"model": model, "input": "Keep this word in mind: mango. Reply only OK."}
        else:
            first = {"model": model, "tools": [WEATHER],
                     "tool_choice": {"type": "function", "name": "get_weather"},
                     "input": "Look up the temperature in Boston, MA with the weather tool."}
        resp, errors, _ = post(first, False)
        if errors:
            return resp, errors
        if case == "previous-response-id":
            second = {"model": model, "previous_response_id": resp["id"],
                      "input": "Which word did I ask you to keep in mind?"}
        else:
            call = next((i for i in resp["output"] if i.get("type") == "function_call"), None)
            if call is None:
                return resp, ["First response did not include a function_call with call_id"]
            second = {"model": model, "previous_response_id": resp["id"], "input": [
                {"type": "function_call_output", "call_id": call["call_id"],
                 "output": "18 degrees and sunny"}]}
        resp, errors, _ = post(second, False)
        return resp, errors

    passed = failed = 0
    for case, body, stream, names in _cases(model):
        t0 = time.time()
        if body is None:
            resp, errors = two_step(case)
            n = None
        else:
            resp, errors, n = post(body, stream)
        if resp is not None and not errors:
            errors = checks(resp, names, n)
        ok = not errors
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'PASS' if ok else 'FAIL'} {case} ({time.time() - t0:.1f} s"
              f"{f', {n} events' if n is not None else ''})")
        for e in errors[:8]:
            print(f"    {e}")
    for case in ("file-search", "offline-web-search"):
        print(f"SKIP {case} (optional: needs a vector store / offline web search)")
    print(f"open-responses: {passed} passed, {failed} failed, 2 skipped")
    return 1 if failed else 0


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--port", type=int, default=0, help="default: a free one")
    ap.add_argument("--suite", choices=["all", "openresponses", "sglang"], default="all")
    ap.add_argument("--sglang-tests", type=Path, default=CACHE / "sglang-anthropic" / "tests")
    ap.add_argument("--openresponses-runner", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.openresponses_runner:
        return openresponses_runner(*args.openresponses_runner)

    port = args.port or free_port()
    log = CACHE / "agent_conformance_server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    conformance_venv()          # before the server: installing is not timed
    proc = start_server(args.model, port, log)
    counts = {}
    try:
        model = served_name(port)
        if args.suite in ("all", "openresponses"):
            print(f"== Open Responses compliance cases ({OPENRESPONSES_TYPES} schemas)")
            counts["open-responses"] = run_openresponses(f"http://127.0.0.1:{port}/v1", model)
        if args.suite in ("all", "sglang"):
            print("== SGLang test/anthropic")
            counts["sglang-anthropic"] = run_sglang(args.sglang_tests, port, model)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"\n== {args.model}")
    for name, (p, f, s) in counts.items():
        print(f"{name}: {p} passed, {f} failed, {s} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
