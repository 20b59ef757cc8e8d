"""Fixtures for the real-browser tests: one ComfyUI server (real frontend, this pack, tiny models) for the package,
a fresh headless Chromium per test, and an artifacts folder for screenshots and logs (printed at the end).

Without chromium/chromedriver/selenium the tests skip with the reason, except under CI=true, where they fail:
CI provisions the browser (scripts/provision.sh), so a missing one there is a provisioning bug, not a skip.
"""
from __future__ import annotations

import re
import shutil

import pytest

from tests.browser.comfy_page import BrowserUnavailable, ComfyPage, browser_binaries, in_ci, start_chromium, write_settings
from devkit.comfy_server import ComfyServer
from devkit.paths import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"


@pytest.fixture(scope="session")
def browser_available():
    try:
        browser_binaries()
    except BrowserUnavailable as err:
        if in_ci():
            pytest.fail(f"browser tests must run in CI (CI=true) but {err}")
        pytest.skip(f"browser tests skipped: {err}")


@pytest.fixture(scope="session")
def artifacts_root():
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


@pytest.fixture(scope="package")
def browser_server(browser_available, comfy_base, artifacts_root):
    """The real `python main.py` with the real web UI (comfyui-frontend-package) and this pack."""
    # The first visit of a new user opens the template browser by itself; our tests open it as a returning user.
    write_settings(comfy_base, **{"Comfy.TutorialCompleted": True})
    server = ComfyServer(comfy_base, artifacts_root / "server.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def artifacts(request, artifacts_root):
    folder = artifacts_root / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser_server, artifacts):
    driver = start_chromium(artifacts)
    comfy_page = ComfyPage(driver, browser_server.url, artifacts)
    try:
        yield comfy_page.open()
    finally:
        comfy_page.close()
        # A test that failed mid-run must not leave its run (or a queued one) to block the next test's Run.
        browser_server.post("/queue", {"clear": True})
        browser_server.post("/interrupt", {})


def pytest_terminal_summary(terminalreporter):
    if ARTIFACTS.is_dir() and any(ARTIFACTS.iterdir()):
        terminalreporter.write_line(f"browser test artifacts (screenshots, logs): {ARTIFACTS}")
