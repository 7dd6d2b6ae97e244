#!/usr/bin/env bash
# Fetch real SMTP clients for tests and benchmarks without installing them system-wide:
# Postfix's smtp-source/smtp-sink and swaks, unpacked from Debian's packages into .tools/, and
# nginx (the API's TLS proxy in deploy/, run by tests/test_deploy.py).
set -euo pipefail
DEST="${1:-.tools}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
if [[ -x "$DEST/usr/sbin/smtp-source" && -x "$DEST/usr/bin/swaks" && -x "$DEST/usr/sbin/nginx" ]]; then exit 0; fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download postfix swaks nginx >/dev/null 2>&1; then
  # A fresh machine may have no package lists yet.
  if [[ "$(id -u)" == 0 ]]; then apt-get update -qq >/dev/null; fi
  apt-get download postfix swaks nginx >/dev/null
fi
for deb in ./*.deb; do dpkg -x "$deb" "$DEST"; done
test -x "$DEST/usr/sbin/smtp-source" && test -x "$DEST/usr/bin/swaks" && test -x "$DEST/usr/sbin/nginx"
echo "SMTP tools in $DEST"
