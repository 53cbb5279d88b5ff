#!/usr/bin/env bash
# Create ./.venv with pyddl and everything its tests and examples need (idempotent).
# torch is pinned: an unpinned install may pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.pyddl-setup
WANT="torch==2.14.1 torchvision==0.29.1 $(sha1sum pyproject.toml | cut -c1-12)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,train,vision,tensorflow,jax]"
echo "$WANT" > "$STAMP"
