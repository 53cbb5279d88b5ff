#!/usr/bin/env bash
# pyddl's main job on its built-in default: 4 local workers run the allreduce demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pyddl run -np 4 --topology 2x2 --allreduce multiring examples/allreduce_demo.py "$@"
