#!/usr/bin/env bash
# Makes sure Debian's headless Chromium and its ChromeDriver are installed: the /audit page test
# drives them (tests/test_audit_page.py). Installs the packages `chromium` and `chromium-driver`
# with apt-get when they are missing and we are root (or have passwordless sudo).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  echo "usage: scripts/install-chromium.sh    install Debian's chromium and chromium-driver (apt-get)"
  echo "set CHROMIUM=/path/to/chromium and CHROMEDRIVER=/path/to/chromedriver to use others"
  exit 0
fi

chromium="${CHROMIUM:-/usr/bin/chromium}"
driver="${CHROMEDRIVER:-/usr/bin/chromedriver}"
if [[ -x "$chromium" && -x "$driver" ]]; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "install-chromium: $chromium or $driver is missing and I cannot install them (not root)." >&2
  echo "  run: sudo apt-get install chromium chromium-driver" >&2
  echo "  or set CHROMIUM and CHROMEDRIVER to an installed Chromium and its ChromeDriver" >&2
  exit 1
fi
echo "installing Debian's chromium and chromium-driver (for the /audit page test)..." >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "installed $("$chromium" --version 2>/dev/null || echo chromium)" >&2
