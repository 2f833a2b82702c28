#!/usr/bin/env bash
# Installs a headless Chromium and its driver from the distribution's packages for the dashboard's browser
# test (tests/browser). Idempotent: does nothing when both are already installed. Needs root (or sudo) and
# a Debian/Ubuntu apt.
set -euo pipefail

packages=(chromium chromium-driver)
missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install_browser.sh: needs root or sudo to install ${missing[*]}" >&2; exit 1; }
  as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
# apt's progress and debconf chatter go to a log that is shown only when the install fails.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! { "${as_root[@]}" apt-get update -qq && \
       "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install_browser.sh: installing ${missing[*]} failed" >&2
  exit 1
fi
command -v chromium >/dev/null || { echo "install_browser.sh: chromium is not on PATH after the install" >&2; exit 1; }
