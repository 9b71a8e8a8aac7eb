#!/usr/bin/env bash
# CI step: Debian's chromium for the JupyterLab browser test (tests/jupyter/test_jupyter_browser.py).
#
# Playwright drives this binary (XDASK_TEST_CHROMIUM); `playwright install` is
# never run, so no browser is downloaded at test time.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "chromium already installed: $(command -v chromium)"
  exit 0
fi
SUDO=""
if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true   # an offline mirror may not need it
$SUDO apt-get install -y -qq chromium >/dev/null
echo "chromium installed: $(command -v chromium)"
