#!/usr/bin/env bash
# Install what pvio's test suite needs on Debian 12 (as root) and run all of it:
# lint, type check, the tour check and pytest.  Extra arguments go to pytest.
#
#   bash tools/test.sh                 # everything
#   bash tools/test.sh -k ring -x      # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tools/install.sh
source tools/install.sh

install_debian_packages
install_python_env test
build_native

step "ruff"
"$VENV/bin/ruff" check src tests tools
step "mypy"
"$VENV/bin/mypy"
step "tour"
"$VENV/bin/python" tools/tour.py --check
step "pytest"
# pytest exits 5 when no test ran: with `set -e` that fails the run, as it should.
"$VENV/bin/python" -m pytest "$@"
