"""The real server as a subprocess on a free loopback port, shared by the whole session."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx
import pytest

API_KEY = "test-key-123"
MAX_MODEL_LEN = 1024
MAX_BODY_MB = 1


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
        return _tail(self.log_path)


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc, base: str, log_path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{_tail(log_path)}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy within {timeout} s:\n{_tail(log_path)}")


@pytest.fixture(scope="session")
def server(smollm_path):
    port = _free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="ostinato-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "ostinato", "serve", "--model", str(smollm_path),
           "--port", str(port), "--threads", "2", "--max-model-len", str(MAX_MODEL_LEN),
           "--kv-cache-gb", "0.25", "--api-key", API_KEY, "--max-body-mb", str(MAX_BODY_MB),
           "--log-level", "warning"]
    env = {**os.environ, "OSTINATO_API_KEY": ""}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base, log.name, timeout=180)
        yield Server(base, smollm_path.stem, log.name)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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
