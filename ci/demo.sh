#!/usr/bin/env bash
# nerve's main job: set up, then three nodes on loopback TCP calling each other and
# streaming a file (see `nerve demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
ci/setup.sh
exec .venv/bin/nerve demo "$@"
