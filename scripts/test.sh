#!/usr/bin/env bash
# The project's test command (README "Tests"; CI runs it through .ci/run on a fresh CPU-only clone).
# Installs what the suite needs, the optional extras and the browser the web-app tests drive included, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e ".[dev,ui,train]"
if [ -f scripts/install-browser.sh ]; then
  bash scripts/install-browser.sh
fi
python -m pytest -q "$@"
