"""Start and stop a real `ostinato serve` (a subprocess on a free loopback port) for the
server, browser and reliability tests: the test names for ostinato.bench.server_proc, the
helper that bench and scripts/soak.py use too. (A plain module, not a conftest: test modules
import it, and `conftest` is an ambiguous module name in a suite with several.)"""
from __future__ import annotations

from ostinato.bench.server_proc import Launch, free_port, read_metrics, start_ostinato  # noqa: F401
from ostinato.bench.server_proc import ServerProcess as Server


def start_server(model_path, *args: str, env: dict | None = None,
                 timeout: float = 180) -> Server:
    """`ostinato serve --model model_path *args` on a free port, once /health answers 200."""
    how = Launch(env=env or {}, log_prefix="ostinato-test-server-", timeout=timeout)
    return start_ostinato(model_path, *args, how=how)


def stop_server(server: Server) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    server.stop()
