"""Shared fixtures: the embedded model files (pulled by `make test`)."""
from __future__ import annotations

import pytest

from modelfiles import model_file as _model_file


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
