#!/usr/bin/env bash
# Debian's prometheus package (prometheus + promtool), unpacked into a folder: no daemon, no
# system install. Usage: cluster/fetch-prometheus.sh [DEST]   (default .cache/prometheus)
set -euo pipefail
dest="${1:-$(cd "$(dirname "$0")/.." && pwd)/.cache/prometheus}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
if [ -x "$dest/usr/bin/prometheus" ] && [ -x "$dest/usr/bin/promtool" ]; then
  exit 0
fi
mkdir -p "$dest/deb"
cd "$dest/deb"
rm -f prometheus_*.deb
if ! apt-get download prometheus >/dev/null 2>&1; then
  # a fresh machine may have no package lists yet
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
  apt-get download prometheus >/dev/null
fi
dpkg -x prometheus_*.deb "$dest"
"$dest/usr/bin/prometheus" --version | head -1
