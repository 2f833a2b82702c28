"""Both ends of the conversion check against an HF directory that transformers wrote itself.

Usage:
  worker_convert_independent.py write OUT_DIR
      transformers builds a randomly initialised Qwen3-MoE from CONFIG and writes it with ``save_pretrained``
      (one process, never imports megatron). No other test uses this shape. Also writes OUT_DIR.logits.pt:
      {"input_ids", "logits"} of transformers' model on fixed tokens.
  worker_convert_independent.py save HF_DIR CKPT_ROOT LAYOUT
      The actor loads HF_DIR under LAYOUT (e.g. ``tp2-pp2-ep2-etp1-alltoall``), takes one optimizer step with
      an exactly zero gradient (every advantage 0: the trainer saves only after a step, when the optimizer
      state exists) and saves the checkpoint of step 1 into CKPT_ROOT. Also writes CKPT_ROOT.logits.pt: the
      logits of the loaded model (last pipeline stage) on the tokens of HF_DIR.logits.pt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Differs from the tiny test model in every dimension the bridge maps: 4 layers with dense and MoE layers
# alternating (decoder_sparse_step 2: layers 1 and 3 are MoE), 6 experts with top-3 and the top-k weights
# not renormalised (norm_topk_prob false: megatron's softmax before top-k), 6 query heads over 2 KV groups
# with head_dim 24 != hidden / heads = 16, another vocabulary, RMSNorm epsilon and RoPE base.
CONFIG = dict(
    vocab_size=384,
    hidden_size=96,
    intermediate_size=160,
    moe_intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=24,
    num_experts=6,
    num_experts_per_tok=3,
    decoder_sparse_step=2,
    mlp_only_layers=[],
    norm_topk_prob=False,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    max_position_embeddings=256,
    tie_word_embeddings=False,
    attention_bias=False,
    initializer_range=0.05,
)
# The adam_eps / weight decay do not matter with a zero gradient except that decay would move the weights.
OVERRIDES = ["optimizer.weight_decay=0.0", "algorithm.num_mini_batches=1", "trainer.micro_batch_size=2"]


def write(out_dir: str) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(20261207)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**CONFIG)).to(torch.float32)
    model.save_pretrained(out_dir)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (4, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model.eval()(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    torch.save({"input_ids": input_ids, "logits": logits.float()}, f"{out_dir}.logits.pt")


def save(hf_dir: str, ckpt_root: str, layout: str) -> None:
    import dataclasses

    import torch
    from worker_checkpoint import parse_layout

    from sapo_megatron.actor.batch import TrainBatch
    from sapo_megatron.actor.checkpoint import save_checkpoint
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from megatron.core import parallel_state

    from sapo_megatron.actor.factory import build_actor
    from sapo_megatron.actor.model import forward_logits
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.config import load_config

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu_sapo.yaml"
    parallel, _ = parse_layout(layout)
    cfg = dataclasses.replace(load_config(recipe, OVERRIDES), parallel=parallel)
    with MegatronCpuCompat("cpu"):
        init_distributed(cfg.parallel, "cpu", seed=1)
        actor = build_actor(cfg, hf_dir, device=torch.device("cpu"), total_steps=1)
        input_ids = torch.load(f"{hf_dir}.logits.pt")["input_ids"]
        logits = forward_logits(actor.model, input_ids, micro_batch_size=2)
        if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save({"logits": logits}, f"{ckpt_root}.logits.pt")
        tokens = torch.randint(0, CONFIG["vocab_size"], (4, 9), generator=torch.Generator().manual_seed(3))
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, 3:] = True
        batch = TrainBatch(tokens=tokens, loss_mask=loss_mask, advantages=torch.zeros(4))
        logprobs = actor.policy.compute_logprobs(batch).logprobs
        metrics = actor.policy.train_mini_batch(batch.with_(logprobs_old=logprobs)).scalars()
        assert metrics["grad_norm"] == 0.0 and metrics["update_skipped"] == 0.0, metrics
        save_checkpoint(actor, ckpt_root, 1, {"step": 1}, hf_dir=hf_dir)
        destroy_distributed()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"write": write, "save": save}[mode](*args)
