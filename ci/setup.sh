#!/usr/bin/env bash
# Create (or reuse) .venv and install nerve into it, building the Rust core.
# Usage: ci/setup.sh [extras]   e.g. ci/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade "pip>=23"
spec="."
if [ -n "${1:-}" ]; then
    spec=".[$1]"
fi
python -m pip install -q --disable-pip-version-check -e "$spec"
