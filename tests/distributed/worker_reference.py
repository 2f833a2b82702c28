"""The KL term's reference policy in the megatron actor: two SAPO + KL steps of the tiny Qwen3-MoE.

Usage: worker_reference.py OUT_DIR HF_DIR CKPT_ROOT LAYOUT [LAYOUT ...]
  (layouts as in worker_actor_step.py: ``tp2-pp1-ep1-etp2-dp1-alltoall``). The first job (one process) draws
  the batch and ``logprobs_old`` and writes OUT_DIR/inputs.pt; later jobs read it. A job whose CKPT_ROOT
  holds no checkpoint yet saves one (with the reference) after its steps; a job that finds one loads it into
  each of its layouts at the end (weights and reference, resharded).

Per layout, the trainer's sequence with ``algorithm.kl_coef > 0``: capture the reference from the initial
weights; then for each of mini-batches A and B: reference log-probs (a swap in and out), one update step with
them. Step A starts at the reference (KL 0), so step B is the one whose KL term acts. Each rank writes
OUT_DIR/<layout>/rank<r>.pt with the log-probs of every pass, the metrics and the update's log-probs of each
step, the HF weights after B, and the in-process bit-exact checks (``exact``: name -> bool). Last, each layout
takes one more step on mini-batch A with the behaviour-policy correction's ``rollout_weights`` (``corrected``:
its metrics and the update's log-probs), after everything above is recorded, so it changes none of it.
"""

import sys
from pathlib import Path

import torch

import worker_actor_step as steps

# Large, so that in step B (the policy one step from the reference, |log r| ~ 0.05) the KL gradient is a
# sizeable part of the update and a layout that got it wrong would show in the weights.
KL_COEF = 10.0
KL_ESTIMATOR = "k3"
# The last step's behaviour-policy correction (token level): some weights are truncated at this.
CORRECTION_CLIP = 1.5


def overrides() -> list[str]:
    return steps.overrides() + [f"algorithm.kl_coef={KL_COEF}", f"algorithm.kl_estimator={KL_ESTIMATOR}"]


def _params(actor) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in actor.model.chunks for p in chunk.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _inputs(out_dir: Path, hf_dir: str, policy, batch_of) -> dict:
    """The batch and logprobs_old: drawn by the first job (from its initial log-probs), read by the others."""
    path = out_dir / "inputs.pt"
    if path.exists():
        return torch.load(path)
    from transformers import AutoTokenizer

    data = steps.make_batch(AutoTokenizer.from_pretrained(hf_dir).pad_token_id)
    logprobs = policy.compute_logprobs(batch_of(data)).logprobs
    data["logprobs_old"] = torch.where(data["loss_mask"], logprobs + data["noise"], torch.zeros(()))
    if torch.distributed.get_rank() == 0:
        torch.save(data, path)
    return data


def corrected_inputs(batch) -> dict:
    """Mini-batch A's rows with the behaviour-policy correction: logprobs_rollout drawn around logprobs_old
    (a fixed draw, the same in every job), token-level weights truncated at CORRECTION_CLIP."""
    from sapo_megatron.algorithms import rollout_correction_weights

    generator = torch.Generator().manual_seed(7)
    logprobs_rollout = batch.logprobs_old + 0.5 * torch.randn(batch.logprobs_old.shape, generator=generator)
    weights = rollout_correction_weights(
        batch.logprobs_old, logprobs_rollout, batch.loss_mask, level="token", clip=CORRECTION_CLIP
    )
    return {"rows": steps.MINI_BATCHES[0], "rollout_weights": weights}


def _corrected_step(policy, batch, record: dict) -> None:
    """One more step, on mini-batch A with rollout_weights, once everything above is recorded (every layout
    holds the first job's trained weights by now: its own, or loaded from its checkpoint)."""
    corrected = corrected_inputs(batch)
    mb = batch.with_(logprobs_ref=record["reference"][0], rollout_weights=corrected["rollout_weights"])
    done = policy.train_mini_batch(mb.select(corrected["rows"]), return_logprobs=True)
    record["corrected"] = {"metrics": done.scalars(), "update_logprobs": done.logprobs}


def run(out_dir: str, hf_dir: str, ckpt_root: str, *layouts: str) -> None:
    import dataclasses

    from sapo_megatron.actor.batch import TrainBatch
    from sapo_megatron.actor.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.factory import build_actor
    from sapo_megatron.actor.model import export_hf_weights
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.actor.reference import ReferencePolicy
    from sapo_megatron.config import load_config

    out = Path(out_dir)
    saved_checkpoint = find_checkpoint(ckpt_root)

    def batch_of(data: dict) -> TrainBatch:
        return TrainBatch(
            tokens=data["tokens"], loss_mask=data["loss_mask"], advantages=data["advantages"],
            logprobs_old=data.get("logprobs_old"),
        )

    base = load_config(steps.RECIPE, overrides())
    with MegatronCpuCompat("cpu"):
        for layout in layouts:
            parallel, data_parallel, distributed_optimizer = steps.parse_layout(layout)
            cfg = dataclasses.replace(
                base,
                parallel=parallel,
                optimizer=dataclasses.replace(base.optimizer, use_distributed_optimizer=distributed_optimizer),
            )
            placement = init_distributed(cfg.parallel, "cpu", seed=1)
            assert placement.data == data_parallel, f"{layout}: data-parallel size is {placement.data}"
            actor = build_actor(cfg, hf_dir, device=torch.device("cpu"), total_steps=2)
            policy = actor.policy
            batch = batch_of(_inputs(out, hf_dir, policy, batch_of))
            exact: dict[str, bool] = {}

            initial = policy.compute_logprobs(batch).logprobs
            reference = ReferencePolicy.capture(policy)
            record = {"initial": initial, "reference": [], "metrics": [], "update_logprobs": [], "kl_coef": KL_COEF}
            for rows in steps.MINI_BATCHES:
                before = _params(actor)
                current = policy.compute_logprobs(batch).logprobs
                logprobs_ref = reference.compute_logprobs(batch).logprobs
                exact[f"swap restores the weights (step {len(record['metrics'])})"] = _same(_params(actor), before)
                exact[f"policy log-probs unchanged by the swap (step {len(record['metrics'])})"] = torch.equal(
                    policy.compute_logprobs(batch).logprobs, current
                )
                record["reference"].append(logprobs_ref)
                mb = batch.with_(logprobs_ref=logprobs_ref).select(rows)
                done = policy.train_mini_batch(mb, return_logprobs=True)
                metrics, update_logprobs = done.scalars(), done.logprobs
                record["metrics"].append(metrics)
                record["update_logprobs"].append(update_logprobs)
            # The trainer's call: each data-parallel rank passes its own share (local=True), the keyword passed through.
            dp_rank, dp_size = policy._dp()
            share = slice(dp_rank * batch.size // dp_size, (dp_rank + 1) * batch.size // dp_size)
            record["share"] = (share.start, share.stop)
            record["local_reference"] = reference.compute_logprobs(batch.select(share), local=True).logprobs
            record["after"] = policy.compute_logprobs(batch).logprobs
            record["weights"] = {name: tensor.detach().clone() for name, tensor in export_hf_weights(actor.model)}
            trained = _params(actor)

            # A fresh copy of the initial model, built now, beside the trained one.
            fresh = build_actor(cfg, hf_dir, device=torch.device("cpu"), total_steps=2)
            record["fresh"] = fresh.policy.compute_logprobs(batch).logprobs
            del fresh

            if saved_checkpoint is None:
                # Save with the reference; re-capture it from the trained weights; load: the initial ones return.
                save_checkpoint(actor, ckpt_root, 2, {}, reference=reference)
                reference.recapture()
                record["recaptured"] = reference.compute_logprobs(batch).logprobs
                load_checkpoint(actor, ckpt_root, reference=reference)
                record["loaded"] = reference.compute_logprobs(batch).logprobs
                exact["checkpoint load restores the trained weights"] = _same(_params(actor), trained)
            else:
                # The first job's checkpoint, resharded into this layout: its trained weights and its reference.
                reference.recapture()
                load_checkpoint(actor, ckpt_root, load_optimizer=False, reference=reference)
                record["loaded"] = reference.compute_logprobs(batch).logprobs
                record["loaded_policy"] = policy.compute_logprobs(batch).logprobs
            _corrected_step(policy, batch, record)
            record["exact"] = exact
            target = out / layout
            target.mkdir(parents=True, exist_ok=True)
            torch.save(record, target / f"rank{placement.rank}.pt")
            del actor, policy, reference
            destroy_distributed(keep_process_group=True)
    destroy_distributed()


if __name__ == "__main__":
    run(*sys.argv[1:])
