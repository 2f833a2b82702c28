"""The three bf16 forward passes of test_bf16_fidelity.py, each in its own process.

Usage:
  worker_bf16_fidelity.py make OUT_DIR TOKENIZER_DIR
      transformers writes the "sharp" model: a wider Qwen3-MoE (hidden 256, 4 layers, 16 experts, top-4) whose
      head, value / output projections, experts and routers are scaled up, so that logits reach ~5 and routing
      decisions are sharper, as in a trained model (random init gives logits below 1).
  worker_bf16_fidelity.py hf HF_DIR OUT_FILE BATCH SEQ
      transformers in fp32 and in bf16 (never imports megatron or vLLM): {"input_ids", "fp32": pass,
      "bf16": pass}, pass = {"logits" [B, S, V] fp32, "routing" [B, S, layers, topk] sorted expert ids}.
  worker_bf16_fidelity.py megatron HF_DIR OUT_FILE INPUTS_FILE
      megatron-core (1 process, local spec, Float16Module) in bf16: the same pass.
  worker_bf16_fidelity.py vllm HF_DIR OUT_FILE INPUTS_FILE
      vLLM's CPU engine in bf16: {"logprobs" [B, S - 1] float64} from prompt log-probs.
"""

import sys

import torch

SHARP = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    moe_intermediate_size=128,
    num_experts=16,
    num_experts_per_tok=4,
)
SHARP_SCALE = {"lm_head": 4.0, "experts": 3.0, "o_proj": 3.0, "v_proj": 3.0, "mlp.gate.": 5.0}


def make(out_dir: str, tokenizer_dir: str) -> None:
    import shutil
    from pathlib import Path

    from transformers import AutoConfig, Qwen3MoeForCausalLM

    config = AutoConfig.from_pretrained(tokenizer_dir)
    for key, value in SHARP.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            for part, scale in SHARP_SCALE.items():
                if part in name:
                    param.mul_(scale)
    model.save_pretrained(out_dir)
    for path in Path(tokenizer_dir).iterdir():
        if path.name.startswith(("tokenizer", "generation_config")):
            shutil.copy(path, Path(out_dir) / path.name)


def _sorted_sets(indices: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    return indices.reshape(batch, seq, -1).sort(dim=-1).values.to(torch.int32)


def hf(hf_dir: str, out_file: str, batch: str, seq: str) -> None:
    from transformers import AutoModelForCausalLM

    batch, seq = int(batch), int(seq)
    input_ids = torch.randint(0, 259, (batch, seq), generator=torch.Generator().manual_seed(1234))
    result = {"input_ids": input_ids}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
        routing = {}

        def record(index):
            def hook(module, inputs, outputs):
                routing[index] = _sorted_sets(outputs[2], batch, seq)

            return hook

        for index, layer in enumerate(model.model.layers):
            layer.mlp.gate.register_forward_hook(record(index))
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        result[name] = {"logits": logits.float(), "routing": torch.stack([routing[i] for i in sorted(routing)], 2)}
    torch.save(result, out_file)


def megatron(hf_dir: str, out_file: str, inputs_file: str) -> None:
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.model import build_model, forward_logits
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.config import ParallelConfig

    input_ids = torch.load(inputs_file)["input_ids"]
    batch, seq = input_ids.shape
    with MegatronCpuCompat("cpu"):
        parallel = ParallelConfig()
        init_distributed(parallel, "cpu", seed=1234)
        model = build_model(hf_dir, parallel, device="cpu", params_dtype="bfloat16")
        assert model.config.bf16 and model.config.attention_softmax_in_fp32
        routing = {}

        def record(index):
            def hook(module, inputs, outputs):
                routing_map = outputs[1]  # [seq * batch, experts] bool, tokens in megatron's [seq, batch] order
                experts = routing_map.nonzero()[:, 1].view(seq, batch, -1).transpose(0, 1)
                routing[index] = experts.sort(dim=-1).values.to(torch.int32)

            return hook

        (chunk,) = model.chunks
        for index, layer in enumerate(chunk.module.decoder.layers):
            layer.mlp.router.register_forward_hook(record(index))
        logits = forward_logits(model, input_ids, micro_batch_size=batch)
        torch.save(
            {"logits": logits.float(), "routing": torch.stack([routing[i] for i in sorted(routing)], 2)}, out_file
        )
        destroy_distributed()


def vllm(hf_dir: str, out_file: str, inputs_file: str) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from sapo_megatron.config import RolloutConfig
    from sapo_megatron.rollout import RolloutEngine

    rows = torch.load(inputs_file)["input_ids"].tolist()
    engine = RolloutEngine(hf_dir, RolloutConfig(kv_cache_memory_bytes=64 * 1024**2, seed=0), dtype="bfloat16")
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=row) for row in rows], params, use_tqdm=False)
    logprobs = [[out.prompt_logprobs[j][row[j]].logprob for j in range(1, len(row))] for out, row in zip(outputs, rows)]
    torch.save({"logprobs": torch.tensor(logprobs, dtype=torch.float64)}, out_file)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"make": make, "hf": hf, "megatron": megatron, "vllm": vllm}[mode](*args)
