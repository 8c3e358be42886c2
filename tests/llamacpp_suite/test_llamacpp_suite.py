"""A short run of llama.cpp's own server tests (tools/server/tests of the llama-cpp-python
sdist) against a real `ostinato serve`, through scripts/llamacpp_server_suite.py: a few of
their files and tests, each sorted by the script's rules. Any test no rule explains (a real
incompatibility) fails this. The whole suite: `make llamacpp-server-suite` (~30 min)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model
REPO = Path(__file__).resolve().parents[2]
SMOKE = ["unit/test_basic.py", "unit/test_tokenize.py",
         "unit/test_chat_completion.py::test_logprobs",
         "unit/test_chat_completion.py::test_invalid_chat_completion_req",
         "unit/test_embedding.py::test_embedding_openai_library_single",
         "unit/test_embedding.py::test_embedding_openai_library_base64"]


def _script():
    spec = importlib.util.spec_from_file_location(
        "llamacpp_server_suite", REPO / "scripts" / "llamacpp_server_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_of_llamacpp_server_suite(smollm_path, tmp_path):
    results = tmp_path / "results.jsonl"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "llamacpp_server_suite.py"),
                          "--results", str(results), "--list", *SMOKE],
                         capture_output=True, text=True, timeout=900)
    suite = _script()
    rows = [(r, *suite.classify(r)) for r in suite.load(results)]
    real = [(r["nodeid"], r.get("exc_type"), (r.get("exc") or "")[:400])
            for r, cls, _ in rows if cls == "real"]
    assert not real, f"real incompatibilities: {real}\n{run.stdout[-3000:]}"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    passed = [r for r, cls, _ in rows if cls == "pass"]
    assert len(passed) >= 4, run.stdout[-3000:]             # the adapter really ran them
    # no passing test saw a server error
    assert all(e["event"] != "request" or e["status"] < 500
               for r in passed for e in r["events"])
    renamed = {x.split()[0] for r, _, _ in rows for e in r["events"] for x in e.get("renames", [])}
    assert {"path", "model", "content"} <= renamed, renamed  # the renames the shim declares
