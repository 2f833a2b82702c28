"""Reference routing from transformers' Qwen3-MoE router, in a process that never touches megatron.

Usage: worker_routing_hf.py OUT_FILE HF_DIR
Writes, for fixed tokens [B, S], four passes of the HF model: ``natural`` (the routers choose), ``forced``
(every router takes the experts of ``forced_routing``, where that holds -1 it chooses itself), then, with
every router weight perturbed as worker_routing_replay.perturb_routers does it, ``perturbed`` (the routers
choose) and ``replayed`` (every router takes the experts the ``natural`` pass recorded: what the actor's
routing replay must reproduce after the router weights changed).
Per pass: ``routing`` [B, S, layers, topk] (the experts used, in the router's order), ``logits``
[B, S, layers, experts] (router logits, to tell near-ties apart) and ``logprobs`` [B, S] (position t:
log p(tokens[t + 1]); the last position 0).
"""

import sys

import torch

from worker_routing_replay import PERTURBATION

BATCH, SEQ = 5, 11  # 5 rows: the actor pads the batch; 11 tokens: sequence parallelism pads the sequence
FORCED_FROM = 8  # positions >= this are -1 in the forced routing: the routers choose there


def forced_routing(layers: int, experts: int, topk: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(99)
    routing = torch.rand(BATCH, SEQ, layers, experts, generator=generator).argsort(dim=-1)[..., :topk]
    routing[:, FORCED_FROM:] = -1
    return routing.to(torch.int32)


def main(out_file: str, hf_dir: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    config = model.config
    gates = [layer.mlp.gate for layer in model.model.layers]
    assert all(isinstance(gate, Qwen3MoeTopKRouter) for gate in gates), "every tiny layer is an MoE layer"
    assert config.norm_topk_prob, "the forced gate below renormalises over the chosen experts"
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, 259, (BATCH, SEQ), generator=generator)
    forced = forced_routing(len(gates), config.num_experts, config.num_experts_per_tok)
    state = {"force": None, "routing": {}, "logits": {}}

    def gate_forward(index, gate):
        def forward(hidden_states):
            router_logits, scores, indices = Qwen3MoeTopKRouter.forward(gate, hidden_states)
            if state["force"] is not None:
                given = state["force"][:, :, index].reshape(-1, indices.shape[-1]).long()
                use = given[:, :1] >= 0
                indices = torch.where(use, given, indices)
                # norm_topk_prob: the weights are the softmax over the chosen experts' logits.
                scores = torch.softmax(router_logits.gather(1, indices).float(), dim=-1).to(router_logits.dtype)
            state["routing"][index] = indices.reshape(BATCH, SEQ, -1)
            state["logits"][index] = router_logits.reshape(BATCH, SEQ, -1)
            return router_logits, scores, indices

        return forward

    for index, gate in enumerate(gates):
        gate.forward = gate_forward(index, gate)

    def run(force):
        state["force"] = force
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        return {
            "routing": torch.stack([state["routing"][i] for i in range(len(gates))], dim=2).to(torch.int32),
            "logits": torch.stack([state["logits"][i] for i in range(len(gates))], dim=2).float(),
            "logprobs": torch.nn.functional.pad(logprobs, (0, 1)),
        }

    natural = run(None)
    forced_pass = run(forced)
    # The actor's perturbation (worker_routing_replay.perturb_routers): megatron numbers layers from 1.
    with torch.no_grad():
        for index, gate in enumerate(gates):
            generator = torch.Generator().manual_seed(1000 + index + 1)
            gate.weight.add_(PERTURBATION * torch.randn(gate.weight.shape, generator=generator).to(gate.weight.dtype))
    torch.save(
        {
            "input_ids": input_ids,
            "forced_routing": forced,
            "natural": natural,
            "forced": forced_pass,
            "perturbed": run(None),
            "replayed": run(natural["routing"]),
        },
        out_file,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
