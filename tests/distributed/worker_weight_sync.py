"""Trainer ranks of the weight-sync tests: a megatron actor pushes its weights into a vLLM engine.

Usage: worker_weight_sync.py OUT_DIR HF_DIR LAYOUT colocated
       worker_weight_sync.py OUT_DIR HF_DIR LAYOUT remote SYNC_PORT
A layout reads ``tp2-pp2-ep2-etp1-alltoall``. Colocated: the engine lives on rank 0. Remote: the engine is
``worker_weight_sync_receiver.py``, the last rank of a sync group on ``SYNC_PORT``.

Every rank writes ``OUT_DIR/rank<r>.pt``::

    {"megatron": {label: log-probs [B, S-1] of FIXED_TOKENS on the last pipeline stage, else None},
     "stats": {label: SyncStats as a dict}, "errors": {label: WeightSyncError message},
     "engine": {label: (weight_version, log-probs)}            # every rank's engine when colocated
     "unusable": {label: (weight_version, update_blocker, generate's error)}   # colocated, after "mid-push"
     "generated": {label: {"sequences", "prompt_len", "logprobs_rollout", "weight_version", "megatron"}}}

Labels name the steps of :data:`SCENARIO`; ``v<k>`` is the state after the push of version k.
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from pathlib import Path

import torch

BUCKET_BYTES = 64 * 1024  # the tiny model (1.2 MB) then travels in ~20 buckets
PROMPT_LEN = 140  # longer than vLLM-CPU's 128-token KV block, so prompts are prefix-cached
MAX_NEW_TOKENS = 8


def fixed_tokens() -> torch.Tensor:
    return torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))


def long_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, PROMPT_LEN), generator=g).tolist()


def parse_layout(text: str):
    from sapo_megatron.config import ParallelConfig

    tp, pp, ep, etp, dispatcher = text.split("-")
    tensor = int(tp.removeprefix("tp"))
    return ParallelConfig(
        tensor=tensor,
        pipeline=int(pp.removeprefix("pp")),
        expert=int(ep.removeprefix("ep")),
        expert_tensor=int(etp.removeprefix("etp")),
        sequence_parallel=tensor > 1,
        moe_token_dispatcher=dispatcher,
    )


def build_engine(hf_dir: str):
    from sapo_megatron.config import RolloutConfig
    from sapo_megatron.rollout import RolloutEngine

    return RolloutEngine(hf_dir, RolloutConfig(kv_cache_memory_bytes=64 * 1024**2, seed=0), dtype="float32")


def engine_logprobs(engine, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) from vLLM's prompt log-probs (a prefill that never reads the prefix cache)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rows = tokens.tolist()
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=row) for row in rows], params, use_tqdm=False)
    return torch.tensor(
        [[out.prompt_logprobs[j][row[j]].logprob for j in range(1, len(row))] for out, row in zip(outputs, rows)],
        dtype=torch.float64,
    )


def megatron_logprobs(model, sequences: list[list[int]]) -> list[torch.Tensor] | None:
    """Per sequence, log p(token t+1 | tokens <= t) [len - 1] on the last pipeline stage; None elsewhere."""
    from sapo_megatron.actor.model import forward_logits

    width = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(s)
    logits = forward_logits(model, tokens)
    if logits is None:
        return None
    logprobs = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return [logprobs[i, : len(s) - 1] for i, s in enumerate(sequences)]


def perturb(model, seed: int) -> None:
    """Adds noise that depends only on (parameter, piece, seed): replicas (TP copies of norms and routers, data
    parallel copies) stay identical, as an optimizer step keeps them."""
    for shard in model.bridge.weight_shards(model.chunks, owned_only=False):
        key = zlib.crc32(repr((shard.hf_names, shard.index, seed)).encode())
        noise = torch.randn(shard.tensor.shape, generator=torch.Generator().manual_seed(key), dtype=torch.float32)
        shard.tensor.add_(noise.to(shard.tensor.dtype) * 0.02)


class FailAfter:
    """Replaces ``module.name`` with a function that raises on its ``calls``-th call (a fault mid-transfer)."""

    def __init__(self, module, name: str, calls: int) -> None:
        self.module, self.name, self.calls = module, name, calls
        self.original = getattr(module, name)

    def __enter__(self):
        count = [0]

        def failing(*args, **kwargs):
            count[0] += 1
            if count[0] == self.calls:
                raise RuntimeError(f"injected fault in {self.name}")
            return self.original(*args, **kwargs)

        setattr(self.module, self.name, failing)

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


class Wrapped(torch.nn.Module):
    """Stands in for megatron's DDP and Float16Module, which keep the model as ``.module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def main(out_dir: str, hf_dir: str, layout: str, mode: str, sync_port: str | None = None) -> None:
    import sapo_megatron.bridge.sync as sync_module
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.model import build_model
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.bridge.sync import SyncGroup, WeightSync, WeightSyncError

    parallel = parse_layout(layout)
    out: dict = {"megatron": {}, "stats": {}, "errors": {}, "engine": {}, "generated": {}, "unusable": {}}
    with MegatronCpuCompat("cpu"):
        placement = init_distributed(parallel, "cpu", seed=1234)
        rank, world = placement.rank, placement.world_size
        model = build_model(hf_dir, parallel, device="cpu")
        engine = None
        if mode == "colocated":
            # A colocated fleet: one engine per rank, every one of them receives every push.
            engine = build_engine(hf_dir)
            sync = WeightSync.colocated(model, engine=engine, engine_ranks=range(world), bucket_bytes=BUCKET_BYTES)
        else:
            group = SyncGroup.connect("127.0.0.1", int(sync_port), rank=rank, world_size=world + 1, timeout_s=240)
            sync = WeightSync.remote(model, group, bucket_bytes=BUCKET_BYTES)
        tokens = fixed_tokens()

        def record(label: str) -> None:
            logprobs = megatron_logprobs(model, tokens.tolist())
            out["megatron"][label] = None if logprobs is None else torch.stack(logprobs)
            if engine is not None:
                out["engine"][label] = (engine.weight_version, engine_logprobs(engine, tokens))

        def push(label: str, version: int, chunks=None) -> bool:
            try:
                out["stats"][label] = dataclasses.asdict(sync.push(chunks or model.chunks, version))
                return True
            except WeightSyncError as exc:
                out["errors"][label] = str(exc)
                return False

        def generate_and_score(label: str) -> None:
            """Rank 0's engine samples from long prompts; every rank scores the samples with megatron."""
            batch = None
            if engine is not None and rank == 0:
                b = engine.generate(long_prompts(), n=2, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0,
                                    seed=7)
                batch = {"sequences": [p + r for p, r in zip(b.prompt_ids, b.response_ids)],
                         "logprobs_rollout": b.logprobs_rollout, "weight_version": b.weight_version}
            box = [batch]
            if world > 1:
                torch.distributed.broadcast_object_list(box, src=0)
            batch = box[0]
            scored = megatron_logprobs(model, batch["sequences"])
            batch["megatron"] = None if scored is None else [lp[PROMPT_LEN - 1 :] for lp in scored]
            out["generated"][label] = batch

        # The engine starts from the HF directory; the pushed weights differ from it from the first push on.
        perturb(model, seed=1)
        push("v1", 1)
        record("v1")
        if mode == "colocated":
            # Fills the prefix cache with version-1 KV blocks of the prompts.
            generate_and_score("v1")
        perturb(model, seed=2)
        push("v2", 2)
        record("v2")
        if mode == "colocated":
            generate_and_score("v2")

        # Failures: each must raise on every rank and leave the engine on version 2.
        last_stage = [c for c in model.chunks if getattr(c, "post_process", False)]
        kept = {}
        for chunk in last_stage:  # a mis-shaped tensor: the final norm grows by two elements
            kept[chunk] = chunk.decoder.final_layernorm.weight
            chunk.decoder.final_layernorm.weight = torch.nn.Parameter(torch.ones(kept[chunk].numel() + 2))
        push("misshaped", 3)
        for chunk, weight in kept.items():
            chunk.decoder.final_layernorm.weight = weight
        record("after-misshaped")

        for chunk in last_stage:  # a missing tensor: no lm_head
            kept[chunk] = chunk.output_layer._parameters.pop("weight")
        push("missing", 3)
        for chunk in last_stage:
            chunk.output_layer.register_parameter("weight", kept[chunk])
        record("after-missing")

        # An exception mid-transfer, in the first bucket, so that no engine has loaded anything yet: while
        # rebuilding it on every engine's rank (colocated), or while packing the first piece on the last trainer
        # rank (colocated; remote: the fifth, since a remote engine loads only a complete transfer).
        if mode == "colocated":
            with FailAfter(sync_module, "unshard", 1):
                push("fault-receiver", 3)
        if world > 1 or mode == "remote":
            if rank == world - 1:
                with FailAfter(sync_module, "_piece_view", 1 if mode == "colocated" else 5):
                    push("fault-sender", 3)
            else:
                push("fault-sender", 3)
        record("after-faults")

        if mode == "colocated":
            # Non-finite weights: each owner checks its pieces, so the push is refused before any byte moves.
            saved = {}
            for chunk in last_stage:
                weight = chunk.decoder.final_layernorm.weight
                saved[chunk] = weight.detach().clone()
                weight.data[0] = float("nan")
            push("nan", 3)
            for chunk, kept_weight in saved.items():
                chunk.decoder.final_layernorm.weight.data.copy_(kept_weight)
            if world == 1:
                push("stale", 2)
            record("after-nan")

        # The sync still works after the failures, and takes wrapped chunks (as the trainer's DDP ones).
        perturb(model, seed=3)
        push("v3", 3, [Wrapped(chunk) for chunk in model.chunks])
        record("v3")

        if mode == "colocated" and world == 1:
            # Loading through vLLM's reload (the fallback of the direct expert load) without the vLLM-CPU MoE
            # re-pack, the engine computes wrong log-probs; the next push (the default direct load) repairs it.
            assert engine.expert_load == "direct"
            engine.expert_load, engine._repack_after_reload = "reload", False
            perturb(model, seed=4)
            push("v4-no-repack", 4)
            record("v4-no-repack")
            engine.expert_load, engine._repack_after_reload = "direct", True
            push("v5", 5)
            record("v5")

        if mode == "colocated":
            # A failure after the engines have loaded some buckets: rank 0's engine stops at its tenth tensor
            # (a later bucket) and is left unusable; every rank must say so. The engine is done for after this.
            version = engine.weight_version + 1
            perturb(model, seed=6)
            if rank == 0:
                with FailAfter(sync_module, "unshard", 10):
                    push("mid-push", version)
            else:
                push("mid-push", version)
            try:
                engine.generate(long_prompts(), n=1, max_new_tokens=2, temperature=1.0, top_p=1.0, seed=7)
                refused = None
            except RuntimeError as exc:
                refused = str(exc)
            out["unusable"]["mid-push"] = (engine.weight_version, engine.update_blocker(), refused)

        target = Path(out_dir)
        target.mkdir(parents=True, exist_ok=True)
        torch.save(out, target / f"rank{rank}.pt")
        if mode == "remote":
            print(f"rank {rank}: done", flush=True)
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
