#!/usr/bin/env bash
# Sets up a fresh machine: Fashion-MNIST from Debian (when missing and apt-get is usable), then a
# virtual environment in .venv with the package and its dev extras. Safe to run again.
#   bash scripts/setup.sh          (PYTHON=python3.12 bash scripts/setup.sh picks the interpreter)
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,4s/^# \{0,1\}//p' "$0"
  exit 0
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  else
    echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist'" \
         "or set data.root to a folder holding its .gz files" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pinned first, the versions the suite is tested with; the package itself admits torch 2.11 through 2.14.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -c "import torch, sparsetrain; print('sparsetrain ready: torch', torch.__version__)"
