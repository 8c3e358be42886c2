"""A real server in a subprocess on a free loopback port: start it, wait until it is ready,
read its log and metrics, stop it (SIGTERM, then SIGKILL after a grace period). The one
helper behind the tests, the reliability tests, `ostinato bench` and scripts/soak.py.
Only the standard library, httpx and prometheus_client: no engine, no torch."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

POLL_S = 0.2                      # between readiness checks


class ServerStartError(RuntimeError):
    """The server exited, refused the readiness request, or was not ready in time."""


@dataclass
class ServerProcess:
    """A server we started: its base URL, the model id it serves, its process and log file.
    With own_session it leads a process group of its own, and stop() stops its children too."""
    name: str
    base: str
    model: str
    proc: subprocess.Popen
    log_path: str
    own_session: bool = False
    grace_s: float = 15.0         # SIGTERM -> SIGKILL
    start_to_first_answer_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def log(self, chars: int = 4000) -> str:
        """The end of the server's log."""
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.base)

    def stop(self) -> None:
        """SIGTERM (to the whole group if it has one, even if the leader is gone), SIGKILL
        after grace_s; returns once the process is reaped."""
        for sig, wait in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, None)):
            if not self._signal(sig):
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _signal(self, sig: int) -> bool:
        try:
            if self.own_session:
                os.killpg(self.proc.pid, sig)
            elif self.proc.poll() is None:
                self.proc.send_signal(sig)
            else:
                return False
        except ProcessLookupError:
            return False
        return True

    def peak_rss_mb(self) -> float:
        """Peak resident memory (VmHWM) of the server and its child processes, summed."""
        total = 0
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and its child processes."""
        ticks = 0
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])      # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(base: str) -> dict[str, float]:
    """Every /metrics sample by name, with the outcome / finished_reason / le label
    appended: name[label]."""
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


def healthy(srv: ServerProcess) -> bool:
    """Readiness: GET /health answers 200."""
    return httpx.get(srv.base + "/health", timeout=2).status_code == 200


def answers(srv: ServerProcess) -> bool:
    """Readiness: a 1-token completion is answered (a 4xx will not get better by waiting)."""
    body = {"model": srv.model, "prompt": "Hello", "max_tokens": 1}
    r = httpx.post(srv.base + "/v1/completions", json=body, timeout=30)
    if 400 <= r.status_code < 500:
        raise ServerStartError(f"{srv.name} server answered {r.status_code}: {r.text[:200]}")
    return r.status_code == 200


@dataclass
class Launch:
    """How to start and wait for a server (everything but its command line)."""
    name: str = "ostinato"
    env: dict = field(default_factory=dict)          # on top of os.environ
    log_path: str | Path | None = None               # None: a new temporary file
    log_prefix: str = "ostinato-server-"
    ready: Callable[[ServerProcess], bool] = healthy
    timeout: float = 180.0
    own_session: bool = False
    grace_s: float = 15.0


def launch(cmd: list[str], port: int, model: str, how: Launch) -> ServerProcess:
    """Start cmd (a server on port, serving model) and return it once how.ready says so;
    the start-to-ready time is recorded. On any failure, nothing is left running."""
    log_path = str(how.log_path or _temp_log(how.log_prefix))
    t0 = time.perf_counter()
    with open(log_path, "w") as log:        # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **how.env}, start_new_session=how.own_session)
    srv = ServerProcess(how.name, f"http://127.0.0.1:{port}", model, proc, log_path,
                        how.own_session, how.grace_s)
    try:
        _wait_ready(srv, how.ready, how.timeout)
    except BaseException:                   # Ctrl-C or a failure: leave nothing running
        srv.stop()
        raise
    srv.start_to_first_answer_s = time.perf_counter() - t0
    return srv


def _temp_log(prefix: str) -> str:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".log")  # outlives us on purpose
    os.close(fd)
    return path


def _wait_ready(srv: ServerProcess, ready: Callable[[ServerProcess], bool],
                timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise ServerStartError(f"the {srv.name} server exited ({srv.proc.returncode}); "
                                   f"log {srv.log_path}:\n{srv.log()}")
        try:
            if ready(srv):
                return
        except httpx.TransportError:
            pass
        time.sleep(POLL_S)
    raise ServerStartError(f"the {srv.name} server was not ready within {timeout:.0f} s; "
                           f"log {srv.log_path}")


def start_ostinato(model: str | Path, *args: str, threads: int = 2, model_id: str | None = None,
                   how: Launch | None = None) -> ServerProcess:
    """`ostinato serve --model model *args` on a free loopback port, with no API key unless
    how.env sets one (or args pass --api-key). model_id: the id it serves (default: the
    model's file stem, as the server names it)."""
    how = how or Launch()
    port = free_port()
    cmd = [sys.executable, "-m", "ostinato", "serve", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads),
           "--log-level", "warning", *args]
    how = replace(how, env={"OSTINATO_API_KEY": "", **how.env})
    return launch(cmd, port, model_id or Path(model).stem, how)
