#!/usr/bin/env bash
# Make sure a headless Chromium is present for the real-browser test (Debian package `chromium`).
# Playwright's own browser download does not work without network access, so we use the system one.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian chromium for the browser test..."
  (apt-get install -y -q chromium >/dev/null 2>&1) || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)
  exit 0
fi
echo "note: chromium not found and cannot be installed without root; the browser test will be skipped" >&2
