"""One typed configuration schema for the whole pipeline.

Each component owns a dataclass; a recipe is a YAML file holding only the values that differ from the
defaults, and command-line overrides are dotted paths (``algorithm.sapo.tau_neg=1.1``). Everything is
checked against the schema before any work starts: unknown keys, wrong types and invalid values raise
:class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user error in a recipe or an override; the message names the key and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------

# A choice's allowed values are written once, as the Literal type of its field; the tuples that the algorithms
# check against and the tests iterate over are derived from it.
PolicyLossName = Literal["sapo", "clip", "dual_clip", "gspo", "cispo"]
Reduction = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo"]
KlEstimator = Literal["k1", "k2", "k3"]

POLICY_LOSSES: tuple[str, ...] = typing.get_args(PolicyLossName)
REDUCTIONS: tuple[str, ...] = typing.get_args(Reduction)
ADVANTAGE_ESTIMATORS: tuple[str, ...] = typing.get_args(AdvantageEstimator)
KL_ESTIMATORS: tuple[str, ...] = typing.get_args(KlEstimator)


@dataclass
class SapoConfig:
    """SAPO soft gate f(r) = sigmoid(tau * (r - 1)) * 4 / tau; tau_neg > tau_pos damps negative updates faster."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def validate(self, prefix: str) -> None:
        for name in ("tau_pos", "tau_neg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{prefix}.{name}={value!r}: the gate temperature must be a finite number > 0")


@dataclass
class ClipConfig:
    """PPO/GRPO clipped surrogate; eps_high > eps_low is DAPO's clip-higher. dual_clip_c enables dual-clip."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float = 3.0

    def validate(self, prefix: str) -> None:
        for name in ("eps_low", "eps_high"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{prefix}.{name}={value!r}: the clip range must be a finite number > 0")
        if self.eps_low >= 1:
            raise ConfigError(f"{prefix}.eps_low={self.eps_low!r}: must be < 1 (the lower bound is 1 - eps_low > 0)")
        if not self.dual_clip_c > 1:
            raise ConfigError(f"{prefix}.dual_clip_c={self.dual_clip_c!r}: dual-clip needs a constant c > 1")


@dataclass
class GspoConfig:
    """GSPO: sequence-level (geometric mean) ratio with a narrow clip band."""

    eps_low: float = 3e-4
    eps_high: float = 4e-4

    def validate(self, prefix: str) -> None:
        for name in ("eps_low", "eps_high"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{prefix}.{name}={value!r}: the clip range must be a finite number > 0")


@dataclass
class CispoConfig:
    """CISPO: REINFORCE weighted by a clipped, detached importance ratio (no token is dropped)."""

    eps_low: float = 1.0e6  # effectively no lower clip, as in the MiniMax-M1 report
    eps_high: float = 0.28

    def validate(self, prefix: str) -> None:
        for name in ("eps_low", "eps_high"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{prefix}.{name}={value!r}: must be > 0")


@dataclass
class AlgorithmConfig:
    policy_loss: PolicyLossName = "sapo"
    reduction: Reduction = "seq_mean_token_mean"
    advantage: AdvantageEstimator = "grpo"
    # Token count used by seq_mean_token_sum_norm (Dr. GRPO's constant normaliser); 0 = max response length.
    reduction_norm_length: int = 0
    sapo: SapoConfig = field(default_factory=SapoConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    gspo: GspoConfig = field(default_factory=GspoConfig)
    cispo: CispoConfig = field(default_factory=CispoConfig)
    kl_coef: float = 0.0
    kl_estimator: KlEstimator = "k3"
    entropy_coef: float = 0.0
    # One rollout batch is split into this many mini-batches, one optimizer step each.
    num_mini_batches: int = 1
    # MoE routing replay in the update: "off" lets the routers choose; "old" replays the routing recorded
    # while recomputing logprobs_old; "rollout" replays the rollout engine's routing (in the logprobs_old
    # recompute too), so trainer and engine use the same experts for every sampled token.
    routing_replay: Literal["off", "old", "rollout"] = "off"
    # Behaviour-policy correction: the rollout engine's policy differs from the old policy the loss's ratio is
    # taken against (engine numerics, and stale weights with rollout.max_staleness > 0). "token" multiplies each
    # token's loss by min(pi_old / pi_rollout, rollout_correction_clip), "sequence" each sequence's tokens by
    # the truncated product of its ratios (truncated importance sampling); "off" leaves the loss as it is.
    rollout_correction: Literal["off", "token", "sequence"] = "off"
    rollout_correction_clip: float = 2.0

    def validate(self, prefix: str) -> None:
        if not (self.rollout_correction_clip >= 1 and math.isfinite(self.rollout_correction_clip)):
            raise ConfigError(f"{prefix}.rollout_correction_clip={self.rollout_correction_clip!r}: must be a finite "
                              "number >= 1 (the largest importance weight kept)")
        for sub in ("sapo", "clip", "gspo", "cispo"):
            getattr(self, sub).validate(f"{prefix}.{sub}")
        if self.kl_coef < 0 or not math.isfinite(self.kl_coef):
            raise ConfigError(f"{prefix}.kl_coef={self.kl_coef!r}: must be a finite number >= 0 (0 disables KL)")
        if not math.isfinite(self.entropy_coef):
            raise ConfigError(f"{prefix}.entropy_coef={self.entropy_coef!r}: must be finite")
        if self.num_mini_batches < 1:
            raise ConfigError(f"{prefix}.num_mini_batches={self.num_mini_batches!r}: must be >= 1")
        if self.reduction_norm_length < 0:
            raise ConfigError(f"{prefix}.reduction_norm_length={self.reduction_norm_length!r}: must be >= 0")


@dataclass
class ModelConfig:
    # A Hugging Face model directory, or "tiny-qwen3-moe" for the embedded CPU model built locally.
    hf_path: str = "tiny-qwen3-moe"
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Dense control of the same size (replaces each MoE block by a dense MLP); used by the routing study.
    dense: bool = False
    recompute_activations: bool = False

    def validate(self, prefix: str) -> None:
        if not self.hf_path:
            raise ConfigError(f"{prefix}.hf_path is empty: give a Hugging Face model directory or 'tiny-qwen3-moe'")


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 0  # 0 = no interleaving
    expert: int = 1
    # 0 = the same as `tensor` (megatron-core's default). Any other value must be >= 1.
    expert_tensor: int = 0
    context: int = 1
    sequence_parallel: bool = False
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"

    def validate(self, prefix: str) -> None:
        for name in ("tensor", "pipeline", "expert", "context"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{prefix}.{name}={value!r}: parallel sizes must be >= 1")
        if self.expert_tensor < 0:
            raise ConfigError(
                f"{prefix}.expert_tensor={self.expert_tensor!r}: must be >= 1, or 0 to follow parallel.tensor"
            )
        if self.virtual_pipeline < 0:
            raise ConfigError(f"{prefix}.virtual_pipeline={self.virtual_pipeline!r}: must be >= 0 (0 disables it)")
        if self.virtual_pipeline and self.pipeline < 2:
            raise ConfigError(
                f"{prefix}.virtual_pipeline={self.virtual_pipeline}: interleaving needs parallel.pipeline >= 2"
            )

    @property
    def expert_tensor_size(self) -> int:
        """The effective expert-tensor-parallel size (``expert_tensor=0`` follows ``tensor``)."""
        return self.expert_tensor or self.tensor

    def data_parallel_size(self, world_size: int, prefix: str = "parallel") -> int:
        """Checks that the layout divides ``world_size`` and returns the data-parallel size."""
        model_parallel = self.tensor * self.pipeline * self.context
        if world_size % model_parallel:
            raise ConfigError(
                f"{prefix}: tensor({self.tensor}) x pipeline({self.pipeline}) x context({self.context}) = "
                f"{model_parallel} does not divide the world size {world_size}; pick sizes whose product divides it"
            )
        expert_model_parallel = self.expert * self.expert_tensor_size * self.pipeline
        if world_size % expert_model_parallel:
            raise ConfigError(
                f"{prefix}: expert({self.expert}) x expert_tensor({self.expert_tensor_size}) x pipeline({self.pipeline}) = "
                f"{expert_model_parallel} does not divide the world size {world_size}"
            )
        return world_size // model_parallel


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    # GPU only: megatron-core's HybridDeviceOptimizer keeps optimizer states and the step on the host.
    optimizer_cpu_offload: bool = False
    # Move parameters / gradient buffers / optimizer states to host memory while the rollout runs.
    offload_params: bool = False
    offload_grads: bool = False
    offload_optimizer: bool = False

    def validate(self, prefix: str) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"{prefix}.lr={self.lr!r}: must be a finite number > 0")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"{prefix}.min_lr={self.min_lr!r}: must be in [0, lr={self.lr}]")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"{prefix}.lr_warmup_steps={self.lr_warmup_steps!r}: must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"{prefix}.{name}={value!r}: must be in [0, 1)")
        if self.adam_eps <= 0:
            raise ConfigError(f"{prefix}.adam_eps={self.adam_eps!r}: must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"{prefix}.weight_decay={self.weight_decay!r}: must be >= 0")
        if self.clip_grad < 0:
            raise ConfigError(f"{prefix}.clip_grad={self.clip_grad!r}: must be >= 0 (0 disables clipping)")


@dataclass
class RolloutConfig:
    n_samples: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # vLLM's KV cache budget; the default memory probe fails on small CPU machines.
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    # "colocated": engines share the trainer's processes/devices; "remote": separate engine ranks.
    mode: Literal["colocated", "remote"] = "colocated"
    # Engines that generate, each its share of every rollout. 0 = automatic: colocated, one per trainer rank;
    # remote, one per server of server_urls (or one local server).
    num_engines: int = 0
    engine_tensor_parallel: int = 1
    # Record which experts each token was routed to in the engine (MoE only): the routing diagnostics
    # compare it with the trainer's routing, and algorithm.routing_replay=rollout replays it.
    collect_routed_experts: bool = True
    # How a CPU engine loads MoE expert weights on a sync: "direct" writes them into vLLM's prepacked kernel
    # tensors (several times faster; falls back to "reload" where it does not apply), "reload" goes through
    # vLLM's reload_weights plus the expert re-pack. See sapo_megatron/rollout/cpu_expert_load.py.
    cpu_expert_load: Literal["direct", "reload"] = "direct"
    # rollout.mode=remote: the `vllm serve` servers, as comma-separated base URLs at routable addresses
    # ("http://node7:8000,http://node8:8000"); empty = start num_engines servers on this node (CPU demo, tests).
    server_urls: str = ""
    # The address the engines reach trainer rank 0 at for the weight-transfer rendezvous (remote mode);
    # empty = this host's name. Never a loopback address on a cluster.
    sync_host: str = ""
    # Remote mode: the weight-transfer group's bound, in seconds, on forming at start-up (a server that does not
    # join within it fails the run, naming the server and sync_host:port) and on every wait inside a push (a
    # server that dies mid-push fails the push within it). It must exceed an engine's load of the full model.
    sync_timeout_s: float = 300.0
    # Asynchronous RL: the batch of step s is generated with the weights of step s - 1 - max_staleness, while the
    # actor trains the steps before it (0 = synchronous: each batch with the weights it is trained from). Needs
    # mode=remote: the engines generate in processes of their own while the actor trains (docs/async.md).
    max_staleness: int = 0

    def validate(self, prefix: str) -> None:
        if self.max_staleness < 0:
            raise ConfigError(f"{prefix}.max_staleness={self.max_staleness!r}: must be >= 0 (0 = synchronous)")
        if self.max_staleness and self.mode != "remote":
            raise ConfigError(
                f"{prefix}.max_staleness={self.max_staleness} needs {prefix}.mode=remote: asynchronous rollouts "
                "generate while the actor trains, in engine processes of their own (`vllm serve`; on one machine "
                f"leave {prefix}.server_urls empty and the run starts them). Colocated engines share the actor's "
                "process (on GPU its memory, which holds the engine or the actor's training state, not both; on CPU "
                "its interpreter, where generation and training slow each other and the run is not bit-reproducible "
                f"across a resume); use max_staleness=0 with mode=colocated"
            )
        if self.n_samples < 1:
            raise ConfigError(f"{prefix}.n_samples={self.n_samples!r}: must be >= 1")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{prefix}.max_new_tokens={self.max_new_tokens!r}: must be >= 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"{prefix}.temperature={self.temperature!r}: must be a finite number > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}.top_p={self.top_p!r}: must be in (0, 1]")
        if self.kv_cache_memory_bytes <= 0:
            raise ConfigError(f"{prefix}.kv_cache_memory_bytes={self.kv_cache_memory_bytes!r}: must be > 0")
        if self.num_engines < 0 or self.engine_tensor_parallel < 1:
            raise ConfigError(f"{prefix}: num_engines must be >= 0 (0 = automatic) and engine_tensor_parallel >= 1")
        if not (self.sync_timeout_s > 0 and math.isfinite(self.sync_timeout_s)):
            raise ConfigError(f"{prefix}.sync_timeout_s={self.sync_timeout_s!r}: must be a finite number of seconds > 0")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(
                    f"{prefix}.server_urls: {url!r} is not a base URL; give comma-separated 'http://host:port' entries"
                )

    @property
    def urls(self) -> list[str]:
        """``server_urls`` as a list (no trailing slashes)."""
        return [u.strip().rstrip("/") for u in self.server_urls.split(",") if u.strip()]


@dataclass
class DataConfig:
    # "toy:<task>" for the built-in verifiable tasks, or a path to a prepared JSONL/parquet prompt file.
    train: str = "toy:reverse"
    validation: str = ""
    prompts_per_step: int = 8
    max_prompt_length: int = 64
    seed: int = 0

    def validate(self, prefix: str) -> None:
        if not self.train:
            raise ConfigError(f"{prefix}.train is empty: give 'toy:<task>' or a prompt file path")
        if self.prompts_per_step < 1:
            raise ConfigError(f"{prefix}.prompts_per_step={self.prompts_per_step!r}: must be >= 1")
        if self.max_prompt_length < 1:
            raise ConfigError(f"{prefix}.max_prompt_length={self.max_prompt_length!r}: must be >= 1")


@dataclass
class RewardConfig:
    """How responses are scored: each call runs in a sandboxed worker process under a timeout."""

    # "auto": exact-match with partial credit for toy tasks, the math answer verifier for prompt files.
    fn: Literal["auto", "toy", "toy_exact", "math"] = "auto"
    timeout_s: float = 10.0
    num_workers: int = 1

    def validate(self, prefix: str) -> None:
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"{prefix}.timeout_s={self.timeout_s!r}: must be a finite number of seconds > 0")
        if self.num_workers < 1:
            raise ConfigError(f"{prefix}.num_workers={self.num_workers!r}: must be >= 1")


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"
    steps: int = 20
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    micro_batch_size: int = 4
    # > 0: micro-batches are formed by tokens instead (sequences sorted by length, first-fit under this many
    # padded tokens, each padded only to its own longest); 0 = micro_batch_size sequences each.
    max_tokens_per_micro_batch: int = 0
    # With a token budget: each micro-batch's sequences laid end to end in one row (megatron-core's THD packed
    # sequences, cu_seqlens) instead of padded to its longest; the budget then counts packed tokens. Needs a GPU
    # with Transformer Engine (its attention takes cu_seqlens) and parallel.context=1.
    pack_sequences: bool = False
    save_interval: int = 10
    eval_interval: int = 5
    log_interval: int = 1
    resume: bool = True
    # Checkpoints kept on disk (the oldest go first); 0 keeps all.
    keep_checkpoints: int = 2
    # Supervised steps on (prompt, answer) pairs before RL, for tasks a random model cannot get any reward on.
    sft_warmup_steps: int = 0
    # Learning rate of the warm-up steps (0: optimizer.lr). Supervised steps tolerate a far larger rate
    # than policy-gradient steps, whose gradients are mostly noise that Adam would scale up to full steps.
    sft_lr: float = 0.0
    # Held-out prompts scored (one sample each) at every eval_interval.
    val_prompts: int = 64

    def validate(self, prefix: str) -> None:
        for name in ("steps", "micro_batch_size", "val_prompts"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{prefix}.{name}={value!r}: must be >= 1")
        for name in ("save_interval", "eval_interval", "log_interval", "keep_checkpoints", "sft_warmup_steps",
                     "max_tokens_per_micro_batch"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"{prefix}.{name}={value!r}: must be >= 0 (0 disables it)")
        if not (self.sft_lr >= 0 and math.isfinite(self.sft_lr)):
            raise ConfigError(f"{prefix}.sft_lr={self.sft_lr!r}: must be a finite number >= 0 (0: optimizer.lr)")
        if self.pack_sequences and not self.max_tokens_per_micro_batch:
            raise ConfigError(
                f"{prefix}.pack_sequences=true with {prefix}.max_tokens_per_micro_batch=0: packed micro-batches are "
                f"formed by a token budget; set {prefix}.max_tokens_per_micro_batch (e.g. 16384) or "
                f"{prefix}.pack_sequences=false"
            )
        if self.pack_sequences and self.device == "cpu":
            raise ConfigError(
                f"{prefix}.pack_sequences=true with {prefix}.device=cpu: packed sequences need Transformer Engine's "
                f"attention, which runs on a CUDA GPU only; set {prefix}.pack_sequences=false (the token budget alone "
                "still cuts each micro-batch's padding to its longest row)"
            )
        if not self.run_dir:
            raise ConfigError(f"{prefix}.run_dir is empty: give a directory for logs and checkpoints")


@dataclass
class LaunchConfig:
    # The actor's nodes; world_size = nnodes x nproc_per_node.
    nnodes: int = 1
    nproc_per_node: int = 1
    # Extra nodes that run only rollout engines (rollout.mode=remote); 0 = engines share the actor's GPUs.
    rollout_nnodes: int = 0
    # One GPU's memory and what the runtime takes before any tensor (CUDA context, NCCL buffers, allocator
    # fragmentation): `sapo-megatron plan` refuses a layout whose estimate exceeds the difference.
    gpu_memory_gib: float = 80.0
    gpu_reserved_gib: float = 6.0
    # Host memory per node for offloaded state and sleeping engines; 0 = not checked.
    host_memory_gib: float = 0.0

    def validate(self, prefix: str) -> None:
        if self.nnodes < 1 or self.nproc_per_node < 1:
            raise ConfigError(f"{prefix}: nnodes and nproc_per_node must be >= 1")
        if self.rollout_nnodes < 0:
            raise ConfigError(f"{prefix}.rollout_nnodes={self.rollout_nnodes!r}: must be >= 0")
        if not (math.isfinite(self.gpu_memory_gib) and self.gpu_memory_gib > 0):
            raise ConfigError(f"{prefix}.gpu_memory_gib={self.gpu_memory_gib!r}: must be a finite number > 0")
        if not 0 <= self.gpu_reserved_gib < self.gpu_memory_gib:
            raise ConfigError(
                f"{prefix}.gpu_reserved_gib={self.gpu_reserved_gib!r}: must be in [0, gpu_memory_gib="
                f"{self.gpu_memory_gib:g})"
            )
        if not (math.isfinite(self.host_memory_gib) and self.host_memory_gib >= 0):
            raise ConfigError(f"{prefix}.host_memory_gib={self.host_memory_gib!r}: must be >= 0 (0 = not checked)")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclass
class DiagnosticsConfig:
    # The routing records the diagnostics compare (rollout vs old pass, old pass vs each update) keep at most this
    # many response tokens per data-parallel rank: a seeded sample, the same tokens in every record of a step
    # (sapo_megatron.routing_layout.sample_positions). 0 = every response token. docs/diagnostics.md says which
    # metrics then are sample estimates and what the records cost.
    routing_sample_tokens: int = 0

    def validate(self, prefix: str) -> None:
        value = self.routing_sample_tokens
        if value < 0:
            raise ConfigError(
                f"{prefix}.routing_sample_tokens={value!r}: must be >= 0 (0 = every response token, N = at most N "
                "response tokens per data-parallel rank)"
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        data_parallel = self.parallel.data_parallel_size(self.launch.world_size)
        shares = self.algorithm.num_mini_batches * data_parallel
        if data_parallel > 1 and self.data.prompts_per_step % shares:
            # Each data-parallel rank holds whole prompt groups of every mini-batch (sapo_megatron.sharding).
            raise ConfigError(
                f"data.prompts_per_step={self.data.prompts_per_step}: with {data_parallel} data-parallel ranks and "
                f"algorithm.num_mini_batches={self.algorithm.num_mini_batches} it must be a multiple of {shares}, "
                f"so that every rank holds whole prompt groups of every mini-batch"
            )
        rollout_batch = self.data.prompts_per_step * self.rollout.n_samples
        if rollout_batch % self.algorithm.num_mini_batches:
            raise ConfigError(
                f"algorithm.num_mini_batches={self.algorithm.num_mini_batches}: must divide the rollout batch "
                f"data.prompts_per_step x rollout.n_samples = {rollout_batch}"
            )
        if self.algorithm.advantage == "rloo" and self.rollout.n_samples < 2:
            raise ConfigError("algorithm.advantage=rloo needs rollout.n_samples >= 2 (leave-one-out baseline)")
        replay = self.algorithm.routing_replay
        if replay != "off" and self.model.dense:
            raise ConfigError(
                f"algorithm.routing_replay={replay!r} with model.dense=true: the dense control has no MoE routing "
                "to replay; set algorithm.routing_replay=off"
            )
        if replay == "rollout" and not self.rollout.collect_routed_experts:
            raise ConfigError(
                "algorithm.routing_replay=rollout with rollout.collect_routed_experts=false: the engine's routing is "
                "what gets replayed; set rollout.collect_routed_experts=true"
            )
        if replay != "off" and self.diagnostics.routing_sample_tokens:
            raise ConfigError(
                f"diagnostics.routing_sample_tokens={self.diagnostics.routing_sample_tokens} with "
                f"algorithm.routing_replay={replay!r}: a replayed routing needs every token up to the last response "
                "token, so it is recorded whole anyway; set diagnostics.routing_sample_tokens=0 or "
                "algorithm.routing_replay=off"
            )
        if self.trainer.pack_sequences and self.parallel.context > 1:
            raise ConfigError(
                f"trainer.pack_sequences=true with parallel.context={self.parallel.context}: packed sequences under "
                "context parallelism are not supported; use parallel.context=1 or trainer.pack_sequences=false"
            )
        if replay != "off" and self.parallel.context > 1:
            raise ConfigError(
                f"algorithm.routing_replay={replay!r} with parallel.context={self.parallel.context}: routing replay "
                "does not support context parallelism; use parallel.context=1 or routing_replay=off"
            )
        self._validate_fleet()
        if self.optimizer.optimizer_cpu_offload and self.trainer.device == "cpu":
            raise ConfigError(
                "optimizer.optimizer_cpu_offload=true with trainer.device=cpu: megatron's HybridDeviceOptimizer is "
                "a GPU feature; on CPU use optimizer.offload_optimizer=true (frees optimizer memory during rollouts)"
            )
        return self

    def engines(self) -> int:
        """How many rollout engines generate (``rollout.num_engines`` resolved)."""
        r = self.rollout
        if r.num_engines:
            return r.num_engines
        if r.mode == "colocated":
            return self.launch.world_size // r.engine_tensor_parallel
        return len(r.urls) or 1

    def _validate_fleet(self) -> None:
        r, launch = self.rollout, self.launch
        if r.mode == "colocated":
            if r.engine_tensor_parallel != 1:
                raise ConfigError(
                    f"rollout.engine_tensor_parallel={r.engine_tensor_parallel} with rollout.mode=colocated: colocated "
                    "engines run in the trainer's processes at tensor parallel 1 (one per rank); use "
                    "rollout.mode=remote with servers started at --tensor-parallel-size for larger engines"
                )
            if self.engines() != launch.world_size:
                raise ConfigError(
                    f"rollout.num_engines={r.num_engines} with rollout.mode=colocated and {launch.world_size} trainer "
                    f"rank(s): every rank holds one engine, so num_engines must be {launch.world_size} (or 0)"
                )
            if r.urls or launch.rollout_nnodes:
                raise ConfigError(
                    "rollout.server_urls / launch.rollout_nnodes are for rollout.mode=remote; colocated engines live "
                    "in the trainer's ranks"
                )
            return
        if r.collect_routed_experts and not self.model.dense:
            raise ConfigError(
                "rollout.collect_routed_experts=true with rollout.mode=remote: routed experts are not read back from "
                "the servers (on CPU vLLM cannot return them; on GPU the server flag --enable-return-routed-experts "
                "is not wired in yet), so the routing diagnostics and routing_replay=rollout need colocated engines; "
                "set rollout.collect_routed_experts=false"
            )
        if r.urls and r.num_engines and r.num_engines != len(r.urls):
            raise ConfigError(
                f"rollout.num_engines={r.num_engines} but rollout.server_urls names {len(r.urls)} server(s); give one "
                "URL per engine (or num_engines=0)"
            )
        if launch.rollout_nnodes and not r.urls:
            raise ConfigError(
                f"launch.rollout_nnodes={launch.rollout_nnodes}: the trainer reaches the rollout nodes' servers at "
                "rollout.server_urls, which is empty (slurm/train_disaggregated.sbatch fills it in)"
            )
        if not r.urls and launch.nnodes > 1:
            raise ConfigError(
                "rollout.mode=remote on several actor nodes needs rollout nodes of its own (launch.rollout_nnodes) "
                "running `sapo-megatron serve`, and their rollout.server_urls: local servers are only started for a "
                "single-node run"
            )


# ----------------------------------------------------------------------------------------------------------
# Building from dicts, YAML and dotted overrides
# ----------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # YAML 1.1 reads a bare off/on (and no/yes) as a boolean; a choice spelled that way means the word.
        if isinstance(value, bool):
            words = [w for w in (("off", "no", "false") if not value else ("on", "yes", "true")) if w in allowed]
            if words:
                value = words[0]
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: not allowed; use one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads exponent notation without a dot ("1e-4") as a string.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise AssertionError(f"unsupported schema type {tp!r} for {key}")


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = prefix or "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; allowed: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _deep_merge(base: dict, delta: dict) -> dict:
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form section.key=value, e.g. algorithm.sapo.tau_neg=1.1")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment in {path!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def _check_override_path(parts: list[str]) -> None:
    cls: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:i])} is a value, not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            allowed = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"override {'.'.join(parts)}: unknown key {part!r} in {where}; allowed: {allowed}")
        cls = hints[part]


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- recipe YAML <- dotted overrides, then type checks and validation."""
    data: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist; pass a YAML file such as recipes/tiny_cpu_sapo.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {str(path)!r}: the top level must be a mapping of sections")
        data = loaded
    for text in overrides:
        parts, value = parse_override(text)
        _check_override_path(parts)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        data = _deep_merge(data, nested)
    return _from_dict(Config, data, "").validate()


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config; loading the file back gives an equal Config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
