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
    "model": {"ostinato.engine", "ostinato.server", "ostinato.llm", "ostinato.loader"},
    "kernels": {"ostinato.engine", "ostinato.server", "ostinato.model", "ostinato.llm"},
    "loader": {"ostinato.engine", "ostinato.server", "ostinato.model", "ostinato.llm"},
    "engine": {"ostinato.server"},
    "tokenizer.py": {"ostinato.engine", "ostinato.server", "ostinato.model", "torch"},
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
