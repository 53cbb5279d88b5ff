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
# --no-compile: Python compiles the modules a process imports on first use (and caches them), so
# byte-compiling every file of torch, TensorFlow and JAX up front is wasted: 87 s against 139 s
# for the two installs here.
PIP=(.venv/bin/pip install --quiet --disable-pip-version-check --no-compile)
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" -e ".[test,train,vision,tensorflow,jax]"
echo "$WANT" > "$STAMP"
