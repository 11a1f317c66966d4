#!/usr/bin/env bash
# Create .venv and install the pinned dependencies (requirements.lock) plus Cohort itself.
# Idempotent: re-running only installs what changed. Used by scripts/up.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.cohort-installed
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  touch "$stamp"
fi
# Ceph's Python binding (Debian's python3-rados, not on PyPI) is shown to the venv by a
# symlink of its extension module into site-packages, when the venv's Python has the same
# ABI (Debian bookworm's is CPython 3.11). cohort.storage.rados and cohort.ceph_server need it.
rados_suffix=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
rados_so=/usr/lib/python3/dist-packages/rados$rados_suffix
if [ -e "$rados_so" ]; then
  rados_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
  [ -e "$rados_site/rados$rados_suffix" ] || ln -sf "$rados_so" "$rados_site/"
fi
