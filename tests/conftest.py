"""Shared fixtures: the embedded model files (pulled by `make test`)."""
from __future__ import annotations

import sys

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


_session_threads: list[int] = []


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_per_module():
    """Each module starts on the thread count the session started on. LLM(threads=n) sets
    torch's count for the whole process, and the thread governor leaves its last step's count
    behind: without this, one module's threads=1 made every later module's engines run on one
    thread (and their governors capped at one) in the full run, and only there."""
    torch = sys.modules.get("torch")
    if torch is None:                        # nothing has set a count yet
        yield
        return
    if not _session_threads:
        _session_threads.append(torch.get_num_threads())
    torch.set_num_threads(_session_threads[0])
    yield
    torch.set_num_threads(_session_threads[0])


def pytest_configure(config):
    config.addinivalue_line("markers", "model: needs a real model file")
