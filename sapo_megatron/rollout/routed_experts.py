"""Routed-expert capture for vLLM engines that cannot return routing themselves (vLLM on CPU).

vLLM returns the experts each token was routed to (``enable_return_routed_experts``) only with its
Model Runner V2, which needs Triton and therefore a GPU. On CPU the rollout engine recovers the same
information by *re-scoring*: after generation, every final sequence is run once more through the engine's
own model as a prefill-only request while :class:`RouterCapture` records the top-k expert ids each MoE
router selects. The ids come from vLLM's router itself (``BaseRouter.capture_fn``, the hook vLLM's own
GPU capturer uses, called with the logical expert ids before any EPLB remapping), so they are the experts
the engine's MoE kernel used for that forward pass.

Layout (shared with the GPU path): for a sequence of ``L = prompt_len + response_len`` tokens the result
is a tensor ``[L - 1, num_moe_layers, top_k]`` in the compact id dtype
(:func:`~sapo_megatron.routing_layout.routing_dtype`: uint8 up to 256 experts, a quarter of int32's bytes in
the pickled rollout and in the capture's buffers); row ``t`` holds the experts chosen for token ``t``
(the last sampled token is never fed through the model, so it has no routing), layers are the MoE layers in
layer order, and the ``top_k`` ids of a token are sorted ascending (vLLM's top-k is unordered, and the set
is what routing replay needs). :meth:`~sapo_megatron.routing_layout.RoutingRecord.from_sequences` turns a
share's rows into the record the trainer keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class CapturedForward:
    """The rows of one or more forward passes: which token at which position went to which experts."""

    token_ids: torch.Tensor  # [rows] int64
    positions: torch.Tensor  # [rows] int64
    experts: torch.Tensor  # [rows, num_moe_layers, top_k] in the capture's id dtype, sorted ascending per row


class RouterCapture:
    """Records the expert ids chosen by every MoE router of one in-process vLLM model, with the input
    token ids and positions of each forward pass so that rows can be attributed to sequences.

    ``install(model)`` sets vLLM's router capture callback on each MoE layer plus a forward pre-hook on the
    model; ``remove()`` takes both away again. The object must live in the process that runs the model
    (the in-process uni executor). ``dtype``: what the ids are kept as (the compact
    :func:`~sapo_megatron.routing_layout.routing_dtype` of the model's expert count).
    """

    def __init__(self, dtype: torch.dtype = torch.int32) -> None:
        self.dtype = dtype
        self._routers: list = []
        self._layer_ids: list[int] = []
        self._blocks: dict[int, list[torch.Tensor]] = {}
        self._inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._input_hook = None

    @property
    def installed(self) -> bool:
        return bool(self._routers)

    def install(self, model: torch.nn.Module) -> int:
        """Hooks every MoE layer of ``model``; returns the number of MoE layers found."""
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        if self.installed:
            raise RuntimeError("RouterCapture.install: already installed; call remove() first")
        runners = sorted(
            (m for m in model.modules() if isinstance(m, MoERunner)), key=lambda runner: runner.layer_id
        )
        if not runners:
            raise ValueError("RouterCapture.install: the model has no MoE layers, so there is no routing to record")
        for runner in runners:
            # Monolithic kernels route inside the kernel and never call the router's capture hook.
            if runner.is_monolithic or not isinstance(runner.router, BaseRouter):
                raise ValueError(
                    f"RouterCapture.install: layer {runner.layer_name} uses a monolithic MoE kernel "
                    f"({type(runner.router).__name__}); its routing cannot be observed from the router"
                )
            if runner.router.capture_fn is not None:
                raise RuntimeError(
                    f"RouterCapture.install: layer {runner.layer_name} already has a routing capture hook "
                    "(vLLM's own routed-experts capture is on); do not combine the two"
                )
        for runner in runners:
            layer_id = runner.layer_id
            self._blocks[layer_id] = []
            runner.router.set_capture_fn(self._recorder(layer_id))
            self._routers.append(runner.router)
            self._layer_ids.append(layer_id)
        self._input_hook = model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
        return len(runners)

    def _recorder(self, layer_id: int):
        blocks = self._blocks[layer_id]
        dtype = self.dtype

        def record(topk_ids: torch.Tensor) -> None:
            # The router may reuse its buffers across steps, so keep a copy.
            blocks.append(topk_ids.detach().to("cpu", dtype, copy=True))

        return record

    def _record_inputs(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if input_ids is None or positions is None:
            raise RuntimeError("RouterCapture: the model was called without input_ids/positions; cannot attribute rows")
        self._inputs.append((input_ids.detach().to("cpu", torch.long, copy=True),
                             positions.detach().to("cpu", torch.long, copy=True)))

    def remove(self) -> None:
        for router in self._routers:
            router.set_capture_fn(None)
        if self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None
        self._routers.clear()
        self._layer_ids.clear()
        self._blocks.clear()
        self._inputs.clear()

    def clear(self) -> None:
        for blocks in self._blocks.values():
            blocks.clear()
        self._inputs.clear()

    def take(self) -> CapturedForward:
        """Everything recorded since the last take/clear, rows in forward order."""
        if not self.installed:
            raise RuntimeError("RouterCapture.take: not installed")
        if not self._inputs:
            raise RuntimeError("RouterCapture.take: no forward pass was recorded")
        token_ids = torch.cat([ids for ids, _ in self._inputs])
        positions = torch.cat([pos for _, pos in self._inputs])
        per_layer = [torch.cat(self._blocks[layer_id]) for layer_id in self._layer_ids]
        rows = {p.shape[0] for p in per_layer} | {token_ids.shape[0]}
        assert len(rows) == 1, f"MoE layers and model inputs recorded different token counts: {sorted(rows)}"
        self.clear()
        return CapturedForward(token_ids, positions, torch.stack(per_layer, dim=1).sort(dim=-1).values)


def _pack(prefixes: list[tuple[int, ...]], max_tokens: int, max_seqs: int) -> list[list[tuple[int, ...]]]:
    """Groups that the scheduler prefills in a single step (no chunking); a prefix longer than the token
    budget goes alone (it is chunked over several steps, in order)."""
    groups: list[list[tuple[int, ...]]] = []
    current: list[tuple[int, ...]] = []
    used = 0
    for prefix in prefixes:
        if current and (used + len(prefix) > max_tokens or len(current) == max_seqs):
            groups.append(current)
            current, used = [], 0
        current.append(prefix)
        used += len(prefix)
    if current:
        groups.append(current)
    return groups


def _split(captured: CapturedForward, group: list[tuple[int, ...]]) -> dict[tuple[int, ...], torch.Tensor]:
    """Attributes captured rows to the group's prefixes; raises if they do not account for exactly those."""
    ids, pos = captured.token_ids, captured.positions
    if len(group) == 1:
        prefix = group[0]
        if ids.tolist() != list(prefix) or pos.tolist() != list(range(len(prefix))):
            raise RuntimeError("routing re-score: the recorded forward rows do not match the scored sequence")
        return {prefix: captured.experts}
    # A request's rows are contiguous with consecutive positions from 0; a new request starts wherever
    # the position does not continue the previous row.
    starts = [0] + [i for i in range(1, len(pos)) if pos[i] != pos[i - 1] + 1] + [len(pos)]
    wanted = set(group)
    out: dict[tuple[int, ...], torch.Tensor] = {}
    for a, b in zip(starts[:-1], starts[1:]):
        key = tuple(ids[a:b].tolist())
        if pos[a] != 0 or key not in wanted or key in out:
            raise RuntimeError(
                "routing re-score: a forward segment does not match a whole scored sequence (vLLM split or "
                "reordered the prefill); the rows cannot be attributed"
            )
        out[key] = captured.experts[a:b]
    if len(out) != len(wanted):
        raise RuntimeError(f"routing re-score: {len(wanted) - len(out)} sequence(s) were not seen in the forward rows")
    return out


def rescore_routed_experts(
    llm,
    capture: RouterCapture,
    sequences: Sequence[Sequence[int]],
    *,
    max_batch_tokens: int,
    max_batch_seqs: int,
) -> list[torch.Tensor]:
    """Routing of each full sequence under the engine's current weights, by prefill-only re-scoring.

    ``llm`` is an in-process ``vllm.LLM`` whose model ``capture`` is installed on. Distinct sequences are
    packed into requests the scheduler prefills in one step each; ``skip_reading_prefix_cache`` forces every
    token through the model (a prefix-cache hit skips the forward, and with it the routing). The recorded
    token ids and positions attribute every row to its sequence, and any mismatch raises.
    Returns one tensor ``[len(seq) - 1, num_moe_layers, top_k]`` (in ``capture.dtype``) per sequence.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if not capture.installed:
        raise RuntimeError("rescore_routed_experts: install the RouterCapture on the engine's model first")
    # Rows cover exactly the tokens whose outputs feed a log-prob: the sequence without its last token.
    prefixes: list[tuple[int, ...]] = []
    for seq in sequences:
        if len(seq) < 2:
            raise ValueError(f"rescore_routed_experts: a sequence needs at least 2 tokens, got {len(seq)}")
        prefixes.append(tuple(int(t) for t in seq[:-1]))
    # One generated token is the minimum vLLM allows; greedy avoids sampling work.
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=True)
    routing: dict[tuple[int, ...], torch.Tensor] = {}
    for group in _pack(list(dict.fromkeys(prefixes)), max_batch_tokens, max_batch_seqs):
        capture.clear()
        llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in group], params, use_tqdm=False)
        routing.update(_split(capture.take(), group))
    return [routing[p] for p in prefixes]
