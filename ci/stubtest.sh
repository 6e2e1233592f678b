#!/usr/bin/env bash
# Check the hand-written stub python/nerve/_core.pyi against the built Rust extension.
# Run it in the environment where nerve is installed (e.g. after `maturin develop`).
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m mypy.stubtest nerve._core
