"""Headless Chromium for browser tests: Debian's /usr/bin/chromium, driven by Playwright's Python driver.

Nothing is downloaded: the browser comes from apt and the driver from the playwright wheel, both
installed by tools/install_test_browser.sh. A missing piece fails the test (it is not skipped), so
that a machine without the browser cannot pass the suite by running less of it.
"""
import contextlib
import importlib.util
import os

import pytest

CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "run `bash tools/install_test_browser.sh` (Debian's chromium, gradio and playwright)"
# As root in a closed network: no sandbox, no GPU, and none of Chromium's own calls home, which the
# network refuses, many at a time, otherwise.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def require(*modules):
    """Fail, naming the installer, unless Chromium and the given Python modules are installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(CHROMIUM)
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: {INSTALL_HINT}", pytrace=False)


@contextlib.contextmanager
def chromium():
    """A headless Chromium with a fresh profile (Playwright makes a temporary one per launch)."""
    require("playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()
