#!/usr/bin/env bash
# Run the test suite (creates or reuses .venv). Extra arguments go to pytest.
source "$(dirname "$0")/bootstrap.sh"
exec python -m pytest -n 2 -q "$@"
