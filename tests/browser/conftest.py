"""A real `ostinato serve` (with --api-key) and headless Debian Chromium driven by Selenium.

Chromium and chromedriver come from apt (`make test` installs them where missing). Outside
CI a missing browser skips these tests; in CI (env CI set) it is a failure."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serverproc import start_server, stop_server

API_KEY = "browser-key-456"
CHROMIUM = os.environ.get("OSTINATO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("OSTINATO_CHROMEDRIVER", "/usr/bin/chromedriver")
OUTPUT = Path(__file__).resolve().parents[2] / "test-output"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--window-size=1200,860"]


@dataclass
class Server:
    base: str
    model: str
    log_path: str
    api_key: str = API_KEY

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {metric name without labels: value} (one model, no clashes
        for the series read here)."""
        text = httpx.get(self.base + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = float(value)
        return out


def _missing(what: str) -> None:
    msg = (f"{what} is missing: install Debian's chromium and chromium-driver "
           f"(`make test` does: apt-get install chromium chromium-driver)")
    if os.environ.get("CI"):        # in CI the browser test must run, never skip
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def page_server(smollm_path):
    proc = start_server(smollm_path, "--max-model-len", "1024", "--kv-cache-gb", "0.25",
                        "--api-key", API_KEY)
    try:
        yield Server(proc.base, proc.model, proc.log_path)
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def browser():
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            _missing(f"{what} ({path})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("the selenium package (pip install -e '.[test]')")
    profile = tempfile.mkdtemp(prefix="ostinato-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    # an explicit driver path: Selenium Manager never goes to the network for one
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT
