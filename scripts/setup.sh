#!/usr/bin/env bash
# Creates .venv and installs ernie-hal into it. Brings the CPU build of PyTorch only when no
# torch is importable (users with CUDA/ROCm/CoreX keep their own build: see README).
# Usage: bash scripts/setup.sh [extras]   e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  # system site-packages stay visible so a vendor torch installed system-wide is used as is
  python3 -m venv --system-site-packages .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch found; installing the CPU build torch==2.13.0" >&2
  "$py" -m pip install -q "torch==2.13.0"
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
"$py" -m pip install -q -e "$spec" 2>&1 | grep -vE "is ignored: it is neither|^\s*$" >&2 || true
"$py" -c "import ernie_hal" || { echo "setup: ernie_hal failed to import" >&2; exit 1; }
# the CPU decode GEMV, built now with the system compiler (else at the first CPU load; without a
# compiler the CPU backend runs torch's kernels)
"$py" -m ernie_hal.backends.cpu.native >&2 || true
