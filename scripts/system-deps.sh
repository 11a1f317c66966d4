#!/usr/bin/env bash
# Install the Debian packages the test suite uses (scripts/debian-packages.txt), when missing.
# Needs root, as on CI; `apt-get update` runs once, only if something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
while read -r pkg _; do
  case "$pkg" in ''|'#'*) continue ;; esac
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done < scripts/debian-packages.txt
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "cohort: missing Debian packages: ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
    exit 1
  fi
  echo "cohort: installing Debian packages: ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
