"""Start and stop a real `ostinato serve` (a subprocess on a free loopback port) for the
server, browser and reliability tests. (A plain module, not a conftest: test modules import
it, and `conftest` is an ambiguous module name in a suite with several.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ostinato.bench.serving import free_port


@dataclass
class Server:
    base: str
    model: str
    proc: subprocess.Popen
    log_path: str
    extra: dict = field(default_factory=dict)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.base)


def read_metrics(base: str) -> dict[str, float]:
    """Every sample by name, with the outcome / finished_reason label appended: name[label]."""
    out: dict[str, float] = {}
    text = httpx.get(base + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name
            for lab in ("outcome", "finished_reason", "le"):
                if lab in s.labels:
                    key += f"[{s.labels[lab]}]"
            out[key] = s.value
    return out


def start_server(model_path, *args: str, env: dict | None = None,
                 timeout: float = 180) -> Server:
    """`ostinato serve --model model_path *args` on a free port, once /health answers 200."""
    port = free_port()
    # the server writes its log here; the file outlives this function on purpose
    log = tempfile.NamedTemporaryFile("w", prefix="ostinato-test-server-", suffix=".log",  # noqa: SIM115
                                      delete=False)
    cmd = [sys.executable, "-m", "ostinato", "serve", "--model", str(model_path),
           "--port", str(port), "--threads", "2", "--log-level", "warning", *args]
    full_env = {**os.environ, "OSTINATO_API_KEY": "", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            dead = Server(base, model_path.stem, proc, log.name)
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{dead.log()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return Server(base, model_path.stem, proc, log.name)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(Server(base, model_path.stem, proc, log.name))
    raise RuntimeError(f"the server was not healthy within {timeout} s")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
