#!/usr/bin/env bash
# The GPU path on one GPU, in at most 8 minutes: the `gpu`-marked tests, then 3 SAPO steps of a small Qwen3-MoE
# with a colocated engine (engine built first with dummy weights, sleep level 2 / wake, in-process push into
# vLLM through the sapo_reshard backend, engine vs Megatron log-prob parity from the step's mismatch metrics,
# routed experts returned by vLLM itself and replayed with algorithm.routing_replay=rollout).
#
#   bash tools/gpu_check.sh [OUT_DIR]          OUT_DIR defaults to $OUT, else runs/gpu_check
#
# Needs the GPU stack (SAPO_STACK=gpu bash tools/setup_env.sh: vllm, megatron-core, Transformer Engine, pinned in
# tools/constraints/gpu-py312.txt), or SAPO_PYTHON naming a Python that has it. Writes gpu_check.log (everything),
# pytest.txt, train.log and summary.txt (the lines to record) into OUT_DIR; exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
py=${SAPO_PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=4 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec > >(tee -a "$out/gpu_check.log") 2>&1
deadline=$((SECONDS + 480))
left() { echo $((deadline - SECONDS)); }
status=0

echo "== $(date -u) gpu_check on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU"; exit 2; }
"$py" - <<'PY' || { echo "the GPU stack is not installed (SAPO_STACK=gpu bash tools/setup_env.sh)"; exit 2; }
import importlib.metadata as md
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
for name in ("torch", "vllm", "megatron-core", "transformer-engine", "mbridge", "transformers"):
    try:
        print(f"{name:20s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:20s} MISSING")
PY

echo "== gpu-marked tests"
timeout $(( $(left) / 2 )) "$py" -m pytest -m gpu -q -rs --timeout=200 tests > "$out/pytest.txt" 2>&1 || status=1
tail -5 "$out/pytest.txt"

echo "== 3 SAPO steps, colocated engine on this GPU (bf16)"
run_dir="$out/run"
rm -rf "$run_dir"
timeout "$(left)" "$py" -m sapo_megatron.cli train recipes/tiny_cpu_sapo.yaml \
    trainer.device=cuda model.params_dtype=bfloat16 trainer.steps=3 trainer.sft_warmup_steps=4 \
    trainer.eval_interval=0 trainer.save_interval=3 trainer.run_dir="$run_dir" \
    algorithm.routing_replay=rollout rollout.collect_routed_experts=true \
    optimizer.offload_params=true optimizer.offload_grads=true optimizer.offload_optimizer=true \
    > "$out/train.log" 2>&1 || status=1
tail -15 "$out/train.log"

"$py" - "$run_dir" > "$out/summary.txt" <<'PY' || status=1
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
steps = [r for r in rows if r.get("step", 0) >= 1]
assert len(steps) == 3, f"{len(steps)} steps logged"
for r in steps:
    print(f"step {r['step']}: rollout_version {r['weights/rollout_version']:.0f}  "
          f"mismatch_abs_max {r['mismatch/mismatch_abs_max']:.3e}  "
          f"routing changed (rollout vs old) {r.get('routing/rollout_vs_old/routing_changed_frac_mean', float('nan')):.4f}  "
          f"sync {r['time/sync']:.2f} s  rollout {r['time/rollout']:.2f} s")
# bf16 engine vs bf16 Megatron on the same weights: docs/actor.md bounds the difference (0.3 on a sharp model).
assert max(r["mismatch/mismatch_abs_max"] for r in steps) < 0.3, "engine and Megatron disagree beyond the bf16 bound"
assert [r["weights/rollout_version"] for r in steps] == [1.0, 2.0, 3.0], "the engine did not serve every push"
PY
cat "$out/summary.txt"
echo "== $(date -u) gpu_check: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
