#!/usr/bin/env bash
# Install what the tests need into .venv, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
. scripts/shell_helpers.sh
setup_venv "$ROOT"
exec python -m pytest -q tests "$@"
