"""Shared fixtures: the embedded model files (pulled by `make test`)."""
from __future__ import annotations

import os

import pytest

from ostinato.hub import EMBEDDED, home


def _model_file(name: str):
    path = home() / EMBEDDED[name].filename
    if not path.exists():
        if os.environ.get("CI"):   # in CI a missing model is a failure, never a skip
            pytest.fail(f"{path} is missing in CI: `make test` should have pulled it")
        pytest.skip(f"{path} is missing: run `ostinato pull {name}` (make test does)")
    return path


@pytest.fixture(scope="session")
def smollm_path():
    return _model_file("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_path():
    return _model_file("gemma3-270m")


@pytest.fixture(scope="session")
def smollm_llm(smollm_path):
    from ostinato import LLM
    return LLM(smollm_path, max_model_len=4096)


def pytest_configure(config):
    config.addinivalue_line("markers", "model: needs a real model file")
