"""Real coding agents, headless, against the real server with Qwen2.5-Coder-0.5B (issue 16):
Claude Code (`@anthropic-ai/claude-code`, /v1/messages) and Codex CLI (`@openai/codex`,
/v1/responses with wire_api "responses") each complete a one-shot prompt. A logging proxy
(logproxy.py) sits between client and server, so a failure shows what the client sent.

The clients are installed with npm into ~/.cache/ostinato/npm (reused). Runs only where node
and npm are found, and only with `-m agents` (`make agents-test`): each client's prompt is
prefilled on the CPU (about 1-2 minutes each on a 2-core machine).

Client settings that keep the prompt small or leave out what this server cannot run (say
so in the report, not hidden): Claude Code --bare, --tools Read and a short --system-prompt
(its full prompt is ~19k tokens: tens of minutes of CPU prefill), output capped with
CLAUDE_CODE_MAX_OUTPUT_TOKENS (it asks for 32000 by default, over the context); Codex with a
short model_instructions_file, web_search disabled (a hosted tool, refused here) and
subagents off (a `namespace` tool, refused here)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serverproc import start_server, stop_server

pytestmark = [pytest.mark.agents, pytest.mark.model,
              pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                 reason="node and npm are needed")]

NPM_DIR = Path(os.environ.get("OSTINATO_HOME", Path.home() / ".cache" / "ostinato")) / "npm"
PACKAGES = ["@anthropic-ai/claude-code@2.1.197", "@openai/codex@0.171.0"]
KEY = "sk-agents-test"
PROMPT = "Say hello in one word."


def _bin(name: str) -> Path:
    return NPM_DIR / "node_modules" / ".bin" / name


@pytest.fixture(scope="module")
def clients():
    if not (_bin("claude").exists() and _bin("codex").exists()):
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NPM_DIR),
                        *PACKAGES], check=True, timeout=600)
    return {"claude": _bin("claude"), "codex": _bin("codex")}


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """(proxy base URL, log path): the real server behind the logging proxy."""
    from modelfiles import model_file
    sys.path.insert(0, str(Path(__file__).parent))
    import logproxy
    proc = start_server(model_file("qwen2.5-coder-0.5b-instruct"), "--max-model-len", "8192",
                        "--kv-cache-gb", "0.5", "--api-key", KEY)
    log = tmp_path_factory.mktemp("agents") / "requests.jsonl"
    proxy = logproxy.serve(int(proc.base.rsplit(":", 1)[1]), str(log))
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}", log, proc.model
    finally:
        proxy.shutdown()
        stop_server(proc)


def _requests(log: Path, path: str) -> list[dict]:
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [r for r in rows if r["path"].split("?")[0] == path]


def _explain(out: subprocess.CompletedProcess, log: Path) -> str:
    return f"rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}\n" + (
        log.read_text()[-3000:] if log.exists() else "")


def test_claude_code_one_shot(clients, proxied, tmp_path):
    base, log, model = proxied
    env = {**os.environ, "ANTHROPIC_BASE_URL": base, "ANTHROPIC_API_KEY": KEY,
           "CLAUDE_CONFIG_DIR": str(tmp_path / "cfg"), "DISABLE_TELEMETRY": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "64", "ANTHROPIC_DEFAULT_HAIKU_MODEL": model}
    out = subprocess.run([str(clients["claude"]), "--bare", "-p", PROMPT, "--model", model,
                          "--tools", "Read", "--system-prompt",
                          "You are a helpful assistant. Answer briefly."],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    sent = _requests(log, "/v1/messages")
    assert out.returncode == 0 and out.stdout.strip(), _explain(out, log)
    assert "API Error" not in out.stdout + out.stderr, _explain(out, log)
    assert sent and all(r["status"] == 200 for r in sent), _explain(out, log)
    body = sent[-1]["body"]      # what it sends that this server had to take
    assert body["stream"] is True and body["tools"] and body["thinking"]["type"] == "adaptive"


def test_codex_one_shot(clients, proxied, tmp_path):
    base, log, model = proxied
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "instructions.md").write_text("You are a coding agent. Answer briefly.\n")
    (home / "config.toml").write_text(f'''model = "{model}"
model_provider = "ostinato"
web_search = "disabled"
model_instructions_file = "{home / 'instructions.md'}"

[agents]
enabled = false

[features]
goals = false

[model_providers.ostinato]
name = "Ostinato"
base_url = "{base}/v1"
env_key = "OSTINATO_AGENTS_KEY"
wire_api = "responses"
''')
    env = {**os.environ, "CODEX_HOME": str(home), "OSTINATO_AGENTS_KEY": KEY}
    out = subprocess.run([str(clients["codex"]), "exec", "--skip-git-repo-check", PROMPT],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    sent = _requests(log, "/v1/responses")
    assert out.returncode == 0 and out.stdout.strip(), _explain(out, log)
    assert "ERROR" not in out.stderr, _explain(out, log)
    assert sent and all(r["status"] == 200 for r in sent), _explain(out, log)
    body = sent[-1]["body"]
    assert body["stream"] is True and body["store"] is False and body["tools"]
