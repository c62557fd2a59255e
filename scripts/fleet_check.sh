#!/usr/bin/env bash
# The local fleet check by hand (docs/serving.md#a-fleet-behind-haproxy): two `eqr serve` replicas
# of maze-small behind haproxy (deploy/haproxy/haproxy.cfg), hey and `eqr solve --server` as the
# load; one replica SIGKILLed mid-load, then one drained by SIGTERM. It prints what it measured
# (time to DOWN, hey's status counts) and fails if a request went unanswered or answered wrong.
# Needs haproxy and hey (apt-get install haproxy hey) and the serve extra (.venv from scripts/test.sh).
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
for program in haproxy hey; do
    command -v "$program" >/dev/null || { echo "fleet_check: $program is not installed: apt-get install $program" >&2; exit 2; }
done
exec python -m pytest -q -s -p no:cacheprovider tests/test_fleet.py "$@"
