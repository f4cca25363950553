#!/usr/bin/env bash
# Quickstart: set up, then generate on the embedded default model (GPU if present, else CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ernie-hal generate "${@:-Hello from ernie-hal}" --device auto --max-new-tokens 32 --seed 0
