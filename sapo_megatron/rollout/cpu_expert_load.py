"""Direct load of MoE expert weights into vLLM-CPU's prepacked kernel tensors.

Why
    A weight update through vLLM's ``reload_weights`` re-materialises every layer in fresh memory, runs the
    weight loaders tensor by tensor, processes the layer again and copies the result back into the live kernel
    tensors; on CPU the MoE experts then need the re-pack of :mod:`sapo_megatron.rollout.vllm_cpu_fixes`, which
    prepacks into freshly allocated memory once more. For a MoE model the experts are nearly all the bytes
    (95% of Qwen3-30B-A3B), and on CPU that path runs at about a tenth of memory-copy speed
    (``docs/benchmarks.md``).

What this does instead
    The non-expert tensors still go through ``reload_weights`` (the expert layers receive nothing there and
    keep their kernel tensors untouched). Each expert is then written straight into the live, prepacked
    ``w13_weight`` / ``w2_weight``: its HF ``gate_proj`` / ``up_proj`` (or ``down_proj``) are laid out exactly
    as vLLM's loader and ``_pad_moe_intermediate`` lay them out (gate rows, then up rows, zero padding of the
    intermediate size), and vLLM's own ``prepack_moe_weight`` kernel packs them into the expert's slice of the
    kernel tensor. Gate and up rows that arrive as adjacent views of one tensor (Megatron's fused fc1) are read
    in place; others go through a small reused scratch. No layer-sized temporary is allocated and nothing is
    copied twice. The result is bit-identical to ``reload_weights`` followed by the re-pack
    (``tests/unit/test_rollout_engine.py``).

When it applies
    vLLM-CPU's unquantized grouped-GEMM experts (``CPUUnquantizedExperts`` and its ISA subclasses) without
    zentorch, all experts local (no expert map), no expert biases, and a prepack that packs every expert on
    its own (checked once per engine on random values with the engine's ISA, dtype and shapes).
    :func:`direct_expert_load_blocker` says why not otherwise, and the engine then falls back to
    ``reload_weights`` plus the re-pack. ``rollout.cpu_expert_load=reload`` forces that fallback.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch

# The expert kernel tensors this module writes, by vLLM parameter name suffix.
EXPERT_KERNEL_PARAMS = (".w13_weight", ".w2_weight")
EXPERT_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# vLLM module names of the expert kernels: model.layers.{l}.mlp.experts(.routed_experts)
EXPERT_MODULE_LAYER = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts(?:\.|$)")

ExpertWeights = dict[int, dict[int, dict[str, torch.Tensor]]]  # layer -> expert -> gate_proj/up_proj/down_proj


def split_expert_tensors(
    named: Iterable[tuple[str, torch.Tensor]],
) -> tuple[list[tuple[str, torch.Tensor]], ExpertWeights]:
    """HF-named tensors split into the non-expert ones (in order) and the expert ones by layer and expert."""
    rest: list[tuple[str, torch.Tensor]] = []
    experts: ExpertWeights = {}
    for name, tensor in named:
        match = EXPERT_TENSOR.match(name)
        if match is None:
            rest.append((name, tensor))
            continue
        layer, expert, proj = int(match.group(1)), int(match.group(2)), match.group(3)
        experts.setdefault(layer, {}).setdefault(expert, {})[proj] = tensor
    return rest, experts


def expert_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> the module holding that layer's ``w13_weight`` / ``w2_weight``."""
    layers = {}
    for name, module in model.named_modules():
        if not hasattr(module, "w13_weight"):
            continue
        match = EXPERT_MODULE_LAYER.match(name)
        if match is None:
            raise RuntimeError(f"direct expert load: unexpected expert module name {name!r}")
        layers[int(match.group(1))] = module
    return layers


def _fused_experts(module: torch.nn.Module):
    moe_kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
    return getattr(moe_kernel, "fused_experts", None)


def _layer_blocker(module: torch.nn.Module) -> Optional[str]:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    fused = _fused_experts(module)
    if not isinstance(fused, CPUUnquantizedExperts):
        return f"expert kernel {type(fused).__name__} is not vLLM-CPU's unquantized grouped GEMM"
    if getattr(fused, "_use_zentorch", False):
        return "the experts run on zentorch, whose weights are not prepacked by prepack_moe_weight"
    if getattr(module, "expert_map", None) is not None or module.local_num_experts != module.global_num_experts:
        return "the engine holds only some of the experts (expert parallel)"
    if any(hasattr(module, name) for name in ("w13_bias", "w2_bias")):
        return "the experts have biases"
    num_experts, two_padded, hidden = module.w13_weight.shape
    padded = fused._padded_intermediate_size(fused.moe_config)
    if two_padded != 2 * padded or tuple(module.w2_weight.shape) != (num_experts, hidden, padded):
        return (
            f"kernel shapes w13 {tuple(module.w13_weight.shape)} / w2 {tuple(module.w2_weight.shape)} do not match "
            f"the padded intermediate size {padded}"
        )
    return None


def _prepack_is_per_expert(isa: str, dtype: torch.dtype, shape: tuple[int, int]) -> bool:
    """Whether ``prepack_moe_weight`` packs each expert of a ``[experts, *shape]`` tensor on its own, so that
    packing one expert into its slice equals packing the whole stack (checked on random values)."""
    generator = torch.Generator().manual_seed(0)
    stacked = torch.randn((2, *shape), generator=generator).to(dtype)
    whole = torch.empty_like(stacked)
    torch.ops._C.prepack_moe_weight(stacked, whole, isa)
    each = torch.empty_like(stacked)
    for e in range(2):
        torch.ops._C.prepack_moe_weight(stacked[e : e + 1], each[e : e + 1], isa)
    return torch.equal(whole, each)


def direct_expert_load_blocker(model: torch.nn.Module) -> Optional[str]:
    """Why the engine's experts cannot be loaded directly, or None when they can. Runs where the model is."""
    layers = expert_layers(model)
    if not layers:
        return "the model has no MoE expert layers"
    for index, module in sorted(layers.items()):
        reason = _layer_blocker(module)
        if reason is not None:
            return f"layer {index}: {reason}"
    module = layers[min(layers)]
    isa = _fused_experts(module).isa
    dtype = module.w13_weight.dtype
    for name in ("w13_weight", "w2_weight"):
        if not _prepack_is_per_expert(isa, dtype, tuple(getattr(module, name).shape[1:])):
            return f"prepack_moe_weight (isa {isa}, {dtype}) does not pack experts independently ({name})"
    return None


def expert_module_class(model: torch.nn.Module) -> str:
    """The class name of the modules holding the expert kernels (vLLM's reload warns about them by it)."""
    layers = expert_layers(model)
    return type(next(iter(layers.values()))).__name__ if layers else ""


@torch.no_grad()
def load_experts_direct(
    model: torch.nn.Module, experts: ExpertWeights, layers: Optional[dict[int, torch.nn.Module]] = None
) -> int:
    """Writes the given experts (already checked) into the live prepacked kernel tensors: an expert's ``w13``
    slice from its ``gate_proj`` and ``up_proj`` (given together), its ``w2`` slice from its ``down_proj``. Any
    subset of layers and experts: a push loads them bucket by bucket, and the kernel packs each expert on its own
    (``direct_expert_load_blocker`` checked that), so a slice written now is final. Returns the number of kernel
    slices written. ``layers``: :func:`expert_layers` of the model, when the caller keeps it across calls.
    Runs where the model is (the engine's worker)."""
    if not experts:
        return 0
    layers = layers if layers is not None else expert_layers(model)
    unknown = sorted(set(experts) - set(layers))
    if unknown:
        raise RuntimeError(f"direct expert load: weights for MoE layers {unknown}, engine has {sorted(layers)}")
    written = 0
    for index, layer in experts.items():
        module = layers[index]
        fused = _fused_experts(module)
        w13, w2 = module.w13_weight, module.w2_weight
        num_experts, two_padded, hidden = w13.shape
        padded = two_padded // 2
        scratch13 = scratch2 = None
        for e, projections in layer.items():
            if not 0 <= e < num_experts:
                raise RuntimeError(f"direct expert load: layer {index} has no expert {e} (it has {num_experts})")
            gate, up, down = projections.get("gate_proj"), projections.get("up_proj"), projections.get("down_proj")
            if (gate is None) != (up is None):
                raise RuntimeError(f"direct expert load: layer {index}, expert {e}: gate_proj and up_proj are packed "
                                   "together and must be given together")
            if gate is not None:
                size = gate.shape[0]
                # Megatron keeps an expert's gate and up rows in one fc1 tensor, so colocated (and often after a
                # remote transfer) they arrive as adjacent views: pack straight from them, skipping the scratch.
                fc1 = _rows_as_one_view(gate, up, w13.dtype) if size == padded else None
                if fc1 is None:
                    if scratch13 is None:
                        # Zero outside the loaded rows: the intermediate-size padding of vLLM's layout.
                        scratch13 = torch.zeros((1, two_padded, hidden), dtype=w13.dtype)
                    scratch13[0, :size].copy_(gate)
                    scratch13[0, padded : padded + size].copy_(up)
                    fc1 = scratch13[0]
                torch.ops._C.prepack_moe_weight(fc1[None], w13[e : e + 1], fused.isa)
                written += 1
            if down is not None:
                size = down.shape[1]
                if size == padded and down.dtype == w2.dtype and down.is_contiguous():
                    fc2 = down
                else:
                    if scratch2 is None:
                        scratch2 = torch.zeros((1, hidden, padded), dtype=w2.dtype)
                    scratch2[0, :, :size].copy_(down)
                    fc2 = scratch2[0]
                torch.ops._C.prepack_moe_weight(fc2[None], w2[e : e + 1], fused.isa)
                written += 1
    return written


def _rows_as_one_view(first: torch.Tensor, second: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``cat([first, second])`` as a view, without copying, when ``second``'s rows directly follow ``first``'s
    in the same storage (both contiguous, of ``dtype``); None otherwise."""
    if not (first.dtype == second.dtype == dtype and first.is_contiguous() and second.is_contiguous()):
        return None
    if first.shape[1:] != second.shape[1:] or first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr():
        return None
    if second.data_ptr() != first.data_ptr() + first.nbytes:
        return None
    return first.as_strided((first.shape[0] + second.shape[0], *first.shape[1:]), first.stride(), first.storage_offset())
