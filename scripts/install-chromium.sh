#!/usr/bin/env bash
# Debian's Chromium for the browser test (Playwright's own browser download does not work offline).
set -euo pipefail
if command -v chromium >/dev/null; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
    echo "error: chromium is missing and installing it needs root; run: sudo apt-get install -y chromium" >&2
    exit 1
fi
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
