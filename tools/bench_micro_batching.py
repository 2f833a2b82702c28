"""Update-phase time with token-budget micro-batches vs fixed-size ones, on a length-skewed batch.

    python tools/bench_micro_batching.py [--rows 64] [--max-len 480] [--long-frac 0.125]
                                         [--micro-batch-size 8] [--max-tokens 0] [--repeats 3] [--threads 1]

One process (a one-rank gloo group), the tiny Qwen3-MoE, fp32 on CPU, SAPO. The batch looks like an RL
rollout on a reasoning task: a 16-token prompt, most responses short (8-48 tokens), ``--long-frac`` of them
within the last 10% of ``--max-len`` (rows shuffled). The update phase is what the trainer runs per mini-batch:
``train_mini_batch`` (forward, SAPO inside the pipeline's loss function, backward, optimizer step) with routing
recorded and the update's log-probs returned.

Both modes run on the same actor in one process, alternating (fixed, budget) for ``--repeats`` rounds after
one warm-up round, so a change in machine load does not favour either; the medians are compared. The fixed
split is ``--micro-batch-size`` rows per micro-batch, each padded to the batch's width; the token budget
defaults to the same peak micro-batch size (``micro_batch_size x max_len`` padded tokens), i.e. the same
activation-memory bound, so the gain is the padding the short rows no longer carry (and attention's
quadratic cost on it).

Prints the padded tokens and median update time of each mode, then ``update time token-budget / fixed: X.XX``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu_sapo.yaml"
PROMPT_LEN = 16


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64, help="sequences in the mini-batch")
    p.add_argument("--max-len", type=int, default=480, help="the longest sequence (prompt + response) in tokens")
    p.add_argument("--long-frac", type=float, default=0.125, help="fraction of responses near the maximum")
    p.add_argument("--micro-batch-size", type=int, default=8, help="rows per micro-batch of the fixed split")
    p.add_argument("--max-tokens", type=int, default=0, help="token budget (0: micro-batch-size x max-len)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs both modes once)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def skewed_batch(rows: int, max_len: int, long_frac: float, pad_id: int, seed: int):
    """Right-padded rows of ``max_len + 1`` positions: PROMPT_LEN prompt tokens, then a short or a long response."""
    from sapo_megatron.actor.batch import TrainBatch, collate_sequences

    generator = torch.Generator().manual_seed(seed)
    num_long = max(1, round(rows * long_frac))
    is_long = torch.zeros(rows, dtype=torch.bool)
    is_long[torch.randperm(rows, generator=generator)[:num_long]] = True
    max_response = max_len - PROMPT_LEN
    prompts, responses = [], []
    for long in is_long.tolist():
        low, high = (int(0.9 * max_len) - PROMPT_LEN, max_response) if long else (8, 48)
        n = int(torch.randint(low, high + 1, (1,), generator=generator))
        prompts.append(torch.randint(0, 256, (PROMPT_LEN,), generator=generator).tolist())
        responses.append(torch.randint(0, 256, (n,), generator=generator).tolist())
    tokens, mask, _ = collate_sequences(prompts, responses, pad_id=pad_id, seq_len=max_len + 1)
    advantages = torch.randn(rows, generator=generator)
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=advantages)


def main(argv=None) -> None:
    args = _parse(argv)
    if args.max_len + 1 > 512:
        raise ValueError(f"--max-len={args.max_len}: the tiny model has 512 positions; use at most 511")
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.factory import build_actor
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.config import load_config
    from sapo_megatron.models.tiny import TinyModelSpec, build_tiny_model

    hf_dir = build_tiny_model(TinyModelSpec())
    budget = args.max_tokens or args.micro_batch_size * args.max_len
    cfg = load_config(
        RECIPE,
        [
            f"trainer.micro_batch_size={args.micro_batch_size}",
            "optimizer.lr=1.0e-6",
            "optimizer.lr_warmup_steps=0",
            "optimizer.lr_decay_style=constant",
        ],
    )
    batch = skewed_batch(
        args.rows, args.max_len, args.long_frac, AutoTokenizer.from_pretrained(hf_dir).pad_token_id, args.seed
    )
    with MegatronCpuCompat("cpu"):
        init_distributed(cfg.parallel, "cpu", seed=1)
        actor = build_actor(cfg, hf_dir, device=torch.device("cpu"), total_steps=2 * (args.repeats + 1))
        policy = actor.policy
        batch = batch.with_(logprobs_old=policy.compute_logprobs(batch).logprobs)
        modes = {"fixed": 0, "token-budget": budget}
        padded, seconds = {}, {mode: [] for mode in modes}
        for mode, max_tokens in modes.items():
            policy.max_tokens_per_micro_batch = max_tokens
            micro, layout = policy._local_micro_batches(batch)
            padded[mode] = (sum(mb.size * mb.seq_len for mb in micro), layout.num_microbatches)
        for round_ in range(args.repeats + 1):
            for mode, max_tokens in modes.items():
                policy.max_tokens_per_micro_batch = max_tokens
                start = time.perf_counter()
                policy.train_mini_batch(batch, record_routing=True, return_logprobs=True)
                if round_ > 0:  # the first round warms up
                    seconds[mode].append(time.perf_counter() - start)
        destroy_distributed()

    lengths = (batch.loss_mask.sum(1) + PROMPT_LEN).tolist()
    print(
        f"batch: {args.rows} rows, lengths {min(lengths)}-{max(lengths)} (median {statistics.median(lengths):.0f}), "
        f"{sum(lengths)} real tokens; fixed: {args.micro_batch_size} rows per micro-batch; token budget: {budget}"
    )
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    for mode in modes:
        tokens, count = padded[mode]
        print(
            f"{mode:>12}: {count:2d} micro-batches, {tokens:6d} padded tokens, "
            f"update {median[mode]:.3f} s (median of {args.repeats})"
        )
    print(f"update time token-budget / fixed: {median['token-budget'] / median['fixed']:.2f}")


if __name__ == "__main__":
    main()
