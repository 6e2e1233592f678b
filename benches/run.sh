#!/usr/bin/env bash
# nerve's benchmark harness, set-up included:
#   ./benches/run.sh            full mode: writes benches/results/<date>-<host>.{json,md} and PNG charts
#   ./benches/run.sh --quick    tiny counts (CI); results under benches/results/tmp/
# Any other option goes to the harness (python -m benches --help): --only, --runs, --out, --peers,
# --baseline REV (nerve at that git revision as the extra peer nerve@REV).
#
# Set-up, each step skipped when it cannot apply (the harness then reports the peers it lacks):
#   1. the virtualenv .venv (made if missing) with nerve and its bench extra: pip install -e '.[bench]'
#      (this builds the Rust extension; NERVE_BENCH_SKIP_PIP=1 skips the step when nerve and the
#      bench extra are already installed there);
#   2. moleculer.js 0.15 and the nats client: npm ci --prefix benches/peers/js;
#   3. the NATS server on 127.0.0.1:4222, started if it is down;
#   4. MoleculerPy in its own virtualenv when a Python >= 3.12 exists (it needs one), under
#      ${XDG_CACHE_HOME:-~/.cache}/nerve-bench/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MOLECULERPY_VERSION=0.14.22
say() { printf '\n[bench set-up] %s\n' "$*"; }

# 1. nerve + bench extra
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if [ "${NERVE_BENCH_SKIP_PIP:-}" = "1" ] && python -c 'import nerve._core, grpc, zmq, matplotlib' 2>/dev/null; then
    say "pip install skipped (NERVE_BENCH_SKIP_PIP=1)"
else
    say "pip install -e '.[bench]'"
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -e '.[bench]'
fi

# 2. moleculer.js peers
if command -v npm >/dev/null 2>&1; then
    say "npm ci --prefix benches/peers/js"
    npm ci --prefix benches/peers/js --no-audit --no-fund --loglevel=error \
        || echo "npm ci failed: the moleculer.js peers will be reported as skipped"
else
    echo "npm is not installed: the moleculer.js peers will be reported as skipped"
fi

# 3. NATS (the command of DESIGN section 5)
nats_up() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222 && head -c 4 <&3 | grep -q INFO' 2>/dev/null; }
if nats_up; then
    say "NATS is up on 127.0.0.1:4222"
elif [ -x /usr/sbin/nats-server ]; then
    say "starting NATS"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log \
        || echo "could not start NATS: the NATS peers will be reported as skipped"
    for _ in $(seq 1 50); do nats_up && break; sleep 0.1; done
else
    echo "/usr/sbin/nats-server is missing: the NATS peers will be reported as skipped"
fi

# 4. MoleculerPy (Python >= 3.12)
py312=""
for c in python3.14 python3.13 python3.12 /root/.pyenv/versions/3.1[2-9]*/bin/python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        py312="$(command -v "$c")"
        break
    fi
done
if [ -n "$py312" ]; then
    tag="$("$py312" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    mvenv="${XDG_CACHE_HOME:-$HOME/.cache}/nerve-bench/moleculerpy-py$tag"
    if ! "$mvenv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moleculerpy') != '$MOLECULERPY_VERSION')" 2>/dev/null; then
        say "MoleculerPy $MOLECULERPY_VERSION into $mvenv (Python $tag)"
        rm -rf "$mvenv"
        mkdir -p "$(dirname "$mvenv")"
        if "$py312" -m venv "$mvenv" && "$mvenv/bin/python" -m pip install --quiet "moleculerpy==$MOLECULERPY_VERSION"; then
            :
        else
            echo "MoleculerPy could not be installed: that peer will be reported as skipped"
            rm -rf "$mvenv"
        fi
    fi
    [ -x "$mvenv/bin/python" ] && export NERVE_BENCH_MOLECULERPY_PYTHON="$mvenv/bin/python"
else
    echo "no Python >= 3.12 on this machine: MoleculerPy is skipped (the report says so)"
fi

say "python -m benches $*"
exec python -m benches "$@"
