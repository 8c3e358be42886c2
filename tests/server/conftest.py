"""The real server as a subprocess on a free loopback port, shared by the whole session."""
from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
from serverproc import start_server, stop_server

API_KEY = "test-key-123"
MAX_MODEL_LEN = 1024
MAX_BODY_MB = 1
ALLOWED_ORIGIN = "http://allowed.example"     # CORS (test_conformance.py)


@dataclass
class Server:
    base: str                  # http://127.0.0.1:PORT
    model: str                 # the id it serves
    log_path: str
    max_model_len: int = MAX_MODEL_LEN
    api_key: str = API_KEY
    max_body_mb: float = MAX_BODY_MB

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]


@pytest.fixture(scope="session")
def server(smollm_path):
    proc = start_server(smollm_path, "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gb",
                        "0.25", "--api-key", API_KEY, "--max-body-mb", str(MAX_BODY_MB),
                        "--allowed-origins", ALLOWED_ORIGIN)
    try:
        yield Server(proc.base, proc.model, proc.log_path)
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def aclient(server):
    """A factory: an AsyncOpenAI client is bound to the event loop it first runs on, so each
    asyncio.run() makes its own (`async with aclient() as c: ...`)."""
    import openai
    return lambda: openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0,
                                      timeout=120)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.base, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture(scope="session")
def qwen_server():
    """Qwen2.5-Coder-0.5B-Instruct (the tool-capable model: hermes <tool_call> format) on its
    own loopback port, shared by every module that needs a model that calls tools."""
    from modelfiles import model_file
    proc = start_server(model_file("qwen2.5-coder-0.5b-instruct"), "--max-model-len", "2048",
                        "--kv-cache-gb", "0.25", "--api-key", API_KEY)
    try:
        yield Server(proc.base, proc.model, proc.log_path, max_model_len=2048)
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def qwen_client(qwen_server):
    import openai
    return openai.OpenAI(base_url=qwen_server.v1, api_key=API_KEY, max_retries=0, timeout=120)
