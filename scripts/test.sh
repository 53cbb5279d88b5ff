#!/usr/bin/env bash
# Run pyddl's test suite in its own venv: unit, Gloo multi-process, CLI (and, as root, the
# emulated-cluster tests), on 2 pytest-xdist workers; the emulated clusters run one at a time
# (tests/conftest.py). Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit`,
# or `-n 0` to run in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra -n 2 --dist loadgroup "$@"
