"""Imports point one way (server -> engine -> {scheduler -> kv_cache} and {runner -> model ->
kernels}, loader beside them), the scheduling layer is pure Python, and nothing unpickles."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ostinato"

# module (relative to ostinato/) -> packages it must never import
FORBIDDEN = {
    "engine/scheduler.py": {"torch", "ostinato.model", "ostinato.kernels", "ostinato.engine.runner"},
    "engine/kv_cache.py": {"torch", "ostinato.model", "ostinato.kernels", "ostinato.engine.runner"},
    "engine/sequence.py": {"torch", "ostinato.model", "ostinato.kernels"},
    "params.py": {"torch", "ostinato.engine", "ostinato.model", "ostinato.kernels"},
    # the decoder is pure math on an injected ops object: it knows no backend and no file
    "model": {"ostinato.engine", "ostinato.server", "ostinato.llm", "ostinato.loader",
              "ostinato.kernels"},
    "kernels": {"ostinato.engine", "ostinato.server", "ostinato.model", "ostinato.llm"},
    # the loader yields logical tensors: the backend packs them (a new backend: no loader change)
    "loader": {"ostinato.engine", "ostinato.server", "ostinato.model", "ostinato.llm",
               "ostinato.kernels"},
    "errors.py": {"ostinato"},
    "engine": {"ostinato.server"},
    "tokenizer.py": {"ostinato.engine", "ostinato.server", "ostinato.model", "torch"},
    # the server-process helper of tests, bench and soak: it talks HTTP to a subprocess
    "bench/server_proc.py": {"ostinato", "torch"},
    # the single-process server never imports Ray: only server/replicas/ray_app.py does
    "server/app.py": {"ray", "ostinato.server.replicas.ray_app"},
    "server/run.py": {"ray", "ostinato.server.replicas.ray_app"},
    "server/replicas/routing.py": {"ray", "ostinato.engine", "ostinato.llm", "torch"},
    "server/replicas/metrics.py": {"ray"},
    "server/replicas/asgi.py": {"ray"},
}


def imported(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved)."""
    pkg = ["ostinato", *path.relative_to(PKG).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}
    return names


def files(target: str) -> list[Path]:
    p = PKG / target
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


@pytest.mark.parametrize("target", sorted(FORBIDDEN))
def test_imports_point_one_way(target):
    for f in files(target):
        bad = {n for n in imported(f) for ban in FORBIDDEN[target]
               if n == ban or n.startswith(ban + ".")}
        assert not bad, f"{f.relative_to(PKG)} imports {sorted(bad)}"


def package_of(module: str) -> str | None:
    """ostinato.X.Y -> "X" (a subpackage) or the top-level module's name; None outside."""
    parts = module.split(".")
    if parts[0] != "ostinato" or len(parts) < 2:
        return None
    return parts[1]


def test_no_import_cycles_between_packages():
    """The package graph (ostinato.model, .kernels, .loader, ... and the top-level modules)
    has no cycle: each import points one way. Imports inside functions count too."""
    graph: dict[str, set[str]] = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG)
        src = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        deps = {package_of(n) for n in imported(f)} - {None, src, "__init__"}
        graph.setdefault(src, set()).update(d for d in deps if (PKG / d).exists()
                                            or (PKG / f"{d}.py").exists())
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2
    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_scheduling_layer_loads_without_torch():
    code = ("import sys, ostinato.engine.scheduler, ostinato.engine.kv_cache, ostinato.params; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_pickle_anywhere():
    for f in PKG.rglob("*.py"):
        names = imported(f)
        assert not {"pickle", "cPickle", "dill", "joblib"} & {n.split(".")[0] for n in names}, f
        assert "torch.load" not in f.read_text(), f
