# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse .venv with eqr installed.
# torch is pinned here (the dev/CI pin), not in pyproject, which takes a range.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_PIN="torch==2.13.0"
PYTHON="${PYTHON:-python3}"
# numpy's declared floor (pyproject): the numpy-1 side of the suite runs exactly it.
NUMPY_FLOOR="$(sed -n 's/^ *"numpy>=\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -1)"

# ensure_venv DIR PIP_ARGS...: create DIR and (re)install the torch pin and PIP_ARGS whenever
# they, pyproject.toml or this file changed.
ensure_venv() {
    local dir="$1"
    shift
    local stamp
    stamp="$({ cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh"; echo "$*"; } | sha256sum | cut -d' ' -f1)"
    if [ ! -x "$dir/bin/python" ]; then
        echo "eqr: creating $dir" >&2
        "$PYTHON" -m venv "$dir"
    fi
    if [ "$(cat "$dir/.eqr-stamp" 2>/dev/null)" != "$stamp" ]; then
        echo "eqr: installing eqr and its dependencies into $dir" >&2
        "$dir/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_PIN"
        "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
        if [ "$(numpy_major "$dir")" = 1 ]; then  # something pins numpy < 2: test the declared floor
            "$dir/bin/python" -m pip install -q --disable-pip-version-check "numpy==$NUMPY_FLOOR"
        fi
        echo "$stamp" > "$dir/.eqr-stamp"
    fi
}

numpy_major() { "$1/bin/python" -c "import numpy; print(numpy.__version__.split('.')[0])"; }

ensure_venv "$VENV" -e "$ROOT[dev]"
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
