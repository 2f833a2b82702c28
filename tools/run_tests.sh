#!/usr/bin/env bash
# Runs the whole test suite (unit, distributed, e2e) in the project's venv, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -ra -q --durations=15 "$@"
