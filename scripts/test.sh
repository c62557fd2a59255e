#!/usr/bin/env bash
# Run the test suite (creates or reuses .venv). Extra arguments go to pytest.
# The suite runs twice, once per numpy major: in .venv (eqr[dev], whichever numpy it resolves)
# and in .venv-numpy (eqr[all,test] with the other major: numpy at its declared floor when
# .venv has 2.x, the newest numpy when .venv has 1.x, where tests needing packages of eqr[dev]
# alone skip). EQR_ONE_NUMPY=1 runs .venv only.
source "$(dirname "$0")/bootstrap.sh"
python -m pytest -n 2 -q "$@"
if [ "${EQR_ONE_NUMPY:-0}" = 1 ]; then
    exit 0
fi
if [ "$(numpy_major "$VENV")" = 1 ]; then OTHER_NUMPY="numpy>=2"; else OTHER_NUMPY="numpy==$NUMPY_FLOOR"; fi
ensure_venv "$ROOT/.venv-numpy" -e "$ROOT[all,test]" "$OTHER_NUMPY"
echo "eqr: the suite again with numpy $("$ROOT/.venv-numpy/bin/python" -c 'import numpy; print(numpy.__version__)')" \
     "(.venv-numpy; .venv has $(python -c 'import numpy; print(numpy.__version__)'))" >&2
exec "$ROOT/.venv-numpy/bin/python" -m pytest -n 2 -q "$@"
