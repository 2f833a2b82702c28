"""Reference logits from transformers for the tiny Qwen3-MoE, in a process that never touches megatron.

Usage: worker_model_hf_reference.py OUT_FILE HF_DIR
Writes {"input_ids": [B, S] int64, "logits": [B, S, V] fp32}.
"""

import sys

import torch


def main(out_file: str, hf_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1234)
    # 11 tokens: not a multiple of 2, so sequence parallelism has to pad; 4 rows: 2 micro-batches of 2.
    input_ids = torch.randint(0, 259, (4, 11), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    torch.save({"input_ids": input_ids, "logits": logits.float()}, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
