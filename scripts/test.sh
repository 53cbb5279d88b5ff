#!/usr/bin/env bash
# Run pyddl's test suite in its own venv: unit, Gloo multi-process, CLI (and, as root, the
# emulated-cluster tests). Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
