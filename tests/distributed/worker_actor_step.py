"""Two SAPO optimizer steps of the tiny Qwen3-MoE: in plain PyTorch (transformers), or in the megatron actor.

Usage:
  worker_actor_step.py reference OUT_DIR HF_DIR
      One process that never imports megatron. Builds the fixed batch, takes two SAPO + Adam steps on a
      transformers model and writes OUT_DIR/inputs.pt (the batch, ``logprobs_old`` and the step settings) and
      OUT_DIR/reference.pt (the same record a megatron rank writes, see below).
  worker_actor_step.py megatron OUT_DIR HF_DIR LAYOUT [LAYOUT ...]
      Reads OUT_DIR/inputs.pt, builds the actor for each layout in turn (``tp2-pp1-ep1-etp2-dp1-alltoall``,
      optionally ``-nodistopt``) and writes OUT_DIR/<layout>/rank<r>.pt.

The step sequence is the trainer's: ``logprobs_old`` is fixed for the whole batch before any update, then
mini-batch A (rows 0-7) and mini-batch B (rows 8-15) each take one optimizer step, so B's update is
already off-policy with respect to ``logprobs_old`` by A's step. The record holds, for every rank:
``logprobs`` [3, B, S] (before, after A, after B), ``metrics`` (one dict per step, with ``grad_norm``),
``weights`` (HF names -> full tensors after each step).
"""

import sys
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu_sapo.yaml"
SEQ_LEN = 13  # odd: sequence parallelism has to pad
NUM_ROWS = 16
MINI_BATCHES = (slice(0, 8), slice(8, 16))
# Fewer rows per micro-batch than a data-parallel rank holds: several micro-batches per schedule, and
# 8 rows pad to 9 (one process) or 12 (two data-parallel ranks), so padding rows are exercised too.
MICRO_BATCH_SIZE = 3
# Adam's first step is lr * g / (|g| + eps). With eps well above every clipped gradient entry (<= 0.17 here)
# the update is close to proportional to the gradient (SGD with step lr / eps), so the weights after a step
# reveal a wrong gradient direction; with a tiny eps Adam's first step is lr * sign(g) and hides it.
# clip_grad sits below the gradient norm of both steps, so the global-norm clipping across ranks is active;
# clipping then hides a wrong gradient scale from the weights, which is why the tests also compare grad_norm.
OPTIMIZER = {"lr": 0.2, "adam_eps": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "clip_grad": 2.0}


def overrides() -> list[str]:
    items = [f"optimizer.{key}={value}" for key, value in OPTIMIZER.items()]
    return items + [
        f"trainer.micro_batch_size={MICRO_BATCH_SIZE}",
        "optimizer.weight_decay=0.0",
        "optimizer.lr_warmup_steps=0",
        "optimizer.lr_decay_style=constant",
        "rollout.temperature=1.0",
    ]


def make_batch(pad_id: int) -> dict:
    """Right-padded rows with uneven prompt / response lengths, a fully masked row in each mini-batch,
    advantages of both signs, and a loss mask in the actor's convention (position t predicts token t+1)."""
    generator = torch.Generator().manual_seed(20251119)
    tokens = torch.full((NUM_ROWS, SEQ_LEN), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(NUM_ROWS, SEQ_LEN, dtype=torch.bool)
    prompt_lens = [2, 3, 5, 4, 1, 6, 2, 3, 4, 2, 5, 3, 1, 4, 2, 6]
    response_lens = [9, 4, 8, 0, 12, 3, 10, 6, 5, 11, 0, 9, 7, 2, 10, 7]
    for row, (n_prompt, n_resp) in enumerate(zip(prompt_lens, response_lens)):
        length = n_prompt + n_resp
        assert length <= SEQ_LEN
        tokens[row, :length] = torch.randint(0, 256, (length,), generator=generator)
        loss_mask[row, n_prompt - 1 : n_prompt - 1 + n_resp] = True
    advantages = torch.randn(NUM_ROWS, generator=generator)
    advantages[1], advantages[9] = 0.7, -1.3  # both signs in each mini-batch whatever the draw
    # Off-policy by construction: logprobs_old = current log-probs + this noise, so r = exp(-noise) spreads
    # over roughly [0.4, 2.5] and SAPO's gate weights lie well below 1 for many tokens.
    noise = 0.6 * torch.randn(NUM_ROWS, SEQ_LEN, generator=generator)
    return {"tokens": tokens, "loss_mask": loss_mask, "advantages": advantages, "noise": noise}


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S]: position t holds log p(tokens[t+1]); the last position is 0 (the actor's convention)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(logprobs, (0, 1))


def run_reference(out_dir: str, hf_dir: str) -> None:
    import tempfile

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sapo_megatron.algorithms import sapo_loss
    from sapo_megatron.config import load_config

    cfg = load_config(RECIPE, overrides())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    data = make_batch(tokenizer.pad_token_id)
    tokens, loss_mask, advantages = data["tokens"], data["loss_mask"], data["advantages"]
    ones = torch.ones_like(tokens)

    def logprobs_now() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return token_logprobs(model(input_ids=tokens, attention_mask=ones).logits, tokens)

    def weights_now() -> dict:
        # save_pretrained writes the per-expert checkpoint names that the megatron bridge exports.
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            return load_file(Path(tmp) / "model.safetensors")

    logprobs = [logprobs_now()]
    logprobs_old = torch.where(loss_mask, logprobs[0] + data["noise"], torch.zeros(()))
    opt = cfg.optimizer
    optimizer = torch.optim.Adam(
        model.parameters(), lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps, weight_decay=0.0
    )
    sapo = cfg.algorithm.sapo
    metrics, weights = [], []
    for rows in MINI_BATCHES:
        model.train()
        optimizer.zero_grad()
        mask = loss_mask[rows]
        current = token_logprobs(model(input_ids=tokens[rows], attention_mask=ones[rows]).logits, tokens[rows])
        loss, step_metrics = sapo_loss(
            current,
            logprobs_old[rows],
            advantages[rows],
            mask,
            tau_pos=sapo.tau_pos,
            tau_neg=sapo.tau_neg,
            reduction=cfg.algorithm.reduction,
            num_global_tokens=int(mask.sum()),
            num_global_seqs=int(mask.any(dim=1).sum()),
        )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad)
        optimizer.step()
        step_metrics = {key: float(value) for key, value in step_metrics.items()}
        step_metrics.update(loss=float(loss.detach()), pg_loss=float(loss.detach()), grad_norm=float(grad_norm))
        metrics.append(step_metrics)
        weights.append(weights_now())
        logprobs.append(logprobs_now())
    inputs = dict(data, logprobs_old=logprobs_old, optimizer=dict(OPTIMIZER), micro_batch_size=MICRO_BATCH_SIZE)
    torch.save(inputs, Path(out_dir) / "inputs.pt")
    record = {"logprobs": torch.stack(logprobs), "metrics": metrics, "weights": weights}
    torch.save(record, Path(out_dir) / "reference.pt")


def parse_layout(text: str):
    """``tp2-pp2-ep2-etp1-dp1-alltoall`` or ``...-nodistopt`` (megatron's plain optimizer instead of the
    distributed one) -> (ParallelConfig, data-parallel size, use_distributed_optimizer)."""
    from sapo_megatron.config import ParallelConfig

    tp, pp, ep, etp, dp, dispatcher, *flags = text.split("-")
    assert set(flags) <= {"nodistopt"}, text
    tensor = int(tp.removeprefix("tp"))
    parallel = ParallelConfig(
        tensor=tensor,
        pipeline=int(pp.removeprefix("pp")),
        expert=int(ep.removeprefix("ep")),
        expert_tensor=int(etp.removeprefix("etp")),
        sequence_parallel=tensor > 1,
        moe_token_dispatcher=dispatcher,
    )
    return parallel, int(dp.removeprefix("dp")), "nodistopt" not in flags


def run_megatron(out_dir: str, hf_dir: str, *layouts: str) -> None:
    import dataclasses

    from sapo_megatron.actor.batch import TrainBatch
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.factory import build_actor
    from sapo_megatron.actor.model import export_hf_weights
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.config import load_config

    inputs = torch.load(Path(out_dir) / "inputs.pt")
    batch = TrainBatch(
        tokens=inputs["tokens"],
        loss_mask=inputs["loss_mask"],
        advantages=inputs["advantages"],
        logprobs_old=inputs["logprobs_old"],
    )
    base = load_config(RECIPE, overrides())
    with MegatronCpuCompat("cpu"):
        for layout in layouts:
            parallel, data_parallel, distributed_optimizer = parse_layout(layout)
            cfg = dataclasses.replace(
                base,
                parallel=parallel,
                optimizer=dataclasses.replace(base.optimizer, use_distributed_optimizer=distributed_optimizer),
            )
            placement = init_distributed(cfg.parallel, "cpu", seed=1)
            assert placement.data == data_parallel, f"{layout}: data-parallel size is {placement.data}"
            actor = build_actor(cfg, hf_dir, device=torch.device("cpu"), total_steps=1)
            policy = actor.policy
            logprobs = [policy.compute_logprobs(batch).logprobs]
            metrics, weights = [], []
            for rows in MINI_BATCHES:
                metrics.append(policy.train_mini_batch(batch.select(rows)).scalars())
                weights.append({name: tensor.detach().clone() for name, tensor in export_hf_weights(actor.model)})
                logprobs.append(policy.compute_logprobs(batch).logprobs)
            target = Path(out_dir) / layout
            target.mkdir(parents=True, exist_ok=True)
            record = {
                "logprobs": torch.stack(logprobs),
                "metrics": metrics,
                "weights": weights,
            }
            torch.save(record, target / f"rank{placement.rank}.pt")
            del actor, policy
            destroy_distributed(keep_process_group=True)
    destroy_distributed()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"reference": run_reference, "megatron": run_megatron}[mode](*args)
