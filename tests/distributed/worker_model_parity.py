"""Builds the tiny Qwen3-MoE in megatron-core for several parallel layouts in turn, over one gloo job.

Usage: worker_model_parity.py OUT_DIR HF_DIR INPUTS_FILE LAYOUT [LAYOUT ...]
A layout reads ``tp2-pp1-ep2-etp1-alltoall``. For each layout every rank writes
``OUT_DIR/<layout>/rank<r>.pt`` = {"logits": full logits [B, S, V] on the last pipeline stage, else None}.
The first layout with given sizes also exports the HF weights: ``OUT_DIR/export-tp2-pp1-ep2-etp1/rank<r>.pt``,
and saves them as a sharded HF checkpoint: ``OUT_DIR/saved-tp2-pp1-ep2-etp1/``.
"""

import sys
from pathlib import Path

import torch


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


def main(out_dir: str, hf_dir: str, inputs_file: str, *layouts: str) -> None:
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.model import build_model, export_hf_weights, forward_logits
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed

    input_ids = torch.load(inputs_file)["input_ids"]
    exported_sizes = set()
    with MegatronCpuCompat("cpu"):
        for layout in layouts:
            parallel = parse_layout(layout)
            placement = init_distributed(parallel, "cpu", seed=1234)
            model = build_model(hf_dir, parallel, device="cpu")
            logits = forward_logits(model, input_ids, micro_batch_size=2)
            target = Path(out_dir) / layout
            target.mkdir(parents=True, exist_ok=True)
            torch.save({"logits": logits}, target / f"rank{placement.rank}.pt")

            sizes = layout.rsplit("-", 1)[0]
            if sizes not in exported_sizes:
                exported_sizes.add(sizes)
                exported = {name: tensor.clone() for name, tensor in export_hf_weights(model)}
                target = Path(out_dir) / f"export-{sizes}"
                target.mkdir(parents=True, exist_ok=True)
                torch.save(exported, target / f"rank{placement.rank}.pt")
                # Small shards, so that the tiny model is written as several files plus an index.
                model.bridge.save_weights(model.chunks, Path(out_dir) / f"saved-{sizes}", max_shard_bytes=400_000)
            del model
            destroy_distributed(keep_process_group=True)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
