"""The reference side of the HF conversion test.

Usage:
  worker_checkpoint_convert.py train HF_DIR OUT_DIR LAYOUT
      Trains the tiny Qwen3-MoE one step under LAYOUT (e.g. ``tp2-pp2-ep2-etp1-alltoall``), saves a checkpoint
      into OUT_DIR/checkpoints, and writes what the conversion must reproduce: OUT_DIR/exported.safetensors
      (the bridge's unsharded HF export of the trained model, gathered over all ranks and saved by rank 0) and
      OUT_DIR/megatron_logits.pt ({"input_ids", "logits"} from the last pipeline stage).
  worker_checkpoint_convert.py transformers HF_DIR OUT_FILE INPUT_IDS_FILE
      Logits of transformers' model loaded from HF_DIR, in a process that never imports megatron.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# No heavy import at the top: megatron's checkpoint writer starts a spawn-context process that re-imports
# this script, once per rank.


def run_train(hf_dir: str, out_dir: str, layout: str) -> None:
    import torch
    from safetensors.torch import save_file
    from worker_checkpoint import config_for, train_step

    from sapo_megatron.actor.checkpoint import save_checkpoint
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.factory import build_actor
    from sapo_megatron.actor.model import export_hf_weights, forward_logits
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed

    out = Path(out_dir)
    cfg = config_for(layout)
    with MegatronCpuCompat("cpu"):
        placement = init_distributed(cfg.parallel, "cpu", seed=1)
        actor = build_actor(cfg, hf_dir, device=torch.device("cpu"), total_steps=1)
        trainer_state = {"step": 0, "data_position": 0, "rewards": []}
        train_step(actor, 1, trainer_state)
        started = time.perf_counter()
        step_dir = save_checkpoint(actor, out / "checkpoints", 1, trainer_state)
        seconds = time.perf_counter() - started
        exported = {name: tensor.detach().clone() for name, tensor in export_hf_weights(actor.model)}
        # 11 tokens: sequence parallelism over TP 2 has to pad.
        input_ids = torch.randint(0, 256, (4, 11), generator=torch.Generator().manual_seed(7))
        logits = forward_logits(actor.model, input_ids, micro_batch_size=2)
        if placement.rank == 0:
            save_file(exported, str(out / "exported.safetensors"))
            size = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
            (out / "save_stats.json").write_text(json.dumps({"seconds": seconds, "bytes": size}))
        from megatron.core import parallel_state

        if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save({"input_ids": input_ids, "logits": logits}, out / "megatron_logits.pt")
        destroy_distributed()


def run_transformers(hf_dir: str, out_file: str, input_ids_file: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    input_ids = torch.load(input_ids_file)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    torch.save({"logits": logits.float()}, out_file)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"train": run_train, "transformers": run_transformers}[mode](*args)
