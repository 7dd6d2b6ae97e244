#!/bin/sh
# Debian's chromium + chromedriver for the dashboard's browser test (no browser downloads).
# Idempotent: does nothing when /usr/bin/chromium exists. Installs only as root (CI runs as
# root); otherwise it says what to run, and the browser test skips (fails when CI=true).
set -eu
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "browser.sh: /usr/bin/chromium missing; run: sudo apt-get install -y chromium chromium-driver" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends chromium chromium-driver \
    || { apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver; }
