#!/usr/bin/env bash
# Install Debian's chromium for tests/test_web.py (driven by Playwright with executable_path=/usr/bin/chromium).
# Only acts when the browser is missing, apt-get exists and we are root; otherwise it says what to do.
# Playwright's own browser download (`playwright install`) is never used.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_browser.sh: /usr/bin/chromium is missing and apt-get is not available; install chromium yourself" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup_browser.sh: /usr/bin/chromium is missing; run as root: apt-get update && apt-get install -y chromium" >&2
  exit 0
fi
echo "setup_browser.sh: installing chromium with apt-get"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
