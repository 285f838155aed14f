#!/usr/bin/env bash
# Installs what the web demo and its browser test need: Debian's chromium and the pinned
# gradio + playwright (requirements-demo.txt). Safe to run again: it installs only what is missing.
#
# The browser comes from apt, not from `playwright install` (which downloads its own build from a
# CDN): tests/test_demo.py starts /usr/bin/chromium through Playwright's Python driver.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
fi
chromium --version 2>/dev/null  # (Debian's launcher script may print a harmless shell warning on stderr)

# pip skips what is already installed at the pinned version.
python -m pip install -q -r requirements-demo.txt
python -c "import gradio, playwright; print('gradio', gradio.__version__)"
