#!/usr/bin/env bash
# Build nerve's wheel with maturin, install it into a fresh virtualenv (no source tree on the
# path) and run the README's example and `nerve demo` from it: what a user of a wheel gets.
# Usage: ci/wheel.sh   (needs .venv from ci/setup.sh dev for maturin)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')  # the interpreter .venv was made from
.venv/bin/maturin build --release --quiet --interpreter "$py" --out "$work/dist" >/dev/null
wheel=$(ls "$work"/dist/nerve-*.whl | head -n 1)
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
cd "$work"  # not the source tree: nerve must come from the wheel
"$work/venv/bin/python" - <<'PY'
import nerve, sys
assert "/site-packages/" in nerve.__file__, nerve.__file__
print("wheel:", nerve.__version__, nerve.__file__)
PY
python3 - "$OLDPWD/README.md" > example.py <<'PY'
import re, sys
print(re.findall(r"```python\n(.*?)```", open(sys.argv[1]).read(), re.S)[0])
PY
out=$("$work/venv/bin/python" example.py)
echo "$out"
grep -q "6000 bytes back" <<<"$out"
"$work/venv/bin/nerve" demo --size 1048576 >/dev/null
echo "wheel: README example and nerve demo ran from the wheel"
