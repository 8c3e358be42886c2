"""The embedded model files (pulled by `make test`), for conftest's fixtures and for tests
that need one at import or parametrization time (a plain module: tests/server has a
conftest of its own, so `from conftest import ...` would find the wrong one)."""
from __future__ import annotations

import os

import pytest

from ostinato.hub import EMBEDDED, home


def model_file(name: str):
    path = home() / EMBEDDED[name].filename
    if not path.exists():
        if os.environ.get("CI"):   # in CI a missing model is a failure, never a skip
            pytest.fail(f"{path} is missing in CI: `make test` should have pulled it")
        pytest.skip(f"{path} is missing: run `ostinato pull {name}` (make test does)")
    return path
