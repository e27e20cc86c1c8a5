#!/usr/bin/env bash
# Install what pvio's test suite needs on Debian 12 (as root) and run all of it:
# lint, type check, the tour check and pytest -- the whole suite on the compiled build,
# then the compiled modules' tests on their Python sources (PVIO_PURE=1).  Extra
# arguments go to one pytest run instead (PVIO_PURE=1 in the environment: on the sources).
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
build_compiled

step "ruff"
"$VENV/bin/ruff" check src tests tools
step "mypy"
"$VENV/bin/mypy"
step "tour"
"$VENV/bin/python" tools/tour.py --check
# pytest exits 5 when no test ran: with `set -e` that fails the run, as it should.
if (($#)); then
  step "pytest $*"
  "$VENV/bin/python" -m pytest "$@"
else
  # Everything on the compiled build, as `pvio up` runs; then the compiled modules' own
  # tests again on their Python sources, the reference (pvio/compiled.py).
  step "pytest (the compiled build)"
  PVIO_EXPECT_COMPILED=1 "$VENV/bin/python" -m pytest
  step "pytest (pure Python: the compiled modules' tests)"
  # tests/<package> of every package with a compiled module (pvio.compiled.MODULES)
  mapfile -t compiled_tests < <("$VENV/bin/python" -c 'from pvio import compiled
for p in sorted({m.split(".")[1] for m in compiled.MODULES}): print("tests/" + p)')
  PVIO_PURE=1 "$VENV/bin/python" -m pytest -q "${compiled_tests[@]}" tests/tools/test_compiled.py
fi
