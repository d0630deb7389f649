#!/usr/bin/env bash
# Installs MyMoE and what it needs into the current Python (use a venv if you prefer one).
# Keeps a torch that is already installed; otherwise installs the CPU build 2.13.0, because a bare
# `torch` requirement would pull a multi-GB CUDA build. Usage: bash scripts/setup.sh [extras]
#   extras: comma list of setup.cfg extras, e.g. "test" or "deepspeed,mpi" (default: none)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"

if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[setup] keeping installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
    echo "[setup] installing torch==2.13.0 (CPU build)"
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi

TARGET="."
if [ -n "$EXTRAS" ]; then TARGET=".[${EXTRAS}]"; fi
echo "[setup] pip install -e ${TARGET}"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e "${TARGET}"
echo "[setup] done: $("$PYTHON" -c 'import mymoe, torch; print("mymoe", mymoe.__version__, "torch", torch.__version__)')"
