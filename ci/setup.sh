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
# A headless browser for the gateway page's tests (tests/test_gateway_openapi.py): Debian's
# chromium, installed once when missing. A machine where it cannot be installed still gets
# its venv; those tests then fail and say so.
# (Only for the test set-up, the "dev" extras: the demo needs no browser.)
if [[ ",${1:-}," == *",dev,"* ]] && ! command -v chromium >/dev/null 2>&1 && [ -r /etc/debian_version ] \
        && command -v apt-get >/dev/null 2>&1; then
    as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        as_root=(sudo)
    fi
    if ! log=$({ "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends chromium; } 2>&1); then
        echo "$log" >&2
        echo "ci/setup.sh: could not install chromium (apt-get); the gateway page's browser tests will fail" >&2
    fi
fi
