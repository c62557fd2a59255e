#!/usr/bin/env bash
# The main job on the embedded default model (creates or reuses .venv).
source "$(dirname "$0")/bootstrap.sh"
eqr info paper-sudoku
