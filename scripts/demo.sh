#!/usr/bin/env bash
# pyddl's main job on its built-in default: `pyddl train` (2 local workers, small CNN on digits).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pyddl train "$@"
