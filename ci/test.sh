#!/usr/bin/env bash
# Set up and run every test: Rust unit tests, the Python suite, the stub check and the
# benchmark harness in --quick mode (so it never rots; its figures are not quoted).
set -euo pipefail
cd "$(dirname "$0")/.."
ci/setup.sh dev,bench
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== cargo test"
cargo test --manifest-path rust/Cargo.toml --quiet
echo "== pytest"
python -m pytest -q
echo "== wheel (built by maturin, installed in a fresh virtualenv, README example and demo run from it)"
ci/wheel.sh
echo "== stubtest"
ci/stubtest.sh
echo "== mypy"
python -m mypy python/nerve
echo "== no module reads another module's underscore names (DESIGN.md 1b)"
python ci/check_private_access.py
echo "== benchmark harness, quick mode (keeps it from rotting; its figures are never quoted)"
NERVE_BENCH_SKIP_PIP=1 benches/run.sh --quick
