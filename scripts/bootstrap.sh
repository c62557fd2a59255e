# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse .venv with eqr installed.
# torch is pinned here (the dev/CI pin), not in pyproject, which takes a range.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_PIN="torch==2.13.0"
PYTHON="${PYTHON:-python3}"

stamp_of() { cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "eqr: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.eqr-stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
    echo "eqr: installing eqr and its dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_PIN"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
    stamp_of > "$VENV/.eqr-stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
